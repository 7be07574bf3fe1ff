"""Simulate the embedded sample study and analyse it end to end.

The sample study's definition ships in sample_data/ (sample_study.toml): three groups (placebo,
ketamine, lamotrigine_ketamine) scanned at baseline, during the infusion and 24 h later, at rest and
during an n-back task, with the effects of Weigner et al. 2025 planted in the ketamine group during
the infusion. The demo writes, under OUTPUT_DIR:

  bids/                              the simulated BIDS dataset, with
  bids/derivatives/fmriprep/         fMRIPrep-style derivatives and
  bids/derivatives/ground_truth/     the planted truth, then
  fcflow/                            fcflow's participant-level maps and QC (and the group level),
  fcflow/group.html, fcflow/sub-*.html   the reports to read first

The seed is the Julich-Brain pgACC when the atlas can be had (--julich-dir, FCFLOW_JULICH_DIR,
fcflow's cache or a download); offline, the demo says so and uses the simulator's stand-in pgACC
mask instead. Running the demo again resumes where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from fcflow.errors import AtlasError
from fcflow.io import write_text
from fcflow.resources import data_dir, recipe_file
from fcflow.workflows.options import positive_type

LOGGER = logging.getLogger("fcflow.demo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", nargs="?", type=Path, default=Path("fcflow_demo"),
                        help="where to write the sample study and its results (default: %(default)s)")
    parser.add_argument("--julich-dir", type=Path, default=None, metavar="DIR",
                        help="a local copy of the Julich-Brain v3.1 files, for the real pgACC seed (default: "
                             "FCFLOW_JULICH_DIR, fcflow's cache or a download; without the atlas, the "
                             "simulator's stand-in pgACC mask)")
    parser.add_argument("--nprocs", type=positive_type(int, "--nprocs"), default=None, metavar="N",
                        help="processes the participant level runs at once (MultiProc), e.g. --nprocs 2 "
                             "(default: SLURM_CPUS_PER_TASK inside a SLURM job, else the CPUs this process "
                             "may use)")


def _atlas_or_none(julich_dir: Path | None) -> Path | None:
    from fcflow.atlas.fetch import resolve_atlas_dir

    try:
        return resolve_atlas_dir(julich_dir)
    except AtlasError as exc:
        LOGGER.warning("The Julich-Brain atlas is not available (%s). The demo uses the simulator's "
                       "stand-in pgACC mask as the seed; pass --julich-dir for the real one.", exc)
        return None


def _stand_in_recipe(output_dir: Path, bids_dir: Path) -> Path:
    """The shipped recipe with its seed replaced by the simulator's stand-in pgACC mask."""
    (mask,) = sorted((bids_dir / "derivatives" / "ground_truth").glob("*_desc-pgACC_mask.nii.gz"))
    text = recipe_file("weigner2025_pgacc").read_text()
    block = re.search(r"\[seeds\.pgACC\].*?(?=\n\[denoising\])", text, flags=re.S)
    assert block is not None, "the shipped recipe has a [seeds.pgACC] table"
    seed = (f'[seeds.pgACC]\n# The simulator\'s stand-in pgACC (no Julich-Brain atlas was available).\n'
            f'mask = "{mask}"\nmin_coverage = 0.8\nsignal = "mean"\n')
    return write_text(output_dir / "demo_recipe_standin_seed.toml", text[: block.start()] + seed + text[block.end():])


def run(args: argparse.Namespace) -> int:
    from fcflow.cli import main as fcflow_main
    from fcflow.simulate import load_simulation_definition, simulate_study

    output_dir = args.output_dir.resolve()
    definition = load_simulation_definition(data_dir("sample_data") / "sample_study.toml")
    atlas_dir = _atlas_or_none(args.julich_dir)
    bids_dir = output_dir / "bids"
    LOGGER.info("1/3 Simulating the sample study into %s", bids_dir)
    result = simulate_study(bids_dir, **{**definition.as_kwargs(), "julich_dir": atlas_dir})
    recipe = str(recipe_file("weigner2025_pgacc")) if atlas_dir else str(_stand_in_recipe(output_dir, bids_dir))
    fcflow_dir = output_dir / "fcflow"
    common = ["--recipe", recipe, "--work-dir", str(output_dir / "work")]
    if atlas_dir:
        common += ["--julich-dir", str(atlas_dir)]
    LOGGER.info("2/3 Participant level: %d runs", result.n_runs)
    participant = [str(bids_dir), str(fcflow_dir), "participant", *common]
    if args.nprocs:
        participant += ["--nprocs", str(args.nprocs)]
    status = fcflow_main(participant)
    if status:
        return status
    LOGGER.info("3/3 Group level (200 permutations for the demo; publication needs the recipe's 5000)")
    group = [str(bids_dir), str(fcflow_dir), "group", *common, "--n-permutations", "200"]
    if args.nprocs:
        group += ["--nprocs", str(args.nprocs)]
    status = fcflow_main(group)
    if status:
        return status
    # the group step has just printed the group report and results.tsv: only what it did not say
    print(f"Sample study:       {bids_dir}")
    print(f"  ground truth:     {bids_dir / 'derivatives' / 'ground_truth'}")
    print(f"fcflow derivatives: {fcflow_dir}")
    reports = sorted(fcflow_dir.glob("sub-*.html"))
    if reports:
        print(f"Participant report: {reports[0]} (and {len(reports) - 1} more beside it)")
    return 0
