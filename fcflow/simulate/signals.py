"""Generate one run: latent signals with exact couplings, task responses, noise and head motion.

All amplitudes are percent of the voxel's baseline intensity, except the motion term that is
linear in the realignment parameters (intensity units: it follows the image gradient).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import ndimage

from fcflow.simulate.anatomy import Anatomy, gaussian_blob, motion_loadings, sphere_in_gm
from fcflow.simulate.params import NbackDesign, NoiseModel, SimulationEffects

MOTION_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
_TIME_CHUNK = 32
_TRUNCATE = 3.0  # Gaussian kernels end at 3 sigma (0.3% of the mass left out)
_HEAD_RADIUS_MM = 50.0  # Power et al. 2012: rotations in rad times 50 mm


# --- seeding ----------------------------------------------------------------------------------

def _key(*labels: str) -> list[int]:
    return [zlib.crc32(label.encode("utf-8")) for label in labels]


def run_seed_sequence(seed: int, subject: str, session: str, task: str) -> np.random.SeedSequence:
    """Seed sequence of one run, keyed by its labels (independent of the order runs are made)."""
    return np.random.SeedSequence([seed, *_key("run", subject, session, task)])


def subject_seed_sequence(seed: int, subject: str) -> np.random.SeedSequence:
    """Seed sequence of a subject's traits (coupling offsets, motion propensity, bias field)."""
    return np.random.SeedSequence([seed, *_key("subject", subject)])


# --- regions ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StudyRegions:
    """Boolean voxel masks (over simulated voxels) of the seed, targets and control region."""

    seed: NDArray[np.bool_]
    insula: NDArray[np.bool_]
    dmpfc: NDArray[np.bool_]
    control: NDArray[np.bool_]
    activation: NDArray[np.float32]  # summed task-activation profile, peak-normalised
    seed_is_julich: bool

    def as_dict(self, effects: SimulationEffects) -> dict[str, NDArray[np.bool_]]:
        return {effects.seed.label: self.seed, effects.insula.label: self.insula,
                effects.dmpfc.label: self.dmpfc, effects.control.label: self.control}


def build_regions(anatomy: Anatomy, effects: SimulationEffects,
                  seed_mask: NDArray[np.bool_] | None = None) -> StudyRegions:
    """Masks of all regions; ``seed_mask`` (per simulated voxel) replaces the stand-in pgACC."""
    activation = np.zeros(anatomy.n_voxels, np.float32)
    for site in effects.activation_sites:
        activation = np.maximum(activation, gaussian_blob(anatomy, site))
    peak = activation.max()
    if peak > 0:
        activation /= peak
    return StudyRegions(
        seed=seed_mask if seed_mask is not None else sphere_in_gm(anatomy, effects.seed),
        insula=sphere_in_gm(anatomy, effects.insula),
        dmpfc=sphere_in_gm(anatomy, effects.dmpfc),
        control=sphere_in_gm(anatomy, effects.control),
        activation=activation,
        seed_is_julich=seed_mask is not None,
    )


# --- subject traits ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SubjectTraits:
    """Per-subject random draws shared by all of the subject's runs."""

    insula_offset: float
    dmpfc_offset: float
    insula_effect_offset: float
    ppi_effect_offset: float
    motion_propensity: float
    age: int
    sex: str


def draw_subject_traits(seed: int, subject: str, effects: SimulationEffects,
                        noise: NoiseModel) -> SubjectTraits:
    rng = np.random.default_rng(subject_seed_sequence(seed, subject))
    z = rng.standard_normal(5)
    return SubjectTraits(
        insula_offset=float(effects.subject_coupling_sd * z[0]),
        dmpfc_offset=float(effects.subject_coupling_sd * z[1]),
        insula_effect_offset=float(effects.effect_subject_sd * z[2]),
        ppi_effect_offset=float(effects.effect_subject_sd * z[3]),
        motion_propensity=float(np.exp(noise.subject_motion_sd * z[4])),
        age=int(rng.integers(20, 46)),
        sex=str(rng.choice(["F", "M"])),
    )


# --- task design ------------------------------------------------------------------------------

def make_nback_events(n_volumes: int, t_r: float, design: NbackDesign) -> pd.DataFrame:
    """Alternating 0-back / 2-back blocks separated by fixation (fixation is not listed)."""
    duration = n_volumes * t_r
    rows = []
    onset = design.lead_in_s
    kinds = ("0back", "2back")
    i = 0
    while onset + design.block_s <= duration:
        rows.append((onset, design.block_s, kinds[i % 2]))
        onset += design.block_s + design.fixation_s
        i += 1
    return pd.DataFrame(rows, columns=["onset", "duration", "trial_type"])


def task_regressors(events: pd.DataFrame, n_volumes: int, t_r: float
                    ) -> tuple[dict[str, NDArray[np.float64]], dict[str, NDArray[np.float64]]]:
    """HRF-convolved regressors and boxcars of each condition, sampled at ``arange(n) * t_r``.

    The regressors are nilearn's ``compute_regressor(hrf_model="spm", oversampling=50)``, the
    same an analysis with nilearn would build.
    """
    from nilearn.glm.first_level import compute_regressor

    frame_times = np.arange(n_volumes) * t_r
    psy: dict[str, NDArray[np.float64]] = {}
    box: dict[str, NDArray[np.float64]] = {}
    for condition in ("0back", "2back"):
        rows = events[events["trial_type"] == condition]
        b = np.zeros(n_volumes)
        for onset, dur in zip(rows["onset"], rows["duration"]):
            b[(frame_times >= onset) & (frame_times < onset + dur)] = 1.0
        box[condition] = b
        if len(rows):
            cond = np.vstack([rows["onset"], rows["duration"], np.ones(len(rows))])
            reg, _ = compute_regressor(cond, "spm", frame_times, oversampling=50)
            psy[condition] = reg[:, 0]
        else:
            psy[condition] = np.zeros(n_volumes)
    return psy, box


# --- latent signals ---------------------------------------------------------------------------

def bold_like(rng: np.random.Generator, n_volumes: int, t_r: float, n: int = 1
              ) -> NDArray[np.float64]:
    """``n`` series of HRF-convolved white noise (a BOLD-like spectrum), shape (n_volumes, n)."""
    from nilearn.glm.first_level import spm_hrf

    hrf = spm_hrf(t_r, oversampling=1, time_length=32.0)
    warm = len(hrf)
    white = rng.standard_normal((n_volumes + warm, n))
    out = np.stack([np.convolve(white[:, j], hrf)[warm: warm + n_volumes] for j in range(n)],
                   axis=1)
    return out


def standardize(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Zero mean, unit variance (ddof=0)."""
    x = x - x.mean()
    return x / x.std()


def couple(seed: NDArray[np.float64], own: NDArray[np.float64], coupling: float,
           design: NDArray[np.float64] | None = None,
           interaction: NDArray[np.float64] | None = None, ppi: float = 0.0
           ) -> NDArray[np.float64]:
    """Target latent signal with an exact, noise-free relation to the seed.

    ``target = coupling * seed + ppi * interaction + sqrt(1 - coupling**2) * own_perp``, where
    ``own_perp`` is ``own`` made orthogonal (on this sample) to the constant, ``seed`` and the
    columns of ``design``, then standardised. Hence with ``ppi = 0`` the sample correlation of
    target and seed is exactly ``coupling``; with a PPI term, regressing the target on
    ``[1, seed, design]`` (``design`` holding the interaction) gives exactly ``coupling`` and
    ``ppi``.

    Parameters
    ----------
    seed : ndarray of shape (n_timepoints,)
        Standardised seed signal.
    own : ndarray of shape (n_timepoints,)
        The target's own signal.
    coupling : float
    design : ndarray of shape (n_timepoints, k), optional
        Further columns ``own`` is made orthogonal to (task regressors, interactions, block
        indicators).
    interaction, ppi : optional
        The psychophysiological interaction regressor and its coefficient.
    """
    cols = [np.ones_like(seed), seed]
    if design is not None:
        cols.extend(np.atleast_2d(design.T))
    q, _ = np.linalg.qr(np.column_stack(cols))
    perp = own - q @ (q.T @ own)
    perp = perp / perp.std()
    target = coupling * seed + np.sqrt(1.0 - coupling**2) * perp
    if interaction is not None and ppi != 0:
        target = target + ppi * interaction
    return target


# --- motion -----------------------------------------------------------------------------------

def simulate_motion(rng: np.random.Generator, n_volumes: int, t_r: float, noise: NoiseModel,
                    scale: float) -> NDArray[np.float64]:
    """Realignment parameters: slow random walk, respiration and occasional sudden moves.

    Returns
    -------
    params : ndarray of shape (n_volumes, 6)
        trans_x/y/z in mm and rot_x/y/z in rad, as fMRIPrep writes them.
    """
    drift_sd = np.array([noise.drift_trans_mm] * 3 + [noise.drift_rot_rad] * 3) * scale
    spike_sd = np.array([noise.spike_trans_mm] * 3 + [noise.spike_rot_rad] * 3) * scale
    steps = rng.standard_normal((n_volumes, 6)) * drift_sd
    steps[0] = 0
    params = np.cumsum(steps, axis=0)
    # respiration (about 0.3 Hz, aliased at the TR) moves the head mostly along y and z
    phase = rng.uniform(0, 2 * np.pi)
    resp = np.sin(2 * np.pi * 0.3 * np.arange(n_volumes) * t_r + phase)
    params[:, 1] += 0.02 * scale * resp
    params[:, 2] += 0.03 * scale * resp
    params[:, 3] += 0.0002 * scale * resp
    rate = min(noise.spike_rate * scale, 0.5)
    for t in np.flatnonzero(rng.random(n_volumes) < rate):
        if t == 0:
            continue
        jump = rng.standard_normal(6) * spike_sd
        if rng.random() < 0.5:  # the head stays where it went
            params[t:] += jump
        else:  # the head comes back at the next volume
            params[t] += jump
    return params


def framewise_displacement(params: NDArray[np.float64]) -> NDArray[np.float64]:
    """Power et al. (2012) FD: sum of absolute backward differences, rotations on a 50 mm sphere.

    The first value is nan, as in fMRIPrep's confounds.
    """
    diff = np.abs(np.diff(params, axis=0))
    fd = diff[:, :3].sum(axis=1) + _HEAD_RADIUS_MM * diff[:, 3:].sum(axis=1)
    return np.concatenate([[np.nan], fd])


# --- noise ------------------------------------------------------------------------------------

def _smooth_fields(rng: np.random.Generator, anatomy: Anatomy, n: int, fwhm_mm: float
                   ) -> NDArray[np.float32]:
    """``n`` unit-variance Gaussian random fields of a given smoothness, shape (n, n_voxels).

    Broad fields (FWHM >= 20 mm) are smoothed on a coarse grid and interpolated, which costs
    far less than filtering the voxel grid with a wide kernel.
    """
    if fwhm_mm >= 20:
        # smooth on a coarse grid (spacing FWHM / 4), then interpolate to the voxels
        spacing = fwhm_mm / 4.0
        lo = anatomy.coords_mm.min(axis=0) - 2 * fwhm_mm
        hi = anatomy.coords_mm.max(axis=0) + 2 * fwhm_mm
        coarse = tuple(int(np.ceil(v)) + 1 for v in (hi - lo) / spacing)
        where = ((anatomy.coords_mm - lo) / spacing).T
        out = np.empty((n, anatomy.n_voxels), np.float32)
        for k in range(n):
            g = ndimage.gaussian_filter(rng.standard_normal(coarse), fwhm_mm / 2.3548 / spacing)
            f = ndimage.map_coordinates(g, where, order=1)
            out[k] = (f - f.mean()) / f.std()
        return out
    shape = tuple(s.stop - s.start for s in anatomy.bbox)
    idx = anatomy.bbox_indices()
    sigma = fwhm_mm / 2.3548 / anatomy.resolution_mm
    out = np.empty((n, anatomy.n_voxels), np.float32)
    for k in range(n):
        f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)[idx]
        out[k] = (f - f.mean()) / f.std()
    return out


def _kernel_norm(sigma: float) -> float:
    """1 / sqrt(sum of squared kernel weights): restores unit variance after smoothing noise."""
    size = int(np.ceil(4 * sigma)) * 2 + 1
    delta = np.zeros((size,) * 3, np.float64)
    delta[(size // 2,) * 3] = 1
    kernel = ndimage.gaussian_filter(delta, sigma, truncate=_TRUNCATE)
    return float(1.0 / np.sqrt(np.sum(kernel**2)))


def smooth_ar_noise(rng: np.random.Generator, anatomy: Anatomy, n_volumes: int,
                    fwhm_mm: float, ar1: float) -> NDArray[np.float32]:
    """Spatially smooth, temporally AR(1), unit-variance noise, shape (n_volumes, n_voxels).

    Each volume's innovation is white noise on the bounding box of the head, smoothed with a
    Gaussian of ``fwhm_mm``; only the head voxels are kept, so memory is (n_volumes, n_voxels).
    """
    shape = tuple(s.stop - s.start for s in anatomy.bbox)
    idx = anatomy.bbox_indices()
    sigma = fwhm_mm / 2.3548 / anatomy.resolution_mm
    norm = _kernel_norm(sigma) if sigma > 0 else 1.0
    innovation = np.float32(np.sqrt(1 - ar1**2))
    out = np.empty((n_volumes, anatomy.n_voxels), np.float32)
    for t in range(n_volumes):
        white = rng.standard_normal(shape, dtype=np.float32)
        field_t = (ndimage.gaussian_filter(white, sigma, truncate=_TRUNCATE)[idx]
                   if sigma > 0 else white[idx])
        field_t *= np.float32(norm)
        if t == 0:
            out[0] = field_t
        else:
            np.multiply(out[t - 1], np.float32(ar1), out=out[t])
            out[t] += innovation * field_t
    return out


def _add_low_rank(data: NDArray[np.float32], time_courses: NDArray, maps: NDArray) -> None:
    """``data += time_courses @ maps`` in time chunks (no (n_volumes, n_voxels) temporary)."""
    tc = np.asarray(time_courses, np.float32)
    mp = np.asarray(maps, np.float32)
    for a in range(0, data.shape[0], _TIME_CHUNK):
        data[a: a + _TIME_CHUNK] += tc[a: a + _TIME_CHUNK] @ mp


# --- the run ----------------------------------------------------------------------------------

@dataclass
class SimulatedRun:
    """One run with its noise-free parts, for writing and for checking what was planted.

    Attributes
    ----------
    data : ndarray of shape (n_volumes, n_voxels), float32
        BOLD intensities of the simulated voxels (see :class:`Anatomy`).
    seed_signal : ndarray of shape (n_volumes,)
        Standardised latent pgACC signal.
    target_signals : dict of str to ndarray of shape (n_volumes,)
        Latent signal of each target and of the control region, by region label.
    couplings : dict of str to float
        Planted sample correlation of each target with the seed (background part).
    ppi : dict of str to float
        Planted PPI coefficient of each target (``seed * psy['2back']``).
    psy, boxcars : dict of str to ndarray
        Task regressors and block indicators (empty for rest).
    motion : ndarray of shape (n_volumes, 6)
    fd : ndarray of shape (n_volumes,)
        Framewise displacement; nan at the first volume.
    artefact_amplitude : ndarray of shape (n_volumes,)
        Per-volume amplitude of the FD-driven artefact (FD plus carry-over), mm.
    """

    subject: str
    session: str
    task: str
    group: str
    t_r: float
    data: NDArray[np.float32]
    seed_signal: NDArray[np.float64]
    target_signals: dict[str, NDArray[np.float64]]
    couplings: dict[str, float]
    ppi: dict[str, float]
    psy: dict[str, NDArray[np.float64]]
    boxcars: dict[str, NDArray[np.float64]]
    events: pd.DataFrame | None
    motion: NDArray[np.float64]
    fd: NDArray[np.float64]
    artefact_amplitude: NDArray[np.float64]
    motion_scale: float
    n_non_steady: int


def planted_values(effects: SimulationEffects, traits: SubjectTraits, group: str, session: str,
                   task: str, run_jitter: NDArray[np.float64]) -> tuple[float, float, float]:
    """Return (insula coupling, dmPFC coupling, dmPFC PPI) of one run."""
    in_effect = group == effects.effect_group and session == effects.effect_session
    insula = effects.insula_coupling + traits.insula_offset + run_jitter[0]
    dmpfc = effects.dmpfc_coupling + traits.dmpfc_offset + run_jitter[1]
    ppi = 0.0
    if in_effect and task == "rest" and effects.insula_rest_change != 0:
        insula += effects.insula_rest_change + traits.insula_effect_offset
    if in_effect and task == "nback" and effects.dmpfc_ppi_change != 0:
        ppi = effects.dmpfc_ppi_change + traits.ppi_effect_offset
    clip = 0.95
    return (float(np.clip(insula, -clip, clip)), float(np.clip(dmpfc, -clip, clip)), float(ppi))


def simulate_run(
    anatomy: Anatomy,
    regions: StudyRegions,
    *,
    subject: str,
    session: str,
    task: str,
    group: str,
    n_volumes: int,
    t_r: float,
    seed: int,
    effects: SimulationEffects,
    noise: NoiseModel,
    nback: NbackDesign,
    traits: SubjectTraits | None = None,
) -> SimulatedRun:
    """Simulate one preprocessed BOLD run on the simulated voxels of ``anatomy``.

    Parameters
    ----------
    subject, session, task, group : str
        Labels without BIDS prefixes (``"01"``, ``"infusion"``, ``"nback"``, ``"ketamine"``).
    n_volumes : int
    t_r : float
        Repetition time in seconds.
    seed : int
        Study seed; the run's random streams are keyed by ``(seed, subject, session, task)``.
    effects, noise, nback
        See :mod:`fcflow.simulate.params`.
    traits : SubjectTraits, optional
        Drawn from ``(seed, subject)`` when not given.
    """
    if traits is None:
        traits = draw_subject_traits(seed, subject, effects, noise)
    streams = [np.random.default_rng(s)
               for s in run_seed_sequence(seed, subject, session, task).spawn(6)]
    rng_latent, rng_motion, rng_noise, rng_artefact, rng_drift, rng_white = streams
    subj_rng = np.random.default_rng(subject_seed_sequence(seed, subject).spawn(1)[0])
    n_vox = anatomy.n_voxels
    in_brain = np.arange(n_vox) < anatomy.n_brain

    # --- latent signals with exact couplings
    run_jitter = rng_latent.standard_normal(2) * effects.run_coupling_sd
    c_insula, c_dmpfc, ppi = planted_values(effects, traits, group, session, task, run_jitter)
    raw = bold_like(rng_latent, n_volumes, t_r, n=4)
    s = standardize(raw[:, 0])
    events = None
    psy: dict[str, NDArray[np.float64]] = {}
    boxcars: dict[str, NDArray[np.float64]] = {}
    design = None
    interaction = None
    if task == "nback":
        events = make_nback_events(n_volumes, t_r, nback)
        psy, boxcars = task_regressors(events, n_volumes, t_r)
        interaction = s * psy["2back"]
        design = np.column_stack([
            psy["0back"], psy["2back"], s * psy["0back"], interaction,
            boxcars["0back"], boxcars["2back"], s * boxcars["0back"], s * boxcars["2back"]])
    targets = {
        effects.insula.label: couple(s, raw[:, 1], c_insula, design),
        effects.dmpfc.label: couple(s, raw[:, 2], c_dmpfc, design, interaction, ppi),
        effects.control.label: couple(s, raw[:, 3], 0.0, design),
    }

    # --- noise, in percent of baseline
    tissue_noise = (anatomy.gm + 0.7 * anatomy.wm + 1.5 * anatomy.csf
                    + np.where(in_brain, 0.0, 1.0)).astype(np.float32)
    pct = smooth_ar_noise(rng_noise, anatomy, n_volumes, noise.smooth_noise_fwhm_mm,
                          noise.noise_ar1)
    for a in range(0, n_volumes, _TIME_CHUNK):
        block = pct[a: a + _TIME_CHUNK]
        block *= noise.smooth_noise_pct * tissue_noise
        block += noise.white_noise_pct * rng_white.standard_normal(block.shape,
                                                                   dtype=np.float32)
    # global physiological signal and slow drifts (low rank)
    g = standardize(bold_like(rng_drift, n_volumes, t_r)[:, 0] * 0.5
                    + _ar1(rng_drift, n_volumes, 0.9))
    global_map = noise.global_pct * (anatomy.gm + 0.4 * anatomy.wm + 2.0 * anatomy.csf
                                     + np.where(in_brain, 0.0, 0.3))
    x = np.linspace(-1, 1, n_volumes)
    drift_t = np.column_stack([x, 1.5 * x**2 - 0.5, np.cos(np.pi * (x + 1))])
    drift_t *= rng_drift.standard_normal(3) * noise.drift_pct / 2
    drift_maps = 1.0 + 0.5 * _smooth_fields(rng_drift, anatomy, 3, 40.0)
    # physiological noise (pulsation, respiration): a few broad patterns, strongest in CSF
    n_physio = 4
    physio_t = np.column_stack([standardize(_ar1(rng_drift, n_volumes, 0.6))
                                for _ in range(n_physio)]) / np.sqrt(n_physio)
    physio_maps = (_smooth_fields(rng_drift, anatomy, n_physio, 30.0)
                   * (noise.physio_pct * (anatomy.gm + 0.6 * anatomy.wm + 2.5 * anatomy.csf)))
    _add_low_rank(pct, np.column_stack([g, drift_t, physio_t]),
                  np.vstack([global_map[None, :], drift_maps, physio_maps]))

    # --- neural signals and task responses
    seed_idx = np.flatnonzero(regions.seed)
    seed_ts = effects.seed_amplitude_pct * s
    if task == "nback":
        seed_ts = seed_ts + effects.seed_activation_2back_pct * (psy["2back"] + 0.4 * psy["0back"])
        task_ts = (effects.activation_2back_pct * psy["2back"]
                   + effects.activation_0back_pct * psy["0back"])
        act = np.flatnonzero(regions.activation > 0.01)
        pct[:, act] += np.outer(task_ts, regions.activation[act]).astype(np.float32)
    pct[:, seed_idx] += seed_ts.astype(np.float32)[:, None]
    for mask, label in ((regions.insula, effects.insula.label),
                        (regions.dmpfc, effects.dmpfc.label),
                        (regions.control, effects.control.label)):
        idx = np.flatnonzero(mask)
        pct[:, idx] += (effects.target_amplitude_pct * targets[label]).astype(np.float32)[:, None]

    # --- head motion: FD-driven artefact (percent) ...
    scale = noise.scale_for(group, session) * traits.motion_propensity
    motion = simulate_motion(rng_motion, n_volumes, t_r, noise, scale)
    fd = framewise_displacement(motion)
    fd0 = np.nan_to_num(fd)
    amp = fd0.copy()
    amp[1:] += noise.spike_carryover * fd0[:-1]
    n_patterns = 6
    patterns = _smooth_fields(rng_artefact, anatomy, n_patterns, 12.0) * anatomy.edge
    weights = rng_artefact.standard_normal((n_volumes, n_patterns)) / np.sqrt(n_patterns)
    brain_weight = np.where(in_brain, 1.0, 0.5)
    _add_low_rank(pct,
                  np.column_stack([amp[:, None] * weights, amp]),
                  np.vstack([noise.spike_edge_pct_per_mm * patterns,
                             -noise.spike_global_pct_per_mm * brain_weight[None, :]]))

    # --- to intensities; subject bias field; motion term linear in the parameters
    bias = np.exp(0.08 * _smooth_fields(subj_rng, anatomy, 1, 60.0)[0])
    baseline = (anatomy.baseline * bias).astype(np.float32)
    data = pct
    for a in range(0, n_volumes, _TIME_CHUNK):
        block = data[a: a + _TIME_CHUNK]
        block *= baseline / 100.0
        block += baseline
    loadings = motion_loadings(anatomy, baseline)
    _add_low_rank(data, noise.motion_residual_fraction * motion, loadings)
    for t in range(min(noise.n_non_steady, n_volumes)):
        data[t] *= np.float32(1.0 + noise.non_steady_gain[t])
    np.maximum(data, 0, out=data)

    return SimulatedRun(
        subject=subject, session=session, task=task, group=group, t_r=t_r, data=data,
        seed_signal=s, target_signals=targets,
        couplings={effects.insula.label: c_insula, effects.dmpfc.label: c_dmpfc,
                   effects.control.label: 0.0},
        ppi={effects.insula.label: 0.0, effects.dmpfc.label: ppi, effects.control.label: 0.0},
        psy=psy, boxcars=boxcars, events=events, motion=motion, fd=fd,
        artefact_amplitude=amp, motion_scale=float(scale),
        n_non_steady=min(noise.n_non_steady, n_volumes),
    )


def _ar1(rng: np.random.Generator, n: int, rho: float) -> NDArray[np.float64]:
    e = rng.standard_normal(n)
    out = np.empty(n)
    out[0] = e[0]
    for t in range(1, n):
        out[t] = rho * out[t - 1] + np.sqrt(1 - rho**2) * e[t]
    return out
