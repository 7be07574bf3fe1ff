"""The science layer does not import nipype (STYLE.md: three layers, imports one way)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import fcflow

# Modules that are wiring (nipype) or command line by design.
_WIRING = ("fcflow.interfaces", "fcflow.workflows", "fcflow.cli")


def _science_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(fcflow.__path__, prefix="fcflow."):
        if not info.name.startswith(_WIRING) and info.name != "fcflow.__main__":
            names.append(info.name)
    return names


def test_science_layer_does_not_import_nipype():
    modules = _science_modules()
    assert "fcflow.config" in modules
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + (
        "bad = sorted(m for m in sys.modules if m == 'nipype' or m.startswith('nipype.'))\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"science modules pulled in nipype: {done.stdout}"
