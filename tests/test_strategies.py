"""The strategy comparison: probe points, per-run comparison and the summary over runs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fcflow.strategies import probe_points, summarise_strategies


@pytest.mark.parametrize("offset", [0.0, 2.0, 1.0])
def test_probe_points_one_voxel_per_grid_point(offset):
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = -40.0 + offset
    brain = np.ones((20, 20, 20), dtype=np.uint8)
    columns, points = probe_points(nib.Nifti1Image(brain, affine))
    assert np.all(np.mod(points, 8.0) == 0)
    assert len({tuple(p) for p in points}) == len(points)  # no grid point twice
    ijk = np.argwhere(brain > 0)[columns]
    xyz = nib.affines.apply_affine(affine, ijk)
    # each chosen voxel is the nearest to its grid point
    assert np.all(np.abs(xyz - points) <= 2.0 + 1e-9)
    # and the grid points are the same whatever the grid's offset: those inside the field of view
    assert points.min() >= -40 and points.max() <= 40


def test_summary_equals_an_independent_qcfc():
    rng = np.random.default_rng(0)
    n_runs, n_points = 12, 40
    points = np.column_stack([np.arange(n_points) * 8.0, np.zeros(n_points), np.zeros(n_points)])
    fd = rng.uniform(0.05, 0.4, n_runs)
    tables, dofs = [], []
    for run in range(n_runs):
        table = pd.DataFrame(points, columns=["x", "y", "z"])
        table["none"] = rng.normal(size=n_points) + 8.0 * fd[run]  # motion everywhere
        table["clean"] = rng.normal(size=n_points)
        # runs list their points in different orders, and one run has an extra point
        table = table.sample(frac=1.0, random_state=run)
        if run == 0:
            table.loc[len(table)] = [999.0, 0.0, 0.0, 0.0, 0.0]
        tables.append(table)
        dofs.append({"none": 50.0 + run, "clean": 15.0 + run})
    summaries, qcfc, distance = summarise_strategies(tables, fd, dofs, seed_centre_mm=np.zeros(3), min_dof=20)
    by = {s.strategy: s for s in summaries}
    assert distance.size == n_points
    values = np.array([t.set_index(["x", "y", "z"]).loc[list(map(tuple, points)), "none"].to_numpy() for t in tables])
    expected = [np.corrcoef(values[:, j], fd)[0, 1] for j in range(n_points)]
    np.testing.assert_allclose(qcfc["none"], expected, atol=1e-12)
    assert by["none"].median_abs_qcfc == pytest.approx(np.median(np.abs(expected)))
    from scipy import stats

    p_values = [stats.pearsonr(values[:, j], fd).pvalue for j in range(n_points)]
    assert by["none"].percent_qcfc_p05 == pytest.approx(100 * np.mean(np.array(p_values) < 0.05))
    assert by["none"].percent_qcfc_p05 > 50 and by["clean"].percent_qcfc_p05 < 30
    assert by["none"].median_dof == pytest.approx(np.median(50.0 + np.arange(n_runs)))
    assert by["clean"].percent_below_min_dof == pytest.approx(100 * 5 / 12)
    assert by["none"].percent_below_min_dof == 0
