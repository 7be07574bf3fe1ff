"""Write a synthetic drug study: raw BIDS metadata, fMRIPrep-style derivatives in
MNI152NLin2009cAsym and the planted ground truth (derivatives/ground_truth/).

Three groups (placebo, ketamine, lamotrigine_ketamine) x sessions (baseline, infusion, 24h) x
tasks (rest, nback). Preset weigner2025 plants, in the ketamine group at infusion, higher
pgACC-left insula coupling at rest and higher pgACC-dmPFC coupling during 2-back blocks; preset
null plants nothing. The same --seed gives the same bytes.

The seed is a stand-in pgACC sphere unless --julich-dir (or the environment variable
FCFLOW_JULICH_DIR) points to Julich-Brain 3.1 maps.

motion levels (--motion-level; % of volumes fcflow censors at its defaults, FD > 0.5 mm or
std DVARS > 1.5 plus the segment rule of 5, mean over runs; 4 mm, 3 per group, 2 seeds):
  level             0.5   1     1.5   2     2.5   3
  TR 2 s, 100 vol   4 %   8 %   13 %  24 %  42 %  59 %
  TR 1.5 s, 240/200 3 %   7 %   12 %  22 %  37 %  53 %
  ~5 %: 0.5-0.75, ~20 %: 2, ~50 %: 2.75-3. FD and std DVARS both censor (at 3: 31 % and
  17 % of volumes flagged); runs spread widely at high levels (subjects move differently).

examples:
  fcflow simulate /tmp/study                       # 3 per group, 4 mm, 300 volumes
  fcflow simulate /tmp/study --resolution 2 --n-volumes 300 --n-per-group 25
  # a high-motion study (~40 % censored) with 10 % of sessions missing:
  fcflow simulate /tmp/study --tr 1.5 --n-volumes-rest 240 --n-volumes-nback 200 \\
      --motion-level 2.5 --missing-sessions 0.1
  fcflow simulate /tmp/study --from-definition sample_data/sample_study.toml
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

_ENV_JULICH = "FCFLOW_JULICH_DIR"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``fcflow simulate``'s arguments to ``parser``."""
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR",
                        help="BIDS root to write (empty, or an earlier identical simulation)")
    parser.add_argument("--n-per-group", type=int, default=None,
                        help="subjects per group (default: 3)")
    parser.add_argument("--resolution", type=float, default=None, metavar="MM",
                        help="voxel size in whole mm: 2 for realism, 4 for speed (default: 4)")
    parser.add_argument("--n-volumes", type=int, default=None,
                        help="volumes per run (default: 300, 10 min at TR 2 s; 100 leave too few dof for the "
                             "shipped recipe)")
    parser.add_argument("--n-volumes-rest", type=int, default=None, metavar="N",
                        help="volumes per rest run (default: --n-volumes)")
    parser.add_argument("--n-volumes-nback", type=int, default=None, metavar="N",
                        help="volumes per n-back run (default: --n-volumes); blocks that would "
                             "not end within the run are left out")
    parser.add_argument("--tr", type=float, default=None, metavar="SECONDS",
                        help="repetition time (default: 2.0)")
    parser.add_argument("--motion-level", type=float, default=None, metavar="X",
                        help="study-wide multiplier of head-motion amplitudes and spike rate, "
                             "on top of the drug groups' extra motion at infusion (default: "
                             "1.0); see 'motion levels' below for the volumes each censors")
    parser.add_argument("--missing-sessions", type=float, default=None, metavar="FRACTION",
                        help="fraction of (subject, session) pairs left out at random, never "
                             "a baseline (default: 0); listed in the ground truth")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed; the same seed gives identical files (default: 0)")
    parser.add_argument("--preset", choices=("weigner2025", "null"), default=None,
                        help="planted effects (default: weigner2025)")
    parser.add_argument("--julich-dir", type=Path, default=None, metavar="DIR",
                        help=f"Julich-Brain 3.1 folder for the real pgACC seed (default: "
                             f"${_ENV_JULICH} if set, else a stand-in sphere)")
    parser.add_argument("--from-definition", type=Path, default=None, metavar="FILE",
                        help="TOML study definition (like sample_data/sample_study.toml); "
                             "options given on the command line override it")


def run(args: argparse.Namespace) -> int:
    """Simulate the study that ``args`` describe; return 0."""
    from fcflow.simulate import (
        NoiseModel,
        SimulationDefinition,
        load_simulation_definition,
        simulate_study,
    )

    definition = (load_simulation_definition(args.from_definition)
                  if args.from_definition is not None else SimulationDefinition())
    overrides = {
        "n_per_group": args.n_per_group, "resolution_mm": args.resolution,
        "n_volumes": args.n_volumes, "n_volumes_rest": args.n_volumes_rest,
        "n_volumes_nback": args.n_volumes_nback, "t_r": args.tr, "seed": args.seed,
        "preset": args.preset, "missing_sessions": args.missing_sessions,
        "julich_dir": args.julich_dir,
    }
    definition = dataclasses.replace(
        definition, **{k: v for k, v in overrides.items() if v is not None})
    if args.motion_level is not None:
        noise = definition.noise if definition.noise is not None else NoiseModel()
        definition = dataclasses.replace(
            definition, noise=dataclasses.replace(noise, motion_level=args.motion_level))
    if definition.julich_dir is None and os.environ.get(_ENV_JULICH):
        definition = dataclasses.replace(definition, julich_dir=Path(os.environ[_ENV_JULICH]))
    if args.preset is not None and args.from_definition is not None:
        # a preset named on the command line replaces the definition's effects
        definition = dataclasses.replace(definition, effects=None)
    result = simulate_study(args.out_dir, **definition.as_kwargs())
    print(f"Wrote {len(result.runs)} runs of {len(result.participants)} subjects to "
          f"{result.bids_dir} (seed: {result.seed_source} pgACC); ground truth in "
          f"{result.ground_truth_dir}")
    return 0
