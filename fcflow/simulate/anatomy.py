"""Brain geometry of the simulation on the MNI152NLin2009cAsym grid, from data nilearn ships.

nilearn ships the ICBM 2009a symmetric template, brain mask and grey/white-matter probability
maps at 1 mm (no download); they are close enough to 2009c asymmetric for a simulation. CSF is
what the brain mask holds beyond grey and white matter.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from fcflow.simulate.params import Region
from fcflow.templates import mni_grid

# Baseline intensity of a T2*-weighted EPI per tissue (arbitrary scanner units); CSF is brightest.
_INTENSITY = {"gm": 1000.0, "wm": 750.0, "csf": 1500.0, "head": 250.0}
# Grey-matter probability above which a voxel can belong to a region.
_REGION_GM = 0.25


@dataclass(frozen=True)
class Anatomy:
    """Tissue maps and voxel bookkeeping shared by every run of a study.

    Simulated voxels are the brain mask dilated by ~8 mm (the head); they are ordered brain
    voxels first, so ``data[:, :n_brain]`` is the brain.

    Attributes
    ----------
    shape, affine : grid of the outputs.
    voxels : ndarray of shape (n_voxels, 3)
        Integer grid indices of simulated voxels, brain first.
    n_brain : int
    gm, wm, csf : ndarray of shape (n_voxels,)
        Tissue probabilities (0 outside the brain).
    coords_mm : ndarray of shape (n_voxels, 3)
    bbox : tuple of slices
        Bounding box of the simulated voxels on the grid.
    """

    resolution_mm: float
    shape: tuple[int, int, int]
    affine: NDArray[np.float64]
    voxels: NDArray[np.intp]
    n_brain: int
    gm: NDArray[np.float32]
    wm: NDArray[np.float32]
    csf: NDArray[np.float32]
    coords_mm: NDArray[np.float64]
    bbox: tuple[slice, slice, slice]
    edge: NDArray[np.float32]
    baseline: NDArray[np.float32]

    @property
    def n_voxels(self) -> int:
        return int(self.voxels.shape[0])

    def to_volume(self, values: NDArray, fill: float = 0, dtype: type = np.float32) -> NDArray:
        """Scatter per-voxel ``values`` into a full 3D grid."""
        vol = np.full(self.shape, fill, dtype=dtype)
        vol[tuple(self.voxels.T)] = values
        return vol

    def bbox_indices(self) -> tuple[NDArray[np.intp], ...]:
        """Indices of simulated voxels inside the bounding box array."""
        return tuple(self.voxels[:, i] - self.bbox[i].start for i in range(3))

    def brain_mask_img(self) -> nib.Nifti1Image:
        mask = np.zeros(self.shape, np.uint8)
        mask[tuple(self.voxels[: self.n_brain].T)] = 1
        return make_img(mask, self.affine)

    def mask_img(self, values: NDArray[np.bool_]) -> nib.Nifti1Image:
        """uint8 mask image from a boolean per simulated voxel."""
        return make_img(self.to_volume(values.astype(np.uint8), dtype=np.uint8), self.affine)


def make_img(data: NDArray, affine: NDArray[np.float64]) -> nib.Nifti1Image:
    """A NIfTI-1 image with MNI qform/sform codes and mm units, as fMRIPrep writes them."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=4)
    img.header.set_sform(affine, code=4)
    img.header.set_xyzt_units("mm", "sec")
    return img


def _resample_1mm(data: NDArray, affine_1mm: NDArray, shape: tuple[int, int, int],
                  affine: NDArray, resolution_mm: float) -> NDArray[np.float32]:
    """Partial-volume resampling: smooth to the target voxel size, then trilinear sampling."""
    data = np.asarray(data, dtype=np.float32)
    if resolution_mm > 1:
        data = ndimage.gaussian_filter(data, sigma=0.42 * resolution_mm, mode="constant")
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    src = np.linalg.solve(affine_1mm[:3, :3], xyz - affine_1mm[:3, 3:4])
    out = ndimage.map_coordinates(data, src, order=1, mode="constant", cval=0.0)
    return out.reshape(shape).astype(np.float32)


def build_anatomy(resolution_mm: float) -> Anatomy:
    """Build tissue maps, the head/brain voxels, the brain-edge map and the baseline image.

    The result is cached per resolution (it takes a few seconds); its arrays are read-only.

    Parameters
    ----------
    resolution_mm : float
        Grid resolution; the grid is :func:`fcflow.templates.mni_grid`.
    """
    return _build_anatomy_cached(float(resolution_mm))


@functools.lru_cache(maxsize=2)
def _build_anatomy_cached(resolution_mm: float) -> Anatomy:
    anatomy = _build_anatomy(resolution_mm)
    for f in dataclasses.fields(anatomy):
        value = getattr(anatomy, f.name)
        if isinstance(value, np.ndarray):
            value.setflags(write=False)
    return anatomy


def _build_anatomy(resolution_mm: float) -> Anatomy:
    from nilearn import datasets  # imports in ~2 s; only needed here

    shape, affine = mni_grid(resolution_mm)
    brain_1mm = datasets.load_mni152_brain_mask(resolution=1)
    gm_1mm = datasets.load_mni152_gm_template(resolution=1)
    wm_1mm = datasets.load_mni152_wm_template(resolution=1)
    a1 = brain_1mm.affine
    brain_p = _resample_1mm(np.asanyarray(brain_1mm.dataobj), a1, shape, affine, resolution_mm)
    mask_1mm = np.asanyarray(brain_1mm.dataobj) > 0
    gm_p = _resample_1mm(np.asanyarray(gm_1mm.dataobj) * mask_1mm, a1, shape, affine,
                         resolution_mm)
    wm_p = _resample_1mm(np.asanyarray(wm_1mm.dataobj) * mask_1mm, a1, shape, affine,
                         resolution_mm)
    brain = brain_p >= 0.5
    gm_p = np.where(brain, gm_p, 0)
    wm_p = np.where(brain, wm_p, 0)
    total = gm_p + wm_p
    over = total > 1
    gm_p[over] /= total[over]
    wm_p[over] /= total[over]
    csf_p = np.where(brain, np.clip(1 - gm_p - wm_p, 0, 1), 0).astype(np.float32)

    n_dilate = max(1, int(round(8.0 / resolution_mm)))
    head = ndimage.binary_dilation(brain, iterations=n_dilate)
    # the grid's edge stays empty so the smooth-noise filter sees no wrap-around
    head[[0, -1], :, :] = head[:, [0, -1], :] = head[:, :, [0, -1]] = False
    brain_idx = np.argwhere(brain)
    ring_idx = np.argwhere(head & ~brain)
    voxels = np.concatenate([brain_idx, ring_idx]).astype(np.intp)
    lo = voxels.min(axis=0)
    hi = voxels.max(axis=0) + 1
    bbox = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    coords = (affine[:3, :3] @ voxels.T + affine[:3, 3:4]).T

    # distance to the brain surface (mm), inside and out: the edge map peaks at the surface
    dist_in = ndimage.distance_transform_edt(brain) * resolution_mm
    dist_out = ndimage.distance_transform_edt(~brain) * resolution_mm
    dist = np.where(brain, dist_in, dist_out)
    edge_vol = np.exp(-dist / 8.0).astype(np.float32)

    idx = tuple(voxels.T)
    baseline_vol = (_INTENSITY["gm"] * gm_p + _INTENSITY["wm"] * wm_p
                    + _INTENSITY["csf"] * csf_p + _INTENSITY["head"] * (head & ~brain))
    baseline_vol = ndimage.gaussian_filter(baseline_vol.astype(np.float32), sigma=0.5)
    baseline_vol = np.where(head, np.maximum(baseline_vol, 0.5 * _INTENSITY["head"]), 0)
    return Anatomy(
        resolution_mm=float(resolution_mm),
        shape=tuple(int(n) for n in shape),  # type: ignore[arg-type]
        affine=affine,
        voxels=voxels,
        n_brain=int(brain_idx.shape[0]),
        gm=gm_p[idx].astype(np.float32),
        wm=wm_p[idx].astype(np.float32),
        csf=csf_p[idx],
        coords_mm=coords,
        bbox=bbox,  # type: ignore[arg-type]
        edge=edge_vol[idx],
        baseline=baseline_vol[idx].astype(np.float32),
    )


def sphere_in_gm(anatomy: Anatomy, region: Region) -> NDArray[np.bool_]:
    """Voxels of ``region``: within its radius of the centre, in the brain and in grey matter.

    If grey matter leaves nothing at a coarse grid, the brain part of the sphere is used.
    """
    dist = np.linalg.norm(anatomy.coords_mm - np.asarray(region.centre_mm), axis=1)
    in_brain = np.arange(anatomy.n_voxels) < anatomy.n_brain
    sphere = (dist <= region.radius_mm) & in_brain
    mask = sphere & (anatomy.gm >= _REGION_GM)
    return mask if mask.any() else sphere


def gaussian_blob(anatomy: Anatomy, region: Region) -> NDArray[np.float32]:
    """Activation profile: a Gaussian of FWHM = radius around the centre, weighted by GM."""
    dist = np.linalg.norm(anatomy.coords_mm - np.asarray(region.centre_mm), axis=1)
    sigma = region.radius_mm / 2.355
    return (np.exp(-0.5 * (dist / sigma) ** 2) * anatomy.gm).astype(np.float32)


def motion_loadings(anatomy: Anatomy, baseline: NDArray[np.float32]) -> NDArray[np.float32]:
    """Intensity change per unit of each rigid-body parameter (first-order Taylor expansion).

    A displacement field ``d(x) = t + w x (x - c)`` changes the intensity by ``-grad B . d``;
    expanding gives one loading map per parameter (trans_x/y/z in mm, rot_x/y/z in rad).

    Returns
    -------
    loadings : ndarray of shape (6, n_voxels)
        Intensity units per mm (translations) and per rad (rotations).
    """
    vol = np.zeros(anatomy.shape, np.float32)
    vol[tuple(anatomy.voxels.T)] = baseline
    grads = np.gradient(vol, anatomy.resolution_mm)
    idx = tuple(anatomy.voxels.T)
    gx, gy, gz = (g[idx] for g in grads)
    centre = np.array([0.0, -18.0, 18.0])  # roughly the centre of the head in MNI
    x, y, z = (anatomy.coords_mm - centre).T
    loadings = np.stack([
        gx, gy, gz,
        gz * y - gy * z,  # rotation about x
        gx * z - gz * x,  # rotation about y
        gy * x - gx * y,  # rotation about z
    ])
    return (-loadings).astype(np.float32)
