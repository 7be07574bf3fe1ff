"""Synthetic drug studies for fcflow: BIDS, fMRIPrep-style derivatives and a planted truth.

Three groups (placebo, ketamine, lamotrigine_ketamine) x sessions (baseline, infusion, 24h) x
tasks (rest, nback). Preset ``weigner2025`` plants what Weigner et al. (2025) reported: in the
ketamine group during infusion, higher pgACC-left insula coupling at rest and higher
pgACC-dmPFC coupling during 2-back blocks (PPI); preset ``null`` plants nothing.

Public API: :func:`simulate_study`, :func:`simulate_run`, :func:`load_simulation_definition`,
and the parameter dataclasses :class:`SimulationEffects`, :class:`NoiseModel`,
:class:`NbackDesign`, :class:`Region`, :class:`SimulationDefinition`.
"""

from fcflow.simulate.anatomy import Anatomy, build_anatomy
from fcflow.simulate.confounds import compute_confounds
from fcflow.simulate.params import (
    GROUPS,
    PRESETS,
    SESSIONS,
    TASKS,
    NbackDesign,
    NoiseModel,
    Region,
    SimulationDefinition,
    SimulationEffects,
    SimulationError,
    load_simulation_definition,
    preset_effects,
)
from fcflow.simulate.signals import (
    SimulatedRun,
    StudyRegions,
    build_regions,
    couple,
    draw_subject_traits,
    simulate_run,
)
from fcflow.simulate.study import SimulationResult, assign_groups, simulate_study

__all__ = [
    "GROUPS", "PRESETS", "SESSIONS", "TASKS",
    "Anatomy", "NbackDesign", "NoiseModel", "Region", "SimulatedRun", "SimulationDefinition",
    "SimulationEffects", "SimulationError", "SimulationResult", "StudyRegions",
    "assign_groups", "build_anatomy", "build_regions", "compute_confounds", "couple",
    "draw_subject_traits", "load_simulation_definition", "preset_effects", "simulate_run",
    "simulate_study",
]
