"""A methods paragraph built only from the resolved recipe, the software and the atlas release.

Every number and name in the text comes from one of three places: the :class:`~fcflow.config.Recipe`
the analysis ran with (after command-line overrides such as ``--n-permutations``), the versions of
the software that ran it, and the atlas release file (``atlases/julich_brain_v3.1.toml``). Fixed
wording that describes what a setting means (the 24 parameters of "24P", TFCE's exponents read from
:func:`fcflow.permutation.permutation_test`'s defaults) is part of the software. Nothing is taken
from the data, so the paragraph describes the analysis, not its results; a test changes recipe
values and checks that the paragraph follows.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcflow.config import PERMUTATION_INFERENCES, Recipe
from fcflow.derivatives import software_versions

__all__ = ["STRATEGY_TEXT", "INFERENCE_TEXT", "REFERENCES", "Reference", "references_for", "software_versions",
           "describe_methods", "write_bibtex"]

#: What each denoising strategy regresses (fixed by fcflow.denoise.DENOISING_STRATEGIES).
STRATEGY_TEXT = {
    "none": "no confound regressors",
    "24P": "the 24-parameter motion model (the 6 rigid-body parameters, their temporal derivatives and the "
           "squares of both)",
    "24P+aCompCor": "the 24-parameter motion model (the 6 rigid-body parameters, their temporal derivatives "
                    "and the squares of both), the first {n_compcor} anatomical CompCor components of the "
                    "combined white-matter and CSF mask, and fMRIPrep's discrete cosine regressors",
    "6P+aCompCor": "the 6 rigid-body motion parameters, the first {n_compcor} anatomical CompCor components "
                   "of the combined white-matter and CSF mask, and fMRIPrep's discrete cosine regressors",
    "36P": "the 36-parameter model (the 6 rigid-body parameters and the mean white-matter, CSF and global "
           "signals, with their temporal derivatives and the squares of all)",
    "ICA-AROMA": "the mean white-matter and CSF signals and fMRIPrep's discrete cosine regressors, on "
                 "fMRIPrep's non-aggressively ICA-AROMA-denoised data",
}

#: Names of the inference methods in prose.
INFERENCE_TEXT = {
    "tfce": "threshold-free cluster enhancement (TFCE)",
    "maxt": "the voxel-wise maximum statistic (max-T)",
    "cluster_mass": "cluster mass",
    "cluster_size": "cluster size",
    "fdr": "the Benjamini-Hochberg false discovery rate",
    "bonferroni": "Bonferroni correction",
    "cluster_extent": "a cluster-extent rule",
}
_PERMUTATION = PERMUTATION_INFERENCES
_MEASURE_TEXT = {
    "correlation": "the Pearson correlation of the cleaned seed signal with every voxel, Fisher z-transformed",
    "background": "background connectivity (the same correlation after regressing the HRF-convolved task "
                  "regressors out of seed and voxels), Fisher z-transformed",
    "gppi": "generalised psychophysiological interaction (gPPI, without deconvolution of the seed)",
}


def _join(items: Sequence[str], last: str = "and") -> str:
    items = [str(i) for i in items]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {last} " + items[-1]


def _quoted(items: Sequence[str]) -> str:
    return _join([f"'{i}'" for i in items])


def _seed_sentence(recipe: Recipe, atlas: Any | None) -> str:
    sentences = []
    for seed in recipe.seeds:
        if seed.mask is not None:
            where = f"the user-supplied mask {seed.mask.rsplit('/', 1)[-1]}"
        else:
            hemis = _join(list(seed.hemispheres))
            if seed.source == "pmap":
                rule = (f"the union of the probability maps of {_quoted(seed.areas)} ({hemis} hemisphere"
                        f"{'s' if len(seed.hemispheres) > 1 else ''}), each resampled to the data grid and "
                        f"thresholded at p >= {seed.pmap_threshold:g}")
            else:
                rule = (f"the union of the maximum-probability-map labels {_quoted(seed.areas)} ({hemis} "
                        f"hemisphere{'s' if len(seed.hemispheres) > 1 else ''})")
            if atlas is not None:
                where = f"{rule} of the {atlas.name} v{atlas.version} ({atlas.n_areas} areas)"
            else:
                where = f"{rule} of the atlas {seed.atlas}"
        signal = "mean" if seed.signal == "mean" else "first eigenvariate"
        sentences.append(
            f"The seed {seed.name} was {where}, resampled to each run's grid; its signal was the {signal} of "
            f"its voxels inside the brain mask, and a run in which less than a fraction {seed.min_coverage:g} "
            f"of the seed lay inside the brain mask was excluded."
        )
    return " ".join(sentences)


def _denoising_sentence(recipe: Recipe) -> str:
    d = recipe.denoising
    regressors = STRATEGY_TEXT[d.strategy].format(n_compcor=d.n_compcor)
    text = (f"Confounds were selected from fMRIPrep's confounds table with nilearn's load_confounds "
            f"(strategy {d.strategy}: {regressors}).")
    censor = []
    if d.fd_threshold_mm is not None:
        censor.append(f"framewise displacement above {d.fd_threshold_mm:g} mm")
    if d.std_dvars_threshold is not None:
        censor.append(f"standardised DVARS above {d.std_dvars_threshold:g}")
    if censor:
        text += f" Volumes with {_join(censor, 'or')} were censored"
        if d.scrub_min_segment:
            text += f", together with segments of fewer than {d.scrub_min_segment} consecutive uncensored volumes"
        text += "."
    if d.drop_nonsteady or censor:
        text += " Non-steady-state volumes flagged by fMRIPrep were discarded."
    exclude = [f"fewer than {d.min_volumes} volumes remained"]
    if d.max_mean_fd_mm is not None:
        exclude.append(f"the mean framewise displacement exceeded {d.max_mean_fd_mm:g} mm")
    text += f" A run was excluded when {_join(exclude, 'or')}."
    filters = []
    for task in recipe.tasks:
        if task.high_pass is not None and task.low_pass is not None:
            filters.append(f"band-pass filtered at {task.high_pass:g}-{task.low_pass:g} Hz for task {task.name}")
        elif task.high_pass is not None:
            filters.append(f"high-pass filtered at {task.high_pass:g} Hz for task {task.name}")
        elif task.low_pass is not None:
            filters.append(f"low-pass filtered at {task.low_pass:g} Hz for task {task.name}")
        else:
            filters.append(f"not filtered for task {task.name}")
    steps = ("linearly detrended, " if d.detrend else "") + _join(filters)
    filtered = any(t.high_pass is not None or t.low_pass is not None for t in recipe.tasks)
    if d.filter == "dct":
        if filtered:
            steps += (" (a projection onto the discrete cosines of the band, fitted on the "
                      + ("uncensored volumes only, without interpolation" if censor else "kept volumes")
                      + ")")
        text += (f" Signals were {steps}; the in-band part of the confounds was regressed out in the same fit "
                 "(simultaneous filtering and nuisance regression, as Lindquist et al. recommend), the whole cleaning "
                 "being applied as one linear operator.")
    else:
        if filtered:
            steps += (" (Butterworth filter, with censored volumes interpolated before and removed after filtering)"
                      if censor else " (Butterworth filter)")
        scaling = "z-scored" if d.standardize_confounds else "scaled by their maximum"
        text += (f" Signals were {steps}, and the confounds ({scaling}) were put through the same steps and "
                 f"regressed out, the whole cleaning being applied as one linear operator.")
    text += (f" A run was also excluded when a measure kept fewer than {d.min_dof:g} effective degrees of "
             "freedom (for a correlation, the number of independent volumes with the same null distribution; for "
             "gPPI, the Worsley-Friston degrees of freedom of its t statistics), or when its task conditions "
             "were empty after censoring, identical or collinear.")
    return text


def _measures_sentence(recipe: Recipe) -> str:
    parts = []
    for task in recipe.tasks:
        measures = []
        for measure in task.measures:
            text = _MEASURE_TEXT[measure]
            if measure == "gppi":
                contrasts = [c.expression for c in task.condition_contrasts]
                text += (f" (conditions {_quoted(task.conditions)}"
                         + (f"; condition contrast{'s' if len(contrasts) > 1 else ''} {_quoted(contrasts)}"
                            if contrasts else "") + "; confounds in the model)")
            measures.append(text)
        parts.append(f"for task {task.name}, {_join(measures)}")
    text = "Seed-to-voxel maps were computed per run: " + "; ".join(parts) + "."
    fwhm = recipe.denoising.smoothing_fwhm
    if fwhm is not None:
        text += (f" The maps were smoothed with a Gaussian kernel of {fwhm:g} mm FWHM (nilearn's smooth_img, "
                 "within the brain mask); the seed signal was taken from the unsmoothed data.")
    return text


def _group_sentence(recipe: Recipe, inference: Mapping[str, Any]) -> str:
    session_contrasts = [c.expression for c in recipe.session_contrasts]
    text = (f"At the group level, each subject's within-subject session contrast ({_quoted(session_contrasts)}) "
            f"of the maps (Fisher z; the gPPI interaction beta of each condition contrast) entered a general "
            f"linear model with one column per group ({_quoted(recipe.groups)})")
    covariates = list(recipe.inference.covariates)
    if covariates:
        named = [("the same session contrast of the subject's mean framewise displacement (its change in motion)"
                  if c == "mean_fd" else c) for c in covariates]
        text += f" and the demeaned covariates {_join(named)}"
    text += "."
    tests = [f"'{c.expression}'" for c in recipe.group_contrasts]
    tests += [f"an F test of {_quoted(f.groups)}" for f in recipe.f_tests]
    sided = "two-sided" if recipe.inference.two_sided else "one-sided"
    text += (f" The tests were the group contrasts {_join(tests)} ({sided} t tests); the same tests were run on "
             f"the {recipe.reference_session} session's maps (baseline equivalence).")
    inf = recipe.inference
    primary = INFERENCE_TEXT[inf.primary]
    others = [INFERENCE_TEXT[m] for m in inf.methods if m != inf.primary]
    if inf.variance_groups == "auto":
        if inf.group_variances == "brain":
            text += (" Each group was its own variance group: the statistic was the weighted least-squares t (F for "
                     "F tests) with one residual variance ratio per group for the whole map, and subjects were "
                     "sign-flipped rather than permuted between groups, which keeps the error rate when groups "
                     "differ in variance (Winkler et al. 2014).")
        else:
            text += (" Each group was its own variance group: the statistic was Winkler's v (G for F tests), with "
                     "each group's residual variance at every voxel, and subjects were sign-flipped rather than "
                     "permuted between groups (Winkler et al. 2014).")
    else:
        text += " All subjects shared one residual variance (ordinary least squares)."
    if covariates:
        text += (f" Covariates with a variance inflation factor above {inf.max_vif:g} were flagged in the "
                 "results.")
    scheme = "sign flipping" if inf.variance_groups == "auto" else "Freedman-Lane"
    if inf.primary in _PERMUTATION:
        text += (f" Family-wise error was controlled with {primary} by permutation ({scheme}, "
                 f"{inf.n_permutations} permutations, random seed {inf.random_seed}")
        if inf.primary == "tfce":
            text += (f"; E = {inference['tfce_extent_exponent']:g}, H = {inference['tfce_height_exponent']:g}, "
                     f"{inference['connectivity']}-connectivity")
        text += f") at alpha = {inf.alpha:g}."
    else:
        text += f" Significance was assessed with {primary} at alpha = {inf.alpha:g}."
    if others:
        text += f" Also reported: {_join(others)}"
        if {"cluster_mass", "cluster_size", "cluster_extent"} & set(inf.methods):
            text += f" (cluster-forming p = {inf.cluster_forming_p:g})"
        text += "."
    if inf.accel == "tail" and set(inf.methods) & set(_PERMUTATION):
        text += (" Family-wise p values below 0.1 were refined with a generalised Pareto distribution fitted to the "
                 "upper tail of each permutation distribution of maxima (method of moments, tail start chosen by "
                 "an Anderson-Darling test; tail approximation of Winkler et al. 2016, NeuroImage).")
    if inf.family_wise == "contrasts" and set(inf.methods) & set(_PERMUTATION):
        text += (" Permutation p values were also corrected over all group tests of a map and session contrast, "
                 "each permutation's largest statistic taken over the tests on the z scale (Winkler et al. 2016).")
    if "fdr" in inf.methods and inf.fdr_p == "permutation":
        text += " The false discovery rate was controlled on the voxel-wise permutation p values."
    if inf.repeated_measures and len(recipe.sessions) >= 3 and len(recipe.groups) >= 2:
        ref = recipe.reference_session
        flips = ("by sign flips of whole subjects" if inf.variance_groups == "auto" else
                 "by permuting whole subjects between groups among subjects with the same sessions (sign flips of "
                 "whole subjects for the session main effect)")
        text += (f" Over all sessions ({_quoted(recipe.sessions)}), a repeated-measures model tested the group x "
                 f"session interaction and the session main effect (F tests): one row per subject and session other "
                 f"than {ref}, the subject's map minus its {ref} map, with one column per group and session; subjects "
                 f"missing a session other than {ref} were kept with the sessions they had. Subjects were "
                 f"exchangeability blocks, their rows moved together in every permutation ({flips}; Winkler et al. "
                 "2015), so no sphericity was assumed. The group main effect was tested on each subject's mean map "
                 "over all sessions (F test over the groups, subjects with every session).")
    regions = recipe.regions
    if regions.enabled:
        source = ("Julich-Brain area of both hemispheres (maximum probability maps)" if regions.labels is None
                  else f"label of {Path(regions.atlas).name}")
        if "*" not in regions.areas:
            # how many regions match is known only once the atlas is read: the count is in the tables
            sources = ("Julich-Brain areas of both hemispheres (maximum probability maps)" if regions.labels is None
                       else f"labels of {Path(regions.atlas).name}")
            source = f"of the declared regions matching {_quoted(regions.areas)} among the {sources}"
        text += (f" As a second, declared family, the same tests were run on each subject's mean map value over each "
                 f"{source} with at least {regions.min_voxels} voxels in the analysis mask, with the family-wise "
                 "error over the regions controlled by the permutation distribution of the maximum statistic "
                 "(same permutations) and the Benjamini-Hochberg false discovery rate also reported; regions were "
                 f"called significant by {'FWE' if regions.correction == 'fwe' else 'FDR'} at alpha = {inf.alpha:g}.")
    return text


def describe_methods(
    recipe: Recipe,
    *,
    versions: Mapping[str, str] | None = None,
    atlas: Any | None = None,
) -> dict[str, Any]:
    """Write the methods paragraph of an analysis.

    Parameters
    ----------
    recipe : Recipe
        The resolved recipe: the one the analysis ran with, command-line overrides applied.
    versions : mapping of str to str, optional
        Software name to version (default: :func:`software_versions`).
    atlas : fcflow.atlas.AtlasRelease, optional
        The atlas release (default: read from the shipped file when a seed uses the atlas).

    Returns
    -------
    dict
        ``paragraph`` (str), ``references`` (list of str: every paper and tool the paragraph names,
        :func:`references_for`, and the atlas release's citation), ``cited`` (the :class:`Reference`
        objects) and ``notes`` (the citations known only as text), for :func:`write_bibtex`.
    """
    from fcflow.permutation import permutation_test

    versions = dict(software_versions() if versions is None else versions)
    uses_atlas = any(seed.mask is None for seed in recipe.seeds)
    if atlas is None and uses_atlas:
        from fcflow.atlas.release import load_atlas_release

        atlas = load_atlas_release()
    defaults = {name: p.default for name, p in inspect.signature(permutation_test).parameters.items()}
    libraries = [f"{name} {versions[name]}" for name in ("nilearn", "nibabel", "nipype", "NumPy", "SciPy")
                 if name in versions]
    paragraph = " ".join([
        f"Seed-to-voxel functional connectivity was computed with fcflow {versions.get('fcflow', '')} "
        f"(Python {versions.get('Python', '')}; {_join(libraries)}) on fMRIPrep outputs in {recipe.space} space.",
        _seed_sentence(recipe, atlas if uses_atlas else None),
        _denoising_sentence(recipe),
        _measures_sentence(recipe),
        _group_sentence(recipe, {"tfce_extent_exponent": defaults["tfce_extent_exponent"],
                                 "tfce_height_exponent": defaults["tfce_height_exponent"],
                                 "connectivity": defaults["connectivity"]}),
    ])
    cited = references_for(recipe)
    # the atlas release's own citation (its data set), beside the Julich-Brain paper
    notes = [c for c in (atlas.citation if (atlas is not None and uses_atlas) else ())
             if REFERENCES["Amunts2020"].doi not in c]
    return {"paragraph": paragraph, "references": [r.text for r in cited] + notes, "cited": cited, "notes": notes}


@dataclass(frozen=True)
class Reference:
    """A paper or software the methods paragraph names: the text in the report and its BibTeX."""

    key: str
    kind: str  # BibTeX entry type
    authors: str  # "Last, F. and Last, F."
    year: int
    title: str
    journal: str
    volume: str = ""
    pages: str = ""
    doi: str = ""

    @property
    def text(self) -> str:
        names = [a.strip() for a in self.authors.split(" and ")]
        short = ", ".join(f"{n.split(',')[0]} {''.join(i[0] for i in n.split(',')[1].split())}" if "," in n else n
                          for n in names)
        where = f"{self.journal} {self.volume}:{self.pages}" if self.volume else self.journal
        return f"{short} ({self.year}) {self.title}. {where}." + (f" doi:{self.doi}" if self.doi else "")

    @property
    def bibtex(self) -> str:
        fields = {"author": self.authors, "year": str(self.year), "title": "{" + self.title + "}",
                  "journal": self.journal, "volume": self.volume, "pages": self.pages.replace("-", "--"),
                  "doi": self.doi}
        body = ",\n".join(f"  {k} = {{{v}}}" for k, v in fields.items() if v)
        return f"@{self.kind}{{{self.key},\n{body}\n}}"


def _ref(key: str, authors: str, year: int, title: str, journal: str, volume: str = "", pages: str = "",
         doi: str = "") -> Reference:
    return Reference(key, "article", authors, year, title, journal, volume, pages, doi)


#: Every paper and tool the methods paragraph can name, by key (:func:`references_for` picks them).
REFERENCES = {r.key: r for r in (
    _ref("Esteban2019", "Esteban, O. and Markiewicz, C. J. and Blair, R. W. and Moodie, C. A. and Isik, A. I. and "
         "Erramuzpe, A. and Kent, J. D. and Goncalves, M. and DuPre, E. and Snyder, M. and Oya, H. and Ghosh, S. S. "
         "and Wright, J. and Durnez, J. and Poldrack, R. A. and Gorgolewski, K. J.", 2019,
         "fMRIPrep: a robust preprocessing pipeline for functional MRI", "Nature Methods", "16", "111-116",
         "10.1038/s41592-018-0235-4"),
    _ref("Abraham2014", "Abraham, A. and Pedregosa, F. and Eickenberg, M. and Gervais, P. and Mueller, A. and "
         "Kossaifi, J. and Gramfort, A. and Thirion, B. and Varoquaux, G.", 2014,
         "Machine learning for neuroimaging with scikit-learn", "Frontiers in Neuroinformatics", "8", "14",
         "10.3389/fninf.2014.00014"),
    _ref("Gorgolewski2011", "Gorgolewski, K. and Burns, C. D. and Madison, C. and Clark, D. and Halchenko, Y. O. and "
         "Waskom, M. L. and Ghosh, S. S.", 2011, "Nipype: a flexible, lightweight and extensible neuroimaging data "
         "processing framework in Python", "Frontiers in Neuroinformatics", "5", "13", "10.3389/fninf.2011.00013"),
    _ref("Friston1996", "Friston, K. J. and Williams, S. and Howard, R. and Frackowiak, R. S. J. and Turner, R.", 1996,
         "Movement-related effects in fMRI time-series", "Magnetic Resonance in Medicine", "35", "346-355",
         "10.1002/mrm.1910350312"),
    _ref("Behzadi2007", "Behzadi, Y. and Restom, K. and Liau, J. and Liu, T. T.", 2007,
         "A component based noise correction method (CompCor) for BOLD and perfusion based fMRI", "NeuroImage",
         "37", "90-101", "10.1016/j.neuroimage.2007.04.042"),
    _ref("Satterthwaite2013", "Satterthwaite, T. D. and Elliott, M. A. and Gerraty, R. T. and Ruparel, K. and "
         "Loughead, J. and Calkins, M. E. and Eickhoff, S. B. and Hakonarson, H. and Gur, R. C. and Gur, R. E. and "
         "Wolf, D. H.", 2013, "An improved framework for confound regression and filtering for control of motion "
         "artifact in the preprocessing of resting-state functional connectivity data", "NeuroImage", "64",
         "240-256", "10.1016/j.neuroimage.2012.08.052"),
    _ref("Pruim2015", "Pruim, R. H. R. and Mennes, M. and van Rooij, D. and Llera, A. and Buitelaar, J. K. and "
         "Beckmann, C. F.", 2015, "ICA-AROMA: a robust ICA-based strategy for removing motion artifacts from fMRI "
         "data", "NeuroImage", "112", "267-277", "10.1016/j.neuroimage.2015.02.064"),
    _ref("Power2014", "Power, J. D. and Mitra, A. and Laumann, T. O. and Snyder, A. Z. and Schlaggar, B. L. and "
         "Petersen, S. E.", 2014, "Methods to detect, characterize, and remove motion artifact in resting state "
         "fMRI", "NeuroImage", "84", "320-341", "10.1016/j.neuroimage.2013.08.048"),
    _ref("Afyouni2018", "Afyouni, S. and Nichols, T. E.", 2018, "Insight and inference for DVARS", "NeuroImage",
         "172", "291-312", "10.1016/j.neuroimage.2017.12.098"),
    _ref("Lindquist2019", "Lindquist, M. A. and Geuter, S. and Wager, T. D. and Caffo, B. S.", 2019,
         "Modular preprocessing pipelines can reintroduce artifacts into fMRI data", "Human Brain Mapping", "40",
         "2358-2376", "10.1002/hbm.24528"),
    _ref("Worsley1995", "Worsley, K. J. and Friston, K. J.", 1995, "Analysis of fMRI time-series revisited - again",
         "NeuroImage", "2", "173-181", "10.1006/nimg.1995.1023"),
    _ref("McLaren2012", "McLaren, D. G. and Ries, M. L. and Xu, G. and Johnson, S. C.", 2012,
         "A generalized form of context-dependent psychophysiological interactions (gPPI): a comparison to "
         "standard approaches", "NeuroImage", "61", "1277-1286", "10.1016/j.neuroimage.2012.03.068"),
    _ref("AlAidroos2012", "Al-Aidroos, N. and Said, C. P. and Turk-Browne, N. B.", 2012,
         "Top-down attention switches coupling between low-level and high-level areas of human visual cortex",
         "Proceedings of the National Academy of Sciences", "109", "14675-14680", "10.1073/pnas.1202095109"),
    _ref("Nichols2002", "Nichols, T. E. and Holmes, A. P.", 2002, "Nonparametric permutation tests for functional "
         "neuroimaging: a primer with examples", "Human Brain Mapping", "15", "1-25", "10.1002/hbm.1058"),
    _ref("Smith2009", "Smith, S. M. and Nichols, T. E.", 2009, "Threshold-free cluster enhancement: addressing "
         "problems of smoothing, threshold dependence and localisation in cluster inference", "NeuroImage", "44",
         "83-98", "10.1016/j.neuroimage.2008.03.061"),
    _ref("Freedman1983", "Freedman, D. and Lane, D.", 1983, "A nonstochastic interpretation of reported "
         "significance levels", "Journal of Business and Economic Statistics", "1", "292-298",
         "10.1080/07350015.1983.10509354"),
    _ref("Benjamini1995", "Benjamini, Y. and Hochberg, Y.", 1995, "Controlling the false discovery rate: a practical "
         "and powerful approach to multiple testing", "Journal of the Royal Statistical Society: Series B", "57",
         "289-300", "10.1111/j.2517-6161.1995.tb02031.x"),
    _ref("Winkler2014", "Winkler, A. M. and Ridgway, G. R. and Webster, M. A. and Smith, S. M. and Nichols, T. E.",
         2014, "Permutation inference for the general linear model", "NeuroImage", "92", "381-397",
         "10.1016/j.neuroimage.2014.01.060"),
    _ref("Winkler2016", "Winkler, A. M. and Webster, M. A. and Brooks, J. C. and Tracey, I. and Smith, S. M. and "
         "Nichols, T. E.", 2016, "Non-parametric combination and related permutation tests for neuroimaging",
         "Human Brain Mapping", "37", "1486-1511", "10.1002/hbm.23115"),
    _ref("Winkler2016faster", "Winkler, A. M. and Ridgway, G. R. and Douaud, G. and Nichols, T. E. and Smith, S. M.",
         2016, "Faster permutation inference in brain imaging", "NeuroImage", "141", "502-516",
         "10.1016/j.neuroimage.2016.05.068"),
    _ref("Winkler2015", "Winkler, A. M. and Webster, M. A. and Vidaurre, D. and Nichols, T. E. and Smith, S. M.",
         2015, "Multi-level block permutation", "NeuroImage", "123", "253-268",
         "10.1016/j.neuroimage.2015.05.092"),
    _ref("Amunts2020", "Amunts, K. and Mohlberg, H. and Bludau, S. and Zilles, K.", 2020, "Julich-Brain: a 3D "
         "probabilistic atlas of the human brain's cytoarchitecture", "Science", "369", "988-992",
         "10.1126/science.abb4588"),
)}


def references_for(recipe: Recipe) -> list[Reference]:
    """The references of every method the recipe's methods paragraph names, in the paragraph's order."""
    d, inf = recipe.denoising, recipe.inference
    keys = ["Esteban2019", "Abraham2014", "Gorgolewski2011"]
    keys += {"24P": ["Friston1996"], "24P+aCompCor": ["Friston1996", "Behzadi2007"], "6P+aCompCor": ["Behzadi2007"],
             "36P": ["Satterthwaite2013"], "ICA-AROMA": ["Pruim2015"]}.get(d.strategy, [])
    if d.fd_threshold_mm is not None or d.std_dvars_threshold is not None:
        keys.append("Power2014")
    if d.std_dvars_threshold is not None:
        keys.append("Afyouni2018")
    if d.filter == "dct":
        keys.append("Lindquist2019")
    keys.append("Worsley1995")  # the paragraph names the Worsley-Friston degrees of freedom
    measures = {m for task in recipe.tasks for m in task.measures}
    keys += ["McLaren2012"] if "gppi" in measures else []
    keys += ["AlAidroos2012"] if "background" in measures else []
    methods = set(inf.methods)
    if methods & set(_PERMUTATION):
        keys += ["Nichols2002"]
        keys += ["Winkler2014"] if inf.variance_groups == "auto" else ["Freedman1983"]
    keys += ["Smith2009"] if "tfce" in methods else []
    if inf.accel == "tail" and methods & set(_PERMUTATION):
        keys.append("Winkler2016faster")
    if inf.family_wise == "contrasts" and methods & set(_PERMUTATION):
        keys.append("Winkler2016")
    if inf.repeated_measures and len(recipe.sessions) >= 3 and len(recipe.groups) >= 2:
        keys.append("Winkler2015")
    if "fdr" in methods or recipe.regions.enabled:
        keys.append("Benjamini1995")
    if any(seed.mask is None for seed in recipe.seeds) or (recipe.regions.enabled and recipe.regions.labels is None):
        keys.append("Amunts2020")
    return [REFERENCES[k] for k in dict.fromkeys(keys)]


def write_bibtex(path: str | Path, references: Sequence[Reference], notes: Sequence[str] = ()) -> Path:
    """Write ``references`` as a BibTeX file (atomic), one entry per reference, then each of
    ``notes`` (citations known only as text, e.g. the atlas release's data set) as a ``@misc``."""
    from fcflow.io import write_text

    entries = [r.bibtex for r in references]
    entries += [f"@misc{{fcflowNote{i},\n  note = {{{text}}}\n}}" for i, text in enumerate(notes, 1)]
    return write_text(Path(path), "\n\n".join(entries) + "\n")
