"""Group level: change maps, designs, inference and outputs on synthetic first-level maps.

The fast tests write first-level outputs themselves (real BIDS names and QC tables) on a small
grid (9 x 10 x 11, 4 mm) with a planted ketamine x infusion effect in a blob; one slow test runs
simulate -> participant -> group end to end.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fcflow.config import load_recipe, recipe_from_dict
from fcflow.errors import InputDataError
from fcflow.group.inference import build_covariates, compute_change_maps, fdr_logq
from fcflow.group.inputs import MeasureMap, collect_first_level, load_session_maps, select_measure_maps
from fcflow.group.outputs import julich_area_lookup
from fcflow.group.run import run_group_level

SHAPE = (9, 10, 11)
AFFINE = np.array([[4.0, 0, 0, -16], [0, 4.0, 0, -18], [0, 0, 4.0, -20], [0, 0, 0, 1]])
BLOB_CENTER = np.array([2, 3, 6])
BLOB_RADIUS = 1.6  # voxels
SESSIONS = ("baseline", "infusion", "24h")
GROUPS = ("placebo", "ketamine", "lamotrigine_ketamine")
N_PER_GROUP = 6
EXCLUDED = ("09", "infusion")  # a ketamine subject whose infusion run was excluded
MISSING = ("01", "24h")  # a placebo subject without a 24h session
EFFECT = 1.2


def _recipe(**inference):
    # cluster mass as primary keeps these tests fast (TFCE costs ~30 ms per permutation); the slow
    # end-to-end test runs the shipped recipe, whose primary is TFCE
    settings = {"primary": "cluster_mass", "methods": ["cluster_mass", "maxt", "fdr"], "n_permutations": 200,
                "cluster_forming_p": 0.01, "covariates": ["age", "sex", "mean_fd"], "random_seed": 3,
                **inference}
    return recipe_from_dict({
        "study": {"name": "toy"},
        "groups": {"levels": list(GROUPS)},
        "sessions": {"levels": list(SESSIONS), "reference": "baseline"},
        "tasks": {"rest": {"measures": ["correlation"], "high_pass": 0.01, "low_pass": 0.08}},
        "seeds": {"pgACC": {"areas": ["Area p24ab (pACC)"]}},
        "contrasts": {"sessions": ["infusion - baseline", "24h - baseline"],
                      "groups": ["ketamine - placebo", "lamotrigine_ketamine - placebo"],
                      "f_tests": [{"name": "groups", "groups": list(GROUPS)}]},
        "inference": settings,
    }, source="toy.toml")


def _brain() -> np.ndarray:
    ijk = np.indices(SHAPE).transpose(1, 2, 3, 0)
    centre = (np.array(SHAPE) - 1) / 2
    return (((ijk - centre) / (np.array(SHAPE) / 2)) ** 2).sum(-1) <= 1.0


def _blob() -> np.ndarray:
    ijk = np.indices(SHAPE).transpose(1, 2, 3, 0)
    return np.linalg.norm(ijk - BLOB_CENTER, axis=-1) <= BLOB_RADIUS


def write_first_level(root: Path, seed: int = 0) -> dict:
    """Write BIDS first-level maps and QC tables; return the truth (maps, masks)."""
    rng = np.random.default_rng(seed)
    bids = root / "bids"
    out = root / "out"
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.9.0"}))
    brain, blob = _brain(), _blob()
    participants, truth = [], {"maps": {}, "brain": {}}
    subject = 0
    for group in GROUPS:
        for _ in range(N_PER_GROUP):
            subject += 1
            sub = f"{subject:02d}"
            participants.append({"participant_id": f"sub-{sub}", "group": group,
                                 "age": int(rng.integers(20, 50)), "sex": "MF"[subject % 2]})
            trait = rng.normal(0, 0.3, SHAPE)
            qc_rows = []
            for session in SESSIONS:
                if (sub, session) == MISSING:
                    continue
                excluded = (sub, session) == EXCLUDED
                fd = float(rng.uniform(0.05, 0.3))
                qc_rows.append({"participant_id": f"sub-{sub}", "session": session, "task": "rest", "run": "n/a",
                                "n_timepoints": 100, "n_kept": 20 if excluded else 95, "mean_fd_mm": fd,
                                "percent_censored": 80.0 if excluded else 5.0, "excluded": excluded,
                                "exclusion_reason": "too few volumes" if excluded else "",
                                "pgACC_coverage": 1.0})
                if excluded:
                    continue
                mask = brain.copy()
                if subject == 7 and session == "baseline":
                    mask[np.nonzero(brain)[0].max(), :, :] = False  # one run with a smaller brain mask
                values = trait + rng.normal(0, 0.3, SHAPE)
                if group == "ketamine" and session == "infusion":
                    values = values + EFFECT * blob
                values = np.where(mask, values, 0).astype(np.float32)
                truth["maps"][(sub, session)] = values
                truth["brain"][(sub, session)] = mask
                func = out / f"sub-{sub}" / f"ses-{session}" / "func"
                func.mkdir(parents=True, exist_ok=True)
                for stat, data in (("z", values), ("r", np.tanh(values))):
                    name = (f"sub-{sub}_ses-{session}_task-rest_space-MNI152NLin2009cAsym_res-4_seed-pgACC_"
                            f"stat-{stat}_desc-correlation_statmap")
                    nib.Nifti1Image(data.astype(np.float32), AFFINE).to_filename(func / f"{name}.nii.gz")
                    (func / f"{name}.json").write_text("{}")
            pd.DataFrame(qc_rows).to_csv(out / f"sub-{sub}" / f"sub-{sub}_desc-runs_qc.tsv", sep="\t",
                                         index=False, na_rep="n/a")
    pd.DataFrame(participants).to_csv(bids / "participants.tsv", sep="\t", index=False)
    truth["participants"] = pd.DataFrame(participants)
    truth["bids"], truth["out"] = bids, out
    return truth


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Synthetic first level plus one group-level run (the expensive part, shared)."""
    root = tmp_path_factory.mktemp("group")
    truth = write_first_level(root)
    results = run_group_level(truth["out"], _recipe(), bids_dir=truth["bids"], command=["fcflow", "test"])
    truth["results"] = pd.read_csv(results, sep="\t", keep_default_na=False)
    return truth


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
def test_select_measure_maps_uses_z_and_gppi_contrast_beta():
    maps = select_measure_maps(load_recipe("weigner2025_pgacc"))
    assert [(m.task, m.measure, m.desc, m.stat) for m in maps] == [
        ("rest", "correlation", "correlation", "z"),
        ("nback", "gppi", "gppi2backMinus0back", "beta"),
        ("nback", "background", "background", "z"),
    ]


def test_change_maps_are_session_differences_and_drop_incomplete_subjects(study):
    measure = MeasureMap("rest", "correlation", "pgACC", "correlation", "z")
    runs = collect_first_level(study["out"], measure, space="MNI152NLin2009cAsym")
    maps = load_session_maps(study["out"], runs, SESSIONS)
    # the analysis mask is the intersection of every run's brain mask
    expected_mask = np.logical_and.reduce(list(study["brain"].values()))
    assert np.array_equal(maps.mask, expected_mask)
    assert maps.mask.sum() < _brain().sum()

    data, subjects, dropped = compute_change_maps(maps, {"infusion": 1.0, "baseline": -1.0})
    assert "09" not in subjects and set(dropped) == {"09"}
    assert "infusion: run excluded (too few volumes)" in dropped["09"]
    assert len(subjects) == 3 * N_PER_GROUP - 1
    for row, sub in enumerate(subjects):
        want = study["maps"][(sub, "infusion")] - study["maps"][(sub, "baseline")]
        np.testing.assert_allclose(data[row], want[maps.mask], atol=1e-6)

    data, subjects, dropped = compute_change_maps(maps, {"24h": 1.0, "baseline": -1.0})
    assert set(dropped) == {"01"} and dropped["01"] == "24h: no run"
    np.testing.assert_allclose(
        data[subjects.index("02")],
        (study["maps"][("02", "24h")] - study["maps"][("02", "baseline")])[maps.mask], atol=1e-6)


def test_counts_per_group_are_reported(study):
    results = study["results"]
    infusion = results[results["session_contrast"] == "infusion - baseline"]
    later = results[results["session_contrast"] == "24h - baseline"]
    assert set(infusion["n_per_group"]) == {"placebo=6;ketamine=5;lamotrigine_ketamine=6"}
    assert set(later["n_per_group"]) == {"placebo=5;ketamine=6;lamotrigine_ketamine=6"}
    stat_map = study["out"] / infusion.iloc[0]["stat_map"]
    sidecar = json.loads(stat_map.with_name(stat_map.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["NPerGroup"] == {"placebo": 6, "ketamine": 5, "lamotrigine_ketamine": 6}
    assert sidecar["Dropped"][0]["participant_id"] == "sub-09"
    assert len(sidecar["Subjects"]) == 17 and len(sidecar["DesignMatrix"]["rows"]) == 17
    assert sidecar["Inference"]["n_permutations"] == 200 and sidecar["Inference"]["random_seed"] == 3


def _ketamine_placebo_reference(study):
    """The infusion - baseline ketamine - placebo map and an independent design to check it with.

    Returns the results row, the written map, the analysis mask, the subjects, their group/covariate frame, the
    cell-means design with demeaned age, sex and change in mean FD, and 25 random voxels plus
    the blob's centre.
    """
    row = study["results"].query("session_contrast == 'infusion - baseline' and "
                                 "group_contrast == 'ketamine - placebo'").iloc[0]
    t_img = nib.load(study["out"] / row["stat_map"])
    t_map = np.asarray(t_img.dataobj)
    mask = np.logical_and.reduce(list(study["brain"].values()))
    people = study["participants"].set_index("participant_id")
    subjects = [f"{i:02d}" for i in range(1, 19) if f"{i:02d}" != "09"]
    qc = pd.concat(pd.read_csv(p, sep="\t") for p in sorted(study["out"].glob("sub-*/*_qc.tsv")))
    # the change map's motion covariate is the change in mean FD (infusion - baseline)
    fd_by = qc.set_index(["participant_id", "session"])["mean_fd_mm"]
    qc = pd.Series({p: fd_by[(p, "infusion")] - fd_by[(p, "baseline")] for p in qc["participant_id"].unique()})
    frame = pd.DataFrame({
        "group": [people.loc[f"sub-{s}", "group"] for s in subjects],
        "age": [float(people.loc[f"sub-{s}", "age"]) for s in subjects],
        "male": [float(people.loc[f"sub-{s}", "sex"] == "M") for s in subjects],
        "fd": [qc[f"sub-{s}"] for s in subjects],
    })
    exog = np.column_stack([(frame["group"] == g).to_numpy(float) for g in GROUPS]
                           + [frame[c] - frame[c].mean() for c in ("age", "male", "fd")])
    rng = np.random.default_rng(5)
    voxels = np.argwhere(mask)[rng.choice(int(mask.sum()), 25, replace=False)]
    voxels = np.vstack([voxels, BLOB_CENTER])
    return row, t_map, mask, subjects, frame, exog, voxels


def test_default_map_is_wls_t_with_brain_wide_group_weights(study):
    import statsmodels.api as sm

    row, t_map, mask, subjects, frame, exog, voxels = _ketamine_placebo_reference(study)
    # the default: variance_groups = "auto", group_variances = "brain": one weight per group for the whole
    # map (residual dof over the median share of the full model's residual sum of squares), then the
    # weighted least-squares t of statsmodels
    assert row["statistic"] == "wls-t" and row["stat_type"] == "t"
    sidecar = json.loads((study["out"] / row["stat_map"].replace(".nii.gz", ".json")).read_text())
    assert sidecar["Statistic"] == "wls-t" and sidecar["StatisticComputed"]["VarianceGroups"] == sorted(GROUPS)
    change = np.stack([study["maps"][(s, "infusion")][mask] - study["maps"][(s, "baseline")][mask]
                       for s in subjects]).astype(float)
    full = change - exog @ np.linalg.lstsq(exog, change, rcond=None)[0]
    full /= np.linalg.norm(full, axis=0)
    free = 1.0 - np.diag(exog @ np.linalg.pinv(exog))
    weights = np.zeros(len(subjects))
    for g in GROUPS:
        m = (frame["group"] == g).to_numpy()
        weights[m] = free[m].sum() / np.median((full[m] ** 2).sum(axis=0))
    for ijk in map(tuple, voxels):
        y = np.array([study["maps"][(s, "infusion")][ijk] - study["maps"][(s, "baseline")][ijk] for s in subjects])
        fit = sm.WLS(y.astype(float), exog, weights=weights).fit()
        expected = float(fit.t_test([-1, 1, 0, 0, 0, 0]).tvalue.squeeze())
        assert abs(t_map[ijk] - expected) < 1e-4, (ijk, t_map[ijk], expected)


def test_voxel_group_variances_give_winkler_v(tmp_path):
    truth = write_first_level(tmp_path, seed=0)
    results = pd.read_csv(run_group_level(truth["out"], _recipe(group_variances="voxel", methods=["maxt"], primary="maxt"),
                                          bids_dir=truth["bids"]), sep="\t", keep_default_na=False)
    study = {**truth, "results": results}
    import statsmodels.api as sm

    row, t_map, mask, subjects, frame, exog, voxels = _ketamine_placebo_reference(study)
    # group_variances = "voxel": Winkler's v with one residual variance per group, i.e. the
    # OLS contrast over its standard error from statsmodels WLS weighted by the groups' variances
    assert row["statistic"] == "v" and row["stat_type"] == "t"
    sidecar = json.loads((study["out"] / row["stat_map"].replace(".nii.gz", ".json")).read_text())
    assert sidecar["Statistic"] == "v" and sidecar["StatisticComputed"]["VarianceGroups"] == sorted(GROUPS)
    contrast = np.array([-1.0, 1, 0, 0, 0, 0])
    free = 1.0 - np.diag(exog @ np.linalg.pinv(exog))
    members = [(frame["group"] == g).to_numpy() for g in GROUPS]
    for ijk in map(tuple, voxels):
        y = np.array([study["maps"][(s, "infusion")][ijk] - study["maps"][(s, "baseline")][ijk] for s in subjects])
        fit = sm.OLS(y.astype(float), exog).fit()
        weights = np.zeros(len(y))
        for m in members:
            weights[m] = free[m].sum() / np.sum(fit.resid[m] ** 2)
        cov = sm.WLS(y.astype(float), exog, weights=weights).fit().normalized_cov_params
        expected = float(contrast @ fit.params / np.sqrt(contrast @ cov @ contrast))
        assert abs(t_map[ijk] - expected) < 1e-4, (ijk, t_map[ijk], expected)


def test_planted_blob_is_found_and_nothing_far_from_it(study):
    row = study["results"].query("session_contrast == 'infusion - baseline' and "
                                 "group_contrast == 'ketamine - placebo'").iloc[0]
    assert row["n_significant_clusters"] >= 1
    thresholded = np.asarray(nib.load(study["out"] / row["thresholded_map"]).dataobj)
    hits = np.argwhere(thresholded != 0)
    assert len(hits) > 0
    assert np.all(thresholded[tuple(hits.T)] > 0)  # ketamine > placebo
    assert np.linalg.norm(hits - BLOB_CENTER, axis=1).max() <= BLOB_RADIUS + 2.5
    table = pd.read_csv(study["out"] / row["cluster_table"], sep="\t")
    peak = np.linalg.solve(AFFINE, [table.loc[0, "peak_x"], table.loc[0, "peak_y"], table.loc[0, "peak_z"], 1])
    assert np.linalg.norm(peak[:3] - BLOB_CENTER) <= BLOB_RADIUS + 1
    assert table.loc[0, "p_fwe"] < 0.05
    # the F test sees it too; lamotrigine_ketamine - placebo has no planted effect
    f_row = study["results"].query("session_contrast == 'infusion - baseline' and stat_type == 'F'").iloc[0]
    assert f_row["n_significant_clusters"] >= 1
    lamo = study["results"].query("session_contrast == 'infusion - baseline' and "
                                  "group_contrast == 'lamotrigine_ketamine - placebo'").iloc[0]
    lamo_map = np.asarray(nib.load(study["out"] / lamo["thresholded_map"]).dataobj)
    assert not np.any(lamo_map[_blob()])


def test_cluster_means_table_and_plot(study):
    row = study["results"].query("session_contrast == 'infusion - baseline' and "
                                 "group_contrast == 'ketamine - placebo'").iloc[0]
    table_file = study["out"] / row["cluster_table"]
    means_file = next(table_file.parent.glob(table_file.name.split("_desc-")[0] + "*cluster-1*_clustermeans.tsv"))
    values = pd.read_csv(means_file, sep="\t")
    assert list(values.columns) == ["participant_id", "group", "session", "value"]
    # every analysed subject at every session it has: 17 subjects x 3 sessions, minus sub-01 at 24h
    assert len(values) == 17 * 3 - 1
    thresholded = np.asarray(nib.load(study["out"] / row["thresholded_map"]).dataobj) > 0
    from scipy import ndimage

    labels, _ = ndimage.label(thresholded)
    biggest = labels == np.bincount(labels.ravel())[1:].argmax() + 1
    got = values.set_index(["participant_id", "session"])["value"]
    expected = float(study["maps"][("08", "infusion")][biggest].mean())
    assert abs(got[("sub-08", "infusion")] - expected) < 1e-5
    means = values.groupby(["group", "session"])["value"].mean()
    assert means[("ketamine", "infusion")] - means[("ketamine", "baseline")] > 0.5
    png = means_file.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_paths_exist_and_baseline_equivalence_is_written(study):
    results = study["results"]
    # session contrasts x (group contrasts + F tests), then the repeated-measures interaction and
    # session main effect, and the group main effect on the mean over sessions (tests/test_repeated.py)
    assert len(results) == 2 * (2 + 1) + 2 + 1
    for column in ("stat_map", "z_map", "logp_fwe_map", "thresholded_map", "cluster_table"):
        for rel in results[column]:
            assert (study["out"] / rel).is_file(), rel
            stem = (study["out"] / rel).name.split(".")[0]
            assert (study["out"] / rel).with_name(stem + ".json").is_file()
    baseline = pd.read_csv(study["out"] / "group" / "baseline_results.tsv", sep="\t", keep_default_na=False)
    assert len(baseline) == 3 and set(baseline["session_contrast"]) == {"baseline"}
    assert set(baseline["n_per_group"]) == {"placebo=6;ketamine=6;lamotrigine_ketamine=6"}
    assert all("ses-baseline_" in Path(p).name for p in baseline["stat_map"])
    # pybids with fcflow's configuration finds each test's maps by entity (issue 19)
    from fcflow.derivatives import bids_label, bids_layout

    layout = bids_layout(study["out"])
    row = results.query("session_contrast == 'infusion - baseline' and group_contrast == 'ketamine - placebo'").iloc[0]
    contrast = Path(row["stat_map"]).name.split("_contrast-")[1].split("_")[0]
    from bids.layout import Query

    found = layout.get(session="infusionMinusBaseline", task="rest", seed="pgACC", contrast=contrast, stat="t",
                       desc="correlation", suffix="statmap", extension=".nii.gz", return_type="filename")
    # the t map and the primary inference's thresholded t map (alpha, inference)
    assert sorted(found) == sorted(str(study["out"] / row[c]) for c in ("stat_map", "thresholded_map"))
    unthresholded = layout.get(contrast=contrast, session="infusionMinusBaseline", stat="t", alpha=Query.NONE,
                               suffix="statmap", extension=".nii.gz", return_type="filename")
    assert unthresholded == [str(study["out"] / row["stat_map"])]
    primary = layout.get(contrast=contrast, session="infusionMinusBaseline", stat="logpFWE",
                         inference=bids_label(row["primary_inference"]), suffix="statmap", extension=".nii.gz", return_type="filename")
    assert primary == [str(study["out"] / row["logp_fwe_map"])]
    assert Path(row["stat_map"]).parent == Path("group/task-rest/desc-correlation")


def test_second_run_gives_identical_bytes(study, tmp_path):
    # a rerun in place reuses its resume records, so it would match whatever was computed; the
    # same first level copied elsewhere is computed again from nothing and must give the same bytes
    import shutil

    def outputs(group: Path) -> dict[str, str]:  # the group level's own files (not the report's figures)
        return {k: v for k, v in _hashes(group).items() if not k.startswith("figures/")}

    before = outputs(study["out"] / "group")
    assert len(before) > 50
    fresh = tmp_path / "out"
    shutil.copytree(study["out"], fresh, ignore=lambda folder, names: ["group"] if Path(folder) == study["out"]
                    else [])
    assert not (fresh / "group").exists()
    run_group_level(fresh, _recipe(), bids_dir=study["bids"], command=["fcflow", "test"])
    assert outputs(fresh / "group") == before
    # and in place: every test reused, nothing rewritten
    run_group_level(study["out"], _recipe(), bids_dir=study["bids"], command=["fcflow", "test"])
    assert outputs(study["out"] / "group") == before


def test_parametric_only_and_cluster_extent(tmp_path):
    truth = write_first_level(tmp_path, seed=1)
    recipe = _recipe(primary="bonferroni", methods=["bonferroni", "fdr", "cluster_extent"], covariates=[],
                     min_cluster_voxels=3)
    results = pd.read_csv(run_group_level(truth["out"], recipe, bids_dir=truth["bids"]), sep="\t")
    row = results.query("session_contrast == 'infusion - baseline' and "
                        "group_contrast == 'ketamine - placebo'").iloc[0]
    assert "inference-bonferroni" in row["logp_fwe_map"]
    z = np.asarray(nib.load(truth["out"] / row["z_map"]).dataobj)
    logp = np.asarray(nib.load(truth["out"] / row["logp_fwe_map"]).dataobj)
    mask = np.logical_and.reduce(list(truth["brain"].values()))
    # nilearn's bonferroni: |z| > isf(alpha / 2 / n_voxels)
    from scipy.stats import norm

    expected = np.abs(z[mask]) > norm.isf(0.05 / 2 / mask.sum())
    assert np.array_equal(logp[mask] > -math.log10(0.05), expected)
    assert expected.any()


def test_fdr_logq_matches_benjamini_hochberg():
    from statsmodels.stats.multitest import multipletests

    p = np.random.default_rng(0).uniform(size=500) ** 3
    q = multipletests(p, method="fdr_bh")[1]
    np.testing.assert_allclose(10 ** -fdr_logq(-np.log10(p)), q, rtol=1e-10)


def test_missing_covariate_column_is_an_error(study):
    people = study["participants"].assign(participant=lambda t: t["participant_id"].str[4:]).set_index("participant")
    with pytest.raises(InputDataError, match="Covariate 'weight' of the recipe's .* must be 'mean_fd' or a column"):
        build_covariates(people, ["01", "02"], ["weight"])
    with pytest.raises(InputDataError, match=r"Covariate 'mean_fd' must have a value for every subject.*sub-02"):
        build_covariates(people, ["01", "02"], ["mean_fd"], {"01": 0.1})


def test_maps_on_different_grids_are_an_error(tmp_path):
    truth = write_first_level(tmp_path)
    odd = next(truth["out"].glob("sub-18/ses-24h/func/*stat-z_desc-correlation_statmap.nii.gz"))
    nib.Nifti1Image(np.ones((5, 5, 5), np.float32), AFFINE).to_filename(odd)
    measure = MeasureMap("rest", "correlation", "pgACC", "correlation", "z")
    runs = collect_first_level(truth["out"], measure, space="MNI152NLin2009cAsym")
    with pytest.raises(InputDataError, match=r"sub-18_ses-24h.* is on grid \(5, 5, 5\).*must share one grid"):
        load_session_maps(truth["out"], runs, SESSIONS)


def test_julich_lookup_names_areas(julich_dir):
    lookup = julich_area_lookup(julich_dir)
    assert lookup(np.array([-38.0, 8.0, 0.0])).startswith("left Area Id")
    assert lookup(np.array([4.0, 40.0, 10.0])) == "right Area p24ab (pACC)"
    assert lookup(np.array([0.0, 0.0, 120.0])) == "unlabelled"


def test_cli_refuses_bad_permutation_count(tmp_path, capsys):
    from fcflow.cli import main

    with pytest.raises(SystemExit):
        main([str(tmp_path), str(tmp_path / "out"), "group", "--n-permutations", "0"])
    assert "'--n-permutations' must be a positive integer. Got '0'." in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_simulated_study(tmp_path, julich_dir):
    from fcflow.cli import main
    from fcflow.simulate import simulate_study

    bids = tmp_path / "study"
    simulate_study(bids, n_per_group=3, resolution_mm=4, n_volumes=240, seed=4, preset="weigner2025")
    out = bids / "derivatives" / "fcflow"
    assert main([str(bids), str(out), "participant", "--julich-dir", str(julich_dir), "-q"]) == 0
    assert main([str(bids), str(out), "group", "--julich-dir", str(julich_dir), "--n-permutations", "20",
                 "-q"]) == 0
    recipe = load_recipe("weigner2025_pgacc")
    results = pd.read_csv(out / "group" / "results.tsv", sep="\t", keep_default_na=False)
    n_measures = sum(len(t.measures) for t in recipe.tasks)
    n_tests = len(recipe.group_contrasts) + len(recipe.f_tests)
    # each session contrast's tests, then the repeated-measures interaction and session main
    # effect, and the group main effect on the mean over the sessions
    assert len(results) == n_measures * (len(recipe.session_contrasts) * n_tests + 2 + 1)
    sessions = ", ".join(recipe.sessions)
    analyses = [s.expression for s in recipe.session_contrasts] + [f"group x session ({sessions})",
                                                                   f"mean of {sessions}"]
    expected = {(t.name, m, a) for t in recipe.tasks for m in t.measures for a in analyses}
    assert set(zip(results["task"], results["measure"], results["session_contrast"])) == expected
    assert set(results["group_contrast"]) == ({c.expression for c in recipe.group_contrasts}
                                              | {"groups", "groupBySession", "session", "group"})
    for rel in results["stat_map"].tolist() + results["logp_fwe_map"].tolist() + results["cluster_table"].tolist():
        assert (out / rel).is_file()
    assert (results["n_significant_clusters"].astype(int) >= 0).all()
    sidecar = json.loads((out / results.loc[0, "stat_map"]).with_suffix("").with_suffix(".json").read_text())
    assert sidecar["Inference"]["n_permutations"] == 20


def test_group_without_subjects_is_skipped_with_a_warning(tmp_path, caplog):
    truth = write_first_level(tmp_path)
    for sub in range(N_PER_GROUP + 1, 2 * N_PER_GROUP + 1):  # the ketamine subjects
        for f in truth["out"].glob(f"sub-{sub:02d}/ses-infusion/func/*statmap.nii.gz"):
            f.unlink()
    with caplog.at_level("WARNING", logger="fcflow.group"):
        results = pd.read_csv(run_group_level(truth["out"], _recipe(covariates=[]), bids_dir=truth["bids"]),
                              sep="\t", keep_default_na=False)
    assert "are included in the QC tables but have no map" in caplog.text
    assert "skipped: no subject in ['ketamine']" in caplog.text
    skipped = results[results["session_contrast"] == "infusion - baseline"]
    assert set(skipped["n_per_group"]) == {"placebo=6;ketamine=0;lamotrigine_ketamine=6"}
    assert set(skipped["stat_map"]) == {"n/a"}
    assert set(skipped["skip_reason"]) == {"no subject in ['ketamine']"}
    # the repeated-measures model lacks the ketamine x infusion cell: its contrasts are not estimable
    repeated = results[results["session_contrast"].str.startswith("group x session")]
    assert len(repeated) == 2 and all("ketamine:infusion" in r for r in repeated["skip_reason"])
    from fcflow.reports.group import write_group_report

    html = write_group_report(truth["out"], _recipe(covariates=[]), bids_dir=truth["bids"]).read_text()
    # the three infusion - baseline tests and the group main effect (the mean needs every session)
    assert (results["skip_reason"] == "no subject in ['ketamine']").sum() == len(skipped) + 1
    assert html.count("Not tested: no subject in [&#39;ketamine&#39;]") == len(skipped) + 1
    later = results[results["session_contrast"] == "24h - baseline"]
    assert all((truth["out"] / p).is_file() for p in later["stat_map"])


def test_variance_groups_none_gives_ols_t_and_a_collinear_covariate_is_flagged(tmp_path, caplog):
    import statsmodels.api as sm

    truth = write_first_level(tmp_path, seed=2)
    people = pd.read_csv(truth["bids"] / "participants.tsv", sep="\t")
    # a covariate that is the ketamine group in disguise (r ~ 0.99)
    noise = np.random.default_rng(0).normal(0, 0.05, len(people))
    people["dose"] = (people["group"] == "ketamine").astype(float) + noise
    people.to_csv(truth["bids"] / "participants.tsv", sep="\t", index=False)
    recipe = _recipe(primary="maxt", methods=["maxt", "fdr"], covariates=["dose"], variance_groups="none",
                     fdr_p="permutation", n_permutations=100)
    with caplog.at_level("WARNING", logger="fcflow.group"):
        results = pd.read_csv(run_group_level(truth["out"], recipe, bids_dir=truth["bids"]), sep="\t",
                              keep_default_na=False)
    assert "covariate 'dose' has a variance inflation factor of" in caplog.text
    row = results.query("session_contrast == 'infusion - baseline' and "
                        "group_contrast == 'ketamine - placebo'").iloc[0]
    assert row["statistic"] == "t" and row["variance_groups"] == "none"
    assert "'dose' has a variance inflation factor" in row["design_warnings"]
    sidecar = json.loads((truth["out"] / row["stat_map"].replace(".nii.gz", ".json")).read_text())
    diagnostics = sidecar["DesignDiagnostics"]
    assert diagnostics["VarianceInflationFactor"]["dose"] > 5 and diagnostics["MaxVIF"] == 5.0
    assert diagnostics["CorrelationWithGroups"]["dose"]["ketamine"] > 0.9
    fdr_sidecar = json.loads((truth["out"] / row["logp_fwe_map"].replace("inference-maxt", "inference-fdr")
                              .replace("logpFWE", "logpFDR").replace(".nii.gz", ".json")).read_text())
    assert "permutation p" in fdr_sidecar["Description"]
    # one common variance: the map is statsmodels OLS's t
    t_map = np.asarray(nib.load(truth["out"] / row["stat_map"]).dataobj)
    subjects = [f"{i:02d}" for i in range(1, 19) if f"{i:02d}" != "09"]
    frame = people.set_index("participant_id").loc[[f"sub-{s}" for s in subjects]]
    exog = np.column_stack([(frame["group"] == g).to_numpy(float) for g in GROUPS]
                           + [frame["dose"] - frame["dose"].mean()])
    mask = np.logical_and.reduce(list(truth["brain"].values()))
    for ijk in map(tuple, np.argwhere(mask)[::37]):
        y = np.array([truth["maps"][(s, "infusion")][ijk] - truth["maps"][(s, "baseline")][ijk] for s in subjects])
        expected = float(sm.OLS(y.astype(float), exog).fit().t_test([-1, 1, 0, 0]).tvalue.squeeze())
        assert abs(t_map[ijk] - expected) < 1e-4, (ijk, t_map[ijk], expected)


def test_fdr_on_permutation_p_needs_a_permutation_method():
    from fcflow.group.inference import GroupTest, run_inference

    design = pd.DataFrame({"a": [1.0, 1, 0, 0], "b": [0.0, 0, 1, 1]})
    test = GroupTest("d", "a - b", "t", np.array([[1.0, -1.0]]))
    with pytest.raises(ValueError, match="'fdr_p' = 'permutation' needs a permutation method"):
        run_inference(np.zeros((4, 3)), design, test, np.ones((3, 1, 1), bool), methods=["fdr"],
                      n_permutations=10, two_sided=True, random_seed=0, cluster_forming_p=0.01,
                      fdr_p="permutation")


def test_family_wise_maps_beside_per_test_maps(study):
    results = study["results"]
    change = results[results["session_contrast"] == "infusion - baseline"]
    assert len(change) == 3 and (change["logp_family_map"] != "").all()
    for row in change.itertuples():
        family = np.asarray(nib.load(study["out"] / row.logp_family_map).dataobj)
        own = np.asarray(nib.load(study["out"] / row.logp_fwe_map).dataobj)
        # a family of three tests can only raise each p (float32 maps: compare with a tolerance)
        assert np.all(family <= own + 1e-5)
        assert float(row.min_p_family) >= float(row.min_p) - 1e-12
        sidecar = json.loads((study["out"] / row.logp_family_map.replace(".nii.gz", ".json")).read_text())
        assert sidecar["Family"] == ["ketamineMinusPlacebo", "lamotrigineKetamineMinusPlacebo", "groups"]
    # the planted ketamine effect survives the family-wise correction
    hit = change[change["group_contrast"] == "ketamine - placebo"].iloc[0]
    assert float(hit["min_p_family"]) <= 0.05


def test_a_group_of_one_falls_back_to_one_common_variance(caplog):
    from fcflow.group.inference import variance_group_labels

    groups = pd.Series(["placebo"] * 4 + ["ketamine"] + ["lamotrigine_ketamine"] * 3)
    with caplog.at_level("WARNING", logger="fcflow.group"):
        labels, note = variance_group_labels("auto", groups, "task-rest")
    assert labels is None and "group(s) ['ketamine'] have fewer than 2 subjects" in note
    assert "fell back to one common variance" in caplog.text
    labels, note = variance_group_labels("auto", groups.replace("ketamine", "placebo"), "task-rest")
    assert labels == list(groups.replace("ketamine", "placebo")) and note == ""
    assert variance_group_labels("none", groups, "task-rest") == (None, "")


def test_report_summary_gives_cluster_one_its_own_peak(study):
    # issue 19: the summary printed the map's most extreme statistic (anywhere, any p) as the
    # peak beside cluster 1's coordinates; the row now shows cluster 1's own peak statistic
    import re

    from fcflow.reports.group import write_group_report
    from fcflow.reports.render import _number

    html = write_group_report(study["out"], _recipe(), bids_dir=study["bids"]).read_text()
    row = study["results"].query("session_contrast == 'infusion - baseline' and "
                                 "group_contrast == 'ketamine - placebo'").iloc[0]
    table = pd.read_csv(study["out"] / row["cluster_table"], sep="\t")
    rows = [r for r in html.split("<tr>") if "infusion - baseline" in r and "<td>ketamine - placebo</td>" in r]
    cells = re.findall(r'<td class="num">([^<]*)</td>', rows[0])
    # clusters, min p, min p (all tests), cluster 1 peak stat, most extreme stat in the map
    assert cells[3] == _number(table.loc[0, "peak_stat"])
    assert cells[4] == _number(row["peak_stat"])
    assert "most extreme stat in the map (any p)" in html
    # the test's own section prints the same cluster 1 peak, which is the thresholded map's value at
    # the table's peak coordinate (read from the map, not from the table)
    section = html.split(f'data-stat-map="{row["stat_map"]}"')[1].split("</section>")[0]
    assert re.search(r'class="cluster-peak">([^<]*)<', section).group(1) == _number(table.loc[0, "peak_stat"])
    img = nib.load(study["out"] / row["thresholded_map"])
    ijk = np.rint(np.linalg.inv(img.affine) @ [*table.loc[0, ["peak_x", "peak_y", "peak_z"]], 1.0])[:3].astype(int)
    assert float(np.asarray(img.dataobj)[tuple(ijk)]) == pytest.approx(float(table.loc[0, "peak_stat"]), rel=1e-4)
    assert re.search(r'class="map-peak">([^<]*)<', section).group(1) == _number(row["peak_stat"])


def test_permutation_count_is_checked_and_the_effective_one_recorded(tmp_path):
    # issue 17: --n-permutations 1 gave p = 1 everywhere, 10**9 tried to allocate 22 GiB, and the
    # recipe's value (not the one that ran) was recorded
    from fcflow.errors import RecipeError

    truth = write_first_level(tmp_path)
    with pytest.raises(RecipeError, match=r"'--n-permutations' must be an integer of at least 20: the smallest "
                                          r"permutation p is 1 / n_permutations, and alpha is 0.05. Got 1"):
        run_group_level(truth["out"], _recipe(), bids_dir=truth["bids"], n_permutations=1)
    with pytest.raises(InputDataError, match=r"n_permutations = 1000000000 needs about \d+\.\d GiB .* use at most "
                                             r"[1-9]\d*") as refused:
        run_group_level(truth["out"], _recipe(), bids_dir=truth["bids"], n_permutations=10**9)
    # the count it suggests fits (and is not far below what would)
    import os
    import re

    from fcflow.permutation import permutation_memory_bytes

    fits = int(re.search(r"use at most (\d+)", str(refused.value)).group(1))
    half = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    n_rows = len(truth["participants"]) * 2
    assert permutation_memory_bytes(fits, n_rows, 2, 3) <= half < permutation_memory_bytes(2 * fits, n_rows, 2, 3)
    assert not (truth["out"] / "group").exists()  # refused before anything was written
    run_group_level(truth["out"], _recipe(methods=["maxt"], primary="maxt", covariates=[]), bids_dir=truth["bids"],
                    n_permutations=40)
    config = json.loads((truth["out"] / "group" / "desc-recipe_config.json").read_text())
    assert config["Recipe"]["inference"]["n_permutations"] == 40
    sidecar = next((truth["out"] / "group").rglob("ses-infusionMinusBaseline_*_stat-t_desc-correlation_statmap.json"))
    assert json.loads(sidecar.read_text())["Inference"]["n_permutations"] == 40


def _stamp_provenance(out: Path, recipe, change=None) -> None:
    """Give every first-level map a sidecar like the participant level's (recipe, software, smoothing)."""
    for sidecar in out.glob("sub-*/ses-*/func/*_statmap.json"):
        recipe_dict = json.loads(json.dumps(recipe.to_dict(), default=list))
        if change is not None:
            change(sidecar.name, recipe_dict)
        sidecar.write_text(json.dumps({"Recipe": recipe_dict, "Software": {"fcflow": "0.1.0"},
                                       "SmoothingFWHM": None}))


def test_maps_made_with_different_recipes_are_refused(tmp_path, caplog):
    # issue 17: one subject rerun with another strategy was mixed into the group without a word
    truth = write_first_level(tmp_path)

    def other_strategy(name, recipe):
        if name.startswith("sub-05_ses-infusion"):
            recipe["denoising"]["strategy"] = "24P"

    _stamp_provenance(truth["out"], _recipe(), other_strategy)
    with pytest.raises(InputDataError, match=r"sub-05_ses-infusion.* and .* were made with different analysis "
                                             r"settings \(denoising\.strategy '24P\+aCompCor' vs '24P'\)"):
        run_group_level(truth["out"], _recipe(), bids_dir=truth["bids"])
    # one recipe for every map, but not the group level's: a warning names the difference
    _stamp_provenance(truth["out"], _recipe(), lambda name, recipe: recipe["denoising"].update(strategy="36P"))
    with caplog.at_level("WARNING", logger="fcflow.group"):
        run_group_level(truth["out"], _recipe(methods=["maxt"], primary="maxt", covariates=[]),
                        bids_dir=truth["bids"], n_permutations=20)
    assert "first-level maps were made with settings the group level's recipe does not have " \
           "(denoising.strategy '36P' vs '24P+aCompCor')" in caplog.text


def test_rerun_with_fewer_tests_sets_the_earlier_outputs_apart(tmp_path, caplog):
    # issue 17: a rerun with fewer contrasts left the old contrasts' files in group/
    truth = write_first_level(tmp_path)
    recipe = _recipe(methods=["maxt"], primary="maxt", covariates=[])
    run_group_level(truth["out"], recipe, bids_dir=truth["bids"], n_permutations=20)
    group = truth["out"] / "group"
    def outputs() -> set[str]:
        return {str(p.relative_to(group)) for p in group.rglob("*")
                if p.is_file() and not p.relative_to(group).parts[0].startswith(".")}

    before = outputs()
    # the tests' outputs sit in one folder per task and measure (issue 19)
    assert {str(Path(p).parent) for p in before if "/" in p} == {"task-rest/desc-correlation"}
    fewer = recipe.replace(group_contrasts=recipe.group_contrasts[:1], f_tests=())
    with caplog.at_level("WARNING", logger="fcflow.group"):
        run_group_level(truth["out"], fewer, bids_dir=truth["bids"], n_permutations=20)
    after = outputs()
    assert after < before and not any("lamotrigineKetamineMinusPlacebo" in n for n in after)
    (stale,) = (group / ".fcflow-stale").iterdir()
    manifest = json.loads((stale / "manifest.json").read_text())
    assert set(manifest["Files"]) >= {n for n in before - after}
    assert all((stale / f).is_file() for f in manifest["Files"])
    assert "moved to" in caplog.text
    # every file left belongs to this run: results.tsv names them
    results = pd.read_csv(group / "results.tsv", sep="\t", keep_default_na=False)
    assert set(results["group_contrast"]) == {"ketamine - placebo", "groupBySession", "session", "group"}
