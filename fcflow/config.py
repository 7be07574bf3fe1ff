"""Study recipes: the TOML file that describes an analysis, and the validated object built from it.

A recipe (see ``workflows/weigner2025_pgacc.toml``) declares the groups, sessions, tasks and their
measures, the seeds, the denoising, the contrasts and the inference. :func:`load_recipe` reads it
with :mod:`tomllib`, checks every key and returns one frozen :class:`Recipe`, which the command
line passes explicitly to whatever needs it. Nothing else in fcflow reads the TOML.

Every problem is reported as a :class:`~fcflow.errors.RecipeError` that names the file, the key,
what was expected and what was found::

    weigner2025_pgacc.toml: [tasks.rest] 'high_pass' must be lower than 'low_pass' (0.08 Hz).
    Got 0.1.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcflow.errors import RecipeError

#: Denoising strategies a recipe may name (implemented with nilearn's ``load_confounds``).
DENOISING_STRATEGIES = ("none", "24P", "24P+aCompCor", "6P+aCompCor", "36P", "ICA-AROMA")
#: How the band is applied (:func:`fcflow.denoise.build_cleaning_operator`).
FILTERS = ("dct", "butterworth")
#: Measures per kind of task: resting state has correlation; a task with conditions may also
#: have gPPI and task-regressed ("background") correlation.
MEASURES = ("correlation", "gppi", "background")
_CONDITION_MEASURES = ("gppi", "background")
SEED_SIGNALS = ("mean", "eigenvariate")
SEED_SOURCES = ("mpm", "pmap")
HEMISPHERES = ("left", "right")
#: The group level's inferences by permutation (fcflow.permutation computes them in this order)
PERMUTATION_INFERENCES = ("maxt", "cluster_mass", "cluster_size", "tfce")
#: Every inference a recipe may name: the permutation ones and the parametric ones
INFERENCES = ("tfce", "maxt", "cluster_mass", "cluster_size", "fdr", "bonferroni", "cluster_extent")
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


# ----------------------------------------------------------------------------------------------
# The recipe object
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Contrast:
    """A linear contrast written as text, e.g. ``"ketamine - placebo"``.

    Attributes
    ----------
    name : str
        BIDS-friendly label, e.g. ``ketamineMinusPlacebo``.
    expression : str
        The text of the recipe.
    weights : tuple of (str, float)
        Level name and weight, in the order they appear in the expression.
    """

    name: str
    expression: str
    weights: tuple[tuple[str, float], ...]

    def vector(self, levels: Sequence[str]) -> list[float]:
        """Return the weights as a vector over ``levels`` (0 for levels not named)."""
        lookup = dict(self.weights)
        return [float(lookup.get(level, 0.0)) for level in levels]


@dataclass(frozen=True)
class FTest:
    """An F test that the named groups share one mean."""

    name: str
    groups: tuple[str, ...]


@dataclass(frozen=True)
class TaskConfig:
    """One task: its measures, conditions and temporal filter.

    ``high_pass`` and ``low_pass`` are in Hz (nilearn's names); ``None`` means no such filter.
    """

    name: str
    measures: tuple[str, ...]
    high_pass: float | None
    low_pass: float | None
    conditions: tuple[str, ...] = ()
    condition_contrasts: tuple[Contrast, ...] = ()


@dataclass(frozen=True)
class SeedConfig:
    """A seed region: atlas areas by name (never label numbers), or a mask file of the user's.

    ``mask`` is an absolute path (resolved against the recipe's folder); it replaces ``areas``.
    """

    name: str
    atlas: str
    areas: tuple[str, ...]
    hemispheres: tuple[str, ...]
    source: str = "mpm"
    pmap_threshold: float = 0.5
    min_coverage: float = 0.8
    signal: str = "mean"
    mask: str | None = None


@dataclass(frozen=True)
class DenoisingConfig:
    """Confound regression, censoring and run exclusion (see :mod:`fcflow.denoise`).

    ``min_dof`` (10): below it a run's map is refused. A run helps an unweighted group mean only
    while its sampling variance ``1/(dof - 3)`` stays below about ``(2 + 1/N)`` times the
    average run's, so the useful bound depends on the study: among runs at 50 dof (plus a
    between-subject Fisher z SD of 0.14) a run stops helping below about 19 dof, but when every
    run keeps 12-20 dof (6 min of rest at TR 1.5 s with 24P + aCompCor and the 0.01-0.08 Hz band:
    median 13 on a simulated low-motion study) a bound of 20 would drop them all. 10 is the
    floor: there a run's sampling SD (0.38) is 2.7 times that between-subject SD. Raise it for
    long runs; the group report's DOF table shows the spread.
    """

    strategy: str = "24P+aCompCor"
    n_compcor: int = 5
    fd_threshold_mm: float | None = 0.5
    std_dvars_threshold: float | None = 1.5
    scrub_min_segment: int = 5
    drop_nonsteady: bool = True
    min_volumes: int = 50
    max_mean_fd_mm: float | None = 0.5
    detrend: bool = True
    standardize_confounds: bool = True
    smoothing_fwhm: float | None = None
    filter: str = "dct"
    min_dof: float = 10.0
    compare_strategies: tuple[str, ...] = ("none", "6P+aCompCor", "24P", "24P+aCompCor", "36P")


@dataclass(frozen=True)
class InferenceConfig:
    """Group-level inference."""

    primary: str = "tfce"
    methods: tuple[str, ...] = ("tfce", "maxt", "cluster_mass", "fdr")
    n_permutations: int = 5000
    alpha: float = 0.05
    cluster_forming_p: float = 0.001
    two_sided: bool = True
    random_seed: int = 0
    covariates: tuple[str, ...] = ()
    min_cluster_voxels: int = 1
    #: "auto": one variance group per study group (sign flips; see group_variances);
    #: "none": one common variance (t / F, free permutation)
    variance_groups: str = "auto"
    #: with variance groups, "brain": one variance ratio per group for the whole map (weighted
    #: least-squares t / F); "voxel": each group's variance at every voxel (Winkler's v / G)
    group_variances: str = "brain"
    #: design diagnostics: warn when a covariate's variance inflation factor exceeds this
    max_vif: float = 5.0
    #: p values the "fdr" method corrects: "parametric" or "permutation" (voxel-wise permutation p)
    fdr_p: str = "parametric"
    #: "contrasts": also correct every permutation p over all group tests of a map and session
    #: contrast (same permutations, on z); "none": per test only
    family_wise: str = "contrasts"
    #: "tail": family-wise p below 0.1 from a generalised Pareto fit to the tail of each null of
    #: maxima (Winkler et al. 2016, fcflow.tail), so fewer permutations estimate small p;
    #: "none": the empirical p (benchmarks/results/tail_accuracy.md compares them)
    accel: str = "none"
    #: with three or more sessions: also the group x session interaction and the session main
    #: effect over all sessions (within-subject differences, subjects as exchangeability
    #: blocks; fcflow.repeated) and the group main effect on each subject's mean over sessions
    repeated_measures: bool = True


@dataclass(frozen=True)
class RegionsConfig:
    """Region-level connectivity and inference (:mod:`fcflow.regions`).

    ``atlas`` is ``"julich-brain-3.1"`` (the MPM areas of both hemispheres; needs the group
    level's ``--julich-dir``) or the absolute path of a NIfTI of integer labels (resolved against
    the recipe's folder), whose names come from ``labels``, a TSV with columns ``index`` and
    ``name``. ``areas`` declares the family: shell-style patterns (:func:`fnmatch.fnmatchcase`,
    case-sensitive) of the full region name, hemisphere included ("left * (Insula)", "* Area
    SFG2 (SFG)"); a region enters when any pattern matches it, ``("*",)`` keeps every region,
    and a pattern that matches no region is an error at the group level. Declaring the
    hypothesis regions before looking is what buys power: max-T over fewer regions needs a
    smaller statistic. A region enters with at least ``min_voxels`` voxels in the group analysis
    mask. ``correction`` is the one the report and ``n_significant_regions`` use: ``"fwe"``
    (max-T permutation p over regions) or ``"fdr"`` (Benjamini-Hochberg q); both are in every
    table.
    """

    enabled: bool = True
    atlas: str = "julich-brain-3.1"
    labels: str | None = None
    areas: tuple[str, ...] = ("*",)
    min_voxels: int = 10
    correction: str = "fwe"


@dataclass(frozen=True)
class Recipe:
    """A validated study recipe. Build it with :func:`load_recipe` or :func:`recipe_from_dict`."""

    name: str
    description: str
    space: str
    group_column: str
    groups: tuple[str, ...]
    sessions: tuple[str, ...]
    reference_session: str
    tasks: tuple[TaskConfig, ...]
    seeds: tuple[SeedConfig, ...]
    denoising: DenoisingConfig
    session_contrasts: tuple[Contrast, ...]
    group_contrasts: tuple[Contrast, ...]
    f_tests: tuple[FTest, ...]
    inference: InferenceConfig
    regions: RegionsConfig = RegionsConfig()
    source_file: str = field(default="<dict>", compare=False)

    def task(self, name: str) -> TaskConfig:
        """Return the task called ``name``."""
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"The recipe has no task {name!r}; it has {[t.name for t in self.tasks]}.")

    def to_dict(self) -> dict[str, Any]:
        """Return the resolved recipe as plain data (for provenance sidecars)."""
        payload = dataclasses.asdict(self)
        payload.pop("source_file")
        return payload

    def fingerprint(self) -> str:
        """Return the SHA-256 of the resolved recipe (changes whenever a setting changes)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def replace(self, **changes: Any) -> Recipe:
        """Return a copy with top-level fields changed, validated again."""
        return _check_recipe(dataclasses.replace(self, **changes))

    def with_overrides(self, *, n_permutations: int | None = None) -> Recipe:
        """The recipe a run actually uses: command-line overrides applied and checked.

        ``n_permutations`` (``--n-permutations``) may go below the recipe's minimum of 100 for
        demos and tests, but never so low that no p value can reach ``alpha``: the smallest
        permutation p is ``1 / n_permutations`` (the identity counts), so ``alpha = 0.05`` needs 20.

        Raises
        ------
        RecipeError
            ``n_permutations`` is not an integer of at least ``ceil(1 / alpha)``.
        """
        if n_permutations is None:
            return self
        alpha = self.inference.alpha
        needed = math.ceil(1.0 / alpha - 1e-9)
        if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < needed:
            raise RecipeError(
                f"'--n-permutations' must be an integer of at least {needed}: the smallest permutation p is "
                f"1 / n_permutations, and alpha is {alpha:g}. Got {n_permutations!r}; publication needs the "
                f"recipe's {self.inference.n_permutations}."
            )
        return dataclasses.replace(self, inference=dataclasses.replace(self.inference, n_permutations=n_permutations))


def to_plain(value: Any) -> Any:
    """A recipe section (dataclass) as JSON-ready data, for nipype traits and sidecars.

    :func:`from_plain` rebuilds the dataclass; the pair is how a typed recipe crosses the nipype
    boundary (whose inputs must hash as plain data) without the science code reading dicts.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


def from_plain(cls: type, data: Any) -> Any:
    """Rebuild the recipe dataclass ``cls`` (:class:`SeedConfig`, :class:`TaskConfig`,
    :class:`DenoisingConfig`, ...) from :func:`to_plain`'s output: lists become tuples again, nested
    sections (a task's :class:`Contrast` list) are rebuilt too, and every field must be present.

    Raises
    ------
    TypeError
        ``data`` lacks a field of ``cls`` or has one it does not define: the two sides of the
        nipype boundary disagree, which is a bug, not a user error.
    """
    import typing

    if not isinstance(data, Mapping):
        raise TypeError(f"{cls.__name__}: expected the mapping to_plain() makes, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if set(data) != names:
        raise TypeError(f"{cls.__name__}: fields {sorted(names)} expected, got {sorted(data)}")

    def rebuild(hint: Any, value: Any) -> Any:
        if value is None:
            return None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is tuple:
            item = args[0] if args else Any
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(rebuild(item, v) for v in value)
            return tuple(rebuild(a, v) for a, v in zip(args, value, strict=True))
        if len(args) == 1 and typing.get_origin(hint) is not tuple:  # X | None
            return rebuild(args[0], value)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return from_plain(hint, value)
        return value

    return cls(**{name: rebuild(hints[name], data[name]) for name in names})


# ----------------------------------------------------------------------------------------------
# Reading and validation
# ----------------------------------------------------------------------------------------------
class _Table:
    """One TOML table being validated: typed access that remembers which keys were read."""

    def __init__(self, data: Any, where: str, source: str) -> None:
        self.where = where
        self.source = source
        if not isinstance(data, Mapping):
            raise self.error(None, "a table", data)
        self.data = dict(data)
        self.used: set[str] = set()

    def error(self, key: str | None, expectation: str, got: Any, fix: str = "") -> RecipeError:
        target = f"[{self.where}]" + (f" '{key}'" if key else "")
        message = f"{self.source}: {target} must be {expectation}. Got {got!r}."
        return RecipeError(message + (f" {fix}" if fix else ""))

    def get(
        self,
        key: str,
        kind: str,
        default: Any = ...,
        *,
        choices: Sequence[str] | None = None,
        check: Callable[[Any], bool] | None = None,
        expectation: str | None = None,
    ) -> Any:
        """Read ``key`` as ``kind`` (str, int, float, bool, str_list, table, table_list)."""
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise self.error(key, f"given ({expectation or kind})", "nothing", "Add it.")
            return default
        value = self.data[key]
        expect = expectation or _KIND_TEXT[kind]
        if not _KIND_CHECK[kind](value):
            raise self.error(key, expect, value)
        if kind == "float":
            value = float(value)
        if kind == "str_list":
            value = tuple(value)
        if choices is not None:
            for item in value if kind == "str_list" else (value,):
                if item not in choices:
                    raise self.error(key, f"one of {list(choices)}", item, _did_you_mean(item, choices))
        if check is not None and not check(value):
            raise self.error(key, expect, value)
        return value

    def table(self, key: str, default: Any = ...) -> _Table:
        value = self.get(key, "table", {} if default is ... else default)
        return _Table(value, f"{self.where}.{key}" if self.where else key, self.source)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            key = unknown[0]
            known = sorted(self.used)
            raise RecipeError(
                f"{self.source}: [{self.where}] has an unknown key '{key}'; expected one of "
                f"{known}.{(' ' + _did_you_mean(key, known)) if _did_you_mean(key, known) else ''}"
            )


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_KIND_CHECK: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str) and v != "",
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": _is_number,
    "bool": lambda v: isinstance(v, bool),
    "str_list": _is_str_list,
    "table": lambda v: isinstance(v, Mapping),
    "table_list": lambda v: isinstance(v, list) and all(isinstance(i, Mapping) for i in v),
}
_KIND_TEXT = {
    "str": "a non-empty string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str_list": "a list of strings",
    "table": "a table",
    "table_list": "an array of tables",
}


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"Did you mean {close[0]!r}?" if close else ""


def contrast_pairs(expression: str, levels: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """Parse ``"ketamine - placebo"`` or ``"0.5*a + 0.5*b - c"`` into (level, weight) pairs.

    The grammar is :func:`fcflow.stats.parse_contrast`'s; the pairs follow the order of ``levels``
    and leave out levels with weight 0.

    Raises
    ------
    ValueError
        If the text is not a sum of (optionally weighted) level names, names a level not in
        ``levels``, or has no non-zero weight.
    """
    from fcflow.stats import parse_contrast as contrast_weights

    weights = contrast_weights(expression, list(levels))
    return tuple((level, float(w)) for level, w in zip(levels, weights, strict=True) if w != 0)


def contrast_label(expression: str) -> str:
    """Return a BIDS-label-safe name: ``"infusion - baseline"`` -> ``infusionMinusBaseline``."""
    out = []
    for token in re.findall(r"[A-Za-z0-9]+|[+-]|\*|\.", expression):
        if token == "-":
            out.append("Minus")
        elif token == "+":
            out.append("Plus")
        elif token in "*.":
            out.append("x" if token == "*" else "p")
        else:
            out.append(token[0].upper() + token[1:] if out else token)
    return "".join(out)


def _contrast(table: _Table, key: str, expression: str, levels: Sequence[str]) -> Contrast:
    try:
        weights = contrast_pairs(expression, levels)
    except ValueError as exc:
        raise table.error(key, f"contrasts of {list(levels)} like 'a - b' ({exc})", expression) from None
    return Contrast(contrast_label(expression), expression, weights)


def _read_tasks(table: _Table) -> tuple[TaskConfig, ...]:
    tasks = []
    if not table.data:
        raise table.error(None, "a table with at least one task, e.g. [tasks.rest]", table.data)
    for name in table.data:
        table.used.add(name)
        if not _LABEL.match(name):
            raise table.error(name, "a BIDS task label (letters and digits)", name)
        sub = table.table(name)
        measures = sub.get("measures", "str_list", choices=MEASURES)
        if not measures:
            raise sub.error("measures", f"a non-empty list of {list(MEASURES)}", [])
        conditions = sub.get("conditions", "str_list", ())
        needs_conditions = [m for m in measures if m in _CONDITION_MEASURES]
        if needs_conditions and len(conditions) < 1:
            raise sub.error(
                "conditions", f"the event conditions that {needs_conditions} model", list(conditions)
            )
        high_pass = sub.get("high_pass", "float", None, check=lambda v: v > 0,
                            expectation="a positive frequency in Hz")
        low_pass = sub.get("low_pass", "float", None, check=lambda v: v > 0,
                           expectation="a positive frequency in Hz")
        if high_pass is not None and low_pass is not None and high_pass >= low_pass:
            raise sub.error("high_pass", f"lower than 'low_pass' ({low_pass} Hz)", high_pass)
        contrasts = tuple(
            _contrast(sub, "condition_contrasts", text, conditions)
            for text in sub.get("condition_contrasts", "str_list", ())
        )
        sub.finish()
        tasks.append(TaskConfig(name, measures, high_pass, low_pass, conditions, contrasts))
    return tuple(tasks)


def _read_seeds(table: _Table) -> tuple[SeedConfig, ...]:
    seeds = []
    if not table.data:
        raise table.error(None, "a table with at least one seed, e.g. [seeds.pgACC]", table.data)
    for name in table.data:
        table.used.add(name)
        if not _LABEL.match(name):
            raise table.error(name, "a seed name of letters and digits (used as a BIDS label)", name)
        sub = table.table(name)
        mask = sub.get("mask", "str", None)
        if mask is not None:
            base = Path(table.source).parent if table.source != "<dict>" else Path.cwd()
            mask_path = (base / mask).resolve()
            if not mask_path.is_file():
                raise sub.error("mask", "a NIfTI mask file (relative to the recipe's folder)", mask,
                                f"{mask_path} does not exist.")
            mask = str(mask_path)
            if "areas" in sub.data:
                raise sub.error("areas", "absent when 'mask' gives the seed", sub.data["areas"])
        seed = SeedConfig(
            name=name,
            atlas=sub.get("atlas", "str", "julich-brain-3.1" if mask is None else "mask file"),
            areas=() if mask is not None else sub.get(
                "areas", "str_list", check=bool, expectation="a non-empty list of area names (or a 'mask' file)"),
            hemispheres=sub.get("hemispheres", "str_list", ("left", "right"), choices=HEMISPHERES,
                                check=lambda v: 0 < len(v) == len(set(v))),
            source=sub.get("source", "str", "mpm", choices=SEED_SOURCES),
            pmap_threshold=sub.get("pmap_threshold", "float", 0.5, check=lambda v: 0 < v < 1,
                                   expectation="a probability between 0 and 1"),
            min_coverage=sub.get("min_coverage", "float", 0.8, check=lambda v: 0 <= v <= 1,
                                 expectation="a fraction between 0 and 1"),
            signal=sub.get("signal", "str", "mean", choices=SEED_SIGNALS),
            mask=mask,
        )
        sub.finish()
        seeds.append(seed)
    return tuple(seeds)


def _positive_or_none(table: _Table, key: str, default: float | None, unit: str) -> float | None:
    """A positive number, or 0 to switch the setting off (TOML has no null)."""
    value = table.get(key, "float", default if default is not None else 0.0, check=lambda v: v >= 0,
                      expectation=f"a positive number in {unit}, or 0 to switch it off")
    return None if value == 0 else value


def _read_denoising(table: _Table) -> DenoisingConfig:
    base = DenoisingConfig()
    config = DenoisingConfig(
        strategy=table.get("strategy", "str", base.strategy, choices=DENOISING_STRATEGIES),
        n_compcor=table.get("n_compcor", "int", base.n_compcor, check=lambda v: v >= 1,
                            expectation="a positive integer"),
        fd_threshold_mm=_positive_or_none(table, "fd_threshold_mm", base.fd_threshold_mm, "mm"),
        std_dvars_threshold=_positive_or_none(table, "std_dvars_threshold",
                                              base.std_dvars_threshold, "standard deviations"),
        scrub_min_segment=table.get("scrub_min_segment", "int", base.scrub_min_segment,
                                    check=lambda v: v >= 0, expectation="a non-negative integer"),
        drop_nonsteady=table.get("drop_nonsteady", "bool", base.drop_nonsteady),
        min_volumes=table.get("min_volumes", "int", base.min_volumes, check=lambda v: v >= 10,
                              expectation="an integer of at least 10"),
        max_mean_fd_mm=_positive_or_none(table, "max_mean_fd_mm", base.max_mean_fd_mm, "mm"),
        detrend=table.get("detrend", "bool", base.detrend),
        standardize_confounds=table.get("standardize_confounds", "bool", base.standardize_confounds),
        smoothing_fwhm=_positive_or_none(table, "smoothing_fwhm", base.smoothing_fwhm, "mm"),
        filter=table.get("filter", "str", base.filter, choices=FILTERS),
        min_dof=table.get("min_dof", "float", base.min_dof, check=lambda v: v >= 4,
                          expectation="a number of at least 4 (Fisher z needs dof > 3)"),
        compare_strategies=table.get("compare_strategies", "str_list", base.compare_strategies,
                                     choices=DENOISING_STRATEGIES, check=lambda v: len(v) == len(set(v)),
                                     expectation="a list of distinct strategies (empty: no comparison)"),
    )
    table.finish()
    return config


def _read_inference(table: _Table, covariate_choices: Sequence[str] | None = None) -> InferenceConfig:
    base = InferenceConfig()
    methods = table.get("methods", "str_list", base.methods, choices=INFERENCES,
                        check=lambda v: len(v) > 0 and len(v) == len(set(v)),
                        expectation=f"a non-empty list without repeats of {list(INFERENCES)}")
    primary = table.get("primary", "str", base.primary, choices=INFERENCES)
    if primary not in methods:
        raise table.error("primary", f"one of the inferences in 'methods' {list(methods)}", primary)
    config = InferenceConfig(
        primary=primary,
        methods=methods,
        n_permutations=table.get("n_permutations", "int", base.n_permutations,
                                 check=lambda v: v >= 100, expectation="an integer of at least 100"),
        alpha=table.get("alpha", "float", base.alpha, check=lambda v: 0 < v < 1,
                        expectation="a probability between 0 and 1"),
        cluster_forming_p=table.get("cluster_forming_p", "float", base.cluster_forming_p,
                                    check=lambda v: 0 < v < 0.5,
                                    expectation="a p-value between 0 and 0.5"),
        two_sided=table.get("two_sided", "bool", base.two_sided),
        random_seed=table.get("random_seed", "int", base.random_seed, check=lambda v: v >= 0,
                              expectation="a non-negative integer"),
        covariates=table.get("covariates", "str_list", base.covariates),
        min_cluster_voxels=table.get("min_cluster_voxels", "int", base.min_cluster_voxels,
                                     check=lambda v: v >= 1, expectation="a positive integer"),
        variance_groups=table.get("variance_groups", "str", base.variance_groups, choices=("auto", "none")),
        group_variances=table.get("group_variances", "str", base.group_variances, choices=("brain", "voxel")),
        max_vif=table.get("max_vif", "float", base.max_vif, check=lambda v: v >= 1,
                          expectation="a variance inflation factor of at least 1"),
        fdr_p=table.get("fdr_p", "str", base.fdr_p, choices=("parametric", "permutation")),
        family_wise=table.get("family_wise", "str", base.family_wise, choices=("contrasts", "none")),
        accel=table.get("accel", "str", base.accel, choices=("none", "tail")),
        repeated_measures=table.get("repeated_measures", "bool", base.repeated_measures),
    )
    table.finish()
    return config


def _read_regions(table: _Table) -> RegionsConfig:
    base = RegionsConfig()
    base_dir = Path(table.source).parent if table.source != "<dict>" else Path.cwd()

    def existing(key: str, value: str | None, what: str) -> str | None:
        if value is None:
            return None
        path = (base_dir / value).resolve()
        if not path.is_file():
            raise table.error(key, f"{what} (relative to the recipe's folder)", value, f"{path} does not exist.")
        return str(path)

    atlas = table.get("atlas", "str", base.atlas)
    labels = table.get("labels", "str", base.labels)
    if atlas != base.atlas:
        atlas = existing("atlas", atlas, f"{base.atlas!r} or a NIfTI image of integer labels")
        if labels is None:
            raise table.error("labels", "a TSV with columns 'index' and 'name' naming the labels of 'atlas'",
                              "nothing", "Add it.")
        labels = existing("labels", labels, "a TSV with columns 'index' and 'name'")
    elif labels is not None:
        raise table.error("labels", f"absent when 'atlas' is {base.atlas!r} (its areas have names)", labels)
    config = RegionsConfig(
        enabled=table.get("enabled", "bool", base.enabled),
        atlas=atlas,
        labels=labels,
        areas=table.get("areas", "str_list", base.areas, check=lambda v: len(v) > 0 and all(p.strip() for p in v),
                        expectation='a non-empty list of non-empty region name patterns (shell-style, '
                                    'case-sensitive, with the hemisphere: ["left * (Insula)"]; ["*"]: all)'),
        min_voxels=table.get("min_voxels", "int", base.min_voxels, check=lambda v: v >= 1,
                             expectation="a positive integer"),
        correction=table.get("correction", "str", base.correction, choices=("fwe", "fdr")),
    )
    table.finish()
    return config


def recipe_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Recipe:
    """Validate the contents of a recipe (as :func:`tomllib.load` returns them).

    Parameters
    ----------
    data : mapping
        The parsed TOML.
    source : str, default="<dict>"
        Where the data came from; every error message starts with it.

    Returns
    -------
    Recipe

    Raises
    ------
    RecipeError
        On an unknown key, a wrong type or a contradiction, naming ``source`` and the key.
    """
    root = _Table(data, "", source)
    study = root.table("study")
    name = study.get("name", "str", check=lambda v: bool(_NAME.match(v)),
                     expectation="a name of letters, digits and underscores")
    description = study.get("description", "str", "")
    space = study.get("space", "str", "MNI152NLin2009cAsym", choices=("MNI152NLin2009cAsym",))
    study.finish()

    groups_table = root.table("groups")
    group_column = groups_table.get("column", "str", "group")
    groups = groups_table.get("levels", "str_list", check=lambda v: len(v) >= 2 and len(v) == len(set(v)),
                              expectation="a list of at least 2 distinct group names")
    for group in groups:
        if not _NAME.match(group):
            raise groups_table.error("levels", "names of letters, digits and underscores", group)
    groups_table.finish()

    sessions_table = root.table("sessions")
    sessions = sessions_table.get("levels", "str_list", check=lambda v: len(v) >= 1 and len(v) == len(set(v)),
                                  expectation="a list of distinct BIDS session labels")
    for session in sessions:
        if not _LABEL.match(session):
            raise sessions_table.error("levels", "BIDS session labels (letters and digits)", session)
    reference = sessions_table.get("reference", "str", sessions[0], choices=sessions)
    sessions_table.finish()

    tasks = _read_tasks(root.table("tasks"))
    seeds = _read_seeds(root.table("seeds"))
    denoising = _read_denoising(root.table("denoising"))

    contrasts = root.table("contrasts")
    session_contrasts = tuple(
        _contrast(contrasts, "sessions", text, sessions)
        for text in contrasts.get("sessions", "str_list", ())
    )
    group_contrasts = tuple(
        _contrast(contrasts, "groups", text, groups) for text in contrasts.get("groups", "str_list", ())
    )
    f_tests = []
    for index, entry in enumerate(contrasts.get("f_tests", "table_list", [])):
        sub = _Table(entry, f"contrasts.f_tests[{index}]", source)
        members = sub.get("groups", "str_list", groups, choices=groups,
                          check=lambda v: len(v) >= 2 and len(v) == len(set(v)),
                          expectation="at least 2 distinct groups")
        f_tests.append(FTest(sub.get("name", "str", "groups", check=lambda v: bool(_LABEL.match(v)),
                                     expectation="a label of letters and digits"), members))
        sub.finish()
    contrasts.finish()
    inference = _read_inference(root.table("inference"))
    regions = _read_regions(root.table("regions"))
    root.finish()

    recipe = Recipe(
        name=name, description=description, space=space, group_column=group_column,
        groups=groups, sessions=sessions, reference_session=reference, tasks=tasks, seeds=seeds,
        denoising=denoising, session_contrasts=session_contrasts, group_contrasts=group_contrasts,
        f_tests=tuple(f_tests), inference=inference, regions=regions, source_file=source,
    )
    return _check_recipe(recipe)


def _check_recipe(recipe: Recipe) -> Recipe:
    """Cross-section checks that no single table can make."""
    source = recipe.source_file
    for contrast in recipe.session_contrasts:
        total = sum(weight for _, weight in contrast.weights)
        if abs(total) > 1e-9:
            raise RecipeError(
                f"{source}: [contrasts] 'sessions' must be within-subject differences whose "
                f"weights sum to 0, like 'infusion - {recipe.reference_session}'. "
                f"Got {contrast.expression!r} (weights sum to {total:g})."
            )
    names = [c.name for c in recipe.group_contrasts] + [f.name for f in recipe.f_tests]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RecipeError(f"{source}: [contrasts] names must be unique. Got {duplicates} twice.")
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (TOML).

    ``path`` may also be the name of a recipe that fcflow ships (``weigner2025_pgacc``).

    Raises
    ------
    RecipeError
        If the file is missing, is not valid TOML, or does not pass validation.
    """
    file = Path(path)
    if not file.is_file() and not file.suffix and file.parent == Path("."):
        from fcflow.resources import recipe_file

        try:
            file = recipe_file(str(path))
        except FileNotFoundError as exc:
            raise RecipeError(f"Recipe {str(path)!r} is not a file. {exc}") from None
    if not file.is_file():
        raise RecipeError(f"Recipe file {str(file)!r} does not exist: check the path given to --recipe.")
    try:
        with open(file, "rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{file}: is not valid TOML ({exc}). Fix the syntax at that line.") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{file}: is not valid TOML (not UTF-8 text).") from None
    return recipe_from_dict(data, source=str(file))
