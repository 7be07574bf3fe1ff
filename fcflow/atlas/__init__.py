"""Julich-Brain v3.1 seeds: find or fetch the atlas, derive seed masks by area name, check them per run.

The study's seed is the pregenual anterior cingulate cortex (pgACC) as the Julich-Brain
cytoarchitectonic atlas v3.1 maps it: the areas ``Area p24ab (pACC)``, ``Area p24c (pACC)`` and
``Area p32 (pACC)``. nilearn's ``fetch_atlas_juelich`` is FSL's older Juelich histological atlas,
which has no anterior cingulate areas, so fcflow reads Julich-Brain itself.

Four modules:

* :mod:`fcflow.atlas.release`: the release and seed definitions, name checks, label tables;
* :mod:`fcflow.atlas.fetch`: the atlas files found, cached or downloaded;
* :mod:`fcflow.atlas.seeds`: seed masks by area name;
* :mod:`fcflow.atlas.seedqc`: per-run seed coverage and tSNR.

Three steps:

1. :func:`resolve_atlas_dir` finds the atlas files: a local copy the user names, fcflow's cache
   (verified against a SHA-256 manifest on every use), or a download from EBRAINS.
2. :func:`build_seed_mask` (and :func:`build_seed`, which keeps the provenance) turns area *names*
   into a binary mask on any reference grid: the label values come from the EBRAINS XML tables,
   never from constants, because they change between atlas versions.
3. :func:`seed_qc` intersects the seed with a run's brain mask and reports coverage and tSNR.

The atlas release (URLs, file names, citation, license) and the named seeds (``pgACC``, ``sgACC``,
...) are data, in ``atlases/julich_brain_v3.1.toml``. The atlas is licensed CC BY-NC-SA 4.0; fcflow
ships no atlas voxels.
"""
