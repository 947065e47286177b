"""The dashboard: its routes (TestClient) over a real Redis fed by a real consumer run, and the page
in a real headless Chromium driven by Playwright against a `streamlme serve` process."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from net_helpers import free_port, serving
from query_helpers import SPEC, make_rows, write_config

from streamlme.api import create_app
from streamlme.api.dashboard import STATIC
from streamlme.client import Client
from streamlme.config import load_config
from streamlme.refresh import RefreshSettings, refresh_once
from streamlme.status import STATUS_TTL, StatusPublisher, read_status
from streamlme.store import RedisStore
from streamlme.stream.app import make_ingestor

TOKEN = "dash-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# As root, in a container, with no network: what Chromium needs to start and stay offline.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: An id that needs percent-encoding in a URL path (and escaping in a page).
ODD = "ward 3/<b>{icu}</b>:é ?x=1#f 100%"


def write_events(path: Path, groups: np.ndarray, W: np.ndarray, bad: int = 0) -> Path:
    with open(path, "w") as fh:
        for g, row in zip(groups.tolist(), W.tolist()):
            fh.write(json.dumps({SPEC.group: g, **dict(zip(SPEC.columns, row))}) + "\n")
        for _ in range(bad):
            fh.write(json.dumps({SPEC.group: "g1", "x": "oops"}) + "\n")
    return path


def consume(config_path: Path, store: RedisStore, events: Path, consumer: str,
            batch: int = 150) -> int:
    """A real ingest run of a JSON-lines file into Redis, in batches; returns events applied."""
    ingestor = make_ingestor(load_config(config_path, env={}), store, str(events))
    ingestor.batch_max_events = batch
    ingestor.status = StatusPublisher(store, consumer)
    return ingestor.run().events_applied


@pytest.fixture
def store(redis_url: str, namespace: str) -> RedisStore:
    return RedisStore(redis_url, namespace, columns=SPEC.columns)


@pytest.fixture
def fed(store, tmp_path, redis_url, namespace):
    """A namespace fed by a consumer run (with two bad events) and refreshed once."""
    groups, W = make_rows(5, n_groups=30, n_rows=900, groups=[ODD, *(f"g{i}" for i in range(29))])
    cfg = write_config(tmp_path / "c.toml", redis_url, namespace, token=TOKEN)
    applied = consume(cfg, store, write_events(tmp_path / "a.jsonl", groups, W, bad=2), "ingest-a")
    assert applied == len(W)
    assert refresh_once(store, SPEC, RefreshSettings(), wait=10).ok
    return cfg, W


def http(cfg: Path) -> TestClient:
    return TestClient(create_app(load_config(cfg, env={})))


# -- status ------------------------------------------------------------------------------------


def test_status_counts_a_real_consumer_run_and_its_restart(fed, store, tmp_path):
    cfg, W = fed
    api = http(cfg)
    s = api.get("/v1/status", headers=AUTH).json()
    assert s["events_total"] == len(W) and s["events_rejected_total"] == 2
    assert s["groups"] == 30 and s["model_version"] == 1
    assert 0 <= s["model_age_s"] < 60
    assert s["lag"] is None  # a file has no lag
    (c,) = s["consumers"]
    assert c["consumer"] == "ingest-a" and c["events_applied"] == len(W)
    assert c["events_rejected"] == 2 and c["batches"] == math.ceil((len(W) + 2) / 150)
    assert c["rate"] > 0 and s["ingest_rate"] == c["rate"] and c["age_s"] < 10

    # A second consumer (another process, or a restart) adds to the all-time totals.
    more_g, more_W = make_rows(6, n_groups=5, n_rows=200)
    consume(cfg, store, write_events(tmp_path / "b.jsonl", more_g, more_W), "ingest-b")
    s = api.get("/v1/status", headers=AUTH).json()
    assert s["events_total"] == len(W) + len(more_W) and s["events_rejected_total"] == 2
    assert [c["consumer"] for c in s["consumers"]] == ["ingest-a", "ingest-b"]
    assert s["ingest_rate"] == pytest.approx(sum(c["rate"] for c in s["consumers"]))

    # Quiet consumers stop counting towards the rate, then drop off the list.
    quiet = read_status(store, time.time() + 30)
    assert quiet.ingest_rate == 0 and len(quiet.consumers) == 2
    assert read_status(store, time.time() + STATUS_TTL + 5).consumers == []
    assert read_status(store, time.time() + STATUS_TTL + 5).events_total == len(W) + len(more_W)


def test_status_before_any_model_or_event(store, tmp_path, redis_url, namespace):
    cfg = write_config(tmp_path / "c.toml", redis_url, namespace)
    s = http(cfg).get("/v1/status").json()
    assert s["model_version"] is None and s["model_age_s"] is None
    assert s["events_total"] == 0 and s["consumers"] == [] and s["groups"] == 0
    r = http(cfg).get("/v1/plots/shrinkage.png")
    assert r.status_code == 409 and r.json()["error"] == "nothing_to_plot"


def test_status_publish_failure_never_stops_ingest(tmp_path, redis_url, namespace):
    cfg = write_config(tmp_path / "c.toml", redis_url, namespace)
    store = RedisStore(redis_url, namespace, columns=SPEC.columns)
    dead = RedisStore("redis://127.0.0.1:1/0", namespace)  # nothing listens on port 1
    ingestor = make_ingestor(load_config(cfg, env={}), store,
                             str(write_events(tmp_path / "e.jsonl", *make_rows(7, n_rows=300))))
    ingestor.status = StatusPublisher(dead, "nowhere")
    assert ingestor.run().events_applied == 300
    assert read_status(store).consumers == []


# -- plots, page and auth ------------------------------------------------------------------------


def test_plots_are_pngs_drawn_once_per_version(fed, store):
    cfg, _ = fed
    api = http(cfg)
    for kind in ("shrinkage", "caterpillar", "trace"):
        r = api.get(f"/v1/plots/{kind}.png", headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png" and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert r.headers["x-model-version"] == "1"
    first = api.get("/v1/plots/shrinkage.png", headers=AUTH)
    start = time.perf_counter()
    again = api.get("/v1/plots/shrinkage.png", headers=AUTH)
    assert again.content == first.content and time.perf_counter() - start < 0.1  # from the cache
    assert refresh_once(store, SPEC, RefreshSettings(skip_unchanged=False), wait=10).ok
    redrawn = api.get("/v1/plots/shrinkage.png", headers=AUTH)
    assert redrawn.headers["x-model-version"] == "2"
    assert api.get("/v1/plots/nope.png", headers=AUTH).status_code == 422
    assert api.get("/v1/plots/shrinkage.png").status_code == 401


def test_page_loads_without_token_and_its_data_needs_one(fed):
    cfg, _ = fed
    api = http(cfg)
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for name, kind in (("dashboard.js", "javascript"), ("dashboard.css", "text/css")):
        r = api.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    assert api.get("/v1/status").status_code == 401
    assert api.get("/v1/status", headers=AUTH).status_code == 200
    assert api.get("/static/../app.py").status_code == 401  # not a static file: token first
    assert api.get("/static/../app.py", headers=AUTH).status_code == 404


def test_static_files_are_self_contained_and_escape_data():
    texts = {p.name: p.read_text() for p in STATIC.iterdir() if p.is_file()}
    assert set(texts) == {"index.html", "dashboard.js", "dashboard.css", "favicon.svg"}
    for name, text in texts.items():
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a fetch
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name  # no CDN
    js = texts["dashboard.js"]
    assert "innerHTML" not in js.replace("never through innerHTML", "")
    assert "insertAdjacentHTML" not in js and "document.write" not in js
    assert "encodeURIComponent(group)" in js


# -- the page in a real browser ------------------------------------------------------------------


def _chromium() -> str:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium package")
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    return CHROMIUM


@pytest.fixture
def served(fed, tmp_path):
    """`streamlme serve` (auth on) over the fed namespace, as a user starts it."""
    cfg, _ = fed
    port = free_port()
    cfg.write_text(cfg.read_text().replace("port = 8000", f"port = {port}"))
    with serving(cfg, port, tmp_path / "serve.log") as base:
        yield base, cfg


def test_dashboard_in_headless_chromium(served, store, tmp_path):
    from playwright.sync_api import sync_playwright

    base, cfg = served
    model = httpx.get(f"{base}/v1/model", headers=AUTH).json()
    expected = httpx.get(f"{base}/v1/groups/{quote(ODD, safe='')}/effect", headers=AUTH)
    with Client(str(cfg)) as client:
        want = client.effect(ODD).to_dict()
    assert expected.json() == want
    errors: list[str] = []
    with sync_playwright() as pw:
        # The page's CSP forbids eval, so every wait below passes a function, not an expression.
        browser = pw.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            anonymous = browser.new_page()
            anonymous.goto(base)
            anonymous.wait_for_function("() => document.getElementById('conn').textContent "
                                        "=== 'token needed'")
            assert anonymous.locator("#token-box").get_attribute("open") is not None
            anonymous.close()

            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("requestfailed", lambda req: errors.append(f"{req.url}: {req.failure}"))
            page.on("response", lambda r: errors.append(f"{r.url}: {r.status}")
                    if r.status >= 400 else None)
            page.goto(f"{base}/?token={TOKEN}")
            page.wait_for_function("() => document.getElementById('k-version').textContent === 'v1'",
                                   timeout=15_000)
            assert "token=" not in page.url  # kept in localStorage, dropped from the address bar
            assert page.text_content("#conn") == "live"
            # The model: version, method, every fixed effect and the residual variance.
            facts = page.inner_text("#model-facts")
            assert "REML" in facts and "v1" in facts
            fixed = page.locator("#fixed-table tbody tr")
            assert fixed.count() == len(model["fixed"])
            for i, name in enumerate(model["fixed"]):
                cells = fixed.nth(i).locator("th, td").all_inner_texts()
                assert cells[0] == name
                assert float(cells[1].replace(",", "")) == pytest.approx(model["beta"][name],
                                                                         rel=1e-3)
            vc = page.inner_text("#vc-table")
            assert "residual σ²" in vc and all(f"g: {t}" in vc for t in model["random"])
            assert page.text_content("#k-groups") == "30"
            assert page.text_content("#k-events") == f"{900:,}"
            page.wait_for_function(
                "() => ['shrinkage', 'caterpillar'].every(k => "
                "document.getElementById('plot-' + k).naturalWidth > 300)", timeout=30_000)

            # A group lookup shows the API's numbers for an id that needs encoding and escaping.
            page.fill("#group-input", ODD)
            page.press("#group-input", "Enter")
            page.wait_for_selector("#effect-table")
            assert page.text_content(".effect-group") == ODD
            assert page.locator("#effect b").count() == 0  # the id's markup stayed text
            rows = page.locator("#effect-table tbody tr")
            shown = {rows.nth(i).get_attribute("data-term"):
                     float(rows.nth(i).get_attribute("data-effect")) for i in range(rows.count())}
            assert shown == want["effect"]
            assert "known" in page.inner_text(".effect-head")
            assert f"shrinkage {want['shrinkage']:.3f}" in page.inner_text(".effect-meta")

            page.fill("#group-input", "never-seen")
            page.press("#group-input", "Enter")
            page.wait_for_function("() => document.querySelector('.effect-group')?.textContent "
                                   "=== 'never-seen'")
            assert "never seen" in page.inner_text(".effect-head")

            page.fill("#group-input", ODD)
            page.press("#group-input", "Enter")
            page.wait_for_function(f"() => document.querySelector('.effect-group')?.textContent "
                                   f"=== {json.dumps(ODD)}")
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)

            # A flagged namespace: the page says which flag, since when and why.
            store.set_flag("rebuilding", "consume --rebuild replays the topic")
            page.wait_for_function("() => document.getElementById('conn').textContent "
                                   "=== 'rebuilding'", timeout=15_000)
            assert "consume --rebuild replays the topic" in page.text_content("#message")
            store.clear_flag()
            page.wait_for_function("() => document.getElementById('conn').textContent "
                                   "=== 'live'", timeout=15_000)
            # A pinned version says so, with how to unpin it.
            store.pin_model(1)
            page.wait_for_function("() => document.getElementById('k-version').textContent "
                                   "=== 'v1 (pinned)'", timeout=15_000)
            assert "model --unpin" in page.text_content("#k-version-sub")
        finally:
            browser.close()
    assert shot.read_bytes()[:4] == b"\x89PNG"
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / "dashboard.png")
    assert errors == []
