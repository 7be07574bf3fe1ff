"""Parameters of a simulated study: design, planted effects, noise; presets; TOML definitions.

Everything a simulation depends on is in the frozen dataclasses below, so the ground truth can
record it and the same values give the same bytes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcflow.errors import FcflowError, RecipeError

GROUPS: tuple[str, ...] = ("placebo", "ketamine", "lamotrigine_ketamine")
SESSIONS: tuple[str, ...] = ("baseline", "infusion", "24h")
TASKS: tuple[str, ...] = ("rest", "nback")
PRESETS: tuple[str, ...] = ("weigner2025", "null")
# only follow-up sessions can be missing: every subject keeps its baseline
MAX_MISSING_SESSIONS: float = (len(SESSIONS) - 1) / len(SESSIONS)


class SimulationError(FcflowError, ValueError):
    """A simulation parameter that is out of range; the message names it and the fix."""


@dataclass(frozen=True)
class Region:
    """A spherical region of grey matter, in MNI152NLin2009cAsym millimetres.

    Parameters
    ----------
    label : str
        BIDS-safe name (letters and digits), used in the ``desc-`` of its mask.
    centre_mm : tuple of 3 float
        Sphere centre (x, y, z) in mm.
    radius_mm : float
        Sphere radius in mm; the region is the sphere intersected with grey matter.
    """

    label: str
    centre_mm: tuple[float, float, float]
    radius_mm: float = 10.0


@dataclass(frozen=True)
class SimulationEffects:
    """What is planted: sites, couplings, the PPI effect and task activation.

    Couplings are sample correlations between noise-free latent signals (exact, see
    :func:`fcflow.simulate.signals.couple`); amplitudes are percent of the voxel's baseline.

    Parameters
    ----------
    seed : Region
        The stand-in pgACC (used when no Julich-Brain directory is given).
    insula, dmpfc : Region
        Targets of the rest and the n-back effect.
    control : Region
        Co-activated-only region (left dlPFC): task activation, no coupling and no PPI.
    insula_coupling : float, default=0.25
        pgACC-insula correlation of the latent signals for everyone, both tasks (group mean).
    insula_rest_change : float, default=0.45
        Added in ``effect_group`` at ``effect_session``, rest only.
    dmpfc_coupling : float, default=0.25
        pgACC-dmPFC background correlation for everyone, both tasks (group mean).
    dmpfc_ppi_change : float, default=0.5
        Coefficient ``d`` of ``seed * psy_2back`` in the dmPFC signal, ``effect_group`` at
        ``effect_session``, n-back only (0 elsewhere).
    effect_group, effect_session : str
        Cell that carries both effects.
    subject_coupling_sd : float, default=0.1
        SD of each subject's offset to the background couplings (shared by its sessions).
    run_coupling_sd : float, default=0.05
        SD of a further run-to-run jitter of the background couplings.
    effect_subject_sd : float, default=0.1
        SD of each subject's deviation from ``insula_rest_change`` and ``dmpfc_ppi_change``.
    seed_amplitude_pct, target_amplitude_pct : float
        Amplitude of the latent signal in seed and target voxels.
    activation_sites : tuple of Region
        Task-positive regions (bilateral dlPFC and parietal cortex).
    activation_2back_pct, activation_0back_pct : float
        Peak task response per condition.
    seed_activation_2back_pct : float, default=-0.3
        pgACC response to 2-back (a deactivation, as in the default-mode network); scaled by
        0.4 for 0-back.
    """

    seed: Region = Region("pgACC", (0.0, 47.0, 9.0), 10.0)
    insula: Region = Region("leftInsula", (-38.0, 8.0, 0.0), 10.0)
    dmpfc: Region = Region("dmPFC", (0.0, 48.0, 36.0), 10.0)
    control: Region = Region("leftdlPFC", (-42.0, 30.0, 30.0), 10.0)
    insula_coupling: float = 0.25
    insula_rest_change: float = 0.45
    dmpfc_coupling: float = 0.25
    dmpfc_ppi_change: float = 0.5
    effect_group: str = "ketamine"
    effect_session: str = "infusion"
    subject_coupling_sd: float = 0.1
    run_coupling_sd: float = 0.05
    effect_subject_sd: float = 0.1
    seed_amplitude_pct: float = 1.5
    target_amplitude_pct: float = 1.5
    activation_sites: tuple[Region, ...] = (
        Region("leftdlPFC", (-42.0, 30.0, 30.0), 10.0),
        Region("rightdlPFC", (42.0, 30.0, 30.0), 10.0),
        Region("leftParietal", (-36.0, -54.0, 44.0), 10.0),
        Region("rightParietal", (36.0, -54.0, 44.0), 10.0),
    )
    activation_2back_pct: float = 1.2
    activation_0back_pct: float = 0.5
    seed_activation_2back_pct: float = -0.3


@dataclass(frozen=True)
class NoiseModel:
    """Noise, physiology and head motion; the same for every preset.

    Parameters
    ----------
    smooth_noise_pct : float, default=1.0
        SD of spatially smooth, AR(1) noise in grey matter (scaled by tissue, see below).
    smooth_noise_fwhm_mm : float, default=6.0
    noise_ar1 : float, default=0.4
        Lag-1 autocorrelation of the smooth noise.
    white_noise_pct : float, default=0.5
        Unsmoothed thermal noise.
    global_pct : float, default=0.6
        Global physiological component in grey matter; CSF gets 2x, white matter 0.4x.
    physio_pct : float, default=0.8
        Physiological noise in grey matter (a few broad patterns; CSF 2.5x, WM 0.6x).
    drift_pct : float, default=1.0
        Size of slow (linear + quadratic) drifts over the run.
    n_non_steady : int, default=2
        Initial volumes brighter by ``non_steady_gain`` (T1 saturation not yet reached).
    non_steady_gain : tuple of float, default=(0.5, 0.15)
    motion_scale : tuple of (group, session, scale), default=drug groups at infusion 1.2
        Multiplies every motion amplitude and the spike rate of the matching runs; other
        runs use 1.
    motion_level : float, default=1.0
        Study-wide multiplier (>= 0) of every motion amplitude and the spike rate, on top of
        ``motion_scale`` and each subject's propensity. Share of volumes fcflow censors at
        its defaults (FD > 0.5 mm or std DVARS > 1.5, segment rule of 5, the 2
        non-steady-state volumes included), mean over 216 runs (4 mm, 3 per group, seeds 1
        and 2; TR 2 s with 100 volumes / TR 1.5 s with rest 240 and n-back 200):

        =====  ===========  ===========  ============================================
        level  TR 2.0 s     TR 1.5 s     flagged by FD / std DVARS (TR 2 s)
        =====  ===========  ===========  ============================================
        0.5    4 %          3 %          1 % / 2 %
        1      8 %          7 %          3 % / 4 %
        1.5    13 %         12 %         5 % / 7 %
        2      24 %         22 %         11 % / 11 %
        2.5    42 %         37 %         20 % / 14 %
        3      59 %         53 %         31 % / 17 %
        =====  ===========  ===========  ============================================

        So about 0.5-0.75 gives ~5 %, 2 gives ~20 % and 2.75-3 gives ~50 %. Runs differ
        widely at high levels (at 2.5, 10 % of runs lose <= 9 % and 10 % lose >= 81 %), as
        subjects' motion propensity multiplies the level. Above ~3 the slow drift alone
        exceeds 0.5 mm FD and nearly every volume is censored.
    subject_motion_sd : float, default=0.3
        SD of each subject's log motion propensity.
    drift_trans_mm, drift_rot_rad : float
        Random-walk step SD of the slow head drift per volume.
    spike_rate : float, default=0.02
        Probability of a sudden movement per volume.
    spike_trans_mm, spike_rot_rad : float
        SD of a sudden movement per axis.
    motion_residual_fraction : float, default=0.15
        Fraction of the intensity change that the displacement would cause (baseline-image
        gradient dot displacement) left after realignment: a signal linear in the 6 motion
        parameters.
    spike_global_pct_per_mm : float, default=1.0
        Global signal drop per mm of framewise displacement (spin history).
    spike_edge_pct_per_mm : float, default=4.0
        Spatially structured artefact per mm of framewise displacement, strongest at the
        brain edge.
    spike_carryover : float, default=0.4
        Fraction of a volume's spike artefact that persists into the next volume.
    """

    smooth_noise_pct: float = 1.0
    smooth_noise_fwhm_mm: float = 6.0
    noise_ar1: float = 0.4
    white_noise_pct: float = 0.5
    global_pct: float = 0.6
    physio_pct: float = 0.8
    drift_pct: float = 1.0
    n_non_steady: int = 2
    non_steady_gain: tuple[float, ...] = (0.5, 0.15)
    motion_scale: tuple[tuple[str, str, float], ...] = (
        ("ketamine", "infusion", 1.2),
        ("lamotrigine_ketamine", "infusion", 1.2),
    )
    motion_level: float = 1.0
    subject_motion_sd: float = 0.3
    drift_trans_mm: float = 0.015
    drift_rot_rad: float = 0.0003
    spike_rate: float = 0.02
    spike_trans_mm: float = 0.3
    spike_rot_rad: float = 0.004
    motion_residual_fraction: float = 0.15
    spike_global_pct_per_mm: float = 1.0
    spike_edge_pct_per_mm: float = 4.0
    spike_carryover: float = 0.4

    def scale_for(self, group: str, session: str) -> float:
        """Return the motion scale of a group at a session times ``motion_level``.

        The group x session scale is 1 when not listed in ``motion_scale``.
        """
        group_scale = 1.0
        for g, s, scale in self.motion_scale:
            if g == group and s == session:
                group_scale = float(scale)
                break
        return group_scale * float(self.motion_level)


@dataclass(frozen=True)
class NbackDesign:
    """Block design of the n-back task (seconds).

    The run starts with ``lead_in_s`` of fixation, then repeats 0-back block, fixation,
    2-back block, fixation until the run ends; a block that would not fit is left out.
    """

    block_s: float = 30.0
    fixation_s: float = 10.0
    lead_in_s: float = 10.0


@dataclass(frozen=True)
class SimulationDefinition:
    """A complete study definition (what a TOML like ``sample_data/sample_study.toml`` holds).

    ``n_volumes_rest`` and ``n_volumes_nback`` (None: ``n_volumes``) give each task its own
    run length; ``missing_sessions`` is the fraction of (subject, session) pairs left out (see
    :func:`fcflow.simulate.simulate_study`).
    """

    n_per_group: int = 3
    resolution_mm: float = 4.0
    #: 10 min at TR 2 s: band-pass, 24P+aCompCor and censoring leave about 19 dof, above the
    #: shipped recipe's min_dof of 10 (100 volumes left fewer than 10 and every run was refused)
    n_volumes: int = 300
    n_volumes_rest: int | None = None
    n_volumes_nback: int | None = None
    t_r: float = 2.0
    missing_sessions: float = 0.0
    seed: int = 0
    preset: str = "weigner2025"
    name: str = "fcflow synthetic study"
    effects: SimulationEffects | None = None
    noise: NoiseModel | None = None
    nback: NbackDesign = field(default_factory=NbackDesign)
    julich_dir: Path | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`fcflow.simulate.simulate_study`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    # ``simulate_study(out_dir, **definition)`` works: the definition unpacks as a mapping.
    # ``julich_dir`` is left out when unset, so a caller can pass its own.
    def keys(self) -> list[str]:
        return [name for name, value in self.as_kwargs().items()
                if not (name == "julich_dir" and value is None)]

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)


def preset_effects(preset: str) -> SimulationEffects:
    """Return the planted effects of a preset.

    ``weigner2025``: ketamine at infusion raises pgACC-left insula coupling at rest and
    pgACC-dmPFC coupling during 2-back (PPI); lamotrigine+ketamine and placebo carry neither.
    ``null``: the same sites, noise, motion and task, but every coupling and effect is zero.
    """
    if preset == "weigner2025":
        return SimulationEffects()
    if preset == "null":
        return SimulationEffects(
            insula_coupling=0.0,
            insula_rest_change=0.0,
            dmpfc_coupling=0.0,
            dmpfc_ppi_change=0.0,
            effect_subject_sd=0.0,
        )
    raise SimulationError(f"'preset' must be one of {PRESETS}. Got {preset!r}.")


def _check(condition: bool, name: str, expectation: str, value: Any, where: str = "") -> None:
    if not condition:
        suffix = f" ({where})" if where else ""
        raise SimulationError(f"'{name}' must be {expectation}. Got {value!r}.{suffix}")


def validate_design(
    *, n_per_group: Any, resolution_mm: Any, n_volumes: Any, t_r: Any, seed: Any, preset: Any,
    n_volumes_rest: Any = None, n_volumes_nback: Any = None, missing_sessions: Any = 0.0,
    where: str = "",
) -> None:
    """Raise :class:`SimulationError` for a design value out of range."""
    _check(isinstance(n_per_group, int) and not isinstance(n_per_group, bool) and n_per_group >= 1,
           "n_per_group", "an integer >= 1", n_per_group, where)
    _check(isinstance(resolution_mm, (int, float)) and not isinstance(resolution_mm, bool)
           and math.isfinite(resolution_mm) and float(resolution_mm).is_integer()
           and 1 <= resolution_mm <= 8,
           "resolution_mm", "a whole number of mm from 1 to 8 (2 for realism, 4 for speed)",
           resolution_mm, where)
    _check(isinstance(n_volumes, int) and not isinstance(n_volumes, bool) and n_volumes >= 30,
           "n_volumes", "an integer >= 30", n_volumes, where)
    for name, value in (("n_volumes_rest", n_volumes_rest), ("n_volumes_nback", n_volumes_nback)):
        _check(value is None or (isinstance(value, int) and not isinstance(value, bool)
                                 and value >= 30),
               name, "an integer >= 30 (or unset: n_volumes)", value, where)
    _check(isinstance(t_r, (int, float)) and not isinstance(t_r, bool) and math.isfinite(t_r)
           and 0.2 <= t_r <= 10, "t_r", "a repetition time in seconds between 0.2 and 10",
           t_r, where)
    _check(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
           "seed", "a non-negative integer", seed, where)
    _check(preset in PRESETS, "preset", f"one of {PRESETS}", preset, where)
    _check(isinstance(missing_sessions, (int, float)) and not isinstance(missing_sessions, bool)
           and 0 <= missing_sessions <= MAX_MISSING_SESSIONS, "missing_sessions",
           f"a fraction from 0 to {MAX_MISSING_SESSIONS:.4g} (every subject keeps its baseline)",
           missing_sessions, where)


def validate_effects(effects: SimulationEffects, noise: NoiseModel, where: str = "") -> None:
    """Raise :class:`SimulationError` for effects or noise that cannot be simulated."""
    for name in ("insula_coupling", "dmpfc_coupling"):
        value = getattr(effects, name)
        _check(-0.95 <= value <= 0.95, name, "a correlation between -0.95 and 0.95", value, where)
    total = effects.insula_coupling + effects.insula_rest_change
    _check(-0.95 <= total <= 0.95, "insula_coupling + insula_rest_change",
           "a correlation between -0.95 and 0.95", total, where)
    _check(effects.effect_group in GROUPS, "effect_group", f"one of {GROUPS}",
           effects.effect_group, where)
    _check(effects.effect_session in SESSIONS, "effect_session", f"one of {SESSIONS}",
           effects.effect_session, where)
    for name in ("subject_coupling_sd", "run_coupling_sd", "effect_subject_sd",
                 "seed_amplitude_pct", "target_amplitude_pct"):
        value = getattr(effects, name)
        _check(value >= 0, name, "a number >= 0", value, where)
    for region in (effects.seed, effects.insula, effects.dmpfc, effects.control,
                   *effects.activation_sites):
        _check(region.label.isalnum(), "label", "letters and digits only (a BIDS desc)",
               region.label, where)
        _check(region.radius_mm > 0, "radius_mm", "a positive number", region.radius_mm, where)
    labels = [effects.seed.label, effects.insula.label, effects.dmpfc.label, effects.control.label]
    _check(len(set(labels)) == len(labels), "label", "different for seed, insula, dmpfc and "
           "control", labels, where)
    _check(0 <= noise.noise_ar1 < 1, "noise_ar1", "in [0, 1)", noise.noise_ar1, where)
    _check(0 <= noise.spike_rate <= 0.5, "spike_rate", "in [0, 0.5]", noise.spike_rate, where)
    _check(isinstance(noise.motion_level, (int, float)) and not isinstance(noise.motion_level, bool)
           and math.isfinite(noise.motion_level) and noise.motion_level >= 0,
           "motion_level", "a number >= 0 (1 for the default motion)", noise.motion_level, where)
    _check(0 <= noise.n_non_steady <= len(noise.non_steady_gain), "n_non_steady",
           f"between 0 and len(non_steady_gain) = {len(noise.non_steady_gain)}",
           noise.n_non_steady, where)
    for g, s, scale in noise.motion_scale:
        _check(g in GROUPS and s in SESSIONS and scale >= 0, "motion_scale",
               f"a list of (group in {GROUPS}, session in {SESSIONS}, scale >= 0)",
               (g, s, scale), where)


# --- TOML definitions -------------------------------------------------------------------------

_STUDY_KEYS = {f.name for f in dataclasses.fields(SimulationDefinition)} - {
    "effects", "noise", "nback"}
_REGION_FIELDS = ("seed", "insula", "dmpfc", "control")


def _region_from(table: Any, key: str, file: Path) -> Region:
    if not isinstance(table, Mapping):
        raise RecipeError(f"'{key}' must be a table with label, centre_mm and radius_mm. "
                          f"Got {table!r}. ({file})")
    unknown = set(table) - {"label", "centre_mm", "radius_mm"}
    if unknown:
        raise RecipeError(f"'{key}' must only have keys label, centre_mm, radius_mm. Got "
                          f"{sorted(unknown)!r}. ({file})")
    centre = table.get("centre_mm")
    if not (isinstance(centre, list) and len(centre) == 3
            and all(isinstance(v, (int, float)) for v in centre)):
        raise RecipeError(f"'{key}.centre_mm' must be a list of 3 numbers. Got {centre!r}. ({file})")
    return Region(str(table.get("label", key)), tuple(float(v) for v in centre),  # type: ignore[arg-type]
                  float(table.get("radius_mm", 10.0)))


def _replace_from(obj: Any, table: Mapping[str, Any], section: str, file: Path) -> Any:
    names = {f.name: f for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in table.items():
        if key not in names:
            raise RecipeError(f"'[{section}]' key must be one of {sorted(names)}. Got {key!r}. "
                              f"({file})")
        current = getattr(obj, key)
        if isinstance(current, Region):
            changes[key] = _region_from(value, f"{section}.{key}", file)
        elif key == "activation_sites":
            if not isinstance(value, list):
                raise RecipeError(f"'{section}.{key}' must be an array of tables. Got {value!r}. "
                                  f"({file})")
            changes[key] = tuple(_region_from(v, f"{section}.{key}", file) for v in value)
        elif key == "motion_scale":
            if not (isinstance(value, list) and all(
                    isinstance(v, list) and len(v) == 3 for v in value)):
                raise RecipeError(f"'{section}.{key}' must be a list of [group, session, scale]. "
                                  f"Got {value!r}. ({file})")
            changes[key] = tuple((str(g), str(s), float(x)) for g, s, x in value)
        elif key == "non_steady_gain":
            changes[key] = tuple(float(v) for v in value)
        elif isinstance(current, bool) or isinstance(current, str):
            if type(value) is not type(current):
                raise RecipeError(f"'{section}.{key}' must be a {type(current).__name__}. Got "
                                  f"{value!r}. ({file})")
            changes[key] = value
        elif isinstance(current, int):
            if not isinstance(value, int) or isinstance(value, bool):
                raise RecipeError(f"'{section}.{key}' must be an integer. Got {value!r}. ({file})")
            changes[key] = value
        elif isinstance(current, float):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise RecipeError(f"'{section}.{key}' must be a number. Got {value!r}. ({file})")
            changes[key] = float(value)
        else:  # pragma: no cover - every field type is handled above
            changes[key] = value
    return dataclasses.replace(obj, **changes)


def load_simulation_definition(path: str | os.PathLike[str]) -> SimulationDefinition:
    """Read a study definition from TOML.

    The file has a ``[study]`` table (``name``, ``preset``, ``n_per_group``, ``resolution_mm``,
    ``n_volumes``, ``t_r``, ``seed``, optional ``n_volumes_rest``, ``n_volumes_nback``,
    ``missing_sessions`` and ``julich_dir``) and optional ``[effects]``,
    ``[noise]`` and ``[nback]`` tables that override the preset's defaults field by field
    (see :class:`SimulationEffects`, :class:`NoiseModel`, :class:`NbackDesign`).

    Raises
    ------
    RecipeError
        If the file is not valid TOML, has unknown keys or values of the wrong type or range.
    """
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"Simulation definition {file} is not valid TOML: {exc}") from exc
    unknown = set(data) - {"study", "effects", "noise", "nback"}
    if unknown:
        raise RecipeError(f"Top-level tables must be study, effects, noise, nback. Got "
                          f"{sorted(unknown)!r}. ({file})")
    study = data.get("study", {})
    bad = set(study) - _STUDY_KEYS
    if bad:
        raise RecipeError(f"'[study]' key must be one of {sorted(_STUDY_KEYS)}. Got "
                          f"{sorted(bad)!r}. ({file})")
    preset = study.get("preset", "weigner2025")
    if preset not in PRESETS:
        raise RecipeError(f"'preset' must be one of {PRESETS}. Got {preset!r}. ({file})")
    effects = _replace_from(preset_effects(preset), data.get("effects", {}), "effects", file)
    noise = _replace_from(NoiseModel(), data.get("noise", {}), "noise", file)
    nback = _replace_from(NbackDesign(), data.get("nback", {}), "nback", file)
    kwargs = {k: v for k, v in study.items() if k != "julich_dir"}
    if isinstance(kwargs.get("resolution_mm"), int):
        kwargs["resolution_mm"] = float(kwargs["resolution_mm"])
    if isinstance(kwargs.get("t_r"), int):
        kwargs["t_r"] = float(kwargs["t_r"])
    if isinstance(kwargs.get("missing_sessions"), int):
        kwargs["missing_sessions"] = float(kwargs["missing_sessions"])
    julich = study.get("julich_dir")
    definition = SimulationDefinition(
        **kwargs, effects=effects, noise=noise, nback=nback,
        julich_dir=(file.parent / julich) if julich else None,
    )
    try:
        validate_design(n_per_group=definition.n_per_group,
                        resolution_mm=definition.resolution_mm,
                        n_volumes=definition.n_volumes, t_r=definition.t_r,
                        seed=definition.seed, preset=definition.preset,
                        n_volumes_rest=definition.n_volumes_rest,
                        n_volumes_nback=definition.n_volumes_nback,
                        missing_sessions=definition.missing_sessions)
        validate_effects(effects, noise)
    except SimulationError as exc:
        raise RecipeError(f"{exc} ({file})") from exc
    return definition
