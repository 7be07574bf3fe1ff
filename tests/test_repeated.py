"""Repeated-measures group x session tests (fcflow.repeated) and their place in the group level."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fcflow.group.inference import GroupTest, run_inference
from fcflow.group.run import run_group_level
from fcflow.permutation import permutation_test
from fcflow.repeated import (
    build_repeated_measures,
    cell_name,
    permutation_scheme,
    repeated_measures_contrasts,
    repeated_measures_design,
    whole_block_permutations,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_grouplevel import GROUPS, SESSIONS, _blob, _recipe, write_first_level  # noqa: E402


def _toy(rng, n_per_group=(4, 3, 4), n_voxels=30, missing=((1, 2), (5, 1), (9, 0))):
    """(sessions, subjects, voxels) data, presence with the given (subject, session) pairs absent."""
    n = sum(n_per_group)
    data = rng.normal(size=(3, n, n_voxels)).astype(np.float32)
    present = np.ones((3, n), dtype=bool)
    for subject, session in missing:
        present[session, subject] = False
    labels = [f"{i:02d}" for i in range(n)]
    group_of = dict(zip(labels, np.repeat(GROUPS, n_per_group)))
    return data, present, labels, group_of


def test_differences_from_the_reference_keep_what_each_subject_has():
    data, present, labels, group_of = _toy(np.random.default_rng(0))
    rm = build_repeated_measures(data, present, labels, SESSIONS, "baseline", group_of)
    # subject 09 lacks the baseline: no difference, dropped with the reason
    assert "09" not in rm.subjects and "baseline" in rm.dropped["09"]
    # subject 01 lacks 24h, 05 lacks infusion: kept with one row each; everyone else two rows
    assert rm.row_session[list(rm.row_subject).index(rm.subjects.index("01"))] == "infusion"
    assert sum(rm.row_subject == rm.subjects.index("01")) == 1
    assert sum(rm.row_subject == rm.subjects.index("05")) == 1
    assert len(rm.data) == 2 * 10 - 2
    for row, (i, session) in enumerate(zip(rm.row_subject, rm.row_session)):
        j = labels.index(rm.subjects[i])
        expected = data[SESSIONS.index(session), j] - data[0, j]
        np.testing.assert_allclose(rm.data[row], expected, rtol=0, atol=1e-6)
        assert rm.row_group[row] == group_of[rm.subjects[i]]
    # the two one-row subjects have different sessions: different exchangeability patterns
    patterns = rm.patterns()
    assert patterns[rm.subjects.index("01")] != patterns[rm.subjects.index("05")]
    assert len(set(patterns)) == 3


def test_whole_block_shuffles_move_subjects_with_all_their_rows_among_alike_subjects():
    data, present, labels, group_of = _toy(np.random.default_rng(1))
    rm = build_repeated_measures(data, present, labels, SESSIONS, "baseline", group_of)
    patterns = rm.patterns()
    shuffles = whole_block_permutations(rm.row_subject, rm.row_session, 200, scheme="permute", patterns=patterns,
                                        random_seed=0)
    assert shuffles.shape == (199, len(rm.data))
    moved = 0
    for row in shuffles:
        assert sorted(row) == list(range(len(rm.data)))
        target = {}
        for r, source in enumerate(row):
            # a row keeps its session and takes one subject's row, the same subject for all its rows
            assert rm.row_session[source] == rm.row_session[r]
            target.setdefault(rm.row_subject[r], set()).add(rm.row_subject[source])
        assert all(len(v) == 1 for v in target.values())
        for i, (j,) in target.items():
            assert patterns[i] == patterns[j]
            moved += i != j
    assert moved > 0
    flips = whole_block_permutations(rm.row_subject, rm.row_session, 50, scheme="sign_flip", random_seed=0)
    for row in flips:
        for i in range(len(rm.subjects)):
            assert len(set(row[rm.row_subject == i])) == 1
    assert np.any(flips == -1) and np.any(flips == 1)


def test_subjects_of_different_sessions_cannot_share_a_pattern():
    data, present, labels, group_of = _toy(np.random.default_rng(2))
    rm = build_repeated_measures(data, present, labels, SESSIONS, "baseline", group_of)
    with pytest.raises(ValueError, match="same sessions"):
        whole_block_permutations(rm.row_subject, rm.row_session, 10, scheme="permute", patterns=None)


def test_contrasts_are_the_interaction_and_the_mean_change():
    columns = [cell_name(g, s) for g in GROUPS for s in SESSIONS[1:]] + ["age"]
    matrices = repeated_measures_contrasts(GROUPS, SESSIONS, "baseline", columns)
    inter, main = matrices["groupBySession"], matrices["session"]
    assert inter.shape == (4, 7) and main.shape == (2, 7)
    assert np.all(inter[:, -1] == 0) and np.all(main[:, -1] == 0)
    # the interaction is zero on any cell means where the groups' changes agree (session effect only)
    same_change = np.array([0.3, -0.2] * 3 + [0.0])
    np.testing.assert_allclose(inter @ same_change, 0, atol=1e-12)
    assert np.linalg.matrix_rank(inter) == 4
    np.testing.assert_allclose(main @ same_change, [0.3, -0.2])
    assert permutation_scheme("session", False) == "sign_flip"
    assert permutation_scheme("groupBySession", False) == "permute"
    assert permutation_scheme("groupBySession", True) == "sign_flip"


def test_whole_block_null_equals_brute_force_freedman_lane():
    # the engine with explicit whole-subject shuffles against a plain refit of every shuffled model
    rng = np.random.default_rng(3)
    data, present, labels, group_of = _toy(rng, n_per_group=(5, 4, 5), n_voxels=40, missing=((2, 2), (7, 2)))
    rm = build_repeated_measures(data, present, labels, SESSIONS, "baseline", group_of)
    design = repeated_measures_design(rm, GROUPS, SESSIONS, "baseline")
    contrast = repeated_measures_contrasts(GROUPS, SESSIONS, "baseline", design.columns)["groupBySession"]
    shuffles = whole_block_permutations(rm.row_subject, rm.row_session, 60, scheme="permute",
                                        patterns=rm.patterns(), random_seed=1)
    result = permutation_test(rm.data, design, contrast, permutations=shuffles, scheme="permute",
                              inference=("maxt",), precision="float64")
    m = design.to_numpy(dtype=float)
    y = rm.data.astype(float)
    # nuisance: the part of the design the contrast does not test (here the mean change per session)
    _, s, vt = np.linalg.svd(contrast)
    z = m @ vt[np.sum(s > 1e-10):].T
    residual = y - z @ np.linalg.lstsq(z, y, rcond=None)[0]

    def f_stat(model, values):
        beta = np.linalg.lstsq(model, values, rcond=None)[0]
        rss = ((values - model @ beta) ** 2).sum(0)
        dof = len(values) - np.linalg.matrix_rank(model)
        cb = contrast @ beta
        middle = np.linalg.inv(contrast @ np.linalg.pinv(model.T @ model) @ contrast.T)
        return np.einsum("iv,ij,jv->v", cb, middle, cb) / len(contrast) / (rss / dof)

    observed = f_stat(m, y)
    np.testing.assert_allclose(result.stat, observed, rtol=1e-8)
    null = np.array([f_stat(m, y)] + [f_stat(m[row], residual) for row in shuffles]).max(axis=1)
    expected = (null[None, :] >= observed[:, None] * (1 - 1e-9)).mean(axis=1)
    np.testing.assert_allclose(10 ** -result.logp_fwe["maxt"], expected, rtol=1e-9)


# ----------------------------------------------------------------------------------------------
# In the group level (the synthetic study of test_grouplevel: ketamine's blob at infusion only,
# sub-01 without 24h, sub-09's infusion run excluded)
@pytest.fixture(scope="module")
def ols_study(tmp_path_factory):
    truth = write_first_level(tmp_path_factory.mktemp("repeated"))
    results = run_group_level(truth["out"], _recipe(variance_groups="none", covariates=["age", "mean_fd"]),
                              bids_dir=truth["bids"], command=["fcflow", "test"])
    truth["results"] = pd.read_csv(results, sep="\t", keep_default_na=False)
    return truth


def test_group_level_adds_the_interaction_session_and_group_main_effects(ols_study):
    results = ols_study["results"]
    rows = results[results["session_contrast"].str.startswith("group x session")]
    assert list(rows["group_contrast"]) == ["groupBySession", "session"]
    assert set(rows["stat_type"]) == {"F"}
    # every subject has a baseline: 18 kept, sub-01 (no 24h) and sub-09 (infusion excluded) with one row
    assert set(rows["n_per_group"]) == {"placebo=6;ketamine=6;lamotrigine_ketamine=6"}
    assert set(rows["dof"]) == {2 * 18 - 2 - 6 - 2}  # rows - cells - covariates
    mean = results[results["session_contrast"].str.startswith("mean of")]
    assert list(mean["group_contrast"]) == ["group"]
    # the group main effect needs every session: sub-01 and sub-09 are left out
    assert set(mean["n_per_group"]) == {"placebo=5;ketamine=5;lamotrigine_ketamine=6"}
    sidecar = json.loads((ols_study["out"] / rows.iloc[0]["stat_map"].replace(".nii.gz", ".json")).read_text())
    assert sidecar["SessionContrast"]["kind"] == "repeated"
    assert "exchangeability" in sidecar["SessionContrast"]["model"]
    assert len(sidecar["DesignMatrix"]["participant_id"]) == 34


def test_interaction_f_equals_statsmodels_and_finds_the_planted_blob(ols_study):
    import statsmodels.api as sm

    out, maps = ols_study["out"], ols_study["maps"]
    row = ols_study["results"].query("group_contrast == 'groupBySession'").iloc[0]
    f_map = np.asarray(nib.load(out / row["stat_map"]).dataobj)
    participants = ols_study["participants"].set_index("participant_id")
    qc = pd.concat(pd.read_csv(p, sep="\t") for p in sorted(out.glob("sub-*/sub-*_desc-runs_qc.tsv")))
    qc = qc[~qc["excluded"].astype(bool)].set_index(["participant_id", "session"])["mean_fd_mm"]
    records = [(f"sub-{s}", ses) for (s, ses) in sorted(maps) if ses != "baseline"
               and (s, "baseline") in maps]
    frame = pd.DataFrame(records, columns=["participant_id", "session"])
    frame["group"] = participants.loc[frame["participant_id"], "group"].to_numpy()
    frame["age"] = participants.loc[frame["participant_id"], "age"].to_numpy(dtype=float)
    frame["fd"] = [qc[(p, s)] - qc[(p, "baseline")] for p, s in records]
    cells = [f"{g}:{s}" for g in GROUPS for s in SESSIONS[1:]]
    exog = np.column_stack([((frame["group"] + ":" + frame["session"]) == c).to_numpy(float) for c in cells]
                           + [frame["age"] - frame["age"].mean(), frame["fd"] - frame["fd"].mean()])
    # interaction: the groups' changes differ at infusion or at 24h
    restriction = np.zeros((4, exog.shape[1]))
    for r, (g, s) in enumerate((g, s) for s in SESSIONS[1:] for g in GROUPS[1:]):
        restriction[r, cells.index(f"{g}:{s}")] = 1.0
        restriction[r, cells.index(f"{GROUPS[0]}:{s}")] = -1.0
    brain = f_map != 0
    voxels = np.argwhere(brain)[np.random.default_rng(0).choice(int(brain.sum()), 12, replace=False)]
    voxels = np.vstack([voxels, np.argwhere(_blob() & brain)[:3]])
    for ijk in map(tuple, voxels):
        y = np.array([maps[(p[4:], s)][ijk] - maps[(p[4:], "baseline")][ijk] for p, s in records], dtype=float)
        expected = float(np.squeeze(sm.OLS(y, exog).fit().f_test(restriction).fvalue))
        assert abs(f_map[ijk] - expected) <= 1e-4 * max(1.0, expected), (ijk, f_map[ijk], expected)
    # ketamine's change at infusion is the planted interaction
    thresholded = np.asarray(nib.load(out / row["thresholded_map"]).dataobj)
    assert row["n_significant_clusters"] >= 1
    hits = np.argwhere(thresholded != 0)
    blob = np.argwhere(_blob())
    assert min(np.linalg.norm(blob - h, axis=1).min() for h in hits) <= 1.0


def test_default_variance_groups_flip_whole_subjects_and_keep_the_family(tmp_path):
    truth = write_first_level(tmp_path, seed=1)
    results = pd.read_csv(run_group_level(truth["out"], _recipe(), bids_dir=truth["bids"]), sep="\t",
                          keep_default_na=False)
    rows = results[results["session_contrast"].str.startswith("group x session")].set_index("group_contrast")
    assert rows.loc["groupBySession", "statistic"] == "wls-F"
    # both tests flip whole subjects, so they share the permutations and are corrected as a family
    assert rows.loc["groupBySession", "logp_family_map"] and rows.loc["session", "logp_family_map"]
    sidecar = json.loads((truth["out"] / rows.loc["groupBySession", "stat_map"].replace(".nii.gz", ".json"))
                         .read_text())
    assert sidecar["Inference"]["scheme"] == "sign_flip"
    assert rows.loc["groupBySession", "n_significant_clusters"] >= 1


def test_repeated_measures_can_be_switched_off_and_needs_three_sessions(tmp_path):
    from fcflow.group.inference import session_analyses

    assert [a.kind for a in session_analyses(_recipe())] == ["contrast", "contrast", "repeated", "mean",
                                                              "reference"]
    assert [a.kind for a in session_analyses(_recipe(repeated_measures=False))] == ["contrast", "contrast",
                                                                                      "reference"]


def test_run_inference_passes_explicit_whole_block_flips():
    rng = np.random.default_rng(4)
    data, present, labels, group_of = _toy(rng, n_per_group=(4, 4, 4), n_voxels=25, missing=())
    rm = build_repeated_measures(data, present, labels, SESSIONS, "baseline", group_of)
    design = repeated_measures_design(rm, GROUPS, SESSIONS, "baseline")
    matrix = repeated_measures_contrasts(GROUPS, SESSIONS, "baseline", design.columns)["session"]
    flips = whole_block_permutations(rm.row_subject, rm.row_session, 40, scheme="sign_flip", random_seed=2)
    result = run_inference(rm.data, design, GroupTest("session", "session", "F", matrix),
                           np.ones((5, 5, 1), dtype=bool), methods=["maxt"], n_permutations=9999,
                           two_sided=False, random_seed=0, cluster_forming_p=0.01, permutations=flips,
                           scheme="sign_flip")
    assert result.settings["n_permutations"] == 40  # the rows given, not n_permutations
    assert result.settings["scheme"] == "sign_flip"
