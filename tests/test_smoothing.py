"""Spatial smoothing of the first-level maps (recipe ``[denoising] smoothing_fwhm``): nilearn's
kernel, on the real first level's maps, recorded in every map's sidecar; off leaves the maps alone.
No nipype."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.image import smooth_img
from scipy import ndimage

from fcflow.config import load_recipe, to_plain
from fcflow.niftiio import smooth_map

RECIPE = load_recipe("weigner2025_pgacc")
FWHM_MM = 6.0


# ----------------------------------------------------------------------------------------------
# The science function
# ----------------------------------------------------------------------------------------------
def _grid():
    """A 7 x 8 x 9 grid of 2 x 3 x 4 mm voxels (every axis differs), an ellipsoid mask, one nan."""
    shape = (7, 8, 9)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [-6.0, -10.0, -16.0]
    i, j, k = np.indices(shape)
    mask = ((i - 3) / 3.2) ** 2 + ((j - 3.5) / 3.6) ** 2 + ((k - 4) / 4.1) ** 2 < 1
    values = np.random.default_rng(7).normal(size=int(mask.sum())).astype(np.float32)
    values[5] = np.nan
    return values, mask, affine


def test_smooth_map_equals_nilearn_and_an_independent_gaussian_filter():
    values, mask, affine = _grid()
    smoothed = smooth_map(values, mask, affine, FWHM_MM)

    assert smoothed.dtype == np.float32 and smoothed.shape == values.shape
    volume = np.zeros(mask.shape, dtype=np.float32)
    volume[mask] = values
    expected = np.asarray(smooth_img(nib.Nifti1Image(volume, affine), FWHM_MM).dataobj)[mask]
    finite = np.isfinite(values)
    np.testing.assert_array_equal(smoothed[finite], expected[finite])
    # scipy's Gaussian with the sigma of each axis in voxels (nan counted as 0, zeros outside the mask)
    sigma = FWHM_MM / np.sqrt(8 * np.log(2)) / np.array([2.0, 3.0, 4.0])
    independent = ndimage.gaussian_filter(np.nan_to_num(volume).astype(np.float64), sigma)[mask]
    np.testing.assert_allclose(smoothed[finite], independent[finite], atol=1e-6)
    # a voxel without a value keeps none; the others are finite, and smoothing did something
    assert np.isnan(smoothed[5]) and np.isfinite(smoothed[finite]).all()
    assert smoothed[finite].std() < 0.8 * values[finite].std()


@pytest.mark.parametrize("fwhm", [0.0, -2.0, float("nan")])
def test_smooth_map_refuses_a_kernel_that_is_not_positive(fwhm):
    values, mask, affine = _grid()
    with pytest.raises(ValueError, match=r"'smoothing_fwhm' must be a positive number of mm\. Got "):
        smooth_map(values, mask, affine, fwhm)


def test_recipe_zero_switches_smoothing_off(tmp_path):
    from fcflow.resources import recipe_file

    text = recipe_file("weigner2025_pgacc").read_text()
    assert "smoothing_fwhm = 6 " in text and RECIPE.denoising.smoothing_fwhm == FWHM_MM
    path = tmp_path / "off.toml"
    path.write_text(text.replace("smoothing_fwhm = 6 ", "smoothing_fwhm = 0 "))
    assert load_recipe(path).denoising.smoothing_fwhm is None


# ----------------------------------------------------------------------------------------------
# The real first level, with and without smoothing
# ----------------------------------------------------------------------------------------------
#: The recipe's pgACC seed (mean signal, its min_coverage) as the first level reads it
SEED = dataclasses.replace(RECIPE.seeds[0], signal="mean", min_coverage=0.8)


@pytest.fixture(scope="module")
def first_level(tmp_path_factory, one_subject_infusion):
    """One subject's rest and n-back runs through ``run_maps_from_files``, smoothing off and on."""
    from fcflow.firstlevel import select_run_confounds
    from fcflow.io import write_json, write_tsv
    from fcflow.runfiles import run_maps_from_files

    root = tmp_path_factory.mktemp("smoothing")
    runs, seed_file = one_subject_infusion["runs"], one_subject_infusion["seed_file"]
    out = {}
    for run in runs:
        task = RECIPE.task(run.task)
        for label, fwhm in (("off", None), ("on", FWHM_MM)):
            denoising = dataclasses.replace(RECIPE.denoising, smoothing_fwhm=fwhm)
            work = root / "work" / label / run.name
            confounds, censoring = select_run_confounds(run.bold_file, denoising, run_name=run.name)
            table = confounds if confounds is not None else pd.DataFrame(index=range(censoring["n_timepoints"]))
            kwargs = dict(
                bold_file=str(run.bold_file), mask_file=str(run.mask_file), seed_files=[str(seed_file)],
                seeds=[SEED],
                confounds_file=str(write_tsv(work / "confounds.tsv", table)),
                censoring_file=str(write_json(work / "censoring.json", censoring)), t_r=run.t_r, task=task,
                denoising=denoising, events_file=str(run.events_file) if run.events_file else None,
                run_name=run.name,
            )
            maps = run_maps_from_files(**kwargs, out_dir=str(work))
            out[run.task, label] = {"run": run, "maps": maps, "kwargs": kwargs, "seed_file": seed_file,
                                    "denoising": denoising}
    return out


@pytest.mark.parametrize("task", ["rest", "nback"])
def test_first_level_maps_are_the_unsmoothed_maps_smoothed_by_nilearn(first_level, task):
    off, on = first_level[task, "off"], first_level[task, "on"]
    names = [Path(f).name for f in on["maps"]["map_files"]]
    assert names == [Path(f).name for f in off["maps"]["map_files"]]
    expected_maps = ({"correlation_stat-r", "correlation_stat-z"} if task == "rest" else
                     {"gppi0back_stat-beta", "gppi0back_stat-z", "gppi2back_stat-beta", "gppi2back_stat-z",
                      "gppi2backMinus0back_stat-beta", "gppi2backMinus0back_stat-z", "background_stat-r",
                      "background_stat-z"})
    assert {n.split("desc-")[1].removesuffix(".nii.gz") for n in names} == expected_maps
    brain = nib.load(on["run"].mask_file).get_fdata() > 0
    for unsmoothed_file, smoothed_file in zip(off["maps"]["map_files"], on["maps"]["map_files"], strict=True):
        unsmoothed_img = nib.load(unsmoothed_file)
        unsmoothed = unsmoothed_img.get_fdata()
        reference = smooth_img(unsmoothed_img, FWHM_MM).get_fdata()
        reference[~brain] = 0
        reference[np.isnan(unsmoothed)] = np.nan
        ours = nib.load(smoothed_file).get_fdata()
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6, err_msg=smoothed_file)
        assert not np.any(ours[~brain]), "the smoothed map leaks outside the brain mask"
        assert np.corrcoef(ours[brain], unsmoothed[brain])[0, 1] < 0.95, "the map was not smoothed"
    # the seed signal is the unsmoothed data's
    for off_ts, on_ts in zip(off["maps"]["timeseries_files"], on["maps"]["timeseries_files"], strict=True):
        assert Path(off_ts).read_bytes() == Path(on_ts).read_bytes()
    qc_on = json.loads(Path(on["maps"]["qc_file"]).read_text())
    qc_off = json.loads(Path(off["maps"]["qc_file"]).read_text())
    assert qc_on["smoothing_fwhm"] == FWHM_MM and qc_off["smoothing_fwhm"] is None
    assert qc_on["dof"] == qc_off["dof"]


def test_smoothing_off_never_touches_the_maps(first_level, tmp_path, monkeypatch):
    """Off, the maps are what the first level computed before smoothing existed: byte for byte."""
    import fcflow.firstlevel
    from fcflow.runfiles import run_maps_from_files

    def refuse(*args, **kwargs):
        raise AssertionError("smooth_map was called with smoothing off")

    monkeypatch.setattr(fcflow.firstlevel, "smooth_map", refuse)
    for task in ("rest", "nback"):
        off = first_level[task, "off"]
        again = run_maps_from_files(**off["kwargs"], out_dir=str(tmp_path / task))
        for before, now in zip(off["maps"]["map_files"], again["map_files"], strict=True):
            assert Path(before).read_bytes() == Path(now).read_bytes(), now


def test_every_map_sidecar_records_the_smoothing(first_level, tmp_path):
    from fcflow.derivatives import write_run_derivatives

    for (task, label), entry in first_level.items():
        run, maps = entry["run"], entry["maps"]
        out = tmp_path / label
        write_run_derivatives(
            out, {"sub": run.subject, "ses": run.session, "task": run.task, "space": RECIPE.space, "res": "4"},
            map_files=maps["map_files"], timeseries_files=maps["timeseries_files"], seed_files=[],
            seed_sidecars=[], qc_file=maps["qc_file"], censoring_file=entry["kwargs"]["censoring_file"],
            provenance={"inputs": {}, "t_r": run.t_r, "denoising": to_plain(entry["denoising"]),
                        "command": ["fcflow"]},
        )
        sidecars = sorted(out.rglob(f"*task-{task}_*_statmap.json"))
        assert len(sidecars) == len(maps["map_files"])
        for path in sidecars:
            meta = json.loads(path.read_text())
            assert meta["SmoothingFWHM"] == (FWHM_MM if label == "on" else None), path.name
