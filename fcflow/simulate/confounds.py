"""fMRIPrep's confounds table, computed from a simulated run the way fMRIPrep computes it.

Column names and JSON metadata follow fMRIPrep >= 21 (``a_comp_cor_NN`` combined mask,
``c_comp_cor_NN`` CSF, ``w_comp_cor_NN`` WM, ``cosineNN``, ``motion_outlierNN``,
``non_steady_state_outlierNN``). The computations mirror nipype's ``ComputeDVARS`` and
``compute_noise_components`` (cosine high-pass at 128 s, variance normalisation, components to
50% explained variance) and MCFLIRT's relative RMS displacement.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import ndimage

from fcflow.simulate.anatomy import Anatomy
from fcflow.simulate.signals import MOTION_COLUMNS

FD_THRESHOLD_MM = 0.5
STD_DVARS_THRESHOLD = 1.5
HIGH_PASS_PERIOD_S = 128.0
COMPCOR_VARIANCE = 0.5
_RMS_RADIUS_MM = 80.0  # MCFLIRT's sphere for the RMS deviation (Jenkinson 1999)
_N_DROPPED_METADATA = 3  # components beyond the retained ones listed as "dropped_N"


def cosine_basis(n_volumes: int, t_r: float, period_cut_s: float = HIGH_PASS_PERIOD_S
                 ) -> NDArray[np.float64]:
    """DCT-II high-pass basis without the constant, as nipype's ``cosine_filter`` builds it."""
    order = max(int(np.floor(2 * n_volumes * (1.0 / period_cut_s) * t_r)), 1)
    n = np.arange(n_volumes)
    basis = np.zeros((n_volumes, order - 1))
    norm = np.sqrt(2.0 / n_volumes)
    for k in range(1, order):
        basis[:, k - 1] = norm * np.cos((np.pi / n_volumes) * (n + 0.5) * k)
    return basis


def _derivative(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.concatenate([[np.nan], np.diff(x)])


def expand(name: str, x: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
    """A signal and fMRIPrep's expansions: ``_derivative1``, ``_power2``, ``_derivative1_power2``."""
    d = _derivative(x)
    return {name: x, f"{name}_derivative1": d, f"{name}_power2": x**2,
            f"{name}_derivative1_power2": d**2}


def _rigid(params: NDArray[np.float64]) -> NDArray[np.float64]:
    tx, ty, tz, rx, ry, rz = params
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = r_x @ r_y @ r_z
    m[:3, 3] = (tx, ty, tz)
    return m


def relative_rms(params: NDArray[np.float64], radius_mm: float = _RMS_RADIUS_MM
                 ) -> NDArray[np.float64]:
    """Jenkinson (1999) RMS deviation between consecutive volumes (MCFLIRT's ``_rel.rms``).

    ``rms^2 = R^2 / 5 * trace(A^T A) + |t|^2`` for the relative transform ``M - I = [A t]``
    about the volume centre; the first value is nan.
    """
    out = [np.nan]
    for t in range(1, params.shape[0]):
        rel = _rigid(params[t]) @ np.linalg.inv(_rigid(params[t - 1])) - np.eye(4)
        a = rel[:3, :3]
        trans = rel[:3, 3]
        out.append(float(np.sqrt(radius_mm**2 / 5.0 * np.trace(a.T @ a) + trans @ trans)))
    return np.asarray(out)


def compute_dvars(brain: NDArray[np.float32]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """DVARS and standardised DVARS as nipype's ``compute_dvars`` (intensity normalised to 1000).

    Parameters
    ----------
    brain : ndarray of shape (n_volumes, n_brain_voxels)

    Returns
    -------
    dvars, std_dvars : ndarray of shape (n_volumes,)
        nan at the first volume.
    """
    scale = 1000.0 / float(np.median(brain))
    n_vox = brain.shape[1]
    func_sd = np.empty(n_vox)
    ar1 = np.empty(n_vox)
    dvars_sq = np.zeros(brain.shape[0] - 1)
    for a in range(0, n_vox, 20000):
        x = brain[:, a: a + 20000] * np.float32(scale)
        # np.percentile(..., method="lower") at 25 and 75, from one partition
        k25, k75 = (int(np.floor(q * (x.shape[0] - 1))) for q in (0.25, 0.75))
        part = np.partition(x, [k25, k75], axis=0)
        func_sd[a: a + 20000] = (part[k75] - part[k25]) / 1.349
        xc = x - x.mean(axis=0)
        denom = np.sum(xc * xc, axis=0, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            # Yule-Walker AR(1): lag-1 over lag-0 autocovariance (same normaliser)
            ar1[a: a + 20000] = np.where(denom > 0, np.sum(xc[1:] * xc[:-1], axis=0, dtype=np.float64) / denom, 0)
        dvars_sq += np.sum(np.diff(x, axis=0) ** 2, axis=1, dtype=np.float64)
    diff_sd_mean = float(np.mean(np.sqrt(2 * (1 - ar1)) * func_sd))
    dvars = np.sqrt(dvars_sq / n_vox)
    std = dvars / diff_sd_mean
    return np.concatenate([[np.nan], dvars]), np.concatenate([[np.nan], std])


def _highpass_normalised(data: NDArray[np.float32], columns: NDArray[np.intp], t_r: float,
                         skip: int) -> NDArray[np.float64]:
    """Voxel series after the cosine high-pass (128 s) and mean removal, unit variance.

    The first ``skip`` (non-steady-state) volumes are left out, as fMRIPrep does.
    """
    n = data.shape[0]
    x = data[skip:, columns].astype(np.float64)
    basis = np.column_stack([cosine_basis(n - skip, t_r), np.ones(n - skip)])
    beta, *_ = np.linalg.lstsq(basis, x, rcond=None)
    x -= basis @ beta
    sd = x.std(axis=0)
    sd[sd == 0] = 1
    x /= sd
    return x


def _compcor(gram: NDArray[np.float64], n_volumes: int, skip: int, mask_name: str
             ) -> tuple[NDArray[np.float64], list[dict[str, Any]]]:
    """aCompCor components of one mask from the Gram matrix ``X X^T`` of its normalised voxels.

    Components (left singular vectors of X) are kept up to 50% explained variance; the rows of
    the skipped non-steady-state volumes are 0, as in fMRIPrep.
    """
    # the same vectors as np.linalg.svd(X), much cheaper with many more voxels than volumes
    eigval, eigvec = np.linalg.eigh(gram)
    order = np.argsort(eigval)[::-1]
    eigval = np.clip(eigval[order], 0, None)
    keep = eigval > eigval[0] * 1e-12
    u = eigvec[:, order][:, keep]
    s = np.sqrt(eigval[keep])
    var = s**2 / np.sum(s**2)
    cum = np.cumsum(var)
    n_keep = int(np.searchsorted(cum, COMPCOR_VARIANCE) + 1)
    # the sign of a singular vector is arbitrary: make the largest loading positive
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
    u = u * np.where(signs == 0, 1, signs)
    comps = np.zeros((n_volumes, n_keep))
    comps[skip:] = u[:, :n_keep]
    meta = [{"Method": "aCompCor", "Mask": mask_name, "SingularValue": float(s[i]),
             "VarianceExplained": float(var[i]), "CumulativeVarianceExplained": float(cum[i]),
             "Retained": i < n_keep}
            for i in range(min(len(s), n_keep + _N_DROPPED_METADATA))]
    return comps, meta


def compcor_masks(anatomy: Anatomy) -> dict[str, NDArray[np.intp]]:
    """Column indices of the CSF, WM and combined aCompCor masks (eroded, high probability).

    fMRIPrep erodes the T1w tissue masks before resampling them to the BOLD grid; here the WM
    mask keeps voxels with P(WM) > 0.9 after one erosion and the CSF mask voxels with
    P(CSF) > 0.5 (lowered until there are at least 5 voxels on coarse grids).
    """
    wm_vol = anatomy.to_volume(anatomy.wm) > 0.9
    wm_er = ndimage.binary_erosion(wm_vol)
    wm = wm_er[tuple(anatomy.voxels.T)] if wm_er.sum() >= 20 else wm_vol[tuple(anatomy.voxels.T)]
    csf = np.zeros(anatomy.n_voxels, bool)
    for threshold in (0.5, 0.4, 0.3, 0.2):
        csf = anatomy.csf > threshold
        if csf.sum() >= 5:
            break
    csf &= ~wm
    return {"CSF": np.flatnonzero(csf), "WM": np.flatnonzero(wm),
            "combined": np.flatnonzero(csf | wm)}


def compute_confounds(data: NDArray[np.float32], anatomy: Anatomy, motion: NDArray[np.float64],
                      t_r: float, n_non_steady: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Build fMRIPrep's ``desc-confounds_timeseries`` table and its JSON sidecar.

    Parameters
    ----------
    data : ndarray of shape (n_volumes, n_voxels)
        Simulated BOLD (brain voxels first).
    motion : ndarray of shape (n_volumes, 6)
        Realignment parameters (mm, rad).
    t_r : float
    n_non_steady : int
        Number of initial non-steady-state volumes.

    Returns
    -------
    confounds : DataFrame
    metadata : dict
    """
    n = data.shape[0]
    brain = data[:, : anatomy.n_brain]
    masks = compcor_masks(anatomy)
    cols: dict[str, NDArray[np.float64]] = {}
    meta: dict[str, Any] = {}

    gs = brain.mean(axis=1, dtype=np.float64)
    csf_mean = data[:, masks["CSF"]].mean(axis=1, dtype=np.float64)
    wm_mean = data[:, masks["WM"]].mean(axis=1, dtype=np.float64)
    csf_wm = data[:, masks["combined"]].mean(axis=1, dtype=np.float64)
    cols.update(expand("global_signal", gs))
    cols.update(expand("csf", csf_mean))
    cols.update(expand("white_matter", wm_mean))
    cols["csf_wm"] = csf_wm
    for name in ("global_signal", "csf", "white_matter", "csf_wm"):
        meta[name] = {"Method": "Mean"}

    dvars, std_dvars = compute_dvars(brain)
    fd = np.concatenate([[np.nan], np.abs(np.diff(motion[:, :3], axis=0)).sum(axis=1)
                         + 50.0 * np.abs(np.diff(motion[:, 3:], axis=0)).sum(axis=1)])
    cols["std_dvars"] = std_dvars
    cols["dvars"] = dvars
    cols["framewise_displacement"] = fd
    cols["rmsd"] = relative_rms(motion)

    # CSF and WM masks are disjoint, so the combined mask's Gram matrix is their sum
    x_csf = _highpass_normalised(data, masks["CSF"], t_r, n_non_steady)
    x_wm = _highpass_normalised(data, masks["WM"], t_r, n_non_steady)
    grams = {"CSF": x_csf @ x_csf.T, "WM": x_wm @ x_wm.T}
    grams["combined"] = grams["CSF"] + grams["WM"]
    n_dropped = 0
    for name, mask_name in (("c_comp_cor", "CSF"), ("w_comp_cor", "WM"),
                            ("a_comp_cor", "combined")):
        comps, comp_meta = _compcor(grams[mask_name], n, n_non_steady, mask_name)
        for i, m in enumerate(comp_meta):
            if m["Retained"]:
                key = f"{name}_{i:02d}"
                cols[key] = comps[:, i]
            else:
                # fMRIPrep lists components it did not keep under "dropped_N"
                key = f"dropped_{n_dropped}"
                n_dropped += 1
            meta[key] = m

    cos = np.zeros((n, 0))
    if n - n_non_steady > 1:
        cos = np.zeros((n, cosine_basis(n - n_non_steady, t_r).shape[1]))
        cos[n_non_steady:] = cosine_basis(n - n_non_steady, t_r)
    for k in range(cos.shape[1]):
        cols[f"cosine{k:02d}"] = cos[:, k]
        meta[f"cosine{k:02d}"] = {"Method": "Cosine", "CutoffPeriod": HIGH_PASS_PERIOD_S}

    for t in range(n_non_steady):
        one_hot = np.zeros(n)
        one_hot[t] = 1
        cols[f"non_steady_state_outlier{t:02d}"] = one_hot

    for j, name in enumerate(MOTION_COLUMNS):
        cols.update(expand(name, motion[:, j]))

    outliers = np.flatnonzero((np.nan_to_num(fd) > FD_THRESHOLD_MM)
                              | (np.nan_to_num(std_dvars) > STD_DVARS_THRESHOLD))
    for k, t in enumerate(outliers):
        one_hot = np.zeros(n)
        one_hot[t] = 1
        cols[f"motion_outlier{k:02d}"] = one_hot

    table = pd.DataFrame(cols)
    return table, meta
