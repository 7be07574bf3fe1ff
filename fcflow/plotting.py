"""Figures of the group level: group x session means of a cluster, so an interaction's direction shows.

matplotlib's object API with the Agg canvas (no pyplot state, no display needed); the same
values give the same PNG bytes.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from fcflow.io import atomic_path


def summarise_group_session(values: pd.DataFrame, sessions: Sequence[str], groups: Sequence[str]) -> pd.DataFrame:
    """Mean, n and 95% t interval of ``value`` per group and session.

    Parameters
    ----------
    values : DataFrame
        Columns ``group``, ``session``, ``value`` (one row per subject x session).

    Returns
    -------
    summary : DataFrame
        Columns group, session, n, mean, ci_low, ci_high (NaN interval for n < 2).
    """
    rows = []
    for group in groups:
        for session in sessions:
            x = values.loc[(values["group"] == group) & (values["session"] == session), "value"].to_numpy(float)
            n = x.size
            mean = float(x.mean()) if n else np.nan
            half = float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
            rows.append({"group": group, "session": session, "n": n, "mean": mean,
                         "ci_low": mean - half, "ci_high": mean + half})
    return pd.DataFrame(rows)


def plot_group_session_means(
    values: pd.DataFrame, out_file: str | Path, *, sessions: Sequence[str], groups: Sequence[str],
    title: str = "", ylabel: str = "value",
) -> Path:
    """Plot group means across sessions with 95% confidence intervals; write a PNG atomically.

    Parameters
    ----------
    values : DataFrame
        Columns ``group``, ``session``, ``value``.
    out_file : path
    sessions, groups : sequence of str
        Order of the x axis and of the lines.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = summarise_group_session(values, sessions, groups)
    figure = Figure(figsize=(5.5, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    x = np.arange(len(sessions), dtype=float)
    width = 0.08 * (len(groups) - 1)
    for k, group in enumerate(groups):
        part = summary[summary["group"] == group]
        offset = (k - (len(groups) - 1) / 2) * 0.08 if len(groups) > 1 else 0.0
        mean = part["mean"].to_numpy()
        err = np.vstack([mean - part["ci_low"].to_numpy(), part["ci_high"].to_numpy() - mean])
        n = part["n"].to_numpy()
        axes.errorbar(x + offset, mean, yerr=np.nan_to_num(err), marker="o", capsize=3,
                      label=f"{group} (n={int(n.max()) if n.size else 0})")
    axes.axhline(0.0, color="0.7", linewidth=0.8, zorder=0)
    axes.set_xticks(x, list(sessions))
    axes.set_xlim(-0.5 - width, len(sessions) - 0.5 + width)
    axes.set_ylabel(ylabel)
    axes.set_title("\n".join(textwrap.fill(line, 70) for line in title.splitlines()), fontsize=8)
    axes.legend(fontsize=8, frameon=False)
    figure.tight_layout()
    out_file = Path(out_file)
    with atomic_path(out_file) as tmp:
        figure.savefig(tmp, format="png", metadata={"Software": None})
    return out_file
