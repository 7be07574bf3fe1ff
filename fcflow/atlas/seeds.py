"""Seed masks by area name on any reference grid (:func:`build_seed_mask`, :func:`build_seed`).

Maximum-probability (``mpm``) or thresholded probability (``pmap``) maps, resampled with
nilearn; a :class:`SeedMask` keeps the provenance of every mask.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from fcflow import __version__
from fcflow.errors import AtlasError, InputDataError

try:  # POSIX only; on other systems concurrent cache writers are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]
from fcflow.atlas.fetch import atlas_provenance, find_atlas_file
from fcflow.atlas.release import (
    AtlasRelease,
    SeedDefinition,
    check_areas,
    check_source,
    check_threshold,
    describe_rule,
    load_atlas_release,
    normalize_hemispheres,
    read_label_table,
    resolve_area_name,
    space_entity,
)


@dataclass(frozen=True)
class SeedMask:
    """A seed mask on a reference grid and how it was made (for the JSON sidecar).

    Attributes
    ----------
    img : Nifti1Image
        uint8 mask (0/1) on the reference grid.
    areas : tuple of str
        Full area names as found in the label tables.
    label_values : dict
        ``{hemisphere: {area: grey value}}``.
    n_voxels_by_hemisphere : dict
        ``{hemisphere: voxels on the reference grid}`` (a voxel shared by both counts twice).
    files : tuple of str
        Bucket paths of the atlas files read.
    """

    img: nib.Nifti1Image
    name: str
    areas: tuple[str, ...]
    hemispheres: tuple[str, ...]
    source: str
    pmap_threshold: float | None
    label_values: dict[str, dict[str, int]]
    n_voxels_by_hemisphere: dict[str, int]
    atlas_dir: Path
    files: tuple[str, ...]
    description: str = ""
    reference_file: str | None = None

    @property
    def n_voxels(self) -> int:
        return int(np.count_nonzero(np.asarray(self.img.dataobj)))

    @property
    def volume_mm3(self) -> float:
        return self.n_voxels * voxel_volume_mm3(self.img.affine)

    @property
    def center_of_mass_mm(self) -> list[float]:
        return center_of_mass_mm(self.img)

    def to_sidecar(self) -> dict[str, Any]:
        """JSON-ready provenance: atlas, files and hashes, areas and labels, rule, size, centre."""
        affine = self.img.affine
        return {
            "Seed": self.name,
            "Description": self.description,
            "Atlas": atlas_provenance(self.atlas_dir, self.files),
            "Areas": list(self.areas),
            "LabelValues": self.label_values,
            "Hemispheres": list(self.hemispheres),
            "Source": self.source,
            "PmapThreshold": self.pmap_threshold,
            "Rule": describe_rule(self.source, self.pmap_threshold),
            "VoxelCount": self.n_voxels,
            "VoxelCountByHemisphere": self.n_voxels_by_hemisphere,
            "VolumeMm3": round(self.volume_mm3, 3),
            "CenterOfMassMm": [round(c, 2) for c in self.center_of_mass_mm],
            "Reference": {
                "File": self.reference_file,
                "Shape": [int(n) for n in self.img.shape[:3]],
                "Affine": np.round(affine, 6).tolist(),
                "VoxelSizeMm": [round(float(z), 6) for z in np.sqrt((affine[:3, :3] ** 2).sum(0))],
            },
            "GeneratedBy": {"Name": "fcflow", "Version": __version__},
        }


def build_seed_mask(
    atlas_dir: str | os.PathLike[str],
    areas: str | Sequence[str],
    hemispheres: str | Sequence[str],
    reference_img: nib.spatialimages.SpatialImage | str | os.PathLike[str],
    source: str = "mpm",
    pmap_threshold: float = 0.5,
) -> nib.Nifti1Image:
    """Build a binary seed mask from Julich-Brain areas, on the grid of ``reference_img``.

    Parameters
    ----------
    atlas_dir : path
        Folder with the atlas files (see :func:`resolve_atlas_dir`).
    areas : str or sequence of str
        Area names, e.g. ``["Area p24ab (pACC)", "Area p24c (pACC)", "Area p32 (pACC)"]``;
        short forms (``"p24ab"``) are accepted when unambiguous.
    hemispheres : str or sequence of {"left", "right"}
        ``"both"`` for both.
    reference_img : nibabel image or path
        3D or 4D image (e.g. a BOLD run) whose grid the mask takes. Any orientation, including
        oblique and flipped axes: the atlas is resampled through both affines.
    source : {"mpm", "pmap"}, default="mpm"
        ``mpm``: labels of the maximum probability maps, nearest-neighbour resampled. ``pmap``:
        probability maps, trilinearly resampled, then thresholded.
    pmap_threshold : float, default=0.5
        Minimum probability for ``source="pmap"``.

    Returns
    -------
    seed_img : Nifti1Image
        uint8 (0/1) on the reference grid.
    """
    return build_seed(
        atlas_dir, areas, hemispheres, reference_img, source=source, pmap_threshold=pmap_threshold
    ).img


def build_seed(
    atlas_dir: str | os.PathLike[str],
    areas: str | Sequence[str],
    hemispheres: str | Sequence[str],
    reference_img: nib.spatialimages.SpatialImage | str | os.PathLike[str],
    source: str = "mpm",
    pmap_threshold: float = 0.5,
    *,
    name: str = "seed",
    description: str = "",
    release: AtlasRelease | None = None,
) -> SeedMask:
    """Like :func:`build_seed_mask`, and keep what the sidecar needs (see :class:`SeedMask`)."""
    release = load_atlas_release() if release is None else release
    areas = check_areas(areas)
    hemis = normalize_hemispheres(hemispheres)
    check_source(source)
    check_threshold(pmap_threshold)
    atlas_dir = Path(atlas_dir)
    reference_file = str(reference_img) if isinstance(reference_img, (str, os.PathLike)) else None
    ref_shape, ref_affine, ref_header = _reference_grid(reference_img)

    tables = {h: read_label_table(_atlas_file(atlas_dir, release.labels_file(h))) for h in hemis}
    full_names = _resolve_areas(areas, tables, atlas_dir, release)

    union = np.zeros(ref_shape, dtype=bool)
    label_values: dict[str, dict[str, int]] = {}
    n_by_hemi: dict[str, int] = {}
    files: list[str] = []
    for hemi in hemis:
        label_values[hemi] = {a: tables[hemi][a] for a in full_names}
        files.append(release.labels_file(hemi))
        if source == "mpm":
            files.append(release.mpm_file(hemi))
            hemi_mask = _mpm_mask(atlas_dir, release, hemi, label_values[hemi], ref_shape, ref_affine)
        else:
            hemi_mask = np.zeros(ref_shape, dtype=bool)
            for area in full_names:
                files.append(release.pmap_file(area, hemi))
                hemi_mask |= _pmap_mask(
                    atlas_dir, release, area, hemi, pmap_threshold, ref_shape, ref_affine
                )
        n_by_hemi[hemi] = int(hemi_mask.sum())
        union |= hemi_mask

    if not union.any():
        where = f"the grid of {Path(reference_file).name}" if reference_file else "the reference grid"
        space = space_entity(reference_file)
        raise InputDataError(
            f"Seed areas {list(full_names)} have 0 voxels on {where} (shape {ref_shape}, world "
            f"box {_world_box(ref_shape, ref_affine)} mm): check that it is in {release.space}"
            + (f" (found space {space!r} in its file name)." if space else ".")
        )

    out = nib.Nifti1Image(union.astype(np.uint8), ref_affine)
    if isinstance(ref_header, nib.Nifti1Header):
        sform_code = int(ref_header["sform_code"]) or 2
        qform_code = int(ref_header["qform_code"]) or sform_code
        out.set_sform(ref_affine, code=sform_code)
        out.set_qform(ref_affine, code=qform_code)
    out.header.set_xyzt_units("mm")
    out.header["descrip"] = f"fcflow {name}: Julich-Brain {release.version}"[:79].encode()
    return SeedMask(
        img=out,
        name=name,
        areas=full_names,
        hemispheres=hemis,
        source=source,
        pmap_threshold=pmap_threshold if source == "pmap" else None,
        label_values=label_values,
        n_voxels_by_hemisphere=n_by_hemi,
        atlas_dir=atlas_dir,
        files=tuple(dict.fromkeys(files)),
        description=description,
        reference_file=reference_file,
    )


def build_seed_from_definition(
    atlas_dir: str | os.PathLike[str],
    definition: SeedDefinition,
    reference_img: nib.spatialimages.SpatialImage | str | os.PathLike[str],
) -> SeedMask:
    """:func:`build_seed` for a :class:`SeedDefinition`."""
    return build_seed(
        atlas_dir, definition.areas, definition.hemispheres, reference_img,
        source=definition.rule, pmap_threshold=definition.pmap_threshold,
        name=definition.name, description=definition.description,
    )


def center_of_mass_mm(img: nib.spatialimages.SpatialImage) -> list[float]:
    """World (mm) centre of mass of a binary mask; NaNs if it is empty."""
    ijk = np.argwhere(np.asarray(img.dataobj) > 0)
    if ijk.size == 0:
        return [float("nan")] * 3
    return [float(c) for c in nib.affines.apply_affine(img.affine, ijk).mean(axis=0)]


def _atlas_file(atlas_dir: Path, relpath: str) -> Path:
    path = find_atlas_file(atlas_dir, relpath)
    if path is None:
        raise AtlasError(
            f"The Julich-Brain folder {atlas_dir} lacks {Path(relpath).name} (EBRAINS path "
            f"{relpath}): fetch it with resolve_atlas_dir() or pass a complete --julich-dir."
        )
    return path


def _resolve_areas(
    areas: Sequence[str], tables: Mapping[str, Mapping[str, int]], atlas_dir: Path,
    release: AtlasRelease,
) -> tuple[str, ...]:
    resolved = []
    for area in areas:
        found: dict[str, str] = {}
        errors: dict[str, AtlasError] = {}
        for hemi, table in tables.items():
            try:
                found[hemi] = resolve_area_name(
                    area, sorted(table), where=f"the {hemi}-hemisphere label table "
                    f"{Path(release.labels_file(hemi)).name} in {atlas_dir}"
                )
            except AtlasError as exc:
                errors[hemi] = exc
        if not found:
            raise next(iter(errors.values()))
        if errors:
            hemi = next(iter(errors))
            present = sorted(found)
            raise AtlasError(
                f"Area {next(iter(found.values()))!r} is not in the {hemi}-hemisphere label table "
                f"{Path(release.labels_file(hemi)).name} in {atlas_dir} (it is in the {present[0]} "
                f"one): restrict the seed to hemispheres={present} or drop the area."
            )
        names = set(found.values())
        if len(names) > 1:
            raise AtlasError(f"Area {area!r} means {sorted(names)} in the two hemispheres' tables.")
        resolved.append(names.pop())
    return tuple(dict.fromkeys(resolved))


def _reference_grid(
    reference_img: nib.spatialimages.SpatialImage | str | os.PathLike[str],
) -> tuple[tuple[int, int, int], NDArray[np.float64], Any]:
    if isinstance(reference_img, (str, os.PathLike)):
        try:
            reference_img = nib.load(reference_img)
        except (FileNotFoundError, nib.filebasedimages.ImageFileError) as exc:
            raise InputDataError(f"Cannot read the reference image {reference_img}: {exc}.") from None
    if not isinstance(reference_img, nib.spatialimages.SpatialImage) or reference_img.ndim not in (3, 4):
        raise InputDataError(
            f"'reference_img' must be a 3D or 4D image (or its path). Got {reference_img!r}."
        )
    affine = np.asarray(reference_img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise InputDataError(f"The reference image has a singular affine: {affine.tolist()}.")
    return tuple(int(n) for n in reference_img.shape[:3]), affine, reference_img.header  # type: ignore[return-value]


def resample_to_reference(
    data: NDArray[Any], affine: NDArray[np.float64], ref_shape: tuple[int, int, int],
    ref_affine: NDArray[np.float64], interpolation: str,
) -> NDArray[Any]:
    """``data`` (on ``affine``) resampled onto the reference grid with nilearn's ``resample_img``.

    ``interpolation`` is nilearn's (``"nearest"`` for labels and masks, ``"linear"`` for
    probabilities). Only the non-zero bounding box is resampled (same result, much less work).
    """
    # Imported here: nilearn is heavy and only this step needs it.
    from nilearn.image import resample_img
    from nilearn.image.resampling import BoundingBoxError

    # Crop to the non-zero box first (+1 voxel margin for trilinear): same result, much less work.
    nz = np.argwhere(data)
    if nz.size == 0:
        return np.zeros(ref_shape, dtype=data.dtype)
    lo = np.maximum(nz.min(0) - 1, 0)
    hi = np.minimum(nz.max(0) + 2, data.shape)
    crop = np.ascontiguousarray(data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    crop_affine = affine.copy()
    crop_affine[:3, 3] = nib.affines.apply_affine(affine, lo)
    img = nib.Nifti1Image(crop, crop_affine)
    with warnings.catch_warnings():
        # nilearn warns about casting and non-diagonal affines; neither matters here
        warnings.simplefilter("ignore")
        try:
            out = resample_img(
                img, target_affine=ref_affine, target_shape=ref_shape,
                interpolation=interpolation, force_resample=True, copy_header=True, fill_value=0,
            )
        except BoundingBoxError:  # the reference grid does not reach the area: nothing to keep
            return np.zeros(ref_shape, dtype=data.dtype)
    return np.asarray(out.dataobj)


def _mpm_mask(
    atlas_dir: Path, release: AtlasRelease, hemi: str, values: Mapping[str, int],
    ref_shape: tuple[int, int, int], ref_affine: NDArray[np.float64],
) -> NDArray[np.bool_]:
    path = _atlas_file(atlas_dir, release.mpm_file(hemi))
    img = nib.load(path)
    if img.ndim != 3:
        raise AtlasError(f"The MPM {path} must be a 3D label image. Got shape {img.shape}.")
    labels = np.asanyarray(img.dataobj)
    if not np.issubdtype(labels.dtype, np.integer):
        labels = np.rint(labels).astype(np.int32)
    for area, value in values.items():
        if not np.any(labels == value):
            warnings.warn(
                f"Area {area!r} (grey value {value}) has 0 voxels in the {hemi}-hemisphere MPM "
                f"{path.name}: the seed gets nothing from it in that hemisphere.",
                stacklevel=4,
            )
    selected = np.isin(labels, list(values.values())).astype(np.uint8)
    # Label maps take nearest neighbour: a voxel keeps the area at its centre, never a blend.
    return resample_to_reference(selected, img.affine, ref_shape, ref_affine, "nearest") > 0


def _pmap_mask(
    atlas_dir: Path, release: AtlasRelease, area: str, hemi: str, threshold: float,
    ref_shape: tuple[int, int, int], ref_affine: NDArray[np.float64],
) -> NDArray[np.bool_]:
    relpath = release.pmap_file(area, hemi)
    path = find_atlas_file(atlas_dir, relpath)
    if path is None:
        raise AtlasError(
            f"source='pmap' needs the probability map {Path(relpath).name} of {area!r}, which the "
            f"Julich-Brain folder {atlas_dir} lacks: fetch it with resolve_atlas_dir("
            f"with_pmaps_for=[{area!r}]) or add it (EBRAINS path {relpath}), or use source='mpm'."
        )
    img = nib.load(path)
    prob = np.asarray(img.dataobj, dtype=np.float32)
    if prob.ndim != 3 or np.nanmin(prob) < 0 or np.nanmax(prob) > 1 + 1e-4:
        raise AtlasError(
            f"The probability map {path} must be 3D with values in [0, 1]. Got shape {prob.shape}, "
            f"range [{np.nanmin(prob):g}, {np.nanmax(prob):g}]."
        )
    # Resample the probabilities, then threshold: thresholding first and resampling a binary map
    # would move the boundary by up to half an atlas voxel on coarse grids.
    resampled = resample_to_reference(np.nan_to_num(prob), img.affine, ref_shape, ref_affine, "linear")
    return resampled >= threshold - 1e-6


def voxel_volume_mm3(affine: NDArray[np.float64]) -> float:
    """Volume of one voxel of ``affine``, in mm^3."""
    return float(abs(np.linalg.det(affine[:3, :3])))


def _world_box(shape: Sequence[int], affine: NDArray[np.float64]) -> list[list[float]]:
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    xyz = nib.affines.apply_affine(affine, corners)
    return [np.round(xyz.min(0), 1).tolist(), np.round(xyz.max(0), 1).tolist()]
