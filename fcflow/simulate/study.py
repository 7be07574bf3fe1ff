"""Write a simulated study: raw BIDS, fMRIPrep-style derivatives and the ground truth."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fcflow import __version__
from fcflow.io import save_img, write_json, write_text, write_tsv
from fcflow.simulate.anatomy import Anatomy, build_anatomy
from fcflow.simulate.confounds import compute_confounds
from fcflow.simulate.nifti import write_bold
from fcflow.simulate.params import (
    GROUPS,
    SESSIONS,
    TASKS,
    NbackDesign,
    NoiseModel,
    SimulationEffects,
    SimulationError,
    preset_effects,
    validate_design,
    validate_effects,
)
from fcflow.simulate.signals import (
    StudyRegions,
    build_regions,
    draw_subject_traits,
    make_nback_events,
    simulate_run,
)
from fcflow.templates import MNI_SPACE

LOGGER = logging.getLogger("fcflow.simulate")
BIDS_VERSION = "1.10.0"
JULICH_PGACC_AREAS = ("Area p24ab (pACC)", "Area p24c (pACC)", "Area p32 (pACC)")
_TASK_NAMES = {"rest": "rest", "nback": "nback"}
_TASK_DESCRIPTIONS = {
    "rest": "Resting state, eyes open on a fixation cross.",
    "nback": "Block-design letter n-back: 0-back and 2-back blocks separated by fixation.",
}


@dataclass(frozen=True)
class SimulationResult:
    """Where a simulated study was written and what it holds.

    Attributes
    ----------
    bids_dir : Path
        Raw BIDS root (the ``out_dir`` given).
    fmriprep_dir, ground_truth_dir : Path
    participants : DataFrame
        ``participants.tsv``.
    runs : DataFrame
        One row per run with its planted values and motion summary (``runs.tsv``).
    effects : DataFrame
        ``effects.tsv``.
    seed_source : str
        ``"julich-brain"`` or ``"stand-in"``.
    missing_sessions : DataFrame
        (participant_id, group, session) left out (``missing_sessions.tsv`` when not empty).
    """

    bids_dir: Path
    fmriprep_dir: Path
    ground_truth_dir: Path
    participants: pd.DataFrame
    runs: pd.DataFrame
    effects: pd.DataFrame
    seed_source: str
    missing_sessions: pd.DataFrame = dataclasses.field(
        default_factory=lambda: pd.DataFrame(columns=["participant_id", "group", "session"]))

    @property
    def n_runs(self) -> int:
        """Number of runs written."""
        return len(self.runs)


def _entities(subject: str, session: str, task: str) -> str:
    return f"sub-{subject}_ses-{session}_task-{task}"


def assign_groups(n_per_group: int, seed: int) -> list[tuple[str, str]]:
    """Subject labels ``01``.. with groups in a balanced, seeded random order."""
    n = n_per_group * len(GROUPS)
    width = max(2, len(str(n)))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x67726F7570]))  # "group"
    groups = list(np.repeat(GROUPS, n_per_group))
    order = rng.permutation(n)
    return [(f"{i + 1:0{width}d}", str(groups[order[i]])) for i in range(n)]


def choose_missing_sessions(subjects: list[tuple[str, str]], fraction: float, seed: int
                            ) -> list[tuple[str, str]]:
    """(subject, session) pairs to leave out: ``round(fraction * n_pairs)``, seeded.

    Only follow-up sessions are drawn, so every subject keeps its baseline (the reference of
    every change score); a subject may lose both follow-ups.
    """
    n_pairs = len(subjects) * len(SESSIONS)
    n_missing = int(round(fraction * n_pairs))
    if n_missing == 0:
        return []
    candidates = [(sub, ses) for sub, _ in subjects for ses in SESSIONS[1:]]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6D697373]))  # "miss"
    chosen = rng.choice(len(candidates), size=min(n_missing, len(candidates)), replace=False)
    return [candidates[i] for i in sorted(chosen)]


def check_nback_fits(n_volumes: int, t_r: float, nback: NbackDesign) -> None:
    """Log a warning when an n-back run is too short for one 0back and one 2back block.

    Blocks that would not end within the run are left out (events never pass the run's end),
    so a short run silently loses its 2-back blocks and with them the PPI effect.
    """
    events = make_nback_events(n_volumes, t_r, nback)
    counts = events["trial_type"].value_counts()
    n_0back, n_2back = int(counts.get("0back", 0)), int(counts.get("2back", 0))
    if n_0back and n_2back:
        return
    needed_s = nback.lead_in_s + 2 * nback.block_s + nback.fixation_s
    LOGGER.warning(
        "The n-back runs of %d volumes at TR %g s (%g s) hold %d 0back and %d 2back blocks: "
        "'n_volumes_nback' must give at least lead_in_s + 2 x block_s + fixation_s = %g s "
        "(%d volumes) for one block of each; the PPI effect is not planted.",
        n_volumes, t_r, n_volumes * t_r, n_0back, n_2back, needed_s,
        int(np.ceil(needed_s / t_r)))


def _julich_seed(julich_dir: Path, anatomy: Anatomy) -> NDArray[np.bool_]:
    from fcflow.atlas.seeds import build_seed_mask  # another module; only needed with real atlases

    img = build_seed_mask(julich_dir, JULICH_PGACC_AREAS, ("left", "right"),
                          anatomy.brain_mask_img(), source="mpm")
    data = np.asanyarray(img.dataobj) > 0
    mask = data[tuple(anatomy.voxels.T)] & (np.arange(anatomy.n_voxels) < anatomy.n_brain)
    if not mask.any():
        raise SimulationError(
            f"The Julich-Brain pgACC from {julich_dir} has 0 voxels in the brain mask of the "
            f"{anatomy.resolution_mm:g} mm grid: check the atlas files.")
    return mask


#: Written last by :func:`simulate_study`: the parameters and every file's size
COMPLETE_RECORD = "simulation_complete.json"


def _finished_simulation(out_dir: Path, parameters: dict[str, Any]) -> bool:
    """True when ``out_dir`` holds a finished simulation of these parameters, every file intact in size."""
    record = out_dir / "derivatives" / "ground_truth" / COMPLETE_RECORD
    try:
        done = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if done.get("parameters") != json.loads(json.dumps(parameters, default=str)):
        return False
    for rel, size in done.get("files", {}).items():
        path = out_dir / rel
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _load_finished(out: Path) -> SimulationResult:
    gt_dir = out / "derivatives" / "ground_truth"

    def table(name: str) -> pd.DataFrame | None:
        path = gt_dir / name
        return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["n/a"]) if path.is_file() else None

    meta = json.loads((gt_dir / "simulation.json").read_text(encoding="utf-8"))
    participants = pd.read_csv(out / "participants.tsv", sep="\t", keep_default_na=False, na_values=["n/a"])
    missing = table("missing_sessions.tsv")
    return SimulationResult(bids_dir=out, fmriprep_dir=out / "derivatives" / "fmriprep", ground_truth_dir=gt_dir,
                            participants=participants, runs=table("runs.tsv"), effects=table("effects.tsv"),
                            seed_source=meta["seed_source"],
                            missing_sessions=missing if missing is not None else pd.DataFrame(
                                columns=["participant_id", "group", "session"]))


def _check_out_dir(out_dir: Path, parameters: dict[str, Any]) -> None:
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    previous = out_dir / "derivatives" / "ground_truth" / "simulation.json"
    if previous.is_file():
        try:
            old = json.loads(previous.read_text(encoding="utf-8")).get("parameters")
        except json.JSONDecodeError:
            old = None
        if old == json.loads(json.dumps(parameters, default=str)):
            LOGGER.info("%s holds an earlier simulation with the same parameters: "
                        "rewriting it.", out_dir)
            return
    raise SimulationError(
        f"'out_dir' must be empty or hold an earlier simulation with the same parameters. "
        f"Got {str(out_dir)!r}, which holds other files: choose a new folder.")


def _centroid_mm(mask: NDArray[np.bool_], anatomy: Anatomy) -> tuple[float, float, float]:
    centre = anatomy.coords_mm[mask].mean(axis=0)
    return tuple(float(round(v, 1)) for v in centre)  # type: ignore[return-value]


def _effects_table(effects: SimulationEffects, regions: StudyRegions, anatomy: Anatomy
                   ) -> pd.DataFrame:
    seed = effects.seed.label
    rows = []

    def add(name: str, kind: str, task: str, measure: str, target: Any, group: str,
            session: str, condition: str | None, value: float, baseline: float) -> None:
        rows.append({
            "name": name, "kind": kind, "task": task, "measure": measure, "seed": seed,
            "target": target.label, "group": group, "session": session,
            "condition": condition, "value": value, "baseline_value": baseline,
            "x_mm": target.centre_mm[0], "y_mm": target.centre_mm[1],
            "z_mm": target.centre_mm[2], "radius_mm": target.radius_mm,
        })

    c_ins, c_dm = effects.insula_coupling, effects.dmpfc_coupling
    for task in TASKS:
        add(f"{effects.insula.label}_{task}_background", "background", task, "correlation",
            effects.insula, "all", "all", None, c_ins, c_ins)
        add(f"{effects.dmpfc.label}_{task}_background", "background", task, "correlation",
            effects.dmpfc, "all", "all", None, c_dm, c_dm)
    add(f"{effects.insula.label}_rest_{effects.effect_group}_{effects.effect_session}",
        "effect", "rest", "correlation", effects.insula, effects.effect_group,
        effects.effect_session, None, c_ins + effects.insula_rest_change, c_ins)
    add(f"{effects.dmpfc.label}_nback_ppi_{effects.effect_group}_{effects.effect_session}",
        "effect", "nback", "ppi", effects.dmpfc, effects.effect_group,
        effects.effect_session, "2back", effects.dmpfc_ppi_change, 0.0)
    for task in TASKS:
        add(f"{effects.control.label}_{task}_control", "control", task, "correlation",
            effects.control, "all", "all", None, 0.0, 0.0)
    return pd.DataFrame(rows)


_EFFECTS_JSON = {
    "name": {"Description": "Identifier of the planted relation."},
    "kind": {"Description": "background: coupling everyone has; effect: a change in one "
                            "group and session; control: task-activated region with no "
                            "coupling to the seed and no PPI."},
    "task": {"Description": "BIDS task label."},
    "measure": {"Description": "correlation: sample correlation of the noise-free latent "
                               "signals of seed and target; ppi: coefficient d of "
                               "seed_std * psy_2back in the target's latent signal, where "
                               "psy_2back is nilearn compute_regressor(hrf_model='spm', "
                               "oversampling=50) of the 2-back blocks at frame times "
                               "arange(n) * RepetitionTime."},
    "group": {"Description": "Group carrying the value ('all' for everyone)."},
    "session": {"Description": "Session carrying the value ('all' for every session)."},
    "condition": {"Description": "Task condition of a PPI effect."},
    "value": {"Description": "Planted group-mean value in this group and session (subjects "
                             "deviate by their random offsets, see runs.tsv)."},
    "baseline_value": {"Description": "Value everywhere else."},
    "x_mm": {"Description": "MNI x of the target centre.", "Units": "mm"},
    "y_mm": {"Description": "MNI y of the target centre.", "Units": "mm"},
    "z_mm": {"Description": "MNI z of the target centre.", "Units": "mm"},
    "radius_mm": {"Description": "Radius of the target sphere (intersected with grey "
                                 "matter, see the desc-<target>_mask images).", "Units": "mm"},
}


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def simulate_study(
    out_dir: str | os.PathLike[str],
    *,
    n_per_group: int = 3,
    resolution_mm: float = 4.0,
    n_volumes: int = 300,
    t_r: float = 2.0,
    seed: int = 0,
    preset: str = "weigner2025",
    effects: SimulationEffects | None = None,
    noise: NoiseModel | None = None,
    nback: NbackDesign | None = None,
    julich_dir: str | os.PathLike[str] | None = None,
    name: str = "fcflow synthetic study",
    n_volumes_rest: int | None = None,
    n_volumes_nback: int | None = None,
    missing_sessions: float = 0.0,
) -> SimulationResult:
    """Write a synthetic BIDS study with fMRIPrep-style derivatives and its ground truth.

    Parameters
    ----------
    out_dir : path
        BIDS root to create (empty, or an earlier simulation with the same parameters).
    n_per_group : int, default=3
        Subjects per group (placebo, ketamine, lamotrigine_ketamine).
    resolution_mm : float, default=4
        Whole mm; the MNI152NLin2009cAsym grid of :func:`fcflow.templates.mni_grid`.
    n_volumes : int, default=300
        Volumes per run (10 min at TR 2 s: enough dof for the shipped recipe's min_dof).
    t_r : float, default=2.0
        Repetition time in seconds.
    seed : int, default=0
        The same seed gives the same bytes in every file.
    preset : {"weigner2025", "null"}, default="weigner2025"
        Default effects (see :func:`fcflow.simulate.params.preset_effects`).
    effects : SimulationEffects, optional
        Replaces the preset's effects.
    noise : NoiseModel, optional
    nback : NbackDesign, optional
    julich_dir : path, optional
        Julich-Brain 3.1 folder: the seed is then the real pgACC (areas p24ab, p24c, p32, both
        hemispheres, maximum probability map) instead of the stand-in sphere.
    name : str
        ``Name`` in ``dataset_description.json``.
    n_volumes_rest, n_volumes_nback : int, optional
        Run length of each task (default ``n_volumes``), e.g. rest 240 and n-back 200 at
        TR 1.5 s. n-back blocks that would not end within the run are left out; a warning is
        logged when a run holds no 2-back block.
    missing_sessions : float, default=0
        Fraction of the (subject, session) pairs left out at random (seeded; only infusion
        and 24h, so everyone keeps the baseline; at most 2/3). They are listed in
        ``derivatives/ground_truth/missing_sessions.tsv``.

    Returns
    -------
    SimulationResult
    """
    # The arrays are small, so multi-threaded BLAS only spins: one thread halves the time.
    with _single_threaded_blas():
        return _simulate_study(
            out_dir, n_per_group=n_per_group, resolution_mm=resolution_mm,
            n_volumes=n_volumes, t_r=t_r, seed=seed, preset=preset, effects=effects,
            noise=noise, nback=nback, julich_dir=julich_dir, name=name,
            n_volumes_rest=n_volumes_rest, n_volumes_nback=n_volumes_nback,
            missing_sessions=missing_sessions)


def _single_threaded_blas() -> contextlib.AbstractContextManager[Any]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def _simulate_study(
    out_dir: str | os.PathLike[str],
    *,
    n_per_group: int,
    resolution_mm: float,
    n_volumes: int,
    t_r: float,
    seed: int,
    preset: str,
    effects: SimulationEffects | None,
    noise: NoiseModel | None,
    nback: NbackDesign | None,
    julich_dir: str | os.PathLike[str] | None,
    name: str,
    n_volumes_rest: int | None,
    n_volumes_nback: int | None,
    missing_sessions: float,
) -> SimulationResult:
    if isinstance(resolution_mm, int) and not isinstance(resolution_mm, bool):
        resolution_mm = float(resolution_mm)
    validate_design(n_per_group=n_per_group, resolution_mm=resolution_mm, n_volumes=n_volumes,
                    t_r=t_r, seed=seed, preset=preset, n_volumes_rest=n_volumes_rest,
                    n_volumes_nback=n_volumes_nback, missing_sessions=missing_sessions)
    effects = effects if effects is not None else preset_effects(preset)
    noise = noise if noise is not None else NoiseModel()
    nback = nback if nback is not None else NbackDesign()
    validate_effects(effects, noise)
    out = Path(out_dir)
    julich = Path(julich_dir) if julich_dir is not None else None
    if julich is not None and not julich.is_dir():
        raise SimulationError(f"'julich_dir' must be a folder with the Julich-Brain 3.1 maps. "
                              f"Got {str(julich)!r}.")
    res_label = f"{int(resolution_mm)}"
    task_volumes = {"rest": n_volumes_rest if n_volumes_rest is not None else n_volumes,
                    "nback": n_volumes_nback if n_volumes_nback is not None else n_volumes}
    check_nback_fits(task_volumes["nback"], t_r, nback)
    noise_json = _jsonable(noise)
    # Options added after the first release are recorded only when set, so a study made at
    # the defaults keeps the bytes (simulation.json) it had before they existed.
    if noise.motion_level == 1.0:
        del noise_json["motion_level"]
    parameters = {
        "name": name, "n_per_group": n_per_group, "resolution_mm": resolution_mm,
        "n_volumes": n_volumes, "t_r": t_r, "seed": seed, "preset": preset,
        "effects": _jsonable(effects), "noise": noise_json, "nback": _jsonable(nback),
        "julich_dir": str(julich) if julich else None,
    }
    for task in TASKS:
        if task_volumes[task] != n_volumes:
            parameters[f"n_volumes_{task}"] = task_volumes[task]
    if missing_sessions:
        parameters["missing_sessions"] = missing_sessions
    if _finished_simulation(out, parameters):
        # a rerun (e.g. of `fcflow demo`) reuses it untouched, so that the analysis of it resumes
        LOGGER.info("%s holds a finished simulation with the same parameters: reused as it is.", out)
        return _load_finished(out)
    _check_out_dir(out, parameters)
    (out / "derivatives" / "ground_truth" / COMPLETE_RECORD).unlink(missing_ok=True)
    started = time.monotonic()

    anatomy = build_anatomy(resolution_mm)
    seed_mask = _julich_seed(julich, anatomy) if julich is not None else None
    regions = build_regions(anatomy, effects, seed_mask)
    seed_source = "julich-brain" if regions.seed_is_julich else "stand-in"
    seed_text = ("Julich-Brain 3.1 pgACC (areas p24ab, p24c, p32, both hemispheres, MPM)"
                 if regions.seed_is_julich else
                 f"STAND-IN pgACC: a {effects.seed.radius_mm:g} mm sphere at MNI "
                 f"{tuple(effects.seed.centre_mm)} in grey matter, not the Julich-Brain areas")
    subjects = assign_groups(n_per_group, seed)
    gt_dir = out / "derivatives" / "ground_truth"
    prep_dir = out / "derivatives" / "fmriprep"
    write_json(gt_dir / "simulation.json", {
        "parameters": parameters,
        "seed_source": seed_source, "seed_description": seed_text,
        "fcflow_version": __version__,
        "space": MNI_SPACE,
        "note": "Synthetic data written by 'fcflow simulate'. Tissue maps come from nilearn's "
                "ICBM 2009a template resampled to the MNI152NLin2009cAsym grid.",
    })

    # --- raw BIDS
    write_json(out / "dataset_description.json", {
        "Name": f"{name} ({preset} preset; {seed_source} pgACC seed)",
        "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
        "Authors": ["fcflow simulate"],
        "GeneratedBy": [{"Name": "fcflow simulate", "Version": __version__}],
        "HowToAcknowledge": "Synthetic data; no participants were scanned.",
    })
    write_text(out / "README", _readme(name, preset, seed_text, n_per_group, resolution_mm,
                                       task_volumes, t_r, seed))
    traits = {sub: draw_subject_traits(seed, sub, effects, noise) for sub, _ in subjects}
    participants = pd.DataFrame({
        "participant_id": [f"sub-{s}" for s, _ in subjects],
        "group": [g for _, g in subjects],
        "age": [traits[s].age for s, _ in subjects],
        "sex": [traits[s].sex for s, _ in subjects],
    })
    write_tsv(out / "participants.tsv", participants)
    write_json(out / "participants.json", {
        "group": {"Description": "Randomised treatment group.", "Levels": {
            "placebo": "placebo infusion",
            "ketamine": "ketamine infusion (placebo pretreatment)",
            "lamotrigine_ketamine": "lamotrigine pretreatment, then ketamine infusion"}},
        "age": {"Description": "Age at baseline.", "Units": "year"},
        "sex": {"Description": "Sex.", "Levels": {"F": "female", "M": "male"}},
    })
    write_json(out / "task-nback_events.json", {
        "onset": {"Description": "Block onset from the first volume.", "Units": "s"},
        "duration": {"Description": "Block duration.", "Units": "s"},
        "trial_type": {"Description": "Block condition; fixation between blocks is the "
                                      "implicit baseline.",
                       "Levels": {"0back": "0-back (match a target letter)",
                                  "2back": "2-back (match the letter two back)"}},
    })
    write_json(prep_dir / "dataset_description.json", {
        "Name": f"{name}: fMRIPrep-style derivatives (simulated)",
        "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fcflow simulate", "Version": __version__,
                         "Description": "Synthetic stand-in for fMRIPrep outputs in "
                                        f"{MNI_SPACE} (not produced by fMRIPrep)."}],
        "SourceDatasets": [{"URL": "bids::"}],
    })
    write_json(gt_dir / "dataset_description.json", {
        "Name": f"{name}: ground truth of the simulation",
        "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fcflow simulate ground truth", "Version": __version__}],
    })
    _write_truth_masks(gt_dir, anatomy, regions, effects, res_label, seed_text)
    effects_table = _effects_table(effects, regions, anatomy)
    write_tsv(gt_dir / "effects.tsv", effects_table)
    write_json(gt_dir / "effects.json", _EFFECTS_JSON)

    # --- runs
    missing = set(choose_missing_sessions(subjects, missing_sessions, seed))
    group_of = dict(subjects)
    missing_table = pd.DataFrame(
        [{"participant_id": f"sub-{sub}", "group": group_of[sub], "session": ses}
         for sub, ses in sorted(missing)], columns=["participant_id", "group", "session"])
    if missing:
        write_tsv(gt_dir / "missing_sessions.tsv", missing_table)
        write_json(gt_dir / "missing_sessions.json", {
            "participant_id": {"Description": "Subject whose session was left out."},
            "group": {"Description": "The subject's group."},
            "session": {"Description": "Session with no runs (both tasks left out)."},
        })
    jobs = [(sub, grp, ses, task) for sub, grp in subjects for ses in SESSIONS for task in TASKS
            if (sub, ses) not in missing]
    rows = []
    brain_mask = anatomy.brain_mask_img()
    for k, (sub, grp, ses, task) in enumerate(jobs, start=1):
        LOGGER.info("Simulating run %d of %d: sub-%s ses-%s task-%s (%s); %d left",
                    k, len(jobs), sub, ses, task, grp, len(jobs) - k)
        run = simulate_run(anatomy, regions, subject=sub, session=ses, task=task, group=grp,
                           n_volumes=task_volumes[task], t_r=t_r, seed=seed, effects=effects,
                           noise=noise, nback=nback, traits=traits[sub])
        ent = _entities(sub, ses, task)
        raw_func = out / f"sub-{sub}" / f"ses-{ses}" / "func"
        write_json(raw_func / f"{ent}_bold.json", {
            "RepetitionTime": t_r, "TaskName": _TASK_NAMES[task],
            "TaskDescription": _TASK_DESCRIPTIONS[task],
        })
        if run.events is not None:
            write_tsv(raw_func / f"{ent}_events.tsv", run.events)
        func = prep_dir / f"sub-{sub}" / f"ses-{ses}" / "func"
        stem = f"{ent}_space-{MNI_SPACE}_res-{res_label}"
        bold_file = func / f"{stem}_desc-preproc_bold.nii.gz"
        write_bold(bold_file, run.data, anatomy.voxels, anatomy.shape, anatomy.affine, t_r)
        write_json(func / f"{stem}_desc-preproc_bold.json", {
            "RepetitionTime": t_r, "TaskName": _TASK_NAMES[task], "SkullStripped": False,
        })
        save_img(brain_mask, func / f"{stem}_desc-brain_mask.nii.gz")
        confounds, meta = compute_confounds(run.data, anatomy, run.motion, t_r,
                                            run.n_non_steady)
        write_tsv(func / f"{ent}_desc-confounds_timeseries.tsv", confounds)
        write_json(func / f"{ent}_desc-confounds_timeseries.json", meta)
        fd = run.fd[1:]
        rows.append({
            "participant_id": f"sub-{sub}", "group": grp, "session": ses, "task": task,
            f"coupling_{effects.insula.label}": run.couplings[effects.insula.label],
            f"coupling_{effects.dmpfc.label}": run.couplings[effects.dmpfc.label],
            f"ppi_{effects.dmpfc.label}": run.ppi[effects.dmpfc.label],
            "motion_scale": run.motion_scale,
            "mean_fd_mm": float(np.mean(fd)), "max_fd_mm": float(np.max(fd)),
            "n_motion_outliers": int(sum(c.startswith("motion_outlier")
                                         for c in confounds.columns)),
            "bold_file": str(bold_file.relative_to(out)),
        })
        del run
    runs = pd.DataFrame(rows)
    write_tsv(gt_dir / "runs.tsv", runs)
    write_json(gt_dir / COMPLETE_RECORD, {
        "Description": "Written last: the simulation finished. A rerun with the same parameters reuses the "
                       "files listed (sizes checked) instead of writing them again.",
        "parameters": parameters,
        "files": {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
                  if p.is_file() and p.name != COMPLETE_RECORD},
    })
    LOGGER.info("Simulated %d runs in %.0f s into %s", len(jobs), time.monotonic() - started,
                out)
    return SimulationResult(bids_dir=out, fmriprep_dir=prep_dir, ground_truth_dir=gt_dir,
                            participants=participants, runs=runs, effects=effects_table,
                            seed_source=seed_source, missing_sessions=missing_table)


def _write_truth_masks(gt_dir: Path, anatomy: Anatomy, regions: StudyRegions,
                       effects: SimulationEffects, res_label: str, seed_text: str) -> None:
    described = {
        effects.seed.label: ("seed", seed_text),
        effects.insula.label: ("target", "Left insula target (rest coupling effect)."),
        effects.dmpfc.label: ("target", "dmPFC target (n-back PPI effect)."),
        effects.control.label: ("control", "Task-activated control region: no coupling to "
                                           "the seed and no PPI."),
    }
    regions_by_label = {effects.seed.label: effects.seed, effects.insula.label: effects.insula,
                        effects.dmpfc.label: effects.dmpfc,
                        effects.control.label: effects.control}
    for label, mask in regions.as_dict(effects).items():
        stem = f"space-{MNI_SPACE}_res-{res_label}_desc-{label}_mask"
        save_img(anatomy.mask_img(mask), gt_dir / f"{stem}.nii.gz")
        region = regions_by_label[label]
        role, text = described[label]
        is_julich_seed = role == "seed" and regions.seed_is_julich
        write_json(gt_dir / f"{stem}.json", {
            "Description": text, "Role": role,
            "Type": "Julich-Brain" if is_julich_seed else "stand-in sphere"
            if role == "seed" else "sphere in grey matter",
            "StandIn": role == "seed" and not is_julich_seed,
            "CentreMNI": None if is_julich_seed else list(region.centre_mm),
            "RadiusMm": None if is_julich_seed else region.radius_mm,
            "CentroidMNI": list(_centroid_mm(mask, anatomy)),
            "NumberOfVoxels": int(mask.sum()),
        })


def _readme(name: str, preset: str, seed_text: str, n_per_group: int, resolution_mm: float,
            task_volumes: dict[str, int], t_r: float, seed: int) -> str:
    if task_volumes["rest"] == task_volumes["nback"]:
        volumes = f"{task_volumes['rest']} volumes"
    else:
        volumes = f"rest {task_volumes['rest']} / nback {task_volumes['nback']} volumes"
    return f"""# {name}

Synthetic data written by `fcflow simulate` (preset `{preset}`, seed {seed}). No one was scanned.

Design: 3 groups (placebo, ketamine, lamotrigine_ketamine) x {n_per_group} subjects, sessions
baseline / infusion / 24h, tasks rest and nback, {volumes} at TR {t_r:g} s.

Only the metadata of the raw data are here (sidecars, events); the images are the
fMRIPrep-style derivatives in `derivatives/fmriprep/` ({MNI_SPACE}, {resolution_mm:g} mm).
What was planted is in `derivatives/ground_truth/` (effects.tsv, runs.tsv, masks,
simulation.json).

Seed: {seed_text}.
"""
