"""Per-run seed checks: the seed inside a run's brain mask, its coverage and tSNR (:func:`seed_qc`).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from fcflow.config import SeedConfig
from fcflow.errors import InputDataError
from fcflow.io import sha256_file

try:  # POSIX only; on other systems concurrent cache writers are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]
from fcflow.atlas.release import space_entity
from fcflow.atlas.seeds import center_of_mass_mm, voxel_volume_mm3


@dataclass(frozen=True)
class SeedQC:
    """Seed quality in one run (see :func:`seed_qc`); ``asdict``/``to_dict`` give JSON-ready values."""

    run_name: str
    seed_name: str
    n_voxels_seed: int
    n_voxels: int
    volume_mm3: float
    coverage: float
    min_coverage: float
    excluded: bool
    exclusion_reason: str | None = None
    n_timepoints: int | None = None
    tsnr_median: float | None = None
    tsnr_mean: float | None = None
    tsnr_seed_signal: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mask_seed(
    seed_img: nib.spatialimages.SpatialImage, brain_mask_img: nib.spatialimages.SpatialImage,
    run_name: str = "the run",
) -> nib.Nifti1Image:
    """Intersect a seed with a brain mask on the same grid (uint8 0/1)."""
    seed, brain = _same_grid_masks(seed_img, brain_mask_img, run_name)
    return nib.Nifti1Image((seed & brain).astype(np.uint8), seed_img.affine, seed_img.header)


def seed_qc(
    seed_img: nib.spatialimages.SpatialImage | str | os.PathLike[str],
    brain_mask_img: nib.spatialimages.SpatialImage | str | os.PathLike[str],
    bold_data_or_img: NDArray[Any] | nib.spatialimages.SpatialImage | str | os.PathLike[str] | None = None,
    min_coverage: float = SeedConfig.min_coverage,
    run_name: str = "the run",
    *,
    seed_name: str = "seed",
) -> SeedQC:
    """Check a seed in one run: voxels inside the brain mask, coverage, tSNR; flag exclusion.

    Parameters
    ----------
    seed_img : nibabel image or path
        Seed mask on the run's grid (from :func:`build_seed_mask` with the run as reference).
    brain_mask_img : nibabel image or path
        The run's brain mask (e.g. fMRIPrep's ``desc-brain_mask``), same grid.
    bold_data_or_img : 4D image, path, ndarray of shape (n_timepoints, n_voxels) or 4D array, optional
        The run's time series for tSNR. A 2D array holds either the seed voxels inside the brain
        mask or all brain-mask voxels (both in C order of the grid).
    min_coverage : float, default=0.8
        Minimum fraction of the seed (voxels on the run grid, before intersection) that must lie
        inside the brain mask; below it the run is flagged ``excluded`` with a reason and a
        warning.
    run_name : str, default="the run"
        Run identifier or BOLD file name, used in messages (its ``space-`` entity is quoted).
    seed_name : str, default="seed"

    Returns
    -------
    qc : SeedQC
        ``n_voxels_seed`` (before intersection), ``n_voxels`` and ``volume_mm3`` (inside the
        mask), ``coverage``, ``tsnr_median``/``tsnr_mean`` (over the seed voxels of each voxel's
        mean / std over time, std with ddof=0 as in fMRIPrep), ``tsnr_seed_signal`` (tSNR of the
        mean seed time series), ``excluded`` and ``exclusion_reason``.

    Raises
    ------
    InputDataError
        The seed has no voxel inside the brain mask (wrong space, most likely), or the images are
        not on one grid.
    """
    if not (isinstance(min_coverage, (int, float)) and 0 <= min_coverage <= 1):
        raise InputDataError(f"'min_coverage' must be a fraction in [0, 1]. Got {min_coverage!r}.")
    brain_mask_file = brain_mask_img
    seed_img = _load(seed_img, "seed_img")
    brain_mask_img = _load(brain_mask_img, "brain_mask_img")
    seed, brain = _same_grid_masks(seed_img, brain_mask_img, run_name)
    inside = seed & brain
    n_seed, n_in = int(seed.sum()), int(inside.sum())
    if n_in == 0:
        # the run name may lack the space entity that the BOLD or mask file name carries
        named = [run_name] + [
            f for f in (bold_data_or_img, brain_mask_file) if isinstance(f, (str, os.PathLike))
        ]
        space = next((sp for sp in map(space_entity, named) if sp), None)
        found = f" (found space {space!r} in its file name)" if space else ""
        raise InputDataError(
            f"Seed {seed_name!r} has 0 voxels inside the brain mask of {run_name} "
            f"({n_seed} seed voxels on its grid): check that the BOLD run is in "
            f"MNI152NLin2009cAsym{found}."
        )
    coverage = n_in / n_seed
    reason = None
    if coverage < min_coverage:
        reason = (
            f"{n_seed - n_in} of {n_seed} voxels of seed {seed_name!r} lie outside the brain mask "
            f"of {run_name}; coverage {coverage:.2f} is below the minimum of {min_coverage:.2f} "
            f"(min_coverage). Run excluded."
        )
        warnings.warn(reason, stacklevel=2)
    tsnr = (None, None, None, None)
    if bold_data_or_img is not None:
        series = _seed_series(bold_data_or_img, inside, brain, seed_img, run_name)
        tsnr = (series.shape[0], *_tsnr(series))
    return SeedQC(
        run_name=run_name,
        seed_name=seed_name,
        n_voxels_seed=n_seed,
        n_voxels=n_in,
        volume_mm3=round(n_in * voxel_volume_mm3(seed_img.affine), 3),
        coverage=coverage,
        min_coverage=float(min_coverage),
        excluded=reason is not None,
        exclusion_reason=reason,
        n_timepoints=tsnr[0],
        tsnr_median=tsnr[1],
        tsnr_mean=tsnr[2],
        tsnr_seed_signal=tsnr[3],
    )


def _load(img: Any, parameter: str) -> nib.spatialimages.SpatialImage:
    if isinstance(img, (str, os.PathLike)):
        try:
            return nib.load(img)
        except (FileNotFoundError, nib.filebasedimages.ImageFileError) as exc:
            raise InputDataError(f"Cannot read '{parameter}' {img}: {exc}.") from None
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise InputDataError(f"'{parameter}' must be a nibabel image or a path. Got {type(img).__name__}.")
    return img


def _same_grid_masks(
    seed_img: nib.spatialimages.SpatialImage, brain_mask_img: nib.spatialimages.SpatialImage,
    run_name: str,
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    if seed_img.shape[:3] != brain_mask_img.shape[:3] or not np.allclose(
        seed_img.affine, brain_mask_img.affine, atol=1e-3
    ):
        raise InputDataError(
            f"The seed and the brain mask of {run_name} are not on one grid (shapes "
            f"{seed_img.shape[:3]} and {brain_mask_img.shape[:3]}): build the seed with the run's "
            f"BOLD image as reference_img."
        )
    seed = np.asarray(seed_img.dataobj)
    brain = np.asarray(brain_mask_img.dataobj)
    return seed.reshape(seed.shape[:3]) > 0, brain.reshape(brain.shape[:3]) > 0


def _seed_series(
    bold: Any, inside: NDArray[np.bool_], brain: NDArray[np.bool_],
    seed_img: nib.spatialimages.SpatialImage, run_name: str,
) -> NDArray[np.float64]:
    if isinstance(bold, (str, os.PathLike, nib.spatialimages.SpatialImage)):
        img = _load(bold, "bold_data_or_img")
        if img.ndim != 4 or img.shape[:3] != inside.shape or not np.allclose(
            img.affine, seed_img.affine, atol=1e-3
        ):
            raise InputDataError(
                f"The BOLD image of {run_name} must be 4D on the seed's grid {inside.shape}. "
                f"Got shape {img.shape}."
            )
        # Read only the seed's bounding box: a gzipped run is otherwise loaded whole.
        ijk = np.argwhere(inside)
        lo, hi = ijk.min(0), ijk.max(0) + 1
        box = np.asarray(img.dataobj[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2], :], dtype=np.float64)
        return box[inside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]].T
    # select the seed's voxels before any conversion: a float64 copy of a whole run is 0.6 GB
    data = np.asarray(bold)
    if data.ndim == 4 and data.shape[:3] == inside.shape:
        return data[inside].T.astype(np.float64)
    if data.ndim == 2:
        if data.shape[1] == inside.sum():
            return data.astype(np.float64)
        if data.shape[1] == brain.sum():
            return data[:, inside[brain]].astype(np.float64)
    raise InputDataError(
        f"'bold_data_or_img' of {run_name} must be a 4D image, a 4D array on the seed's grid, or "
        f"an array of shape (n_timepoints, n_voxels) with n_voxels = {int(inside.sum())} (seed "
        f"voxels in the mask) or {int(brain.sum())} (brain-mask voxels). Got shape {data.shape}."
    )


def _tsnr(series: NDArray[np.float64]) -> tuple[float | None, float | None, float | None]:
    if series.shape[0] < 2:
        return None, None, None
    from fcflow.niftiio import compute_tsnr

    voxel_tsnr = compute_tsnr(series)
    signal = series.mean(axis=1)
    signal_std = signal.std()
    valid = voxel_tsnr[np.isfinite(voxel_tsnr)]
    return (
        float(np.median(valid)) if valid.size else None,
        float(valid.mean()) if valid.size else None,
        float(signal.mean() / signal_std) if signal_std > 0 else None,
    )


def seed_from_mask_file(
    mask_file: str | os.PathLike[str],
    reference_img: nib.spatialimages.SpatialImage | str | os.PathLike[str],
    *,
    name: str = "seed",
) -> tuple[nib.Nifti1Image, dict[str, Any]]:
    """Put a user's seed mask (any non-zero voxel) on a run's grid, by nearest neighbour.

    Returns the uint8 mask on the reference grid and a provenance sidecar (file, SHA-256, voxels,
    volume, centre of mass). A JSON sidecar beside the mask file (``<stem>.json``) is read for
    its ``Description`` (``MaskDescription``) and whether the mask is a stand-in (``StandIn``:
    the sidecar says ``"StandIn": true`` or its ``Type`` names a stand-in, as the simulator's
    stand-in pgACC does); the reports show a banner for a stand-in seed.
    """
    from nilearn.image import resample_to_img


    source = _load(mask_file, "mask_file")
    data = np.asanyarray(source.dataobj)
    binary = nib.Nifti1Image((data.reshape(data.shape[:3]) != 0).astype(np.uint8), source.affine)
    reference = _load(reference_img, "reference_img")
    grid = nib.Nifti1Image(np.zeros(reference.shape[:3], dtype=np.uint8), reference.affine)
    resampled = resample_to_img(binary, grid, interpolation="nearest", force_resample=True,
                                copy_header=True)
    img = nib.Nifti1Image((np.asanyarray(resampled.dataobj) > 0).astype(np.uint8), reference.affine)
    n_voxels = int(np.count_nonzero(img.dataobj))
    if n_voxels == 0:
        raise InputDataError(
            f"Seed {name!r} from {mask_file} has 0 voxels on the grid of {reference_img}: check that "
            "the mask and the BOLD run are in the same space."
        )
    sidecar = {
        "Seed": name,
        "Source": "mask file",
        "MaskFile": str(Path(mask_file).resolve()),
        "MaskSha256": sha256_file(mask_file),
        "Rule": "non-zero voxels of the mask file, resampled to the run's grid by nearest neighbour",
        "NumberOfVoxels": n_voxels,
        "VolumeMm3": round(n_voxels * voxel_volume_mm3(img.affine), 3),
        "CenterOfMassMm": center_of_mass_mm(img),
    }
    own = Path(str(mask_file).removesuffix(".gz").removesuffix(".nii") + ".json")
    if own.is_file():
        try:
            meta = json.loads(own.read_text())
        except (OSError, ValueError) as exc:
            raise InputDataError(f"The seed mask's sidecar {own} is not valid JSON ({exc}): fix or remove it.") from exc
        if isinstance(meta, dict):
            sidecar["MaskDescription"] = meta.get("Description")
            sidecar["StandIn"] = bool(meta.get("StandIn")) or "stand-in" in str(meta.get("Type", "")).lower()
    return img, sidecar
