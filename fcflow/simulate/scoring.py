"""Score a group-level result against the truth that ``fcflow simulate`` planted.

A simulated study writes what it planted to ``derivatives/ground_truth/``: ``effects.tsv``
(one row per planted coupling: its task, measure, group, session and target region) and one
mask per target region. :func:`score_group_results` reads the group level's ``results.tsv``
and says, for every test, which planted regions it should find, whether each significant
cluster lands in one, and how far the worst significant voxel lies from them. It is how the
project checks that the primary inference finds what was planted and nothing else (see
``benchmarks/score_planted_effects.py``).
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import ndimage

from fcflow.errors import InputDataError
from fcflow.simulate.params import GROUPS, SESSIONS
from fcflow.stats import parse_contrast

# The first-level measures a planted effect changes. A PPI effect adds seed x 2-back to the
# target, so it also raises the target's task-regressed ("background") correlation.
_MEASURES_CHANGED = {"correlation": ("correlation",), "ppi": ("gppi", "background")}

SCORE_COLUMNS = [
    "task", "measure", "session_contrast", "group_contrast", "stat_type", "expected_regions",
    "n_significant_voxels", "found_regions", "missed_regions", "n_voxels_far",
    "max_distance_mm", "verdict",
]


def read_truth_masks(ground_truth_dir: str | Path) -> dict[str, nib.Nifti1Image]:
    """The target masks of a simulated study, by target label (``leftInsula``, ``dmPFC``...)."""
    out = {}
    for path in sorted(Path(ground_truth_dir).glob("space-*_desc-*_mask.nii.gz")):
        label = path.name.split("_desc-", 1)[1].rsplit("_mask", 1)[0]
        out[label] = nib.load(path)
    if not out:
        raise FileNotFoundError(
            f"No space-*_desc-*_mask.nii.gz in {ground_truth_dir}: pass the derivatives/ground_truth "
            "folder of a study written by `fcflow simulate`."
        )
    return out


def expected_regions(
    effects: pd.DataFrame, *, task: str, measure: str, session_weights: dict[str, float],
    group_weights: dict[str, float],
) -> list[str]:
    """Target regions whose planted coupling differs between the compared cells.

    A planted effect (``kind == "effect"``: a group at a session) shows in a test when the test
    reads the measure the effect changes, weights the effect's session and weights its group.
    """
    planted = effects[effects["kind"] == "effect"]
    out = []
    for row in planted.itertuples():
        if row.task != task or measure not in _MEASURES_CHANGED.get(row.measure, ()):
            continue
        if session_weights.get(row.session, 0.0) == 0.0 or group_weights.get(row.group, 0.0) == 0.0:
            continue
        if row.target not in out:
            out.append(row.target)
    return out


def _weights(expression: str, levels: list[str]) -> dict[str, float]:
    return dict(zip(levels, parse_contrast(expression, levels)))


def _distance_mm(regions: list[NDArray[np.bool_]], zooms: tuple[float, ...], shape: tuple[int, ...]
                 ) -> NDArray[np.float64]:
    """Distance (mm) of every voxel to the nearest voxel of any region (inf without regions)."""
    if not regions:
        return np.full(shape, np.inf)
    union = np.logical_or.reduce(regions)
    return ndimage.distance_transform_edt(~union, sampling=zooms)


def score_group_results(
    output_dir: str | Path,
    ground_truth_dir: str | Path,
    *,
    alpha: float = 0.05,
    max_distance_mm: float = 6.0,
) -> pd.DataFrame:
    """One row per test of ``OUTPUT_DIR/group/results.tsv``, scored against the planted truth.

    Parameters
    ----------
    output_dir : path
        The analysis OUTPUT_DIR (holding ``group/results.tsv``).
    ground_truth_dir : path
        ``BIDS_DIR/derivatives/ground_truth`` of the simulated study.
    alpha : float, default=0.05
        A voxel is significant where the primary inference's FWE p <= alpha.
    max_distance_mm : float, default=6.0
        Significant voxels further than this from every expected region count as far.

    Returns
    -------
    scores : DataFrame
        Columns :data:`SCORE_COLUMNS`. ``verdict`` is ``"hit"`` (every expected region
        overlaps a significant voxel, none far), ``"miss"`` (an expected region has none),
        ``"false positive"`` (significant voxels far from every expected region, or any
        significant voxel where nothing was planted), ``"clean"`` (nothing planted, nothing
        found) or ``"skipped"`` (the test did not run).
    """
    output_dir = Path(output_dir)
    truth = Path(ground_truth_dir)
    effects = pd.read_csv(truth / "effects.tsv", sep="\t")
    masks = read_truth_masks(truth)
    results = pd.read_csv(output_dir / "group" / "results.tsv", sep="\t", keep_default_na=False)
    groups, sessions = list(GROUPS), list(SESSIONS)
    threshold = -math.log10(alpha) - 1e-9
    rows = []
    for row in results.itertuples():
        session_weights = _weights(row.session_contrast, sessions)
        if row.stat_type == "F":
            group_weights = {g: 1.0 for g in groups}
        else:
            group_weights = _weights(row.group_contrast, groups)
        expected = expected_regions(effects, task=row.task, measure=row.measure,
                                    session_weights=session_weights, group_weights=group_weights)
        out = {"task": row.task, "measure": row.measure, "session_contrast": row.session_contrast,
               "group_contrast": row.group_contrast, "stat_type": row.stat_type,
               "expected_regions": ";".join(expected)}
        if not row.logp_fwe_map:
            rows.append({**out, "verdict": "skipped"})
            continue
        image = nib.load(output_dir / row.logp_fwe_map)
        significant = np.asarray(image.dataobj) >= threshold
        region_masks = {}
        for label in expected:
            mask_img = masks[label]
            if mask_img.shape != image.shape or not np.allclose(mask_img.affine, image.affine, atol=1e-3):
                raise InputDataError(
                    f"The truth mask of {label} ({mask_img.shape}) is not on the grid of {row.logp_fwe_map} "
                    f"({image.shape}): score a study analysed at its simulated resolution."
                )
            region_masks[label] = np.asarray(mask_img.dataobj) > 0
        distance = _distance_mm(list(region_masks.values()), image.header.get_zooms()[:3], image.shape)
        found = [label for label, m in region_masks.items() if (significant & m).any()]
        missed = [label for label in expected if label not in found]
        far = significant & (distance > max_distance_mm)
        n_sig = int(significant.sum())
        if n_sig and (far.any()):
            verdict = "false positive"
        elif missed:
            verdict = "miss"
        else:
            verdict = "hit" if expected else "clean"
        rows.append({**out, "n_significant_voxels": n_sig, "found_regions": ";".join(found),
                     "missed_regions": ";".join(missed), "n_voxels_far": int(far.sum()),
                     "max_distance_mm": float(distance[significant].max()) if n_sig else 0.0,
                     "verdict": verdict})
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)
