"""Finding and fetching the Julich-Brain files: a local copy, fcflow's verified cache, or a download.

:func:`resolve_atlas_dir` returns a folder holding the files a recipe needs; the cache is
checked against a SHA-256 manifest on every use and written under a lock. Also the atlas'
provenance and verification state that seed sidecars and reports carry.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fcflow import __version__
from fcflow.errors import AtlasError
from fcflow.io import atomic_path, sha256_file, write_json

try:  # POSIX only; on other systems concurrent cache writers are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]
from fcflow.atlas.release import (
    AtlasRelease,
    load_atlas_release,
    load_seed_definitions,
    normalize_base_url,
    normalize_hemispheres,
    read_label_table,
    resolve_area_name,
)

logger = logging.getLogger(__name__)

_DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 16
MANIFEST_NAME = "manifest.json"
ENV_JULICH_URL = "FCFLOW_JULICH_URL"
ENV_CACHE_DIR = "FCFLOW_CACHE_DIR"
ENV_JULICH_DIR = "FCFLOW_JULICH_DIR"


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
    url = normalize_base_url(base_url or os.environ.get(ENV_JULICH_URL) or release.base_url)
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
