"""Seeds declared in a study recipe: left-only, right-only and another area set (real atlas)."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np

from fcflow.cli import main
from fcflow.resources import recipe_file

_SEEDS = """
[seeds.pgACC]
areas = ["Area p24ab (pACC)", "Area p24c (pACC)", "Area p32 (pACC)"]

[seeds.pgACCleft]
areas = ["Area p24ab (pACC)", "Area p24c (pACC)", "Area p32 (pACC)"]
hemispheres = ["left"]

[seeds.pgACCright]
areas = ["Area p24ab (pACC)", "Area p24c (pACC)", "Area p32 (pACC)"]
hemispheres = ["right"]

[seeds.sgACC]
areas = ["Area s24 (sACC)", "Area s32 (sACC)", "Area 25 (sACC)"]
"""


def _recipe_with_seeds(tmp_path):
    text = recipe_file("weigner2025_pgacc").read_text()
    text = re.sub(r"\[seeds\.pgACC\].*?(?=\n\[denoising\])", _SEEDS.strip() + "\n", text, flags=re.S)
    path = tmp_path / "four_seeds.toml"
    path.write_text(text)
    return path


def test_recipe_seeds_left_right_and_subgenual(tmp_path, julich_dir):
    out = tmp_path / "seeds"
    status = main(["seeds", "-o", str(out), "--resolution", "2", "--recipe", str(_recipe_with_seeds(tmp_path)),
                   "--julich-dir", str(julich_dir), "--no-download"])
    assert status == 0
    masks = {}
    for name in ("pgACC", "pgACCleft", "pgACCright", "sgACC"):
        img = nib.load(out / f"space-MNI152NLin2009cAsym_res-2_seed-{name}_mask.nii.gz")
        masks[name] = np.asanyarray(img.dataobj).astype(bool)
        assert masks[name].sum() > 100, name
    affine = img.affine
    # Hemispheres split at the midline and add up to the bilateral seed.
    assert not (masks["pgACCleft"] & masks["pgACCright"]).any()
    np.testing.assert_array_equal(masks["pgACCleft"] | masks["pgACCright"], masks["pgACC"])
    x_left = (affine @ np.r_[np.argwhere(masks["pgACCleft"]).mean(0), 1])[0]
    x_right = (affine @ np.r_[np.argwhere(masks["pgACCright"]).mean(0), 1])[0]
    assert x_left < -2 and x_right > 2
    # The subgenual ACC lies below and behind the pregenual ACC and does not overlap it.
    assert not (masks["sgACC"] & masks["pgACC"]).any()
    z_sg = (affine @ np.r_[np.argwhere(masks["sgACC"]).mean(0), 1])[2]
    z_pg = (affine @ np.r_[np.argwhere(masks["pgACC"]).mean(0), 1])[2]
    assert z_sg < z_pg - 10


# ----------------------------------------------------------------------------------------------
# Each seed's own settings cross the nipype boundary (issue 20)
# ----------------------------------------------------------------------------------------------
def _run_maps_node(tmp_path, run, seeds, seed_files, name):
    """The participant workflow's ComputeRunMaps adapter on one run, with the recipe's seeds as the
    workflow passes them (fcflow.config.to_plain)."""
    import json
    from pathlib import Path

    from fcflow.config import load_recipe, to_plain
    from fcflow.firstlevel import select_run_confounds
    from fcflow.interfaces.firstlevel import ComputeRunMaps
    from fcflow.io import write_json, write_tsv

    recipe = load_recipe("weigner2025_pgacc")
    work = tmp_path / name
    confounds, censoring = select_run_confounds(run.bold_file, recipe.denoising, run_name=run.name)
    node = ComputeRunMaps(
        bold_file=str(run.bold_file), mask_file=str(run.mask_file), seed_files=[str(f) for f in seed_files],
        seeds=[to_plain(s) for s in seeds], confounds_file=str(write_tsv(work / "confounds.tsv", confounds)),
        censoring_file=str(write_json(work / "censoring.json", censoring)), t_r=run.t_r,
        task=to_plain(recipe.task(run.task)), denoising=to_plain(recipe.denoising), run_name=run.name,
    )
    work.mkdir(parents=True, exist_ok=True)
    import os

    before = os.getcwd()
    os.chdir(work)
    try:
        outputs = node.run().outputs
    finally:
        os.chdir(before)
    series = {}
    files = outputs.timeseries_files or []
    for path in [files] if isinstance(files, str) else files:  # nipype unwraps a one-item list
        import pandas as pd

        table = pd.read_csv(path, sep="\t")
        series[table.columns[1]] = table.iloc[:, 1].to_numpy()
    return json.loads(Path(outputs.qc_file).read_text()), series


def test_two_seeds_with_different_signal_and_min_coverage_each_get_their_own(tmp_path, one_subject_infusion):
    """Every seed used to get the first seed's signal and min_coverage (the recipe became dicts at the
    nipype boundary and the science read seeds[0]); each seed's series now equals the one it gets alone."""
    import dataclasses

    from fcflow.config import load_recipe

    recipe = load_recipe("weigner2025_pgacc")
    (run,) = [r for r in one_subject_infusion["runs"] if r.task == "rest"]
    seed_file = one_subject_infusion["seed_file"]
    mean_seed = dataclasses.replace(recipe.seeds[0], name="meanSeed", signal="mean", min_coverage=0.0)
    eig_seed = dataclasses.replace(recipe.seeds[0], name="eigSeed", signal="eigenvariate", min_coverage=0.0)
    _, both = _run_maps_node(tmp_path, run, [mean_seed, eig_seed], [seed_file, seed_file], "both")
    _, mean_alone = _run_maps_node(tmp_path, run, [mean_seed], [seed_file], "mean")
    _, eig_alone = _run_maps_node(tmp_path, run, [eig_seed], [seed_file], "eig")
    np.testing.assert_allclose(both["meanSeed"], mean_alone["meanSeed"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(both["eigSeed"], eig_alone["eigSeed"], rtol=1e-6, atol=1e-9)
    # the two summaries of the same voxels differ (or the test could not tell them apart)
    assert not np.allclose(np.abs(both["meanSeed"]), np.abs(both["eigSeed"]) * np.std(both["meanSeed"])
                           / np.std(both["eigSeed"]), rtol=1e-3)

    # min_coverage: a seed reaching one voxel outside the brain mask has coverage < 1; a second seed
    # that demands full coverage excludes the run even when the first seed accepts any coverage
    mask = np.asarray(nib.load(run.mask_file).dataobj) > 0
    seed_img = nib.load(seed_file)
    outside = np.argwhere(~mask)[0]
    leaky = np.asarray(seed_img.dataobj).astype(np.uint8)
    leaky[tuple(outside)] = 1
    leaky_file = tmp_path / "leaky_seed.nii.gz"
    nib.Nifti1Image(leaky, seed_img.affine).to_filename(leaky_file)
    strict = dataclasses.replace(mean_seed, name="strictSeed", min_coverage=1.0)
    qc, _ = _run_maps_node(tmp_path, run, [mean_seed, strict], [seed_file, leaky_file], "coverage")
    assert qc["excluded"] and "strictSeed" in qc["exclusion_reason"], qc["exclusion_reason"]
    lenient = dataclasses.replace(strict, min_coverage=0.5)
    qc, _ = _run_maps_node(tmp_path, run, [mean_seed, lenient], [seed_file, leaky_file], "lenient")
    assert not qc["excluded"] and qc["seeds"]["strictSeed"]["coverage"] < 1.0
