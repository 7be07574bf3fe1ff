"""Both reports in a real headless browser: every image loads, the console stays clean, screenshots kept.

A tiny simulated study goes through ``fcflow ... participant`` and ``fcflow ... group`` (the real
command line, nipype included). Chromium (Debian's ``chromium``) opens each page and the test
drives it over the DevTools protocol (``--remote-debugging-port``, ``websocket-client``): it
collects console errors, uncaught exceptions and browser log errors (a missing image is logged as
"Failed to load resource"), checks that every ``<img>`` finished loading with a non-zero natural
width, and saves a screenshot of each page to ``$FCFLOW_ARTIFACTS_DIR`` (default: the test's
temporary folder). The DevTools route is used rather than ``--dump-dom`` because it sees errors
that happen before any script of the page could, and it reports them as structured events.

Skipped without chromium or websocket-client, unless ``FCFLOW_TEST_BROWSER=1`` (CI), which turns
the skip into a failure.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

_BROWSERS = ("chromium", "chromium-browser", "google-chrome")
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--hide-scrollbars", "--window-size=1280,4000", "--remote-debugging-port=0")


def _required() -> bool:
    return os.environ.get("FCFLOW_TEST_BROWSER") == "1"


@pytest.fixture(scope="module")
def browser_path() -> str:
    path = next((p for p in map(shutil.which, _BROWSERS) if p), None)
    problem = None if path else f"no headless browser on PATH (tried {', '.join(_BROWSERS)})"
    try:
        import websocket  # noqa: F401
    except ImportError:
        problem = problem or "websocket-client is not installed (pip install -e '.[test]')"
    if problem:
        if _required():
            pytest.fail(f"FCFLOW_TEST_BROWSER=1 but {problem}: apt-get install chromium.")
        pytest.skip(problem)
    return path


class DevTools:
    """A headless Chromium and one page, driven over the DevTools protocol (bounded waits)."""

    def __init__(self, browser: str, profile: Path, timeout_s: float = 60.0) -> None:
        import websocket

        self.timeout_s = timeout_s
        self.process = subprocess.Popen([browser, *_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = self._port()
        deadline = time.monotonic() + timeout_s
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
                pages = [t for t in json.load(answer) if t.get("type") == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert pages, "chromium opened no page"
        self.socket = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=timeout_s,
                                                  suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _port(self) -> int:
        deadline = time.monotonic() + self.timeout_s
        seen = []
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                break
            seen.append(line)
            match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if match:
                return int(match.group(1))
        self.process.kill()
        raise AssertionError(f"chromium did not start its DevTools server: {''.join(seen)[-2000:]}")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message.get("result", {})
            self.events.append(message)
        raise AssertionError(f"no answer to {method} within {self.timeout_s} s")

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + self.timeout_s
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            assert time.monotonic() < deadline, f"{url} did not finish loading"
            self.events.append(json.loads(self.socket.recv()))

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"]["value"]

    def errors(self) -> list[str]:
        out = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                out.append("exception: " + params["exceptionDetails"].get("text", ""))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return out

    def screenshot(self, path: Path, width: int = 1280, height: int = 4000) -> Path:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _fcflow(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "fcflow", *args], capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """A tiny study (2 per group, 240 volumes, 4 mm) through both levels with reports."""
    from fcflow.cli.demo import _stand_in_recipe
    from fcflow.simulate import simulate_study

    root = tmp_path_factory.mktemp("browser")
    bids = root / "bids"
    # 240 volumes: the rest runs keep more than the recipe's min_dof (80 would keep none).
    simulate_study(bids, n_per_group=2, resolution_mm=4, n_volumes=240, seed=5)
    recipe = _stand_in_recipe(root, bids)
    text = recipe.read_text()
    # 6 subjects cannot carry age, sex and mean FD; a low mean-FD limit excludes a few runs.
    text = re.sub(r"(?m)^covariates = .*$", "covariates = []", text)
    text = re.sub(r"(?m)^max_mean_fd_mm = .*$", "max_mean_fd_mm = 0.3", text)
    recipe.write_text(text)
    out = root / "out"
    common = ["--recipe", str(recipe), "--work-dir", str(root / "work")]
    participant = _fcflow(str(bids), str(out), "participant", *common, "--nprocs", "2")
    group = _fcflow(str(bids), str(out), "group", *common, "--n-permutations", "50")
    return {"out": out, "participant_stdout": participant, "group_stdout": group}


def _check_group_numbers(browser: DevTools, out: Path) -> None:
    """Issue 19: each result's numbers, as the browser shows them, against the maps and cluster tables."""
    import nibabel as nib
    import numpy as np

    shown = browser.evaluate("""Array.from(document.querySelectorAll('section.result[data-stat-map]')).map(s => {
        const table = s.querySelector('table.clusters');
        const head = table ? Array.from(table.rows[0].cells).map(c => c.textContent) : [];
        const first = table ? Array.from(table.rows[1].cells).map(c => c.textContent) : [];
        const peak = s.querySelector('.cluster-peak');
        return {map: s.dataset.statMap, mapPeak: s.querySelector('.map-peak').textContent,
                clusterPeak: peak ? peak.textContent : null, head: head, first: first};
    })""")
    assert shown, "no tested result in group.html"
    n_clusters = 0
    for entry in shown:
        values = np.asarray(nib.load(out / entry["map"]).dataobj, dtype=np.float64)
        extreme = values.ravel()[np.argmax(np.abs(values))]
        assert float(entry["mapPeak"]) == pytest.approx(extreme, rel=5e-3), entry["map"]
        if entry["clusterPeak"] is not None:
            n_clusters += 1
            # the peak printed with the result is cluster 1's, the first row of its own table
            row = dict(zip(entry["head"], entry["first"], strict=True))
            assert float(row["cluster_id"]) == 1 and row["peak_stat"] and \
                float(entry["clusterPeak"]) == pytest.approx(float(row["peak_stat"]), rel=5e-3), entry
    print(f"group.html: {len(shown)} results checked against their maps, {n_clusters} with a cluster table")


def _check_map_captions(browser: DevTools) -> None:
    """Issue 19: the connectivity maps' captions and colour-bar units differ by map kind."""
    captions = browser.evaluate(
        "Array.from(document.querySelectorAll('figcaption')).map(c => c.textContent)"
        ".filter(t => t.startsWith('seed-'))")
    by_desc: dict[str, set[str]] = {}
    for text in captions:
        desc = text.split(",")[1].split(":")[0].strip()
        by_desc.setdefault(desc, set()).add(text.split(":", 1)[1])
    assert {"correlation", "background"} <= set(by_desc) and any(d.startswith("gppi") for d in by_desc), captions
    # one wording per map kind, and no two kinds share one
    words = {desc: {t.split(";")[0] for t in texts} for desc, texts in by_desc.items()}
    assert all(len(w) == 1 for w in words.values()) and len(set.union(*words.values())) == len(words), words
    assert any("display threshold, not inference" in t for t in captions)


@pytest.mark.slow
def test_reports_load_in_a_browser_without_errors(reports, browser_path, tmp_path):
    out = reports["out"]
    assert f"Group report: {out / 'group.html'}" in reports["group_stdout"]
    assert str(out / "sub-01.html") in reports["participant_stdout"]
    artifacts = Path(os.environ.get("FCFLOW_ARTIFACTS_DIR") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    pages = [out / "group.html", *sorted(out.glob("sub-*.html"))]
    assert len(pages) == 7
    browser = DevTools(browser_path, tmp_path / "profile")
    try:
        for page in pages:
            browser.open(page.as_uri())
            images = browser.evaluate(
                "Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete, "
                "width: i.naturalWidth}))")
            # group: mean FD and % censored per task (4), QC-FC per session and pooled (4), the
            # strategy comparison (1), and the results' figures when a cluster survives
            assert len(images) >= (9 if page.name == "group.html" else 6 * 5), page.name
            broken = [i["src"] for i in images if not (i["complete"] and i["width"] > 0)]
            assert not broken, f"{page.name}: images that did not load: {broken[:5]}"
            assert not browser.errors(), f"{page.name}: {browser.errors()[:5]}"
            # nothing wider than the window (a wide table scrolls inside itself instead)
            width = browser.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= width[1], f"{page.name}: the page is {width[0]} px wide in a {width[1]} px window"
            # the demo's seed without an atlas is the simulator's stand-in sphere: both reports say so
            banner = browser.evaluate("Array.from(document.querySelectorAll('.stand-in')).map(e => e.textContent)")
            assert len(banner) == 1 and "Stand-in seed." in banner[0] and "pgACC" in banner[0], (page.name, banner)
            if page.name == "group.html":
                _check_group_numbers(browser, out)
            elif page.name == "sub-01.html":
                _check_map_captions(browser)
            if page.name in ("group.html", "sub-01.html"):
                shot = browser.screenshot(artifacts / f"report_{page.stem}.png")
                assert shot.stat().st_size > 10_000
    finally:
        browser.close()


@pytest.mark.slow
def test_group_report_shows_design_motion_qcfc_and_methods(reports):
    html = (reports["out"] / "group.html").read_text()
    for anchor in ("summary", "design", "motion", "qcfc", "results", "truth", "methods"):
        assert f'<section id="{anchor}">' in html
    # the runs excluded by the recipe's mean-FD limit are named with their reason
    assert "above the maximum of 0.3 mm (max_mean_fd_mm)" in html
    assert "no denoising" in html and "24P+aCompCor (recipe)" in html
    # the methods paragraph reports the permutations that ran, not the recipe's 5000
    methods = html[html.index('id="methods-paragraph"'):]
    assert "50 permutations" in methods and "5000" not in methods
    # each test names the statistic it computed (t, wls-t, v, ...) and its p corrected over all tests
    import pandas as pd

    results = pd.read_csv(reports["out"] / "group" / "results.tsv", sep="\t", keep_default_na=False)
    for statistic in set(results.loc[results["stat_map"] != "n/a", "statistic"]):
        assert f"statistic {statistic};" in html
    assert "<th>min p (all tests)</th>" in html


@pytest.mark.slow
def test_pooled_qcfc_is_the_correlation_over_every_included_run(reports):
    """The "all sessions" QC-FC equals numpy's correlation of each edge with mean FD over subject x session."""
    import nibabel as nib
    import numpy as np

    from fcflow.config import load_recipe
    from fcflow.derivatives import read_runs_qc
    from fcflow.reports.group import collect_qcfc

    out = reports["out"]
    recipe = load_recipe(next(out.parent.glob("*.toml")))
    qc = read_runs_qc(out)
    pooled = collect_qcfc(out, recipe, qc, task="rest", seed="pgACC", session=None)
    kept = qc[(qc["task"] == "rest") & ~qc["excluded"]]
    assert pooled["n_runs"] == len(kept) and pooled["n_subjects"] == kept["participant"].nunique()
    assert pooled["n_runs"] > pooled["n_subjects"]
    fd, maps = [], []
    for row in kept.sort_values(["participant", "session"]).itertuples():
        (path,) = (out / f"sub-{row.participant}" / f"ses-{row.session}" / "func").glob(
            "*task-rest*_seed-pgACC_stat-z_desc-correlation_statmap.nii.gz")
        maps.append(np.asarray(nib.load(path).dataobj))
        fd.append(float(row.mean_fd_mm))
    maps = np.stack(maps)
    support = np.all((maps != 0) & np.isfinite(maps), axis=0)
    seed = np.asarray(nib.load(next(out.glob("sub-*/ses-*/func/*task-rest*_seed-pgACC_mask.nii.gz"))).dataobj) > 0
    edges = maps[:, support & ~seed]
    expected = np.array([np.corrcoef(edges[:, j], fd)[0, 1] for j in range(0, edges.shape[1], 97)])
    ours = pooled["strategies"]["24P+aCompCor (recipe)"]["r"][::97]
    np.testing.assert_allclose(ours, expected, atol=1e-5)


@pytest.mark.slow
def test_outputs_are_found_by_entity_with_pybids_and_fcflow_config(reports):
    """Issue 19: pybids with fcflow's configuration finds the rest correlation z maps of one seed and
    session, and a group test's maps, by entity query; the same files a file-name search finds."""
    import pandas as pd

    from fcflow.derivatives import PYBIDS_CONFIG, bids_layout

    out = reports["out"]
    layout = bids_layout(out)
    assert layout.config.keys() >= {"bids", "derivatives", "fcflow"} and PYBIDS_CONFIG.is_file()
    found = layout.get(task="rest", seed="pgACC", session="infusion", desc="correlation", stat="z",
                       suffix="statmap", extension=".nii.gz", return_type="filename")
    expected = sorted(str(p) for p in out.glob(
        "sub-*/ses-infusion/func/sub-*_ses-infusion_task-rest_*_seed-pgACC_stat-z_desc-correlation_statmap.nii.gz"))
    assert len(expected) >= 5 and sorted(found) == expected
    results = pd.read_csv(out / "group" / "results.tsv", sep="\t", keep_default_na=False)
    row = results[results["stat_map"] != "n/a"].iloc[0]
    entities = layout.parse_file_entities(str(out / row["stat_map"]))
    assert entities["task"] == row["task"] and entities["seed"] == row["seed"] and entities["desc"] == row["desc"]
    from bids.layout import Query

    # without inference and alpha: not the thresholded map of the same test
    again = layout.get(**{k: v for k, v in entities.items() if k != "extension"}, extension=".nii.gz",
                       inference=Query.NONE, alpha=Query.NONE, return_type="filename")
    assert again == [str(out / row["stat_map"])]
