"""Region level: region values, their inference (max-T FWE, FDR) and the group-level outputs.

No Julich-Brain files are needed: the regions come from a user label image. Grids have axes that
all differ (7, 8, 9), so a swapped axis fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fcflow.config import RegionsConfig
from fcflow.errors import InputDataError
from fcflow.group.inference import GroupTest
from fcflow.group.run import run_group_level
from fcflow.regions import (
    REGION_COLUMNS,
    compute_region_values,
    load_label_regions,
    run_region_inference,
    select_regions,
)
from fcflow.stats import make_group_design

sys.path.insert(0, str(Path(__file__).parent))
from test_grouplevel import AFFINE, SHAPE, _blob, _recipe, write_first_level  # noqa: E402

GRID = (7, 8, 9)
GRID_AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])


def _write_labels(folder: Path, labels: np.ndarray, affine: np.ndarray, names: dict[int, str]) -> tuple[Path, Path]:
    image, table = folder / "labels.nii.gz", folder / "labels.tsv"
    nib.Nifti1Image(labels.astype(np.int16), affine).to_filename(image)
    pd.DataFrame({"index": list(names), "name": list(names.values())}).to_csv(table, sep="\t", index=False)
    return image, table


def _two_group_design(n_per_group: int, groups=("a", "b")) -> pd.DataFrame:
    return make_group_design([g for g in groups for _ in range(n_per_group)], list(groups))


def _t_test(name: str, columns, weights: dict[str, float]) -> GroupTest:
    return GroupTest(name, name, "t", np.array([[weights.get(c, 0.0) for c in columns]]))


# ----------------------------------------------------------------------------------------------
def test_region_values_are_the_mean_of_each_map_over_each_label(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, GRID)
    mask = rng.random(GRID) > 0.2
    image, table = _write_labels(tmp_path, labels, GRID_AFFINE, {1: "one", 2: "two", 3: "three", 4: "four"})
    atlas = load_label_regions(image, table, GRID, GRID_AFFINE)
    maps = rng.normal(size=(6, *GRID))
    values, regions = compute_region_values(maps[:, mask], mask, atlas, min_voxels=1)
    assert list(regions["region"]) == ["one", "two", "three", "four"]
    for column, index in enumerate(regions["index"]):
        voxels = (labels == index) & mask
        assert regions["n_voxels"][column] == voxels.sum()
        np.testing.assert_allclose(values[:, column], maps[:, voxels].mean(axis=1), rtol=1e-12)


def test_label_image_on_another_grid_is_resampled_by_nearest_neighbour(tmp_path):
    # the same labels at twice the resolution: nearest neighbour gives back the coarse labels
    coarse = np.zeros(GRID, dtype=int)
    coarse[:3], coarse[3:, :4], coarse[3:, 4:] = 1, 2, 7
    fine = np.repeat(np.repeat(np.repeat(coarse, 2, 0), 2, 1), 2, 2)
    fine_affine = np.diag([1.5, 1.5, 1.5, 1.0])
    fine_affine[:3, 3] = -0.75  # fine voxel centres straddle each coarse centre
    image, table = _write_labels(tmp_path, fine, fine_affine, {1: "a", 2: "b", 7: "c"})
    atlas = load_label_regions(image, table, GRID, GRID_AFFINE)
    assert np.array_equal(atlas.labels, coarse)


def test_min_voxels_leaves_small_regions_out(tmp_path):
    labels = np.zeros(GRID, dtype=int)
    labels[0, 0, :3], labels[1:] = 1, 2
    image, table = _write_labels(tmp_path, labels, GRID_AFFINE, {1: "small", 2: "big"})
    atlas = load_label_regions(image, table, GRID, GRID_AFFINE)
    mask = np.ones(GRID, dtype=bool)
    _, regions = compute_region_values(np.zeros((2, mask.sum())), mask, atlas, min_voxels=4)
    assert list(regions["region"]) == ["big"]


def test_label_table_without_name_column_is_an_error(tmp_path):
    image, table = _write_labels(tmp_path, np.ones(GRID, dtype=int), GRID_AFFINE, {1: "a"})
    pd.DataFrame({"index": [1], "label": ["a"]}).to_csv(table, sep="\t", index=False)
    with pytest.raises(InputDataError, match="must have the columns 'index' and 'name'"):
        load_label_regions(image, table, GRID, GRID_AFFINE)


def test_label_table_with_repeated_index_is_an_error(tmp_path):
    image, table = _write_labels(tmp_path, np.ones(GRID, dtype=int), GRID_AFFINE, {1: "a"})
    pd.DataFrame({"index": [1, 1], "name": ["a", "b"]}).to_csv(table, sep="\t", index=False)
    with pytest.raises(InputDataError, match="'index' column .* must hold distinct positive integers"):
        load_label_regions(image, table, GRID, GRID_AFFINE)


def test_labels_off_the_grid_are_an_error(tmp_path):
    far = GRID_AFFINE.copy()
    far[:3, 3] = 500.0
    image, table = _write_labels(tmp_path, np.ones(GRID, dtype=int), far, {1: "a"})
    with pytest.raises(InputDataError, match="No label of .* is on the grid of the group maps"):
        load_label_regions(image, table, GRID, GRID_AFFINE)


def test_julich_regions_are_both_hemispheres_named_as_the_cluster_tables(tmp_path):
    from test_atlas import SYN_AFFINE, SYN_BLOCKS, SYN_SHAPE, SYN_X, make_synthetic_atlas

    from fcflow.regions import load_julich_regions

    folder = make_synthetic_atlas(tmp_path / "julich", with_pmaps=False)
    atlas = load_julich_regions(folder, SYN_SHAPE, SYN_AFFINE)
    mask = np.ones(SYN_SHAPE, dtype=bool)
    _, regions = compute_region_values(np.zeros((1, mask.size)), mask, atlas, min_voxels=1)
    named = regions.set_index("region")
    value, ys, zs = SYN_BLOCKS["Area p24ab (pACC)"]
    for hemi in ("left", "right"):
        row = named.loc[f"{hemi} Area p24ab (pACC)"]
        assert row["hemisphere"] == hemi
        block = np.zeros(SYN_SHAPE, dtype=bool)
        block[SYN_X[hemi], ys, zs] = True
        assert row["n_voxels"] == block.sum()
        assert np.array_equal(atlas.labels == row["index"], block)


# ----------------------------------------------------------------------------------------------
_DECLARABLE = {1: "left Area Id1 (Insula)", 2: "right Area Id1 (Insula)", 3: "left Area SFG2 (SFG)",
               4: "left Area 4a (PreCG)", 5: "right Area SFG2 (SFG)", 6: "right Area 4a (PreCG)"}


def test_declared_areas_keep_exactly_the_matching_labels(tmp_path):
    labels = np.random.default_rng(6).integers(0, 7, GRID)
    image, table = _write_labels(tmp_path, labels, GRID_AFFINE, _DECLARABLE)
    atlas = load_label_regions(image, table, GRID, GRID_AFFINE)
    declared = select_regions(atlas, ["left * (Insula)", "* Area SFG2 (SFG)"])
    assert list(declared.regions["region"]) == [_DECLARABLE[i] for i in (1, 3, 5)]
    assert np.array_equal(declared.labels, np.where(np.isin(labels, [1, 3, 5]), labels, 0))
    assert declared.source == atlas.source
    # the hemisphere is part of the name, and "*" keeps every region
    assert list(select_regions(atlas, ["right *"]).regions["index"]) == [2, 5, 6]
    assert select_regions(atlas, ["*"]).regions.equals(atlas.regions)
    mask = np.ones(GRID, dtype=bool)
    _, regions = compute_region_values(np.zeros((2, mask.sum())), mask, declared, min_voxels=1)
    assert list(regions["index"]) == [1, 3, 5]


@pytest.mark.parametrize("pattern", ["left * (insula)", "Area Id1 (Insula)", "left Area SFG9 (SFG)"])
def test_declared_area_matching_no_region_is_an_error(tmp_path, pattern):
    image, table = _write_labels(tmp_path, np.arange(7).repeat(72)[:504].reshape(GRID), GRID_AFFINE, _DECLARABLE)
    atlas = load_label_regions(image, table, GRID, GRID_AFFINE)
    with pytest.raises(InputDataError, match=(
            rf"\[regions\] 'areas' must be patterns that each match a region of labels of labels\.nii\.gz\. "
            rf"Got {re.escape(repr(pattern))}, which matches none of its 6 regions, named like '.+', '.+', '.+': "
            r"patterns are case-sensitive shell-style \(fnmatch\) and match the whole name, hemisphere included")):
        select_regions(atlas, ["right *", pattern])


def test_fwe_over_declared_regions_is_the_max_over_those_regions_only(tmp_path):
    import statsmodels.api as sm

    from fcflow.permutation import permutation_test

    rng = np.random.default_rng(7)
    labels = np.arange(1, 7).repeat(84)[:504].reshape(GRID)
    image, table = _write_labels(tmp_path, labels, GRID_AFFINE, _DECLARABLE)
    atlas = load_label_regions(image, table, GRID, GRID_AFFINE)
    n_per_group = 8
    design = _two_group_design(n_per_group)
    test = _t_test("bMinusA", design.columns, {"b": 1.0, "a": -1.0})
    mask = np.ones(GRID, dtype=bool)
    maps = rng.normal(size=(len(design), *GRID))
    maps[n_per_group:, labels == 4] += 0.3  # an undeclared region with a large effect
    maps[n_per_group:, labels == 1] += 0.15  # about 1.4 SD of a region mean over 84 voxels
    kwargs = {"n_permutations": 300, "two_sided": True, "random_seed": 2}
    values, regions = compute_region_values(maps[:, mask], mask, select_regions(atlas, ["* Area Id1 (Insula)"]),
                                            min_voxels=1)
    assert list(regions["index"]) == [1, 2]
    table = run_region_inference(values, regions, design, test, **kwargs)
    # brute force: each permutation's largest |t| over the 2 declared regions only
    permutations = permutation_test(values, design, test.matrix[0], n_permutations=300, random_seed=2,
                                    inference=("maxt",)).permutations
    residuals = values - values.mean(axis=0)  # Freedman-Lane: the nuisance of b - a is the mean
    null_max = np.array([max(abs(sm.OLS(residuals[:, r], design.to_numpy()[perm]).fit().t_test(test.matrix)
                                 .tvalue.item()) for r in range(2)) for perm in permutations])
    np.testing.assert_allclose(table["p_fwe"], [(null_max >= abs(t) - 1e-6).mean() for t in table["stat"]],
                               atol=1e-12)
    # over all 6 regions the null maximum also takes the undeclared regions' statistics
    all_values, all_regions = compute_region_values(maps[:, mask], mask, atlas, min_voxels=1)
    everything = run_region_inference(all_values, all_regions, design, test, **kwargs).set_index("region")
    for row in table.itertuples():
        assert everything.loc[row.region, "stat"] == pytest.approx(row.stat)
        assert everything.loc[row.region, "p_fwe"] >= row.p_fwe
    # declared, the insula effect survives; among all six it does not (0.023 and 0.053 here)
    assert table["p_fwe"][0] < 0.05 <= everything.loc["left Area Id1 (Insula)", "p_fwe"]


def _regions(n: int) -> pd.DataFrame:
    return pd.DataFrame({"region": [f"r{i}" for i in range(n)], "hemisphere": "", "n_voxels": 10})


def test_region_t_is_statsmodels_ols_t_and_max_t_is_brute_force():
    import statsmodels.api as sm

    from fcflow.permutation import permutation_test

    rng = np.random.default_rng(1)
    n_per_group, n_regions = 9, 6
    design = _two_group_design(n_per_group)
    design["age"] = rng.normal(0, 1, len(design))
    values = rng.normal(size=(len(design), n_regions))
    values[n_per_group:, 2] += 1.0
    test = _t_test("bMinusA", design.columns, {"b": 1.0, "a": -1.0})
    table = run_region_inference(values, _regions(n_regions), design, test, n_permutations=500, two_sided=True,
                                 random_seed=4)
    assert list(table.columns) == REGION_COLUMNS
    for r in range(n_regions):
        fit = sm.OLS(values[:, r], design.to_numpy()).fit()
        check = fit.t_test(test.matrix)
        np.testing.assert_allclose(table["stat"][r], check.tvalue.item(), rtol=1e-8)
        np.testing.assert_allclose(table["effect"][r], check.effect.item(), rtol=1e-8)
        np.testing.assert_allclose(table["p_uncorrected"][r], check.pvalue.item(), rtol=1e-6)
    # brute force with the same permutations: Freedman-Lane, refitting every region each time
    permutations = permutation_test(values, design, test.matrix[0], n_permutations=500, random_seed=4,
                                    inference=("maxt",)).permutations
    nuisance = design[["age"]].assign(mean=1.0).to_numpy()
    residuals = values - nuisance @ np.linalg.lstsq(nuisance, values, rcond=None)[0]
    null_max = []
    for perm in permutations:  # row i of the design replaced by row perm[i] (fcflow.permutation)
        t = [sm.OLS(residuals[:, r], design.to_numpy()[perm]).fit().t_test(test.matrix).tvalue.item()
             for r in range(n_regions)]
        null_max.append(np.max(np.abs(t)))
    null_max = np.asarray(null_max)
    expected = [(null_max >= abs(t) - 1e-6).mean() for t in table["stat"]]
    np.testing.assert_allclose(table["p_fwe"], expected, atol=1e-12)
    assert np.all(table["p_fwe"] >= table["p_uncorrected"])
    order = np.argsort(-np.abs(table["stat"].to_numpy()))
    assert np.all(np.diff(table["p_fwe"].to_numpy()[order]) >= 0)


def _planted(rng, n_per_group: int, n_regions: int, region: int, d: float) -> np.ndarray:
    """Region values, N(0, 1), with region ``region`` raised by exactly ``d`` pooled SDs in group b."""
    values = rng.normal(size=(2 * n_per_group, n_regions))
    a, b = values[:n_per_group, region], values[n_per_group:, region]
    a[:], b[:] = a - a.mean(), b - b.mean()
    pooled = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    a /= pooled
    b /= pooled
    b += d
    return values


def test_planted_region_effect_survives_fwe_and_a_null_contrast_finds_nothing():
    rng = np.random.default_rng(2)
    n, n_regions = 10, 8
    groups = ("a", "b", "c")
    values = np.vstack([_planted(rng, n, n_regions, region=5, d=1.5), rng.normal(size=(n, n_regions))])
    design = make_group_design([g for g in groups for _ in range(n)], list(groups))
    found = run_region_inference(values, _regions(n_regions), design,
                                 _t_test("bMinusA", design.columns, {"b": 1.0, "a": -1.0}),
                                 n_permutations=1000, two_sided=True, random_seed=0,
                                 variance_groups=[g for g in groups for _ in range(n)])
    assert found["p_fwe"][5] < 0.05
    assert list(found.index[found["p_fwe"] < 0.05]) == [5]
    assert found["q_fdr"][5] < 0.05
    null = run_region_inference(values, _regions(n_regions), design,
                                _t_test("cMinusA", design.columns, {"c": 1.0, "a": -1.0}),
                                n_permutations=1000, two_sided=True, random_seed=0,
                                variance_groups=[g for g in groups for _ in range(n)])
    assert (null["p_fwe"] >= 0.05).all()


def test_region_family_keeps_fwe_under_the_null():
    # 200 independent null studies of 8 regions, 10 per group, the group level's default statistic
    # (WLS t with brain-wide group weights, sign flips): any p_fwe < 0.05 in about 5 % of them
    rng = np.random.default_rng(5)
    n, n_regions, n_studies = 10, 8, 200
    design = _two_group_design(n)
    test = _t_test("bMinusA", design.columns, {"b": 1.0, "a": -1.0})
    labels = ["a"] * n + ["b"] * n
    hits = 0
    for study in range(n_studies):
        values = rng.normal(size=(2 * n, n_regions))
        table = run_region_inference(values, _regions(n_regions), design, test, n_permutations=200,
                                     two_sided=True, random_seed=study, variance_groups=labels)
        hits += bool((table["p_fwe"] < 0.05).any())
    low, high = stats.binom.ppf([0.0005, 0.9995], n_studies, 0.05)
    assert low <= hits <= high, f"{hits} of {n_studies} null studies had a region at p_fwe < 0.05"


# ----------------------------------------------------------------------------------------------
def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_group_level_writes_region_tables_and_resumes(tmp_path):
    truth = write_first_level(tmp_path)
    labels = np.zeros(SHAPE, dtype=int)
    labels[:4], labels[4:] = 1, 2
    labels[_blob()] = 3
    image, table = _write_labels(tmp_path, labels, AFFINE, {1: "left part", 2: "right part", 3: "blob"})
    recipe = _recipe().replace(regions=RegionsConfig(atlas=str(image), labels=str(table), min_voxels=5))
    results = pd.read_csv(run_group_level(truth["out"], recipe, bids_dir=truth["bids"], command=["fcflow", "test"]),
                          sep="\t", keep_default_na=False)
    row = results.query("session_contrast == 'infusion - baseline' and group_contrast == 'ketamine - placebo'").iloc[0]
    assert row["region_table"].endswith("_contrast-ketamineMinusPlacebo_desc-correlation_regions.tsv")
    regions = pd.read_csv(truth["out"] / row["region_table"], sep="\t", keep_default_na=False, na_values=["n/a"])
    assert list(regions.columns) == REGION_COLUMNS
    assert regions.set_index("region").loc["blob", "p_fwe"] < 0.05
    assert regions.set_index("region").loc["left part", "p_fwe"] > 0.05
    assert int(row["n_significant_regions"]) == 1
    sidecar = (truth["out"] / row["region_table"].replace(".tsv", ".json")).read_text()
    assert "own family" in sidecar
    before = _hashes(truth["out"] / "group")
    run_group_level(truth["out"], recipe, bids_dir=truth["bids"], command=["fcflow", "test"])
    assert _hashes(truth["out"] / "group") == before
    # the group report lists the surviving region per test, or says none survives, with the bar chart
    from fcflow.reports.group import write_group_report

    html = write_group_report(truth["out"], recipe, bids_dir=truth["bids"], command=["fcflow"]).read_text()
    assert html.count("Regions (a second, declared family: 3 regions, max-T FWE") == len(results)
    assert "<td>blob</td>" in html and "No region survives p FWE &lt; 0.05" in html
    assert (truth["out"] / "group" / "figures" / Path(row["region_table"]).name.replace(".tsv", "_bars.png")).is_file()


def test_group_level_tests_only_the_declared_regions_and_records_them(tmp_path):
    truth = write_first_level(tmp_path, seed=2)
    labels = np.zeros(SHAPE, dtype=int)
    labels[:4], labels[4:] = 1, 2
    labels[_blob()] = 3
    image, table = _write_labels(tmp_path, labels, AFFINE, {1: "left part", 2: "right part", 3: "blob"})
    recipe = _recipe(methods=["maxt"], primary="maxt", n_permutations=100).replace(regions=RegionsConfig(
        atlas=str(image), labels=str(table), areas=("blob", "left *"), min_voxels=5))
    results = pd.read_csv(run_group_level(truth["out"], recipe, bids_dir=truth["bids"]), sep="\t",
                          keep_default_na=False)
    row = results.query("session_contrast == 'infusion - baseline' and group_contrast == 'ketamine - placebo'").iloc[0]
    regions = pd.read_csv(truth["out"] / row["region_table"], sep="\t", keep_default_na=False)
    assert list(regions["region"]) == ["left part", "blob"]
    sidecar = json.loads((truth["out"] / row["region_table"].replace(".tsv", ".json")).read_text())
    assert sidecar["Regions"]["areas"] == ["blob", "left *"]
    assert sidecar["Regions"]["declared_regions"] == ["left part", "blob"] and sidecar["Regions"]["n_regions"] == 2
    assert "the regions matching 'blob', 'left *' with at least 5 voxels" in sidecar["Family"]
    # a pattern that matches nothing stops the group level before any region table
    bad = recipe.replace(regions=RegionsConfig(atlas=str(image), labels=str(table), areas=("Blob",)))
    with pytest.raises(InputDataError, match=r"Got 'Blob', which matches none of its 3 regions, named like 'blob'"):
        run_group_level(truth["out"], bad, bids_dir=truth["bids"])


def test_region_level_without_julich_atlas_is_skipped_with_a_warning(tmp_path, caplog):
    truth = write_first_level(tmp_path, seed=1)
    recipe = _recipe(methods=["maxt"], primary="maxt", n_permutations=100)
    with caplog.at_level(logging.WARNING, logger="fcflow.group"):
        results = pd.read_csv(run_group_level(truth["out"], recipe, bids_dir=truth["bids"]), sep="\t",
                              keep_default_na=False)
    assert sum("Region level skipped" in r.getMessage() for r in caplog.records) == 1
    assert (results["region_table"] == "n/a").all()
