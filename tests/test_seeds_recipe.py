"""Seeds declared in a study recipe: left-only, right-only and another area set (real atlas)."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np

from fcflow.cli import main
from fcflow.resources import recipe_file

_SEEDS = """
[seeds.pgACC]
areas = ["Area p24ab (pACC)", "Area p24c (pACC)", "Area p32 (pACC)"]

[seeds.pgACCleft]
areas = ["Area p24ab (pACC)", "Area p24c (pACC)", "Area p32 (pACC)"]
hemispheres = ["left"]

[seeds.pgACCright]
areas = ["Area p24ab (pACC)", "Area p24c (pACC)", "Area p32 (pACC)"]
hemispheres = ["right"]

[seeds.sgACC]
areas = ["Area s24 (sACC)", "Area s32 (sACC)", "Area 25 (sACC)"]
"""


def _recipe_with_seeds(tmp_path):
    text = recipe_file("weigner2025_pgacc").read_text()
    text = re.sub(r"\[seeds\.pgACC\].*?(?=\n\[denoising\])", _SEEDS.strip() + "\n", text, flags=re.S)
    path = tmp_path / "four_seeds.toml"
    path.write_text(text)
    return path


def test_recipe_seeds_left_right_and_subgenual(tmp_path, julich_dir):
    out = tmp_path / "seeds"
    status = main(["seeds", "-o", str(out), "--resolution", "2", "--recipe", str(_recipe_with_seeds(tmp_path)),
                   "--julich-dir", str(julich_dir), "--no-download"])
    assert status == 0
    masks = {}
    for name in ("pgACC", "pgACCleft", "pgACCright", "sgACC"):
        img = nib.load(out / f"space-MNI152NLin2009cAsym_res-2_seed-{name}_mask.nii.gz")
        masks[name] = np.asanyarray(img.dataobj).astype(bool)
        assert masks[name].sum() > 100, name
    affine = img.affine
    # Hemispheres split at the midline and add up to the bilateral seed.
    assert not (masks["pgACCleft"] & masks["pgACCright"]).any()
    np.testing.assert_array_equal(masks["pgACCleft"] | masks["pgACCright"], masks["pgACC"])
    x_left = (affine @ np.r_[np.argwhere(masks["pgACCleft"]).mean(0), 1])[0]
    x_right = (affine @ np.r_[np.argwhere(masks["pgACCright"]).mean(0), 1])[0]
    assert x_left < -2 and x_right > 2
    # The subgenual ACC lies below and behind the pregenual ACC and does not overlap it.
    assert not (masks["sgACC"] & masks["pgACC"]).any()
    z_sg = (affine @ np.r_[np.argwhere(masks["sgACC"]).mean(0), 1])[2]
    z_pg = (affine @ np.r_[np.argwhere(masks["pgACC"]).mean(0), 1])[2]
    assert z_sg < z_pg - 10
