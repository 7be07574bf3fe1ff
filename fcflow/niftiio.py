"""Read the in-mask voxels of a 4D NIfTI BOLD run in one streaming pass.

nibabel inflates a whole ``.nii.gz`` into memory (and, through ``gzip.GzipFile.readinto``, briefly
twice), then nilearn copies the 4D array to C order before masking. fcflow only needs the in-mask
voxels as a ``(n_timepoints, n_voxels)`` float32 array, so :func:`read_masked_bold` decompresses the
file once, volume by volume, with an explicit backend (``isal.igzip_threaded`` for ``.nii.gz``,
plain buffered reads for ``.nii``) and gathers the in-mask voxels of each volume straight into the
output. Peak memory is the output plus one volume.

Voxel order is the C order of the mask (``np.nonzero(mask)``), as in nilearn's ``NiftiMasker``,
so the maps written back with a masker's ``inverse_transform`` or :func:`unmask` line up.
:func:`smooth_map` smooths such a map on its grid (the recipe's ``smoothing_fwhm``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from fcflow.errors import InputDataError

__all__ = ["MaskedBoldInfo", "read_masked_bold", "load_mask", "unmask", "smooth_map"]

# Affines are stored as float32 in the header: allow rounding, not a different grid.
_AFFINE_ATOL_MM = 1e-3
_REREAD_HINT = "re-run fMRIPrep or re-copy the file"


@dataclass(frozen=True)
class MaskedBoldInfo:
    """What :func:`read_masked_bold` learnt about the run besides the voxel data.

    Attributes
    ----------
    bold_file : str
        The file that was read.
    shape : tuple of int
        Full 4D shape ``(x, y, z, n_timepoints)``.
    affine : ndarray of shape (4, 4)
        Voxel-to-world affine of the BOLD grid (nibabel's best affine).
    t_r : float or None
        Repetition time in seconds, from ``pixdim[4]`` and ``xyzt_units``; None when unset.
    on_disk_dtype : numpy.dtype
        Data type stored in the file.
    scl_slope, scl_inter : float
        Scaling applied to the stored values (1 and 0 when unset).
    mask : ndarray of bool, shape (x, y, z)
        The brain mask used; columns of the data follow ``np.nonzero(mask)``.
    mean : ndarray of shape (n_voxels,), float32
        Temporal mean of each in-mask voxel (for tSNR), computed in float64 in the same pass.
    """

    bold_file: str
    shape: tuple[int, int, int, int]
    affine: NDArray[np.float64]
    t_r: float | None
    on_disk_dtype: np.dtype
    scl_slope: float
    scl_inter: float
    mask: NDArray[np.bool_]
    mean: NDArray[np.float32]

    @property
    def n_timepoints(self) -> int:
        return self.shape[3]

    @property
    def n_voxels(self) -> int:
        return int(self.mean.shape[0])


def load_mask(
    mask: str | os.PathLike[str] | nib.spatialimages.SpatialImage,
) -> tuple[NDArray[np.bool_], NDArray[np.float64], str]:
    """Return ``(mask_bool, affine, name)`` of a 3D mask image or file (non-zero voxels are in)."""
    name = str(mask) if isinstance(mask, (str, os.PathLike)) else "<mask image>"
    mask_img = nib.load(mask) if isinstance(mask, (str, os.PathLike)) else mask
    data = np.asanyarray(mask_img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputDataError(
            f"'mask' must be a 3D image. Got shape {data.shape!r} in {name}."
        )
    return data != 0, np.asarray(mask_img.affine, dtype=np.float64), name


def _open_stream(path: Path, threads: int):
    if path.name.endswith(".gz"):
        if threads > 0:
            from isal import igzip_threaded

            return igzip_threaded.open(path, "rb", threads=threads)
        from isal import igzip

        return igzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def _read_exactly(stream, buffer: memoryview, bold_file: str, what: str) -> None:
    """Fill ``buffer`` from ``stream``; a short read means a truncated file."""
    filled = 0
    total = len(buffer)
    while filled < total:
        n = stream.readinto(buffer[filled:])
        if not n:
            raise InputDataError(
                f"BOLD file {bold_file} ended early while reading {what} "
                f"({filled} of {total} bytes): the file is truncated; {_REREAD_HINT}."
            )
        filled += n


def _parse_header(stream, bold_file: str) -> nib.Nifti1Header:
    first = bytearray(4)
    _read_exactly(stream, memoryview(first), bold_file, "the NIfTI header")
    size_le = int.from_bytes(first, "little")
    size_be = int.from_bytes(first, "big")
    if 348 in (size_le, size_be):
        header_class, size = nib.Nifti1Header, 348
    elif 540 in (size_le, size_be):
        header_class, size = nib.Nifti2Header, 540
    else:
        raise InputDataError(
            f"'bold_file' must be a NIfTI-1 or NIfTI-2 image. Got a header size of {size_le} "
            f"in {bold_file}; {_REREAD_HINT}."
        )
    block = bytearray(size)
    block[:4] = first
    _read_exactly(stream, memoryview(block)[4:], bold_file, "the NIfTI header")
    return header_class(binaryblock=bytes(block), check=False)


def _skip(stream, n_bytes: int, bold_file: str) -> None:
    chunk = bytearray(min(max(n_bytes, 1), 1 << 16))
    remaining = n_bytes
    while remaining > 0:
        view = memoryview(chunk)[: min(remaining, len(chunk))]
        _read_exactly(stream, view, bold_file, "the NIfTI extensions")
        remaining -= len(view)


def read_masked_bold(
    bold_file: str | os.PathLike[str],
    mask: str | os.PathLike[str] | nib.spatialimages.SpatialImage,
    *,
    threads: int = 1,
) -> tuple[NDArray[np.float32], MaskedBoldInfo]:
    """Read the in-mask voxels of a 4D BOLD run, streaming one volume at a time.

    Parameters
    ----------
    bold_file : str or path
        4D ``.nii`` or ``.nii.gz`` (NIfTI-1 or NIfTI-2), e.g. fMRIPrep's ``desc-preproc_bold``.
    mask : str, path or nibabel image
        3D brain mask on the same grid (shape and affine) as the run; non-zero voxels are in.
    threads : int, default=1
        Decompression threads for ``.nii.gz`` (``isal.igzip_threaded``; one reader thread
        overlaps inflation with the gather). 0 decompresses in the calling thread.

    Returns
    -------
    data : ndarray of shape (n_timepoints, n_voxels), float32
        Scaled values (``scl_slope``/``scl_inter`` applied) of the in-mask voxels, in the C
        order of the mask.
    info : MaskedBoldInfo
        Grid, t_r, data type, scaling, the mask and the temporal mean of each voxel.

    Raises
    ------
    InputDataError
        The file is not 4D, is on another grid than the mask, is truncated or corrupt, has a
        non-numeric data type, or holds NaN/Inf inside the mask.
    """
    path = Path(bold_file)
    name = str(path)
    mask_bool, mask_affine, mask_name = load_mask(mask)
    try:
        stream = _open_stream(path, threads)
    except FileNotFoundError:
        raise InputDataError(f"'bold_file' must be an existing file. Got {name!r}.") from None
    try:
        with stream:
            return _read_stream(stream, name, mask_bool, mask_affine, mask_name)
    except InputDataError:
        raise
    except (EOFError, OSError, ValueError) as exc:
        # isal raises EOFError on a truncated stream and OSError/BadGzipFile (or its own
        # IsalError, an OSError) on a corrupt one.
        raise InputDataError(
            f"BOLD file {name} cannot be decompressed ({type(exc).__name__}: {exc}); "
            f"the file is truncated or corrupt: {_REREAD_HINT}."
        ) from exc


def _read_stream(stream, name, mask_bool, mask_affine, mask_name):
    header = _parse_header(stream, name)
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) != 4:
        raise InputDataError(
            f"'bold_file' must be a 4D image. Got shape {shape!r} in {name}."
        )
    dtype = header.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "iuf":
        raise InputDataError(
            f"'bold_file' must store integer or real floating-point values. Got data type "
            f"{dtype!r} in {name}."
        )
    affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    if mask_bool.shape != shape[:3]:
        raise InputDataError(
            f"'mask' must be on the grid of the BOLD run {name} (shape {shape[:3]!r}). Got shape "
            f"{mask_bool.shape!r} in {mask_name}: resample the mask to the BOLD grid or use "
            "the brain mask fMRIPrep wrote for this run."
        )
    if not np.allclose(mask_affine, affine, rtol=0, atol=_AFFINE_ATOL_MM):
        raise InputDataError(
            f"'mask' must be on the grid of the BOLD run {name} (affine within "
            f"{_AFFINE_ATOL_MM} mm). Got a different affine in {mask_name}:\n{mask_affine}\n"
            f"vs the run's\n{affine}\nCheck that both are in the same space."
        )
    slope, inter = header.get_slope_inter()
    slope = 1.0 if slope is None else float(slope)
    inter = 0.0 if inter is None else float(inter)
    t_r = _header_t_r(header)

    n_time = shape[3]
    n_vox_volume = int(np.prod(shape[:3]))
    # Column order is the C order of the mask (as nilearn); volumes are stored in F order.
    flat_index = np.ravel_multi_index(np.nonzero(mask_bool), shape[:3], order="F")
    n_voxels = flat_index.size
    if n_voxels == 0:
        raise InputDataError(f"'mask' must contain at least one voxel. Got 0 in {mask_name}.")

    offset = int(header.get_data_offset())
    _skip(stream, offset - header.sizeof_hdr, name)

    data = np.empty((n_time, n_voxels), dtype=np.float32)
    total = np.zeros(n_voxels, dtype=np.float64)
    volume = np.empty(n_vox_volume, dtype=dtype)
    raw = memoryview(volume.view(np.uint8))
    scaled = slope != 1.0 or inter != 0.0
    check_finite = dtype.kind == "f"
    n_nonfinite = 0
    first_bad = None
    for t in range(n_time):
        _read_exactly(stream, raw, name, f"volume {t} of {n_time}")
        if t == n_time - 1:
            # gzip checks its CRC only at the end of the stream: reach it before trusting
            # the values, so that a corrupt file is reported as such, not as NaNs.
            stream.read(1)
        values = volume[flat_index]
        if scaled:
            values = values.astype(np.float64) * slope + inter
        if check_finite:
            bad = np.count_nonzero(~np.isfinite(values))
            if bad:
                n_nonfinite += bad
                first_bad = t if first_bad is None else first_bad
        with np.errstate(over="ignore", invalid="ignore"):
            data[t] = values
            total += data[t]
    if n_nonfinite:
        raise InputDataError(
            f"BOLD file {name} must hold finite values inside the mask. Got {n_nonfinite} NaN "
            f"or Inf values (first in volume {first_bad}) among {n_time} x {n_voxels} in-mask "
            f"values: {_REREAD_HINT}, or check the brain mask."
        )
    info = MaskedBoldInfo(
        bold_file=name,
        shape=shape,
        affine=affine,
        t_r=t_r,
        on_disk_dtype=dtype,
        scl_slope=slope,
        scl_inter=inter,
        mask=mask_bool,
        mean=(total / n_time).astype(np.float32),
    )
    return data, info


def _header_t_r(header) -> float | None:
    zooms = header.get_zooms()
    if len(zooms) < 4 or not zooms[3]:
        return None
    t_unit = header.get_xyzt_units()[1]
    factor = {"msec": 1e-3, "usec": 1e-6}.get(t_unit, 1.0)
    return float(zooms[3]) * factor


def unmask(
    values: NDArray, mask: NDArray[np.bool_], affine: NDArray[np.float64]
) -> nib.Nifti1Image:
    """Put per-voxel ``values`` of shape (n_voxels,) back on the grid as a float32 3D image.

    Voxels outside the mask are 0; the order is that of :func:`read_masked_bold`.
    """
    volume = np.zeros(mask.shape, dtype=np.float32)
    volume[mask] = values
    return nib.Nifti1Image(volume, affine)


def smooth_map(
    values: NDArray,
    mask: NDArray[np.bool_],
    affine: NDArray[np.float64],
    smoothing_fwhm: float,
) -> NDArray[np.float32]:
    """Smooth a map over the brain mask with an isotropic Gaussian kernel, as nilearn does.

    The map is put back on its grid (0 outside the mask, :func:`unmask`), smoothed with
    :func:`nilearn.image.smooth_img` (kernel widths in voxels from the affine's voxel sizes) and
    read back at the mask's voxels.

    Parameters
    ----------
    values : ndarray of shape (n_voxels,)
        One value per in-mask voxel, in the C order of ``mask``; nan where the map has no value.
    mask : ndarray of bool, shape (x, y, z)
        The run's brain mask.
    affine : ndarray of shape (4, 4)
        Voxel-to-world affine of the grid (mm).
    smoothing_fwhm : float
        Full width at half maximum of the kernel, in mm.

    Returns
    -------
    smoothed : ndarray of shape (n_voxels,), float32
        nan where ``values`` is nan (nilearn counts such a voxel as 0 for its neighbours).

    Raises
    ------
    ValueError
        ``smoothing_fwhm`` is not a positive finite number.

    Notes
    -----
    fcflow smooths each run's first-level maps, not the BOLD data:

    * the seed signal stays that of the unsmoothed data: smoothing a small seed mixes its
      neighbours into it;
    * it costs almost nothing (one 3-D filter per map), whereas smoothing the 4-D run at 2 mm
      would roughly triple the first level's time per run;
    * for the gPPI betas it equals smoothing the cleaned data: for a fixed design the fit is
      linear in the data, and the seed regressors come from unsmoothed data either way;
    * for a correlation (rest, and background FC) it smooths the Fisher z map, which is not the
      same as correlating smoothed data. A smoothed z map (Fisher z, or gPPI's z statistic) no
      longer has the per-voxel null SD its degrees of freedom imply; the group level uses the
      between-subject variance, which does not need it;
    * at the edge of the brain mask the zeros outside attenuate a voxel by a factor that depends
      only on the mask: in MNI space nearly the same for every subject, it scales all subjects'
      values at that voxel alike and cancels in the group t.

    For comparison: XCP-D smooths the denoised BOLD (``--smoothing``, 6 mm FWHM by default) and
    writes it as a separate output beside the unsmoothed one; CONN smooths in its preprocessing
    (8 mm by default); nilearn's maskers smooth the data they extract (``smoothing_fwhm``).
    """
    from nilearn.image import smooth_img

    if isinstance(smoothing_fwhm, bool) or not (np.isfinite(smoothing_fwhm) and smoothing_fwhm > 0):
        raise InputDataError(f"'smoothing_fwhm' must be a positive number of mm. Got {smoothing_fwhm!r}.")
    volume = np.asarray(smooth_img(unmask(values, mask, affine), smoothing_fwhm).dataobj)
    smoothed = volume[mask].astype(np.float32, copy=False)
    return np.where(np.isnan(values), np.float32(np.nan), smoothed)


#: Columns per block of :func:`compute_tsnr` (bounds its float64 working copy)
_BLOCK_COLUMNS = 8192


def compute_tsnr(data: NDArray[np.floating]) -> NDArray[np.float64]:
    """Temporal SNR of each column: mean over standard deviation in time (raw data, all volumes).

    The one definition of tSNR in fcflow: the report's tSNR map and the seed tSNR of
    :func:`fcflow.atlas.seedqc.seed_qc` both use it, so the map and the QC table agree. Constant columns
    give nan. Standard deviation with ddof=0, as fMRIPrep's.

    Parameters
    ----------
    data : ndarray of shape (n_timepoints, n_voxels)

    Returns
    -------
    tsnr : ndarray of shape (n_voxels,)
    """
    data = np.asarray(data)
    mean = np.empty(data.shape[1])
    std = np.empty(data.shape[1])
    # In column blocks: numpy's std(dtype=float64) of the whole run would hold a float64 copy of
    # it (0.56 GB for a 2 mm run of 300 volumes), twice the run itself.
    for start in range(0, data.shape[1], _BLOCK_COLUMNS):
        block = data[:, start: start + _BLOCK_COLUMNS].astype(np.float64)
        mean[start: start + block.shape[1]] = block.mean(axis=0)
        std[start: start + block.shape[1]] = block.std(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(std > 0, mean / std, np.nan)
