"""The run report (scp_dist/report.py) in a real headless browser: a short real run writes
<run>/report/index.html at its end; the page and its cluster pages load from file:// with no console
error, every <img> decodes, and a screenshot shows content. A counter-test proves the checks fail on
a broken page. A SYNTHETIC K = 1,000 run (fabricated run files and tiny shards,
benchmarks/report_scale.py; nothing trained) checks that the pages stay bounded and open fast."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from scp_dist.config import load_config
from scp_dist.distributed import DistState
from scp_dist.metrics import cluster_acc
from scp_dist.report import MAP_POINTS, hungarian, main, step_records, write_report
from scp_dist.train import train
from tests.helpers import overrides

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


# ---------------------------------------------------------------- the browser and the checks


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by selenium; skipped (with the reason) only where they are absent."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.skip(f"no headless browser: {', '.join(missing)} absent (Debian: apt-get install chromium "
                    "chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (the report extra)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1800"):
        opts.add_argument(a)
    opts.binary_location = str(CHROMIUM)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def open_page(driver, path: Path) -> dict:
    """Load a page from file:// and say what is wrong with it: console errors, images that did not
    decode (naturalWidth 0), and how long the load took."""
    driver.get_log("browser")  # drop what earlier pages logged
    t0 = time.perf_counter()
    driver.get(path.resolve().as_uri())
    seconds = time.perf_counter() - t0
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src').slice(0, 60), i.complete, i.naturalWidth])")
    broken = [src for src, complete, width in images if not (complete and width > 0)]
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return {"images": len(images), "broken": broken, "errors": errors, "seconds": seconds}


def screenshot_content(driver) -> dict:
    """Distinct colours and the share of non-white pixels of the visible window."""
    from PIL import Image

    im = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    px = np.asarray(im).reshape(-1, 3)
    colours = len(np.unique(px[:: max(1, len(px) // 200_000)], axis=0))
    return {"colours": colours, "non_white": float((px < 245).any(1).mean())}


def assert_page_ok(driver, path: Path, min_images: int = 1) -> dict:
    got = open_page(driver, path)
    assert got["errors"] == [], f"{path.name}: console errors {got['errors']}"
    assert got["broken"] == [], f"{path.name}: images that did not load {got['broken'][:5]}"
    assert got["images"] >= min_images, f"{path.name}: {got['images']} images"
    return got


# ---------------------------------------------------------------- a short real run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, digits_root) -> Path:
    """The pixels demo for two short epochs, report at the end as by default (about 20-40 s of CPU)."""
    tmp = tmp_path_factory.mktemp("report_run")
    cfg = load_config("demo_digits", overrides(tmp, digits_root, **{"output.run_name": "rep", "train.epochs": 2,
                                                                   "output.report": "true"}))  # the default
    train(cfg, DistState())
    return tmp / "runs" / "rep"


@pytest.mark.slow
@pytest.mark.multiprocess  # starts chromium and chromedriver
def test_the_report_of_a_real_run_opens_in_a_browser(real_run, browser):
    index = real_run / "report" / "index.html"
    assert index.is_file()
    got = assert_page_ok(browser, index, min_images=20)  # 10 clusters' thumbnails and the figures
    shot = screenshot_content(browser)
    assert shot["colours"] > 50 and shot["non_white"] > 0.05, shot
    for page in sorted((real_run / "report").glob("clusters-*.html")):
        assert_page_ok(browser, page)
    assert got["seconds"] < 10


@pytest.mark.slow
def test_the_report_holds_what_the_run_measured(real_run):
    html = (real_run / "report" / "index.html").read_text()
    for section in ('id="scores"', 'id="curves"', 'id="map"', 'id="labels"', 'id="clusters"', 'id="stages"',
                    'id="config"', "data:image/png;base64,"):
        assert section in html, section
    ev = json.loads((real_run / "eval.json").read_text())
    rows = list(csv.DictReader((real_run / "assignments_train.csv").open()))
    label = np.array([int(r["label"]) for r in rows])
    cluster = np.array([int(r["cluster"]) for r in rows])
    h = hungarian(label, cluster, 10, 10)  # the page's matching scores what eval.json says
    assert h["acc"] == pytest.approx(ev["splits"]["train"]["scores"]["acc"])
    assert f"ACC {100 * h['acc']:.1f} % after Hungarian matching" in html
    # The evaluation's feature sample: seeded, at most MAP_POINTS rows, the run's own clusters.
    z = np.load(real_run / "report" / "features_sample.npz")
    assert len(z["rows"]) == min(1797, MAP_POINTS) and z["features"].shape == (len(z["rows"]), 192)
    assert (z["indices"] == z["rows"]).all()  # no sample skipped: row == canonical index
    assert (z["clusters"] == cluster[z["rows"]]).all()
    assert list(z["keys"]) == [rows[r]["key"] for r in z["rows"]]
    stages = [json.loads(x) for x in (real_run / "metrics.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages if s["kind"] == "stage"][-3:] == ["report", "report_html", "evaluate"]


@pytest.mark.slow
def test_cli_rewrites_the_report_and_shows_neighbours_when_search_is_there(real_run, monkeypatch, capsys):
    def training_neighbours(run: Path, rows, k: int, space: str = "features"):
        assert run == real_run and space == "features"
        idx = (np.asarray(rows)[:, None] + np.arange(k)[None]) % 1797
        return idx, np.linspace(1, 0.5, k)[None].repeat(len(rows), 0)

    monkeypatch.setitem(sys.modules, "scp_dist.search", types.SimpleNamespace(training_neighbours=training_neighbours))
    assert main(["--run", str(real_run), "--thumbs", "3", "--no-map"]) == 0
    assert "report:" in capsys.readouterr().out
    html = (real_run / "report" / "index.html").read_text()
    assert "nearest neighbours left out" not in html and "query" in html and "0.500" in html

    def broken(*a, **kw):
        raise RuntimeError("no index built")

    monkeypatch.setitem(sys.modules, "scp_dist.search", types.SimpleNamespace(training_neighbours=broken))
    res = write_report(real_run, feature_map=False)
    assert any("no index built" in n for n in res.notes)
    assert "no index built" in res.path.read_text()
    assert main(["--run", str(real_run / "nowhere")]) == 2


# ---------------------------------------------------------------- the checks can fail


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_browser_checks_catch_a_broken_page(browser, tmp_path):
    import base64

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    good = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    bad_data = "data:image/png;base64," + base64.b64encode(b"\x89PNG not really").decode()
    page = tmp_path / "broken.html"
    page.write_text(f'<!doctype html><html><body><img src="{good}"><img src="missing.png">'
                    f'<img src="{bad_data}"></body></html>')
    got = open_page(browser, page)
    assert got["images"] == 3 and len(got["broken"]) == 2
    assert any("missing.png" in e or "ERR_FILE_NOT_FOUND" in e for e in got["errors"]), got["errors"]
    with pytest.raises(AssertionError, match="console errors"):
        assert_page_ok(browser, page)
    # An image that fails without a console line is still caught, by its naturalWidth.
    corrupt = tmp_path / "corrupt.html"
    corrupt.write_text(f'<!doctype html><html><body><img src="{good}"><img src="{bad_data}"></body></html>')
    with pytest.raises(AssertionError, match="images that did not load"):
        assert_page_ok(browser, corrupt)
    blank = tmp_path / "blank.html"
    blank.write_text("<!doctype html><html><body></body></html>")
    open_page(browser, blank)
    shot = screenshot_content(browser)
    assert shot["colours"] <= 2 and shot["non_white"] < 0.01  # what the real page's check would reject


# ---------------------------------------------------------------- synthetic scale test


@pytest.mark.slow
@pytest.mark.multiprocess
def test_synthetic_k1000_report_stays_small_and_opens_fast(browser, tmp_path):
    """SYNTHETIC: fabricated run files (K = 1,000, 20,000 images in tiny shards), not a trained run."""
    from benchmarks.report_scale import fabricate_run

    run = fabricate_run(tmp_path, 20_000, k=1000)
    res = write_report(run)
    assert res.seconds < 180  # measured ~30 s on the shared 2-core machine (docs/USING.md)
    pages = sorted((run / "report").glob("clusters-*.html"))
    assert len(pages) == 10 and res.pages[0].name == "index.html"
    index_html = res.path.read_text()
    assert len(index_html) < 3_000_000 and max(p.stat().st_size for p in pages) < 3_000_000
    # Every cluster (the empty ones too) is on exactly one cluster page.
    ids = [int(x) for p in pages for x in re.findall(r'class="cluster" id="c(\d+)"', p.read_text())]
    assert sorted(ids) == list(range(1000))
    empty = int(re.search(r"(\d+) empty", index_html).group(1))
    assert empty >= 20  # the fabricated tail of empty clusters (and any small one no draw hit)
    # The resumed steps count once: 300 steps, not 350.
    assert "300 logged steps" in index_html
    got = assert_page_ok(browser, res.path, min_images=40 * 8)
    assert got["seconds"] < 10, got["seconds"]
    got = assert_page_ok(browser, pages[0], min_images=100)
    assert got["seconds"] < 10, got["seconds"]
    shutil.rmtree(tmp_path / "data")


# ---------------------------------------------------------------- pieces


def test_step_records_keep_the_last_record_of_a_repeated_step():
    recs = [{"kind": "start", "step": 0}] + [{"kind": "step", "step": s, "loss": 1.0} for s in (1, 2, 3, 4)]
    recs += [{"kind": "resume", "step": 2}] + [{"kind": "step", "step": s, "loss": 2.0} for s in (3, 4, 5)]
    got = step_records(recs)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5] and [r["loss"] for r in got] == [1, 1, 2, 2, 2]


def test_hungarian_matches_the_reported_acc():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 500)
    c = np.where(rng.random(500) < 0.6, (y + 2) % 7, rng.integers(0, 7, 500))
    h = hungarian(y, c, 5, 7)
    assert h["acc"] == pytest.approx(cluster_acc(y, c))
    assert list(h["match"]) == [2, 3, 4, 5, 6]


def test_the_report_is_on_by_default_and_tensorboard_off():
    out = load_config("demo_digits").output
    assert out.report is True and out.tensorboard is False
