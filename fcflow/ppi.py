"""Task regressors, generalised PPI (gPPI) and background connectivity of task runs.

gPPI without deconvolution
--------------------------
:func:`build_gppi_design` builds, for conditions ``c = 1..k`` (McLaren et al. 2012)::

    y = sum_c b_c task_c + b_s seed + sum_c g_c (seed - mean(seed)) * task_c + confounds + b_0

where ``task_c`` is the HRF-convolved regressor of condition ``c`` and ``seed`` the seed's BOLD
time series. fcflow does **not** deconvolve the seed to a neural signal before forming the
interaction (the "no-deconvolution" gPPI of Di, Zhang & Biswal 2017, *Human Brain Mapping*
38:1723 and 2021, *NeuroImage* 230): deconvolution is ill-posed, depends on an assumed HRF and
noise model, and for block designs such as the n-back (blocks of ~30 s, much longer than the
HRF) the product of the BOLD seed and the convolved block regressor is nearly identical to the
convolved product of the neural signals, so the deconvolution adds noise and model dependence
without changing the answer. (Event-related designs with short trials are where the two
differ; ``deconvolve=True`` is reserved for that and not implemented yet.)

The interaction uses the mean-centred seed; the task regressors are not centred. With the seed,
the task regressors and a constant in the model, centring changes only the main effects, never
the interaction betas ``g_c``.

Background connectivity
-----------------------
:func:`compute_background_fc` correlates seed and voxels after regressing the HRF-convolved task
regressors (and confounds) out of both (Al-Aidroos et al. 2012; Fair et al. 2007), so that two
regions that merely respond to the same task blocks do not appear connected.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fcflow.connectivity import correlate_cleaned_seeds, fisher_z
from fcflow.errors import InputDataError
from fcflow.stats import parse_contrast, t_to_z

__all__ = [
    "build_task_regressors",
    "build_gppi_design",
    "GppiResult",
    "fit_gppi",
    "compute_background_fc",
    "background_operator",
    "check_task_design",
    "gppi_model_dof",
    "t_to_z",
]

_BLOCK = 8192
_PPI_PREFIX = "ppi_"
_HRF_SUFFIXES = ("_derivative", "_dispersion")


def _where(events_file) -> str:
    return f" in {events_file}" if events_file else ""


def build_task_regressors(
    events: pd.DataFrame,
    conditions: Sequence[str],
    n_timepoints: int,
    t_r: float,
    hrf_model: str = "spm",
    *,
    ignore_conditions: Sequence[str] = (),
    slice_time_ref: float = 0.0,
    events_file: str = "",
) -> pd.DataFrame:
    """HRF-convolved regressors of the task conditions of one run.

    Parameters
    ----------
    events : DataFrame
        BIDS events with ``onset``, ``duration`` (seconds) and ``trial_type``.
    conditions : sequence of str
        Conditions to model, e.g. ``["0back", "2back"]``; each must occur in ``events``.
    n_timepoints : int
        Volumes in the run.
    t_r : float
        Repetition time in seconds.
    hrf_model : str, default="spm"
        nilearn HRF model ("spm", "glover", "spm + derivative", ...).
    ignore_conditions : sequence of str, default=()
        Trial types in ``events`` that are deliberately not modelled (e.g. "instructions");
        any other trial type not in ``conditions`` is an error.
    slice_time_ref : float, default=0.0
        Fraction of the TR at which the volumes are sampled (nilearn's ``slice_time_ref``;
        0.5 matches fMRIPrep's slice-timing reference).
    events_file : str
        Named in error messages.

    Returns
    -------
    task_regressors : DataFrame of shape (n_timepoints, n_regressors)
        One column per condition (plus ``<condition>_derivative``/``_dispersion`` columns for
        HRF models with derivatives), in the order of ``conditions``.
    """
    from nilearn.glm.first_level import make_first_level_design_matrix

    where = _where(events_file)
    missing_columns = {"onset", "duration", "trial_type"} - set(events.columns)
    if missing_columns:
        raise InputDataError(
            f"'events' must have columns onset, duration and trial_type. Got "
            f"{sorted(events.columns)!r}{where} (missing {sorted(missing_columns)!r})."
        )
    onset = pd.to_numeric(events["onset"], errors="coerce").to_numpy(dtype=float)
    duration = pd.to_numeric(events["duration"], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(onset) | ~np.isfinite(duration) | (duration < 0)
    if bad.any():
        raise InputDataError(
            f"'events' must have finite onsets and non-negative durations. Got {int(bad.sum())} "
            f"invalid rows{where} (first: row {int(np.flatnonzero(bad)[0])})."
        )
    trial_types = events["trial_type"].astype(str)
    present = set(trial_types)
    unknown = sorted(present - set(conditions) - set(ignore_conditions))
    if unknown:
        raise InputDataError(
            f"'events' must only hold the conditions {list(conditions)!r} (or ignored ones "
            f"{list(ignore_conditions)!r}). Got unknown trial types {unknown!r}{where}: add them "
            "to the recipe's conditions or to its ignored conditions."
        )
    missing = [c for c in conditions if c not in present]
    if missing:
        raise InputDataError(
            f"'events' must contain every condition of the recipe. Got no events of "
            f"{missing!r}{where}."
        )
    run_duration = n_timepoints * t_r
    late_start = onset >= run_duration
    # One TR of slack: a block may end while its last volume is acquired.
    late_end = onset + duration > run_duration + t_r
    if late_start.any() or late_end.any():
        n_late = int((late_start | late_end).sum())
        first = int(np.flatnonzero(late_start | late_end)[0])
        raise InputDataError(
            f"'events' must lie within the run ({n_timepoints} volumes x {t_r:g} s = "
            f"{run_duration:g} s). Got {n_late} events{where} starting or ending after its end "
            f"(first: onset {onset[first]:g} s, duration {duration[first]:g} s): check the "
            "events file, the run and its t_r."
        )
    keep = trial_types.isin(list(conditions)).to_numpy()
    table = pd.DataFrame(
        {
            "onset": onset[keep],
            "duration": duration[keep],
            "trial_type": trial_types[keep].to_numpy(),
        }
    )
    frame_times = (np.arange(n_timepoints) + slice_time_ref) * t_r
    with warnings.catch_warnings():
        # Identical or collinear conditions: fcflow.ppi.check_task_design names them and
        # excludes the run, instead of nilearn's bare "Matrix is singular" warning.
        warnings.filterwarnings("ignore", message="Matrix is singular")
        design = make_first_level_design_matrix(
            frame_times, table, hrf_model=hrf_model, drift_model=None
        )
    columns = [
        col
        for cond in conditions
        for col in [cond, *(cond + s for s in _HRF_SUFFIXES)]
        if col in design.columns
    ]
    return design[columns].reset_index(drop=True)


def build_gppi_design(
    seed_signal: NDArray,
    task_regressors: pd.DataFrame,
    confounds: NDArray | pd.DataFrame | None = None,
    deconvolve: bool = False,
    *,
    conditions: Sequence[str] | None = None,
) -> pd.DataFrame:
    """gPPI design: task regressors, seed, one seed x condition interaction each, confounds.

    Parameters
    ----------
    seed_signal : ndarray of shape (n_timepoints,)
        The seed's BOLD series (prepared like the voxel data it will be fitted to).
    task_regressors : DataFrame of shape (n_timepoints, n_regressors)
        From :func:`build_task_regressors`.
    confounds : ndarray or DataFrame of shape (n_timepoints, n_confounds), optional
    deconvolve : bool, default=False
        Not implemented: see the module docstring for why fcflow does not deconvolve.
    conditions : sequence of str, optional
        Conditions that get an interaction; default: every column of ``task_regressors``
        that is not an HRF derivative/dispersion column.

    Returns
    -------
    design : DataFrame of shape (n_timepoints, n_columns)
        Columns: the task regressors, ``seed``, ``ppi_<condition>`` for each condition, the
        confounds (prefixed ``confound_`` when unnamed) and ``constant``.
    """
    if deconvolve:
        raise NotImplementedError(
            "'deconvolve' must be False: fcflow fits the no-deconvolution gPPI (see fcflow.ppi)."
        )
    seed = np.asarray(seed_signal, dtype=np.float64)
    n_time = len(task_regressors)
    if seed.shape != (n_time,):
        raise InputDataError(
            f"'seed_signal' must have shape ({n_time},), one value per volume of the task "
            f"regressors. Got {seed.shape!r}."
        )
    if conditions is None:
        conditions = [c for c in task_regressors.columns if not str(c).endswith(_HRF_SUFFIXES)]
    absent = [c for c in conditions if c not in task_regressors.columns]
    if absent:
        raise InputDataError(
            f"'conditions' must be columns of the task regressors. Got {absent!r}; columns are "
            f"{list(task_regressors.columns)!r}."
        )
    design = task_regressors.reset_index(drop=True).astype(np.float64).copy()
    design["seed"] = seed
    centred = seed - seed.mean()
    for cond in conditions:
        design[_PPI_PREFIX + cond] = centred * design[cond].to_numpy()
    if confounds is not None:
        if isinstance(confounds, pd.DataFrame):
            conf = confounds.reset_index(drop=True).astype(np.float64)
            conf.columns = [c if c not in design.columns else f"confound_{c}" for c in conf.columns]
        else:
            values = np.asarray(confounds, dtype=np.float64)
            values = values[:, None] if values.ndim == 1 else values
            conf = pd.DataFrame(values, columns=[f"confound_{i}" for i in range(values.shape[1])])
        if len(conf) != n_time:
            raise InputDataError(
                f"'confounds' must have one row per volume ({n_time}). Got {len(conf)} rows."
            )
        design = pd.concat([design, conf], axis=1)
    design["constant"] = 1.0
    if not np.isfinite(design.to_numpy()).all():
        raise InputDataError("The gPPI design must be finite. Got NaN or Inf in its regressors.")
    return design


def parse_condition_contrast(expression: str, conditions: Sequence[str]) -> NDArray[np.float64]:
    """Weights over ``conditions`` of an expression like ``"2back - 0back"`` or ``"0.5*2back"``."""
    try:
        return parse_contrast(expression, conditions)
    except ValueError as exc:
        raise InputDataError(
            f"'contrasts' must be sums of conditions {list(conditions)!r} with optional "
            f"'<number>*' weights, e.g. '2back - 0back'. Got {expression!r} ({exc})."
        ) from None


@dataclass(frozen=True)
class GppiResult:
    """Result of :func:`fit_gppi`.

    Attributes
    ----------
    beta, t, z : dict of str to ndarray of shape (n_voxels,), float32
        Keys ``ppi_<condition>`` for each interaction and the names of the contrasts.
    dof : float
        Residual degrees of freedom: ``n_volumes - rank(design)`` for white errors; with an
        ``error_covariance`` ``V``, the effective degrees of freedom of Worsley & Friston
        (1995), ``tr(RV)^2 / tr(RVRV)`` (``R`` the residual-forming matrix).
    columns : list of str
        Design columns.
    """

    beta: dict[str, NDArray[np.float32]]
    t: dict[str, NDArray[np.float32]]
    z: dict[str, NDArray[np.float32]]
    dof: float
    columns: list[str]


def fit_gppi(
    voxel_signals: NDArray,
    design: pd.DataFrame,
    contrasts: Mapping[str, str] | None = None,
    *,
    sample_mask: NDArray | None = None,
    error_covariance: NDArray | None = None,
) -> GppiResult:
    """Fit the gPPI model by OLS at every voxel; interaction betas, t and z maps.

    Parameters
    ----------
    voxel_signals : ndarray of shape (n_timepoints, n_voxels)
        Voxel time series (float32), prepared like the seed.
    design : DataFrame of shape (n_timepoints, n_columns)
        From :func:`build_gppi_design` (must contain the ``ppi_<condition>`` columns).
    contrasts : mapping of str to str, optional
        Name -> expression over *condition names*, applied to the interactions, e.g.
        ``{"2back-0back": "2back - 0back"}`` tests ``ppi_2back - ppi_0back``.
    sample_mask : ndarray of int or bool, optional
        Volumes to fit (censoring); rows of both the data and the design.
    error_covariance : ndarray of shape (n_volumes, n_volumes), optional
        ``V``, the covariance (up to scale) of the errors of white noise put through the data's
        preparation ``F`` (``V = F F^T``: filtering and censoring make the residuals
        dependent). The t statistics then use the variance ``c X^+ V X^+T c^T`` and the
        residual variance ``rss / tr(RV)``, and their degrees of freedom are Worsley &
        Friston's (1995), as SPM does for filtered data. Default: white errors (plain OLS).

    Returns
    -------
    GppiResult
    """
    y = np.asarray(voxel_signals)
    x = design.to_numpy(dtype=np.float64)
    if y.shape[0] != x.shape[0]:
        raise InputDataError(
            f"'design' must have one row per volume of 'voxel_signals' ({y.shape[0]}). Got "
            f"{x.shape[0]} rows."
        )
    if sample_mask is not None:
        y = y[sample_mask]
        x = x[sample_mask]
    columns = list(design.columns)
    ppi_columns = [c for c in columns if c.startswith(_PPI_PREFIX)]
    if not ppi_columns:
        raise InputDataError(
            f"'design' must contain seed x condition columns ('{_PPI_PREFIX}<condition>'). Got "
            f"{columns!r}."
        )
    conditions = [c[len(_PPI_PREFIX) :] for c in ppi_columns]
    tests: dict[str, NDArray[np.float64]] = {}
    for col in ppi_columns:
        vector = np.zeros(len(columns))
        vector[columns.index(col)] = 1.0
        tests[col] = vector
    for name, expression in (contrasts or {}).items():
        weights = parse_condition_contrast(expression, conditions)
        vector = np.zeros(len(columns))
        vector[[columns.index(c) for c in ppi_columns]] = weights
        tests[name] = vector

    n_obs = x.shape[0]
    v = None
    if error_covariance is not None:
        v = np.asarray(error_covariance, dtype=np.float64)
        if sample_mask is not None:
            v = v[np.ix_(sample_mask, sample_mask)]
        if v.shape != (n_obs, n_obs):
            raise InputDataError(
                f"'error_covariance' must be ({n_obs}, {n_obs}), one row and column per volume. "
                f"Got {v.shape!r}."
            )
    pinv, residual_forming, trace_rv, dof = gppi_model_dof(x, v)
    if dof < 1:
        raise InputDataError(
            f"The gPPI design must leave residual degrees of freedom. Got {dof:.2f} "
            f"({np.linalg.matrix_rank(x)} independent columns for {n_obs} volumes)."
        )
    c_matrix = np.array(list(tests.values()))  # (k, p)
    # Variance factor c (X^T X)^+ c^T = ||c X^+||^2 (white), c X^+ V X^+T c^T (with V).
    effect_rows = c_matrix @ pinv  # (k, n)
    if v is None:
        variance_factor = (effect_rows**2).sum(axis=1)
    else:
        variance_factor = np.einsum("kn,nm,km->k", effect_rows, v, effect_rows)
    pinv32 = pinv.astype(np.float32)
    effects32 = effect_rows.astype(np.float32)
    x32 = x.astype(np.float32)
    effect_ones = effect_rows.sum(axis=1)
    residual_ones = residual_forming.sum(axis=1)

    residual_ones32 = residual_ones.astype(np.float32)
    ones_norm2 = float(residual_ones @ residual_ones)
    n_voxels = y.shape[1]
    effects = np.empty((len(tests), n_voxels), dtype=np.float64)
    rss = np.empty(n_voxels, dtype=np.float64)
    width = min(_BLOCK, n_voxels)
    centred_buffer = np.empty((n_obs, width), dtype=np.float32)
    residual_buffer = np.empty((n_obs, width), dtype=np.float32)
    for start in range(0, n_voxels, _BLOCK):
        block = y[:, start : start + _BLOCK]
        n = block.shape[1]
        # Mean-removed float32 products, the mean's part added back in float64 (as in
        # fcflow.connectivity): BOLD sits on a large baseline.
        mean = block.mean(axis=0, dtype=np.float64).astype(np.float32)
        centred = np.subtract(block, mean, out=centred_buffer[:, :n], dtype=np.float32)
        mean64 = mean.astype(np.float64)
        effects[:, start : start + n] = (effects32 @ centred) + np.outer(effect_ones, mean64)
        residuals = np.subtract(centred, x32 @ (pinv32 @ centred), out=residual_buffer[:, :n])
        # ||r + a m||^2 = ||r||^2 + 2 m a.r + m^2 ||a||^2 (a: residuals of a constant), in float64
        cross = (residual_ones32 @ residuals).astype(np.float64)
        rss[start : start + n] = np.einsum("ij,ij->j", residuals, residuals, dtype=np.float64)
        rss[start : start + n] += mean64 * (2.0 * cross + mean64 * ones_norm2)
    sigma2 = rss / trace_rv
    with np.errstate(invalid="ignore", divide="ignore"):
        t_values = effects / np.sqrt(np.outer(variance_factor, sigma2))
    beta, t, z = {}, {}, {}
    for i, name in enumerate(tests):
        beta[name] = effects[i].astype(np.float32)
        t[name] = t_values[i].astype(np.float32)
        z[name] = t_to_z(t_values[i], dof).astype(np.float32)
    return GppiResult(beta=beta, t=t, z=z, dof=float(dof), columns=columns)


def gppi_model_dof(
    design: NDArray[np.float64], error_covariance: NDArray[np.float64] | None = None
) -> tuple[NDArray[np.float64], NDArray[np.float64], float, float]:
    """Pseudo-inverse, residual-forming matrix, ``tr(RV)`` and degrees of freedom of a design.

    ``V = I`` (``error_covariance=None``): ``tr(R) = dof = n - rank(X)``. Otherwise the
    Satterthwaite degrees of freedom ``tr(RV)^2 / tr(RVRV)`` of Worsley & Friston (1995). Never
    negative: 0 when the design leaves nothing.
    """
    x = np.asarray(design, dtype=np.float64)
    n_obs = x.shape[0]
    pinv = np.linalg.pinv(x)
    residual_forming = np.eye(n_obs) - x @ pinv
    if error_covariance is None:
        dof = float(n_obs - np.linalg.matrix_rank(x))
        return pinv, residual_forming, dof, dof
    # R is idempotent, so tr(RV) = tr(RVR) and tr(RVRV) = tr((RVR)^2): the eigenvalues of the
    # symmetric RVR, those at rounding level (a design that leaves nothing) counted as zero.
    eigenvalues = np.linalg.eigvalsh(residual_forming @ error_covariance @ residual_forming.T)
    scale = max(1.0, float(np.abs(np.diag(error_covariance)).max()))
    eigenvalues = eigenvalues[eigenvalues > 1e-10 * scale]
    if eigenvalues.size == 0:
        return pinv, residual_forming, 0.0, 0.0
    trace_rv = float(eigenvalues.sum())
    return pinv, residual_forming, trace_rv, trace_rv**2 / float((eigenvalues**2).sum())


#: Largest condition number of the unit-norm condition regressors (after filtering and
#: censoring) that a gPPI or background model accepts. Above 30 Belsley, Kuh & Welsch (1980)
#: speak of strong collinearity: the conditions' effects can no longer be told apart.
MAX_CONDITION_NUMBER = 30.0
#: A condition whose regressor keeps less than this fraction of its energy after censoring (and
#: filtering) has lost its events.
MIN_CONDITION_ENERGY = 0.05


def check_task_design(
    raw: pd.DataFrame,
    prepared: pd.DataFrame,
    conditions: Sequence[str],
    *,
    events_file: str = "",
    run_name: str = "",
) -> str:
    """Why a run's condition regressors cannot be told apart ("" when they can).

    Parameters
    ----------
    raw : DataFrame of shape (n_timepoints, n_regressors)
        The HRF-convolved condition regressors (:func:`build_task_regressors`).
    prepared : DataFrame of shape (n_kept, n_regressors)
        The same after the data's filtering and censoring.
    conditions : sequence of str

    Returns
    -------
    reason : str
        Names the events file and the conditions: a condition with (almost) no signal left
        after censoring (below :data:`MIN_CONDITION_ENERGY` of its energy), two identical
        conditions, or a condition number above :data:`MAX_CONDITION_NUMBER`.
    """
    where = f" in {events_file}" if events_file else ""
    prefix = f"{run_name}: " if run_name else ""
    columns = [c for c in conditions if c in prepared.columns]
    energy_raw = {c: float(np.sum((raw[c] - raw[c].mean()) ** 2)) for c in columns}
    energy = {c: float(np.sum(prepared[c] ** 2)) for c in columns}
    empty = [c for c in columns if energy_raw[c] == 0 or energy[c] < MIN_CONDITION_ENERGY * energy_raw[c]]
    if empty:
        kept = ", ".join(f"{c} {100 * energy[c] / energy_raw[c]:.1f} %" if energy_raw[c] else f"{c} 0 %"
                         for c in empty)
        return (f"{prefix}condition(s) {empty}{where} have (almost) no signal left after censoring and "
                f"filtering (energy kept: {kept}; minimum {100 * MIN_CONDITION_ENERGY:g} %). Run excluded.")
    if len(columns) < 2:
        return ""
    matrix = prepared[columns].to_numpy(dtype=np.float64)
    matrix = matrix / np.sqrt((matrix**2).sum(axis=0))
    for i, a in enumerate(columns):
        for j in range(i + 1, len(columns)):
            if abs(float(matrix[:, i] @ matrix[:, j])) > 1 - 1e-6:
                return (f"{prefix}conditions {a!r} and {columns[j]!r}{where} have identical regressors "
                        "after convolution, filtering and censoring: their effects (and gPPI "
                        "interactions) cannot be told apart. Check the events file. Run excluded.")
    singular = np.linalg.svd(matrix, compute_uv=False)
    condition = float(singular[0] / singular[-1]) if singular[-1] > 0 else np.inf
    if condition > MAX_CONDITION_NUMBER:
        return (f"{prefix}conditions {columns}{where} are collinear after filtering and censoring: "
                f"condition number {condition:.1f}, above {MAX_CONDITION_NUMBER:g}. Check the events "
                "file. Run excluded.")
    return ""


def background_operator(
    task_regressors: pd.DataFrame | NDArray,
    confounds: NDArray | pd.DataFrame | None,
    n_timepoints: int,
    *,
    sample_mask: NDArray | None = None,
) -> NDArray[np.float64]:
    """The (n_kept, n_timepoints) matrix that censors and regresses task, confounds and a constant.

    Its product with the data's preparation ``F`` gives the degrees of freedom of background FC:
    ``fcflow.denoise.correlation_dof(background_operator(...) @ F)``.
    """
    parts = [np.asarray(task_regressors, dtype=np.float64)]
    if confounds is not None:
        conf = np.asarray(confounds, dtype=np.float64)
        parts.append(conf[:, None] if conf.ndim == 1 else conf)
    x = np.column_stack([*parts, np.ones(n_timepoints)])
    if sample_mask is not None:
        keep = np.zeros(n_timepoints, bool)
        keep[sample_mask] = True
        select = np.eye(n_timepoints)[keep]
        x = x[keep]
    else:
        select = np.eye(n_timepoints)
    residual_forming = np.eye(x.shape[0]) - x @ np.linalg.pinv(x)
    return residual_forming @ select


def compute_background_fc(
    voxel_signals: NDArray,
    seed_signal: NDArray,
    task_regressors: pd.DataFrame | NDArray,
    confounds: NDArray | pd.DataFrame | None = None,
    *,
    sample_mask: NDArray | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Seed-to-voxel correlation after regressing the task (and confounds) out of both.

    Parameters
    ----------
    voxel_signals : ndarray of shape (n_timepoints, n_voxels)
    seed_signal : ndarray of shape (n_timepoints,)
    task_regressors : DataFrame or ndarray of shape (n_timepoints, n_regressors)
        HRF-convolved task regressors (:func:`build_task_regressors`).
    confounds : ndarray or DataFrame of shape (n_timepoints, n_confounds), optional
    sample_mask : ndarray of int or bool, optional
        Volumes to use.

    Returns
    -------
    r, z : ndarray of shape (n_voxels,), float32
        Pearson r of the residuals and its Fisher z; nan where a voxel's residual is constant.
    """
    y = np.asarray(voxel_signals)
    seed = np.asarray(seed_signal, dtype=np.float64)
    parts = [np.asarray(task_regressors, dtype=np.float64)]
    if confounds is not None:
        conf = np.asarray(confounds, dtype=np.float64)
        parts.append(conf[:, None] if conf.ndim == 1 else conf)
    n_time = y.shape[0]
    if any(p.shape[0] != n_time for p in parts) or seed.shape != (n_time,):
        raise InputDataError(
            f"'seed_signal', 'task_regressors' and 'confounds' must have one row per volume "
            f"({n_time}). Got {seed.shape[0]}, {[p.shape[0] for p in parts]}."
        )
    operator = background_operator(task_regressors, confounds, n_time, sample_mask=sample_mask)
    r = correlate_cleaned_seeds(y, operator, (operator @ seed)[:, None])[0]
    return r, fisher_z(r)
