"""`streamlme demo`: the README's main job, embedded and through the real broker and Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
from stream_helpers import write_config

from streamlme.demo import SPEC, TRUE_SIGMA2


def run_demo(*args: str, timeout: float = 120) -> tuple[dict, float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "streamlme.cli", "demo", "--json", *args],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout), time.monotonic() - t0


def check_report(report: dict, out_dir) -> None:
    rmse = report["holdout_rmse"]
    assert rmse["mixed model (streamlme)"] < rmse["ignoring hospitals"]
    assert rmse["mixed model (streamlme)"] < rmse["one dummy per hospital"]
    assert abs(report["sigma2"] - TRUE_SIGMA2) < 0.15 * TRUE_SIGMA2
    assert report["hospitals"] <= 200 and report["model_version"] >= 2
    for name in ("shrinkage.png", "caterpillar.png", "trace.png"):
        png = out_dir / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (out_dir / "events.jsonl").exists()


def test_embedded_demo_runs_in_under_a_minute(tmp_path) -> None:
    out_dir = tmp_path / "demo"
    report, seconds = run_demo("--out", str(out_dir))
    assert seconds < 60
    assert report["events"] > 80_000
    check_report(report, out_dir)
    assert (out_dir / "state.npz").exists() and (out_dir / "streamlme.toml").exists()


def test_demo_through_kafka_and_redis(tmp_path, kafka_bootstrap, kafka_topic, redis_url,
                                      namespace) -> None:
    topic = kafka_topic(2)
    cfg = write_config(tmp_path / "demo.toml", SPEC,
                       kafka={"bootstrap_servers": kafka_bootstrap, "topic": topic,
                              "group_id": f"demo-{uuid.uuid4().hex[:6]}",
                              "batch_max_seconds": 0.3},
                       redis={"url": redis_url, "namespace": namespace})
    out_dir = tmp_path / "demo"
    report, _ = run_demo("--out", str(out_dir), "--config", str(cfg), "--events", "30000",
                         timeout=300)
    check_report(report, out_dir)


def test_demo_refuses_a_config_of_another_model(tmp_path) -> None:
    from streamlme import ModelSpec

    cfg = write_config(tmp_path / "other.toml", ModelSpec("y", ["1"], ["1"], "g"))
    out = subprocess.run([sys.executable, "-m", "streamlme.cli", "demo", "--config", str(cfg),
                          "--out", str(tmp_path / "d")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "configuration's model" in out.stderr


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
