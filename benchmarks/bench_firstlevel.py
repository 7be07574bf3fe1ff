"""First level on one realistic run: fcflow against the I/O floor and nilearn's documented recipe.

Generates one resting-state run with fcflow's simulator on the 2 mm MNI152NLin2009cAsym grid
(97 x 115 x 97, 300 volumes, TR 2 s, float32 .nii.gz) plus the fMRIPrep-style mask and confounds,
then times, each in a fresh process (start-up and imports included), alternating A B A B ...:

* floor      - nibabel reads the run's .nii.gz fully into float32 memory;
* reference  - nilearn's documented seed-to-voxel recipe: NiftiLabelsMasker for the seed,
               NiftiMasker for the brain (same confounds, detrend, band-pass, standardize),
               np.dot, arctanh, inverse_transform, save;
* fcflow     - fcflow.firstlevel.compute_run_maps as a function call (seed mask built outside);
* workflow   - the same run through fcflow's one-run nipype workflow (Linear plugin).

It prints median wall time, peak RSS, and the ratios to the floor and to the reference. The
machine is shared and noisy: the ratios are the figures to compare.

    python benchmarks/bench_firstlevel.py [--repeats 3] [--skip-reference] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def make_run(data_dir: Path, n_volumes: int, resolution_mm: float, julich_dir: str | None) -> dict[str, Path]:
    """Write one simulated rest run (BOLD, mask, confounds, seed mask) into ``data_dir``."""
    import nibabel as nib
    import numpy as np

    from fcflow.io import save_img, write_tsv
    from fcflow.simulate import NoiseModel, build_anatomy, build_regions, compute_confounds, preset_effects, simulate_run
    from fcflow.simulate.nifti import write_bold

    bold = data_dir / "sub-01_ses-baseline_task-rest_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.nii.gz"
    mask = data_dir / "sub-01_ses-baseline_task-rest_space-MNI152NLin2009cAsym_res-2_desc-brain_mask.nii.gz"
    confounds = data_dir / "sub-01_ses-baseline_task-rest_desc-confounds_timeseries.tsv"
    seed = data_dir / "seed-pgACC_mask.nii.gz"
    if not bold.is_file():
        data_dir.mkdir(parents=True, exist_ok=True)
        anatomy = build_anatomy(resolution_mm)
        effects, noise = preset_effects("weigner2025"), NoiseModel()
        regions = build_regions(anatomy, effects, None)
        run = simulate_run(anatomy, regions, subject="01", session="baseline", task="rest", group="placebo",
                           n_volumes=n_volumes, t_r=2.0, seed=1, effects=effects, noise=noise, nback=None)
        write_bold(bold, run.data, anatomy.voxels, anatomy.shape, anatomy.affine, 2.0)
        save_img(anatomy.brain_mask_img(), mask)
        table, meta = compute_confounds(run.data, anatomy, run.motion, 2.0, run.n_non_steady)
        write_tsv(confounds, table)
        from fcflow.io import write_json

        write_json(confounds.with_suffix(".json"), meta)
        if julich_dir:
            from fcflow.atlas import build_seed_mask

            seed_img = build_seed_mask(julich_dir, ["Area p24ab (pACC)", "Area p24c (pACC)", "Area p32 (pACC)"],
                                       ("left", "right"), mask)
        else:
            volume = np.zeros(anatomy.shape, dtype=np.uint8)  # the stand-in pgACC, over simulated voxels
            volume[tuple(anatomy.voxels[regions.seed].T)] = 1
            seed_img = nib.Nifti1Image(volume, anatomy.affine)
        save_img(seed_img, seed)
    return {"bold": bold, "mask": mask, "confounds": confounds, "seed": seed}


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
import sys, nibabel as nib, numpy as np
from fcflow.denoise import load_run_confounds
from fcflow.firstlevel import compute_run_maps
from fcflow.io import save_img
from fcflow.niftiio import unmask
bold, mask, seed, out = sys.argv[1:5]
sel = load_run_confounds(bold, "24P+aCompCor", censor=False, n_compcor=5)
maps = compute_run_maps(bold, mask, {"pgACC": nib.load(seed)}, t_r=2.0, measures=["correlation"],
                        confounds=sel.confounds, sample_mask=sel.sample_mask, high_pass=0.01, low_pass=0.08,
                        run_name="bench")
brain = np.asarray(nib.load(mask).dataobj) > 0
(z,) = [v for k, v in maps.maps.items() if k.stat == "z"]
save_img(unmask(z, brain, nib.load(mask).affine), out)
"""

WORKFLOW = """
import sys
from pathlib import Path
import nibabel as nib
from fcflow.bids import RunInputs
from fcflow.config import load_recipe
from fcflow.workflows.participant import init_run_wf
from fcflow.workflows.runner import run_workflow
bold, mask, seed, out, confounds = sys.argv[1:6]
recipe = load_recipe("weigner2025_pgacc")
seed_cfg = recipe.seeds[0].__class__(name="pgACC", atlas="mask file", areas=(), hemispheres=("left", "right"),
                                     mask=seed, min_coverage=0.0)
recipe = recipe.replace(seeds=(seed_cfg,), denoising=recipe.denoising.__class__(fd_threshold_mm=None,
                                                                                std_dvars_threshold=None))
run = RunInputs("01", "baseline", "rest", None, "placebo", Path(bold), Path(mask), Path(confounds),
                Path(confounds).with_suffix(".json"), 2.0, None,
                {"sub": "01", "ses": "baseline", "task": "rest", "space": "MNI152NLin2009cAsym", "res": "2"})
wf = init_run_wf(run=run, recipe=recipe, atlas_dir=None, output_dir=Path(out), command=["bench"], name="bench_wf")
run_workflow(wf, plugin="Linear", plugin_args={}, work_dir=Path(out + "_work"))
"""


def measure(code: str, args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``python -c code args`` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"benchmark step failed: {proc.stderr.read()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-volumes", type=int, default=300)
    parser.add_argument("--resolution", type=float, default=2.0)
    parser.add_argument("--skip-reference", action="store_true", help="skip nilearn's recipe (about 3 min a run)")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "fcflow_bench_firstlevel")
    parser.add_argument("--julich-dir", default=os.environ.get("FCFLOW_JULICH_DIR"),
                        help="real pgACC seed (default: the simulator's stand-in)")
    args = parser.parse_args()
    files = make_run(args.data_dir, args.n_volumes, args.resolution, args.julich_dir)
    out = args.data_dir / "out"
    out.mkdir(exist_ok=True)
    common = [str(files["bold"]), str(files["mask"]), str(files["seed"])]
    steps = {
        "floor (nibabel full read)": (FLOOR, [str(files["bold"])]),
        "fcflow compute_run_maps": (FCFLOW, [*common, str(out / "fcflow_z.nii.gz")]),
        "fcflow one-run workflow": (WORKFLOW, [*common, str(out / "wf"), str(files["confounds"])]),
    }
    if not args.skip_reference:
        steps["nilearn reference recipe"] = (REFERENCE, [*common, str(out / "reference_z.nii.gz")])
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for repeat in range(args.repeats):
        for name, (code, step_args) in steps.items():
            if name == "fcflow one-run workflow":
                subprocess.run(["rm", "-rf", str(out / "wf"), str(out / "wf_work")], check=True)
            results[name].append(measure(code, step_args))
            print(f"  repeat {repeat + 1}: {name}: {results[name][-1][0]:.2f} s", file=sys.stderr)
    floor = statistics.median(w for w, _ in results["floor (nibabel full read)"])
    reference = statistics.median(w for w, _ in results["nilearn reference recipe"]) if not args.skip_reference else None
    size = files["bold"].stat().st_size / 1e6
    print(f"\nOne run: {args.n_volumes} volumes, {args.resolution:g} mm, {size:.0f} MB .nii.gz; "
          f"median of {args.repeats}")
    print(f"{'step':<28} {'median s':>9} {'peak MiB':>9} {'x floor':>8} {'reference /':>12}")
    for name, values in results.items():
        wall = statistics.median(w for w, _ in values)
        peak = max(p for _, p in values)
        speedup = f"{reference / wall:11.1f}x" if reference else "           -"
        print(f"{name:<28} {wall:9.2f} {peak:9.0f} {wall / floor:8.2f} {speedup}")
    if not args.skip_reference:
        import nibabel as nib
        import numpy as np

        brain = np.asarray(nib.load(files["mask"]).dataobj) > 0
        a = nib.load(out / "fcflow_z.nii.gz").get_fdata()[brain]
        b = nib.load(out / "reference_z.nii.gz").get_fdata().reshape(brain.shape)[brain]
        from nilearn.interfaces.fmriprep import load_confounds

        _, kept = load_confounds(str(files["bold"]), strategy=("motion",))
        n = args.n_volumes if kept is None else len(kept)  # the recipe's np.dot/n shrinks r by (n-1)/n
        b_corrected = np.arctanh(np.tanh(b) * n / (n - 1))
        print(f"maps: correlation {np.corrcoef(a, b)[0, 1]:.6f}, max |dz| {np.max(np.abs(a - b)):.4f} "
              f"(after the recipe's n/(n-1): {np.max(np.abs(a - b_corrected)):.2e})")


if __name__ == "__main__":
    main()
