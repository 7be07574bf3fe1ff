"""Repeated measures: the group x session test over every session a subject has.

The session contrasts of the group level (``infusion - baseline``, ``24h - baseline``) are each
tested alone. This module builds the joint model over all sessions (issue 16, item 3):

Model
-----
Each subject's maps are turned into **within-subject differences from the reference session**
(``y_ik - y_i,ref`` for every other session ``k`` the subject has together with the reference),
one row per subject and difference. The design is the cell means of study group x difference
(``G (K - 1)`` columns for ``G`` groups and ``K`` sessions), plus covariates per row (a subject's
age or sex repeated on each of its rows, ``mean_fd`` as that row's change in motion). Taking
differences removes each subject's own level (its random intercept) exactly, so the residual
variance holds only the within-subject variation that the interaction is tested against, as
in a repeated-measures ANOVA, without assuming that the sessions' variances or covariances are
equal (sphericity): a subject's rows are never assumed independent of each other, because they
move together in every permutation (below).

Tests (F contrasts on the cell means):

* ``groupBySession``, the **group x session interaction** over all sessions: do the groups'
  changes from the reference differ, at any session? ``(G - 1)(K - 1)`` rows.
* ``session``, the **session main effect**: is the change from the reference, averaged over
  the groups, non-zero at any session? ``K - 1`` rows.

The group main effect (the groups' difference averaged over all sessions) is a between-subject
test of each subject's mean over the sessions; the group level runs it as a session analysis
of its own (the recipe's F test over the groups, on subjects with every session).

Exchangeability: subjects are blocks
------------------------------------
A subject's rows share its errors, so the permutations move **whole subjects** (Winkler et al.
2015, NeuroImage 123:253, "whole-block" exchangeability), never single rows:

* with one common variance, subjects are permuted between groups, each with all of its rows,
  and only among subjects with the same set of sessions (a subject missing ``24h`` exchanges
  with subjects missing ``24h``): blocks must have the same structure to be exchanged;
* with variance groups (the recipe default) and for the session main effect, each subject's
  rows are sign-flipped together (independent, symmetric subject error vectors; each subject
  keeps its own variance and its own covariance between sessions).

A subject missing a non-reference session is kept with the differences it has; a subject
without the reference session has no difference and is dropped (with the reason).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fcflow.errors import InputDataError

__all__ = [
    "RepeatedMeasures",
    "build_repeated_measures",
    "cell_name",
    "repeated_cells",
    "repeated_measures_contrasts",
    "whole_block_permutations",
]


def cell_name(group: str, session: str) -> str:
    """Design column of the cell ``group`` x ``session`` (a difference from the reference)."""
    return f"{group}:{session}"


def repeated_cells(groups: Sequence[str], sessions: Sequence[str], reference: str) -> list[str]:
    """Every group x non-reference session cell, in the design's column order."""
    return [cell_name(g, k) for g in groups for k in sessions if k != reference]


@dataclass(frozen=True)
class RepeatedMeasures:
    """Within-subject differences of every subject, one row per subject x non-reference session.

    Attributes
    ----------
    data : ndarray of shape (n_rows, n_voxels), float32
        ``map(session) - map(reference)``.
    subjects : list of str
        The subjects kept, in input order.
    row_subject : ndarray of shape (n_rows,), int
        Index into ``subjects`` of each row.
    row_session : list of str
        The session of each row's difference.
    row_group : list of str
        The study group of each row's subject.
    dropped : dict of str to str
        Subjects left out and why.
    """

    data: NDArray[np.float32]
    subjects: list[str]
    row_subject: NDArray[np.intp]
    row_session: list[str]
    row_group: list[str]
    dropped: dict[str, str]

    @property
    def row_names(self) -> list[str]:
        """``sub-<label>_ses-<session>`` per row."""
        return [f"sub-{self.subjects[i]}_ses-{s}" for i, s in zip(self.row_subject, self.row_session)]

    @property
    def cells(self) -> list[str]:
        """Each row's design cell, :func:`cell_name` of its group and session."""
        return [cell_name(g, s) for g, s in zip(self.row_group, self.row_session)]

    def patterns(self) -> NDArray[np.intp]:
        """Per subject, an integer naming its set of sessions (equal sets, equal integers)."""
        sets = _session_sets(self.row_subject, self.row_session, len(self.subjects))
        _, codes = np.unique(np.array(["|".join(s) for s in sets]), return_inverse=True)
        return codes.astype(np.intp)


def _session_sets(row_subject: NDArray[np.intp], row_session: Sequence[str], n_subjects: int) -> list[tuple[str, ...]]:
    """Each subject's sorted sessions (the rows it owns)."""
    sets: list[list[str]] = [[] for _ in range(n_subjects)]
    for i, session in zip(row_subject, row_session):
        sets[int(i)].append(session)
    return [tuple(sorted(s)) for s in sets]


def build_repeated_measures(
    data: NDArray[np.floating],
    present: NDArray[np.bool_],
    subjects: Sequence[str],
    sessions: Sequence[str],
    reference: str,
    group_of: Mapping[str, str],
) -> RepeatedMeasures:
    """Within-subject differences from the reference session, for every subject that has some.

    Parameters
    ----------
    data : ndarray of shape (n_sessions, n_subjects, n_voxels)
        Every subject's map at every session (any value where absent).
    present : ndarray of shape (n_sessions, n_subjects), bool
    subjects : sequence of str
        Labels, in the order of ``data``'s second axis.
    sessions : sequence of str
        In the order of ``data``'s first axis; ``reference`` among them.
    reference : str
    group_of : mapping of str to str
        Study group of each subject; subjects absent from it (or with an empty group) are dropped.

    Returns
    -------
    RepeatedMeasures
        Rows ordered by subject, then session (the order of ``sessions``).

    Raises
    ------
    ValueError
        ``reference`` is not one of ``sessions``, or the shapes disagree.
    """
    sessions = list(sessions)
    if reference not in sessions:
        raise InputDataError(f"'reference' must be one of the sessions {sessions}. Got {reference!r}.")
    if data.shape[:2] != present.shape or present.shape != (len(sessions), len(subjects)):
        raise InputDataError(
            f"'data' (shape {data.shape}) and 'present' (shape {present.shape}) must have one row per session "
            f"({len(sessions)}) and one column per subject ({len(subjects)})."
        )
    ref = sessions.index(reference)
    others = [k for k in range(len(sessions)) if k != ref]
    kept: list[str] = []
    rows: list[tuple[int, int]] = []
    dropped: dict[str, str] = {}
    for j, subject in enumerate(subjects):
        group = group_of.get(subject)
        if group is None or (isinstance(group, float) and np.isnan(group)) or str(group) == "":
            dropped[subject] = "no study group"
            continue
        if not present[ref, j]:
            dropped[subject] = f"no {reference} session (every difference is from it)"
            continue
        mine = [k for k in others if present[k, j]]
        if not mine:
            dropped[subject] = f"only the {reference} session"
            continue
        kept.append(subject)
        rows += [(j, k) for k in mine]
    out = np.empty((len(rows), data.shape[2]), dtype=np.float32)
    for r, (j, k) in enumerate(rows):
        np.subtract(data[k, j], data[ref, j], out=out[r], dtype=np.float32, casting="unsafe")
    index = {s: i for i, s in enumerate(kept)}
    return RepeatedMeasures(
        data=out,
        subjects=kept,
        row_subject=np.array([index[subjects[j]] for j, _ in rows], dtype=np.intp),
        row_session=[sessions[k] for _, k in rows],
        row_group=[str(group_of[subjects[j]]) for j, _ in rows],
        dropped=dropped,
    )


def repeated_measures_contrasts(
    groups: Sequence[str], sessions: Sequence[str], reference: str, columns: Sequence[str],
) -> dict[str, NDArray[np.float64]]:
    """F contrast matrices of the interaction and the session main effect over ``columns``.

    ``columns`` is the design's (cell names from :func:`cell_name` first, covariates after;
    covariate weights are 0). The interaction's rows are, for each non-reference session ``k``
    and each group ``g`` but the first, ``cell(g, k) - cell(first group, k)``; the session main
    effect's rows are, for each ``k``, the mean over the groups of ``cell(g, k)``.

    Returns
    -------
    dict
        ``{"groupBySession": (G-1)(K-1) x p, "session": (K-1) x p}``.
    """
    columns = list(columns)
    others = [s for s in sessions if s != reference]

    def row(weights: Mapping[str, float]) -> NDArray[np.float64]:
        missing = [c for c in weights if c not in columns]
        if missing:
            raise InputDataError(f"The design must have the cell columns {missing}. Got columns {columns}.")
        return np.array([weights.get(c, 0.0) for c in columns], dtype=float)

    interaction = [row({cell_name(g, k): 1.0, cell_name(groups[0], k): -1.0}) for k in others for g in groups[1:]]
    main = [row({cell_name(g, k): 1.0 / len(groups) for g in groups}) for k in others]
    return {"groupBySession": np.vstack(interaction), "session": np.vstack(main)}


def whole_block_permutations(
    row_subject: NDArray[np.intp],
    row_session: Sequence[str],
    n_permutations: int,
    *,
    scheme: str,
    patterns: NDArray[np.intp] | None = None,
    random_seed: int | np.random.Generator | None = None,
) -> NDArray:
    """Random whole-block shuffles or sign flips of subjects, without the identity.

    Parameters
    ----------
    row_subject : ndarray of shape (n_rows,), int
        Subject (block) of each row, 0 .. n_subjects - 1.
    row_session : sequence of str
        Session of each row; a permuted subject's row of session ``k`` takes the place of the
        row of session ``k`` of the subject it replaces.
    n_permutations : int
        Rows to return **plus one** (the identity, which the engine prepends), as
        :func:`fcflow.permutation.permutation_test`'s ``n_permutations`` counts it.
    scheme : {"permute", "sign_flip"}
        "permute": subjects exchanged among those of the same ``patterns`` code (same sessions);
        "sign_flip": one random sign per subject, on all of its rows.
    patterns : ndarray of shape (n_subjects,), int, or None
        Exchangeability of whole blocks (see :meth:`RepeatedMeasures.patterns`); None: all alike
        (then every subject must have the same sessions).
    random_seed : int, Generator or None

    Returns
    -------
    ndarray of shape (n_permutations - 1, n_rows)
        Row indices (``permute``: design row ``r`` is replaced by row ``out[r]``) or +-1.
    """
    row_subject = np.asarray(row_subject, dtype=np.intp)
    n_subjects = int(row_subject.max()) + 1 if row_subject.size else 0
    rng = np.random.default_rng(random_seed)
    n_out = max(int(n_permutations) - 1, 0)
    if scheme == "sign_flip":
        signs = rng.integers(0, 2, size=(n_out, n_subjects), dtype=np.int8) * 2 - 1
        return signs[:, row_subject]
    if scheme != "permute":
        raise InputDataError(f"'scheme' must be 'permute' or 'sign_flip'. Got {scheme!r}.")
    if patterns is None:
        patterns = np.zeros(n_subjects, dtype=np.intp)
    patterns = np.asarray(patterns, dtype=np.intp)
    sets = _session_sets(row_subject, row_session, n_subjects)
    members = [np.flatnonzero(patterns == p) for p in np.unique(patterns)]
    for block in members:
        odd = next((j for j in block if sets[j] != sets[block[0]]), None)
        if odd is not None:
            raise InputDataError(
                f"Subjects {block[0]} and {odd} share a pattern code but not their sessions: whole blocks can only "
                "be exchanged between subjects with the same sessions."
            )
    # row_of[subject, session]: the row holding that subject's difference at that session
    names, row_code = np.unique(np.asarray(row_session, dtype=str), return_inverse=True)
    row_of = np.full((n_subjects, len(names)), -1, dtype=np.int32)
    row_of[row_subject, row_code] = np.arange(row_subject.size, dtype=np.int32)
    out = np.empty((n_out, row_subject.size), dtype=np.int32)
    target = np.arange(n_subjects)
    for n in range(n_out):
        for block in members:
            target[block] = rng.permutation(block)
        out[n] = row_of[target[row_subject], row_code]
    return out


def repeated_measures_design(
    measures: RepeatedMeasures,
    groups: Sequence[str],
    sessions: Sequence[str],
    reference: str,
    covariates: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Cell means of group x non-reference session (then demeaned covariates), one row per difference.

    Parameters
    ----------
    measures : RepeatedMeasures
    groups, sessions : sequence of str
        The recipe's levels (their order is the columns').
    reference : str
    covariates : DataFrame or None
        One row per row of ``measures`` (see :func:`fcflow.stats.make_group_design`).

    Returns
    -------
    design : DataFrame of shape (n_rows, n_cells + n_covariate_columns), index ``row_names``
        A cell without any row is left out (its contrasts then fail with a clear error).
    """
    from fcflow.stats import make_group_design

    present = set(measures.cells)
    cells = [c for c in repeated_cells(groups, sessions, reference) if c in present]
    design = make_group_design(measures.cells, cells, covariates)
    design.index = pd.Index(measures.row_names, name="row")
    return design


def permutation_scheme(test: str, variance_groups: bool) -> str:
    """How a repeated-measures test's whole blocks are exchanged (module docstring).

    The session main effect is the mean of the differences, which only sign flips can null
    (its nuisance holds no constant); with variance groups every test flips signs, because
    subjects of groups of different variance are not exchangeable.
    """
    return "sign_flip" if test == "session" or variance_groups else "permute"
