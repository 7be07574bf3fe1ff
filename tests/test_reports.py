"""Reports: QC-FC and motion tests against independent computations, the methods paragraph against
the recipe, and a participant report made from real (simulated) runs. No nipype."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fcflow.config import load_recipe
from fcflow.qc import (
    compare_motion_between_groups,
    compute_qcfc,
    summarise_motion,
    summarise_qcfc,
)
from fcflow.reports.methods import STRATEGY_TEXT, describe_methods, software_versions

RECIPE = load_recipe("weigner2025_pgacc")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


# ----------------------------------------------------------------------------------------------
# QC-FC
# ----------------------------------------------------------------------------------------------
def test_qcfc_equals_numpy_corrcoef_on_planted_motion_dependence():
    rng = np.random.default_rng(7)
    n_subjects, n_edges = 13, 400
    mean_fd = rng.gamma(4.0, 0.05, n_subjects)
    distance = np.linspace(10.0, 120.0, n_edges)
    # Near edges carry the motion (as a global artefact would), far ones progressively less.
    loading = np.clip(1.2 - distance / 100.0, 0.0, None)
    connectivity = loading * (mean_fd[:, None] - mean_fd.mean()) * 8 + rng.normal(0, 0.2, (n_subjects, n_edges))

    r, p = compute_qcfc(connectivity, mean_fd)

    expected = np.array([np.corrcoef(connectivity[:, j], mean_fd)[0, 1] for j in range(n_edges)])
    np.testing.assert_allclose(r, expected, atol=1e-12)
    np.testing.assert_allclose(p, [stats.pearsonr(connectivity[:, j], mean_fd).pvalue for j in range(n_edges)],
                               rtol=1e-8, atol=1e-14)
    summary = summarise_qcfc(r, p, distance, n_subjects=n_subjects)
    assert summary.n_edges == n_edges and summary.n_subjects == n_subjects
    assert summary.percent_p05 == pytest.approx(100 * np.mean(p < 0.05))
    assert summary.median_abs_r == pytest.approx(np.median(np.abs(expected)))
    assert summary.distance_rho == pytest.approx(stats.spearmanr(expected, distance).statistic)
    assert summary.distance_rho < -0.5 and summary.percent_p05 > 30

    clean = compute_qcfc(rng.normal(0, 1, (n_subjects, n_edges)), mean_fd)
    assert summarise_qcfc(*clean, distance, n_subjects=n_subjects).percent_p05 < 15


def test_qcfc_constant_edge_is_nan_and_bad_inputs_raise():
    fd = np.array([0.1, 0.2, 0.3, 0.5])
    data = np.column_stack([np.ones(4), [1.0, 2.0, 2.5, 5.0]])
    r, p = compute_qcfc(data, fd)
    assert np.isnan(r[0]) and np.isfinite(r[1])
    with pytest.raises(ValueError, match="at least 3 subjects"):
        compute_qcfc(data[:2], fd[:2])
    with pytest.raises(ValueError, match="'mean_fd_mm' must vary"):
        compute_qcfc(data, np.full(4, 0.2))
    with pytest.raises(ValueError, match="must have shape"):
        compute_qcfc(data, fd[:3])


# ----------------------------------------------------------------------------------------------
# Motion by group
# ----------------------------------------------------------------------------------------------
def test_exclusion_summary_counts_runs_by_the_parameter_that_excluded_them():
    from fcflow.qc import summarise_exclusions

    reasons = {
        "r1": "sub-01_ses-a_task-rest: mean FD is 0.600 mm, above the maximum of 0.5 mm (max_mean_fd_mm). Run excluded.",
        "r2": ("sub-02_ses-a_task-rest: 120 censored; 80 volumes remain, below the minimum of 100 (min_volumes). "
               "mean FD is 0.700 mm, above the maximum of 0.5 mm (max_mean_fd_mm). Run excluded."),
        "r3": "sub-03_ses-a_task-rest: correlation would have 4.1 effective degrees of freedom, below the minimum "
              "of 10 (min_dof). Budget: ... Run excluded: its map would be mostly noise.",
        "r4": "sub-04_ses-a_task-nback: conditions '0back' and '2back' have identical regressors ... Check the "
              "events file. Run excluded.",
        "r5": "something fcflow does not write",
    }
    table = pd.DataFrame({"excluded": [True] * 5 + [False] * 3, "exclusion_reason": [*reasons.values(), "", "", ""]})
    assert summarise_exclusions(table) == (
        "3 of 8 runs kept; 5 excluded (max_mean_fd_mm 2, events 1, min_dof 1, min_volumes 1, other 1)")
    assert summarise_exclusions(table[~table["excluded"]]) == "3 of 3 runs kept"


def _motion_table(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for group, shift in (("placebo", 0.0), ("ketamine", 0.15), ("lamotrigine_ketamine", 0.05)):
        for session in ("baseline", "infusion"):
            for k in range(9):
                fd = rng.normal(0.15 + (shift if session == "infusion" else 0.0), 0.03)
                rows.append({"participant": f"{group[:3]}{k}", "group": group, "session": session,
                             "mean_fd_mm": fd, "percent_censored": 100 * fd * rng.uniform(0.5, 1.5),
                             "n_excluded": int(fd > 0.3)})
    return pd.DataFrame(rows)


def test_motion_tests_equal_scipy_and_find_the_planted_difference():
    table = _motion_table(np.random.default_rng(3))
    groups, sessions = ("placebo", "ketamine", "lamotrigine_ketamine"), ("baseline", "infusion")
    tests = compare_motion_between_groups(table, groups=groups, sessions=sessions)
    for row in tests.itertuples():
        part = table[table["session"] == row.session]
        samples = [part.loc[part["group"] == g, row.measure].to_numpy() for g in groups]
        assert row.anova_f == pytest.approx(stats.f_oneway(*samples).statistic)
        assert row.anova_p == pytest.approx(stats.f_oneway(*samples).pvalue)
        assert row.kruskal_h == pytest.approx(stats.kruskal(*samples).statistic)
        assert row.n_per_group == "placebo=9;ketamine=9;lamotrigine_ketamine=9"
    fd = tests.set_index(["session", "measure"])
    assert fd.loc[("infusion", "mean_fd_mm"), "anova_p"] < 0.001
    assert fd.loc[("baseline", "mean_fd_mm"), "anova_p"] > 0.01

    summary = summarise_motion(table, groups=groups, sessions=sessions).set_index(["group", "session"])
    ketamine = table[(table["group"] == "ketamine") & (table["session"] == "infusion")]
    assert summary.loc[("ketamine", "infusion"), "mean_fd_mm"] == pytest.approx(ketamine["mean_fd_mm"].mean())
    assert summary.loc[("ketamine", "infusion"), "sd_fd_mm"] == pytest.approx(ketamine["mean_fd_mm"].std(ddof=1))
    assert summary.loc[("ketamine", "infusion"), "n_subjects"] == 9


def test_motion_test_is_skipped_for_a_group_with_one_subject():
    table = _motion_table(np.random.default_rng(4))
    table = table[~((table["group"] == "placebo") & (table["participant"] != "pla0"))]
    tests = compare_motion_between_groups(table, groups=("placebo", "ketamine"), sessions=("baseline",))
    assert tests["anova_p"].isna().all() and tests["n_per_group"].iloc[0].startswith("placebo=1;")


# ----------------------------------------------------------------------------------------------
# Methods paragraph
# ----------------------------------------------------------------------------------------------
def _with(recipe, section: str, **changes):
    return recipe.replace(**{section: dataclasses.replace(getattr(recipe, section), **changes)})


def test_methods_paragraph_follows_the_recipe():
    base = describe_methods(RECIPE)["paragraph"]
    assert "0.5 mm" in base and "5000 permutations" in base and "24P+aCompCor" in base
    changed = _with(_with(RECIPE, "denoising", fd_threshold_mm=0.37, strategy="36P"),
                    "inference", n_permutations=1234, alpha=0.01)
    text = describe_methods(changed)["paragraph"]
    assert text != base
    assert "framewise displacement above 0.37 mm" in text and "0.5 mm or" not in text
    assert "1234 permutations" in text and "5000" not in text
    assert "alpha = 0.01" in text
    assert "strategy 36P" in text and STRATEGY_TEXT["36P"] in text
    no_censoring = describe_methods(_with(RECIPE, "denoising", fd_threshold_mm=None, std_dvars_threshold=None))
    assert "censored" not in no_censoring["paragraph"]
    assert any(r.startswith("Amunts K") for r in describe_methods(RECIPE)["references"])
    # variance groups and the correction over tests follow the recipe too
    assert "sign-flipped" in base and "over all group tests" in base and "ordinary least squares" not in base
    pooled = describe_methods(_with(RECIPE, "inference", variance_groups="none", family_wise="none"))
    assert "ordinary least squares" in pooled["paragraph"] and "Freedman-Lane" in pooled["paragraph"]
    assert "sign-flipped" not in pooled["paragraph"] and "over all group tests" not in pooled["paragraph"]
    cited = {r.key for r in pooled["cited"]}
    assert "Freedman1983" in cited and not {"Winkler2014", "Winkler2016"} & cited
    voxel = describe_methods(_with(RECIPE, "inference", group_variances="voxel"))["paragraph"]
    assert "Winkler's v" in voxel and "weighted least-squares" not in voxel
    # smoothing is described only when the recipe smooths, with the recipe's kernel
    assert "Gaussian kernel of 6 mm FWHM" in base
    assert "Gaussian kernel of 4.5 mm FWHM" in describe_methods(_with(RECIPE, "denoising", smoothing_fwhm=4.5))[
        "paragraph"]
    assert "smoothed" not in describe_methods(_with(RECIPE, "denoising", smoothing_fwhm=None))["paragraph"]


#: What the paragraph names -> the reference that must then be in the list
_NAMED = {"fMRIPrep": "Esteban2019", "nilearn": "Abraham2014", "nipype": "Gorgolewski2011",
          "24-parameter": "Friston1996", "CompCor": "Behzadi2007", "36-parameter": "Satterthwaite2013",
          "ICA-AROMA": "Pruim2015", "censored": "Power2014", "standardised DVARS": "Afyouni2018",
          "Lindquist et al.": "Lindquist2019", "Worsley-Friston": "Worsley1995", "gPPI": "McLaren2012",
          "background connectivity": "AlAidroos2012", "threshold-free cluster enhancement": "Smith2009",
          "Freedman-Lane": "Freedman1983", "Benjamini-Hochberg": "Benjamini1995", "Julich-Brain": "Amunts2020",
          "by permutation": "Nichols2002"}


@pytest.mark.parametrize("changes", [
    {},
    {"denoising": {"strategy": "36P", "std_dvars_threshold": None}},
    {"denoising": {"strategy": "ICA-AROMA", "fd_threshold_mm": None, "std_dvars_threshold": None}},
    {"inference": {"variance_groups": "none", "family_wise": "none", "methods": ("maxt", "fdr"), "primary": "maxt"}},
])
def test_every_method_the_paragraph_names_is_in_the_references_and_the_bibtex(changes, tmp_path):
    import re

    from fcflow.reports.methods import REFERENCES, write_bibtex

    recipe = RECIPE
    for section, values in changes.items():
        recipe = _with(recipe, section, **values)
    methods = describe_methods(recipe)
    paragraph, cited = methods["paragraph"], {r.key for r in methods["cited"]}
    for name, key in _NAMED.items():
        assert (name in paragraph) == (key in cited), (name, key, changes)
    # every "Author et al. YEAR" in the paragraph is a reference of that first author and year
    for author, year in re.findall(r"(\w+) et al\. (\d{4})", paragraph):
        assert f"{author}{year}" in cited, (author, year)
    assert [r.text for r in methods["cited"]] == methods["references"][:len(cited)]
    bib = write_bibtex(tmp_path / "refs.bib", methods["cited"], methods["notes"]).read_text()
    keys = re.findall(r"^@(\w+)\{(\w+),$", bib, flags=re.M)
    assert [k for _, k in keys] == [r.key for r in methods["cited"]] + [
        f"fcflowNote{i}" for i in range(1, len(methods["notes"]) + 1)]
    assert bib.count("{") == bib.count("}")
    for key in cited:
        assert f"doi = {{{REFERENCES[key].doi}}}" in bib


def test_methods_name_the_declared_regions_by_their_patterns():
    declared = describe_methods(RECIPE)["paragraph"]
    assert ("each of the declared regions matching 'left * (Insula)', 'right * (Insula)', '* Area 8d1 (SFG)', "
            "'* Area SFG2 (SFG)' and '* Area SFG3 (SFG)' among the Julich-Brain areas of both hemispheres") in declared
    everything = describe_methods(_with(RECIPE, "regions", areas=("*",)))["paragraph"]
    assert "declared regions" not in everything
    assert "each Julich-Brain area of both hemispheres (maximum probability maps) with at least 10 voxels" in everything


def test_every_number_of_the_methods_comes_from_the_recipe_or_the_software():
    import inspect

    from fcflow.atlas.release import load_atlas_release
    from fcflow.permutation import permutation_test

    recipe = _with(_with(RECIPE, "denoising", fd_threshold_mm=0.43, min_volumes=77, n_compcor=6, smoothing_fwhm=7.5),
                   "inference", n_permutations=4321, random_seed=99)
    versions = software_versions()
    atlas = load_atlas_release()
    methods = describe_methods(recipe, versions=versions, atlas=atlas)
    defaults = {k: p.default for k, p in inspect.signature(permutation_test).parameters.items()}
    sources = " ".join([
        json.dumps(recipe.to_dict()), " ".join(versions.values()), atlas.version, str(atlas.n_areas),
        STRATEGY_TEXT[recipe.denoising.strategy], f"{recipe.denoising.min_dof:g}",
        " ".join(f"{defaults[k]:g}" for k in ("tfce_extent_exponent", "tfce_height_exponent", "connectivity")),
        " ".join(methods["references"]),  # a citation's year
    ])
    allowed = set(_NUMBER.findall(sources))
    found = set(_NUMBER.findall(methods["paragraph"]))
    assert found <= allowed, f"numbers not taken from the recipe or the software: {sorted(found - allowed)}"
    for value in ("0.43", "77", "6", "7.5", "4321", "99", versions["nilearn"], atlas.version):
        assert value in found or value in methods["paragraph"]


# ----------------------------------------------------------------------------------------------
# A participant report from real runs
# ----------------------------------------------------------------------------------------------
#: The recipe's pgACC seed (mean signal, its min_coverage) as the first level reads it
SEED = dataclasses.replace(RECIPE.seeds[0], signal="mean", min_coverage=0.8)


@pytest.fixture(scope="module")
def reported(tmp_path_factory, one_subject_infusion):
    """Two runs of a tiny simulated study through the first level and the report: one kept, one excluded."""
    from fcflow.firstlevel import select_run_confounds
    from fcflow.io import write_json, write_tsv
    from fcflow.reports.participant import make_run_report, write_participant_report
    from fcflow.runfiles import run_maps_from_files

    root = tmp_path_factory.mktemp("reports")
    bids, runs = one_subject_infusion["bids"], one_subject_infusion["runs"]
    seed_file = one_subject_infusion["seed_file"]
    seeds = [SEED]
    out = root / "out"
    reports, kwargs = {}, {}
    for run in runs:
        # The n-back run is excluded: its mean FD is above a maximum set far too low.
        denoising = (RECIPE.denoising if run.task == "rest"
                     else dataclasses.replace(RECIPE.denoising, max_mean_fd_mm=0.001))
        task = RECIPE.task(run.task)
        work = root / "work" / run.name
        confounds, censoring = select_run_confounds(run.bold_file, denoising, run_name=run.name)
        table = confounds if confounds is not None else pd.DataFrame(index=range(censoring["n_timepoints"]))
        confounds_file = write_tsv(work / "confounds.tsv", table)
        censoring_file = write_json(work / "censoring.json", censoring)
        maps = run_maps_from_files(
            bold_file=str(run.bold_file), mask_file=str(run.mask_file), seed_files=[str(seed_file)], seeds=seeds,
            confounds_file=str(confounds_file), censoring_file=str(censoring_file), t_r=run.t_r, task=task,
            denoising=denoising, events_file=str(run.events_file) if run.events_file else None,
            run_name=run.name, out_dir=str(work), report_data=True,
        )
        kwargs[run.task] = dict(
            report_data_file=maps["report_data_file"], mask_file=str(run.mask_file),
            fmriprep_confounds_file=str(run.confounds_file), seed_files=[str(seed_file)], seed_names=["pgACC"],
            censoring_file=str(censoring_file), qc_file=maps["qc_file"],
            map_files=maps["map_files"], timeseries_files=maps["timeseries_files"],
            events_file=str(run.events_file) if run.events_file else None, t_r=run.t_r, task=task,
            denoising=denoising,
            entities={"sub": run.subject, "ses": run.session, "task": run.task, "space": RECIPE.space, "res": "4",
                      "group": run.group},
            run_name=run.name,
        )
        reports[run.task] = make_run_report(**kwargs[run.task], out_dir=work / "report")
        reports[run.task + "_maps"] = maps
    page = write_participant_report(out, "01", [reports["rest"], reports["nback"]])
    return {"runs": {r.task: r for r in runs}, "reports": reports, "page": page, "out": out, "root": root,
            "bids": bids, "kwargs": kwargs}


def test_participant_report_has_one_section_per_run_with_the_exclusion_reason(reported):
    html = reported["page"].read_text()
    assert reported["page"] == reported["out"] / "sub-01.html"
    rest, nback = reported["runs"]["rest"], reported["runs"]["nback"]
    sections = re.findall(r'<section id="([^"]+)" class="run">', html)
    assert sections == [nback.name, rest.name]
    nback_section = html[html.index(f'<section id="{nback.name}"'):html.index(f'<section id="{rest.name}"')]
    assert '<p class="excluded"><strong>Excluded.</strong>' in nback_section
    assert "above the maximum of 0.001 mm (max_mean_fd_mm)" in nback_section
    rest_section = html[html.index(f'<section id="{rest.name}"'):]
    assert '<p class="included">' in rest_section and "max_mean_fd_mm" not in rest_section


def test_report_figures_are_the_runs_own(reported):
    out = reported["out"]
    html = reported["page"].read_text()
    links = re.findall(r'<img src="([^"]+)"', html)
    rest = json.loads(Path(reported["reports"]["rest"]).read_text())
    nback = json.loads(Path(reported["reports"]["nback"]).read_text())
    assert set(rest["figures"]) == {"seedTemplate", "seedBold", "motion", "carpet", "tsnr", "seedTimeseries",
                                    "mappgACCCorrelation"}
    # the excluded run still shows what excluded it, but has no map or seed signal
    assert set(nback["figures"]) == {"seedTemplate", "seedBold", "motion", "carpet", "tsnr"}
    assert len(links) == len(rest["figures"]) + len(nback["figures"])
    for link in links:
        data = (out / link).read_bytes()
        assert data.startswith(b"\x89PNG") if link.endswith(".png") else b"<svg" in data[:2000], link
    # tSNR and volume counts are the run's: recomputed here from the BOLD with nibabel
    run = reported["runs"]["rest"]
    brain = nib.load(run.mask_file).get_fdata() > 0
    series = nib.load(run.bold_file).get_fdata(dtype=np.float32)[brain]
    tsnr = series.mean(axis=1) / series.std(axis=1)
    assert rest["median_tsnr_brain"] == pytest.approx(np.nanmedian(tsnr), rel=1e-4)
    assert rest["n_timepoints"] == series.shape[1] and 0 < rest["n_kept"] <= series.shape[1]


def test_no_denoise_map_is_the_plain_correlation_and_differs_from_the_recipes(reported):
    import scipy.fft

    def clean(x, *, high_pass, low_pass, t_r, **_):
        """fcflow's default cleaning without confounds, computed independently: the orthonormal DCT
        limited to the band, then the band's part of the linear trend regressed out; z-scored."""
        n = x.shape[0]
        frequencies = np.arange(n) / (2 * n * t_r)
        band = (frequencies > high_pass) & (frequencies <= low_pass)

        def limit(values):
            coefficients = scipy.fft.dct(values, axis=0, norm="ortho")
            coefficients[~band] = 0
            return scipy.fft.idct(coefficients, axis=0, norm="ortho")

        y, trend = limit(x.astype(np.float64)), limit(np.arange(n, dtype=np.float64))
        y = y - np.outer(trend, trend @ y) / (trend @ trend)
        return (y - y.mean(axis=0)) / y.std(axis=0, ddof=1)

    run = reported["runs"]["rest"]
    func = reported["out"] / "sub-01" / "ses-infusion" / "func"
    (none_file,) = func.glob("*task-rest*_seed-pgACC_stat-z_desc-correlationNoDenoise_statmap.nii.gz")
    assert json.loads(none_file.with_name(none_file.name.replace(".nii.gz", ".json")).read_text())["Statistic"] == "z"
    brain = nib.load(run.mask_file).get_fdata() > 0
    seed = nib.load(next((reported["bids"] / "derivatives" / "ground_truth")
                         .glob("*_desc-pgACC_mask.nii.gz"))).get_fdata()[brain] > 0
    series = nib.load(run.bold_file).get_fdata(dtype=np.float32)[brain].T
    censoring = json.loads((reported["root"] / "work" / run.name / "censoring.json").read_text())
    task = RECIPE.task("rest")
    cleaned = clean(series[censoring["n_non_steady_state"]:], detrend=True, standardize="zscore_sample",
                    high_pass=task.high_pass, low_pass=task.low_pass, t_r=run.t_r)
    seed_signal = series[censoring["n_non_steady_state"]:, seed].mean(axis=1)
    seed_clean = clean(seed_signal[:, None], detrend=True, standardize="zscore_sample", high_pass=task.high_pass,
                       low_pass=task.low_pass, t_r=run.t_r)[:, 0]
    expected = np.arctanh(np.clip(cleaned.T @ seed_clean / (len(seed_clean) - 1), -1 + 1e-7, 1 - 1e-7))
    # smoothed with the recipe's kernel, as the first level's maps (nilearn's own smoothing)
    from nilearn.image import smooth_img

    assert json.loads(none_file.with_name(none_file.name.replace(".nii.gz", ".json")).read_text())[
        "SmoothingFWHM"] == RECIPE.denoising.smoothing_fwhm == 6
    volume = np.zeros(brain.shape, dtype=np.float32)
    volume[brain] = expected
    expected = smooth_img(nib.Nifti1Image(volume, nib.load(run.mask_file).affine), 6).get_fdata()[brain]
    ours = nib.load(none_file).get_fdata()[brain]
    np.testing.assert_allclose(ours, expected, atol=2e-3)
    default = nib.load(next(f for f in reported["reports"]["rest_maps"]["map_files"]
                            if f.endswith("correlation_stat-z.nii.gz"))).get_fdata()[brain]
    assert np.corrcoef(ours, default)[0, 1] < 0.99


def test_report_data_share_the_first_levels_read_and_leave_its_maps_alone(reported, tmp_path):
    """With report_data=True the maps are byte-identical to a run without reports; the arrays are the run's."""
    from fcflow.runfiles import run_maps_from_files

    kwargs = reported["kwargs"]["rest"]
    run = reported["runs"]["rest"]
    work = reported["root"] / "work" / run.name
    plain = run_maps_from_files(
        bold_file=str(run.bold_file), mask_file=str(run.mask_file), seed_files=kwargs["seed_files"],
        seeds=[SEED], confounds_file=str(work / "confounds.tsv"),
        censoring_file=kwargs["censoring_file"], t_r=run.t_r, task=kwargs["task"], denoising=kwargs["denoising"],
        events_file=None, run_name=run.name, out_dir=str(tmp_path),
    )
    assert "report_data_file" not in plain
    with_report = reported["reports"]["rest_maps"]["map_files"]
    assert [Path(f).name for f in plain["map_files"]] == [Path(f).name for f in with_report]
    for ours, theirs in zip(plain["map_files"], with_report, strict=True):
        assert np.array_equal(nib.load(ours).get_fdata(), nib.load(theirs).get_fdata()), ours
    brain = nib.load(run.mask_file).get_fdata() > 0
    series = nib.load(run.bold_file).get_fdata(dtype=np.float64)[brain]
    with np.load(kwargs["report_data_file"]) as npz:
        np.testing.assert_allclose(npz["mean"], series.mean(axis=1), rtol=1e-5)
        assert npz["carpet_before"].shape == (npz["carpet_columns"].size, series.shape[1])
        assert npz["carpet_after"].shape == npz["carpet_before"].shape


def test_run_report_figures_are_the_same_bytes_on_a_rerun(reported, tmp_path):
    from fcflow.reports.participant import make_run_report

    first = json.loads(Path(reported["reports"]["rest"]).read_text())
    again = json.loads(make_run_report(**reported["kwargs"]["rest"], out_dir=tmp_path).read_text())
    assert first["figures"].keys() == again["figures"].keys()
    for key, path in first["figures"].items():
        assert Path(path).read_bytes() == Path(again["figures"][key]).read_bytes(), key


def test_seed_template_figure_is_drawn_once_per_process_and_equals_a_fresh_draw(reported, tmp_path):
    """The seed-on-template figure is the same for every run of a seed: drawn once, the same bytes."""
    from fcflow.reports import figures
    from fcflow.reports.participant import _TEMPLATE_FIGURES, _seed_template_figure

    rest = json.loads(Path(reported["reports"]["rest"]).read_text())
    nback = json.loads(Path(reported["reports"]["nback"]).read_text())
    seed_img = nib.load(reported["kwargs"]["rest"]["seed_files"][0])
    fresh = figures.save_figure(figures.plot_seed_overlay({"pgACC": seed_img}, figures.load_template(),
                                                          title="seed on the MNI152 template"), tmp_path / "a.png")
    assert Path(rest["figures"]["seedTemplate"]).read_bytes() == fresh.read_bytes()
    assert Path(nback["figures"]["seedTemplate"]).read_bytes() == fresh.read_bytes()  # the cached copy
    # another seed is another figure, drawn and kept beside the first
    n_kept = len(_TEMPLATE_FIGURES)
    shifted = nib.Nifti1Image(np.roll(np.asarray(seed_img.dataobj), 3, axis=1), seed_img.affine)
    other = _seed_template_figure({"pgACC": shifted}, tmp_path / "b.png")
    assert len(_TEMPLATE_FIGURES) == n_kept + 1 and other.read_bytes() != fresh.read_bytes()


def test_a_map_with_nothing_above_the_display_threshold_draws_without_a_warning(reported):
    """nilearn's "empty mask" warning came once per such figure in the participant log (hard-case study)."""
    import warnings

    from fcflow.reports import figures

    path = next(p for p in reported["reports"]["rest_maps"]["map_files"] if "stat-z" in p or "_z" in Path(p).name)
    img = nib.load(path)
    bg = figures.load_template()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure = figures.plot_connectivity_map(img, bg, title="t", threshold=1e6)
    assert not [w for w in caught if "empty mask" in str(w.message)], [str(w.message) for w in caught]
    assert len(figure.axes) > 1  # drawn all the same


def test_report_text_is_escaped(reported, tmp_path):
    from fcflow.reports.participant import write_participant_report

    report = json.loads(Path(reported["reports"]["nback"]).read_text())
    report["exclusion_reason"] = "<script>alert(1)</script>"
    doctored = tmp_path / "run_report.json"
    doctored.write_text(json.dumps(report))
    html = write_participant_report(tmp_path / "out", "01", [doctored]).read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html


def test_runs_are_listed_in_the_design_order_of_sessions(reported, tmp_path):
    # issue 19: the page listed 24h, baseline, infusion (alphabetical)
    from fcflow.reports.participant import write_participant_report

    report = json.loads(Path(reported["reports"]["rest"]).read_text())
    files = []
    for session in ("24h", "baseline", "infusion"):
        copy = {**report, "entities": {**report["entities"], "ses": session},
                "run_name": report["run_name"].replace("ses-infusion", f"ses-{session}")}
        files.append(tmp_path / f"{session}.json")
        files[-1].write_text(json.dumps(copy))
    html = write_participant_report(tmp_path / "out", "01", files,
                                    session_order=("baseline", "infusion", "24h")).read_text()
    sections = re.findall(r'<section id="([^"]+)" class="run">', html)
    assert [re.search(r"ses-([a-z0-9]+)", s).group(1) for s in sections] == ["baseline", "infusion", "24h"]
    alphabetical = write_participant_report(tmp_path / "out2", "01", files).read_text()
    assert [re.search(r"ses-([a-z0-9]+)", s).group(1)
            for s in re.findall(r'<section id="([^"]+)" class="run">', alphabetical)] == ["24h", "baseline",
                                                                                         "infusion"]


def test_save_figure_writes_png_or_svg_only(tmp_path):
    from fcflow.reports.figures import new_figure, save_figure

    figure = new_figure(2, 2)
    figure.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    assert save_figure(figure, tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in save_figure(figure, tmp_path / "a.svg").read_bytes()[:2000]
    with pytest.raises(ValueError, match="'out_file' must end in .png or .svg"):
        save_figure(figure, tmp_path / "a.pdf")


def test_stand_in_and_unverified_seeds_are_found_from_the_seed_sidecars(tmp_path):
    from fcflow.atlas.fetch import atlas_provenance
    from fcflow.reports.group import seed_caveats_of_study
    from fcflow.reports.participant import seed_caveats

    func = tmp_path / "sub-01" / "ses-baseline" / "func"
    func.mkdir(parents=True)
    (func / "sub-01_ses-baseline_task-rest_seed-pgACC_mask.json").write_text(json.dumps(
        {"Seed": "pgACC", "StandIn": True, "MaskDescription": "STAND-IN pgACC: a 10 mm sphere"}))
    # a seed from a local atlas copy (no manifest): content checks only, not against the release
    local = tmp_path / "julich"
    local.mkdir()
    (func / "sub-01_ses-baseline_task-rest_seed-real_mask.json").write_text(json.dumps(
        {"Seed": "real", "Source": "mpm", "Atlas": atlas_provenance(local, files=[])}))
    assert seed_caveats_of_study(tmp_path, "stand-in") == {"pgACC": "STAND-IN pgACC: a 10 mm sphere"}
    (unverified,) = seed_caveats_of_study(tmp_path, "unverified").items()
    assert unverified[0] == "real" and "content checks only" in unverified[1] and "No release checksums" in unverified[1]
    # the cache's files came from the release URL with their SHA-256 recorded: no caveat
    (local / "manifest.json").write_text("{}")
    (func / "sub-01_ses-baseline_task-rest_seed-real_mask.json").write_text(json.dumps(
        {"Seed": "real", "Source": "mpm", "Atlas": atlas_provenance(local, files=[])}))
    assert seed_caveats_of_study(tmp_path, "unverified") == {}
    work = tmp_path / "work"
    work.mkdir()
    (work / "seed-pgACC_mask.json").write_text(json.dumps({"StandIn": True, "MaskDescription": "sphere"}))
    (work / "seed-real_mask.json").write_text(json.dumps({"StandIn": False}))
    files = [str(work / "seed-pgACC_mask.nii.gz"), str(work / "seed-real_mask.nii.gz")]
    assert seed_caveats(files, ["pgACC", "real"], "stand-in") == {"pgACC": "sphere"}
    assert seed_caveats(files, ["pgACC", "real"], "unverified") == {}


def test_report_of_some_runs_keeps_the_subjects_other_runs(reported, tmp_path):
    # issue 17: rerunning one of a subject's runs rewrote sub-01.html with that run only
    import shutil

    from fcflow.reports.participant import write_participant_report

    out = tmp_path / "out"
    shutil.copytree(reported["out"], out)
    rest, nback = reported["runs"]["rest"], reported["runs"]["nback"]
    page = write_participant_report(out, "01", [reported["reports"]["rest"]])
    sections = re.findall(r'<section id="([^"]+)" class="run">', page.read_text())
    assert sorted(sections) == sorted([nback.name, rest.name])


def test_map_captions_and_colour_bars_differ_by_map_kind(reported):
    # issue 19: every map's caption said "Fisher z (gPPI: z of the interaction)" and colour bars had no label
    import nibabel as nib

    from fcflow.reports.figures import plot_connectivity_map
    from fcflow.reports.participant import map_caption

    kinds = {desc: map_caption(desc) for desc in ("correlation", "background", "gppi2backMinus0back")}
    assert len({caption for caption, _ in kinds.values()}) == 3
    assert kinds["correlation"][1] == kinds["background"][1] == "Fisher z"
    assert "gPPI" in kinds["gppi2backMinus0back"][1]
    html = reported["page"].read_text()
    assert kinds["correlation"][0] in html and "colour bar in Fisher z" in html
    assert "Fisher z (gPPI: z of the interaction)" not in html
    path = next(f for f in reported["reports"]["rest_maps"]["map_files"] if "stat-z" in f)
    img = nib.load(path)
    figure = plot_connectivity_map(img, img, title="t", colorbar_label="Fisher z")
    assert figure.axes[-1].get_ylabel() == "Fisher z"


def test_qcfc_reading_compares_the_recipe_with_chance_and_no_denoising():
    # issue 19: QC-FC had no chance reference and nothing said when the recipe raised the share
    from fcflow.reports.group import qcfc_reading

    raised = qcfc_reading({"no denoising": {"percent_p05": 4.0}, "24P+aCompCor (recipe)": {"percent_p05": 9.5}})
    assert raised.startswith("Chance is 5 % of edges at p < 0.05; the recipe's strategy leaves 9.5 % (4.0 % without")
    assert "denoising raised the share" in raised
    near = qcfc_reading({"no denoising": {"percent_p05": 28.5}, "24P+aCompCor (recipe)": {"percent_p05": 4.3}})
    assert "near chance" in near
    above = qcfc_reading({"no denoising": {"percent_p05": 28.5}, "24P (recipe)": {"percent_p05": 12.0}})
    assert "still above chance" in above
    assert qcfc_reading({}) == ""


def test_run_data_kept_by_an_earlier_fcflow_still_render(reported, tmp_path):
    # a rerun after an upgrade renders the runs reported earlier, whose kept data lack newer keys
    from fcflow.reports.participant import write_participant_report

    report = json.loads(Path(reported["reports"]["rest"]).read_text())
    report.pop("stand_in_seeds", None)
    report["maps"] = [{k: v for k, v in m.items() if k not in ("caption", "unit")} for m in report["maps"]]
    assert report["maps"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(report))
    html = write_participant_report(tmp_path / "out", "01", [old]).read_text()
    assert '<section id="' in html
