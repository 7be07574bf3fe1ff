"""Region level: the seed's connectivity with each atlas region, and inference over regions.

A region's value for a run is the **mean of the run's first-level map over the region's voxels**
(rest correlation Fisher z, gPPI beta, background Fisher z), read at the group level from the
maps the participant level already wrote. Why this and not a new first-level measure:

* the same cleaned data and the same maps as the voxel-wise test, so the two families differ only
  in what they average over, and the region level costs nothing at the participant level;
* it is the measurement of issue 21: the mean of fcflow's first-level z maps over the left insula
  gave ketamine - placebo d = 1.98 (t = 4.30) where the voxel-wise test found nothing, because a
  mean over a few hundred voxels averages their independent noise away.

It is the mean of voxel-wise Fisher z, not the correlation of the seed with the region's mean
time series (CONN's seed-to-ROI): the two differ by the region's internal coherence, and the
mean of z stays on the scale of the voxel maps.

Regions are Julich-Brain v3.1 maximum probability map areas of both hemispheres (named as in
the cluster tables, "left Area Id8 (Insula)") or the labels of a user's label image with a TSV
of ``index`` and ``name``. Either is put on the maps' grid by nearest neighbour. A study may
declare its family before looking (:func:`select_regions`, the recipe's ``[regions] areas``):
only regions whose name matches one of its patterns enter, because max-T over fewer regions
needs a smaller statistic (benchmarks/results/regions_fwe.tsv: a d = 1 effect at 10 per group
is found in 27 % of studies over 8 regions, in 4.5 % over 250). A region enters with at least
``min_voxels`` voxels inside the group analysis mask.

Inference (:func:`run_region_inference`) is the voxel level's (:func:`fcflow.group.inference.run_inference`:
the same design, statistic, variance groups and permutations) on the (subjects x regions) matrix:
max-T over regions for the family-wise error (``maxt`` needs no spatial mask, each region is one
"voxel"), and the Benjamini-Hochberg q of the parametric p. The regions are a second, declared
family of tests beside the voxel-wise one, not a way to choose the better of two.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fcflow.errors import InputDataError

__all__ = [
    "REGION_COLUMNS",
    "RegionAtlas",
    "compute_region_values",
    "load_julich_regions",
    "load_label_regions",
    "run_region_inference",
    "select_regions",
    "significant_regions",
]

#: Columns of a region table, in order.
REGION_COLUMNS = ["region", "hemisphere", "n_voxels", "effect", "stat", "p_uncorrected", "p_fwe", "q_fdr"]
# Right-hemisphere Julich grey values are shifted past the left ones in the combined label volume.
_RIGHT_OFFSET = 10_000


@dataclass(frozen=True)
class RegionAtlas:
    """Integer labels on the maps' grid and the name of each label.

    Attributes
    ----------
    labels : ndarray of int32, 3D
        0 outside every region.
    regions : DataFrame
        Columns ``index`` (label value), ``region`` (name) and ``hemisphere`` ("left", "right"
        or "" for a user label without one), one row per label, in label order.
    source : str
        What the labels are (for sidecars and methods), e.g. "Julich-Brain v3.1 MPM".
    """

    labels: NDArray[np.int32]
    regions: pd.DataFrame
    source: str


def _to_grid(labels: NDArray, affine: NDArray[np.float64], shape: Sequence[int],
             target_affine: NDArray[np.float64]) -> NDArray[np.int32]:
    from fcflow.atlas.seeds import resample_to_reference

    if tuple(labels.shape) == tuple(shape) and np.allclose(affine, target_affine, atol=1e-3):
        return labels.astype(np.int32)
    # Nearest neighbour: a voxel takes the label at its centre, never a blend of two labels.
    out = resample_to_reference(labels.astype(np.int32), np.asarray(affine, dtype=float), tuple(int(n) for n in shape),
                    np.asarray(target_affine, dtype=float), "nearest")
    return np.rint(out).astype(np.int32)


def load_label_regions(labels_file: str | Path, table_file: str | Path, shape: Sequence[int],
                       affine: NDArray[np.float64]) -> RegionAtlas:
    """A user's label image (integer labels, any grid) and its TSV (``index``, ``name``) on a grid.

    Parameters
    ----------
    labels_file : path
        3D NIfTI of integer labels, 0 for background.
    table_file : path
        TSV with columns ``index`` and ``name``; an optional ``hemisphere`` column.
    shape : sequence of 3 int
        Grid of the group maps.
    affine : ndarray of shape (4, 4)

    Raises
    ------
    InputDataError
        The TSV lacks a column, names a label twice, or no label of the TSV is in the image.
    """
    table = pd.read_csv(table_file, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in ("index", "name") if c not in table]
    if missing:
        raise InputDataError(f"The region table {table_file} must have the columns 'index' and 'name'. "
                             f"Got columns {list(table.columns)}.")
    index = pd.to_numeric(table["index"], errors="coerce")
    if index.isna().any() or (index % 1 != 0).any() or (index <= 0).any() or index.duplicated().any():
        raise InputDataError(f"The 'index' column of {table_file} must hold distinct positive integers. "
                             f"Got {table['index'].tolist()!r}.")
    img = nib.load(labels_file)
    data = np.asanyarray(img.dataobj)
    data = data.reshape(data.shape[:3])
    labels = _to_grid(np.rint(data).astype(np.int32), img.affine, shape, affine)
    regions = pd.DataFrame({"index": index.astype(int), "region": table["name"],
                            "hemisphere": table["hemisphere"] if "hemisphere" in table else ""})
    if not np.isin(regions["index"], np.unique(labels)).any():
        raise InputDataError(f"No label of {table_file} is on the grid of the group maps once {labels_file} is "
                             "resampled: check that the label image is in the space of the maps.")
    regions = regions.sort_values("index").reset_index(drop=True)
    return RegionAtlas(labels, regions, f"labels of {Path(labels_file).name}")


def load_julich_regions(atlas_dir: str | Path, shape: Sequence[int], affine: NDArray[np.float64]) -> RegionAtlas:
    """Every Julich-Brain v3.1 MPM area of both hemispheres on a grid ("left Area Id8 (Insula)").

    Raises
    ------
    fcflow.errors.AtlasError
        The folder lacks an MPM or its label table.
    """
    from fcflow.atlas.fetch import find_atlas_file
    from fcflow.atlas.release import load_atlas_release, read_label_table
    from fcflow.errors import AtlasError

    release = load_atlas_release()
    labels = np.zeros(tuple(shape), dtype=np.int32)
    rows = []
    for offset, hemi in ((0, "left"), (_RIGHT_OFFSET, "right")):
        mpm = find_atlas_file(atlas_dir, release.mpm_file(hemi))
        xml = find_atlas_file(atlas_dir, release.labels_file(hemi))
        if mpm is None or xml is None:
            raise AtlasError(f"The Julich-Brain folder {atlas_dir} lacks the {hemi} MPM or its label table.")
        img = nib.load(mpm)
        grid = _to_grid(np.rint(np.asanyarray(img.dataobj)).astype(np.int32), img.affine, shape, affine)
        # The MPMs are one per hemisphere; a voxel both claim keeps the left label (as the cluster lookup).
        labels = np.where((labels == 0) & (grid > 0), grid + offset, labels)
        rows += [{"index": value + offset, "region": f"{hemi} {name}", "hemisphere": hemi}
                 for name, value in read_label_table(xml).items()]
    regions = pd.DataFrame(rows).sort_values("index").reset_index(drop=True)
    return RegionAtlas(labels, regions, f"Julich-Brain v{release.version} MPM")


def select_regions(atlas: RegionAtlas, areas: Sequence[str]) -> RegionAtlas:
    """The regions of ``atlas`` whose name matches any of ``areas``: the declared family.

    Parameters
    ----------
    atlas : RegionAtlas
    areas : sequence of str
        Shell-style patterns (:func:`fnmatch.fnmatchcase`, case-sensitive) of the full region
        name, hemisphere included: "left * (Insula)", "* Area SFG2 (SFG)"; "*" keeps all.

    Returns
    -------
    RegionAtlas
        The same grid with the labels of the other regions set to 0, and their rows dropped
        (in label order, as before).

    Raises
    ------
    InputDataError
        A pattern matches no region: a misspelt name would silently shrink the family.
    """
    names = atlas.regions["region"].astype(str).tolist()
    keep = np.zeros(len(names), dtype=bool)
    for pattern in areas:
        hits = np.array([fnmatchcase(name, pattern) for name in names], dtype=bool)
        if not hits.any():
            # the names nearest the pattern, wildcards aside, are the likeliest meant ones
            examples = difflib.get_close_matches(pattern.replace("*", "").replace("?", ""), names, n=3, cutoff=0)
            raise InputDataError(
                f"[regions] 'areas' must be patterns that each match a region of {atlas.source}. Got {pattern!r}, "
                f"which matches none of its {len(names)} regions, named like {', '.join(map(repr, examples))}: "
                "patterns are case-sensitive shell-style (fnmatch) and match the whole name, hemisphere "
                "included ('left * (Insula)').")
        keep |= hits
    regions = atlas.regions[keep].reset_index(drop=True)
    labels = np.where(np.isin(atlas.labels, regions["index"].to_numpy()), atlas.labels, 0).astype(np.int32)
    return RegionAtlas(labels, regions, atlas.source)


def compute_region_values(
    data: NDArray[np.floating], mask: NDArray[np.bool_], atlas: RegionAtlas, *, min_voxels: int = 10,
) -> tuple[NDArray[np.float64], pd.DataFrame]:
    """Each subject's mean map value over each region's voxels inside the analysis mask.

    Parameters
    ----------
    data : ndarray of shape (n_subjects, n_voxels)
        Maps on the analysis mask, in the C order of ``mask[mask]``.
    mask : ndarray of bool, 3D
        The group analysis mask.
    atlas : RegionAtlas
        On the grid of ``mask``.
    min_voxels : int, default=10
        Regions with fewer voxels inside ``mask`` are left out.

    Returns
    -------
    values : ndarray of shape (n_subjects, n_regions)
    regions : DataFrame
        The regions kept: ``index``, ``region``, ``hemisphere``, ``n_voxels``.
    """
    in_mask = atlas.labels[mask]
    counts = np.array([int(np.count_nonzero(in_mask == i)) for i in atlas.regions["index"]], dtype=int)
    kept = atlas.regions.assign(n_voxels=counts)[counts >= min_voxels].reset_index(drop=True)
    # column of each in-mask voxel's region, len(kept) for none: a sum per subject by bincount,
    # since a dense (voxels x regions) indicator of a 2 mm brain and 300 areas would take 0.5 GB
    code = np.full(in_mask.size, len(kept))
    for column, index in enumerate(kept["index"]):
        code[in_mask == index] = column
    data = np.asarray(data, dtype=np.float64)
    sums = np.stack([np.bincount(code, weights=row, minlength=len(kept) + 1)[: len(kept)] for row in data]) \
        if len(data) else np.zeros((0, len(kept)))
    values = sums / np.maximum(kept["n_voxels"].to_numpy(), 1)
    return values, kept


def run_region_inference(
    values: NDArray[np.float64], regions: pd.DataFrame, design: pd.DataFrame, test, *,
    n_permutations: int, two_sided: bool, random_seed: int, variance_groups: Sequence[str] | None = None,
    group_variances: str = "brain", permutations: NDArray | None = None, scheme: str = "auto",
) -> pd.DataFrame:
    """Test one group contrast (t) or F test in every region, FWE by max-T and FDR over regions.

    Parameters
    ----------
    values : ndarray of shape (n_subjects, n_regions)
        From :func:`compute_region_values` (rows in ``design`` order).
    regions : DataFrame
        ``region``, ``hemisphere``, ``n_voxels`` of each column of ``values``.
    design : DataFrame of shape (n_subjects, n_regressors)
    test : fcflow.group.inference.GroupTest
    n_permutations, two_sided, random_seed, variance_groups, group_variances, permutations, scheme
        As for :func:`fcflow.group.inference.run_inference` (``permutations``: e.g. the whole-subject
        shuffles of a repeated-measures model, :mod:`fcflow.repeated`).

    Returns
    -------
    table : DataFrame
        :data:`REGION_COLUMNS`, one row per region, in ``regions`` order. ``effect`` is the OLS
        contrast estimate (a t contrast's weighted sum of group means; n/a for F), ``stat`` the
        statistic of the voxel level (t, F, or with variance groups the weighted t or F, or
        Winkler's v or G), ``p_uncorrected`` its parametric p (two-sided for t when
        ``two_sided``), ``p_fwe`` the max-statistic permutation p over the regions and
        ``q_fdr`` the Benjamini-Hochberg q of ``p_uncorrected``.
    """
    from fcflow.group.inference import fdr_logq, parametric_logp, run_inference
    from fcflow.stats import fit_ols

    if values.shape[1] == 0:
        return pd.DataFrame(columns=REGION_COLUMNS)
    result = run_inference(
        values, design, test, None, methods=("maxt",), n_permutations=n_permutations, two_sided=two_sided,
        random_seed=random_seed, cluster_forming_p=0.001, variance_groups=variance_groups,
        group_variances=group_variances, permutations=permutations, scheme=scheme,
    )  # fmt: skip
    logp = parametric_logp(result.z, bool(two_sided) and test.kind == "t")
    effect = (test.matrix[0] @ fit_ols(values, design).beta if test.kind == "t"
              else np.full(values.shape[1], np.nan))
    return pd.DataFrame({
        "region": regions["region"].to_numpy(), "hemisphere": regions["hemisphere"].to_numpy(),
        "n_voxels": regions["n_voxels"].to_numpy(), "effect": effect, "stat": result.stat,
        "p_uncorrected": 10.0 ** -logp, "p_fwe": 10.0 ** -result.logp["maxt"], "q_fdr": 10.0 ** -fdr_logq(logp),
    })[REGION_COLUMNS]


def significant_regions(table: pd.DataFrame, alpha: float, correction: str = "fwe") -> pd.DataFrame:
    """The rows of a region table below ``alpha`` by ``p_fwe`` ("fwe") or ``q_fdr`` ("fdr")."""
    column = {"fwe": "p_fwe", "fdr": "q_fdr"}[correction]
    return table[pd.to_numeric(table[column], errors="coerce") < alpha]

