"""Write Julich-Brain seed masks (pgACC by default) on a reference grid, with a provenance sidecar.

Look at the seed before running anything: each seed becomes a uint8 NIfTI mask and a JSON sidecar
(atlas, version, EBRAINS dataset id, files and SHA-256, areas and their label values, hemispheres,
rule, voxel count, volume, centre of mass in MNI mm), named like
``space-MNI152NLin2009cAsym_res-2_seed-pgACC_mask.nii.gz``.

The atlas (Julich-Brain v3.1, CC BY-NC-SA 4.0) comes from --julich-dir or $FCFLOW_JULICH_DIR, else
fcflow's cache ($FCFLOW_CACHE_DIR, default ~/.cache/fcflow), else a download from EBRAINS
($FCFLOW_JULICH_URL overrides the address).

examples:
  fcflow seeds -o seeds/ --resolution 2                       # pgACC on the 2 mm MNI grid
  fcflow seeds -o seeds/ --seed pgACCleft --seed sgACC --reference sub-01_..._bold.nii.gz
  fcflow seeds -o seeds/ --areas p24ab p32 "Area 33 (ACC)" --hemisphere left --seed-name myACC
  fcflow seeds --list
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from fcflow.atlas import fetch as atlas_fetch
from fcflow.atlas import release as atlas_release
from fcflow.atlas import seeds as atlas_seeds
from fcflow.config import load_recipe
from fcflow.errors import InputDataError
from fcflow.io import save_img, write_json
from fcflow.templates import MNI_SPACE, mni_grid

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fcflow seeds`` options to ``parser``."""
    parser.add_argument("-o", "--output-dir", type=Path,
                        help="folder for the masks and sidecars (required unless --list)")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--reference", type=Path, metavar="FILE",
                      help="image whose grid the masks take (e.g. a BOLD run in MNI152NLin2009cAsym)")
    grid.add_argument("--resolution", type=float, metavar="MM",
                      help="MNI152NLin2009cAsym grid at this voxel size (default: 2)")
    what = parser.add_argument_group("seeds")
    what.add_argument("--seed", action="append", default=[], metavar="NAME",
                      help="named seed from atlases/julich_brain_v3.1.toml (repeatable; default: pgACC)")
    what.add_argument("--areas", nargs="+", metavar="AREA",
                      help="custom seed: Julich-Brain area names, e.g. 'Area p24ab (pACC)' or p24ab")
    what.add_argument("--hemisphere", choices=("left", "right", "both"), default="both",
                      help="hemispheres of the --areas seed (default: both)")
    what.add_argument("--seed-name", default="custom", help="name of the --areas seed (default: custom)")
    what.add_argument("--source", choices=("mpm", "pmap"),
                      help="mpm: maximum probability map labels; pmap: probability maps >= threshold "
                           "(default: the seed definition's rule, mpm for custom seeds)")
    what.add_argument("--pmap-threshold", type=float, metavar="P",
                      help="probability threshold for --source pmap (default: the definition's, 0.5)")
    what.add_argument("--seeds-file", type=Path, metavar="TOML",
                      help="read seed definitions from this file instead of fcflow's")
    what.add_argument("--recipe", metavar="RECIPE",
                      help="write the seeds of this study recipe (a TOML file or a shipped recipe's name)")
    what.add_argument("--list", action="store_true", help="list the named seeds and exit")
    src = parser.add_argument_group("atlas")
    src.add_argument("--julich-dir", type=Path, metavar="DIR",
                     help="local copy of the Julich-Brain v3.1 files (flat or in EBRAINS' layout)")
    src.add_argument("--cache-dir", type=Path, metavar="DIR",
                     help="fcflow's cache (default: $FCFLOW_CACHE_DIR or ~/.cache/fcflow)")
    src.add_argument("--no-download", action="store_true",
                     help="use only --julich-dir or the cache; never download")


def run(args: argparse.Namespace) -> int:
    """Write the masks and sidecars; return 0."""
    definitions = atlas_release.load_seed_definitions(args.seeds_file)
    if args.list:
        for name, definition in definitions.items():
            print(f"{name:<14} {', '.join(definition.hemispheres):<12} {definition.rule:<5} "
                  f"{'; '.join(definition.areas)}")
        return 0
    if args.output_dir is None:
        raise InputDataError("'--output-dir' is required (where the masks are written).")

    seeds = [atlas_release.get_seed_definition(name, definitions) for name in args.seed]
    if args.recipe:
        recipe = load_recipe(args.recipe)
        seeds.extend(
            atlas_release.SeedDefinition(
                name=seed.name, areas=seed.areas, hemispheres=seed.hemispheres, rule=seed.source,
                pmap_threshold=seed.pmap_threshold, description=f"seed of recipe {recipe.name}",
            )
            for seed in recipe.seeds
        )
    if args.areas:
        seeds.append(atlas_release.SeedDefinition(
            name=args.seed_name, areas=tuple(args.areas),
            hemispheres=atlas_release.normalize_hemispheres(args.hemisphere),
            description="custom seed from the command line",
        ))
    if not seeds:
        seeds = [atlas_release.get_seed_definition("pgACC", definitions)]
    overrides = {}
    if args.source:
        overrides["rule"] = args.source
    if args.pmap_threshold is not None:
        overrides["pmap_threshold"] = args.pmap_threshold
    if overrides:
        seeds = [atlas_release.SeedDefinition(**{**_fields(s), **overrides}) for s in seeds]

    reference, prefix = _reference(args)
    pmap_areas = sorted({a for s in seeds if s.rule == "pmap" for a in s.areas})
    atlas_dir = atlas_fetch.resolve_atlas_dir(
        args.julich_dir, cache_dir=args.cache_dir, download=not args.no_download,
        with_pmaps_for=pmap_areas,
    )
    for definition in seeds:
        seed = atlas_seeds.build_seed_from_definition(atlas_dir, definition, reference)
        stem = args.output_dir / f"{prefix}seed-{definition.name}_mask"
        mask_file = save_img(seed.img, stem.with_name(stem.name + ".nii.gz"))
        write_json(stem.with_name(stem.name + ".json"), seed.to_sidecar())
        com = ", ".join(f"{c:.1f}" for c in seed.center_of_mass_mm)
        by_hemi = ", ".join(f"{h} {n}" for h, n in seed.n_voxels_by_hemisphere.items())
        logger.info("Wrote %s: %d voxels (%s), %.0f mm3, centre of mass (%s) mm",
                    mask_file, seed.n_voxels, by_hemi, seed.volume_mm3, com)
    return 0


def _fields(definition: atlas_release.SeedDefinition) -> dict:
    return {f: getattr(definition, f) for f in
            ("name", "areas", "hemispheres", "rule", "pmap_threshold", "description")}


def _reference(args: argparse.Namespace) -> tuple[nib.Nifti1Image | Path, str]:
    """The reference grid and the BIDS prefix (``space-..._res-..._``) of the output names."""
    if args.reference is None:
        resolution = 2.0 if args.resolution is None else args.resolution
        if not resolution > 0:
            raise InputDataError(f"'--resolution' must be a positive number of mm. Got {resolution!r}.")
        shape, affine = mni_grid(resolution)
        res = f"{resolution:g}".replace(".", "p")
        return nib.Nifti1Image(np.zeros(shape, dtype=np.uint8), affine), f"space-{MNI_SPACE}_res-{res}_"
    if not args.reference.is_file():
        raise InputDataError(f"'--reference' must be an existing image file. Got {str(args.reference)!r}.")
    space = atlas_release.space_entity(args.reference)
    if space is not None and space != MNI_SPACE:
        raise InputDataError(
            f"'--reference' {args.reference.name} is in space {space!r}, but the Julich-Brain atlas "
            f"is in {MNI_SPACE}: use a reference in {MNI_SPACE}."
        )
    if space is None:
        logger.warning("The reference %s has no space- entity in its name; assuming it is in %s.",
                       args.reference.name, MNI_SPACE)
    res = re.search(r"(?:^|_)res-([a-zA-Z0-9]+)", args.reference.name)
    return args.reference, f"space-{MNI_SPACE}_" + (f"res-{res.group(1)}_" if res else "")
