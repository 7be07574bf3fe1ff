"""Group level, inference: session analyses, designs and group tests on the loaded maps.

Plain numpy / nilearn science that reads and writes no file: each session analysis' subject maps
(:func:`analysis_subjects`: change maps, the reference session or the repeated-measures rows), its
design (:func:`analysis_design`), its group contrasts and F tests (:func:`analysis_tests`) and the
inference of one test (:func:`run_inference`: parametric, FDR, Bonferroni and the permutation
methods of :mod:`fcflow.permutation`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import special

from fcflow.clusters import label_clusters
from fcflow.config import PERMUTATION_INFERENCES, Recipe
from fcflow.errors import InputDataError
from fcflow.group.inputs import SessionMaps

LOGGER = logging.getLogger("fcflow.group")


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
    permutations: NDArray | None = None, scheme: str = "auto", accel: str = "none",
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
    then replaces ``n_permutations``. ``accel="tail"`` refines the permutation methods'
    family-wise p in the tail of their nulls (:mod:`fcflow.tail`).
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
            accel=accel if perm_methods else "none",
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


def check_permutation_memory(recipe: Recipe, *, n_rows: int) -> None:
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


def variance_group_labels(
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
