"""Julich-Brain release and seed definitions (``atlases/julich_brain_v3.1.toml``), name checks and label tables.

The release (URLs, file names, checksums, citation, license) and the named seeds are data; the
label values of the areas come from the EBRAINS XML tables (:func:`read_label_table`), never from
constants, because they change between atlas versions.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fcflow.errors import AtlasError
from fcflow.resources import data_dir

try:  # POSIX only; on other systems concurrent cache writers are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


Hemisphere = Literal["left", "right"]
_RES_RE = re.compile(r"(?:^|_)res-([a-zA-Z0-9]+)")
_SPACE_RE = re.compile(r"(?:^|_)space-([a-zA-Z0-9]+)")
_SOURCES = ("mpm", "pmap")
_HEMISPHERE_ALIASES = {
    "left": "left", "lh": "left", "l": "left",
    "right": "right", "rh": "right", "r": "right",
}


HEMISPHERES: dict[str, str] = {"left": "lh", "right": "rh"}


RELEASE_FILE = "julich_brain_v3.1.toml"


@dataclass(frozen=True)
class AtlasRelease:
    """One Julich-Brain release: where its files live and how to cite it.

    File templates are paths inside the EBRAINS bucket; ``{hemi}`` is ``lh``/``rh`` and
    ``{area_key}`` is :func:`area_key` of an area name.
    """

    name: str
    version: str
    n_areas: int
    space: str
    ebrains_dataset_version_id: str
    landing_page: str
    base_url: str
    license: str
    license_url: str
    citation: tuple[str, ...]
    mpm_template: str
    labels_template: str
    pmap_template: str
    pacc_reference: str = ""

    def mpm_file(self, hemisphere: Hemisphere) -> str:
        """Bucket path of the maximum probability map of one hemisphere."""
        return self.mpm_template.format(hemi=HEMISPHERES[hemisphere])

    def labels_file(self, hemisphere: Hemisphere) -> str:
        """Bucket path of the XML label table of one hemisphere."""
        return self.labels_template.format(hemi=HEMISPHERES[hemisphere])

    def pmap_file(self, area: str, hemisphere: Hemisphere) -> str:
        """Bucket path of one area's probability map in one hemisphere."""
        return self.pmap_template.format(area_key=area_key(area), hemi=HEMISPHERES[hemisphere])


@dataclass(frozen=True)
class SeedDefinition:
    """A named seed: Julich-Brain areas, hemispheres and the rule that makes the mask.

    Parameters
    ----------
    name : str
        Seed name as used in file names (``seed-<name>``), e.g. ``pgACC``.
    areas : tuple of str
        Area names as in the EBRAINS label tables, e.g. ``"Area p24ab (pACC)"``.
    hemispheres : tuple of {"left", "right"}
    rule : {"mpm", "pmap"}, default="mpm"
        ``mpm``: union of the areas' labels in the maximum probability maps. ``pmap``: union of
        the areas' probability maps, resampled to the data grid, thresholded at ``pmap_threshold``.
    pmap_threshold : float, default=0.5
        Minimum probability (0 < p <= 1) for ``rule="pmap"``.
    description : str, default=""
    """

    name: str
    areas: tuple[str, ...]
    hemispheres: tuple[str, ...] = ("left", "right")
    rule: str = "mpm"
    pmap_threshold: float = 0.5
    description: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-zA-Z0-9]+", self.name):
            raise AtlasError(
                f"'name' must be letters and digits so it fits a BIDS entity (seed-<name>). "
                f"Got {self.name!r}."
            )
        object.__setattr__(self, "areas", check_areas(self.areas))
        object.__setattr__(self, "hemispheres", normalize_hemispheres(self.hemispheres))
        check_source(self.rule, "rule")
        check_threshold(self.pmap_threshold)

    @property
    def rule_text(self) -> str:
        """The rule in words, for sidecars."""
        return describe_rule(self.rule, self.pmap_threshold)


def load_atlas_release(path: str | os.PathLike[str] | None = None) -> AtlasRelease:
    """Read the atlas release from ``atlases/julich_brain_v3.1.toml`` (or ``path``)."""
    path, doc = _read_toml(path)
    try:
        atlas = doc["atlas"]
        files = atlas["files"]
        return AtlasRelease(
            name=str(atlas["name"]),
            version=str(atlas["version"]),
            n_areas=int(atlas["n_areas"]),
            space=str(atlas["space"]),
            ebrains_dataset_version_id=str(atlas["ebrains_dataset_version_id"]),
            landing_page=str(atlas["landing_page"]),
            base_url=normalize_base_url(str(atlas["base_url"])),
            license=str(atlas["license"]),
            license_url=str(atlas["license_url"]),
            citation=tuple(str(c) for c in atlas["citation"]),
            mpm_template=str(files["mpm"]),
            labels_template=str(files["labels"]),
            pmap_template=str(files["pmap"]),
            pacc_reference=str(atlas.get("pacc_reference", "")),
        )
    except KeyError as exc:
        raise AtlasError(f"Atlas release file {path} lacks the key {exc.args[0]!r} under [atlas].") from None


def load_seed_definitions(path: str | os.PathLike[str] | None = None) -> dict[str, SeedDefinition]:
    """Read the named seeds (``[seeds.<name>]`` tables) from the atlas TOML file.

    Parameters
    ----------
    path : path, optional
        A TOML file with ``[seeds.<name>]`` tables; default: fcflow's
        ``atlases/julich_brain_v3.1.toml``.

    Returns
    -------
    definitions : dict of str to SeedDefinition
        In file order.
    """
    path, doc = _read_toml(path)
    allowed = {"areas", "hemispheres", "rule", "pmap_threshold", "description"}
    definitions: dict[str, SeedDefinition] = {}
    for name, table in doc.get("seeds", {}).items():
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise AtlasError(
                f"Seed {name!r} in {path} has unknown keys {unknown}; allowed: {sorted(allowed)}."
            )
        if "areas" not in table:
            raise AtlasError(f"Seed {name!r} in {path} must list its 'areas'.")
        try:
            definitions[name] = SeedDefinition(
                name=name,
                areas=table["areas"],
                hemispheres=table.get("hemispheres", ("left", "right")),
                rule=table.get("rule", "mpm"),
                pmap_threshold=table.get("pmap_threshold", 0.5),
                description=str(table.get("description", "")),
            )
        except AtlasError as exc:
            raise AtlasError(f"Seed {name!r} in {path}: {exc}") from None
    if not definitions:
        raise AtlasError(f"{path} defines no seeds: add a [seeds.<name>] table.")
    return definitions


def get_seed_definition(
    name: str, definitions: Mapping[str, SeedDefinition] | None = None
) -> SeedDefinition:
    """Return the seed definition called ``name``; an unknown name lists the close ones."""
    definitions = load_seed_definitions() if definitions is None else definitions
    if name in definitions:
        return definitions[name]
    close = difflib.get_close_matches(name, list(definitions), n=3, cutoff=0.5)
    hint = f" Did you mean {close}?" if close else ""
    raise AtlasError(f"Unknown seed {name!r}; defined seeds: {sorted(definitions)}.{hint}")


def _read_toml(path: str | os.PathLike[str] | None) -> tuple[Path, dict[str, Any]]:
    path = data_dir("atlases") / RELEASE_FILE if path is None else Path(path)
    try:
        with open(path, "rb") as handle:
            return path, tomllib.load(handle)
    except FileNotFoundError:
        raise AtlasError(f"Atlas definition file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise AtlasError(f"Atlas definition file {path} is not valid TOML: {exc}.") from None


def normalize_hemispheres(hemispheres: str | Sequence[str]) -> tuple[str, ...]:
    """Return hemispheres as a sorted tuple of ``"left"``/``"right"``.

    Accepts ``"left"``, ``"right"``, ``"lh"``, ``"rh"``, ``"L"``, ``"R"``, ``"both"``/``"bilateral"``
    or a sequence of those.
    """
    if isinstance(hemispheres, str):
        hemispheres = (
            ("left", "right") if hemispheres.lower() in ("both", "bilateral") else (hemispheres,)
        )
    out = set()
    for hemi in hemispheres:
        key = _HEMISPHERE_ALIASES.get(str(hemi).lower())
        if key is None:
            raise AtlasError(
                f"'hemispheres' must be 'left', 'right' or both. Got {hemi!r}."
            )
        out.add(key)
    if not out:
        raise AtlasError("'hemispheres' must name at least one hemisphere. Got an empty list.")
    return tuple(h for h in ("left", "right") if h in out)


def check_areas(areas: str | Sequence[str]) -> tuple[str, ...]:
    """``areas`` as a non-empty tuple of area names (one name may be given as a string)."""
    if isinstance(areas, str):
        areas = (areas,)
    areas = tuple(areas)
    if not areas or not all(isinstance(a, str) and a.strip() for a in areas):
        raise AtlasError(
            f"'areas' must be a non-empty list of Julich-Brain area names such as "
            f"'Area p24ab (pACC)'. Got {areas!r}."
        )
    return tuple(dict.fromkeys(a.strip() for a in areas))


def check_source(source: str, parameter: str = "source") -> None:
    """Refuse a seed source other than ``mpm`` or ``pmap``, naming ``parameter``."""
    if source not in _SOURCES:
        raise AtlasError(f"'{parameter}' must be one of {_SOURCES}. Got {source!r}.")


def check_threshold(pmap_threshold: float) -> None:
    """Refuse a probability-map threshold outside (0, 1]."""
    if not (isinstance(pmap_threshold, (int, float)) and 0 < pmap_threshold <= 1):
        raise AtlasError(
            f"'pmap_threshold' must be a probability in (0, 1]. Got {pmap_threshold!r}."
        )


def describe_rule(source: str, pmap_threshold: float | None = None) -> str:
    """The seed rule in words, as written to sidecars."""
    if source == "mpm":
        return (
            "union of the areas' labels in the maximum probability maps (MPM), "
            "nearest-neighbour resampled to the reference grid"
        )
    return (
        f"union of the areas' probability maps, each resampled to the reference grid (trilinear) "
        f"and then thresholded at p >= {pmap_threshold:g}"
    )


def area_key(area: str) -> str:
    """File-name key of an area: ``"Area p24ab (pACC)"`` -> ``"Area-p24ab"`` (EBRAINS' PMap folders)."""
    return re.sub(r"\s*\(.*\)\s*$", "", area.strip()).replace(" ", "-")


def space_entity(name: str | os.PathLike[str] | None) -> str | None:
    """The BIDS ``space-`` entity of a file name, or None."""
    if name is None:
        return None
    match = _SPACE_RE.search(Path(name).name)
    return match.group(1) if match else None


def read_label_table(xml_file: str | os.PathLike[str]) -> dict[str, int]:
    """Read an EBRAINS Julich-Brain label table: area name -> MPM grey value.

    The file holds ``<Structure id=".." grayvalue="N">Area p24ab (pACC)</Structure>`` elements
    (at any depth, any namespace).
    """
    xml_file = Path(xml_file)
    try:
        root = ET.parse(xml_file).getroot()
    except (ET.ParseError, OSError) as exc:
        raise AtlasError(f"Cannot read the Julich-Brain label table {xml_file}: {exc}.") from None
    table: dict[str, int] = {}
    for element in root.iter():
        if not isinstance(element.tag, str) or element.tag.rsplit("}", 1)[-1] != "Structure":
            continue
        name = " ".join((element.text or "").split())
        value = element.get("grayvalue")
        if not name or value is None or not value.strip().isdigit():
            raise AtlasError(
                f"Label table {xml_file} has a <Structure> without a name or an integer "
                f"grayvalue: {ET.tostring(element, encoding='unicode').strip()!r}."
            )
        if name in table and table[name] != int(value):
            raise AtlasError(
                f"Label table {xml_file} gives {name!r} two grey values: {table[name]} and {value}."
            )
        table[name] = int(value)
    if not table:
        raise AtlasError(f"Label table {xml_file} holds no <Structure grayvalue=...> elements.")
    return table


def resolve_area_name(name: str, available: Sequence[str], *, where: str = "the atlas") -> str:
    """Return the full area name in ``available`` that ``name`` designates.

    Exact names match first, then case-insensitively, then the name without its region
    (``"Area p24ab"``) or without ``"Area "`` (``"p24ab"``) if that is unambiguous. Anything else is
    an :class:`AtlasError` listing the closest names.
    """
    if name in available:
        return name
    folded = name.strip().casefold()
    for candidate in available:
        if candidate.casefold() == folded:
            return candidate
    keyed = [
        c for c in available
        if folded in (area_key(c).replace("-", " ").casefold(), _short_key(c).casefold())
    ]
    if len(keyed) == 1:
        return keyed[0]
    if len(keyed) > 1:
        raise AtlasError(f"Area name {name!r} is ambiguous in {where}: it matches {keyed}.")
    pool = {c.casefold(): c for c in available}
    pool.update({_short_key(c).casefold(): c for c in available})
    close = list(dict.fromkeys(
        pool[m] for m in difflib.get_close_matches(folded, list(pool), n=5, cutoff=0.6)
    ))
    hint = f" Close matches: {close}." if close else " Use the names of the EBRAINS label table."
    raise AtlasError(f"Unknown area {name!r} in {where}.{hint}")


def _short_key(area: str) -> str:
    return re.sub(r"^Area\s+", "", area_key(area).replace("-", " "))


def normalize_base_url(url: str) -> str:
    """``url`` with one trailing slash, so file names can be appended to it."""
    return url if url.endswith("/") else url + "/"
