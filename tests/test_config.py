"""Recipe reading and validation (fcflow.config)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from fcflow.config import (
    Recipe,
    contrast_label,
    contrast_pairs,
    load_recipe,
    recipe_from_dict,
)
from fcflow.errors import InputDataError, RecipeError
from fcflow.resources import recipe_file

SHIPPED = recipe_file("weigner2025_pgacc")


def _shipped_dict() -> dict:
    with open(SHIPPED, "rb") as handle:
        return tomllib.load(handle)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def _edited(tmp_path: Path, old: str, new: str) -> Path:
    text = SHIPPED.read_text()
    assert old in text, f"fixture out of date: {old!r} not in the shipped recipe"
    return _write(tmp_path, text.replace(old, new, 1))


def test_shipped_recipe_is_the_weigner_design():
    recipe = load_recipe(SHIPPED)
    assert isinstance(recipe, Recipe)
    assert recipe.groups == ("placebo", "ketamine", "lamotrigine_ketamine")
    assert recipe.sessions == ("baseline", "infusion", "24h")
    assert recipe.reference_session == "baseline"
    assert recipe.task("rest").measures == ("correlation",)
    assert (recipe.task("rest").high_pass, recipe.task("rest").low_pass) == (0.01, 0.08)
    nback = recipe.task("nback")
    assert nback.measures == ("gppi", "background")
    assert nback.conditions == ("0back", "2back")
    assert nback.low_pass is None
    assert nback.condition_contrasts[0].vector(nback.conditions) == [-1.0, 1.0]
    (seed,) = recipe.seeds
    assert seed.name == "pgACC"
    assert seed.areas == ("Area p24ab (pACC)", "Area p24c (pACC)", "Area p32 (pACC)")
    assert seed.hemispheres == ("left", "right")
    assert [c.expression for c in recipe.session_contrasts] == ["infusion - baseline", "24h - baseline"]
    assert [c.vector(recipe.groups) for c in recipe.group_contrasts] == [
        [-1.0, 1.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 1.0, -1.0]
    ]
    assert recipe.f_tests[0].groups == recipe.groups
    assert recipe.inference.n_permutations == 5000


def test_recipe_is_frozen_and_fingerprint_tracks_settings():
    recipe = load_recipe(SHIPPED)
    with pytest.raises(AttributeError):
        recipe.name = "other"  # type: ignore[misc]
    data = _shipped_dict()
    data["inference"]["n_permutations"] = 1000
    changed = recipe_from_dict(data)
    assert changed.fingerprint() != recipe.fingerprint()
    assert recipe_from_dict(_shipped_dict()).fingerprint() == recipe.fingerprint()


def test_shipped_name_resolves(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert load_recipe("weigner2025_pgacc").name == "weigner2025_pgacc"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        # unknown key, with the close match
        ("n_compcor = 5", "n_compcorr = 5",
         r"recipe\.toml: \[denoising\] has an unknown key 'n_compcorr'.*Did you mean 'n_compcor'"),
        # wrong type
        ("n_permutations = 5000", 'n_permutations = "many"',
         r"\[inference\] 'n_permutations' must be an integer of at least 100\. Got 'many'\."),
        # bad filter band
        ("high_pass = 0.01", "high_pass = 0.1",
         r"\[tasks\.rest\] 'high_pass' must be lower than 'low_pass' \(0\.08 Hz\)\. Got 0\.1\."),
        # a contrast naming a group that does not exist
        ('"ketamine - placebo"', '"ketamine - saline"',
         r"\[contrasts\] 'groups' must be contrasts of \['placebo', 'ketamine', "
         r"'lamotrigine_ketamine'\].*'saline'.*Got 'ketamine - saline'\."),
        # a missing group: the contrasts name it, the levels do not
        ('levels = ["placebo", "ketamine", "lamotrigine_ketamine"]', 'levels = ["placebo", "ketamine"]',
         r"'lamotrigine_ketamine'"),
        ('strategy = "24P+aCompCor"', 'strategy = "24p"',
         r"\[denoising\] 'strategy' must be one of \[.*\]\. Got '24p'\. Did you mean '24P'\?"),
        ('reference = "baseline"', 'reference = "pre"',
         r"\[sessions\] 'reference' must be one of \['baseline', 'infusion', '24h'\]\. Got 'pre'\."),
        ('primary = "tfce"', 'primary = "bonferroni"',
         r"\[inference\] 'primary' must be one of the inferences in 'methods'"),
        ('"infusion - baseline"', '"infusion + baseline"', r"weights sum to 0"),
        ('min_coverage = 0.8', 'min_coverage = 1.5',
         r"\[seeds\.pgACC\] 'min_coverage' must be a fraction between 0 and 1\. Got 1\.5\."),
        ('hemispheres = ["left", "right"]', 'hemispheres = ["left", "centre"]',
         r"'hemispheres' must be one of \['left', 'right'\]\. Got 'centre'\."),
        ('measures = ["gppi", "background"]', 'measures = ["gppi", "psychophysiological"]',
         r"\[tasks\.nback\] 'measures' must be one of"),
        ('conditions = ["0back", "2back"]', 'conditions = ["0back", "3back"]',
         r"\[tasks\.nback\] 'condition_contrasts'.*'2back'"),
    ],
)
def test_bad_recipes_name_file_key_expectation_and_value(tmp_path, old, new, message):
    path = _edited(tmp_path, old, new)
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_missing_section_and_key(tmp_path):
    text = SHIPPED.read_text()
    no_seeds = re.sub(r"\[seeds\.pgACC\].*?(?=\n\[denoising\])", "", text, flags=re.S)
    with pytest.raises(RecipeError, match=r"\[seeds\] must be a table with at least one seed"):
        load_recipe(_write(tmp_path, no_seeds))
    no_levels = text.replace('levels = ["baseline", "infusion", "24h"]\n', "")
    with pytest.raises(RecipeError, match=r"\[sessions\] 'levels' must be given .* Got 'nothing'\. Add it\."):
        load_recipe(_write(tmp_path, no_levels))


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe\.toml: is not valid TOML .*line 1"):
        load_recipe(_write(tmp_path, "[study\nname = 1"))
    with pytest.raises(RecipeError, match=r"does not exist: check the path given to --recipe"):
        load_recipe(tmp_path / "nope.toml")


def test_task_measure_without_conditions(tmp_path):
    path = _edited(tmp_path, 'conditions = ["0back", "2back"]\ncondition_contrasts = ["2back - 0back"]\n', "")
    with pytest.raises(RecipeError, match=r"\[tasks\.nback\] 'conditions' must be the event conditions"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a - b", (("a", 1.0), ("b", -1.0))),
        ("-a", (("a", -1.0),)),
        ("0.5*a + 0.5 * b - c", (("a", 0.5), ("b", 0.5), ("c", -1.0))),
        ("2back - 0back", (("0back", -1.0), ("2back", 1.0))),
    ],
)
def test_contrast_pairs(text, expected):
    assert contrast_pairs(text, ["a", "b", "c", "0back", "2back"]) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("a b", "must be a sum of terms"), ("a - a", "non-zero weight"), ("a - d", "names 'd', which is not"),
     ("", "at least one"), ("a -", "must be a sum of terms")],
)
def test_contrast_pairs_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        contrast_pairs(text, ["a", "b", "c"])


def test_contrast_label_is_a_bids_label():
    assert contrast_label("infusion - baseline") == "infusionMinusBaseline"
    assert contrast_label("lamotrigine_ketamine - placebo") == "lamotrigineKetamineMinusPlacebo"
    assert re.fullmatch(r"[A-Za-z0-9]+", contrast_label("0.5*a + 0.5*b - c"))


def test_zero_switches_censoring_off(tmp_path):
    path = _edited(tmp_path, "fd_threshold_mm = 0.5", "fd_threshold_mm = 0")
    recipe = load_recipe(path)
    assert recipe.denoising.fd_threshold_mm is None
    assert recipe.denoising.std_dvars_threshold == 1.5
    with pytest.raises(RecipeError, match=r"'max_mean_fd_mm' must be a positive number in mm, or 0 to switch it off\. Got -1"):
        load_recipe(_edited(tmp_path, "max_mean_fd_mm = 0.5", "max_mean_fd_mm = -1"))


def test_seed_from_a_mask_file(tmp_path):
    import nibabel as nib
    import numpy as np

    from fcflow.atlas.seedqc import seed_from_mask_file

    text = SHIPPED.read_text()
    block = text[text.index("[seeds.pgACC]"):text.index("[denoising]")]
    mask = np.zeros((7, 8, 9), dtype=np.uint8)
    mask[2:4, 3:5, 4:6] = 1
    nib.Nifti1Image(mask, np.diag([2.0, 2.0, 2.0, 1.0])).to_filename(tmp_path / "myseed.nii.gz")
    path = _write(tmp_path, text.replace(block, '[seeds.mine]\nmask = "myseed.nii.gz"\n\n'))
    (seed,) = load_recipe(path).seeds
    assert seed.mask == str(tmp_path / "myseed.nii.gz") and seed.areas == ()
    # Onto a grid of half the resolution, by nearest neighbour.
    reference = nib.Nifti1Image(np.zeros((14, 16, 18), dtype=np.uint8), np.diag([1.0, 1.0, 1.0, 1.0]))
    img, sidecar = seed_from_mask_file(seed.mask, reference, name="mine")
    assert img.shape == (14, 16, 18) and sidecar["NumberOfVoxels"] == 8 * 8
    assert "StandIn" not in sidecar  # no sidecar beside the mask: nothing claimed
    # a sidecar that declares a stand-in (the simulator's pgACC sphere) is carried into the provenance
    (tmp_path / "myseed.json").write_text('{"Description": "STAND-IN pgACC sphere", "Type": "stand-in sphere"}')
    _, sidecar = seed_from_mask_file(seed.mask, reference, name="mine")
    assert sidecar["StandIn"] is True and sidecar["MaskDescription"] == "STAND-IN pgACC sphere"
    (tmp_path / "myseed.json").write_text('{"Description": "my ROI", "Type": "manual tracing"}')
    assert seed_from_mask_file(seed.mask, reference, name="mine")[1]["StandIn"] is False
    (tmp_path / "myseed.json").write_text("{not json")
    with pytest.raises(InputDataError, match=r"myseed\.json is not valid JSON"):
        seed_from_mask_file(seed.mask, reference, name="mine")
    missing = _write(tmp_path, text.replace(block, '[seeds.mine]\nmask = "nope.nii.gz"\n\n'))
    with pytest.raises(RecipeError, match=r"\[seeds\.mine\] 'mask' must be a NIfTI mask file .*nope\.nii\.gz does not exist"):
        load_recipe(missing)
    both = _write(tmp_path, text.replace(block, '[seeds.mine]\nmask = "myseed.nii.gz"\nareas = ["x"]\n\n'))
    with pytest.raises(RecipeError, match=r"'areas' must be absent when 'mask' gives the seed"):
        load_recipe(both)


def _without_regions() -> str:
    """The shipped recipe without its [regions] table (the last one), to append another."""
    text = SHIPPED.read_text()
    assert text.count("\n[regions]\n") == 1 and "\n[" not in text.split("\n[regions]\n")[1]
    return text.split("\n[regions]\n")[0]


def test_regions_table_defaults_and_a_label_image(tmp_path):
    from fcflow.config import RegionsConfig

    assert load_recipe(_write(tmp_path, _without_regions())).regions == RegionsConfig()
    assert RegionsConfig().areas == ("*",)
    (tmp_path / "atlas.nii.gz").write_bytes(b"")
    (tmp_path / "atlas.tsv").write_text("index\tname\n1\tinsula\n")
    text = _without_regions() + '\n[regions]\natlas = "atlas.nii.gz"\nlabels = "atlas.tsv"\nmin_voxels = 5\n'
    regions = load_recipe(_write(tmp_path, text)).regions
    assert regions.atlas == str(tmp_path / "atlas.nii.gz") and regions.labels == str(tmp_path / "atlas.tsv")
    assert regions.min_voxels == 5 and regions.correction == "fwe" and regions.enabled and regions.areas == ("*",)
    declared = _without_regions() + '\n[regions]\nareas = ["left * (Insula)", "* Area SFG2 (SFG)"]\n'
    assert load_recipe(_write(tmp_path, declared)).regions.areas == ("left * (Insula)", "* Area SFG2 (SFG)")


def test_shipped_recipe_declares_its_hypothesis_regions():
    # Weigner et al. 2025: pgACC-left insula at rest, pgACC-dmPFC in working memory
    areas = load_recipe(SHIPPED).regions.areas
    assert areas == ("left * (Insula)", "right * (Insula)", "* Area 8d1 (SFG)", "* Area SFG2 (SFG)",
                     "* Area SFG3 (SFG)")


@pytest.mark.parametrize(("table", "message"), [
    ('min_voxels = 0', r"\[regions\] 'min_voxels' must be a positive integer\. Got 0\."),
    ('correction = "bonferroni"', r"\[regions\] 'correction' must be one of \['fwe', 'fdr'\]\. Got 'bonferroni'"),
    ('atlas = "nope.nii.gz"\nlabels = "x.tsv"', r"\[regions\] 'atlas' must be 'julich-brain-3.1' or a NIfTI image "
                                                r"of integer labels .*Got 'nope\.nii\.gz'\. .*does not exist"),
    ('atlas = "atlas.nii.gz"', r"\[regions\] 'labels' must be a TSV with columns 'index' and 'name' .*Got 'nothing'"),
    ('labels = "atlas.tsv"', r"\[regions\] 'labels' must be absent when 'atlas' is 'julich-brain-3.1'"),
    ('enabled = "yes"', r"\[regions\] 'enabled' must be true or false\. Got 'yes'\."),
    ('areas = "left *"', r"\[regions\] 'areas' must be a non-empty list of non-empty region name patterns "
                         r"\(shell-style, case-sensitive, with the hemisphere: \[\"left \* \(Insula\)\"\]; "
                         r"\[\"\*\"\]: all\)\. Got 'left \*'\."),
    ('areas = []', r"\[regions\] 'areas' must be a non-empty list of non-empty region name patterns .*Got \(\)\."),
    ('areas = ["left *", " "]', r"\[regions\] 'areas' must be a non-empty list .*Got \('left \*', ' '\)\."),
    ('areas = ["left *", 1]', r"\[regions\] 'areas' must be a non-empty list .*Got \['left \*', 1\]\."),
])
def test_bad_regions_table(tmp_path, table, message):
    (tmp_path / "atlas.nii.gz").write_bytes(b"")
    (tmp_path / "atlas.tsv").write_text("index\tname\n1\tinsula\n")
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, _without_regions() + f"\n[regions]\n{table}\n"))
