"""Cluster labelling, TFCE and cluster tables, checked against nilearn's own code."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fcflow.clusters import (
    VoxelGraph,
    cluster_maxima,
    cluster_values,
    compute_tfce,
    label_clusters,
    make_cluster_table,
    tfce_thresholds,
)

SHAPE = (13, 14, 15)
AFFINE = np.array(
    [[2.0, 0, 0, -12], [0, 2.0, 0, -14], [0, 0, 2.0, -16], [0, 0, 0, 1]]
)  # 2 mm voxels


@pytest.fixture
def smooth_map():
    """A smooth two-signed field in an irregular mask, zero outside it."""
    rng = np.random.default_rng(11)
    field = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 1.2)
    field /= field.std()
    mask = np.ones(SHAPE, bool)
    mask[:2] = False
    mask[:, -3:, :4] = False
    field[~mask] = 0
    return field, mask


def _nilearn_tfce(stat, connectivity, two_sided, dh="auto"):
    from nilearn.mass_univariate._utils import calculate_tfce

    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    structure = ndimage.generate_binary_structure(3, rank)
    return calculate_tfce(stat[..., None], structure, dh=dh, two_sided_test=two_sided)[..., 0]


@pytest.mark.parametrize("two_sided", [True, False])
@pytest.mark.parametrize("connectivity", [6, 26])
def test_tfce_equals_nilearn(smooth_map, two_sided, connectivity):
    stat, mask = smooth_map
    expected = _nilearn_tfce(stat, connectivity, two_sided)
    got = compute_tfce(stat, mask=mask, two_sided=two_sided, connectivity=connectivity)
    assert np.abs(expected).max() > 100
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_tfce_equals_nilearn_with_dh_and_default_mask(smooth_map):
    stat, _ = smooth_map
    expected = _nilearn_tfce(stat, 6, True, dh=0.1)
    got = compute_tfce(stat, dh=0.1)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("case", range(12))
def test_tfce_equals_nilearn_on_random_maps(case):
    """Irregular masks with isolated voxels, rounded values (ties across and on steps), both
    signs, every connectivity and both step rules, against nilearn's per-step labelling."""
    rng = np.random.default_rng(100 + case)
    shape = tuple(int(n) for n in rng.integers(4, 12, 3))
    mask = rng.random(shape) > (0.0 if case % 4 == 0 else 0.35)
    stat = ndimage.gaussian_filter(rng.standard_normal(shape), rng.uniform(0.4, 1.5))
    stat /= stat.std()
    if case % 2:
        stat = np.round(stat * 4) / 4  # many voxels exactly on a step when max is a multiple
    if case % 3 == 2:
        stat = -stat
    stat[~mask] = 0
    connectivity = (6, 18, 26)[case % 3]
    dh = "auto" if case < 6 else 0.05
    two_sided = case % 5 != 1
    expected = _nilearn_tfce(stat, connectivity, two_sided, dh=dh)
    got = compute_tfce(stat, mask=mask, two_sided=two_sided, connectivity=connectivity, dh=dh)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


def test_tfce_of_nested_clusters_by_hand():
    # a 3-voxel line at 1 with a 2 on its middle voxel, 2 steps (dh=1, clipped to 10 steps
    # of 0.2): steps 0.2..1.0 see the 3 voxels, steps 1.2..2.0 the middle one alone
    stat = np.zeros((3, 5, 3))
    stat[1, 1:4, 1] = 1.0
    stat[1, 2, 1] = 2.0
    heights = np.linspace(0, 2, 11)[1:]
    low, high = heights[heights <= 1.0 + 1e-12], heights[heights > 1.0 + 1e-12]
    side = np.sum(3**0.5 * low**2)
    got = compute_tfce(stat, two_sided=False, dh=1.0)
    np.testing.assert_allclose(got[1, 1, 1], side)
    np.testing.assert_allclose(got[1, 2, 1], side + np.sum(high**2))


def test_tfce_of_a_single_block_by_hand():
    # one 2x2x2 block of value 2: thresholds 0.02..2 (100 steps), extent 8 at every step
    stat = np.zeros((5, 6, 7))
    stat[1:3, 2:4, 3:5] = 2.0
    heights = np.linspace(0, 2, 101)[1:]
    expected = np.sum(8**0.5 * heights**2)
    got = compute_tfce(stat, two_sided=False)
    np.testing.assert_allclose(got[1:3, 2:4, 3:5], expected)
    assert np.count_nonzero(got) == 8


def test_tfce_thresholds_match_nilearn_rules():
    np.testing.assert_allclose(tfce_thresholds(5.0), np.linspace(0, 5, 101)[1:])
    assert tfce_thresholds(5.0, 0.1).size == 50
    assert tfce_thresholds(0.5, 0.1).size == 10  # clipped up to 10 steps
    assert tfce_thresholds(500.0, 0.1).size == 1000  # clipped down to 1000
    with pytest.raises(ValueError, match="'dh' must be 'auto' or a positive number"):
        tfce_thresholds(5.0, -1)


def test_tfce_errors():
    with pytest.raises(ValueError, match="'stat_map' must be a 3D array"):
        compute_tfce(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="'mask' must have the shape of 'stat_map'"):
        compute_tfce(np.zeros((4, 5, 6)), mask=np.ones((4, 5, 7), bool))
    assert not compute_tfce(np.zeros((4, 5, 6))).any()


@pytest.mark.parametrize("two_sided", [True, False])
def test_cluster_maxima_equal_nilearn(smooth_map, two_sided):
    from nilearn.mass_univariate._utils import calculate_cluster_measures

    stat, mask = smooth_map
    structure = ndimage.generate_binary_structure(3, 1)
    for threshold in (0.5, 1.5, 2.5):
        sizes, masses = calculate_cluster_measures(
            stat[..., None], threshold, structure, two_sided_test=two_sided
        )
        graph = VoxelGraph.from_mask(mask, 6)
        size, mass = cluster_maxima(stat[mask], threshold, graph, two_sided)
        assert size == sizes[0]
        assert mass == pytest.approx(masses[0], rel=1e-12)


def test_cluster_values_and_labels_agree(smooth_map):
    stat, mask = smooth_map
    labels, n_clusters = label_clusters(stat, 1.0, connectivity=18)
    graph = VoxelGraph.from_mask(mask, 18)
    size, mass = cluster_values(stat[mask], 1.0, graph, True)
    sizes = np.bincount(labels.ravel())
    np.testing.assert_array_equal(size, np.where(labels[mask] > 0, sizes[labels[mask]], 0))
    expected_mass = ndimage.sum(np.abs(stat) - 1.0, labels, np.arange(1, n_clusters + 1))
    got_mass = np.zeros(n_clusters + 1)
    got_mass[labels[mask]] = mass
    np.testing.assert_allclose(got_mass[1:], expected_mass)


def test_label_clusters_signs_and_connectivity():
    stat = np.zeros((7, 8, 9))
    stat[1, 1, 1] = stat[2, 2, 1] = 3.0  # touch by an edge only
    stat[5, 5, 5] = -3.0
    labels, n = label_clusters(stat, 2.0, connectivity=6)
    assert n == 3 and labels[5, 5, 5] == 3  # negative clusters come last
    labels, n = label_clusters(stat, 2.0, connectivity=18)
    assert n == 2 and labels[1, 1, 1] == labels[2, 2, 1]
    labels, n = label_clusters(stat, 2.0, two_sided=False)
    assert n == 2 and labels[5, 5, 5] == 0
    labels, n = label_clusters(stat, 3.0)  # strict inequality, as nilearn
    assert n == 0
    with pytest.raises(ValueError, match="'connectivity' must be 6"):
        label_clusters(stat, 2.0, connectivity=8)
    with pytest.raises(ValueError, match="'threshold' must be a non-negative number"):
        label_clusters(stat, -1.0)


def test_cluster_table_matches_nilearn(smooth_map):
    from nilearn.reporting import get_clusters_table

    stat, _ = smooth_map
    img = nib.Nifti1Image(stat.astype(np.float32), AFFINE)
    threshold = 1.2
    table = make_cluster_table(img, threshold, min_size_voxels=5)
    reference = get_clusters_table(img, threshold, cluster_threshold=5, two_sided=True)
    reference = reference[reference["Cluster Size (mm3)"] != ""]
    assert len(table) == len(reference) > 2
    got = {(r.peak_x, r.peak_y, r.peak_z, r.size_mm3) for r in table.itertuples()}
    expected = {
        (float(x), float(y), float(z), float(size))
        for x, y, z, size in reference[["X", "Y", "Z", "Cluster Size (mm3)"]].to_numpy()
    }
    assert got == expected
    assert (table["size_mm3"] == table["size_voxels"] * 8.0).all()
    assert list(table["cluster_id"]) == list(range(1, len(table) + 1))
    assert np.all(np.diff(np.abs(table["peak_stat"])) <= 0)


def test_cluster_table_p_fwe_and_atlas():
    stat = np.zeros((7, 8, 9))
    stat[1:3, 1:3, 1:3] = 4.0
    stat[2, 2, 2] = 5.0
    stat[5, 6, 7] = -3.5
    logp = np.zeros_like(stat)
    logp[1:3, 1:3, 1:3] = 1.0
    logp[2, 2, 2] = 2.5
    calls = []

    def lookup(xyz):
        calls.append(tuple(xyz))
        return "left" if xyz[0] < 0 else "right"

    table = make_cluster_table((stat, AFFINE), 3.0, logp_fwe=logp, atlas_lookup=lookup)
    first, second = table.iloc[0], table.iloc[1]
    assert first.size_voxels == 8 and first.peak_stat == 5.0
    assert (first.peak_x, first.peak_y, first.peak_z) == (-8.0, -10.0, -12.0)
    assert (first.com_x, first.com_y, first.com_z) == (-9.0, -11.0, -13.0)
    assert first.p_fwe == pytest.approx(10**-2.5)
    assert second.peak_stat == -3.5 and second.p_fwe == pytest.approx(1.0)
    assert first.peak_area == "left" and first.areas == "left (100%)"
    assert len(calls) == 9
    assert make_cluster_table((stat, AFFINE), 3.0, min_size_voxels=2).shape[0] == 1
    empty = make_cluster_table((stat, AFFINE), 10.0)
    assert empty.empty and "p_fwe" in empty.columns
    with pytest.raises(ValueError, match="'logp_fwe' must have the shape"):
        make_cluster_table((stat, AFFINE), 3.0, logp_fwe=logp[:3])


def test_voxel_graph_errors():
    with pytest.raises(ValueError, match="'mask' must be a 3D array"):
        VoxelGraph.from_mask(np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="'connectivity' must be 6"):
        VoxelGraph.from_mask(np.ones((3, 4, 5), bool), connectivity=4)
