"""Clusters of statistic maps: labelling, TFCE and cluster tables.

Two layers of functions:

* public functions on 3D arrays (:func:`label_clusters`, :func:`compute_tfce`,
  :func:`make_cluster_table`), which the reports use on observed maps;
* private functions on in-mask vectors with a precomputed neighbour table
  (:class:`VoxelGraph`), which the permutation engine calls thousands of times. They never
  rebuild a 3D volume and only touch supra-threshold voxels.

Definitions follow nilearn 0.14 (``nilearn/mass_univariate/_utils.py``) so that numbers can be
compared one to one:

* A cluster is a connected set of voxels with ``stat > threshold`` (or ``stat < -threshold``
  for negative clusters of a two-sided test), strict inequality; positive and negative voxels
  never share a cluster. Default connectivity is 6 (faces), nilearn's
  ``generate_binary_structure(3, 1)``.
* Cluster mass is ``sum(|stat| - threshold)`` over the cluster's voxels; size is its voxel
  count.
* TFCE uses the thresholds ``h = linspace(0, max_score, n_steps + 1)[1:]`` with
  ``n_steps = 100`` for ``dh="auto"`` (as fslmaths) or ``round(max_score / dh)`` clipped to
  [10, 1000]; ``max_score`` is the largest |stat| (two-sided) or the largest stat. A voxel
  gets ``sum_h extent(h)**E * h**H`` over the thresholds it reaches (``stat >= h``), where
  extent is the voxel count of its cluster at ``stat >= h``. Like fslmaths and nilearn, no
  ``dh`` factor. Two-sided maps carry the negative part with a negative sign.

TFCE here costs O(V) per map instead of ``n_steps`` full-grid labellings: the component tree
of the map quantised to the steps is built in one flooding pass, compiled with numba
(:mod:`fcflow._tfce_kernel`), and each voxel's sum is read off the tree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

from fcflow.errors import InputDataError

__all__ = [
    "VoxelGraph",
    "compute_tfce",
    "label_clusters",
    "make_cluster_table",
    "tfce_thresholds",
]

_CONNECTIVITY_RANK = {6: 1, 18: 2, 26: 3}


def _structure(connectivity: int) -> NDArray[np.bool_]:
    if connectivity not in _CONNECTIVITY_RANK:
        raise InputDataError(
            f"'connectivity' must be 6 (faces), 18 (faces and edges) or 26 (faces, edges and "
            f"corners). Got {connectivity!r}."
        )
    return ndimage.generate_binary_structure(3, _CONNECTIVITY_RANK[connectivity])


# --------------------------------------------------------------------------------------------
# Neighbour table over in-mask voxels
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VoxelGraph:
    """In-mask voxels and their neighbours, for labelling vectors without 3D volumes.

    Attributes
    ----------
    mask : ndarray of bool, 3D
    neighbors : ndarray of shape (n_voxels, n_neighbors), int32
        In-mask index of each neighbour; ``n_voxels`` (a sentinel) where the neighbour is
        outside the mask or the grid.
    connectivity : int
    """

    mask: NDArray[np.bool_]
    neighbors: NDArray[np.int32]
    connectivity: int

    @property
    def n_voxels(self) -> int:
        return self.neighbors.shape[0]

    @classmethod
    def from_mask(cls, mask: ArrayLike, connectivity: int = 6) -> VoxelGraph:
        """Build the neighbour table of a 3D boolean mask (C order of ``mask[mask]``)."""
        mask = np.asarray(mask)
        if mask.ndim != 3:
            raise InputDataError(f"'mask' must be a 3D array. Got shape {mask.shape!r}.")
        mask = mask.astype(bool)
        structure = _structure(connectivity)
        n_voxels = int(mask.sum())
        index = np.full(np.array(mask.shape) + 2, n_voxels, dtype=np.int32)
        index[1:-1, 1:-1, 1:-1][mask] = np.arange(n_voxels, dtype=np.int32)
        offsets = [tuple(o - 1) for o in np.argwhere(structure) if tuple(o) != (1, 1, 1)]
        ijk = np.argwhere(mask) + 1
        neighbors = np.empty((n_voxels, len(offsets)), dtype=np.int32)
        for column, (di, dj, dk) in enumerate(offsets):
            neighbors[:, column] = index[ijk[:, 0] + di, ijk[:, 1] + dj, ijk[:, 2] + dk]
        return cls(mask=mask, neighbors=neighbors, connectivity=connectivity)


def _connected_components(
    n_nodes: int, a: NDArray[np.int32], b: NDArray[np.int32]
) -> tuple[int, NDArray[np.int32]]:
    """Connected components of an undirected edge list, vectorised.

    Hooking (each edge points the larger root at the smaller one) and pointer jumping, as in
    Shiloach-Vishkin; O(log n) rounds of whole-array numpy operations. For the small graphs
    of one TFCE step this is several times faster than building a scipy.sparse matrix for
    ``scipy.sparse.csgraph.connected_components``, whose set-up dominates at that size.
    """
    parent = np.arange(n_nodes, dtype=np.int32)
    while True:
        root_a = parent[a]
        root_b = parent[b]
        differ = root_a != root_b
        if not differ.any():
            break
        root_a = root_a[differ]
        root_b = root_b[differ]
        a = a[differ]
        b = b[differ]
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    is_root = parent == np.arange(n_nodes, dtype=np.int32)
    compact = np.cumsum(is_root, dtype=np.int32) - 1
    return int(compact[-1]) + 1 if n_nodes else 0, compact[parent]


def _label_voxels(
    voxels: NDArray[np.intp], graph: VoxelGraph
) -> tuple[int, NDArray[np.int32]]:
    """Connected components among a subset of in-mask voxels.

    Returns the number of components and a 0-based label per entry of ``voxels``.
    """
    k = voxels.size
    if k == 0:
        return 0, np.zeros(0, dtype=np.int32)
    position = np.full(graph.n_voxels + 1, -1, dtype=np.int32)
    position[voxels] = np.arange(k, dtype=np.int32)
    neighbor_position = position[graph.neighbors[voxels]]
    rows, cols = np.nonzero(neighbor_position >= 0)
    if rows.size == 0:
        return k, np.arange(k, dtype=np.int32)
    return _connected_components(k, rows.astype(np.int32), neighbor_position[rows, cols])


def _signed_clusters(values: NDArray, threshold: float, graph: VoxelGraph, two_sided: bool):
    """Yield ``(voxels, labels, sizes, masses)`` of the clusters above ``threshold`` of each sign.

    Mass is the sum of ``|stat| - threshold`` over the cluster (nilearn's definition).
    """
    for sign in (1, -1) if two_sided else (1,):
        signed = values if sign == 1 else -values
        voxels = np.flatnonzero(signed > threshold)
        n_clusters, labels = _label_voxels(voxels, graph)
        if n_clusters == 0:
            continue
        sizes = np.bincount(labels, minlength=n_clusters).astype(float)
        masses = np.bincount(
            labels, weights=signed[voxels].astype(np.float64) - threshold, minlength=n_clusters
        )
        yield voxels, labels, sizes, masses


def cluster_maxima(
    values: NDArray, threshold: float, graph: VoxelGraph, two_sided: bool
) -> tuple[float, float]:
    """Largest cluster size and mass of an in-mask statistic vector (nilearn definitions)."""
    max_size, max_mass = 0.0, 0.0
    for _, _, sizes, masses in _signed_clusters(values, threshold, graph, two_sided):
        max_size = max(max_size, float(sizes.max()))
        max_mass = max(max_mass, float(masses.max()))
    return max_size, max_mass


def cluster_values(
    values: NDArray, threshold: float, graph: VoxelGraph, two_sided: bool
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-voxel size and mass of the cluster each voxel belongs to (0 outside clusters)."""
    size = np.zeros(values.shape[0])
    mass = np.zeros(values.shape[0])
    for voxels, labels, sizes, masses in _signed_clusters(values, threshold, graph, two_sided):
        size[voxels] = sizes[labels]
        mass[voxels] = masses[labels]
    return size, mass


# --------------------------------------------------------------------------------------------
# TFCE
# --------------------------------------------------------------------------------------------
def tfce_thresholds(max_score: float, dh: float | str = "auto") -> NDArray[np.float64]:
    """TFCE thresholds exactly as nilearn's ``_return_score_threshs``.

    Parameters
    ----------
    max_score : float
        Largest |stat| (two-sided) or largest stat (one-sided) of the map.
    dh : float or "auto", default="auto"
        Step; "auto" means 100 steps. The step count is clipped to [10, 1000].
    """
    if dh == "auto":
        n_steps = 100
    elif isinstance(dh, (int, float)) and dh > 0:
        n_steps = round(max_score / dh)
    else:
        raise InputDataError(f"'dh' must be 'auto' or a positive number. Got {dh!r}.")
    n_steps = min(max(n_steps, 10), 1000)
    return np.linspace(0, max_score, n_steps + 1)[1:]


def tfce_vector(
    values: NDArray,
    graph: VoxelGraph,
    *,
    two_sided: bool,
    extent_exponent: float = 0.5,
    height_exponent: float = 2.0,
    dh: float | str = "auto",
    max_score: float | None = None,
    per_voxel: bool = True,
) -> NDArray[np.float64] | float:
    """Signed TFCE of an in-mask statistic vector (nilearn's definition, see module doc).

    With ``per_voxel=False`` only the largest |TFCE| is computed and returned (a float), as
    the permutation null needs.
    """
    from fcflow._tfce_kernel import tfce_one_sign

    values = np.asarray(values)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    values = np.ascontiguousarray(values)
    if max_score is None:
        max_score = float(np.max(np.abs(values))) if two_sided else float(np.max(values))
        # nilearn takes the max over the whole grid, where out-of-mask voxels are 0
        if graph.mask.size > graph.n_voxels:
            max_score = max(max_score, 0.0)
    out = np.zeros(values.shape[0] if per_voxel else 0)
    if not max_score > 0:
        return out if per_voxel else 0.0
    thresholds = tfce_thresholds(max_score, dh)
    args = (graph.neighbors, thresholds, float(extent_exponent), float(height_exponent), out)
    largest = tfce_one_sign(values, 1.0, *args)
    if two_sided:
        largest = max(largest, tfce_one_sign(values, -1.0, *args))
    return out if per_voxel else largest


def compute_tfce(
    stat_map: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    two_sided: bool = True,
    extent_exponent: float = 0.5,
    height_exponent: float = 2.0,
    dh: float | str = "auto",
    connectivity: int = 6,
) -> NDArray[np.float64]:
    """Threshold-free cluster enhancement of a 3D statistic map.

    Same numbers as nilearn's ``calculate_tfce`` (see the module docstring for the
    definition), at a fraction of its cost.

    Parameters
    ----------
    stat_map : ndarray, 3D
        Unthresholded t (or z) map; voxels outside ``mask`` are treated as 0.
    mask : ndarray of bool, 3D, or None, default=None
        Voxels that may belong to clusters. None means the non-zero finite voxels.
    two_sided : bool, default=True
        Also enhance negative clusters (returned with a negative sign).
    extent_exponent : float, default=0.5
        E in Smith & Nichols (2009).
    height_exponent : float, default=2.0
        H in Smith & Nichols (2009).
    dh : float or "auto", default="auto"
        Threshold step; "auto" uses 100 steps from 0 to the map's largest |stat|.
    connectivity : {6, 18, 26}, default=6

    Returns
    -------
    tfce : ndarray, same shape as ``stat_map``
    """
    stat_map = np.asarray(stat_map, dtype=np.float64)
    if stat_map.ndim != 3:
        raise InputDataError(f"'stat_map' must be a 3D array. Got shape {stat_map.shape!r}.")
    finite = np.isfinite(stat_map)
    if mask is None:
        mask = finite & (stat_map != 0)
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != stat_map.shape:
            raise InputDataError(
                f"'mask' must have the shape of 'stat_map' {stat_map.shape!r}. "
                f"Got {mask.shape!r}."
            )
        mask = mask & finite
    out = np.zeros(stat_map.shape)
    if not mask.any():
        return out
    graph = VoxelGraph.from_mask(mask, connectivity)
    values = stat_map[mask]
    max_score = float(np.max(np.abs(values))) if two_sided else float(np.max(values))
    if mask.size > values.size:
        max_score = max(max_score, 0.0)
    out[mask] = tfce_vector(
        values,
        graph,
        two_sided=two_sided,
        extent_exponent=extent_exponent,
        height_exponent=height_exponent,
        dh=dh,
        max_score=max_score,
    )
    return out


# --------------------------------------------------------------------------------------------
# Labelling and cluster tables on 3D maps
# --------------------------------------------------------------------------------------------
def label_clusters(
    stat_map: ArrayLike,
    threshold: float,
    *,
    connectivity: int = 6,
    two_sided: bool = True,
) -> tuple[NDArray[np.int32], int]:
    """Label supra-threshold clusters of a 3D map.

    Parameters
    ----------
    stat_map : ndarray, 3D
    threshold : float
        Cluster-forming threshold (>= 0); voxels with ``stat > threshold`` form positive
        clusters and, if ``two_sided``, voxels with ``stat < -threshold`` negative ones.
    connectivity : {6, 18, 26}, default=6
    two_sided : bool, default=True

    Returns
    -------
    labels : ndarray of int32, 3D
        0 for background; positive clusters first (1..n_positive), then negative ones.
    n_clusters : int
    """
    stat_map = np.asarray(stat_map, dtype=np.float64)
    if stat_map.ndim != 3:
        raise InputDataError(f"'stat_map' must be a 3D array. Got shape {stat_map.shape!r}.")
    if not threshold >= 0:
        raise InputDataError(f"'threshold' must be a non-negative number. Got {threshold!r}.")
    structure = _structure(connectivity)
    finite = np.nan_to_num(stat_map, nan=0.0)
    labels, n_positive = ndimage.label(finite > threshold, structure)
    labels = labels.astype(np.int32)
    if not two_sided:
        return labels, int(n_positive)
    negative, n_negative = ndimage.label(finite < -threshold, structure)
    labels[negative > 0] = negative[negative > 0] + n_positive
    return labels, int(n_positive + n_negative)


def make_cluster_table(
    stat_img,
    threshold: float,
    *,
    logp_fwe: ArrayLike | None = None,
    two_sided: bool = True,
    connectivity: int = 6,
    min_size_voxels: int = 1,
    atlas_lookup: Callable[[NDArray[np.float64]], str] | None = None,
    max_areas: int = 5,
) -> pd.DataFrame:
    """Table of the supra-threshold clusters of a statistic map.

    Parameters
    ----------
    stat_img : nibabel image or tuple (stat_map, affine)
        3D statistic map in a world (MNI) space.
    threshold : float
        Cluster-forming threshold (see :func:`label_clusters`).
    logp_fwe : ndarray, 3D, or None, default=None
        -log10 FWE-corrected p map on the same grid (voxel, cluster or TFCE level). The
        table's ``p_fwe`` is the smallest p within each cluster.
    two_sided : bool, default=True
    connectivity : {6, 18, 26}, default=6
    min_size_voxels : int, default=1
        Clusters with fewer voxels are left out.
    atlas_lookup : callable or None, default=None
        ``atlas_lookup(xyz_mm) -> str``: the area name at one MNI coordinate (for example
        a Julich-Brain lookup). Adds ``peak_area`` and ``areas``, the areas covered by the
        cluster as ``"name (share %)"``, largest first.
    max_areas : int, default=5
        Most areas listed in ``areas``.

    Returns
    -------
    table : DataFrame
        One row per cluster, sorted by decreasing peak |stat|, with columns cluster_id,
        size_voxels, size_mm3, peak_x, peak_y, peak_z (mm, at the voxel of largest |stat|),
        com_x, com_y, com_z (mm, unweighted centroid of the cluster's voxels), peak_stat,
        p_fwe (NaN without ``logp_fwe``) and, with ``atlas_lookup``, peak_area and areas.
    """
    if isinstance(stat_img, tuple):
        stat_map, affine = stat_img
    else:
        stat_map, affine = stat_img.get_fdata(), stat_img.affine
    stat_map = np.asarray(stat_map, dtype=np.float64)
    if stat_map.ndim == 4 and stat_map.shape[3] == 1:
        stat_map = stat_map[..., 0]
    affine = np.asarray(affine, dtype=float)
    labels, n_clusters = label_clusters(
        stat_map, threshold, connectivity=connectivity, two_sided=two_sided
    )
    if logp_fwe is not None:
        logp_fwe = np.asarray(logp_fwe, dtype=float)
        if logp_fwe.ndim == 4 and logp_fwe.shape[3] == 1:
            logp_fwe = logp_fwe[..., 0]
        if logp_fwe.shape != stat_map.shape:
            raise InputDataError(
                f"'logp_fwe' must have the shape of the statistic map {stat_map.shape!r}. "
                f"Got {logp_fwe.shape!r}."
            )
    # rounded so that 2 mm voxels give 8 mm3, not 7.999999999999998
    voxel_mm3 = float(np.round(abs(np.linalg.det(affine[:3, :3])), 9))
    columns = [
        "cluster_id", "size_voxels", "size_mm3", "peak_x", "peak_y", "peak_z",
        "com_x", "com_y", "com_z", "peak_stat", "p_fwe",
    ]  # fmt: skip
    if atlas_lookup is not None:
        columns += ["peak_area", "areas"]
    rows = []
    if n_clusters:
        flat_labels = labels.ravel()
        in_cluster = np.flatnonzero(flat_labels)
        order = in_cluster[np.argsort(flat_labels[in_cluster], kind="stable")]
        bounds = np.searchsorted(flat_labels[order], np.arange(1, n_clusters + 2))
        flat_stat = stat_map.ravel()
        for label in range(1, n_clusters + 1):
            members = order[bounds[label - 1] : bounds[label]]
            if members.size < min_size_voxels:
                continue
            ijk = np.column_stack(np.unravel_index(members, stat_map.shape)).astype(float)
            xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
            values = flat_stat[members]
            peak = int(np.argmax(np.abs(values)))
            row = {
                "size_voxels": int(members.size),
                "size_mm3": members.size * voxel_mm3,
                "peak_x": xyz[peak, 0],
                "peak_y": xyz[peak, 1],
                "peak_z": xyz[peak, 2],
                "com_x": xyz[:, 0].mean(),
                "com_y": xyz[:, 1].mean(),
                "com_z": xyz[:, 2].mean(),
                "peak_stat": values[peak],
                "p_fwe": (
                    float(10.0 ** -np.max(logp_fwe.ravel()[members]))
                    if logp_fwe is not None
                    else np.nan
                ),
            }
            if atlas_lookup is not None:
                names = pd.Series([str(atlas_lookup(point)) for point in xyz])
                shares = names.value_counts(normalize=True).head(max_areas)
                row["peak_area"] = names.iloc[peak]
                row["areas"] = "; ".join(f"{n} ({100 * s:.0f}%)" for n, s in shares.items())
            rows.append(row)
    rows.sort(key=lambda r: -abs(r["peak_stat"]))
    for number, row in enumerate(rows, start=1):
        row["cluster_id"] = number
    return pd.DataFrame(rows, columns=columns)
