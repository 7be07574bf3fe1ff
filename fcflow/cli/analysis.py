"""Seed-to-voxel connectivity of a BIDS study (BIDS-App form).

  fcflow BIDS_DIR OUTPUT_DIR participant --derivatives FMRIPREP_DIR --recipe RECIPE
  fcflow BIDS_DIR OUTPUT_DIR group --recipe RECIPE

The participant level turns every run of the selected participants into seed-to-voxel maps;
the group level turns those maps into group x session contrasts, cluster tables and figures.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from fcflow.config import load_recipe
from fcflow.errors import FcflowError, InputDataError

_LABEL = re.compile(r"^[A-Za-z0-9]+$")


def _label(kind: str, prefix: str):
    def parse(text: str) -> str:
        label = text[len(prefix):] if text.startswith(prefix) else text
        if not _LABEL.match(label):
            raise argparse.ArgumentTypeError(
                f"{kind} labels must be letters and digits (BIDS), with or without '{prefix}'. Got {text!r}."
            )
        return label

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bids_dir", type=Path, help="the raw BIDS dataset (participants.tsv, sidecars, events)")
    parser.add_argument("output_dir", type=Path, help="where fcflow writes its derivatives")
    parser.add_argument("analysis_level", choices=("participant", "group"), help="which level to run")
    parser.add_argument("--recipe", default="weigner2025_pgacc",
                        help="study recipe: a TOML file or the name of a shipped one (default: %(default)s)")
    parser.add_argument("--derivatives", type=Path, default=None,
                        help="fMRIPrep derivatives (default: BIDS_DIR/derivatives/fmriprep)")
    parser.add_argument("--participant-label", "--participant_label", nargs="+", default=None,
                        type=_label("participant", "sub-"), metavar="LABEL")
    parser.add_argument("--session-label", nargs="+", default=None, type=_label("session", "ses-"), metavar="LABEL")
    parser.add_argument("--task", nargs="+", default=None, type=_label("task", "task-"), metavar="LABEL")
    parser.add_argument("--julich-dir", type=Path, default=None,
                        help="a local copy of the Julich-Brain v3.1 files (else FCFLOW_JULICH_DIR, the cache, a download)")
    parser.add_argument("--work-dir", type=Path, default=None, help="nipype working directory (resumable)")
    parser.add_argument("--nprocs", type=int, default=None, help="processes for MultiProc (default: all cores)")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    bids_dir = args.bids_dir
    if not (bids_dir / "dataset_description.json").is_file():
        raise InputDataError(
            f"BIDS_DIR {str(bids_dir)!r} must be a BIDS dataset with a dataset_description.json; "
            "check the first argument."
        )
    raise FcflowError(
        f"the {args.analysis_level} level is not implemented yet in this version of fcflow "
        f"(recipe {recipe.name!r} is valid). Use 'fcflow simulate' and 'fcflow seeds' meanwhile."
    )
