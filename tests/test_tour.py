"""The README's tour, run as written.

`test_the_readme_tour_runs` parses the tour's bash block and runs each line as a subprocess in a
fresh folder against the fixtures' Redis and Kafka: the only substitutions are the addresses
(the fixtures' broker, Redis, a free API port, a topic and namespace of this test's own, given as
the ``STREAMLME_*`` variables the README documents), the install line (the test environment is
installed) and ``dev up``/``dev down`` (the fixtures' services stand in; `test_dev_up_and_down`
runs those two for real). A line ending in ``&`` runs in the background until ``kill %1``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from net_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
STREAMLME = [sys.executable, "-m", "streamlme.cli"]


def tour_lines() -> list[str]:
    """The commands of the README's tour block, comments dropped."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## A 5-minute tour"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the tour has no ```bash block"
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in block[1].splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    return [*STREAMLME, *words[1:]] if words[0] == "streamlme" else words


def test_the_tour_block_is_what_this_test_expects() -> None:
    """The parser finds the commands (else the run below would prove nothing)."""
    lines = tour_lines()
    starts = [line.split()[1] if line.startswith("streamlme") else line.split()[0]
              for line in lines]
    for step in ("config", "publish", "consume", "refresh", "model", "effect", "serve", "curl"):
        assert step in starts, f"the tour has no {step} step: {lines}"
    assert lines[1] == "streamlme dev up" and lines[-1].endswith("streamlme dev down")


def test_the_readme_tour_runs(tmp_path: Path, redis_url: str, namespace: str,
                              kafka_bootstrap: str, kafka_topic) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLME_")} | {
        "STREAMLME_REDIS_URL": redis_url, "STREAMLME_REDIS_NAMESPACE": namespace,
        "STREAMLME_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "STREAMLME_KAFKA_TOPIC": kafka_topic(partitions=2),
        "STREAMLME_API_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    background: subprocess.Popen[bytes] | None = None
    outputs: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        for line in tour_lines():
            for command in (c.strip() for c in line.split("&&")):
                if command.startswith((".venv/bin/pip", ". .venv")) or command in (
                        "streamlme dev up", "streamlme dev down"):
                    continue
                if command == "kill %1":
                    assert background is not None and background.poll() is None
                    background.terminate()
                    # uvicorn re-raises SIGTERM once it has shut down cleanly
                    assert background.wait(30) in (0, -15)
                    background = None
                    continue
                if command.endswith("&"):
                    log = open(tmp_path / "background.log", "wb")  # noqa: SIM115 - the child's
                    background = subprocess.Popen(_argv(command[:-1]), cwd=tmp_path, env=env,
                                                  stdout=log, stderr=subprocess.STDOUT)
                    continue
                command = command.replace("localhost:8000", f"127.0.0.1:{port}")
                done = subprocess.run(_argv(command), cwd=tmp_path, env=env, text=True,
                                      capture_output=True, timeout=180)
                assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
                outputs[command.split(" --")[0]] = done
    finally:
        if background is not None:
            background.kill()
            background.wait(10)
    published = json.loads(outputs["streamlme publish events.csv"].stdout)
    consumed = json.loads(outputs["streamlme consume"].stdout)
    assert published == {"published": 20000}
    assert consumed["events_applied"] == 20000 and consumed["events_rejected"] == 0
    check = outputs["streamlme config check streamlme.toml"]
    assert f"redis: {redis_url}" in check.stdout + check.stderr
    assert f"kafka: {kafka_bootstrap} answered" in check.stdout
    assert "version 1" in outputs["streamlme model"].stdout
    effect = next(o for k, o in outputs.items() if k.startswith("streamlme effect")).stdout
    assert effect.startswith("H017: ") and "\nH042: " in effect
    served = json.loads(next(o for k, o in outputs.items() if k.startswith("curl")).stdout)
    assert served["group"] == "H017" and served["known"] is True


def test_dev_up_and_down(tmp_path: Path) -> None:
    """`dev up` starts both services, `config init` writes their addresses, `config check
    --connect` reaches them; after `dev down` nothing answers and the check exits 4."""
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*STREAMLME, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env={k: v for k, v in os.environ.items()
                                                if not k.startswith("STREAMLME_")})

    try:
        started = cli("dev", "up", "--json")
        assert started.returncode == 0, started.stderr
        services = json.loads(started.stdout)
        assert services["started"] is True
        again = json.loads(cli("dev", "up", "--json").stdout)
        assert again["started"] is False and again["redis"]["pid"] == services["redis"]["pid"]
        assert cli("config", "init", "--kafka", "--redis").returncode == 0
        text = (tmp_path / "streamlme.toml").read_text()
        assert services["redis"]["address"] in text and services["kafka"]["address"] in text
        check = cli("config", "check", "streamlme.toml", "--connect")
        assert check.returncode == 0, check.stderr
        assert "answered" in check.stdout.splitlines()[-1]
    finally:
        stopped = cli("dev", "down")
    assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped redis, kafka"
    for service in ("redis", "kafka"):
        assert not Path(f"/proc/{services[service]['pid']}").exists() or \
            Path(f"/proc/{services[service]['pid']}/cmdline").read_bytes() == b""
    check = cli("config", "check", "streamlme.toml", "--connect")
    assert check.returncode == 4, check.stderr
    lines = check.stderr.strip().splitlines()
    assert len(lines) == 2 and all("did not answer" in line for line in lines), lines


@pytest.mark.parametrize("sections", [(), ("--kafka",), ("--redis",), ("--kafka", "--redis")])
def test_config_init_writes_a_file_config_check_accepts(tmp_path: Path, sections) -> None:
    out = tmp_path / "s.toml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLME_")}
    made = subprocess.run([*STREAMLME, "config", "init", *sections, "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert made.returncode == 0, made.stderr
    checked = subprocess.run([*STREAMLME, "config", "check", str(out)], capture_output=True,
                             text=True, env=env, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert ("kafka: topic 'events'" in checked.stdout) == ("--kafka" in sections)
    assert ("namespace 'hospital_los'" in checked.stdout) == ("--redis" in sections)
    again = subprocess.run([*STREAMLME, "config", "init", "--out", str(out)],
                           capture_output=True, text=True, env=env, timeout=60)
    assert again.returncode == 2 and "--force" in again.stderr
