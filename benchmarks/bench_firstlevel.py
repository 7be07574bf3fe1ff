"""First level on realistic runs: fcflow against the I/O floor and nilearn's documented recipe.

Simulates a small study with ``fcflow simulate`` (2 mm MNI152NLin2009cAsym grid 97 x 115 x 97,
300 volumes, TR 2 s, float32 .nii.gz with fMRIPrep-style masks and confounds; shared with
bench_study.py) and takes sub-01's baseline rest and n-back runs. Each step is a fresh process
(start-up and imports included), run in alternation (A B C ... A B C ...):

* floor      - nibabel reads the run's .nii.gz fully into float32 memory (rest and n-back);
* reference  - nilearn's documented seed-to-voxel recipe on the rest run: NiftiLabelsMasker for
               the seed, NiftiMasker for the brain (same confounds, detrend, band-pass,
               standardize), np.dot, arctanh, inverse_transform, save;
* fcflow     - ``fcflow.firstlevel.compute_run_maps`` as a function call (confounds selected,
               every map written as .nii.gz): rest (correlation) and n-back (gPPI with 0-back,
               2-back and 2-back - 0-back, and background FC);
* workflow   - the same run through fcflow's participant level CLI, one run, Linear plugin,
               ``--no-reports`` (the recipe's censoring applies there).

It prints median wall time, peak RSS, and the ratios to the floor and reference / step, then
checks that fcflow's rest z map equals the recipe's (which divides np.dot by n instead of n - 1).

    python benchmarks/bench_firstlevel.py                  # 3 repeats, the recipe once (~15 min)
    python benchmarks/bench_firstlevel.py --full           # the recipe 3 times too
    python benchmarks/bench_firstlevel.py --skip-reference # without the 3-5 min recipe
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import Row, ensure_study, load_average, median, python_child, report_part, run_child  # noqa: E402

FLOOR = """
import sys, nibabel as nib, numpy as np
data = np.asarray(nib.load(sys.argv[1]).get_fdata(dtype=np.float32))
print(data.shape)
"""

REFERENCE = """
import sys, numpy as np
from nilearn.interfaces.fmriprep import load_confounds
from nilearn.maskers import NiftiLabelsMasker, NiftiMasker
bold, mask, seed, out = sys.argv[1:5]
confounds, sample_mask = load_confounds(bold, strategy=("motion", "high_pass", "compcor"), motion="full",
                                        compcor="anat_combined", n_compcor=5)
opts = dict(detrend=True, standardize="zscore_sample", standardize_confounds=True, low_pass=0.08,
            high_pass=0.01, t_r=2.0)
seed_ts = NiftiLabelsMasker(labels_img=seed, **opts).fit_transform(bold, confounds=confounds,
                                                                    sample_mask=sample_mask)
brain_masker = NiftiMasker(mask_img=mask, **opts)
brain = brain_masker.fit_transform(bold, confounds=confounds, sample_mask=sample_mask)
r = np.dot(brain.T, seed_ts) / seed_ts.shape[0]
brain_masker.inverse_transform(np.arctanh(r.T)).to_filename(out)
"""

FCFLOW = """
import sys
from pathlib import Path
import nibabel as nib, numpy as np, pandas as pd
from fcflow.config import DenoisingConfig, load_recipe
from fcflow.denoise import load_run_confounds
from fcflow.firstlevel import compute_run_maps
from fcflow.io import save_img
from fcflow.niftiio import unmask
bold, mask, seed, out, task, events = sys.argv[1:7]
sel = load_run_confounds(bold, "24P+aCompCor", censor=False, n_compcor=5)
recipe = load_recipe("weigner2025_pgacc")
if task == "rest":
    kwargs = dict(task=recipe.task("rest"))
else:
    kwargs = dict(task=recipe.task("nback"), events=pd.read_csv(events, sep="\\t"), events_file=events)
maps = compute_run_maps(bold, mask, {"pgACC": nib.load(seed)}, t_r=2.0, confounds=sel.confounds,
                        sample_mask=sel.sample_mask, denoising=DenoisingConfig(min_dof=0.0), run_name="bench",
                        **kwargs)
mask_img = nib.load(mask)
brain = np.asarray(mask_img.dataobj) > 0
Path(out).mkdir(parents=True, exist_ok=True)
for spec, values in maps.maps.items():
    save_img(unmask(values, brain, mask_img.affine), Path(out) / f"desc-{spec.desc}_stat-{spec.stat}.nii.gz")
print(len(maps.maps))
"""

WORKFLOW = """
import sys
from fcflow.cli import main
bids, out, recipe, work, task = sys.argv[1:6]
sys.exit(main([bids, out, "participant", "--recipe", recipe, "--work-dir", work, "--participant-label", "01",
               "--session-label", "baseline", "--task", task, "--plugin", "Linear", "--no-reports"]))
"""


def run_files(study: dict[str, Path], task: str) -> dict[str, Path]:
    func = study["fmriprep"] / "sub-01" / "ses-baseline" / "func"
    stem = f"sub-01_ses-baseline_task-{task}_space-MNI152NLin2009cAsym_res-2"
    raw = study["bids"] / "sub-01" / "ses-baseline" / "func"
    (seed,) = sorted((study["bids"] / "derivatives" / "ground_truth").glob("*_desc-pgACC_mask.nii.gz"))
    return {"bold": func / f"{stem}_desc-preproc_bold.nii.gz", "mask": func / f"{stem}_desc-brain_mask.nii.gz",
            "seed": seed, "events": raw / f"sub-01_ses-baseline_task-{task}_events.tsv"}


def compare_maps(fcflow_z: Path, reference_z: Path, mask: Path, bold: Path) -> str:
    import nibabel as nib
    import numpy as np
    from nilearn.interfaces.fmriprep import load_confounds

    brain = np.asarray(nib.load(mask).dataobj) > 0
    a = nib.load(fcflow_z).get_fdata()[brain]
    b = nib.load(reference_z).get_fdata().reshape(brain.shape)[brain]
    _, kept = load_confounds(str(bold), strategy=("motion",))
    n = nib.load(bold).shape[3] if kept is None else len(kept)
    b_corrected = np.arctanh(np.tanh(b) * n / (n - 1))  # the recipe's np.dot / n shrinks r by (n-1)/n
    return (f"maps: correlation {np.corrcoef(a, b)[0, 1]:.9f}, max |dz| {np.max(np.abs(a - b)):.4f}; "
            f"after the recipe's n/(n-1): max |dz| {np.max(np.abs(a - b_corrected)):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-repeats", type=int, default=None, help="default 1 (3 with --full)")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--skip-reference", action="store_true", help="skip nilearn's recipe (3-5 min a run)")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "fcflow_bench_study")
    parser.add_argument("--json", type=Path, default=None, help="write the rows for run_all.py")
    args = parser.parse_args()
    study = ensure_study(args.data_dir)
    rest, nback = run_files(study, "rest"), run_files(study, "nback")
    out = Path(tempfile.mkdtemp(prefix="fcflow_bench_firstlevel_"))
    steps = {
        "floor: nibabel full read (rest)": python_child(FLOOR, rest["bold"]),
        "floor: nibabel full read (n-back)": python_child(FLOOR, nback["bold"]),
        "fcflow rest, function call": python_child(FCFLOW, rest["bold"], rest["mask"], rest["seed"],
                                                   out / "fn_rest", "rest", rest["events"]),
        "fcflow n-back gPPI+background, function call": python_child(
            FCFLOW, nback["bold"], nback["mask"], nback["seed"], out / "fn_nback", "nback", nback["events"]),
        "fcflow rest, one-run workflow": python_child(
            WORKFLOW, study["bids"], out / "wf_rest", study["recipe"], out / "wf_rest_work", "rest"),
        "fcflow n-back, one-run workflow": python_child(
            WORKFLOW, study["bids"], out / "wf_nback", study["recipe"], out / "wf_nback_work", "nback"),
    }
    reference_name = "nilearn reference recipe (rest)"
    reference_repeats = 0 if args.skip_reference else (args.reference_repeats or (3 if args.full else 1))
    if reference_repeats:
        steps[reference_name] = python_child(REFERENCE, rest["bold"], rest["mask"], rest["seed"],
                                             out / "reference_z.nii.gz")
    load_before = load_average()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for repeat in range(max(args.repeats, reference_repeats)):
        for name, argv in steps.items():
            if repeat >= (reference_repeats if name == reference_name else args.repeats):
                continue
            for stale in ("wf_rest", "wf_rest_work", "wf_nback", "wf_nback_work"):
                shutil.rmtree(out / stale, ignore_errors=True)  # the workflow must not resume
            wall, peak, _ = run_child(argv)
            samples[name].append((wall, peak))
            print(f"  repeat {repeat + 1}: {name}: {wall:.2f} s, {peak:.0f} MiB (load {load_average()})",
                  file=sys.stderr, flush=True)
    rows = []
    for name, values in samples.items():
        floor = "floor: nibabel full read (n-back)" if "n-back" in name else "floor: nibabel full read (rest)"
        reference = reference_name if reference_repeats and "rest" in name else None
        rows.append(Row("first level", name, median([w for w, _ in values]), max(p for _, p in values), len(values),
                        floor=floor, reference=reference))
    size = rest["bold"].stat().st_size / 2**20
    notes = []
    if reference_repeats:
        notes.append(compare_maps(out / "fn_rest" / "desc-correlation_stat-z.nii.gz", out / "reference_z.nii.gz",
                                  rest["mask"], rest["bold"]))
    report_part(rows, f"First level: one run, 300 volumes, 2 mm, {size:.0f} MiB .nii.gz; medians of "
                      f"{args.repeats} (recipe: {reference_repeats})", notes, load_before, args.json)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
