"""Julich-Brain v3.1 seeds: find or fetch the atlas, derive seed masks by area name, check them per run.

The study's seed is the pregenual anterior cingulate cortex (pgACC) as the Julich-Brain
cytoarchitectonic atlas v3.1 maps it: the areas ``Area p24ab (pACC)``, ``Area p24c (pACC)`` and
``Area p32 (pACC)``. nilearn's ``fetch_atlas_juelich`` is FSL's older Juelich histological atlas,
which has no anterior cingulate areas, so fcflow reads Julich-Brain itself.

Three steps, three groups of functions:

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

from __future__ import annotations

import contextlib
import difflib
import hashlib
import http.client
import json
import logging
import os
import re
import tomllib
import urllib.error
import urllib.parse
import urllib.request
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from fcflow import __version__
from fcflow.config import SeedConfig
from fcflow.errors import AtlasError, InputDataError
from fcflow.io import atomic_path, sha256_file, write_json
from fcflow.resources import data_dir

try:  # POSIX only; on other systems concurrent cache writers are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

ENV_JULICH_DIR = "FCFLOW_JULICH_DIR"
ENV_CACHE_DIR = "FCFLOW_CACHE_DIR"
ENV_JULICH_URL = "FCFLOW_JULICH_URL"

RELEASE_FILE = "julich_brain_v3.1.toml"
MANIFEST_NAME = "manifest.json"
HEMISPHERES: dict[str, str] = {"left": "lh", "right": "rh"}
_HEMISPHERE_ALIASES = {
    "left": "left", "lh": "left", "l": "left",
    "right": "right", "rh": "right", "r": "right",
}
_SOURCES = ("mpm", "pmap")
_CHUNK_BYTES = 1 << 16
_DOWNLOAD_TIMEOUT_S = 60.0
_SPACE_RE = re.compile(r"(?:^|_)space-([a-zA-Z0-9]+)")
_RES_RE = re.compile(r"(?:^|_)res-([a-zA-Z0-9]+)")

Hemisphere = Literal["left", "right"]


# --------------------------------------------------------------------------------------------
# Release and seed definitions (data in atlases/julich_brain_v3.1.toml)
# --------------------------------------------------------------------------------------------
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
        object.__setattr__(self, "areas", _check_areas(self.areas))
        object.__setattr__(self, "hemispheres", normalize_hemispheres(self.hemispheres))
        _check_source(self.rule, "rule")
        _check_threshold(self.pmap_threshold)

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
            base_url=_normalize_base_url(str(atlas["base_url"])),
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


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------
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


def _check_areas(areas: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(areas, str):
        areas = (areas,)
    areas = tuple(areas)
    if not areas or not all(isinstance(a, str) and a.strip() for a in areas):
        raise AtlasError(
            f"'areas' must be a non-empty list of Julich-Brain area names such as "
            f"'Area p24ab (pACC)'. Got {areas!r}."
        )
    return tuple(dict.fromkeys(a.strip() for a in areas))


def _check_source(source: str, parameter: str = "source") -> None:
    if source not in _SOURCES:
        raise AtlasError(f"'{parameter}' must be one of {_SOURCES}. Got {source!r}.")


def _check_threshold(pmap_threshold: float) -> None:
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


# --------------------------------------------------------------------------------------------
# Label tables
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Finding and fetching the atlas files
# --------------------------------------------------------------------------------------------
def required_files(
    release: AtlasRelease | None = None,
    with_pmaps_for: Sequence[str] = (),
    hemispheres: Sequence[str] = ("left", "right"),
) -> list[str]:
    """Bucket paths of the files a seed needs: MPMs and label tables, plus any PMaps asked for."""
    release = load_atlas_release() if release is None else release
    hemis = normalize_hemispheres(hemispheres)
    files = [release.mpm_file(h) for h in hemis] + [release.labels_file(h) for h in hemis]
    for area in with_pmaps_for:
        files += [release.pmap_file(area, h) for h in hemis]
    return files


def find_atlas_file(atlas_dir: str | os.PathLike[str], relpath: str) -> Path | None:
    """Find a bucket file in ``atlas_dir``: at its bucket path (EBRAINS layout) or by its name alone."""
    atlas_dir = Path(atlas_dir)
    for candidate in (atlas_dir / relpath, atlas_dir / Path(relpath).name):
        if candidate.is_file():
            return candidate
    return None


def default_cache_dir() -> Path:
    """fcflow's cache: ``$FCFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/fcflow``, else ``~/.cache/fcflow``."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fcflow"
    return Path.home() / ".cache" / "fcflow"


def resolve_atlas_dir(
    julich_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    base_url: str | None = None,
    download: bool = True,
    with_pmaps_for: Sequence[str] = (),
) -> Path:
    """Return a folder holding the Julich-Brain v3.1 files, fetching them if needed.

    Three places, in this order:

    1. ``julich_dir`` (the CLI's ``--julich-dir``), else ``$FCFLOW_JULICH_DIR``: a local copy,
       in EBRAINS' folder layout or flat; it must hold every required file.
    2. fcflow's cache (``cache_dir``, else :func:`default_cache_dir`), under
       ``julich-brain/v3.1/``. Each file is checked against the size and SHA-256 recorded in the
       cache's ``manifest.json`` when it was downloaded; a mismatch is reported in a warning and
       the file is fetched again.
    3. A download from EBRAINS (``base_url``, else ``$FCFLOW_JULICH_URL``, else the release's
       bucket), written atomically into the cache.

    Parameters
    ----------
    julich_dir : path, optional
    cache_dir : path, optional
    base_url : str, optional
        Bucket URL under which the files sit at their bucket paths.
    download : bool, default=True
        If False, a file missing from the cache is an error instead of a download.
    with_pmaps_for : sequence of str, default=()
        Area names (full or short, e.g. ``"p24ab"``) whose probability maps are needed too.

    Returns
    -------
    atlas_dir : Path

    Raises
    ------
    AtlasError
        A local copy lacks files, or the download fails (offline, HTTP error); the message says
        which files to get and from where.
    """
    release = load_atlas_release()
    pmap_areas = [_pmap_area_name(a) for a in with_pmaps_for]
    needed = required_files(release, pmap_areas)
    if julich_dir is None and os.environ.get(ENV_JULICH_DIR):
        julich_dir = os.environ[ENV_JULICH_DIR]
    if julich_dir is not None:
        return _check_local_dir(Path(julich_dir).expanduser(), needed)

    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir())
    root = root / "julich-brain" / f"v{release.version}"
    url = _normalize_base_url(base_url or os.environ.get(ENV_JULICH_URL) or release.base_url)
    root.mkdir(parents=True, exist_ok=True)
    with _cache_lock(root):
        manifest = _read_manifest(root)
        to_fetch = [rel for rel in needed if not _cached_file_ok(root, rel, manifest)]
        if to_fetch and not download:
            raise AtlasError(
                f"The Julich-Brain files {[Path(r).name for r in to_fetch]} are not in the cache "
                f"{root} and downloading is off. " + _fetch_hint(release, needed, url)
            )
        for rel in to_fetch:
            size, digest = _download(url + urllib.parse.quote(rel), root / rel, release, needed, url)
            manifest["files"][rel] = {
                "size": size,
                "sha256": digest,
                "url": url + rel,
                "downloaded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            # after each file, so a failure later keeps the files already verified
            write_json(root / MANIFEST_NAME, manifest)
        check_mpm_files(root)
    return root


def _pmap_area_name(name: str) -> str:
    """PMap folder names come from full area names; accept short ones through the seed definitions."""
    if "(" in name:
        return name
    known = {a for d in load_seed_definitions().values() for a in d.areas}
    try:
        return resolve_area_name(name, sorted(known), where="fcflow's seed definitions")
    except AtlasError:
        return name


def _check_local_dir(atlas_dir: Path, needed: Sequence[str]) -> Path:
    if not atlas_dir.is_dir():
        raise AtlasError(
            f"The Julich-Brain folder {atlas_dir} (--julich-dir / {ENV_JULICH_DIR}) does not exist; "
            f"it must hold {[Path(r).name for r in needed]}."
        )
    missing = [rel for rel in needed if find_atlas_file(atlas_dir, rel) is None]
    if missing:
        raise AtlasError(
            f"The Julich-Brain folder {atlas_dir} (--julich-dir / {ENV_JULICH_DIR}) lacks "
            f"{[Path(r).name for r in missing]}: put them there, at their EBRAINS paths "
            f"({missing}) or directly in the folder."
        )
    check_mpm_files(atlas_dir)
    return atlas_dir


def check_mpm_files(atlas_dir: str | os.PathLike[str]) -> None:
    """Check that each hemisphere's maximum probability map is whole and is that hemisphere's.

    A local copy cannot be compared with checksums of the release (fcflow has no network to
    fetch them, and redistributions such as cropped copies differ byte for byte while holding
    the same labels), so its content is checked instead: each MPM must read to the end (a
    truncated file failed later with a bare ``EOFError``), hold labels, and have its labelled
    voxels on its own side (median MNI x < 0 for the left map, > 0 for the right; a left file
    holding the right map gave a right-only seed of 149 voxels instead of 305, silently); each
    label table must parse and name areas.

    Raises
    ------
    AtlasError
        Naming the file, what is wrong and what to do.
    """
    import zlib

    release = load_atlas_release()
    for hemi, side in (("left", -1.0), ("right", 1.0)):
        path = find_atlas_file(atlas_dir, release.mpm_file(hemi))
        xml = find_atlas_file(atlas_dir, release.labels_file(hemi))
        if path is None or xml is None:
            continue  # _check_local_dir names missing files
        try:
            img = nib.load(path)
            labels = np.asarray(img.dataobj)
        except (EOFError, OSError, ValueError, zlib.error) as exc:
            raise AtlasError(
                f"{path}: cannot be read as the {hemi} hemisphere's Julich-Brain map ({type(exc).__name__}: {exc}); "
                f"the file is truncated or damaged: copy it again from {release.landing_page}."
            ) from exc
        ijk = np.argwhere(labels.reshape(labels.shape[:3]) > 0)
        if len(ijk) == 0:
            raise AtlasError(f"{path}: the {hemi} hemisphere's Julich-Brain map holds no label: copy it again "
                             f"from {release.landing_page}.")
        x = np.median(ijk[:: max(1, len(ijk) // 20000)] @ img.affine[0, :3] + img.affine[0, 3])
        if x * side <= 0:
            other = "right" if hemi == "left" else "left"
            raise AtlasError(
                f"{path} should hold the {hemi} hemisphere's Julich-Brain map, but its labelled voxels lie in the "
                f"{other} hemisphere (median x = {x:.0f} mm): the two hemispheres' files are swapped or renamed; "
                "give each file its own hemisphere's name (_lh_ left, _rh_ right)."
            )
        try:
            names = read_label_table(xml)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the same user error
            raise AtlasError(f"{xml}: cannot be read as a Julich-Brain label table ({exc}): copy it again from "
                             f"{release.landing_page}.") from exc
        if not names:
            raise AtlasError(f"{xml}: the Julich-Brain label table names no area: copy it again from "
                             f"{release.landing_page}.")


def _normalize_base_url(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _fetch_hint(release: AtlasRelease, needed: Sequence[str], url: str) -> str:
    return (
        f"Pass --julich-dir (or set {ENV_JULICH_DIR}) with a local copy of "
        f"{', '.join(Path(r).name for r in needed)} (download from {url} or "
        f"{release.landing_page})."
    )


@contextlib.contextmanager
def _cache_lock(root: Path) -> Iterator[None]:
    """Serialise processes that fill the same cache (nipype runs nodes in parallel)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(root / ".lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST_NAME
    if path.is_file():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(manifest.get("files"), dict):
                return manifest
        except (ValueError, AttributeError):
            pass
        warnings.warn(
            f"The cache manifest {path} is unreadable; the Julich-Brain files are fetched again.",
            stacklevel=3,
        )
    return {"atlas": "Julich-Brain", "fcflow_version": __version__, "files": {}}


def _cached_file_ok(root: Path, rel: str, manifest: Mapping[str, Any]) -> bool:
    path = root / rel
    entry = manifest["files"].get(rel)
    if entry is None or not path.is_file():
        return False
    size = path.stat().st_size
    digest = sha256_file(path) if size == entry.get("size") else None
    if digest == entry.get("sha256"):
        return True
    warnings.warn(
        f"Cached Julich-Brain file {path} does not match the cache manifest (size {size} bytes, "
        f"expected {entry.get('size')}; SHA-256 {digest or 'not computed'}, expected "
        f"{entry.get('sha256')}): it is corrupted and will be fetched again.",
        stacklevel=3,
    )
    return False


def _download(
    url: str, dest: Path, release: AtlasRelease, needed: Sequence[str], base_url: str
) -> tuple[int, str]:
    """Stream ``url`` into ``dest`` atomically; log progress; return (size, sha256)."""
    request = urllib.request.Request(url, headers={"User-Agent": f"fcflow/{__version__}"})
    digest = hashlib.sha256()
    done = 0
    try:
        with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            logger.info("Downloading %s (%s bytes) from %s", dest.name, total or "unknown", url)
            next_report = 0.1
            with atomic_path(dest) as tmp:
                with open(tmp, "wb") as out:
                    for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if total and done / total >= next_report and done < total:
                            logger.info("%s: %d of %d bytes (%.0f%%)", dest.name, done, total,
                                        100 * done / total)
                            next_report = done / total + 0.1
                if total is not None and done != total:
                    raise AtlasError(
                        f"Download of {url} stopped after {done} of {total} bytes. "
                        + _fetch_hint(release, needed, base_url)
                    )
    except urllib.error.HTTPError as exc:
        raise AtlasError(
            f"Cannot download the Julich-Brain file {dest.name} from {url}: HTTP {exc.code} "
            f"{exc.reason}. " + _fetch_hint(release, needed, base_url)
        ) from None
    except urllib.error.URLError as exc:
        raise AtlasError(
            f"Cannot download the Julich-Brain file {dest.name} from {url} ({exc.reason}); "
            f"offline? " + _fetch_hint(release, needed, base_url)
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise AtlasError(
            f"Cannot download the Julich-Brain file {dest.name} from {url} ({exc!r}). "
            + _fetch_hint(release, needed, base_url)
        ) from None
    logger.info("%s: %d of %s bytes (done)", dest.name, done, total if total is not None else done)
    return done, digest.hexdigest()


def atlas_provenance(
    atlas_dir: str | os.PathLike[str] | None = None,
    files: Sequence[str] | None = None,
    release: AtlasRelease | None = None,
) -> dict[str, Any]:
    """Provenance of the atlas for JSON sidecars (BIDS-style CamelCase keys).

    Parameters
    ----------
    atlas_dir : path, optional
        Folder the files were read from; with it, each file's size and SHA-256 are listed.
    files : sequence of str, optional
        Bucket paths of the files used; default: both MPMs and label tables.
    """
    release = load_atlas_release() if release is None else release
    prov: dict[str, Any] = {
        "Name": release.name,
        "Version": release.version,
        "Space": release.space,
        "EbrainsDatasetVersionId": release.ebrains_dataset_version_id,
        "LandingPage": release.landing_page,
        "DownloadBaseUrl": release.base_url,
        "License": release.license,
        "LicenseUrl": release.license_url,
        "Citation": list(release.citation),
    }
    if atlas_dir is not None:
        files = required_files(release) if files is None else list(files)
        listed = []
        for rel in files:
            path = find_atlas_file(atlas_dir, rel)
            listed.append({
                "Path": rel,
                "SizeBytes": path.stat().st_size if path else None,
                "Sha256": sha256_file(path) if path else None,
            })
        prov["Files"] = listed
        prov["Verification"] = atlas_verification(atlas_dir, release)
    return prov


def atlas_verification(atlas_dir: str | os.PathLike[str], release: AtlasRelease | None = None) -> dict[str, Any]:
    """How far the atlas files in ``atlas_dir`` were verified, for sidecars and the reports' banner.

    fcflow's cache holds files downloaded from the release's own URL with the SHA-256 recorded at
    download and checked on every use (``AgainstRelease`` true). A local copy (``--julich-dir``)
    passes :func:`check_mpm_files`'s content checks only: the release publishes no checksums that
    ``atlases/*.toml`` could record offline (``AgainstRelease`` false; the reports then show a
    banner).
    """
    release = load_atlas_release() if release is None else release
    if (Path(atlas_dir) / MANIFEST_NAME).is_file():
        return {"Method": "downloaded from the release URL; SHA-256 recorded at download and checked on every use",
                "AgainstRelease": True}
    return {"Method": "local copy: content checks only (each map reads to the end, holds labels, lies on its own "
                      "hemisphere; the label tables parse)",
            "AgainstRelease": False,
            "Note": f"No release checksums are recorded in atlases/julich_brain_v{release.version}.toml to compare "
                    f"the files with; compare them with the release ({release.landing_page}) before publishing."}


def seed_caveat(meta: Mapping[str, Any]) -> tuple[str, str] | None:
    """What a report must say above its results about a seed, from the seed mask's sidecar.

    Returns ``("stand-in", description)`` for a declared stand-in mask (the simulator's sphere:
    ``StandIn`` in the sidecar), ``("unverified", note)`` for an atlas seed whose files were not
    verified against the release (:func:`atlas_verification`), else None.
    """
    if meta.get("StandIn"):
        return "stand-in", str(meta.get("MaskDescription") or meta.get("MaskFile") or "stand-in mask")
    verification = (meta.get("Atlas") or {}).get("Verification") if isinstance(meta.get("Atlas"), Mapping) else None
    if isinstance(verification, Mapping) and verification.get("AgainstRelease") is False:
        return "unverified", f"{verification.get('Method', '')}. {verification.get('Note', '')}".strip()
    return None


# --------------------------------------------------------------------------------------------
# Seed masks
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedMask:
    """A seed mask on a reference grid and how it was made (for the JSON sidecar).

    Attributes
    ----------
    img : Nifti1Image
        uint8 mask (0/1) on the reference grid.
    areas : tuple of str
        Full area names as found in the label tables.
    label_values : dict
        ``{hemisphere: {area: grey value}}``.
    n_voxels_by_hemisphere : dict
        ``{hemisphere: voxels on the reference grid}`` (a voxel shared by both counts twice).
    files : tuple of str
        Bucket paths of the atlas files read.
    """

    img: nib.Nifti1Image
    name: str
    areas: tuple[str, ...]
    hemispheres: tuple[str, ...]
    source: str
    pmap_threshold: float | None
    label_values: dict[str, dict[str, int]]
    n_voxels_by_hemisphere: dict[str, int]
    atlas_dir: Path
    files: tuple[str, ...]
    description: str = ""
    reference_file: str | None = None

    @property
    def n_voxels(self) -> int:
        return int(np.count_nonzero(np.asarray(self.img.dataobj)))

    @property
    def volume_mm3(self) -> float:
        return self.n_voxels * _voxel_volume_mm3(self.img.affine)

    @property
    def center_of_mass_mm(self) -> list[float]:
        return center_of_mass_mm(self.img)

    def to_sidecar(self) -> dict[str, Any]:
        """JSON-ready provenance: atlas, files and hashes, areas and labels, rule, size, centre."""
        affine = self.img.affine
        return {
            "Seed": self.name,
            "Description": self.description,
            "Atlas": atlas_provenance(self.atlas_dir, self.files),
            "Areas": list(self.areas),
            "LabelValues": self.label_values,
            "Hemispheres": list(self.hemispheres),
            "Source": self.source,
            "PmapThreshold": self.pmap_threshold,
            "Rule": describe_rule(self.source, self.pmap_threshold),
            "VoxelCount": self.n_voxels,
            "VoxelCountByHemisphere": self.n_voxels_by_hemisphere,
            "VolumeMm3": round(self.volume_mm3, 3),
            "CenterOfMassMm": [round(c, 2) for c in self.center_of_mass_mm],
            "Reference": {
                "File": self.reference_file,
                "Shape": [int(n) for n in self.img.shape[:3]],
                "Affine": np.round(affine, 6).tolist(),
                "VoxelSizeMm": [round(float(z), 6) for z in np.sqrt((affine[:3, :3] ** 2).sum(0))],
            },
            "GeneratedBy": {"Name": "fcflow", "Version": __version__},
        }


def build_seed_mask(
    atlas_dir: str | os.PathLike[str],
    areas: str | Sequence[str],
    hemispheres: str | Sequence[str],
    reference_img: nib.spatialimages.SpatialImage | str | os.PathLike[str],
    source: str = "mpm",
    pmap_threshold: float = 0.5,
) -> nib.Nifti1Image:
    """Build a binary seed mask from Julich-Brain areas, on the grid of ``reference_img``.

    Parameters
    ----------
    atlas_dir : path
        Folder with the atlas files (see :func:`resolve_atlas_dir`).
    areas : str or sequence of str
        Area names, e.g. ``["Area p24ab (pACC)", "Area p24c (pACC)", "Area p32 (pACC)"]``;
        short forms (``"p24ab"``) are accepted when unambiguous.
    hemispheres : str or sequence of {"left", "right"}
        ``"both"`` for both.
    reference_img : nibabel image or path
        3D or 4D image (e.g. a BOLD run) whose grid the mask takes. Any orientation, including
        oblique and flipped axes: the atlas is resampled through both affines.
    source : {"mpm", "pmap"}, default="mpm"
        ``mpm``: labels of the maximum probability maps, nearest-neighbour resampled. ``pmap``:
        probability maps, trilinearly resampled, then thresholded.
    pmap_threshold : float, default=0.5
        Minimum probability for ``source="pmap"``.

    Returns
    -------
    seed_img : Nifti1Image
        uint8 (0/1) on the reference grid.
    """
    return build_seed(
        atlas_dir, areas, hemispheres, reference_img, source=source, pmap_threshold=pmap_threshold
    ).img


def build_seed(
    atlas_dir: str | os.PathLike[str],
    areas: str | Sequence[str],
    hemispheres: str | Sequence[str],
    reference_img: nib.spatialimages.SpatialImage | str | os.PathLike[str],
    source: str = "mpm",
    pmap_threshold: float = 0.5,
    *,
    name: str = "seed",
    description: str = "",
    release: AtlasRelease | None = None,
) -> SeedMask:
    """Like :func:`build_seed_mask`, and keep what the sidecar needs (see :class:`SeedMask`)."""
    release = load_atlas_release() if release is None else release
    areas = _check_areas(areas)
    hemis = normalize_hemispheres(hemispheres)
    _check_source(source)
    _check_threshold(pmap_threshold)
    atlas_dir = Path(atlas_dir)
    reference_file = str(reference_img) if isinstance(reference_img, (str, os.PathLike)) else None
    ref_shape, ref_affine, ref_header = _reference_grid(reference_img)

    tables = {h: read_label_table(_atlas_file(atlas_dir, release.labels_file(h))) for h in hemis}
    full_names = _resolve_areas(areas, tables, atlas_dir, release)

    union = np.zeros(ref_shape, dtype=bool)
    label_values: dict[str, dict[str, int]] = {}
    n_by_hemi: dict[str, int] = {}
    files: list[str] = []
    for hemi in hemis:
        label_values[hemi] = {a: tables[hemi][a] for a in full_names}
        files.append(release.labels_file(hemi))
        if source == "mpm":
            files.append(release.mpm_file(hemi))
            hemi_mask = _mpm_mask(atlas_dir, release, hemi, label_values[hemi], ref_shape, ref_affine)
        else:
            hemi_mask = np.zeros(ref_shape, dtype=bool)
            for area in full_names:
                files.append(release.pmap_file(area, hemi))
                hemi_mask |= _pmap_mask(
                    atlas_dir, release, area, hemi, pmap_threshold, ref_shape, ref_affine
                )
        n_by_hemi[hemi] = int(hemi_mask.sum())
        union |= hemi_mask

    if not union.any():
        where = f"the grid of {Path(reference_file).name}" if reference_file else "the reference grid"
        space = space_entity(reference_file)
        raise InputDataError(
            f"Seed areas {list(full_names)} have 0 voxels on {where} (shape {ref_shape}, world "
            f"box {_world_box(ref_shape, ref_affine)} mm): check that it is in {release.space}"
            + (f" (found space {space!r} in its file name)." if space else ".")
        )

    out = nib.Nifti1Image(union.astype(np.uint8), ref_affine)
    if isinstance(ref_header, nib.Nifti1Header):
        sform_code = int(ref_header["sform_code"]) or 2
        qform_code = int(ref_header["qform_code"]) or sform_code
        out.set_sform(ref_affine, code=sform_code)
        out.set_qform(ref_affine, code=qform_code)
    out.header.set_xyzt_units("mm")
    out.header["descrip"] = f"fcflow {name}: Julich-Brain {release.version}"[:79].encode()
    return SeedMask(
        img=out,
        name=name,
        areas=full_names,
        hemispheres=hemis,
        source=source,
        pmap_threshold=pmap_threshold if source == "pmap" else None,
        label_values=label_values,
        n_voxels_by_hemisphere=n_by_hemi,
        atlas_dir=atlas_dir,
        files=tuple(dict.fromkeys(files)),
        description=description,
        reference_file=reference_file,
    )


def build_seed_from_definition(
    atlas_dir: str | os.PathLike[str],
    definition: SeedDefinition,
    reference_img: nib.spatialimages.SpatialImage | str | os.PathLike[str],
) -> SeedMask:
    """:func:`build_seed` for a :class:`SeedDefinition`."""
    return build_seed(
        atlas_dir, definition.areas, definition.hemispheres, reference_img,
        source=definition.rule, pmap_threshold=definition.pmap_threshold,
        name=definition.name, description=definition.description,
    )


def center_of_mass_mm(img: nib.spatialimages.SpatialImage) -> list[float]:
    """World (mm) centre of mass of a binary mask; NaNs if it is empty."""
    ijk = np.argwhere(np.asarray(img.dataobj) > 0)
    if ijk.size == 0:
        return [float("nan")] * 3
    return [float(c) for c in nib.affines.apply_affine(img.affine, ijk).mean(axis=0)]


def _atlas_file(atlas_dir: Path, relpath: str) -> Path:
    path = find_atlas_file(atlas_dir, relpath)
    if path is None:
        raise AtlasError(
            f"The Julich-Brain folder {atlas_dir} lacks {Path(relpath).name} (EBRAINS path "
            f"{relpath}): fetch it with resolve_atlas_dir() or pass a complete --julich-dir."
        )
    return path


def _resolve_areas(
    areas: Sequence[str], tables: Mapping[str, Mapping[str, int]], atlas_dir: Path,
    release: AtlasRelease,
) -> tuple[str, ...]:
    resolved = []
    for area in areas:
        found: dict[str, str] = {}
        errors: dict[str, AtlasError] = {}
        for hemi, table in tables.items():
            try:
                found[hemi] = resolve_area_name(
                    area, sorted(table), where=f"the {hemi}-hemisphere label table "
                    f"{Path(release.labels_file(hemi)).name} in {atlas_dir}"
                )
            except AtlasError as exc:
                errors[hemi] = exc
        if not found:
            raise next(iter(errors.values()))
        if errors:
            hemi = next(iter(errors))
            present = sorted(found)
            raise AtlasError(
                f"Area {next(iter(found.values()))!r} is not in the {hemi}-hemisphere label table "
                f"{Path(release.labels_file(hemi)).name} in {atlas_dir} (it is in the {present[0]} "
                f"one): restrict the seed to hemispheres={present} or drop the area."
            )
        names = set(found.values())
        if len(names) > 1:
            raise AtlasError(f"Area {area!r} means {sorted(names)} in the two hemispheres' tables.")
        resolved.append(names.pop())
    return tuple(dict.fromkeys(resolved))


def _reference_grid(
    reference_img: nib.spatialimages.SpatialImage | str | os.PathLike[str],
) -> tuple[tuple[int, int, int], NDArray[np.float64], Any]:
    if isinstance(reference_img, (str, os.PathLike)):
        try:
            reference_img = nib.load(reference_img)
        except (FileNotFoundError, nib.filebasedimages.ImageFileError) as exc:
            raise InputDataError(f"Cannot read the reference image {reference_img}: {exc}.") from None
    if not isinstance(reference_img, nib.spatialimages.SpatialImage) or reference_img.ndim not in (3, 4):
        raise InputDataError(
            f"'reference_img' must be a 3D or 4D image (or its path). Got {reference_img!r}."
        )
    affine = np.asarray(reference_img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise InputDataError(f"The reference image has a singular affine: {affine.tolist()}.")
    return tuple(int(n) for n in reference_img.shape[:3]), affine, reference_img.header  # type: ignore[return-value]


def resample_to_reference(
    data: NDArray[Any], affine: NDArray[np.float64], ref_shape: tuple[int, int, int],
    ref_affine: NDArray[np.float64], interpolation: str,
) -> NDArray[Any]:
    """``data`` (on ``affine``) resampled onto the reference grid with nilearn's ``resample_img``.

    ``interpolation`` is nilearn's (``"nearest"`` for labels and masks, ``"linear"`` for
    probabilities). Only the non-zero bounding box is resampled (same result, much less work).
    """
    # Imported here: nilearn is heavy and only this step needs it.
    from nilearn.image import resample_img
    from nilearn.image.resampling import BoundingBoxError

    # Crop to the non-zero box first (+1 voxel margin for trilinear): same result, much less work.
    nz = np.argwhere(data)
    if nz.size == 0:
        return np.zeros(ref_shape, dtype=data.dtype)
    lo = np.maximum(nz.min(0) - 1, 0)
    hi = np.minimum(nz.max(0) + 2, data.shape)
    crop = np.ascontiguousarray(data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    crop_affine = affine.copy()
    crop_affine[:3, 3] = nib.affines.apply_affine(affine, lo)
    img = nib.Nifti1Image(crop, crop_affine)
    with warnings.catch_warnings():
        # nilearn warns about casting and non-diagonal affines; neither matters here
        warnings.simplefilter("ignore")
        try:
            out = resample_img(
                img, target_affine=ref_affine, target_shape=ref_shape,
                interpolation=interpolation, force_resample=True, copy_header=True, fill_value=0,
            )
        except BoundingBoxError:  # the reference grid does not reach the area: nothing to keep
            return np.zeros(ref_shape, dtype=data.dtype)
    return np.asarray(out.dataobj)


def _mpm_mask(
    atlas_dir: Path, release: AtlasRelease, hemi: str, values: Mapping[str, int],
    ref_shape: tuple[int, int, int], ref_affine: NDArray[np.float64],
) -> NDArray[np.bool_]:
    path = _atlas_file(atlas_dir, release.mpm_file(hemi))
    img = nib.load(path)
    if img.ndim != 3:
        raise AtlasError(f"The MPM {path} must be a 3D label image. Got shape {img.shape}.")
    labels = np.asanyarray(img.dataobj)
    if not np.issubdtype(labels.dtype, np.integer):
        labels = np.rint(labels).astype(np.int32)
    for area, value in values.items():
        if not np.any(labels == value):
            warnings.warn(
                f"Area {area!r} (grey value {value}) has 0 voxels in the {hemi}-hemisphere MPM "
                f"{path.name}: the seed gets nothing from it in that hemisphere.",
                stacklevel=4,
            )
    selected = np.isin(labels, list(values.values())).astype(np.uint8)
    # Label maps take nearest neighbour: a voxel keeps the area at its centre, never a blend.
    return resample_to_reference(selected, img.affine, ref_shape, ref_affine, "nearest") > 0


def _pmap_mask(
    atlas_dir: Path, release: AtlasRelease, area: str, hemi: str, threshold: float,
    ref_shape: tuple[int, int, int], ref_affine: NDArray[np.float64],
) -> NDArray[np.bool_]:
    relpath = release.pmap_file(area, hemi)
    path = find_atlas_file(atlas_dir, relpath)
    if path is None:
        raise AtlasError(
            f"source='pmap' needs the probability map {Path(relpath).name} of {area!r}, which the "
            f"Julich-Brain folder {atlas_dir} lacks: fetch it with resolve_atlas_dir("
            f"with_pmaps_for=[{area!r}]) or add it (EBRAINS path {relpath}), or use source='mpm'."
        )
    img = nib.load(path)
    prob = np.asarray(img.dataobj, dtype=np.float32)
    if prob.ndim != 3 or np.nanmin(prob) < 0 or np.nanmax(prob) > 1 + 1e-4:
        raise AtlasError(
            f"The probability map {path} must be 3D with values in [0, 1]. Got shape {prob.shape}, "
            f"range [{np.nanmin(prob):g}, {np.nanmax(prob):g}]."
        )
    # Resample the probabilities, then threshold: thresholding first and resampling a binary map
    # would move the boundary by up to half an atlas voxel on coarse grids.
    resampled = resample_to_reference(np.nan_to_num(prob), img.affine, ref_shape, ref_affine, "linear")
    return resampled >= threshold - 1e-6


def _voxel_volume_mm3(affine: NDArray[np.float64]) -> float:
    return float(abs(np.linalg.det(affine[:3, :3])))


def _world_box(shape: Sequence[int], affine: NDArray[np.float64]) -> list[list[float]]:
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    xyz = nib.affines.apply_affine(affine, corners)
    return [np.round(xyz.min(0), 1).tolist(), np.round(xyz.max(0), 1).tolist()]


# --------------------------------------------------------------------------------------------
# Per-run checks
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedQC:
    """Seed quality in one run (see :func:`seed_qc`); ``asdict``/``to_dict`` give JSON-ready values."""

    run_name: str
    seed_name: str
    n_voxels_seed: int
    n_voxels: int
    volume_mm3: float
    coverage: float
    min_coverage: float
    excluded: bool
    exclusion_reason: str | None = None
    n_timepoints: int | None = None
    tsnr_median: float | None = None
    tsnr_mean: float | None = None
    tsnr_seed_signal: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mask_seed(
    seed_img: nib.spatialimages.SpatialImage, brain_mask_img: nib.spatialimages.SpatialImage,
    run_name: str = "the run",
) -> nib.Nifti1Image:
    """Intersect a seed with a brain mask on the same grid (uint8 0/1)."""
    seed, brain = _same_grid_masks(seed_img, brain_mask_img, run_name)
    return nib.Nifti1Image((seed & brain).astype(np.uint8), seed_img.affine, seed_img.header)


def seed_qc(
    seed_img: nib.spatialimages.SpatialImage | str | os.PathLike[str],
    brain_mask_img: nib.spatialimages.SpatialImage | str | os.PathLike[str],
    bold_data_or_img: NDArray[Any] | nib.spatialimages.SpatialImage | str | os.PathLike[str] | None = None,
    min_coverage: float = SeedConfig.min_coverage,
    run_name: str = "the run",
    *,
    seed_name: str = "seed",
) -> SeedQC:
    """Check a seed in one run: voxels inside the brain mask, coverage, tSNR; flag exclusion.

    Parameters
    ----------
    seed_img : nibabel image or path
        Seed mask on the run's grid (from :func:`build_seed_mask` with the run as reference).
    brain_mask_img : nibabel image or path
        The run's brain mask (e.g. fMRIPrep's ``desc-brain_mask``), same grid.
    bold_data_or_img : 4D image, path, ndarray of shape (n_timepoints, n_voxels) or 4D array, optional
        The run's time series for tSNR. A 2D array holds either the seed voxels inside the brain
        mask or all brain-mask voxels (both in C order of the grid).
    min_coverage : float, default=0.8
        Minimum fraction of the seed (voxels on the run grid, before intersection) that must lie
        inside the brain mask; below it the run is flagged ``excluded`` with a reason and a
        warning.
    run_name : str, default="the run"
        Run identifier or BOLD file name, used in messages (its ``space-`` entity is quoted).
    seed_name : str, default="seed"

    Returns
    -------
    qc : SeedQC
        ``n_voxels_seed`` (before intersection), ``n_voxels`` and ``volume_mm3`` (inside the
        mask), ``coverage``, ``tsnr_median``/``tsnr_mean`` (over the seed voxels of each voxel's
        mean / std over time, std with ddof=0 as in fMRIPrep), ``tsnr_seed_signal`` (tSNR of the
        mean seed time series), ``excluded`` and ``exclusion_reason``.

    Raises
    ------
    InputDataError
        The seed has no voxel inside the brain mask (wrong space, most likely), or the images are
        not on one grid.
    """
    if not (isinstance(min_coverage, (int, float)) and 0 <= min_coverage <= 1):
        raise InputDataError(f"'min_coverage' must be a fraction in [0, 1]. Got {min_coverage!r}.")
    brain_mask_file = brain_mask_img
    seed_img = _load(seed_img, "seed_img")
    brain_mask_img = _load(brain_mask_img, "brain_mask_img")
    seed, brain = _same_grid_masks(seed_img, brain_mask_img, run_name)
    inside = seed & brain
    n_seed, n_in = int(seed.sum()), int(inside.sum())
    if n_in == 0:
        # the run name may lack the space entity that the BOLD or mask file name carries
        named = [run_name] + [
            f for f in (bold_data_or_img, brain_mask_file) if isinstance(f, (str, os.PathLike))
        ]
        space = next((sp for sp in map(space_entity, named) if sp), None)
        found = f" (found space {space!r} in its file name)" if space else ""
        raise InputDataError(
            f"Seed {seed_name!r} has 0 voxels inside the brain mask of {run_name} "
            f"({n_seed} seed voxels on its grid): check that the BOLD run is in "
            f"MNI152NLin2009cAsym{found}."
        )
    coverage = n_in / n_seed
    reason = None
    if coverage < min_coverage:
        reason = (
            f"{n_seed - n_in} of {n_seed} voxels of seed {seed_name!r} lie outside the brain mask "
            f"of {run_name}; coverage {coverage:.2f} is below the minimum of {min_coverage:.2f} "
            f"(min_coverage). Run excluded."
        )
        warnings.warn(reason, stacklevel=2)
    tsnr = (None, None, None, None)
    if bold_data_or_img is not None:
        series = _seed_series(bold_data_or_img, inside, brain, seed_img, run_name)
        tsnr = (series.shape[0], *_tsnr(series))
    return SeedQC(
        run_name=run_name,
        seed_name=seed_name,
        n_voxels_seed=n_seed,
        n_voxels=n_in,
        volume_mm3=round(n_in * _voxel_volume_mm3(seed_img.affine), 3),
        coverage=coverage,
        min_coverage=float(min_coverage),
        excluded=reason is not None,
        exclusion_reason=reason,
        n_timepoints=tsnr[0],
        tsnr_median=tsnr[1],
        tsnr_mean=tsnr[2],
        tsnr_seed_signal=tsnr[3],
    )


def _load(img: Any, parameter: str) -> nib.spatialimages.SpatialImage:
    if isinstance(img, (str, os.PathLike)):
        try:
            return nib.load(img)
        except (FileNotFoundError, nib.filebasedimages.ImageFileError) as exc:
            raise InputDataError(f"Cannot read '{parameter}' {img}: {exc}.") from None
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise InputDataError(f"'{parameter}' must be a nibabel image or a path. Got {type(img).__name__}.")
    return img


def _same_grid_masks(
    seed_img: nib.spatialimages.SpatialImage, brain_mask_img: nib.spatialimages.SpatialImage,
    run_name: str,
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    if seed_img.shape[:3] != brain_mask_img.shape[:3] or not np.allclose(
        seed_img.affine, brain_mask_img.affine, atol=1e-3
    ):
        raise InputDataError(
            f"The seed and the brain mask of {run_name} are not on one grid (shapes "
            f"{seed_img.shape[:3]} and {brain_mask_img.shape[:3]}): build the seed with the run's "
            f"BOLD image as reference_img."
        )
    seed = np.asarray(seed_img.dataobj)
    brain = np.asarray(brain_mask_img.dataobj)
    return seed.reshape(seed.shape[:3]) > 0, brain.reshape(brain.shape[:3]) > 0


def _seed_series(
    bold: Any, inside: NDArray[np.bool_], brain: NDArray[np.bool_],
    seed_img: nib.spatialimages.SpatialImage, run_name: str,
) -> NDArray[np.float64]:
    if isinstance(bold, (str, os.PathLike, nib.spatialimages.SpatialImage)):
        img = _load(bold, "bold_data_or_img")
        if img.ndim != 4 or img.shape[:3] != inside.shape or not np.allclose(
            img.affine, seed_img.affine, atol=1e-3
        ):
            raise InputDataError(
                f"The BOLD image of {run_name} must be 4D on the seed's grid {inside.shape}. "
                f"Got shape {img.shape}."
            )
        # Read only the seed's bounding box: a gzipped run is otherwise loaded whole.
        ijk = np.argwhere(inside)
        lo, hi = ijk.min(0), ijk.max(0) + 1
        box = np.asarray(img.dataobj[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2], :], dtype=np.float64)
        return box[inside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]].T
    # select the seed's voxels before any conversion: a float64 copy of a whole run is 0.6 GB
    data = np.asarray(bold)
    if data.ndim == 4 and data.shape[:3] == inside.shape:
        return data[inside].T.astype(np.float64)
    if data.ndim == 2:
        if data.shape[1] == inside.sum():
            return data.astype(np.float64)
        if data.shape[1] == brain.sum():
            return data[:, inside[brain]].astype(np.float64)
    raise InputDataError(
        f"'bold_data_or_img' of {run_name} must be a 4D image, a 4D array on the seed's grid, or "
        f"an array of shape (n_timepoints, n_voxels) with n_voxels = {int(inside.sum())} (seed "
        f"voxels in the mask) or {int(brain.sum())} (brain-mask voxels). Got shape {data.shape}."
    )


def _tsnr(series: NDArray[np.float64]) -> tuple[float | None, float | None, float | None]:
    if series.shape[0] < 2:
        return None, None, None
    from fcflow.niftiio import compute_tsnr

    voxel_tsnr = compute_tsnr(series)
    signal = series.mean(axis=1)
    signal_std = signal.std()
    valid = voxel_tsnr[np.isfinite(voxel_tsnr)]
    return (
        float(np.median(valid)) if valid.size else None,
        float(valid.mean()) if valid.size else None,
        float(signal.mean() / signal_std) if signal_std > 0 else None,
    )


def seed_from_mask_file(
    mask_file: str | os.PathLike[str],
    reference_img: nib.spatialimages.SpatialImage | str | os.PathLike[str],
    *,
    name: str = "seed",
) -> tuple[nib.Nifti1Image, dict[str, Any]]:
    """Put a user's seed mask (any non-zero voxel) on a run's grid, by nearest neighbour.

    Returns the uint8 mask on the reference grid and a provenance sidecar (file, SHA-256, voxels,
    volume, centre of mass). A JSON sidecar beside the mask file (``<stem>.json``) is read for
    its ``Description`` (``MaskDescription``) and whether the mask is a stand-in (``StandIn``:
    the sidecar says ``"StandIn": true`` or its ``Type`` names a stand-in, as the simulator's
    stand-in pgACC does); the reports show a banner for a stand-in seed.
    """
    from nilearn.image import resample_to_img

    from fcflow.io import sha256_file

    source = _load(mask_file, "mask_file")
    data = np.asanyarray(source.dataobj)
    binary = nib.Nifti1Image((data.reshape(data.shape[:3]) != 0).astype(np.uint8), source.affine)
    reference = _load(reference_img, "reference_img")
    grid = nib.Nifti1Image(np.zeros(reference.shape[:3], dtype=np.uint8), reference.affine)
    resampled = resample_to_img(binary, grid, interpolation="nearest", force_resample=True,
                                copy_header=True)
    img = nib.Nifti1Image((np.asanyarray(resampled.dataobj) > 0).astype(np.uint8), reference.affine)
    n_voxels = int(np.count_nonzero(img.dataobj))
    if n_voxels == 0:
        raise InputDataError(
            f"Seed {name!r} from {mask_file} has 0 voxels on the grid of {reference_img}: check that "
            "the mask and the BOLD run are in the same space."
        )
    sidecar = {
        "Seed": name,
        "Source": "mask file",
        "MaskFile": str(Path(mask_file).resolve()),
        "MaskSha256": sha256_file(mask_file),
        "Rule": "non-zero voxels of the mask file, resampled to the run's grid by nearest neighbour",
        "NumberOfVoxels": n_voxels,
        "VolumeMm3": round(n_voxels * _voxel_volume_mm3(img.affine), 3),
        "CenterOfMassMm": center_of_mass_mm(img),
    }
    own = Path(str(mask_file).removesuffix(".gz").removesuffix(".nii") + ".json")
    if own.is_file():
        try:
            meta = json.loads(own.read_text())
        except (OSError, ValueError) as exc:
            raise InputDataError(f"The seed mask's sidecar {own} is not valid JSON ({exc}): fix or remove it.") from exc
        if isinstance(meta, dict):
            sidecar["MaskDescription"] = meta.get("Description")
            sidecar["StandIn"] = bool(meta.get("StandIn")) or "stand-in" in str(meta.get("Type", "")).lower()
    return img, sidecar
