import sys

from fcflow.cli import main

sys.exit(main())
