"""Tests for fcflow.atlas (Julich-Brain seeds) and the ``fcflow seeds`` command.

Three kinds of atlas:

- a synthetic one, written here: two small label images (axes 21 x 16 x 13, all different) with
  EBRAINS-style XML tables and probability maps, for edge cases with a planted truth;
- the real Julich-Brain v3.1 MPMs, from ``$FCFLOW_TEST_JULICH_DIR`` (skipped when unset);
- either of them served in EBRAINS' bucket layout by an HTTP server on 127.0.0.1, for downloads.

No test touches the network or the home directory: every test runs with a temporary
``FCFLOW_CACHE_DIR``.
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fcflow.atlas import fetch as atlas_fetch
from fcflow.atlas import release as atlas_release
from fcflow.atlas import seedqc as atlas_seedqc
from fcflow.atlas import seeds as atlas_seeds
from fcflow.cli import main
from fcflow.errors import AtlasError, InputDataError
from fcflow.io import sha256_file
from fcflow.templates import mni_grid

PGACC = ("Area p24ab (pACC)", "Area p24c (pACC)", "Area p32 (pACC)")
SGACC = ("Area s24 (sACC)", "Area s32 (sACC)", "Area 25 (sACC)")
RELEASE = atlas_release.load_atlas_release()


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh cache per test; no user atlas settings; loopback never goes through a proxy."""
    monkeypatch.setenv(atlas_fetch.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(atlas_fetch.ENV_JULICH_DIR, raising=False)
    monkeypatch.delenv(atlas_fetch.ENV_JULICH_URL, raising=False)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _real_atlas_dir() -> Path | None:
    value = os.environ.get("FCFLOW_TEST_JULICH_DIR") or os.environ.get("FCFLOW_JULICH_TEST_DIR")
    return Path(value) if value else None


@pytest.fixture
def real_dir() -> Path:
    path = _real_atlas_dir()
    if path is None:
        pytest.skip("set FCFLOW_TEST_JULICH_DIR to the Julich-Brain v3.1 files to run this test")
    return path


# Synthetic atlas: 1 mm, x from -10 to +10 mm (left: x < 0), blocks of known size per area.
SYN_SHAPE = (21, 16, 13)
SYN_AFFINE = np.array([[1.0, 0, 0, -10], [0, 1, 0, 30], [0, 0, 1, -6], [0, 0, 0, 1]])
SYN_BLOCKS = {  # name: (grey value, y slice, z slice)
    "Area p24ab (pACC)": (20, slice(1, 5), slice(1, 5)),
    "Area p24c (pACC)": (126, slice(5, 8), slice(5, 9)),
    "Area p32 (pACC)": (90, slice(8, 13), slice(1, 5)),
    "Area 33 (ACC)": (143, slice(1, 5), slice(9, 12)),
    "Area s24 (sACC)": (197, slice(13, 15), slice(1, 4)),
    "Area s32 (sACC)": (186, slice(13, 15), slice(5, 8)),
    "Area 25 (sACC)": (71, slice(13, 15), slice(9, 12)),
}
SYN_X = {"left": slice(3, 9), "right": slice(12, 18)}  # x = -7..-2 mm and +2..+7 mm
SYN_FILLER = {"Area 7PC (SPL)": 206, "Area hIP7 (IPS)": 205}


def _write_xml(path: Path, table: dict[str, int], hemi: str) -> None:
    rows = "\n".join(
        f'  <Structure id="{v}" grayvalue="{v}">{name}</Structure>' for name, v in table.items()
    )
    path.write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<JulichBrainAtlas version="3.1" hemisphere="{hemi}" space="MNI152NLin2009cAsym">\n'
        f" <Structures>\n{rows}\n </Structures>\n</JulichBrainAtlas>\n",
        encoding="utf-8",
    )


def _syn_pmap(area: str, hemi: str) -> np.ndarray:
    """A smooth probability blob centred on the area's block, peak 0.9."""
    _, ys, zs = SYN_BLOCKS[area]
    xs = SYN_X[hemi]
    i, j, k = np.meshgrid(*(np.arange(n) for n in SYN_SHAPE), indexing="ij")
    centre = [(s.start + s.stop - 1) / 2 for s in (xs, ys, zs)]
    dist2 = (i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2
    return (0.9 * np.exp(-dist2 / (2 * 2.5**2))).astype(np.float32)


def make_synthetic_atlas(folder: Path, *, drop_from_right: str | None = None,
                         with_pmaps: bool = True) -> Path:
    """Write lh/rh MPMs, XML tables and PMaps (flat layout) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for hemi in ("left", "right"):
        labels = np.zeros(SYN_SHAPE, dtype=np.uint8)
        table = dict(SYN_FILLER)
        for name, (value, ys, zs) in SYN_BLOCKS.items():
            if hemi == "right" and name == drop_from_right:
                continue
            labels[SYN_X[hemi], ys, zs] = value
            table[name] = value
        labels[0, 0, 0] = SYN_FILLER["Area 7PC (SPL)"]
        nib.save(nib.Nifti1Image(labels, SYN_AFFINE), folder / Path(RELEASE.mpm_file(hemi)).name)
        _write_xml(folder / Path(RELEASE.labels_file(hemi)).name, table, atlas_release.HEMISPHERES[hemi])
        if with_pmaps:
            for name in SYN_BLOCKS:
                nib.save(nib.Nifti1Image(_syn_pmap(name, hemi), SYN_AFFINE),
                         folder / Path(RELEASE.pmap_file(name, hemi)).name)
    return folder


@pytest.fixture
def syn_dir(tmp_path: Path) -> Path:
    return make_synthetic_atlas(tmp_path / "synthetic")


def syn_truth(areas, hemispheres) -> np.ndarray:
    """Atlas-grid truth of a synthetic seed."""
    truth = np.zeros(SYN_SHAPE, dtype=bool)
    for hemi in hemispheres:
        for area in areas:
            _, ys, zs = SYN_BLOCKS[area]
            truth[SYN_X[hemi], ys, zs] = True
    return truth


def ref_img(shape, affine, n_timepoints: int | None = None) -> nib.Nifti1Image:
    full = tuple(shape) + ((n_timepoints,) if n_timepoints else ())
    return nib.Nifti1Image(np.zeros(full, dtype=np.float32), np.asarray(affine, dtype=float))


# --------------------------------------------------------------------------------------------
# Independent computations (numpy/scipy only)
# --------------------------------------------------------------------------------------------
def independent_nearest(atlas_mask: np.ndarray, atlas_affine: np.ndarray, shape, affine) -> np.ndarray:
    """For each reference voxel centre: world -> atlas voxel by the inverse affine, rounded."""
    ijk = np.indices(shape).reshape(3, -1).T
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    inv = np.linalg.inv(atlas_affine)
    src = np.floor(world @ inv[:3, :3].T + inv[:3, 3] + 0.5).astype(int)
    inside = np.all((src >= 0) & (src < atlas_mask.shape), axis=1)
    out = np.zeros(len(src), dtype=bool)
    out[inside] = atlas_mask[tuple(src[inside].T)]
    return out.reshape(shape)


def independent_linear(prob: np.ndarray, atlas_affine: np.ndarray, shape, affine) -> np.ndarray:
    ijk = np.indices(shape).reshape(3, -1).T
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    inv = np.linalg.inv(atlas_affine)
    src = world @ inv[:3, :3].T + inv[:3, 3]
    return ndimage.map_coordinates(prob, src.T, order=1, mode="constant", cval=0.0).reshape(shape)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def real_labels(real: Path, hemi: str, areas) -> tuple[np.ndarray, np.ndarray]:
    """Atlas-grid mask of ``areas`` in one hemisphere of the real atlas, labels read from its XML."""
    table = atlas_release.read_label_table(real / Path(RELEASE.labels_file(hemi)).name)
    img = nib.load(real / Path(RELEASE.mpm_file(hemi)).name)
    return np.isin(np.asarray(img.dataobj), [table[a] for a in areas]), img.affine


# --------------------------------------------------------------------------------------------
# Real atlas (FCFLOW_TEST_JULICH_DIR)
# --------------------------------------------------------------------------------------------
@pytest.mark.julich
def test_real_pgacc_matches_independent_resampling(real_dir: Path) -> None:
    shape, affine = mni_grid(2)
    seed = atlas_seeds.build_seed(real_dir, PGACC, ("left", "right"), ref_img(shape, affine), name="pgACC")
    mask = np.asarray(seed.img.dataobj) > 0
    assert seed.img.get_data_dtype() == np.uint8 and seed.img.shape == shape
    np.testing.assert_allclose(seed.img.affine, affine)

    expected = np.zeros(shape, dtype=bool)
    for hemi in ("left", "right"):
        labels, atlas_affine = real_labels(real_dir, hemi, PGACC)
        expected |= independent_nearest(labels, atlas_affine, shape, affine)
    d = dice(mask, expected)
    com = np.array(seed.center_of_mass_mm)
    print(f"\npgACC 2 mm: Dice {d:.4f}, voxels {seed.n_voxels} {seed.n_voxels_by_hemisphere}, "
          f"volume {seed.volume_mm3:.0f} mm3, centre of mass {np.round(com, 2)}")
    assert d >= 0.97
    assert np.linalg.norm(com - [0, 47, 9]) <= 4.0
    assert seed.label_values["left"] == {"Area p24ab (pACC)": 20, "Area p24c (pACC)": 126,
                                         "Area p32 (pACC)": 90}
    # 2 mm voxels hold 8 atlas voxels: counts near the 1 mm volume / 8
    n_1mm = sum(real_labels(real_dir, h, PGACC)[0].sum() for h in ("left", "right"))
    assert abs(seed.n_voxels - n_1mm / 8) / (n_1mm / 8) < 0.05


@pytest.mark.julich
def test_real_hemispheres_and_sgacc_from_definitions(real_dir: Path) -> None:
    shape, affine = mni_grid(2)
    reference = ref_img(shape, affine)
    defs = atlas_release.load_seed_definitions()
    seeds = {name: atlas_seeds.build_seed_from_definition(real_dir, defs[name], reference)
             for name in ("pgACC", "pgACCleft", "pgACCright", "sgACC")}
    left, right, both = (np.asarray(seeds[n].img.dataobj) > 0
                         for n in ("pgACCleft", "pgACCright", "pgACC"))
    assert not np.any(left & right)
    np.testing.assert_array_equal(left | right, both)
    assert seeds["pgACCleft"].center_of_mass_mm[0] < -3
    assert seeds["pgACCright"].center_of_mass_mm[0] > 3
    assert seeds["pgACCleft"].hemispheres == ("left",)

    sg = seeds["sgACC"]
    expected = np.zeros(shape, dtype=bool)
    for hemi in ("left", "right"):
        labels, atlas_affine = real_labels(real_dir, hemi, SGACC)
        expected |= independent_nearest(labels, atlas_affine, shape, affine)
    assert dice(np.asarray(sg.img.dataobj) > 0, expected) >= 0.97
    assert sg.areas == SGACC
    x, y, z = sg.center_of_mass_mm
    assert abs(x) < 4 and 20 < y < 40 and z < -5  # below the genu
    assert not np.any(both & (np.asarray(sg.img.dataobj) > 0))


# --------------------------------------------------------------------------------------------
# Download through a loopback HTTP server in EBRAINS' bucket layout
# --------------------------------------------------------------------------------------------
class _Bucket:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        handler = functools.partial(_RecordingHandler, bucket=self, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/bucket/"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> _Bucket:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class _RecordingHandler(http.server.SimpleHTTPRequestHandler):
    timeout = 10  # a stuck client cannot hold the test

    def __init__(self, *args, bucket: _Bucket, **kwargs) -> None:
        self.bucket = bucket
        super().__init__(*args, **kwargs)

    def translate_path(self, path: str) -> str:
        self.bucket.requests.append(path)
        return super().translate_path(path.removeprefix("/bucket"))

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


def _bucket_tree(source: Path, dest: Path) -> Path:
    """Copy an atlas folder into the EBRAINS bucket layout (sub-folders)."""
    for rel in atlas_fetch.required_files(RELEASE, with_pmaps_for=PGACC):
        src = source / Path(rel).name
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / rel)
    return dest


@pytest.fixture(params=["synthetic", "real"])
def served(request, tmp_path: Path) -> Iterator[tuple[_Bucket, Path]]:
    if request.param == "real":
        source = request.getfixturevalue("real_dir")
    else:
        source = make_synthetic_atlas(tmp_path / "synthetic")
    with _Bucket(_bucket_tree(source, tmp_path / "served")) as bucket:
        yield bucket, source


def _requested(bucket: _Bucket) -> list[str]:
    return [Path(p).name for p in bucket.requests]


def test_download_cache_and_corruption(served, tmp_path: Path, caplog) -> None:
    bucket, source = served
    cache = tmp_path / "dlcache"
    shape, affine = mni_grid(2)
    reference = ref_img(shape, affine)
    local = np.asarray(atlas_seeds.build_seed_mask(source, PGACC, "both", reference).dataobj)

    with caplog.at_level(logging.INFO, logger="fcflow.atlas"):
        got = atlas_fetch.resolve_atlas_dir(cache_dir=cache, base_url=bucket.url)
    assert got == cache / "julich-brain" / "v3.1"
    assert sorted(_requested(bucket)) == sorted(Path(r).name for r in atlas_fetch.required_files())
    assert re.search(r"MPM_lh_MNI152\.nii\.gz: \d+ of \d+ bytes", caplog.text)  # progress
    manifest = json.loads((got / "manifest.json").read_text())
    mpm_rel = RELEASE.mpm_file("left")
    assert manifest["files"][mpm_rel]["sha256"] == sha256_file(source / Path(mpm_rel).name)
    downloaded = np.asarray(atlas_seeds.build_seed_mask(got, PGACC, "both", reference).dataobj)
    np.testing.assert_array_equal(downloaded, local)

    # second use: served from the cache, no request
    n_before = len(bucket.requests)
    assert atlas_fetch.resolve_atlas_dir(cache_dir=cache, base_url=bucket.url) == got
    assert len(bucket.requests) == n_before

    # a corrupted cached file is detected, reported and fetched again (that file only)
    (got / mpm_rel).write_bytes(b"not a nifti file")
    with pytest.warns(UserWarning, match=r"does not match the cache manifest.*fetched again"):
        atlas_fetch.resolve_atlas_dir(cache_dir=cache, base_url=bucket.url)
    assert _requested(bucket)[n_before:] == [Path(mpm_rel).name]
    again = np.asarray(atlas_seeds.build_seed_mask(got, PGACC, "both", reference).dataobj)
    np.testing.assert_array_equal(again, local)


def test_download_url_from_environment_and_pmaps(tmp_path: Path, monkeypatch) -> None:
    source = make_synthetic_atlas(tmp_path / "synthetic")
    with _Bucket(_bucket_tree(source, tmp_path / "served")) as bucket:
        monkeypatch.setenv(atlas_fetch.ENV_JULICH_URL, bucket.url.rstrip("/"))
        got = atlas_fetch.resolve_atlas_dir(with_pmaps_for=["p24ab"])
        assert got == tmp_path / "cache" / "julich-brain" / "v3.1"  # FCFLOW_CACHE_DIR
        assert "Area-p24ab_lh_MNI152.nii.gz" in _requested(bucket)
        assert (got / RELEASE.pmap_file("Area p24ab (pACC)", "right")).is_file()


def test_download_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    source = make_synthetic_atlas(tmp_path / "synthetic")
    tree = _bucket_tree(source, tmp_path / "served")
    (tree / RELEASE.labels_file("right")).unlink()
    with _Bucket(tree) as bucket:
        with pytest.raises(AtlasError, match=r"MPM_rh_MNI152\.xml.*HTTP 404.*Pass --julich-dir .*"
                                             r"local copy of .*MPM_lh_MNI152\.nii\.gz"):
            atlas_fetch.resolve_atlas_dir(cache_dir=tmp_path / "c", base_url=bucket.url)
    # the files that did arrive are kept and verified; nothing half-written is left
    cached = tmp_path / "c" / "julich-brain" / "v3.1"
    assert (cached / RELEASE.mpm_file("left")).is_file()
    assert not list(cached.rglob(".*tmp-*"))


class _TruncatingHandler(http.server.BaseHTTPRequestHandler):
    timeout = 10

    def do_GET(self) -> None:  # promises 1000 bytes, sends 10, hangs up
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"0123456789")
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


def test_truncated_download_leaves_nothing(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TruncatingHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        with pytest.raises(AtlasError, match=r"MPM_lh_MNI152\.nii\.gz stopped after 10 of 1000 bytes\. Pass --julich-dir"):
            atlas_fetch.resolve_atlas_dir(cache_dir=tmp_path / "c", base_url=url)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    cached = tmp_path / "c" / "julich-brain" / "v3.1"
    assert [p.name for p in cached.rglob("*") if p.is_file()] == [".lock"]


def test_offline_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(AtlasError, match=r"offline\? Pass --julich-dir .* \(download from "):
        atlas_fetch.resolve_atlas_dir(cache_dir=tmp_path / "c", base_url=f"http://127.0.0.1:{port}/x")


def test_no_download_with_empty_cache(tmp_path: Path) -> None:
    with pytest.raises(AtlasError, match=r"not in the cache .* downloading is off\. Pass --julich-dir"):
        atlas_fetch.resolve_atlas_dir(cache_dir=tmp_path / "c", download=False)


# --------------------------------------------------------------------------------------------
# Local copies
# --------------------------------------------------------------------------------------------
def test_local_dir_flat_or_bucket_layout_and_env(syn_dir: Path, tmp_path: Path, monkeypatch) -> None:
    assert atlas_fetch.resolve_atlas_dir(syn_dir) == syn_dir
    tree = _bucket_tree(syn_dir, tmp_path / "tree")
    monkeypatch.setenv(atlas_fetch.ENV_JULICH_DIR, str(tree))
    assert atlas_fetch.resolve_atlas_dir(with_pmaps_for=PGACC) == tree
    shape, affine = mni_grid(2)
    a = atlas_seeds.build_seed_mask(syn_dir, PGACC, "both", ref_img(shape, affine))
    b = atlas_seeds.build_seed_mask(tree, PGACC, "both", ref_img(shape, affine))
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


def test_local_dir_missing_file(syn_dir: Path, tmp_path: Path) -> None:
    (syn_dir / Path(RELEASE.mpm_file("right")).name).unlink()
    with pytest.raises(AtlasError, match=rf"{syn_dir}.*lacks \['JulichBrainAtlas_3\.1_207areas_MPM_rh"):
        atlas_fetch.resolve_atlas_dir(syn_dir)
    with pytest.raises(AtlasError, match=r"does not exist; it must hold \['JulichBrainAtlas"):
        atlas_fetch.resolve_atlas_dir(tmp_path / "nowhere")
    shape, affine = mni_grid(4)
    with pytest.raises(AtlasError, match=r"lacks JulichBrainAtlas_3\.1_207areas_MPM_rh_MNI152\.nii\.gz"):
        atlas_seeds.build_seed_mask(syn_dir, PGACC, "both", ref_img(shape, affine))


# --------------------------------------------------------------------------------------------
# Areas by name
# --------------------------------------------------------------------------------------------
def test_read_label_table_and_names(syn_dir: Path, tmp_path: Path) -> None:
    table = atlas_release.read_label_table(syn_dir / Path(RELEASE.labels_file("left")).name)
    assert table["Area p24ab (pACC)"] == 20 and table["Area 25 (sACC)"] == 71
    names = sorted(table)
    assert atlas_release.resolve_area_name("area P24AB (pacc)", names) == "Area p24ab (pACC)"
    assert atlas_release.resolve_area_name("p24ab", names) == "Area p24ab (pACC)"
    assert atlas_release.resolve_area_name("Area 25", names) == "Area 25 (sACC)"
    assert atlas_release.area_key("Area p24ab (pACC)") == "Area-p24ab"
    bad = tmp_path / "bad.xml"
    bad.write_text("<Structures><Structure grayvalue='x'>A</Structure></Structures>")
    with pytest.raises(AtlasError, match="without a name or an integer grayvalue"):
        atlas_release.read_label_table(bad)
    bad.write_text("<Structures><Structure")
    with pytest.raises(AtlasError, match="Cannot read the Julich-Brain label table"):
        atlas_release.read_label_table(bad)


def test_unknown_area_lists_close_matches(syn_dir: Path) -> None:
    shape, affine = mni_grid(4)
    with pytest.raises(AtlasError, match=r"Unknown area 'Area p42ab \(pACC\)'.*Close matches: "
                                         r"\['Area p24ab \(pACC\)'"):
        atlas_seeds.build_seed_mask(syn_dir, ["Area p42ab (pACC)"], "both", ref_img(shape, affine))


def test_area_missing_from_one_hemisphere(tmp_path: Path) -> None:
    folder = make_synthetic_atlas(tmp_path / "a", drop_from_right="Area p24c (pACC)")
    shape, affine = mni_grid(2)
    with pytest.raises(AtlasError, match=r"'Area p24c \(pACC\)' is not in the right-hemisphere label "
                                         r"table .* restrict the seed to hemispheres=\['left'\]"):
        atlas_seeds.build_seed_mask(folder, PGACC, "both", ref_img(shape, affine))
    left = atlas_seeds.build_seed_mask(folder, PGACC, ["left"], ref_img(shape, affine))
    assert np.asarray(left.dataobj).sum() > 0


def test_area_in_table_without_voxels_warns(tmp_path: Path) -> None:
    folder = make_synthetic_atlas(tmp_path / "a")
    path = folder / Path(RELEASE.mpm_file("right")).name
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    data[data == 126] = 0
    nib.save(nib.Nifti1Image(data, img.affine), path)
    shape, affine = mni_grid(2)
    with pytest.warns(UserWarning, match=r"'Area p24c \(pACC\)' \(grey value 126\) has 0 voxels in "
                                         r"the right-hemisphere MPM"):
        atlas_seeds.build_seed_mask(folder, PGACC, "both", ref_img(shape, affine))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hemispheres": "middle"}, r"'hemispheres' must be 'left', 'right' or both\. Got 'middle'"),
        ({"source": "atlas"}, r"'source' must be one of \('mpm', 'pmap'\)\. Got 'atlas'"),
        ({"pmap_threshold": 0}, r"'pmap_threshold' must be a probability in \(0, 1\]\. Got 0"),
        ({"areas": []}, r"'areas' must be a non-empty list"),
    ],
)
def test_build_seed_mask_validates(syn_dir: Path, kwargs, match) -> None:
    shape, affine = mni_grid(4)
    args = {"areas": PGACC, "hemispheres": "both", "reference_img": ref_img(shape, affine)} | kwargs
    with pytest.raises(AtlasError, match=match):
        atlas_seeds.build_seed_mask(syn_dir, **args)


# --------------------------------------------------------------------------------------------
# Grids: the synthetic truth through regular, flipped, oblique and 4D references
# --------------------------------------------------------------------------------------------
def test_mask_on_atlas_grid_is_exact(syn_dir: Path) -> None:
    seed = atlas_seeds.build_seed_mask(syn_dir, PGACC, "both", ref_img(SYN_SHAPE, SYN_AFFINE))
    np.testing.assert_array_equal(np.asarray(seed.dataobj) > 0, syn_truth(PGACC, ("left", "right")))


@pytest.mark.parametrize("hemispheres", [("left",), ("right",), ("left", "right")])
def test_flipped_reference_keeps_world_positions(syn_dir: Path, hemispheres) -> None:
    # x axis flipped (radiological storage) and y stored backwards: world positions must not move
    affine = np.array([[-2.0, 0, 0, 12], [0, -2, 0, 48], [0, 0, 2, -8], [0, 0, 0, 1]])
    shape = (13, 11, 9)
    seed = atlas_seeds.build_seed_mask(syn_dir, PGACC, hemispheres, ref_img(shape, affine))
    expected = independent_nearest(syn_truth(PGACC, hemispheres), SYN_AFFINE, shape, affine)
    np.testing.assert_array_equal(np.asarray(seed.dataobj) > 0, expected)
    x = atlas_seeds.center_of_mass_mm(seed)[0]
    assert (x < 0) if hemispheres == ("left",) else (x > 0) if hemispheres == ("right",) else abs(x) < 1


def test_oblique_reference(syn_dir: Path) -> None:
    angle = np.deg2rad(17.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ tilt @ np.diag([1.3, 1.1, 1.2])
    affine[:3, 3] = [-14, 24, -12]
    shape = (30, 26, 22)
    seed = atlas_seeds.build_seed_mask(syn_dir, PGACC, "both", ref_img(shape, affine, n_timepoints=3))
    assert seed.shape == shape and seed.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seed.affine, affine)
    expected = independent_nearest(syn_truth(PGACC, ("left", "right")), SYN_AFFINE, shape, affine)
    assert expected.sum() > 200
    assert dice(np.asarray(seed.dataobj) > 0, expected) >= 0.99


def test_seed_outside_reference_grid_is_an_error(syn_dir: Path, tmp_path: Path) -> None:
    affine = np.diag([2.0, 2, 2, 1])
    affine[:3, 3] = [100, 100, 100]  # far from the seed
    path = tmp_path / "sub-01_task-rest_space-T1w_desc-preproc_bold.nii.gz"
    nib.save(ref_img((7, 8, 9), affine, n_timepoints=2), path)
    with pytest.raises(InputDataError, match=r"0 voxels on the grid of sub-01.*found space 'T1w'"):
        atlas_seeds.build_seed_mask(syn_dir, PGACC, "both", path)


# --------------------------------------------------------------------------------------------
# Probability maps
# --------------------------------------------------------------------------------------------
def test_pmap_threshold_resample_then_threshold(syn_dir: Path) -> None:
    shape, affine = (12, 10, 9), np.array([[2.0, 0, 0, -11], [0, 2, 0, 29], [0, 0, 2, -7], [0, 0, 0, 1]])
    reference = ref_img(shape, affine)
    masks = {}
    for threshold in (0.3, 0.6):
        seed = atlas_seeds.build_seed(syn_dir, ["p24ab"], "both", reference, source="pmap",
                                pmap_threshold=threshold)
        expected = np.zeros(shape, dtype=bool)
        for hemi in ("left", "right"):
            prob = _syn_pmap("Area p24ab (pACC)", hemi)
            expected |= independent_linear(prob, SYN_AFFINE, shape, affine) >= threshold
        got = np.asarray(seed.img.dataobj) > 0
        assert expected.sum() > 0 and dice(got, expected) >= 0.99
        assert seed.to_sidecar()["PmapThreshold"] == threshold
        assert "thresholded at p >= " in seed.to_sidecar()["Rule"]
        masks[threshold] = got
    assert masks[0.6].sum() < masks[0.3].sum() and not np.any(masks[0.6] & ~masks[0.3])


def test_pmap_missing_or_out_of_range(syn_dir: Path) -> None:
    shape, affine = mni_grid(4)
    (syn_dir / "Area-p32_rh_MNI152.nii.gz").unlink()
    with pytest.raises(AtlasError, match=r"source='pmap' needs the probability map "
                                         r"Area-p32_rh_MNI152\.nii\.gz .*with_pmaps_for"):
        atlas_seeds.build_seed_mask(syn_dir, PGACC, "both", ref_img(shape, affine), source="pmap")
    nib.save(nib.Nifti1Image(_syn_pmap("Area p24ab (pACC)", "left") * 100, SYN_AFFINE),
             syn_dir / "Area-p24ab_lh_MNI152.nii.gz")
    with pytest.raises(AtlasError, match=r"must be 3D with values in \[0, 1\]"):
        atlas_seeds.build_seed_mask(syn_dir, ["p24ab"], "left", ref_img(shape, affine), source="pmap")


# --------------------------------------------------------------------------------------------
# Per-run QC
# --------------------------------------------------------------------------------------------
QC_SHAPE = (7, 8, 9)
QC_AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])


def _qc_images(seed_box, brain_box):
    seed = np.zeros(QC_SHAPE, dtype=np.uint8)
    seed[seed_box] = 1
    brain = np.zeros(QC_SHAPE, dtype=np.uint8)
    brain[brain_box] = 1
    return nib.Nifti1Image(seed, QC_AFFINE), nib.Nifti1Image(brain, QC_AFFINE)


def test_seed_qc_coverage_and_tsnr(tmp_path: Path) -> None:
    seed_img, brain_img = _qc_images(np.s_[2:5, 2:6, 3:6], np.s_[:, :, :])  # 36 voxels
    rng = np.random.default_rng(0)
    n_t = 400
    bold = 100 + 2 * rng.standard_normal(QC_SHAPE + (n_t,))  # voxel tSNR 50
    qc = atlas_seedqc.seed_qc(seed_img, brain_img, bold, run_name="sub-01_task-rest", seed_name="pgACC")
    assert (qc.n_voxels_seed, qc.n_voxels, qc.coverage, qc.excluded) == (36, 36, 1.0, False)
    assert qc.volume_mm3 == 36 * 27 and qc.n_timepoints == n_t
    assert qc.tsnr_median == pytest.approx(50, rel=0.05)
    # the mean of 36 independent series has ~6 times less noise
    assert qc.tsnr_seed_signal == pytest.approx(50 * 6, rel=0.15)

    mask = np.asarray(seed_img.dataobj) > 0
    expected = np.median(bold[mask].mean(1) / bold[mask].std(1))
    assert qc.tsnr_median == pytest.approx(expected)
    path = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(bold.astype(np.float32), QC_AFFINE), path)
    for other in (path, bold[mask].T, bold.reshape(-1, n_t)[np.ones(np.prod(QC_SHAPE), bool)].T):
        assert atlas_seedqc.seed_qc(seed_img, brain_img, other).tsnr_median == pytest.approx(expected, rel=1e-5)
    assert json.dumps(qc.to_dict())
    with pytest.raises(InputDataError, match=r"must be a 4D image, .*n_voxels = 36"):
        atlas_seedqc.seed_qc(seed_img, brain_img, np.zeros((10, 5)))


def test_seed_qc_low_coverage_excludes_run() -> None:
    seed_img, brain_img = _qc_images(np.s_[2:6, 2:6, 2:6], np.s_[:, :, :4])  # half the seed inside
    with pytest.warns(UserWarning, match=r"32 of 64 voxels of seed 'pgACC' lie outside the brain mask "
                                         r"of sub-02; coverage 0\.50 is below the minimum of 0\.80 "
                                         r"\(min_coverage\)\. Run excluded\."):
        qc = atlas_seedqc.seed_qc(seed_img, brain_img, min_coverage=0.8, run_name="sub-02", seed_name="pgACC")
    assert qc.excluded and qc.coverage == 0.5 and qc.n_voxels == 32
    assert "Run excluded" in qc.exclusion_reason
    assert not atlas_seedqc.seed_qc(seed_img, brain_img, min_coverage=0.5).excluded
    masked = atlas_seedqc.mask_seed(seed_img, brain_img)
    assert np.asarray(masked.dataobj).sum() == 32


def test_seed_qc_zero_voxels_names_run_and_space(tmp_path: Path) -> None:
    seed_img, brain_img = _qc_images(np.s_[0:2, 0:2, 0:2], np.s_[4:, 4:, 4:])
    run = "sub-07_ses-24h_task-rest_space-T1w_desc-preproc_bold.nii.gz"
    with pytest.raises(InputDataError, match=r"Seed 'pgACC' has 0 voxels inside the brain mask of "
                                             r"sub-07_ses-24h.*MNI152NLin2009cAsym \(found space 'T1w'"):
        atlas_seedqc.seed_qc(seed_img, brain_img, run_name=run, seed_name="pgACC")
    # the space entity is also found in the BOLD file name when the run name lacks it
    bold_file = tmp_path / run
    nib.save(nib.Nifti1Image(np.zeros(QC_SHAPE + (3,), np.float32), QC_AFFINE), bold_file)
    with pytest.raises(InputDataError, match=r"of sub-07_ses-24h_task-rest .*found space 'T1w'"):
        atlas_seedqc.seed_qc(seed_img, brain_img, bold_file, run_name="sub-07_ses-24h_task-rest")


def test_seed_qc_validates() -> None:
    seed_img, brain_img = _qc_images(np.s_[0:2, 0:2, 0:2], np.s_[:, :, :])
    with pytest.raises(InputDataError, match=r"'min_coverage' must be a fraction in \[0, 1\]\. Got 2"):
        atlas_seedqc.seed_qc(seed_img, brain_img, min_coverage=2)
    other = nib.Nifti1Image(np.ones((7, 8, 10), np.uint8), QC_AFFINE)
    with pytest.raises(InputDataError, match=r"not on one grid"):
        atlas_seedqc.seed_qc(seed_img, other, run_name="sub-03")


# --------------------------------------------------------------------------------------------
# Seed definitions, provenance, CLI
# --------------------------------------------------------------------------------------------
def test_seed_definitions() -> None:
    defs = atlas_release.load_seed_definitions()
    assert defs["pgACC"].areas == PGACC and defs["pgACC"].hemispheres == ("left", "right")
    assert defs["pgACCleft"].hemispheres == ("left",) and defs["pgACCright"].hemispheres == ("right",)
    assert defs["sgACC"].areas == SGACC and defs["sgACC"].rule == "mpm"
    assert defs["pgACCpmap"].rule == "pmap" and defs["pgACCpmap"].pmap_threshold == 0.5
    assert RELEASE.ebrains_dataset_version_id == "f1fe19e8-99bd-44bc-9616-a52850680777"
    assert RELEASE.license == "CC BY-NC-SA 4.0"
    assert any("10.1126/science.abb4588" in c for c in RELEASE.citation)
    with pytest.raises(AtlasError, match=r"Unknown seed 'pgAC'.*Did you mean \['pgACC'"):
        atlas_release.get_seed_definition("pgAC", defs)


def test_seed_definition_strings_and_both(tmp_path: Path) -> None:
    path = tmp_path / "seeds.toml"
    path.write_text('[seeds.acc33]\nareas = "Area 33 (ACC)"\nhemispheres = "both"\n')
    (definition,) = atlas_release.load_seed_definitions(path).values()
    assert definition.areas == ("Area 33 (ACC)",) and definition.hemispheres == ("left", "right")
    assert definition.rule == "mpm" and definition.pmap_threshold == 0.5


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ('areas = ["A"]\nhemisphere = ["left"]', r"unknown keys \['hemisphere'\]"),
        ('areas = ["A"]\nhemispheres = ["up"]', r"'hemispheres' must be 'left', 'right'"),
        ('areas = ["A"]\nrule = "max"', r"'rule' must be one of"),
        ('hemispheres = ["left"]', r"must list its 'areas'"),
        ('areas = ["A"]\npmap_threshold = "high"', r"'pmap_threshold' must be a probability"),
    ],
)
def test_seed_definitions_validate(tmp_path: Path, table: str, match: str) -> None:
    path = tmp_path / "seeds.toml"
    path.write_text(f"[seeds.bad]\n{table}\n")
    with pytest.raises(AtlasError, match=rf"Seed 'bad' in .*seeds\.toml.*{match}"):
        atlas_release.load_seed_definitions(path)


def test_atlas_provenance(syn_dir: Path) -> None:
    prov = atlas_fetch.atlas_provenance(syn_dir)
    assert prov["Version"] == "3.1" and prov["License"] == "CC BY-NC-SA 4.0"
    assert prov["EbrainsDatasetVersionId"] == "f1fe19e8-99bd-44bc-9616-a52850680777"
    assert [f["Sha256"] for f in prov["Files"]] == [
        sha256_file(syn_dir / Path(r).name) for r in atlas_fetch.required_files()
    ]


def test_cli_seeds_writes_masks_and_sidecars(syn_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    status = main(["seeds", "-o", str(out), "--julich-dir", str(syn_dir), "--resolution", "2",
                   "--seed", "pgACC", "--seed", "sgACC",
                   "--areas", "p24ab", "Area 33 (ACC)", "--hemisphere", "left", "--seed-name", "myACC"])
    assert status == 0
    for name in ("pgACC", "sgACC", "myACC"):
        mask = nib.load(out / f"space-MNI152NLin2009cAsym_res-2_seed-{name}_mask.nii.gz")
        sidecar = json.loads((out / f"space-MNI152NLin2009cAsym_res-2_seed-{name}_mask.json").read_text())
        assert mask.shape == (97, 115, 97) and mask.get_data_dtype() == np.uint8
        assert sidecar["VoxelCount"] == int(np.asarray(mask.dataobj).sum()) > 0
        assert sidecar["VolumeMm3"] == 8 * sidecar["VoxelCount"]
        assert sidecar["Atlas"]["EbrainsDatasetVersionId"] == RELEASE.ebrains_dataset_version_id
        assert all(len(f["Sha256"]) == 64 for f in sidecar["Atlas"]["Files"])
        np.testing.assert_allclose(sidecar["CenterOfMassMm"], atlas_seeds.center_of_mass_mm(mask), atol=0.01)
    sidecar = json.loads((out / "space-MNI152NLin2009cAsym_res-2_seed-myACC_mask.json").read_text())
    assert sidecar["Areas"] == ["Area p24ab (pACC)", "Area 33 (ACC)"]
    assert sidecar["Hemispheres"] == ["left"] and sidecar["LabelValues"]["left"]["Area 33 (ACC)"] == 143
    assert sidecar["Rule"].startswith("union of the areas' labels")


def test_cli_seeds_reference_space_and_errors(syn_dir: Path, tmp_path: Path, capsys) -> None:
    shape, affine = mni_grid(3)
    good = tmp_path / "sub-01_space-MNI152NLin2009cAsym_res-3_desc-preproc_bold.nii.gz"
    nib.save(ref_img(shape, affine, n_timepoints=2), good)
    assert main(["seeds", "-o", str(tmp_path / "o"), "--julich-dir", str(syn_dir),
                 "--reference", str(good), "--seed", "pgACCright"]) == 0
    assert (tmp_path / "o" / "space-MNI152NLin2009cAsym_res-3_seed-pgACCright_mask.nii.gz").is_file()

    bad = tmp_path / "sub-01_space-T1w_desc-preproc_bold.nii.gz"
    nib.save(ref_img(shape, affine), bad)
    assert main(["seeds", "-o", str(tmp_path / "o"), "--julich-dir", str(syn_dir),
                 "--reference", str(bad)]) == 1
    assert "is in space 'T1w', but the Julich-Brain atlas is in MNI152NLin2009cAsym" in capsys.readouterr().err
    assert main(["seeds", "-o", str(tmp_path / "o"), "--julich-dir", str(syn_dir), "--seed", "pgAC"]) == 1
    assert "Unknown seed 'pgAC'" in capsys.readouterr().err
    assert main(["seeds", "--list"]) == 0
    assert "sgACC" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["synthetic", "real"])
def test_local_atlas_with_swapped_or_truncated_files_is_refused(kind, tmp_path: Path, request) -> None:
    # issue 17: a left file holding the right map gave a right-only seed (exit 0); a truncated file a
    # bare EOFError naming no file
    import shutil

    source = request.getfixturevalue("real_dir") if kind == "real" else make_synthetic_atlas(tmp_path / "syn")
    names = {hemi: Path(RELEASE.mpm_file(hemi)).name for hemi in ("left", "right")}
    swapped = tmp_path / "swapped"
    shutil.copytree(source, swapped, copy_function=shutil.copyfile)  # the shared copy is read-only
    swapped.chmod(0o755)
    (swapped / names["left"]).rename(swapped / "tmp.nii.gz")
    (swapped / names["right"]).rename(swapped / names["left"])
    (swapped / "tmp.nii.gz").rename(swapped / names["right"])
    with pytest.raises(AtlasError, match=rf"{names['left']} should hold the left hemisphere's Julich-Brain map, but "
                                         r"its labelled voxels lie in the right hemisphere \(median x = \d+ mm\)"):
        atlas_fetch.resolve_atlas_dir(swapped)
    truncated = tmp_path / "truncated"
    shutil.copytree(source, truncated, copy_function=shutil.copyfile)
    truncated.chmod(0o755)
    data = (truncated / names["right"]).read_bytes()
    (truncated / names["right"]).write_bytes(data[: len(data) // 2])
    with pytest.raises(AtlasError, match=rf"{names['right']}: cannot be read as the right hemisphere's Julich-Brain "
                                         r"map .* truncated or damaged"):
        atlas_fetch.resolve_atlas_dir(truncated)
    assert atlas_fetch.resolve_atlas_dir(source) == Path(source)
