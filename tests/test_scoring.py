"""Scoring a group result against a simulated study's planted truth (fcflow.simulate.scoring)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pandas as pd

from fcflow.simulate.scoring import expected_regions, score_group_results

SHAPE = (20, 20, 20)
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])

EFFECTS = pd.DataFrame([
    # name, kind, task, measure, target, group, session
    ("insula_bg", "background", "rest", "correlation", "leftInsula", "all", "all"),
    ("insula", "effect", "rest", "correlation", "leftInsula", "ketamine", "infusion"),
    ("dmpfc", "effect", "nback", "ppi", "dmPFC", "ketamine", "infusion"),
], columns=["name", "kind", "task", "measure", "target", "group", "session"])


def _sphere(centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.indices(SHAPE)
    return sum((grid[a] - centre[a]) ** 2 for a in range(3)) <= radius**2


def _study(tmp_path, significant: dict[tuple[str, str, str], np.ndarray]):
    """A ground-truth folder and a group/results.tsv whose logp maps mark ``significant``."""
    truth = tmp_path / "bids" / "derivatives" / "ground_truth"
    truth.mkdir(parents=True)
    EFFECTS.to_csv(truth / "effects.tsv", sep="\t", index=False)
    regions = {"leftInsula": _sphere((5, 10, 10), 2.5), "dmPFC": _sphere((14, 10, 10), 2.5)}
    for label, mask in regions.items():
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE),
                 truth / f"space-MNI152NLin2009cAsym_res-4_desc-{label}_mask.nii.gz")
    out = tmp_path / "out"
    (out / "group").mkdir(parents=True)
    rows = []
    for (task, measure, contrast), voxels in significant.items():
        logp = np.where(voxels, 3.0, 0.5).astype(np.float32)
        name = f"group/{task}_{measure}_{contrast.replace(' ', '')}_logp.nii.gz"
        nib.save(nib.Nifti1Image(logp, AFFINE), out / name)
        rows.append({"task": task, "measure": measure, "session_contrast": "infusion - baseline",
                     "group_contrast": contrast, "stat_type": "t", "logp_fwe_map": name})
    pd.DataFrame(rows).to_csv(out / "group" / "results.tsv", sep="\t", index=False)
    return out, truth, regions


def test_expected_regions_follow_task_measure_session_and_group():
    both = {"baseline": -1.0, "infusion": 1.0}
    assert expected_regions(EFFECTS, task="rest", measure="correlation", session_weights=both,
                            group_weights={"ketamine": 1.0, "placebo": -1.0}) == ["leftInsula"]
    # lamotrigine - placebo does not weight the ketamine group: nothing is expected
    assert expected_regions(EFFECTS, task="rest", measure="correlation", session_weights=both,
                            group_weights={"lamotrigine_ketamine": 1.0, "placebo": -1.0}) == []
    # 24h - baseline does not weight the infusion
    assert expected_regions(EFFECTS, task="rest", measure="correlation",
                            session_weights={"baseline": -1.0, "24h": 1.0},
                            group_weights={"ketamine": 1.0, "placebo": -1.0}) == []
    # a PPI effect also changes background FC, not the rest correlation
    for measure in ("gppi", "background"):
        assert expected_regions(EFFECTS, task="nback", measure=measure, session_weights=both,
                                group_weights={"ketamine": 1.0}) == ["dmPFC"]


def test_hits_misses_and_false_positives(tmp_path):
    empty = np.zeros(SHAPE, dtype=bool)
    insula = _sphere((5, 10, 10), 2.5)
    near = np.zeros(SHAPE, dtype=bool)
    near[5, 10, 13] = True  # one voxel (4 mm) beyond the sphere
    far = np.zeros(SHAPE, dtype=bool)
    far[5, 10, 17] = True
    out, truth, regions = _study(tmp_path, {
        ("rest", "correlation", "ketamine - placebo"): insula | near,
        ("rest", "correlation", "lamotrigine_ketamine - placebo"): empty,
        ("rest", "correlation", "ketamine - lamotrigine_ketamine"): insula | far,
        ("nback", "gppi", "ketamine - placebo"): empty,
        ("nback", "gppi", "lamotrigine_ketamine - placebo"): far,
    })
    scores = score_group_results(out, truth, max_distance_mm=6.0).set_index(["task", "group_contrast"])
    hit = scores.loc[("rest", "ketamine - placebo")]
    assert hit["verdict"] == "hit" and hit["found_regions"] == "leftInsula"
    assert hit["n_significant_voxels"] == insula.sum() + 1
    # independent distance of the near voxel to the sphere, in mm
    inside = np.argwhere(regions["leftInsula"])
    assert math.isclose(hit["max_distance_mm"], 4.0 * np.min(np.linalg.norm(inside - [5, 10, 13], axis=1)))
    assert scores.loc[("rest", "lamotrigine_ketamine - placebo"), "verdict"] == "clean"
    fp = scores.loc[("rest", "ketamine - lamotrigine_ketamine")]
    assert fp["verdict"] == "false positive" and fp["n_voxels_far"] == 1
    assert scores.loc[("nback", "ketamine - placebo"), "verdict"] == "miss"
    assert scores.loc[("nback", "ketamine - placebo"), "missed_regions"] == "dmPFC"
    assert scores.loc[("nback", "lamotrigine_ketamine - placebo"), "verdict"] == "false positive"
