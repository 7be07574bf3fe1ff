"""fcflow's command line.

Two forms, as BIDS Apps and their companions have them::

    fcflow BIDS_DIR OUTPUT_DIR {participant,group} [options]   # the analysis
    fcflow {simulate,seeds,demo} ...                            # tools around it

Each tool lives in a module of this package that exposes ``add_arguments(parser)`` and
``run(args) -> int``. A user error (:class:`fcflow.errors.FcflowError`, a missing file) prints one
line and exits with status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from fcflow import __version__
from fcflow.errors import FcflowError

# command name -> (module, one-line help)
_TOOLS: dict[str, tuple[str, str]] = {
    "simulate": ("fcflow.cli.simulate", "write a synthetic BIDS study with fMRIPrep-style derivatives"),
    "seeds": ("fcflow.cli.seeds", "write the recipe's seed masks for a reference grid, to look at"),
    "demo": ("fcflow.cli.demo", "simulate the embedded sample study and analyse it end to end"),
}
_ANALYSIS_MODULE = "fcflow.cli.analysis"

_DESCRIPTION = """\
Seed-to-voxel functional connectivity of drug studies on fMRIPrep derivatives.

analysis (BIDS-App form):
  fcflow BIDS_DIR OUTPUT_DIR {participant,group} [options]   (see: fcflow BIDS_DIR OUTPUT_DIR participant --help)

tools:
""" + "\n".join(f"  fcflow {name:<9} {text}" for name, (_, text) in _TOOLS.items())


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcflow",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fcflow {__version__}")
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only")


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """Return the parser that handles ``argv`` (a tool's, the analysis', or the top one)."""
    if argv and argv[0] in _TOOLS:
        module_name, text = _TOOLS[argv[0]]
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(
            prog=f"fcflow {argv[0]}",
            description=(module.__doc__ or text).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(parser)
        _add_common(parser)
        parser.set_defaults(_run=module.run)
        return parser
    if len(argv) >= 1 and not argv[0].startswith("-"):
        module = importlib.import_module(_ANALYSIS_MODULE)
        parser = argparse.ArgumentParser(
            prog="fcflow", description=(module.__doc__ or "").strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(parser)
        _add_common(parser)
        parser.set_defaults(_run=module.run)
        return parser
    return _top_parser()


def _configure_logging(level: int) -> None:
    """fcflow's messages on stderr; nipype keeps its own handler (quieter unless --debug)."""
    logger = logging.getLogger("fcflow")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s fcflow %(levelname)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Run fcflow with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv[1:] if argv and argv[0] in _TOOLS else argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    _configure_logging(logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO)
    try:
        return int(args._run(args) or 0)
    except (FcflowError, FileNotFoundError, PermissionError) as exc:
        if args.debug:
            raise
        print(f"fcflow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fcflow: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
