"""Tests for the streaming masked NIfTI reader, against nibabel's get_fdata."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from fcflow.errors import InputDataError
from fcflow.niftiio import read_masked_bold, unmask

SHAPE = (7, 8, 9)
N_TIME = 11


def _affine():
    affine = np.diag([2.0, 2.5, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    return affine


def _mask_img(rng):
    mask = rng.random(SHAPE) > 0.4
    return nib.Nifti1Image(mask.astype(np.uint8), _affine())


def _bold_img(rng, dtype, slope=None, inter=None):
    if np.dtype(dtype).kind == "f":
        data = (rng.normal(size=SHAPE + (N_TIME,)) * 50 + 800).astype(dtype)
    else:
        data = rng.integers(-3000, 3000, size=SHAPE + (N_TIME,)).astype(dtype)
    img = nib.Nifti1Image(data, _affine())
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((2.0, 2.5, 3.0, 1.5))
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    return img


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize(
    ("dtype", "slope", "inter"),
    [(np.float32, None, None), (np.int16, 0.25, 100.0), (np.uint8, None, None), (np.float64, None, None)],
)
def test_read_masked_bold_matches_nibabel(tmp_path, suffix, dtype, slope, inter):
    rng = np.random.default_rng(0)
    img = _bold_img(rng, dtype, slope, inter)
    bold_file = tmp_path / f"bold{suffix}"
    nib.save(img, bold_file)
    mask_img = _mask_img(rng)
    data, info = read_masked_bold(bold_file, mask_img)

    reference_img = nib.load(bold_file)
    mask = mask_img.get_fdata() > 0
    expected = reference_img.get_fdata()[mask].T
    assert data.dtype == np.float32
    assert data.shape == (N_TIME, mask.sum())
    np.testing.assert_allclose(data, expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(info.mean, expected.mean(axis=0), rtol=1e-6)
    assert info.t_r == pytest.approx(1.5)
    assert info.shape == SHAPE + (N_TIME,)
    if slope is not None:
        assert (info.scl_slope, info.scl_inter) == (slope, inter)
    # Round trip to the grid in the order nilearn's maskers use.
    back = unmask(data[3], info.mask, info.affine)
    np.testing.assert_allclose(back.get_fdata()[mask], expected[3], rtol=1e-6)


def test_read_masked_bold_in_calling_thread(tmp_path):
    rng = np.random.default_rng(1)
    bold_file = tmp_path / "bold.nii.gz"
    nib.save(_bold_img(rng, np.float32), bold_file)
    mask_img = _mask_img(rng)
    threaded, _ = read_masked_bold(bold_file, mask_img)
    single, _ = read_masked_bold(bold_file, mask_img, threads=0)
    np.testing.assert_array_equal(threaded, single)


def test_read_masked_bold_milliseconds_t_r(tmp_path):
    rng = np.random.default_rng(2)
    img = _bold_img(rng, np.float32)
    img.header.set_xyzt_units("mm", "msec")
    img.header.set_zooms((2.0, 2.5, 3.0, 1500.0))
    nib.save(img, tmp_path / "bold.nii")
    _, info = read_masked_bold(tmp_path / "bold.nii", _mask_img(rng))
    assert info.t_r == pytest.approx(1.5)


def test_read_masked_bold_rejects_3d(tmp_path):
    rng = np.random.default_rng(3)
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), _affine()), tmp_path / "b.nii.gz")
    with pytest.raises(InputDataError, match=r"'bold_file' must be a 4D image.*b\.nii\.gz"):
        read_masked_bold(tmp_path / "b.nii.gz", _mask_img(rng))


def test_read_masked_bold_rejects_nonfinite(tmp_path):
    rng = np.random.default_rng(4)
    img = _bold_img(rng, np.float32)
    data = np.asarray(img.dataobj).copy()
    mask_img = _mask_img(rng)
    inside = np.argwhere(mask_img.get_fdata() > 0)
    data[tuple(inside[0])][2] = np.nan
    data[tuple(inside[1])][5] = np.inf
    nib.save(nib.Nifti1Image(data, _affine()), tmp_path / "bad.nii.gz")
    with pytest.raises(InputDataError, match=r"bad\.nii\.gz must hold finite.*Got 2 NaN or Inf.*volume 2"):
        read_masked_bold(tmp_path / "bad.nii.gz", mask_img)


def test_read_masked_bold_ignores_nonfinite_outside_mask(tmp_path):
    rng = np.random.default_rng(5)
    img = _bold_img(rng, np.float32)
    data = np.asarray(img.dataobj).copy()
    mask_img = _mask_img(rng)
    outside = np.argwhere(mask_img.get_fdata() == 0)
    data[tuple(outside[0])][:] = np.nan
    nib.save(nib.Nifti1Image(data, _affine()), tmp_path / "ok.nii")
    out, _ = read_masked_bold(tmp_path / "ok.nii", mask_img)
    assert np.isfinite(out).all()


def test_read_masked_bold_rejects_other_grid(tmp_path):
    rng = np.random.default_rng(6)
    nib.save(_bold_img(rng, np.float32), tmp_path / "bold.nii.gz")
    wrong_shape = nib.Nifti1Image(np.ones((7, 8, 10), np.uint8), _affine())
    with pytest.raises(InputDataError, match=r"'mask' must be on the grid of the BOLD run .*bold\.nii\.gz .*Got shape \(7, 8, 10\)"):
        read_masked_bold(tmp_path / "bold.nii.gz", wrong_shape)
    shifted = _affine()
    shifted[0, 3] += 1.0
    wrong_affine = nib.Nifti1Image(np.ones(SHAPE, np.uint8), shifted)
    with pytest.raises(InputDataError, match=r"'mask' must be on the grid.*different affine"):
        read_masked_bold(tmp_path / "bold.nii.gz", wrong_affine)


def test_read_masked_bold_rejects_empty_mask(tmp_path):
    rng = np.random.default_rng(7)
    nib.save(_bold_img(rng, np.float32), tmp_path / "bold.nii")
    empty = nib.Nifti1Image(np.zeros(SHAPE, np.uint8), _affine())
    with pytest.raises(InputDataError, match=r"'mask' must contain at least one voxel"):
        read_masked_bold(tmp_path / "bold.nii", empty)


@pytest.mark.parametrize("threads", [0, 1])
def test_read_masked_bold_truncated_gzip(tmp_path, threads):
    rng = np.random.default_rng(8)
    good = tmp_path / "bold.nii.gz"
    nib.save(_bold_img(rng, np.float32), good)
    payload = good.read_bytes()
    truncated = tmp_path / "sub-01_task-rest_bold.nii.gz"
    truncated.write_bytes(payload[: len(payload) * 2 // 3])
    with pytest.raises(InputDataError, match=r"sub-01_task-rest_bold\.nii\.gz.*re-run fMRIPrep or re-copy the file"):
        read_masked_bold(truncated, _mask_img(rng), threads=threads)


def test_read_masked_bold_corrupt_gzip(tmp_path):
    rng = np.random.default_rng(9)
    good = tmp_path / "bold.nii.gz"
    nib.save(_bold_img(rng, np.float32), good)
    payload = bytearray(good.read_bytes())
    middle = len(payload) // 2
    payload[middle : middle + 64] = bytes(64)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(bytes(payload))
    with pytest.raises(InputDataError, match=r"corrupt\.nii\.gz cannot be decompressed.*re-run fMRIPrep or re-copy the file"):
        read_masked_bold(corrupt, _mask_img(rng), threads=0)


def test_read_masked_bold_truncated_nii(tmp_path):
    rng = np.random.default_rng(10)
    good = tmp_path / "bold.nii"
    nib.save(_bold_img(rng, np.float32), good)
    short = tmp_path / "short.nii"
    short.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(InputDataError, match=r"short\.nii ended early while reading volume 10 of 11"):
        read_masked_bold(short, _mask_img(rng))


def test_read_masked_bold_missing_file(tmp_path):
    with pytest.raises(InputDataError, match=r"'bold_file' must be an existing file"):
        read_masked_bold(tmp_path / "none.nii.gz", _mask_img(np.random.default_rng(0)))


def test_read_masked_bold_not_nifti(tmp_path):
    junk = tmp_path / "junk.nii.gz"
    with gzip.open(junk, "wb") as handle:
        handle.write(b"\x00" * 2000)
    with pytest.raises(InputDataError, match=r"'bold_file' must be a NIfTI-1 or NIfTI-2 image"):
        read_masked_bold(junk, _mask_img(np.random.default_rng(0)))
