"""Atomic writers: every file fcflow writes appears complete or not at all.

Each writer writes to a hidden temporary file in the destination folder and renames it over the
final name (``os.replace`` is atomic on POSIX within one file system), so a crash or a kill leaves
either the previous file or nothing, never a truncated one that a later step would trust.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import pandas as pd

from fcflow.errors import OutputError

# nibabel chooses the format from the suffix, so temporary names keep the full suffix.
_COMPOUND_SUFFIXES = (".nii.gz", ".tsv.gz")


def _split_suffix(name: str) -> tuple[str, str]:
    for suffix in _COMPOUND_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if dot else (name, "")


#: OS errors of writing an output that the user fixes, and how
_OUTPUT_ERRNOS = {
    errno.ENOSPC: "Free space on that disk (or choose another OUTPUT_DIR / --work-dir) and rerun the same "
                  "command: it resumes, and nothing was left half-written.",
    errno.EDQUOT: "The disk quota is used up: free space or raise the quota, then rerun the same command.",
    errno.EROFS: "The file system is read-only: choose a writable OUTPUT_DIR / --work-dir.",
    errno.EACCES: "No permission to write there: choose a folder you can write to, or fix its permissions.",
    errno.ENOTDIR: "A path component is a file, not a folder: choose another OUTPUT_DIR or move the file.",
}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds.

    The parent folder is created. On an exception the temporary file is removed and ``path`` is
    left untouched.
    """
    final = Path(path)
    stem, suffix = _split_suffix(final.name)
    tmp = final.with_name(f".{stem}.tmp-{os.getpid()}{suffix}")
    try:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            if exc.errno in _OUTPUT_ERRNOS and not isinstance(exc, OutputError):
                raise OutputError(exc.errno, f"Cannot write {final}: {exc.strerror}. "
                                             f"{_OUTPUT_ERRNOS[exc.errno]}") from exc
            raise
    finally:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError, PermissionError):
            tmp.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write ``payload`` as indented, key-sorted JSON (stable bytes for the same content)."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_tsv(path: str | os.PathLike[str], table: pd.DataFrame) -> Path:
    """Write ``table`` as a BIDS TSV (tab-separated, ``n/a`` for missing values, no index)."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    return Path(path)


def save_img(img: nib.spatialimages.SpatialImage, path: str | os.PathLike[str]) -> Path:
    """Save a nibabel image atomically (the format follows the suffix of ``path``).

    nibabel writes gzip streams with a zero modification time, so the same image gives the same
    bytes on every run.
    """
    with atomic_path(path) as tmp:
        img.to_filename(tmp)
    return Path(path)


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Return the hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def input_stamps(paths: Sequence[str | os.PathLike[str] | None]) -> str:
    """A text that changes whenever any of ``paths`` is written, renamed over or replaced.

    Per file: the resolved path, size, modification time, status-change time (``ctime``) and
    inode. Writing a file, even restoring its size and modification time afterwards (``touch -d``,
    ``cp -p``, ``os.utime``), changes its ``ctime``, which no user tool can set back, so a node
    whose inputs include this text reruns on any change of content. Why not nipype's content
    hashing: it reads every input file in full at every node check and on every resume; measured
    here (2 shared cores), nipype's md5 runs at about 170 MB/s (0.26 s for a 43 MB 4 mm
    300-volume BOLD, 0.65 s for a 110 MB one), so a 2 mm run's 366 MB .nii.gz costs about 2.2 s
    per hash, as much as fcflow's whole read of it (2.2-4.3 s, benchmarks/); it is hashed by two
    nodes of each run on every invocation: about 33 min of one core per invocation (resumes
    included) of a 450-run 2 mm study, for a check that ``stat`` answers without reading. The
    cost of this one is a false positive: copying the dataset elsewhere recomputes everything.
    """
    stamps = []
    for path in paths:
        if path is None:
            continue
        resolved = Path(path).resolve()
        info = resolved.stat()
        stamps.append([str(resolved), info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino])
    return json.dumps(stamps)
