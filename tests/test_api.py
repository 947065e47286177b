"""HTTP API end to end against a real Redis: FastAPI's TestClient, and a real uvicorn server."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from query_helpers import ODD_GROUPS, SPEC, make_rows, seed_store, write_config

from streamlme.api import create_app
from streamlme.api.schemas import MAX_BATCH
from streamlme.client import Client, effect_lines
from streamlme.config import load_config
from streamlme.store import RedisStore

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def effect_url(group: str) -> str:
    return f"/v1/groups/{quote(group, safe='')}/effect"


@pytest.fixture
def store(redis_url: str, namespace: str) -> RedisStore:
    return RedisStore(redis_url, namespace, columns=SPEC.columns)


@pytest.fixture
def seeded(store):
    groups, W = make_rows(21, groups=[*ODD_GROUPS, *(f"g{i}" for i in range(20))])
    return seed_store(store, groups, W)


def api(redis_url: str, namespace: str, tmp_path, token: str | None = None) -> TestClient:
    path = write_config(tmp_path / "c.toml", redis_url, namespace, token=token)
    return TestClient(create_app(load_config(path, env={})))


def test_effect_of_any_group_id_equals_the_client(seeded, redis_url, namespace, tmp_path):
    http = api(redis_url, namespace, tmp_path)
    client = Client(redis_url, namespace)
    for group in [*ODD_GROUPS, "never-seen"]:
        r = http.get(effect_url(group))
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.json() == client.effect(group).to_dict()
    assert http.get(effect_url("never-seen")).json()["known"] is False


def test_many_effects_in_the_order_asked(seeded, redis_url, namespace, tmp_path):
    http = api(redis_url, namespace, tmp_path)
    asked = ["g3", "nope", ODD_GROUPS[0], "g3"]
    r = http.post("/v1/groups/effects", json={"groups": asked})
    assert r.status_code == 200, r.text
    expected = [e.to_dict() for e in Client(redis_url, namespace).effects(asked)]
    assert r.json() == {"effects": expected}


@pytest.mark.parametrize("body", [
    {"groups": []}, {"groups": ["a"] * (MAX_BATCH + 1)}, {"groups": "g1"}, {"groups": [1]},
    {"groups": [""]}, {}, {"groups": ["a"], "extra": 1}, [],
])
def test_bad_batches_are_422_with_a_json_error(seeded, redis_url, namespace, tmp_path, body):
    r = api(redis_url, namespace, tmp_path).post("/v1/groups/effects", json=body)
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_request" and r.json()["message"]


def test_bad_group_ids_and_bodies(seeded, redis_url, namespace, tmp_path):
    http = api(redis_url, namespace, tmp_path)
    r = http.get("/v1/groups//effect")
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    r = http.get(effect_url("é" * 200))  # 200 characters, 400 UTF-8 bytes
    assert r.status_code == 422 and r.json()["error"] == "invalid_group"
    r = http.post("/v1/groups/effects", content=b"{not json", headers={
        "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    assert http.get("/v1/nothing").json() == {"error": "not_found", "message": "Not Found"}


def test_predict(seeded, redis_url, namespace, tmp_path):
    http = api(redis_url, namespace, tmp_path)
    row = {"x": 0.3, "z": 1.2}
    r = http.post("/v1/predict", json={"group": "a/b", "row": {**row, "other": "text"},
                                        "level": 0.8})
    assert r.status_code == 200, r.text
    assert r.json() == Client(redis_url, namespace).predict("a/b", row, 0.8).to_dict()
    for body, error in [
        ({"group": "a/b", "row": {"x": 1.0}}, "invalid_request"),
        ({"group": "a/b", "row": {"x": 1e300, "z": 1.0}}, "invalid_row"),
        ({"group": "a/b", "row": row, "level": 1.5}, "invalid_request"),
        ({"group": "a/b", "row": {"x": "one", "z": 1}}, "invalid_request"),
        ({"row": row}, "invalid_request"),
    ]:
        r = http.post("/v1/predict", json=body)
        assert (r.status_code, r.json()["error"]) == (422, error), body
    r = http.post("/v1/predict", content=b'{"group": "a/b", "row": {"x": NaN, "z": 1}}',
                  headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_models_and_versions(seeded, store, redis_url, namespace, tmp_path):
    _, rec = seeded
    http = api(redis_url, namespace, tmp_path)
    doc = http.get("/v1/model").json()
    assert doc["version"] == rec.version and doc["beta"] == rec.fit["beta"]
    v2 = store.put_model(rec.to_json())
    assert http.get("/v1/model").json()["version"] == v2
    assert http.get(f"/v1/model?version={rec.version}").json()["version"] == rec.version
    r = http.get("/v1/model?version=999")
    assert r.status_code == 404 and "not stored" in r.json()["message"]
    assert http.get("/v1/model?version=zero").status_code == 422
    versions = http.get("/v1/model/versions").json()
    assert versions["current"] == v2
    assert [v["version"] for v in versions["versions"]] == [rec.version, v2]
    assert http.get(effect_url("g1")).json()["model_version"] == v2


def test_not_ready_without_a_model_and_unavailable_without_redis(store, redis_url, namespace,
                                                                 tmp_path):
    http = api(redis_url, namespace, tmp_path)
    assert http.get("/healthz").json() == {"status": "ok"}
    r = http.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "not_ready"
    r = http.get(effect_url("g1"))
    assert r.status_code == 503 and r.json()["error"] == "model_not_ready"
    assert "streamlme refresh" in r.json()["message"]
    seed_store(store, *make_rows(22))
    assert http.get("/readyz").json()["status"] == "ready"

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    down = api(dead, namespace, tmp_path)
    assert down.get("/healthz").status_code == 200
    r = down.get("/readyz")
    assert r.status_code == 503 and "unreachable" in r.json()["reason"]
    for r in (down.get(effect_url("g1")), down.post("/v1/groups/effects", json={"groups": ["a"]}),
              down.get("/v1/model"), down.get("/v1/model/versions")):
        assert r.status_code == 503 and r.json()["error"] == "store_unavailable", r.text


def test_auth_guards_everything_but_health_checks(seeded, redis_url, namespace, tmp_path):
    http = api(redis_url, namespace, tmp_path, token=TOKEN)
    guarded = [("GET", effect_url("g1")), ("POST", "/v1/groups/effects"),
               ("POST", "/v1/predict"), ("GET", "/v1/model"), ("GET", "/v1/model/versions"),
               ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs")]
    for method, url in guarded:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = http.request(method, url, headers=headers, json={"groups": ["g1"]})
            assert r.status_code == 401, (method, url, headers)
            assert r.json()["error"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
    assert http.get(effect_url("g1"), headers=AUTH).status_code == 200
    assert http.get("/openapi.json", headers=AUTH).json()["components"]["securitySchemes"]
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200


def test_token_from_the_environment(seeded, redis_url, namespace, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMLME_API_TOKEN", TOKEN)
    path = write_config(tmp_path / "c.toml", redis_url, namespace)
    http = TestClient(create_app(load_config(path)))
    assert http.get(effect_url("g1")).status_code == 401
    assert http.get(effect_url("g1"), headers=AUTH).status_code == 200


def test_metrics_count_queries(seeded, redis_url, namespace, tmp_path):
    http = api(redis_url, namespace, tmp_path)

    def count() -> float:
        text = http.get("/metrics").text
        line = next(ln for ln in text.splitlines()
                    if ln.startswith('streamlme_query_latency_seconds_count{route="effect"}'))
        return float(line.split()[-1])

    http.get(effect_url("g1"))
    before = count()
    for _ in range(3):
        http.get(effect_url("g2"))
    text = http.get("/metrics").text
    assert count() == before + 3
    assert f"streamlme_model_version {float(seeded[1].version)}" in text
    for name in ("streamlme_events_ingested_total", "streamlme_refresh_duration_seconds_bucket",
                 "streamlme_model_age_seconds"):
        assert name in text


@pytest.fixture
def server(seeded, redis_url, namespace, tmp_path) -> Iterator[str]:
    """A real uvicorn server (auth on) in a thread of this process, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_config(tmp_path / "c.toml", redis_url, namespace, token=TOKEN, port=port)
    app = create_app(load_config(path, env={}))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


def test_real_server_curl_client_and_cli_agree(server, redis_url, namespace, tmp_path):
    group = ODD_GROUPS[0]
    url = server + effect_url(group)
    curl = shutil.which("curl")
    if curl:
        out = subprocess.run([curl, "-sf", "-H", f"Authorization: Bearer {TOKEN}", url],
                             capture_output=True, check=True, timeout=10).stdout
        over_http = json.loads(out)
    else:  # the same request without the binary
        over_http = httpx.get(url, headers=AUTH, timeout=10).json()
    from_client = Client(redis_url, namespace).effect(group).to_dict()
    cli_line = effect_lines(tmp_path / "c.toml", [group])[0]
    assert over_http == from_client == json.loads(cli_line)
    with httpx.Client(base_url=server, timeout=10) as http:
        assert http.get(effect_url(group)).status_code == 401
        assert http.get("/healthz").json() == {"status": "ok"}
        r = http.post("/v1/groups/effects", json={"groups": [group, "x"]}, headers=AUTH)
        assert r.json()["effects"][0] == from_client
