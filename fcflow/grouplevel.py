"""Group level: from first-level seed-to-voxel maps to group x session inference and reports.

:func:`plan_group_level` checks the inputs and lists the units of work, one per task x measure x
seed x session analysis; :func:`run_session_analysis` runs one unit; :func:`finish_group_level`
writes ``results.tsv``. ``fcflow BIDS_DIR OUTPUT_DIR group --recipe RECIPE`` runs them as a nipype
workflow (:mod:`fcflow.workflows.group`: one node, or SLURM job, per unit); :func:`run_group_level`
runs the same functions one after the other in this process. For every task x measure x seed:

1. finds the first-level maps and the runs' QC tables in OUTPUT_DIR
   (:func:`collect_first_level`). The map that enters is the Fisher z map (``stat-z``) for
   ``correlation`` (rest) and ``background`` (task), and the gPPI ``beta`` of each of the task's
   condition contrasts (``desc-gppi2backMinus0back``; of each condition when the task has no
   condition contrast). Excluded runs have no map and are skipped;
2. reads every map once (:func:`load_session_maps`) into one float32 array of shape
   (n_sessions, n_subjects, n_voxels) over the analysis mask: the voxels where every map read is
   non-zero and finite (the intersection of the runs' brain masks, since first-level maps are 0
   outside them). A session with several usable runs contributes their mean;
3. for each session contrast (``infusion - baseline``) builds each subject's within-subject change
   map, the weighted sum of its session maps (:func:`compute_change_maps`); a subject without a
   usable run in a session the contrast needs drops out of that contrast (logged, counted in the
   sidecars and in ``n_per_group``). The same group tests run on the reference-session maps
   themselves (baseline equivalence, ``ses-<reference>``). With three or more sessions
   (``inference.repeated_measures``), two more analyses use every session: the repeated-measures
   model of :mod:`fcflow.repeated` (``ses-groupBySession``: the group x session interaction and
   the session main effect, F tests on within-subject differences, subjects as exchangeability
   blocks) and each subject's mean over the sessions (``ses-sessionMean``: the group main
   effect, F over the groups);
4. fits the cell-means design (:func:`fcflow.stats.make_group_design`: one column per group and
   the recipe's covariates from ``participants.tsv``, demeaned; ``mean_fd`` is the session
   contrast applied to the QC ``mean_fd_mm``, :func:`contrast_mean_fd`: the change in motion for
   a change map, the motion of the session for one session) and tests every group contrast
   (t, two-sided unless ``inference.two_sided = false``) and F test (:func:`run_inference`);
5. writes statistic maps, -log10 corrected p maps per inference, the primary inference's
   thresholded map and cluster table, per-cluster subject means and plots, and finally
   ``group/results.tsv`` (:func:`write_results`).

Outputs, in ``OUTPUT_DIR/group/task-<t>/desc-<measure>/`` (:func:`measure_dir`; BIDS-derivative
names, ``stat`` before ``desc`` as the statistical-model derivatives proposal writes them; entities
BIDS does not define, ``seed``, ``contrast``, ``stat``, ``inference``, ``alpha``, ``cluster``, are
declared in fcflow's pybids configuration, :data:`fcflow.derivatives.PYBIDS_CONFIG`; every image
and table has a JSON sidecar with the design matrix, contrast weights, subjects and their group,
dropped subjects and why, inference settings, permutations, seed and software)::

    ses-<sessioncontrast>_task-<t>_space-<s>_res-<r>_seed-<seed>_contrast-<c>_
        stat-{t,F}_desc-<measure>_statmap.nii.gz                          statistic
        stat-z_desc-<measure>_statmap.nii.gz                              z of the same tail probability
        stat-logpFWE_inference-<m>_desc-<measure>_statmap.nii.gz          -log10 corrected p, per inference
        stat-logpFamilyFWE_inference-<m>_desc-<measure>_statmap.nii.gz    the same, over all group tests too
        stat-{t,F}_inference-<primary>_alpha-0p05_desc-<measure>_statmap.nii.gz   statistic where significant
        inference-<primary>_alpha-0p05_desc-<measure>_clusters.tsv        cluster table (Julich-Brain areas)
        inference-<primary>_alpha-0p05_cluster-<k>_desc-<measure>_clustermeans.{tsv,png}
                                                           subject means in the cluster per session
        desc-<measure>_regions.tsv                         region level (below)

and, in ``OUTPUT_DIR/group/``::

    results.tsv             one row per task x measure x seed x session analysis x test
                            (``skip_reason`` says why a test could not run; file columns are
                            relative to OUTPUT_DIR)
    baseline_results.tsv    the same tests on the reference session (baseline equivalence)

Region level (recipe ``[regions]``, :mod:`fcflow.regions`): every test is also run on each
subject's mean map value over each Julich-Brain area (or each label of a user's label image)
that the recipe declares (``areas``), with the same design and statistic, FWE over those
regions by max-T permutation and FDR q; one ``_regions.tsv`` per test (``region_table``,
``n_significant_regions`` in ``results.tsv``). It is a second, declared family beside the
voxel-wise one. Without the Julich-Brain atlas (``atlas_dir`` None) and no label image in the
recipe it is skipped with a warning.

Inference methods: ``tfce``, ``maxt``, ``cluster_mass`` and ``cluster_size`` by permutation
(:func:`fcflow.permutation.permutation_test`, one call per test for all of them); ``fdr``
(Benjamini-Hochberg q of the parametric p) and ``bonferroni`` as nilearn's
``threshold_stats_img`` computes them on the z map within the mask (two-sided p = 2 sf(|z|));
``cluster_extent`` keeps voxels with parametric p < ``cluster_forming_p`` in clusters of at least
``min_cluster_voxels`` voxels, as ``threshold_stats_img(height_control="fpr",
cluster_threshold=...)`` does. That last one is an extent rule of thumb, not a family-wise error
control: use a permutation method as ``primary``.

Unequal group variances (``inference.variance_groups = "auto"``, the default): the study groups
are variance groups, subjects are sign-flipped instead of permuted, and the statistic is the
weighted least-squares t (or F) with one variance ratio per group for the whole map
(``group_variances = "brain"``) or Winkler's v (or G) with each group's variance at every voxel
(``"voxel"``); see :mod:`fcflow.permutation`. F tests run their permutation inferences on z.
Every test's sidecars name the statistic (``StatisticComputed``) and, when the design has
covariates, the design diagnostics (``DesignDiagnostics``: each covariate's variance inflation
factor and correlation with each group, the inflation of the contrast's variance; a warning
above ``inference.max_vif``). With ``inference.family_wise = "contrasts"`` (default) the
permutation p maps are also corrected over all group tests of a map and session contrast
(:func:`fcflow.permutation.combine_family_wise`), written beside the per-test maps and indexed in
``results.tsv`` (``logp_family_map``, ``min_p_family``).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import special

from fcflow.bids import parse_entities
from fcflow.clusters import label_clusters, make_cluster_table
from fcflow.config import PERMUTATION_INFERENCES, Recipe
from fcflow.errors import InputDataError
from fcflow.io import save_img, write_json, write_tsv

LOGGER = logging.getLogger("fcflow.group")

GROUP_DIR = "group"
_MAP_RE = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)_(?P<rest>.+)_statmap\.nii\.gz$")
# -log10 p of each inference's map; stat label in the file name
_LOGP_STAT = {"tfce": "logpFWE", "maxt": "logpFWE", "cluster_mass": "logpFWE", "cluster_size": "logpFWE",
              "bonferroni": "logpFWE", "fdr": "logpFDR", "cluster_extent": "logp"}
_MAX_CLUSTER_PLOTS = 20


# ----------------------------------------------------------------------------------------------
# What enters the group level
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeasureMap:
    """The first-level map of one task x measure x seed that the group level analyses.

    ``desc`` and ``stat`` are the entities of the first-level file name.
    """

    task: str
    measure: str
    seed: str
    desc: str
    stat: str

    @property
    def label(self) -> str:
        return f"task-{self.task} seed-{self.seed} desc-{self.desc} (stat-{self.stat})"


def select_measure_maps(recipe: Recipe) -> list[MeasureMap]:
    """The maps the group level analyses, in recipe order.

    Correlation (rest) and background (task) enter as Fisher z (``stat-z``); gPPI as the
    ``beta`` of each condition contrast of the task (``desc-gppi<contrast name>``), or of each
    condition when the task declares no condition contrast.
    """
    out = []
    for task in recipe.tasks:
        for measure in task.measures:
            for seed in recipe.seeds:
                if measure == "gppi":
                    labels = [c.name for c in task.condition_contrasts] or list(task.conditions)
                    out += [MeasureMap(task.name, measure, seed.name, f"gppi{lab}", "beta") for lab in labels]
                else:
                    out.append(MeasureMap(task.name, measure, seed.name, measure, "z"))
    return out


def read_run_qc(output_dir: str | Path) -> pd.DataFrame:
    """The participant level's QC rows the group level needs (:func:`fcflow.derivatives.read_runs_qc`).

    Returns
    -------
    DataFrame
        Columns ``participant`` (label without ``sub-``), ``session``, ``task``, ``run`` (str,
        "" when absent), ``excluded`` (bool), ``exclusion_reason``, ``mean_fd_mm``.
    """
    from fcflow.derivatives import read_runs_qc

    columns = ["participant", "session", "task", "run", "excluded", "exclusion_reason", "mean_fd_mm"]
    return read_runs_qc(output_dir)[columns]


def collect_first_level(output_dir: str | Path, measure: MeasureMap, *, space: str) -> pd.DataFrame:
    """The runs of one task x measure x seed: their map (if any), exclusion and mean FD.

    Parameters
    ----------
    output_dir : path
        The participant level's OUTPUT_DIR.
    measure : MeasureMap
    space : str
        Template space of the maps (``space-`` entity), e.g. ``MNI152NLin2009cAsym``.

    Returns
    -------
    runs : DataFrame
        One row per run of the task listed in the QC tables or found as a map, sorted by
        participant, session and run, with columns participant, session, run, file (relative to
        ``output_dir``, "" without a map), excluded, exclusion_reason, mean_fd_mm.
    """
    output_dir = Path(output_dir)
    found = []
    pattern = (f"sub-*/ses-*/func/sub-*_task-{measure.task}_*seed-{measure.seed}_stat-{measure.stat}_"
               f"desc-{measure.desc}_statmap.nii.gz")
    for path in sorted(output_dir.glob(pattern)):
        match = _MAP_RE.match(path.name)
        if match is None:
            continue
        ents = parse_entities(path.name)[0]
        if ents.get("space") != space or ents.get("task") != measure.task or ents.get("desc") != measure.desc:
            continue
        found.append({"participant": ents["sub"], "session": ents.get("ses", ""), "run": ents.get("run", ""),
                      "file": str(path.relative_to(output_dir))})
    maps = pd.DataFrame(found, columns=["participant", "session", "run", "file"])
    qc = read_run_qc(output_dir)
    qc = qc[qc["task"] == measure.task].drop(columns="task")
    runs = qc.merge(maps, on=["participant", "session", "run"], how="outer")
    runs["file"] = runs["file"].fillna("")
    runs["excluded"] = runs["excluded"].fillna(False).astype(bool)
    runs["exclusion_reason"] = runs["exclusion_reason"].fillna("")
    no_qc = runs["mean_fd_mm"].isna() & (runs["file"] != "")
    if no_qc.any():
        LOGGER.warning("%d map(s) of %s have no row in a participant QC table (e.g. %s): their mean FD "
                       "is unknown.", int(no_qc.sum()), measure.label, runs.loc[no_qc, "file"].iloc[0])
    lost = ~runs["excluded"] & (runs["file"] == "")
    if lost.any():
        first = runs[lost].iloc[0]
        LOGGER.warning("%d run(s) of %s are included in the QC tables but have no map (e.g. sub-%s "
                       "ses-%s): rerun the participant level for them.", int(lost.sum()), measure.label,
                       first["participant"], first["session"])
    return runs.sort_values(["participant", "session", "run"]).reset_index(drop=True)[
        ["participant", "session", "run", "file", "excluded", "exclusion_reason", "mean_fd_mm"]]


# ----------------------------------------------------------------------------------------------
# Loading maps once
# ----------------------------------------------------------------------------------------------
@dataclass
class SessionMaps:
    """Every subject's map at every session of one task x measure x seed, on the analysis mask.

    Attributes
    ----------
    subjects : list of str
        Participant labels (without ``sub-``), sorted.
    sessions : tuple of str
    data : ndarray of shape (n_sessions, n_subjects, n_voxels), float32
        0 where ``present`` is False.
    present : ndarray of shape (n_sessions, n_subjects), bool
        The subject has at least one usable run in the session.
    mean_fd_mm : ndarray of shape (n_sessions, n_subjects)
        Mean of the runs' QC mean FD (NaN where absent or unknown).
    n_runs : ndarray of shape (n_sessions, n_subjects), int
    missing_reason : dict of (subject, session) to str
        Why a session is absent (no run, excluded run and its reason).
    files : dict of (subject, session) to list of str
        Maps read (relative to OUTPUT_DIR).
    mask : ndarray of bool, 3D
    affine : ndarray of shape (4, 4)
    """

    subjects: list[str]
    sessions: tuple[str, ...]
    data: NDArray[np.float32]
    present: NDArray[np.bool_]
    mean_fd_mm: NDArray[np.float64]
    n_runs: NDArray[np.int64]
    missing_reason: dict[tuple[str, str], str]
    files: dict[tuple[str, str], list[str]]
    mask: NDArray[np.bool_]
    affine: NDArray[np.float64]


def load_session_maps(output_dir: str | Path, runs: pd.DataFrame, sessions: Sequence[str]) -> SessionMaps:
    """Read every usable run's map once into (n_sessions, n_subjects, n_voxels) float32.

    Storage is limited to the voxels where the first map read is non-zero (its brain mask);
    the analysis mask, the voxels non-zero and finite in every map read, is a subset of it.

    Raises
    ------
    InputDataError
        No usable map, or maps on different grids (the file is named).
    """
    output_dir = Path(output_dir)
    sessions = tuple(sessions)
    runs = runs[runs["session"].isin(sessions)]
    usable = runs[~runs["excluded"] & (runs["file"] != "")]
    if usable.empty:
        raise InputDataError(
            f"No usable first-level map in {output_dir}: run the participant level first "
            f"({len(runs)} runs listed, {int(runs['excluded'].sum())} excluded)."
        )
    subjects = sorted(usable["participant"].unique())
    index = {s: i for i, s in enumerate(subjects)}
    n_ses, n_sub = len(sessions), len(subjects)
    present = np.zeros((n_ses, n_sub), dtype=bool)
    mean_fd = np.full((n_ses, n_sub), np.nan)
    n_runs = np.zeros((n_ses, n_sub), dtype=np.int64)
    files: dict[tuple[str, str], list[str]] = {}
    missing: dict[tuple[str, str], str] = {}
    shape = affine = candidate = support = data = None
    for subject in subjects:
        for s, session in enumerate(sessions):
            rows = runs[(runs["participant"] == subject) & (runs["session"] == session)]
            good = rows[~rows["excluded"] & (rows["file"] != "")]
            if good.empty:
                if rows.empty:
                    missing[(subject, session)] = "no run"
                else:
                    reasons = "; ".join(r or "excluded" for r in rows["exclusion_reason"])
                    missing[(subject, session)] = f"run excluded ({reasons})"
                continue
            total = None
            for rel in good["file"]:
                img = nib.load(output_dir / rel)
                if shape is None:
                    shape, affine = img.shape[:3], img.affine
                elif img.shape[:3] != shape or not np.allclose(img.affine, affine, atol=1e-3):
                    raise InputDataError(
                        f"The first-level map {rel} is on grid {img.shape[:3]} but earlier maps are on "
                        f"{shape}: all maps of a group analysis must share one grid (same space and "
                        f"res). Remove or recompute the odd one."
                    )
                values = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
                if candidate is None:
                    candidate = (values != 0) & np.isfinite(values)
                    support = np.ones(int(candidate.sum()), dtype=bool)
                    data = np.zeros((n_ses, n_sub, support.size), dtype=np.float32)
                vector = values[candidate]
                support &= (vector != 0) & np.isfinite(vector)
                total = vector if total is None else total + vector
            data[s, index[subject]] = np.nan_to_num(total / len(good))
            present[s, index[subject]] = True
            n_runs[s, index[subject]] = len(good)
            mean_fd[s, index[subject]] = float(good["mean_fd_mm"].mean())
            files[(subject, session)] = list(good["file"])
    mask = np.zeros(shape, dtype=bool)
    mask[candidate] = support
    data = np.ascontiguousarray(data[:, :, support])
    return SessionMaps(subjects=subjects, sessions=sessions, data=data, present=present, mean_fd_mm=mean_fd,
                       n_runs=n_runs, missing_reason=missing, files=files, mask=mask,
                       affine=np.asarray(affine, dtype=float))


#: Denoising settings that only feed quality control, not the maps
_QC_ONLY_DENOISING = ("compare_strategies",)


def analysis_settings(sidecar: Mapping[str, Any], task: str, seed: str) -> dict[str, Any] | None:
    """What made a first-level map, from its sidecar: the settings two maps of one analysis must share.

    The recipe's space, ``[denoising]`` (censoring, strategy, band filter, dof and exclusion limits,
    smoothing; not the QC-only strategy comparison), the task's band and conditions, the seed's
    definition, and fcflow's major.minor version. None when the sidecar records no recipe (maps
    written by other tools or by hand), which cannot be checked.
    """
    recipe = sidecar.get("Recipe") or {}
    if not recipe:
        return None
    task_entry = next((t for t in recipe.get("tasks", []) if t.get("name") == task), None)
    seed_entry = next((s for s in recipe.get("seeds", []) if s.get("name") == seed), None)
    denoising = {k: v for k, v in (recipe.get("denoising") or {}).items() if k not in _QC_ONLY_DENOISING}
    version = str((sidecar.get("Software") or {}).get("fcflow", ""))
    return {"space": recipe.get("space"), "denoising": denoising,
            "task": {k: v for k, v in (task_entry or {}).items() if k != "measures"},
            "seed": seed_entry, "smoothing_fwhm": sidecar.get("SmoothingFWHM"),
            "fcflow": ".".join(version.split(".")[:2])}


def _setting_differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out += _setting_differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key} {x!r} vs {y!r}")
    return out


def check_map_provenance(
    output_dir: str | Path, files: Sequence[str], *, task: str, seed: str, recipe: Recipe | None = None,
) -> None:
    """Refuse first-level maps of one analysis that were made with different settings.

    Reads every map's JSON sidecar (:func:`analysis_settings`). A study whose subjects were
    rerun with another strategy, band or seed would otherwise mix them in one test, and a
    subject's change map would subtract maps made two ways. Maps whose sidecar records no recipe
    are not compared. When the group level's ``recipe`` differs from the maps', a warning names
    the difference (the maps are what was computed; the recipe's text would describe another
    analysis).

    Raises
    ------
    InputDataError
        Two maps differ; the message names both files and every differing setting.
    """
    import json

    output_dir = Path(output_dir)
    reference: tuple[str, dict[str, Any]] | None = None
    for rel in files:
        sidecar = output_dir / str(rel).replace(".nii.gz", ".json")
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        settings = analysis_settings(meta, task, seed) if isinstance(meta, dict) else None
        if settings is None:
            continue
        if reference is None:
            reference = (str(rel), settings)
        elif settings != reference[1]:
            differences = _setting_differences(reference[1], settings)
            raise InputDataError(
                f"{rel} and {reference[0]} were made with different analysis settings ("
                f"{'; '.join(differences[:6])}{'; ...' if len(differences) > 6 else ''}): one group analysis must not "
                "mix them. Rerun the participant level for the odd subjects with the study's recipe (a fresh "
                "--work-dir after changing the recipe or fcflow)."
            )
    if reference is not None and recipe is not None:
        current = analysis_settings({"Recipe": recipe.to_dict(), "Software": {"fcflow": reference[1]["fcflow"]},
                                     "SmoothingFWHM": reference[1]["smoothing_fwhm"]}, task, seed)
        current = json.loads(json.dumps(current, default=list))
        differences = _setting_differences(reference[1], current)
        if differences:
            LOGGER.warning("task-%s seed-%s: the first-level maps were made with settings the group level's recipe "
                           "does not have (%s); the group report and methods describe the recipe, the maps what was "
                           "computed.", task, seed, "; ".join(differences[:6]))


def compute_change_maps(
    maps: SessionMaps, weights: Mapping[str, float]
) -> tuple[NDArray[np.float32], list[str], dict[str, str]]:
    """Within-subject weighted sums of session maps, e.g. ``infusion - baseline``.

    Parameters
    ----------
    maps : SessionMaps
    weights : mapping of session to float
        Sessions with weight 0 are not needed.

    Returns
    -------
    data : ndarray of shape (n_kept, n_voxels), float32
    subjects : list of str
        The subjects kept (with every needed session), in ``maps.subjects`` order.
    dropped : dict of str to str
        Subjects dropped and why.
    """
    needed = [(maps.sessions.index(s), float(w)) for s, w in weights.items() if w != 0]
    keep = np.all([maps.present[s] for s, _ in needed], axis=0)
    data = np.zeros((int(keep.sum()), maps.data.shape[2]), dtype=np.float32)
    for s, w in needed:
        data += np.float32(w) * maps.data[s, keep]
    dropped = {}
    for i, subject in enumerate(maps.subjects):
        if not keep[i]:
            reasons = [f"{maps.sessions[s]}: {maps.missing_reason.get((subject, maps.sessions[s]), 'absent')}"
                       for s, _ in needed if not maps.present[s, i]]
            dropped[subject] = "; ".join(reasons)
    return data, [s for s, k in zip(maps.subjects, keep) if k], dropped


# ----------------------------------------------------------------------------------------------
# Design
# ----------------------------------------------------------------------------------------------
def contrast_mean_fd(
    maps: SessionMaps, weights: Sequence[tuple[str, float]], subjects: Sequence[str]
) -> dict[str, float]:
    """Each subject's ``mean_fd`` covariate: the session contrast applied to its mean FD.

    A change map ``infusion - baseline`` is covaried with the change in motion,
    ``FD(infusion) - FD(baseline)``, not with the average motion of the two sessions: it is the
    change in motion that can fake a change in connectivity (measured on the sample study: the
    subjects' change in left-insula gPPI correlated with their change in mean FD, r = 0.46, and
    only r = 0.36 with the infusion's FD). For a single session (baseline equivalence) it is that
    session's mean FD. nan when a session the contrast needs has no QC value.

    Parameters
    ----------
    maps : SessionMaps
        From :func:`load_session_maps` (``mean_fd_mm`` per session x subject).
    weights : sequence of (session, weight)
        The session contrast, e.g. ``[("baseline", -1.0), ("infusion", 1.0)]``.
    subjects : sequence of str
        Labels without ``sub-``.

    Returns
    -------
    dict of str to float
    """
    rows = [(maps.sessions.index(session), float(w)) for session, w in weights if w]
    out = {}
    for subject in subjects:
        column = maps.subjects.index(subject)
        out[subject] = float(sum(w * maps.mean_fd_mm[row, column] for row, w in rows))
    return out


def build_covariates(
    participants: pd.DataFrame, subjects: Sequence[str], names: Sequence[str],
    mean_fd_mm: Mapping[str, float] | Sequence[float] | None = None,
) -> pd.DataFrame | None:
    """Covariate table of the subjects (rows in ``subjects`` order, index ``sub-<label>``).

    Columns of ``participants.tsv`` that parse as numbers are numeric, others categorical
    (dummy coded by :func:`fcflow.stats.make_group_design`); ``mean_fd`` comes from ``mean_fd_mm``,
    a value per subject label, or per row of ``subjects`` (which may then repeat a subject, as the
    rows of a repeated-measures design do).

    Raises
    ------
    InputDataError
        A covariate is neither ``mean_fd`` nor a column of participants.tsv, or lacks a value.
    """
    if not names:
        return None
    table = {}
    for name in names:
        if name == "mean_fd":
            if mean_fd_mm is None or isinstance(mean_fd_mm, Mapping):
                values = pd.Series([(mean_fd_mm or {}).get(s, np.nan) for s in subjects], dtype=float)
            else:
                values = pd.Series(list(mean_fd_mm), dtype=float)
        elif name in participants.columns:
            raw = participants.loc[list(subjects), name].reset_index(drop=True)
            numeric = pd.to_numeric(raw, errors="coerce")
            values = numeric if numeric.notna().sum() == raw.notna().sum() else raw
        else:
            raise InputDataError(
                f"Covariate {name!r} of the recipe's [inference] covariates must be 'mean_fd' or a column "
                f"of participants.tsv. Got columns {list(participants.columns)}."
            )
        if values.isna().any():
            absent = [f"sub-{s}" for s, bad in zip(subjects, values.isna()) if bad]
            raise InputDataError(
                f"Covariate {name!r} must have a value for every subject analysed. Got none for {absent[:10]} "
                f"({'no QC mean FD' if name == 'mean_fd' else 'n/a in participants.tsv'}): fill it in or "
                "drop the covariate from the recipe."
            )
        table[name] = values.to_numpy()
    return pd.DataFrame(table, index=pd.Index([f"sub-{s}" for s in subjects], name="participant_id"))


@dataclass(frozen=True)
class GroupTest:
    """One group contrast (t) or F test, as weights over design columns."""

    name: str
    expression: str
    kind: str  # "t" or "F"
    matrix: NDArray[np.float64]  # (1, p) for t, (q, p) for F


def build_tests(recipe: Recipe, columns: Sequence[str]) -> list[GroupTest]:
    """The recipe's group contrasts and F tests over the design ``columns``."""
    from fcflow.stats import f_contrast_over_groups

    tests = [GroupTest(c.name, c.expression, "t", np.asarray([c.vector(list(columns))], dtype=float))
             for c in recipe.group_contrasts]
    tests += [GroupTest(f.name, "F: " + ", ".join(f.groups), "F", f_contrast_over_groups(f.groups, columns))
              for f in recipe.f_tests]
    return tests


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------
@dataclass
class InferenceResult:
    """Statistic, z and -log10 p maps (in-mask vectors) of one test.

    ``stat_type`` is the test's kind (t or F); ``statistic`` the statistic computed: t, F, or
    with variance groups Winkler's v (Welch-type t) or G, whose approximate dof differs
    between voxels (``dof_map``; ``dof`` stays the model's residual dof).
    """

    stat: NDArray[np.float64]
    stat_type: str
    dof: int
    z: NDArray[np.float64]
    logp: dict[str, NDArray[np.float64]]
    settings: dict[str, Any] = field(default_factory=dict)
    statistic: str = ""
    dof_map: NDArray[np.float64] | None = None
    permutation: Any = field(default=None, repr=False)  # the PermutationResult, for family-wise correction


def parametric_logp(z: NDArray[np.float64], two_sided: bool) -> NDArray[np.float64]:
    """-log10 of the uncorrected p of z (two-sided: 2 sf(|z|)), accurate far in the tail."""
    log_sf = special.log_ndtr(-np.abs(z) if two_sided else -z)
    if two_sided:
        log_sf = log_sf + math.log(2.0)
    return np.clip(-log_sf / math.log(10.0), 0.0, None)


def fdr_logq(logp: NDArray[np.float64]) -> NDArray[np.float64]:
    """-log10 Benjamini-Hochberg q values from -log10 p values (q <= alpha iff BH rejects)."""
    n = logp.size
    order = np.argsort(-logp, kind="stable")  # smallest p first
    ranks = np.arange(1, n + 1)
    logq_sorted = logp[order] - np.log10(n / ranks)
    # q_i = min over j >= i of p_j n / j: a running maximum of -log10 from the largest p down
    logq_sorted = np.maximum.accumulate(logq_sorted[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.clip(logq_sorted, 0.0, None)
    return out


def run_inference(
    data: NDArray[np.floating], design: pd.DataFrame, test: GroupTest, mask: NDArray[np.bool_], *,
    methods: Sequence[str], n_permutations: int, two_sided: bool, random_seed: int,
    cluster_forming_p: float, min_cluster_voxels: int = 1, variance_groups: Sequence[str] | None = None,
    fdr_p: str = "parametric", zstat: bool = False, group_variances: str = "brain",
    permutations: NDArray | None = None, scheme: str = "auto",
) -> InferenceResult:
    """Fit and test one contrast with every requested inference.

    Returns -log10 p maps: family-wise corrected for the permutation methods and
    ``bonferroni``, FDR q for ``fdr``, and for ``cluster_extent`` the uncorrected p inside the
    clusters that pass the extent (0 elsewhere).

    With ``variance_groups`` (a label per subject, two or more distinct) the subjects are
    sign-flipped and, for ``group_variances="brain"``, the statistic is the weighted
    least-squares t or F with one variance ratio per group for the whole map, or for
    ``"voxel"`` Winkler's v or G, whose parametric p (``fdr``, ``bonferroni``,
    ``cluster_extent``) uses its per-voxel dof (:func:`fcflow.permutation.permutation_test`).
    F and G tests run every permutation inference on z (TFCE's E = 0.5, H = 2 are tuned for
    t and z maps, not for F). ``fdr_p="permutation"`` corrects the voxel-wise permutation p
    (needs a permutation method) instead of the parametric one. ``zstat=True`` runs t tests on z
    too (tests corrected as a family must share one scale, :func:`fcflow.permutation.combine_family_wise`).
    ``permutations`` (rows without the identity) and ``scheme`` are passed to the engine, e.g.
    whole-subject shuffles of a repeated-measures model (:mod:`fcflow.repeated`); their number
    then replaces ``n_permutations``.
    """
    from fcflow.permutation import permutation_test
    from fcflow.stats import compute_f, compute_t, f_to_z, fit_ols, t_to_z

    two_sided = bool(two_sided) and test.kind == "t"
    contrast = test.matrix[0] if test.kind == "t" else test.matrix
    logp: dict[str, NDArray[np.float64]] = {}
    settings: dict[str, Any] = {}
    perm_methods = [m for m in methods if m in PERMUTATION_INFERENCES]
    if fdr_p not in ("parametric", "permutation"):
        raise InputDataError(f"'fdr_p' must be 'parametric' or 'permutation'. Got {fdr_p!r}.")
    if "fdr" in methods and fdr_p == "permutation" and not perm_methods:
        raise InputDataError(
            f"'fdr_p' = 'permutation' needs a permutation method in 'methods'. Got methods {list(methods)!r}: "
            "add 'maxt' (or another permutation method) or set fdr_p = 'parametric'."
        )
    welch = variance_groups is not None and len(set(variance_groups)) > 1
    dof_map = None
    p_permutation = None
    statistic = test.kind
    if perm_methods or welch:
        result = permutation_test(
            data, design, contrast, n_permutations=n_permutations if perm_methods else 1,
            two_sided=two_sided, random_seed=random_seed, inference=perm_methods or ("maxt",),
            mask=mask, cluster_forming_p=cluster_forming_p,
            variance_groups=list(variance_groups) if welch else None,
            zstat=True if (welch or test.kind == "F" or zstat) else None, variance_estimate=group_variances,
            permutations=permutations if perm_methods else None, scheme=scheme,
        )  # fmt: skip
        stat, dof, z = result.stat, result.dof, result.z
        dof_map, statistic = result.dof_map, result.settings.get("statistic", result.stat_type)
        for method in perm_methods:
            logp[method] = result.logp_fwe[method]
        if perm_methods:
            p_permutation = result.p_uncorrected
            settings = {"n_permutations": int(result.n_permutations), "scheme": result.scheme,
                        "cluster_forming_threshold": result.cluster_forming_threshold,
                        "inference_on": "z" if result.zstat else statistic, **result.settings}
        else:
            settings = {"statistic": statistic, "variance_groups": list(result.variance_groups)}
    else:
        fit = fit_ols(data, design)
        stat = compute_t(fit, contrast) if test.kind == "t" else compute_f(fit, contrast)
        dof = fit.dof
        q = test.matrix.shape[0]
        z = t_to_z(stat, dof) if test.kind == "t" else f_to_z(stat, q, dof)
        settings = {"statistic": statistic, "variance_groups": []}
    if dof_map is not None and dof_map.size:
        settings["welch_dof"] = {"min": float(np.min(dof_map)), "median": float(np.median(dof_map)),
                                 "max": float(np.max(dof_map))}
    if any(m in methods for m in ("fdr", "bonferroni", "cluster_extent")):
        logp_unc = parametric_logp(z, two_sided)
        if "fdr" in methods:
            if fdr_p == "permutation":
                logp["fdr"] = fdr_logq(-np.log10(p_permutation))
            else:
                logp["fdr"] = fdr_logq(logp_unc)
            settings["fdr_p"] = fdr_p
        if "bonferroni" in methods:
            logp["bonferroni"] = np.clip(logp_unc - math.log10(logp_unc.size), 0.0, None)
        if "cluster_extent" in methods:
            keep = logp_unc > -math.log10(cluster_forming_p)
            volume = np.zeros(mask.shape, dtype=np.float64)
            volume[mask] = np.where(keep, np.sign(z) if two_sided else 1.0, 0.0)
            labels, n = label_clusters(volume, 0.0, two_sided=two_sided)
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            big = (sizes >= min_cluster_voxels)[labels]
            big[labels == 0] = False
            logp["cluster_extent"] = np.where(big[mask], logp_unc, 0.0)
            settings["cluster_extent_min_voxels"] = int(min_cluster_voxels)
    return InferenceResult(stat=np.asarray(stat, dtype=float), stat_type=test.kind, dof=int(dof), z=z,
                           logp=logp, settings=settings, statistic=statistic, dof_map=dof_map,
                           permutation=result if perm_methods else None)


# ----------------------------------------------------------------------------------------------
# Atlas lookup
# ----------------------------------------------------------------------------------------------
def julich_area_lookup(atlas_dir: str | Path) -> Callable[[NDArray[np.float64]], str]:
    """``lookup(xyz_mm) -> area`` from the Julich-Brain v3.1 maximum probability maps.

    The left and right MPMs and their XML label tables are read once; a coordinate gets the
    area of the nearest MPM voxel, prefixed by its hemisphere ("left Area Id8 (Insula)"), or
    "unlabelled" outside both maps.
    """
    from fcflow.atlas import find_atlas_file, load_atlas_release, read_label_table

    release = load_atlas_release()
    layers = []
    for hemi in ("left", "right"):
        mpm = find_atlas_file(atlas_dir, release.mpm_file(hemi))
        xml = find_atlas_file(atlas_dir, release.labels_file(hemi))
        if mpm is None or xml is None:
            from fcflow.errors import AtlasError

            raise AtlasError(f"The Julich-Brain folder {atlas_dir} lacks the {hemi} MPM or its label table.")
        img = nib.load(mpm)
        names = {value: name for name, value in read_label_table(xml).items()}
        layers.append((hemi, np.asarray(img.dataobj), np.linalg.inv(img.affine), names))

    def lookup(xyz_mm: NDArray[np.float64]) -> str:
        point = np.append(np.asarray(xyz_mm, dtype=float)[:3], 1.0)
        for hemi, labels, inverse, names in layers:
            ijk = np.rint(inverse @ point)[:3].astype(int)
            if np.all(ijk >= 0) and np.all(ijk < labels.shape):
                value = int(labels[tuple(ijk)])
                if value:
                    return f"{hemi} {names.get(value, f'label {value}')}"
        return "unlabelled"

    return lookup


# ----------------------------------------------------------------------------------------------
# The whole group level
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionAnalysis:
    """What a group test is run on: one map per subject, or every session of every subject.

    ``kind`` is ``"contrast"`` (a within-subject session contrast, e.g. ``infusion - baseline``,
    tested with the recipe's group contrasts and F tests), ``"reference"`` (the reference session
    itself: baseline equivalence), ``"mean"`` (each subject's mean over all sessions: the group
    main effect, F over the groups) or ``"repeated"`` (the group x session interaction and the
    session main effect over all sessions, :mod:`fcflow.repeated`).
    """

    label: str  # ses- entity: infusionMinusBaseline, baseline, sessionMean, groupBySession
    expression: str
    weights: tuple[tuple[str, float], ...]
    is_reference: bool = False
    kind: str = "contrast"


def session_analyses(recipe: Recipe) -> list[SessionAnalysis]:
    """The recipe's session contrasts, the repeated-measures analyses, then the reference session.

    The repeated-measures analyses (``inference.repeated_measures``) need three or more sessions
    (with two, the interaction is the one session contrast's F over the groups) and two or more
    groups.
    """
    out = [SessionAnalysis(c.name, c.expression, c.weights) for c in recipe.session_contrasts]
    sessions = recipe.sessions
    if recipe.inference.repeated_measures and len(sessions) >= 3 and len(recipe.groups) >= 2:
        every = tuple((s, 1.0) for s in sessions)
        out.append(SessionAnalysis("groupBySession", f"group x session ({', '.join(sessions)})", every,
                                   kind="repeated"))
        out.append(SessionAnalysis("sessionMean", f"mean of {', '.join(sessions)}",
                                   tuple((s, 1.0 / len(sessions)) for s in sessions), kind="mean"))
    ref = recipe.reference_session
    out.append(SessionAnalysis(ref, ref, ((ref, 1.0),), is_reference=True, kind="reference"))
    return out


def analysis_tests(recipe: Recipe, analysis: SessionAnalysis, columns: Sequence[str]) -> list[GroupTest]:
    """The group tests of one session analysis over its design ``columns``."""
    from fcflow.repeated import repeated_measures_contrasts
    from fcflow.stats import f_contrast_over_groups

    if analysis.kind == "repeated":
        sessions = [s for s, _ in analysis.weights]
        matrices = repeated_measures_contrasts(recipe.groups, sessions, recipe.reference_session, columns)
        return [GroupTest("groupBySession", "group x session interaction", "F", matrices["groupBySession"]),
                GroupTest("session", "session main effect (mean over groups)", "F", matrices["session"])]
    if analysis.kind == "mean":
        return [GroupTest("group", "group main effect: " + ", ".join(recipe.groups), "F",
                          f_contrast_over_groups(recipe.groups, columns))]
    return build_tests(recipe, columns)


def _alpha_label(alpha: float) -> str:
    return f"{alpha:g}".replace(".", "p").replace("-", "m")


def _n_per_group_text(counts: Mapping[str, int]) -> str:
    return ";".join(f"{g}={n}" for g, n in counts.items())


RESULT_COLUMNS = [
    "task", "measure", "seed", "desc", "session_contrast", "group_contrast", "stat_type", "n_per_group",
    "dof", "primary_inference", "stat_map", "z_map", "logp_fwe_map", "thresholded_map", "cluster_table",
    "n_significant_clusters", "min_p", "peak_stat", "statistic", "variance_groups", "design_warnings",
    "logp_family_map", "min_p_family", "region_table", "n_significant_regions", "skip_reason",
]


@dataclass
class GroupPlan:
    """What one group-level run does, decided before any map is read (:func:`plan_group_level`).

    Attributes
    ----------
    recipe : Recipe
        The effective recipe (``--n-permutations`` applied): what runs and what is recorded.
    measures : list of MeasureMap
        The task x measure x seed maps that have at least one first-level map, recipe order.
    runs : dict of MeasureMap to DataFrame
        Each measure's runs (:func:`collect_first_level`).
    analyses : list of SessionAnalysis
        The session analyses every measure gets (:func:`session_analyses`).
    use_regions : bool
        The region level runs (enabled in the recipe and its atlas available).
    """

    recipe: Recipe
    measures: list[MeasureMap]
    runs: dict[MeasureMap, pd.DataFrame]
    analyses: list[SessionAnalysis]
    use_regions: bool

    @property
    def units(self) -> list[tuple[MeasureMap, SessionAnalysis]]:
        """The units of work, one per measure x session analysis, in ``results.tsv`` order."""
        return [(m, a) for m in self.measures for a in self.analyses]


@dataclass
class AnalysisOutputs:
    """What one measure x session analysis (:func:`run_session_analysis`) hands to :func:`finish_group_level`.

    ``rows`` are its ``results.tsv`` rows (the reference session's go to ``baseline_results.tsv``),
    ``files`` the SHA-256 of every file it wrote, by path relative to OUTPUT_DIR.
    """

    rows: list[dict[str, Any]]
    files: dict[str, str]


def unit_name(measure: MeasureMap, analysis: SessionAnalysis) -> str:
    """A name for one measure x session analysis, made of its entities (node names, logs)."""
    return f"ses-{analysis.label}_task-{measure.task}_seed-{measure.seed}_desc-{measure.desc}"


def regions_available(recipe: Recipe, atlas_dir: str | Path | None) -> bool:
    """Whether the region level can run: enabled, and its atlas (Julich-Brain or the recipe's labels) at hand."""
    return recipe.regions.enabled and not (recipe.regions.atlas == "julich-brain-3.1" and atlas_dir is None)


def plan_group_level(
    output_dir: str | Path,
    recipe: Recipe,
    *,
    bids_dir: str | Path,
    atlas_dir: str | Path | None = None,
    n_permutations: int | None = None,
) -> GroupPlan:
    """Check the group level's inputs and decide its units of work; writes only ``group``'s description.

    Every check that reads no map runs here, before any inference, so a bad input stops the run
    at once with one message: the participant level's outputs exist, ``participants.tsv`` has a
    group for every subject with maps, the permutations fit in memory, and every map of a
    task x measure x seed was made with the same analysis settings (:func:`check_map_provenance`).

    Parameters
    ----------
    output_dir : path
        The participant level's OUTPUT_DIR.
    recipe : Recipe
    bids_dir : path
        Raw BIDS dataset (its ``participants.tsv``).
    atlas_dir : path or None, default=None
        Julich-Brain v3.1 folder; None skips the Julich-Brain region level with a warning.
    n_permutations : int or None, default=None
        Overrides the recipe's ``inference.n_permutations``.

    Returns
    -------
    GroupPlan
    """
    from fcflow.bids import read_participants

    output_dir = Path(output_dir)
    # the effective recipe: what runs is what desc-recipe_config.json, the sidecars and the
    # methods text record (issue 17: --n-permutations was applied but the recipe's value recorded)
    recipe = recipe.with_overrides(n_permutations=None if n_permutations is None else int(n_permutations))
    inference = recipe.inference
    if not any(output_dir.glob("sub-*/sub-*_desc-runs_qc.tsv")):
        raise InputDataError(
            f"{output_dir}: expected the participant level's outputs (sub-<label>/sub-<label>_desc-runs_qc.tsv "
            "and the maps). Got none: run 'fcflow BIDS_DIR OUTPUT_DIR participant' first, with this OUTPUT_DIR."
        )
    participants = read_participants(Path(bids_dir), recipe.group_column, recipe.groups)
    _check_permutation_memory(recipe, n_rows=len(participants) * max(1, len(recipe.sessions) - 1))
    use_regions = regions_available(recipe, atlas_dir)
    if recipe.regions.enabled and not use_regions:
        LOGGER.warning("Region level skipped: its atlas, Julich-Brain v3.1, is not available (no --julich-dir). "
                       "Give --julich-dir, or a label image as [regions] 'atlas' in the recipe, or set [regions] "
                       "enabled = false.")
    analyses = session_analyses(recipe)
    n_tests = len(recipe.group_contrasts) + len(recipe.f_tests)
    per_measure = sum({"repeated": 2, "mean": 1}.get(a.kind, n_tests) for a in analyses)
    measures: list[MeasureMap] = []
    runs_of: dict[MeasureMap, pd.DataFrame] = {}
    for measure in select_measure_maps(recipe):
        runs = collect_first_level(output_dir, measure, space=recipe.space)
        usable = runs[runs["session"].isin(recipe.sessions) & ~runs["excluded"] & (runs["file"] != "")]
        if usable.empty:
            LOGGER.warning("No first-level map for %s: skipped (%d tests).", measure.label, per_measure)
            continue
        check_map_provenance(output_dir, list(usable["file"]), task=measure.task, seed=measure.seed, recipe=recipe)
        unknown = sorted(set(usable["participant"]) - set(participants.index))
        if unknown:
            raise InputDataError(
                f"sub-{unknown[0]} has first-level maps but no row in {Path(bids_dir) / 'participants.tsv'}: "
                "add it with its group."
            )
        measures.append(measure)
        runs_of[measure] = runs
    _write_group_description(output_dir / GROUP_DIR, output_dir, recipe)
    LOGGER.info("Group level: %d map types x %d session analyses (%d tests each) = %d tests; %s; primary %s",
                len(measures), len(analyses), per_measure, len(measures) * per_measure,
                f"{inference.n_permutations} permutations" if set(inference.methods) & set(PERMUTATION_INFERENCES)
                else "parametric only", inference.primary)
    return GroupPlan(recipe=recipe, measures=measures, runs=runs_of, analyses=analyses, use_regions=use_regions)


def run_group_level(
    output_dir: str | Path,
    recipe: Recipe,
    *,
    bids_dir: str | Path,
    atlas_dir: str | Path | None = None,
    n_permutations: int | None = None,
    command: Sequence[str] | None = None,
) -> Path:
    """Group-level inference for every task x measure x seed x session contrast of the recipe, in this process.

    The science in one call, one unit after the other and without a cache:
    :func:`plan_group_level`, then for every measure :func:`load_session_maps` and for each of
    its session analyses :func:`run_session_analysis`, then :func:`finish_group_level`.
    ``fcflow BIDS_DIR OUTPUT_DIR group`` runs the same steps as a nipype workflow
    (:func:`fcflow.workflows.group.init_group_wf`), which spreads the units over processes or
    SLURM jobs and resumes from its cache; both write the same bytes.

    Parameters
    ----------
    output_dir : path
        The participant level's OUTPUT_DIR; results go to ``output_dir/group``.
    recipe : Recipe
    bids_dir : path
        Raw BIDS dataset (its ``participants.tsv`` gives groups and covariates).
    atlas_dir : path or None, default=None
        Julich-Brain v3.1 folder for area names in the cluster tables; None gives coordinates
        only.
    n_permutations : int or None, default=None
        Overrides the recipe's ``inference.n_permutations`` (demos, tests).
    command : sequence of str or None, default=None
        Command line for the provenance (default ``sys.argv``).

    Returns
    -------
    results_file : Path
        ``output_dir/group/results.tsv``.
    """
    plan = plan_group_level(output_dir, recipe, bids_dir=bids_dir, atlas_dir=atlas_dir,
                            n_permutations=n_permutations)
    outputs = []
    for measure in plan.measures:
        maps = load_session_maps(output_dir, plan.runs[measure], plan.recipe.sessions)
        for analysis in plan.analyses:
            outputs.append(run_session_analysis(output_dir, plan.recipe, measure, analysis, maps, bids_dir=bids_dir,
                                                atlas_dir=atlas_dir, command=command))
    return finish_group_level(output_dir, outputs)


def _unit_files(group_dir: Path, measure: MeasureMap, analysis: SessionAnalysis) -> dict[Path, tuple[int, int]]:
    """The files of ``group/`` one measure x session analysis writes, with their inode and mtime.

    Every one of its file names starts with its session analysis and task and names its seed,
    and all sit in its measure folder, so units running at once never list each other's files.
    """
    prefix, seed = f"ses-{analysis.label}_task-{measure.task}_", f"_seed-{measure.seed}_"
    folder = measure_dir(group_dir, measure)
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        if path.name.startswith(prefix) and seed in path.name and path.is_file():
            info = path.stat()
            found[path] = (info.st_ino, info.st_mtime_ns)
    return found


@dataclass
class AnalysisSubjects:
    """The rows one session analysis tests (:func:`analysis_subjects`).

    Attributes
    ----------
    data : ndarray of shape (n_rows, n_voxels), float32
        One change map (or reference-session map) per subject; for the repeated-measures
        analysis one within-subject difference per subject and session.
    subjects : list of str
        The subjects tested (labels without ``sub-``).
    dropped : dict of str to str
        Subjects left out and why (a session missing, no group in participants.tsv).
    group_of : Series
        Each subject's study group.
    repeated : fcflow.repeated.RepeatedMeasures or None
        The repeated-measures rows (None for one map per subject).
    """

    data: NDArray[np.float32]
    subjects: list[str]
    dropped: dict[str, str]
    group_of: pd.Series
    repeated: Any = None


def analysis_subjects(recipe: Recipe, analysis: SessionAnalysis, maps: SessionMaps,
                      participants: pd.DataFrame) -> AnalysisSubjects:
    """The subjects and maps one session analysis tests, and who drops out of it and why.

    A session contrast (or the reference session) gives each subject's weighted sum of session
    maps (:func:`compute_change_maps`); the repeated-measures analysis gives every subject's
    difference from the reference session at each other session
    (:func:`fcflow.repeated.build_repeated_measures`). Subjects without a group in
    ``participants.tsv`` are dropped with that reason.
    """
    repeated = None
    if analysis.kind == "repeated":
        from fcflow.repeated import build_repeated_measures

        groups_known = participants[recipe.group_column].dropna()
        repeated = build_repeated_measures(
            maps.data, maps.present, maps.subjects, maps.sessions, recipe.reference_session,
            {s: str(groups_known[s]) for s in maps.subjects if s in groups_known.index},
        )
        data, subjects, dropped = repeated.data, repeated.subjects, dict(repeated.dropped)
        for s, reason in dropped.items():
            if reason == "no study group":
                dropped[s] = f"no '{recipe.group_column}' in participants.tsv"
        group_of = participants.loc[subjects, recipe.group_column]
    else:
        data, subjects, dropped = compute_change_maps(maps, dict(analysis.weights))
        group_of = participants.loc[subjects, recipe.group_column]
        no_group = [s for s, g in zip(subjects, group_of) if pd.isna(g)]
        if no_group:
            for s in no_group:
                dropped[s] = f"no '{recipe.group_column}' in participants.tsv"
            keep = np.array([s not in no_group for s in subjects])
            data, subjects = data[keep], [s for s, k in zip(subjects, keep) if k]
            group_of = participants.loc[subjects, recipe.group_column]
    return AnalysisSubjects(data=data, subjects=subjects, dropped=dropped, group_of=group_of, repeated=repeated)


def analysis_design(recipe: Recipe, analysis: SessionAnalysis, maps: SessionMaps, participants: pd.DataFrame,
                    rows_of: AnalysisSubjects) -> tuple[pd.DataFrame | None, str]:
    """The group design of one session analysis and, when its tests cannot run, why.

    The cell-means design with the recipe's covariates (:func:`fcflow.stats.make_group_design`,
    or :func:`fcflow.repeated.repeated_measures_design` over group x session cells), ``mean_fd``
    being the session contrast's change in motion. Returns ``(design, "")``, or ``(design or
    None, reason)`` when a group has no subject, the covariates cannot be carried, or no residual
    degree of freedom is left.
    """
    from fcflow.stats import make_group_design

    inference = recipe.inference
    data, subjects, group_of, repeated = rows_of.data, rows_of.subjects, rows_of.group_of, rows_of.repeated
    counts = {g: int((group_of == g).sum()) for g in recipe.groups}
    empty = [g for g, n in counts.items() if n == 0]
    skip_reason = f"no subject in {empty}" if empty else ""
    design = None
    if not skip_reason and repeated is not None:
        from fcflow.repeated import repeated_measures_design

        row_subjects = [repeated.subjects[i] for i in repeated.row_subject]
        # each row's mean_fd is its own change in motion, FD(session) - FD(reference)
        ref_row = maps.sessions.index(recipe.reference_session)
        fd_rows = [float(maps.mean_fd_mm[maps.sessions.index(k), maps.subjects.index(s)]
                         - maps.mean_fd_mm[ref_row, maps.subjects.index(s)])
                   for s, k in zip(row_subjects, repeated.row_session)]
        covariates = build_covariates(participants, row_subjects, inference.covariates, fd_rows)
        try:
            design = repeated_measures_design(repeated, recipe.groups, maps.sessions,
                                              recipe.reference_session, covariates)
        except ValueError as exc:
            skip_reason = f"cannot build the repeated-measures design of {len(data)} differences: {exc}"
    elif not skip_reason:
        fd = contrast_mean_fd(maps, analysis.weights, subjects)
        covariates = build_covariates(participants, subjects, inference.covariates, fd)
        try:
            design = make_group_design(list(group_of), recipe.groups, covariates)
        except ValueError as exc:
            # The subjects left (exclusions, missing sessions) cannot carry the covariates,
            # e.g. one constant within groups: this test is skipped with why, the others run.
            skip_reason = f"cannot build the group design of {len(subjects)} subjects: {exc}"
        if design is not None:
            design.index = pd.Index([f"sub-{s}" for s in subjects], name="participant_id")
    if design is not None:
        rank = int(np.linalg.matrix_rank(design.to_numpy()))
        if len(design) - rank < 1:
            skip_reason = (f"{len(design)} rows leave no residual degree of freedom for the "
                           f"{rank} design columns {list(design.columns)}")
    return design, skip_reason


def run_session_analysis(
    output_dir: str | Path,
    recipe: Recipe,
    measure: MeasureMap,
    analysis: SessionAnalysis,
    maps: SessionMaps,
    *,
    bids_dir: str | Path,
    atlas_dir: str | Path | None = None,
    command: Sequence[str] | None = None,
) -> AnalysisOutputs:
    """Every group test of one task x measure x seed on one session analysis: one unit of work.

    Builds the analysis' subject maps (a session contrast's change maps, the reference session,
    or the repeated-measures rows), the design with the recipe's covariates, and runs each group
    contrast and F test (:func:`run_inference`), the family-wise correction over them and the
    region level, writing their files into :func:`measure_dir`. Units share nothing but their
    inputs, so they may run at once in several processes or SLURM jobs.

    Parameters
    ----------
    output_dir : path
        The participant level's OUTPUT_DIR.
    recipe : Recipe
        The effective recipe (:attr:`GroupPlan.recipe`).
    measure : MeasureMap
    analysis : SessionAnalysis
    maps : SessionMaps
        The measure's maps (:func:`load_session_maps`).
    bids_dir : path
        Raw BIDS dataset (its ``participants.tsv``).
    atlas_dir : path or None, default=None
        Julich-Brain v3.1 folder (area names, the region level).
    command : sequence of str or None, default=None
        Command line for the provenance (default ``sys.argv``).

    Returns
    -------
    AnalysisOutputs
    """
    from fcflow.bids import read_participants
    from fcflow.derivatives import software_provenance

    output_dir = Path(output_dir)
    group_dir = output_dir / GROUP_DIR
    inference = recipe.inference
    n_perm = int(inference.n_permutations)
    participants = read_participants(Path(bids_dir), recipe.group_column, recipe.groups)
    lookup = julich_area_lookup(atlas_dir) if atlas_dir is not None else None
    region_atlas = _load_region_atlas(recipe, atlas_dir, maps) if regions_available(recipe, atlas_dir) else None
    provenance = software_provenance(command)
    recipe_sha = recipe.fingerprint()
    before = _unit_files(group_dir, measure, analysis)
    rows: list[dict[str, Any]] = []

    rows_of = analysis_subjects(recipe, analysis, maps, participants)
    data, subjects, dropped, group_of, repeated = (rows_of.data, rows_of.subjects, rows_of.dropped, rows_of.group_of,
                                                   rows_of.repeated)
    counts = {g: int((group_of == g).sum()) for g in recipe.groups}
    where = f"{measure.label} ses {analysis.expression}"
    LOGGER.info("%s: n = %s%s", where, _n_per_group_text(counts),
                f"; dropped {', '.join(f'sub-{s} ({r})' for s, r in dropped.items())}" if dropped else "")
    base_row = {"task": measure.task, "measure": measure.measure, "seed": measure.seed, "desc": measure.desc,
                "session_contrast": analysis.expression, "n_per_group": _n_per_group_text(counts),
                "primary_inference": inference.primary, "is_reference": analysis.is_reference}
    design, skip_reason = analysis_design(recipe, analysis, maps, participants, rows_of)
    all_columns = list(recipe.groups)
    if repeated is not None:
        from fcflow.repeated import repeated_cells

        all_columns = repeated_cells(recipe.groups, maps.sessions, recipe.reference_session)
    try:
        tests = analysis_tests(recipe, analysis, design.columns if design is not None else all_columns)
    except ValueError as exc:
        # a repeated-measures cell without any subject: its contrasts are not estimable
        skip_reason = skip_reason or f"no difference in a group x session cell ({exc})"
        tests = analysis_tests(recipe, analysis, all_columns)
    row_groups = (pd.Series(repeated.row_group) if repeated is not None else group_of)
    variance_labels, variance_note = _variance_group_labels(inference.variance_groups, row_groups, where, design)
    group_cells = (list(recipe.groups) if repeated is None else
                   [c for c in (design.columns if design is not None else []) if ":" in c])
    family = inference.family_wise == "contrasts" and not skip_reason and len(tests) > 1 and bool(
        set(inference.methods) & set(PERMUTATION_INFERENCES))
    computed: dict[str, InferenceResult] = {}
    shuffles: dict[str, NDArray] = {}

    def exchange(test: GroupTest) -> tuple[NDArray | None, str]:
        """Whole-subject shuffles of a repeated-measures test, drawn once per scheme (the voxel
        and region tests, and the tests of one scheme, share them); the engine's own otherwise."""
        if repeated is None:
            return None, "auto"
        from fcflow.repeated import permutation_scheme, whole_block_permutations

        scheme = permutation_scheme(test.name, variance_labels is not None)
        if scheme not in shuffles:
            shuffles[scheme] = whole_block_permutations(
                repeated.row_subject, repeated.row_session, n_perm, scheme=scheme,
                patterns=repeated.patterns(), random_seed=inference.random_seed)
        return shuffles[scheme], scheme

    def infer(test: GroupTest) -> InferenceResult:
        permutations, scheme = exchange(test)
        return run_inference(
            data, design, test, maps.mask, methods=inference.methods, n_permutations=n_perm,
            two_sided=inference.two_sided, random_seed=inference.random_seed,
            cluster_forming_p=inference.cluster_forming_p,
            min_cluster_voxels=inference.min_cluster_voxels, variance_groups=variance_labels,
            fdr_p=inference.fdr_p, zstat=family, group_variances=inference.group_variances,
            permutations=permutations, scheme=scheme,
        )

    family_rows: dict[str, dict[str, Any]] = {}
    for index, test in enumerate(tests, start=1):
        row = {**base_row, "group_contrast": test.expression if test.kind == "t" else test.name,
               "stat_type": test.kind}
        if skip_reason:
            LOGGER.warning("[%d/%d] %s: %s skipped: %s.", index, len(tests), where, test.expression, skip_reason)
            rows.append({**row, "skip_reason": skip_reason})
            continue
        LOGGER.info("[%d/%d] %s: %s (%s)", index, len(tests), where, test.expression,
                    f"{n_perm} permutations" if set(inference.methods) & set(PERMUTATION_INFERENCES)
                    else "parametric")
        diagnostics = None
        if len(design.columns) > len(group_cells):
            from fcflow.stats import compute_design_diagnostics

            diagnostics = compute_design_diagnostics(design, group_cells, test.matrix, max_vif=inference.max_vif)
            for message in diagnostics.warnings:
                LOGGER.warning("%s: %s: %s.", where, test.expression, message)
        result = computed[test.name] = infer(test)
        row.update(_write_test_outputs(
            group_dir, output_dir, recipe, measure, analysis, test, result, maps, subjects, group_of,
            design, dropped, counts, lookup, provenance, recipe_sha, n_perm,
            diagnostics=diagnostics, variance_note=variance_note,
        ))
        if region_atlas is not None:
            permutations, scheme = exchange(test)
            row.update(_write_region_outputs(
                group_dir, output_dir, recipe, measure, analysis, test, region_atlas, maps, data,
                subjects, group_of, design, variance_labels, n_perm, recipe_sha, provenance,
                permutations=permutations, scheme=scheme,
            ))
        rows.append(row)
        family_rows[test.name] = row
    if family:
        update = _write_family_outputs(group_dir, output_dir, recipe, measure, analysis, tests,
                                       [computed[t.name] for t in tests], maps, where)
        for name, values in update.items():
            family_rows[name].update(values)
    from fcflow.io import sha256_file

    written = sorted(p for p, stamp in _unit_files(group_dir, measure, analysis).items() if before.get(p) != stamp)
    return AnalysisOutputs(rows=rows, files={str(p.relative_to(output_dir)): sha256_file(p) for p in written})


def finish_group_level(output_dir: str | Path, outputs: Sequence[AnalysisOutputs]) -> Path:
    """Write ``results.tsv`` and ``baseline_results.tsv`` from every unit's rows, in unit order,
    and set apart the files of ``group/`` no unit wrote (:func:`set_apart_stale_outputs`).

    Returns
    -------
    results_file : Path
        ``output_dir/group/results.tsv``.
    """
    group_dir = Path(output_dir) / GROUP_DIR
    results = pd.DataFrame([row for unit in outputs for row in unit.rows])
    for column in RESULT_COLUMNS + ["is_reference"]:
        if column not in results:
            results[column] = np.nan
    for column in ("dof", "n_significant_clusters", "n_significant_regions"):
        # counts stay integers where some tests lack them (skipped, or no region level)
        results[column] = pd.to_numeric(results[column]).astype("Int64")
    is_reference = results["is_reference"].astype(bool)
    baseline = results[is_reference][RESULT_COLUMNS]
    main = results[~is_reference][RESULT_COLUMNS]
    write_tsv(group_dir / "baseline_results.tsv", baseline)
    results_file = write_tsv(group_dir / "results.tsv", main)
    set_apart_stale_outputs(group_dir, [f for unit in outputs for f in unit.files])
    LOGGER.info("Group level done: %d rows in %s (and %d baseline-equivalence rows)", len(main), results_file,
                len(baseline))
    return results_file


#: group/ files every run writes (not per test)
_GROUP_FILES = ("results.tsv", "baseline_results.tsv", "dataset_description.json", "desc-recipe_config.json")
#: folders of group/ that hold no test outputs: set-apart files, the report's figures
_GROUP_SPECIAL_DIRS = (".fcflow-stale", "figures")


def measure_dir(group_dir: str | Path, measure: MeasureMap) -> Path:
    """``group/task-<task>/desc-<measure>/``: where the tests of one task x measure are written.

    One folder per task and measure (every seed and session analysis of it) instead of one folder
    of hundreds of files; the file names carry every entity, so the folder adds no meaning.
    """
    return Path(group_dir) / f"task-{measure.task}" / f"desc-{measure.desc}"


def _group_outputs(group_dir: Path) -> list[Path]:
    """Every file of ``group/`` a group-level run writes: top level and measure folders, without
    :data:`_GROUP_SPECIAL_DIRS` and hidden files (atomic writes' temporary files)."""
    found = []
    for path in Path(group_dir).rglob("*"):
        relative = path.relative_to(group_dir).parts
        if relative[0] in _GROUP_SPECIAL_DIRS or any(part.startswith(".") for part in relative):
            continue
        if path.is_file():
            found.append(path)
    return sorted(found)


def set_apart_stale_outputs(group_dir: str | Path, files: Sequence[str]) -> Path | None:
    """Move the files of ``group/`` that this run did not write or reuse into ``group/.fcflow-stale/<time>/``.

    A rerun with fewer contrasts, sessions or measures would otherwise leave the earlier run's
    maps and tables beside the new ones, under names a reader cannot tell apart. This run's files
    are its units' files (``files``, relative to OUTPUT_DIR: :attr:`AnalysisOutputs.files`) and
    :data:`_GROUP_FILES`; every other file of ``group/`` and its measure folders
    (:func:`_group_outputs`) is moved (a rename on the same file system, atomic per file) with a
    ``manifest.json`` of what was there; measure folders left empty are removed.
    The group report's ``figures/`` are rewritten by the report itself.

    Returns
    -------
    Path or None
        The folder the stale files went to, or None when nothing was stale.
    """
    import datetime

    group_dir = Path(group_dir)
    output_dir = group_dir.parent
    keep = {group_dir / name for name in _GROUP_FILES} | {output_dir / rel for rel in files}
    stale = sorted(p for p in _group_outputs(group_dir) if p not in keep)
    if not stale:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = group_dir / ".fcflow-stale" / stamp
    target.mkdir(parents=True)
    moved = []
    for path in stale:
        relative = path.relative_to(group_dir)
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        path.rename(target / relative)
        moved.append(str(relative))
    for folder in sorted({p.parent for p in stale}, key=lambda p: len(p.parts), reverse=True):
        # the measure folders the stale files leave empty (task-<t>/desc-<d>/, then task-<t>/)
        while folder != group_dir and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    write_json(target / "manifest.json", {
        "Description": "Files of an earlier group-level run that the run of this time did not write or reuse "
                       "(other tests, contrasts, sessions or measures), set apart so that group/ holds one run's "
                       "outputs.",
        "MovedAtUTC": stamp, "Files": moved,
    })
    LOGGER.warning("%d file(s) of an earlier group-level run that this run did not produce were moved to %s "
                   "(listed in its manifest.json).", len(moved), target)
    return target


def _check_permutation_memory(recipe: Recipe, *, n_rows: int) -> None:
    """Refuse a permutation count whose null distributions would not fit in this machine's memory.

    Estimated before anything is allocated (:func:`fcflow.permutation.permutation_memory_bytes`)
    for the largest design (``n_rows``: every participant, every session difference) and the
    largest family of tests; more than half of the physical memory is refused, with the count
    that would fit.
    """
    import os

    from fcflow.permutation import permutation_memory_bytes

    inference = recipe.inference
    methods = [m for m in inference.methods if m in PERMUTATION_INFERENCES]
    if not methods:
        return
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no estimate to compare with
        return
    n_tests = max(len(recipe.group_contrasts) + len(recipe.f_tests), 2)
    need = permutation_memory_bytes(inference.n_permutations, n_rows, len(methods), n_tests)
    if need > physical / 2:
        base = permutation_memory_bytes(0, n_rows, len(methods), n_tests)
        # memory grows linearly with the count: the largest count that stays within half
        fits = int((physical / 2 - base) / (need - base) * inference.n_permutations)
        raise InputDataError(
            f"n_permutations = {inference.n_permutations} needs about {need / 2**30:.1f} GiB for the permutations of "
            f"{n_rows} rows and {n_tests} tests, more than half of this machine's {physical / 2**30:.1f} GiB: use at "
            f"most {fits} (5000 is the recipe's publication default)."
        )


def _write_group_description(group_dir: Path, output_dir: Path, recipe: Recipe) -> None:
    from fcflow import __version__

    write_json(group_dir / "dataset_description.json", {
        "Name": f"fcflow group level: {recipe.name}",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fcflow", "Version": __version__,
                         "Description": "Group x session inference on seed-to-voxel maps"}],
        "SourceDatasets": [{"URL": "../"}],
    })
    write_json(group_dir / "desc-recipe_config.json",
               {"Recipe": recipe.to_dict(), "RecipeSHA256": recipe.fingerprint()})


def _volume(values: NDArray, mask: NDArray[np.bool_], affine: NDArray[np.float64]) -> nib.Nifti1Image:
    volume = np.zeros(mask.shape, dtype=np.float32)
    volume[mask] = values
    img = nib.Nifti1Image(volume, affine)
    img.header.set_xyzt_units("mm")
    return img


def _write_test_outputs(
    group_dir: Path, output_dir: Path, recipe: Recipe, measure: MeasureMap, analysis: SessionAnalysis,
    test: GroupTest, result: InferenceResult, maps: SessionMaps, subjects: list[str], group_of: pd.Series,
    design: pd.DataFrame, dropped: Mapping[str, str], counts: Mapping[str, int],
    lookup: Callable | None, provenance: Mapping[str, Any], recipe_sha: str, n_perm: int, *,
    diagnostics: Any = None, variance_note: str = "",
) -> dict[str, Any]:
    inference = recipe.inference
    space_res = _space_res(maps, output_dir)
    ents = {"ses": analysis.label, "task": measure.task, "space": recipe.space, "res": space_res,
            "seed": measure.seed, "contrast": test.name, "desc": measure.desc}
    from fcflow.derivatives import bids_label, bids_name

    def path(suffix: str, ext: str, **extra: str) -> Path:
        return measure_dir(group_dir, measure) / bids_name({**ents, **extra}, suffix, ext)

    def rel(p: Path) -> str:
        return str(p.relative_to(output_dir))

    two_sided = inference.two_sided and test.kind == "t"
    columns = list(design.columns)
    meta = {
        "Task": measure.task, "Measure": measure.measure, "Seed": measure.seed,
        "FirstLevelMaps": {"desc": measure.desc, "stat": measure.stat,
                           "Note": "Fisher z for correlation/background; gPPI beta of the condition contrast."},
        "SessionContrast": {"expression": analysis.expression, "weights": dict(analysis.weights),
                            "baseline_equivalence": analysis.is_reference, "kind": analysis.kind,
                            "model": _ANALYSIS_MODEL.get(analysis.kind)},
        "GroupTest": {"name": test.name, "expression": test.expression, "type": test.kind,
                      "weights": {"columns": columns, "matrix": test.matrix.tolist()}},
        "DesignMatrix": {"columns": columns, "participant_id": list(design.index),
                         "rows": np.round(design.to_numpy(dtype=float), 12).tolist()},
        "Covariates": list(inference.covariates),
        "Subjects": [{"participant_id": f"sub-{s}", "group": str(g)} for s, g in zip(subjects, group_of)],
        "NPerGroup": dict(counts),
        "Dropped": [{"participant_id": f"sub-{s}", "reason": r} for s, r in dropped.items()],
        "DegreesOfFreedom": result.dof,
        "StatisticComputed": {"name": result.statistic, "description": _STATISTIC_DESCRIPTION[result.statistic],
                              "VarianceGroups": result.settings.get("variance_groups", []),
                              "VarianceGroupsSetting": inference.variance_groups,
                              "Note": variance_note or None,
                              "WelchDegreesOfFreedom": result.settings.get("welch_dof"),
                              "GroupVariances": inference.group_variances,
                              "GroupWeights": result.settings.get("group_weights")},
        "DesignDiagnostics": diagnostics.to_dict() if diagnostics is not None else None,
        "AnalysisMaskVoxels": int(maps.mask.sum()),
        "Inference": {"methods": list(inference.methods), "primary": inference.primary, "alpha": inference.alpha,
                      "n_permutations": n_perm, "random_seed": inference.random_seed,
                      "cluster_forming_p": inference.cluster_forming_p, "two_sided": two_sided,
                      "min_cluster_voxels": inference.min_cluster_voxels, **result.settings},
        "RecipeSHA256": recipe_sha,
        **provenance,
    }
    out: dict[str, Any] = {
        "dof": result.dof, "statistic": result.statistic,
        "variance_groups": "auto" if len(result.settings.get("variance_groups", [])) > 1 else "none",
        "design_warnings": " | ".join(diagnostics.warnings) if diagnostics is not None else "",
    }
    stat_file = path("statmap", ".nii.gz", stat=test.kind)
    save_img(_volume(result.stat, maps.mask, maps.affine), stat_file)
    sources = sorted(f for s in subjects for ses in maps.sessions
                     if dict(analysis.weights).get(ses, 0) != 0 for f in maps.files.get((s, ses), []))
    write_json(stat_file.with_name(stat_file.name.replace(".nii.gz", ".json")),
               {**meta, "Statistic": result.statistic, "Sources": sources})
    z_file = path("statmap", ".nii.gz", stat="z")
    save_img(_volume(result.z, maps.mask, maps.affine), z_file)
    write_json(z_file.with_name(z_file.name.replace(".nii.gz", ".json")),
               {**meta, "Statistic": "z", "Description": _z_description(result)})
    logp_files = {}
    for method, values in result.logp.items():
        f = path("statmap", ".nii.gz", stat=_LOGP_STAT[method], inference=bids_label(method))
        save_img(_volume(values, maps.mask, maps.affine), f)
        write_json(f.with_name(f.name.replace(".nii.gz", ".json")),
                   {**meta, "Statistic": _LOGP_STAT[method], "InferenceMethod": method,
                    "Description": (_LOGP_DESCRIPTION[method] if not (method == "fdr" and
                                    result.settings.get("fdr_p") == "permutation")
                                    else "-log10 Benjamini-Hochberg q of the voxel-wise permutation p "
                                         "(over the analysis mask).")})
        logp_files[method] = f
    out.update(stat_map=rel(stat_file), z_map=rel(z_file))
    primary = inference.primary
    if primary not in result.logp:
        return out
    out["logp_fwe_map"] = rel(logp_files[primary])
    significant = result.logp[primary] > -math.log10(inference.alpha)
    thresholded = np.where(significant, result.stat, 0.0)
    alpha = _alpha_label(inference.alpha)
    thr_file = path("statmap", ".nii.gz", stat=test.kind, inference=bids_label(primary), alpha=alpha)
    save_img(_volume(thresholded, maps.mask, maps.affine), thr_file)
    write_json(thr_file.with_name(thr_file.name.replace(".nii.gz", ".json")),
               {**meta, "Statistic": test.kind, "InferenceMethod": primary,
                "Description": f"{test.kind} where the {primary} p < {inference.alpha}; 0 elsewhere."})
    out["thresholded_map"] = rel(thr_file)
    volume = np.zeros(maps.mask.shape)
    volume[maps.mask] = thresholded
    logp_volume = np.zeros(maps.mask.shape)
    logp_volume[maps.mask] = result.logp[primary]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = make_cluster_table((volume, maps.affine), 0.0, logp_fwe=logp_volume, two_sided=two_sided,
                                   min_size_voxels=inference.min_cluster_voxels, atlas_lookup=lookup)
    table_file = path("clusters", ".tsv", inference=bids_label(primary), alpha=alpha)
    write_tsv(table_file, table.round(6))
    write_json(table_file.with_name(table_file.name.replace(".tsv", ".json")), {
        **meta, "InferenceMethod": primary,
        "Description": f"Clusters (6-connectivity) of the voxels significant by {primary} at p < {inference.alpha}; "
                       "p_fwe is the smallest corrected p in the cluster; peak_x/y/z and com_x/y/z in mm (MNI).",
        "AtlasLookup": "Julich-Brain v3.1 MPM" if lookup is not None else None,
    })
    out.update(cluster_table=rel(table_file), n_significant_clusters=int(len(table)))
    # -log10 round trip: 0.219 would print as 0.21900000000000003
    out["min_p"] = float(f"{10.0 ** -np.max(result.logp[primary]):.10g}") if result.logp[primary].size else np.nan
    out["peak_stat"] = float(result.stat[np.argmax(np.abs(result.stat))]) if result.stat.size else np.nan
    if len(table):
        _write_cluster_values(path, table, volume, two_sided, maps, subjects, group_of, meta, measure, test,
                              primary, alpha)
    return out


def _load_region_atlas(recipe: Recipe, atlas_dir: str | Path | None, maps: SessionMaps) -> Any:
    """The recipe's declared regions (``areas``) on the maps' grid (:mod:`fcflow.regions`)."""
    from fcflow.regions import load_julich_regions, load_label_regions, select_regions

    if recipe.regions.labels is None:
        atlas = load_julich_regions(atlas_dir, maps.mask.shape, maps.affine)
    else:
        atlas = load_label_regions(recipe.regions.atlas, recipe.regions.labels, maps.mask.shape, maps.affine)
    return select_regions(atlas, recipe.regions.areas)


def _write_region_outputs(
    group_dir: Path, output_dir: Path, recipe: Recipe, measure: MeasureMap, analysis: SessionAnalysis,
    test: GroupTest, atlas: Any, maps: SessionMaps, data: NDArray[np.float32], subjects: list[str],
    group_of: pd.Series, design: pd.DataFrame, variance_labels: Sequence[str] | None, n_perm: int,
    recipe_sha: str, provenance: Mapping[str, Any], permutations: NDArray | None = None, scheme: str = "auto",
) -> dict[str, Any]:
    """One test's region table (``..._regions.tsv`` and its sidecar) and its ``results.tsv`` values."""
    from fcflow.derivatives import bids_name
    from fcflow.regions import compute_region_values, run_region_inference, significant_regions

    inference, settings = recipe.inference, recipe.regions
    values, regions = compute_region_values(data, maps.mask, atlas, min_voxels=settings.min_voxels)
    if regions.empty:
        LOGGER.warning("%s ses %s: %s: region level skipped: no region of %s has %d voxels (min_voxels) in the "
                       "analysis mask of %d voxels.", measure.label, analysis.expression, test.expression,
                       atlas.source, settings.min_voxels, int(maps.mask.sum()))
        return {}
    table = run_region_inference(
        values, regions, design, test, n_permutations=n_perm, two_sided=inference.two_sided,
        random_seed=inference.random_seed, variance_groups=variance_labels, group_variances=inference.group_variances,
        permutations=permutations, scheme=scheme,
    )  # fmt: skip
    ents = {"ses": analysis.label, "task": measure.task, "space": recipe.space, "res": _space_res(maps, output_dir),
            "seed": measure.seed, "contrast": test.name, "desc": measure.desc}
    table_file = measure_dir(group_dir, measure) / bids_name(ents, "regions", ".tsv")
    # p to 6 significant digits, not decimals: a region's p of 1e-9 must not print as 0
    p_columns = ["p_uncorrected", "p_fwe", "q_fdr"]
    write_tsv(table_file, table.round({"effect": 8, "stat": 8}).assign(
        **{c: [float(f"{p:.6g}") for p in table[c]] for c in p_columns}))
    two_sided = inference.two_sided and test.kind == "t"
    declared = ("" if "*" in settings.areas else
                f" (the regions matching {', '.join(map(repr, settings.areas))} with at least "
                f"{settings.min_voxels} voxels in the analysis mask)")
    write_json(table_file.with_name(table_file.name.replace(".tsv", ".json")), {
        "Task": measure.task, "Measure": measure.measure, "Seed": measure.seed,
        "FirstLevelMaps": {"desc": measure.desc, "stat": measure.stat},
        "SessionContrast": {"expression": analysis.expression, "weights": dict(analysis.weights)},
        "GroupTest": {"name": test.name, "expression": test.expression, "type": test.kind},
        "Subjects": [{"participant_id": f"sub-{s}", "group": str(g)} for s, g in zip(subjects, group_of)],
        "Regions": {"source": atlas.source, "areas": list(settings.areas),
                    "declared_regions": atlas.regions["region"].astype(str).tolist(),
                    "min_voxels": settings.min_voxels, "n_regions": len(regions), "correction": settings.correction},
        "Family": (f"The {len(regions)} regions of this test are their own family, declared beside the voxel-wise "
                   f"one{declared}: p_fwe is corrected over these regions only, not over voxels, other tests or "
                   "the voxel-wise family. Report both families; do not pick the better of the two."),
        "Description": (
            f"Per region: the mean of each subject's first-level {measure.desc} ({measure.stat}) map over the "
            "region's voxels in the analysis mask (a mean of voxel-wise values, not the connectivity of the "
            "region's mean time series), tested with the voxel level's design and statistic. effect: the OLS "
            "contrast estimate (n/a for F); stat: the statistic; p_uncorrected: its parametric p"
            f"{' (two-sided)' if two_sided else ''}; p_fwe: max-statistic permutation p over the regions "
            f"({n_perm} permutations, random seed {inference.random_seed}); q_fdr: Benjamini-Hochberg q of "
            "p_uncorrected over the regions."),
        "RecipeSHA256": recipe_sha,
        **provenance,
    })  # fmt: skip
    n_significant = len(significant_regions(table, inference.alpha, settings.correction))
    return {"region_table": str(table_file.relative_to(output_dir)), "n_significant_regions": n_significant}


def _write_family_outputs(
    group_dir: Path, output_dir: Path, recipe: Recipe, measure: MeasureMap, analysis: SessionAnalysis,
    tests: Sequence[GroupTest], results: Sequence[InferenceResult], maps: SessionMaps, where: str,
) -> dict[str, dict[str, Any]]:
    """-log10 p corrected over voxels and over every group test of one map and session analysis.

    Writes ``stat-logpFamilyFWE_inference-<m>`` maps beside each test's own ``stat-logpFWE`` maps
    and returns, per test name, the primary inference's family-wise map and smallest p
    (``logp_family_map``, ``min_p_family`` in ``results.tsv``). Tests whose permutations differ
    (e.g. a one-group mean, sign-flipped, beside permuted group differences) cannot share one
    null: a warning, and no family-wise maps.
    """
    from fcflow.derivatives import bids_label, bids_name
    from fcflow.permutation import combine_family_wise

    try:
        family = combine_family_wise([r.permutation for r in results])
    except ValueError as exc:
        LOGGER.warning("%s: no family-wise correction over %d tests: %s", where, len(tests), exc)
        return {}
    inference = recipe.inference
    ents = {"ses": analysis.label, "task": measure.task, "space": recipe.space, "res": _space_res(maps, output_dir),
            "seed": measure.seed, "desc": measure.desc}
    names = [t.name for t in tests]
    out: dict[str, dict[str, Any]] = {}
    for test, logps in zip(tests, family):
        entry: dict[str, Any] = {}
        for method, values in logps.items():
            f = measure_dir(group_dir, measure) / bids_name(
                {**ents, "contrast": test.name, "stat": "logpFamilyFWE", "inference": bids_label(method)},
                "statmap", ".nii.gz")
            save_img(_volume(values, maps.mask, maps.affine), f)
            write_json(f.with_name(f.name.replace(".nii.gz", ".json")), {
                "Task": measure.task, "Measure": measure.measure, "Seed": measure.seed,
                "SessionContrast": analysis.expression, "GroupTest": test.name, "InferenceMethod": method,
                "Family": names, "Statistic": "logpFamilyFWE",
                "Description": f"-log10 p of {method}, family-wise corrected over the voxels and over the {len(names)} "
                               f"group tests {names} of this map and session contrast: every permutation's largest "
                               "statistic over all of them (same permutations, all on z; Winkler et al. 2016, "
                               "PALM -corrcon).",
            })  # fmt: skip
            if method == inference.primary:
                entry["logp_family_map"] = str(f.relative_to(output_dir))
                entry["min_p_family"] = float(f"{10.0 ** -np.max(values):.10g}") if values.size else np.nan
        out[test.name] = entry
    return out


_ANALYSIS_MODEL = {
    "repeated": "Repeated measures (fcflow.repeated): one row per subject and non-reference session, the "
                "subject's map minus its reference-session map; cell means of group x session; subjects with a "
                "missing non-reference session kept with the differences they have. Subjects are exchangeability "
                "blocks: whole subjects are sign-flipped (with variance groups, and for the session main effect) "
                "or permuted between groups among subjects with the same sessions (Winkler et al. 2015, "
                "NeuroImage 123:253). No sphericity is assumed.",
    "mean": "Each subject's mean map over all sessions (subjects with every session), one row per subject: "
            "the group main effect of the repeated-measures design.",
}

_STATISTIC_DESCRIPTION = {
    "t": "t of the OLS fit, one residual variance for all subjects.",
    "F": "F of the OLS fit, one residual variance for all subjects.",
    "wls-t": "t of the weighted least-squares fit with one variance ratio per variance group for the whole map "
             "(the median over voxels of each group's share of the residual sum of squares); subjects sign-flipped.",
    "wls-F": "F of the weighted least-squares fit with one variance ratio per variance group for the whole map "
             "(the median over voxels of each group's share of the residual sum of squares); subjects sign-flipped.",
    "v": "Welch-type v (Winkler et al. 2014, NeuroImage 92:381): OLS contrast over its standard error with one "
         "residual variance per variance group; approximate dof per voxel by Welch-Satterthwaite.",
    "G": "Winkler's G (Winkler et al. 2014, NeuroImage 92:381), the F generalised to one residual variance per "
         "variance group (Welch's ANOVA for a one-way design); approximate dof per voxel by Winkler's formula.",
}


def _z_description(result: InferenceResult) -> str:
    if result.dof_map is None:
        return f"z with the same tail probability as {result.statistic} ({result.dof} dof)."
    low, median, high = (result.settings["welch_dof"][k] for k in ("min", "median", "max"))
    return (f"z with the same tail probability as {result.statistic} under its approximate dof at each voxel "
            f"(min {low:.1f}, median {median:.1f}, max {high:.1f}).")


def _variance_group_labels(
    setting: str, group_of: pd.Series, where: str, design: pd.DataFrame | None = None,
) -> tuple[list[str] | None, str]:
    """One variance group per study group for "auto"; None (one common variance) otherwise.

    A study group with fewer than two subjects, or whose subjects leave less than half a residual
    degree of freedom once the design (its covariates) is fitted (the sum over the group of
    ``1 - leverage``; :func:`fcflow.permutation.permutation_test` needs 0.5), cannot estimate a
    variance of its own: the test then falls back to one common variance, with a warning and a
    note in its sidecars.
    """
    if setting != "auto":
        return None, ""
    from fcflow.permutation import MIN_GROUP_RESIDUAL_DOF, variance_group_shortfall

    labels = [str(g) for g in group_of]
    sizes = pd.Series(labels).value_counts()
    small = sorted(sizes[sizes < 2].index)
    reason = f"group(s) {small} have fewer than 2 subjects" if small else ""
    if not reason and design is not None and len(sizes) > 1:
        thin = variance_group_shortfall(labels, design.to_numpy(dtype=float))
        if thin:
            reason = (f"the design's {design.shape[1]} columns leave too little residual variance to "
                      f"{'; '.join(thin)} (below {MIN_GROUP_RESIDUAL_DOF})")
    if reason:
        note = (f"variance_groups 'auto' fell back to one common variance: {reason}, too few to estimate a "
                "variance of their own")
        LOGGER.warning("%s: %s.", where, note)
        return None, note
    return (labels if len(sizes) > 1 else None), ""


_LOGP_DESCRIPTION = {
    "tfce": "-log10 family-wise corrected p of TFCE (permutation; max-TFCE null).",
    "maxt": "-log10 family-wise corrected p of the voxel statistic (permutation; max-statistic null).",
    "cluster_mass": "-log10 family-wise corrected p of the cluster mass of the voxel's cluster (permutation); "
                    "0 outside clusters.",
    "cluster_size": "-log10 family-wise corrected p of the cluster size of the voxel's cluster (permutation); "
                    "0 outside clusters.",
    "bonferroni": "-log10 Bonferroni-corrected parametric p (over the analysis mask).",
    "fdr": "-log10 Benjamini-Hochberg q of the parametric p (over the analysis mask).",
    "cluster_extent": "-log10 uncorrected parametric p inside clusters of p < cluster_forming_p with at least "
                      "min_cluster_voxels voxels; 0 elsewhere. Not a family-wise error control.",
}


def _space_res(maps: SessionMaps, output_dir: Path) -> str | None:
    first = next(iter(maps.files.values()))[0]
    return parse_entities(Path(first).name)[0].get("res")


def _write_cluster_values(
    path: Callable[..., Path], table: pd.DataFrame, volume: NDArray[np.float64], two_sided: bool,
    maps: SessionMaps, subjects: list[str], group_of: pd.Series, meta: Mapping[str, Any],
    measure: MeasureMap, test: GroupTest, primary: str, alpha: str,
) -> None:
    """Per significant cluster: each subject's mean map value at every session, TSV and plot."""
    from fcflow.derivatives import bids_label
    from fcflow.plotting import plot_group_session_means

    labels, _ = label_clusters(volume, 0.0, two_sided=two_sided)
    in_mask_labels = labels[maps.mask]
    inverse = np.linalg.inv(maps.affine)
    columns = [maps.subjects.index(s) for s in subjects]
    for _, cluster in table.head(_MAX_CLUSTER_PLOTS).iterrows():
        ijk = np.rint(inverse @ np.array([cluster["peak_x"], cluster["peak_y"], cluster["peak_z"], 1.0]))[:3]
        label = labels[tuple(ijk.astype(int))]
        voxels = in_mask_labels == label
        records = []
        for s, session in enumerate(maps.sessions):
            means = maps.data[s][np.ix_(columns, np.flatnonzero(voxels))].mean(axis=1, dtype=np.float64)
            for k, subject in enumerate(subjects):
                if maps.present[s, columns[k]]:
                    records.append({"participant_id": f"sub-{subject}", "group": str(group_of.iloc[k]),
                                    "session": session, "value": round(float(means[k]), 8)})
        values = pd.DataFrame(records, columns=["participant_id", "group", "session", "value"])
        number = str(int(cluster["cluster_id"]))
        tsv = path("clustermeans", ".tsv", inference=bids_label(primary), alpha=alpha, cluster=number)
        write_tsv(tsv, values)
        where = f"peak ({cluster['peak_x']:.0f}, {cluster['peak_y']:.0f}, {cluster['peak_z']:.0f}) mm"
        if "peak_area" in cluster:
            where += f", {cluster['peak_area']}"
        write_json(tsv.with_name(tsv.name.replace(".tsv", ".json")), {
            **{k: meta[k] for k in ("Task", "Measure", "Seed", "FirstLevelMaps", "SessionContrast", "GroupTest",
                                    "RecipeSHA256")},
            "Cluster": {k: (v.item() if hasattr(v, "item") else v) for k, v in cluster.items()},
            "Description": f"Mean first-level {measure.desc} ({measure.stat}) over the {int(cluster['size_voxels'])} "
                           f"voxels of cluster {number} ({where}) per subject and session.",
        })
        png = tsv.with_name(tsv.name.replace(".tsv", ".png"))
        ylabel = {"z": "Fisher z", "beta": "gPPI beta"}.get(measure.stat, measure.stat)
        plot_group_session_means(
            values, png, sessions=maps.sessions, groups=list(dict.fromkeys(meta["NPerGroup"])),
            title=f"task-{measure.task} {measure.desc}, {test.expression}\ncluster {number}: {where}",
            ylabel=f"mean {ylabel} in cluster",
        )
