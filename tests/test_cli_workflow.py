"""The README's tour as a user runs it: consume -> refresh -> model -> effect (CLI, HTTP, Python)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import httpx
import numpy as np
from lmm_data import dense_blups, simulate
from net_helpers import free_port, serving
from stream_helpers import write_config

from streamlme.client import Client


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamlme.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def write_events(path, d) -> None:
    with open(path, "w") as fh:
        for g, row in zip(d.groups.tolist(), d.W.tolist()):
            fh.write(json.dumps({"g": f"grp{g}", **dict(zip(d.spec.columns, row))}) + "\n")
        fh.write('{"g": "grp1", "x": "oops"}\n')  # a bad event: dead-lettered, not fatal


def test_embedded_tour(tmp_path) -> None:
    d = simulate(np.random.default_rng(3).integers(1, 40, size=30), slope=True, seed=3)
    events = tmp_path / "events.jsonl"
    write_events(events, d)
    cfg = write_config(tmp_path / "s.toml", d.spec, snapshot=str(tmp_path / "state.npz"))
    assert cli("config", "check", str(cfg)).returncode == 0

    dead = tmp_path / "dead.jsonl"
    consumed = cli("consume", "--config", str(cfg), "--input", str(events), "--dead-letters",
                   str(dead))
    assert consumed.returncode == 0, consumed.stderr
    report = json.loads(consumed.stdout)
    assert report["events_applied"] == len(d.y) and report["rejected"] == {"non_numeric": 1}
    [letter] = [json.loads(line) for line in dead.read_text().splitlines()]
    assert letter["code"] == "non_numeric" and letter["offset"] == len(d.y)  # its line number
    assert base64.b64decode(letter["value_b64"]) == b'{"g": "grp1", "x": "oops"}'

    no_model = cli("effect", "grp1", "--config", str(cfg))
    assert no_model.returncode != 0 and "refresh" in no_model.stderr

    refreshed = cli("refresh", "--config", str(cfg), "--once")
    assert refreshed.returncode == 0, refreshed.stderr
    model = json.loads(cli("model", "--config", str(cfg), "--json").stdout)
    assert model["version"] == 1 and model["n_obs"] == len(d.y) and model["converged"]

    lines = cli("effect", "grp1", "never-seen", "grp1", "--config", str(cfg), "--json")
    assert lines.returncode == 0, lines.stderr
    docs = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [doc["group"] for doc in docs] == ["grp1", "never-seen", "grp1"]
    assert docs[1]["known"] is False and docs[1]["cov"] == model["G"]
    assert not any(docs[1]["effect"].values())
    beta = np.array(list(model["beta"].values()))
    dense = dense_blups(d, beta, np.array(model["G"]), model["sigma2"])
    np.testing.assert_allclose(list(docs[0]["effect"].values()), dense["1"], rtol=1e-9)

    history = cli("model", "--config", str(cfg), "--history")
    assert history.returncode == 0 and "1" in history.stdout
    for kind in ("shrinkage", "caterpillar", "trace"):
        png = tmp_path / f"{kind}.png"
        drawn = cli("plot", kind, "--config", str(cfg), "-o", str(png))
        assert drawn.returncode == 0, drawn.stderr
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_redis_tour_curl_client_and_cli_agree(tmp_path, redis_url, namespace) -> None:
    d = simulate(np.random.default_rng(4).integers(1, 40, size=30), slope=True, seed=4)
    events = tmp_path / "events.jsonl"
    write_events(events, d)
    port = free_port()
    cfg = write_config(tmp_path / "s.toml", d.spec, redis={"url": redis_url, "namespace": namespace})
    cfg.write_text(cfg.read_text() + f'\n[api]\nport = {port}\ntoken = "sesame"\n')
    assert cli("consume", "--config", str(cfg), "--input", str(events)).returncode == 0
    assert cli("refresh", "--config", str(cfg), "--once").returncode == 0
    via_cli = json.loads(cli("effect", "grp7", "--config", str(cfg), "--json").stdout)

    with serving(cfg, port, tmp_path / "serve.log", timeout=30) as base:
        assert httpx.get(f"{base}/v1/groups/grp7/effect").status_code == 401
        via_http = httpx.get(f"{base}/v1/groups/grp7/effect",
                             headers={"Authorization": "Bearer sesame"}).json()
    with Client(str(cfg)) as client:
        via_python = client.effect("grp7").to_dict()
    assert via_cli == via_http == via_python
