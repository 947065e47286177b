"""Readers know what the store knows (issues 10 and 11), against real Redis servers: a flagged
namespace is not ready and says why, recorded offset gaps and the pin are shown, a Redis that
came back empty never gets the old model served, one group with non-finite statistics is its own
error, and `streamlme serve` waits for Redis and refuses a namespace of other columns."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from fixtures_redis import RedisServer
from net_helpers import free_port
from query_helpers import SPEC, make_rows, seed_store, write_config

from streamlme import GroupStats
from streamlme.api import create_app
from streamlme.client import HEALTH_TTL, BadStatisticsError, Client, NamespaceNotReady
from streamlme.config import load_config
from streamlme.plots import store_figure
from streamlme.refresh import refresh_once
from streamlme.store import RedisStore
from streamlme.store.health import Gap
from streamlme.store.keys import encode_group

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def api(url: str, namespace: str, tmp_path: Path) -> TestClient:
    return TestClient(create_app(load_config(write_config(tmp_path / "c.toml", url, namespace),
                                             env={})))


@pytest.fixture
def store(redis_url: str, namespace: str) -> RedisStore:
    return RedisStore(redis_url, namespace, columns=SPEC.columns)


def effect_url(group: str) -> str:
    return f"/v1/groups/{quote(group, safe='')}/effect"


# -- flags, gaps, the pin -------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["rebuilding", "lost"])
def test_a_flagged_namespace_is_not_ready_and_says_why(store, redis_url, namespace, tmp_path,
                                                       flag):
    seed_store(store, *make_rows(51))
    http = api(redis_url, namespace, tmp_path)
    assert http.get("/readyz").status_code == 200
    status = http.get("/v1/status").json()
    assert status["ready"] is True and status["namespace"]["flag"] is None
    assert ISO.match(status["time_iso"]) and ISO.match(status["model_created_at_iso"])
    assert ISO.match(status["namespace"]["created_at"])

    reason = "consume --rebuild is replaying the topic; wait for it"
    store.set_flag(flag, reason)
    r = http.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "not_ready" and body["flag"] == flag
    assert flag in body["reason"] and reason in body["reason"] and ISO.match(body["since"])
    since = datetime.fromisoformat(body["since"].replace("Z", "+00:00")).timestamp()
    assert abs(since - time.time()) < 60
    status = http.get("/v1/status").json()
    assert status["ready"] is False
    assert status["namespace"]["flag"] == flag and status["namespace"]["reason"] == reason
    assert status["namespace"]["since"] == body["since"]
    # its statistics are not served meanwhile: not one group, not many, not a plot
    time.sleep(HEALTH_TTL)
    for r in (http.get(effect_url("g1")), http.post("/v1/groups/effects", json={"groups": ["g1"]}),
              http.post("/v1/predict", json={"group": "g1", "row": {"x": 0.1, "z": 0.2}}),
              http.get("/v1/plots/shrinkage.png")):
        assert r.status_code == 503 and r.json()["error"] == "namespace_not_ready", r.text
        assert reason in r.json()["message"]
    with pytest.raises(NamespaceNotReady, match=flag):
        Client(redis_url, namespace).effect("g1")
    assert http.get("/v1/model").status_code == 200  # the last good model is still shown

    store.clear_flag()
    assert http.get("/readyz").status_code == 200
    assert http.get("/v1/status").json()["ready"] is True
    time.sleep(HEALTH_TTL)
    assert http.get(effect_url("g1")).status_code == 200


def test_recorded_gaps_are_shown_with_the_model_and_the_status(store, redis_url, namespace,
                                                               tmp_path):
    seed_store(store, *make_rows(52))
    http = api(redis_url, namespace, tmp_path)
    doc = http.get("/v1/model").json()
    assert doc["gaps"] == [] and doc["complete"] is True
    store.record_gap(Gap("events", 2, 100, 250, time.time()))
    store.record_gap(Gap("events", 0, 7, 8, time.time()))
    doc = http.get("/v1/model").json()
    # the model was fitted before the gaps: it lacks none, the namespace's next fit will
    assert doc["gaps"] == [] and doc["complete"] is True
    assert [(g["partition"], g["from"], g["to"], g["events"]) for g in doc["namespace_gaps"]] == [
        (0, 7, 8, 1), (2, 100, 250, 150)]
    assert all(ISO.match(g["recorded_at"]) for g in doc["namespace_gaps"])
    assert http.get("/v1/status").json()["namespace"]["gaps"] == doc["namespace_gaps"]
    assert refresh_once(store, SPEC).current
    doc = http.get("/v1/model").json()
    assert doc["complete"] is False and doc["gaps"] == doc["namespace_gaps"]
    assert http.get("/readyz").status_code == 200  # a gap is shown, not a reason to stop


def test_the_pin_is_shown(store, redis_url, namespace, tmp_path):
    _, rec = seed_store(store, *make_rows(53))
    v2 = store.put_model(rec.to_json())
    http = api(redis_url, namespace, tmp_path)
    doc = http.get("/v1/model").json()
    assert doc["version"] == v2 and doc["pinned"] is False and doc["pinned_version"] is None
    store.pin_model(rec.version)
    doc = http.get("/v1/model").json()
    assert doc["version"] == rec.version and doc["pinned"] is True
    assert doc["pinned_version"] == rec.version
    assert http.get(f"/v1/model?version={v2}").json()["pinned"] is False
    assert http.get("/v1/status").json()["pinned_version"] == rec.version
    versions = http.get("/v1/model/versions").json()
    assert versions["pinned"] == rec.version and versions["current"] == rec.version
    assert all(ISO.match(v["created_at_iso"]) for v in versions["versions"])


# -- stale answers after a reset ------------------------------------------------------------


def test_a_redis_that_came_back_empty_never_serves_the_old_model(redis_server_factory,
                                                                 tmp_path):
    server = redis_server_factory()
    namespace = "reset"
    first = seed_store(RedisStore(server.url, namespace, columns=SPEC.columns),
                       *make_rows(54))[1]
    http = api(server.url, namespace, tmp_path)
    client = Client(server.url, namespace)
    before = http.get(effect_url("g1")).json()
    assert before == client.effect("g1").to_dict() and before["model_version"] == 1

    for reset in ("flushall", "restart"):
        if reset == "flushall":
            redis.Redis.from_url(server.url).flushall()
        else:
            server.stop()
            server.start()  # no persistence: it comes back empty
        # other data, and a model written as version 1 again
        groups, W = make_rows(55 if reset == "flushall" else 56)
        _, rec = seed_store(RedisStore(server.url, namespace, columns=SPEC.columns),
                                groups, W * 3.0)
        assert rec.version == 1 and rec.fit["beta"] != first.fit["beta"]
        fresh = Client(server.url, namespace)
        after = http.get(effect_url("g1")).json()
        assert after == fresh.effect("g1").to_dict(), reset
        assert after["effect"] != before["effect"]
        assert client.effect("g1").to_dict() == after  # the long-lived Client too
        assert http.get("/v1/model").json()["beta"] == rec.fit["beta"]
        r = http.post("/v1/groups/effects", json={"groups": ["g1", "g2"]})
        assert r.json()["effects"] == [e.to_dict() for e in fresh.effects(["g1", "g2"])]
        assert http.get("/v1/plots/shrinkage.png").headers["x-model-version"] == "1"
        before = after


# -- one bad group --------------------------------------------------------------------------


def put_overflowed(store: RedisStore, group: str) -> None:
    """Write ``group``'s statistics as a store would hold them after x = 1e200 was folded in:
    the co-moments overflow to inf (the byte format of `streamlme.stats`)."""
    W = np.array([[1e200, 0.5, 51.0], [-1e200, 0.1, 49.0], [3.0, 0.2, 50.0]])
    with np.errstate(all="ignore"):
        bad = GroupStats.from_rows(np.array([group] * 3, dtype=object), W)
    assert not np.isfinite(bad.C).all()
    store.client.hset(store.keys.shard(store.shard_of(group)).stats, encode_group(group),
                      bad.to_bytes()[0])


def test_one_group_with_non_finite_statistics_is_its_own_error(store, redis_url, namespace,
                                                              tmp_path):
    seed_store(store, *make_rows(57))
    put_overflowed(store, "bad one")
    http = api(redis_url, namespace, tmp_path)
    client = Client(redis_url, namespace)

    r = http.get(effect_url("bad one"))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "bad_statistics" and "'bad one'" in r.json()["message"]
    assert "check Redis" not in r.json()["message"]
    with pytest.raises(BadStatisticsError):
        client.effect("bad one")

    asked = ["g1", "bad one", "never", "g2"]
    r = http.post("/v1/groups/effects", json={"groups": asked})
    assert r.status_code == 200, r.text
    items = r.json()["effects"]
    good = client.effects(["g1", "never", "g2"])
    assert [items[0], items[2], items[3]] == [e.to_dict() for e in good]
    assert items[1]["group"] == "bad one" and items[1]["error"] == "bad_statistics"
    assert [type(e).__name__ for e in client.effects(asked, errors="report")] == [
        "GroupEffect", "GroupError", "GroupEffect", "GroupEffect"]

    r = http.post("/v1/predict", json={"group": "bad one", "row": {"x": 0.1, "z": 0.2}})
    assert r.status_code == 422 and r.json()["error"] == "bad_statistics"

    for kind in ("shrinkage", "caterpillar"):
        r = http.get(f"/v1/plots/{kind}.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    title = store_figure("shrinkage", store).axes[0].get_title()
    assert "1 group(s) left out" in title and "'bad one'" in title
    assert "of 40 groups" in title  # every other group is drawn


def test_did_you_mean_for_unknown_predict_fields(store, redis_url, namespace, tmp_path):
    seed_store(store, *make_rows(58))
    http = api(redis_url, namespace, tmp_path)
    r = http.post("/v1/predict", json={"grop": "g1", "row": {"x": 0.1, "z": 0.2}})
    assert r.status_code == 422
    assert any("did you mean 'group'" in d["msg"] for d in r.json()["detail"]), r.json()
    r = http.post("/v1/predict", json={"group": "g1", "row": {"xx": 0.1, "z": 0.2}})
    assert r.status_code == 422
    assert "did you mean 'x' instead of 'xx'" in r.json()["message"]
    with pytest.raises(ValueError, match="did you mean 'x'"):
        Client(redis_url, namespace).predict("g1", {"X": 0.1, "z": 0.2})


# -- serve ----------------------------------------------------------------------------------


def run_serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "streamlme.cli", "serve", "--config",
                             str(config)], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_serve_refuses_a_namespace_of_other_columns(redis_url, namespace, tmp_path):
    other = RedisStore(redis_url, namespace, columns=("a", "b", "y"))
    other.merge(GroupStats.from_rows(np.array(["g"] * 4, dtype=object),
                                     np.arange(12.0).reshape(4, 3)))
    port = free_port()
    proc = run_serve(write_config(tmp_path / "c.toml", redis_url, namespace, port=port),
                     tmp_path / "serve.log")
    assert proc.wait(60) == 1
    lines = (tmp_path / "serve.log").read_text().strip().splitlines()
    assert "holds statistics of columns ['a', 'b', 'y'], not ['x', 'z', 'y']" in lines[-1]
    assert "Traceback" not in "".join(lines)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


def test_serve_waits_for_redis_and_carries_on_when_it_answers(tmp_path):
    redis_server = RedisServer(tmp_path / "redis")  # a port of its own, started later
    namespace = "waits"
    port = free_port()
    config = write_config(tmp_path / "c.toml", redis_server.url, namespace, port=port)
    log = tmp_path / "serve.log"
    proc = run_serve(config, log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not answer /healthz in 60 s"
            time.sleep(0.2)
        r = httpx.get(f"{base}/readyz", timeout=5)
        assert r.status_code == 503
        assert f"waiting for Redis at 127.0.0.1:{redis_server.port}" in r.json()["reason"] \
            or f"waiting for Redis at {redis_server.url}" in r.json()["reason"]
        assert "waiting for Redis at" in log.read_text()

        redis_server.start()
        store = RedisStore(redis_server.url, namespace, columns=SPEC.columns)
        seed_store(store, *make_rows(59))
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, httpx.get(f"{base}/readyz", timeout=5).text
            time.sleep(0.2)
        r = httpx.get(base + effect_url("g1"), timeout=5)
        assert r.json() == Client(redis_server.url, namespace).effect("g1").to_dict()
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(20)
        redis_server.stop()



# -- consumer status ------------------------------------------------------------------------


def test_an_idle_consumers_heartbeats_keep_it_live_with_its_lag(store, redis_url, namespace,
                                                                tmp_path):
    from streamlme.status import StatusPublisher
    from streamlme.stream.consumer import ConsumeReport

    seed_store(store, *make_rows(61))
    http = api(redis_url, namespace, tmp_path)
    publisher = StatusPublisher(store, "idle-1")
    report = ConsumeReport(events_read=120, events_applied=120, batches=3)
    publisher.publish(report, lag=0)
    for _ in range(3):  # what an idle consumer sends every few seconds: same counters, lag now
        time.sleep(0.3)
        publisher.publish(report, lag=5)
    status = http.get("/v1/status").json()
    (c,) = status["consumers"]
    assert c["consumer"] == "idle-1" and c["events_applied"] == 120 and c["lag"] == 5
    assert status["lag"] == 5 and c["age_s"] < 1 and 0.2 < c["interval"] < 1
    assert ISO.match(c["updated_at_iso"]) and ISO.match(c["started_at_iso"])
    assert abs(datetime.fromisoformat(c["updated_at_iso"].replace("Z", "+00:00")).timestamp()
               - c["updated_at"]) < 1
    assert status["events_total"] == 120  # heartbeats add nothing to the all-time totals


def test_serve_that_waited_refuses_other_columns_once_redis_answers(tmp_path):
    redis_server = RedisServer(tmp_path / "redis").start()
    namespace = "other-columns"
    other = RedisStore(redis_server.url, namespace, columns=("a", "b", "y"))
    other.merge(GroupStats.from_rows(np.array(["g"] * 4, dtype=object),
                                     np.arange(12.0).reshape(4, 3)))
    other.client.save()  # the server comes back with this namespace from its dump
    redis_server.stop()
    port = free_port()
    log = tmp_path / "serve.log"
    proc = run_serve(write_config(tmp_path / "c.toml", redis_server.url, namespace, port=port),
                     log)
    try:
        deadline = time.monotonic() + 60
        while "waiting for Redis at" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        redis_server.start()
        assert proc.wait(60) == 1, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        redis_server.stop()
    lines = log.read_text().strip().splitlines()
    assert "holds statistics of columns ['a', 'b', 'y'], not ['x', 'z', 'y']" in lines[-1]
    assert "Traceback" not in log.read_text()
