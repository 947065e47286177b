"""What a user sees when something is wrong: one line on stderr and a documented exit code.

Each case runs `streamlme` as a user does (a subprocess; click's CliRunner for pure argument
errors) against a real failure: a free port where nothing listens stands for a Redis or Kafka that
is down, a private redis-server with a password for refused credentials.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import click
import pytest
import redis
from click.testing import CliRunner
from net_helpers import free_port

from streamlme.cli import EXIT_CODES, main

MODEL = """
[model]
response = "y"
fixed = ["1", "x"]
random = ["1"]
group = "g"
"""


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "STREAMLME_DEBUG"} | (env or {})
    return subprocess.run([sys.executable, "-m", "streamlme.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=cwd)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line of stderr (asserted so), without a traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def down_redis(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A configuration whose Redis (with a password) is a port nothing listens on."""
    folder = tmp_path_factory.mktemp("down")
    return write(folder, MODEL + f'[redis]\nurl = "redis://:hunter2@127.0.0.1:{free_port()}/0"\n')


@pytest.mark.parametrize("command", [["model"], ["refresh", "--once"], ["effect", "a"],
                                     ["plot", "shrinkage", "-o", "x.png"]])
def test_redis_down_is_one_line_exit_4(down_redis: Path, command: list[str]) -> None:
    result = run(*command, "--config", str(down_redis), cwd=down_redis.parent)
    assert result.returncode == 4, result.stderr
    line = one_line(result)
    port = down_redis.read_text().split(":")[-1].split("/")[0]
    assert f"Redis at redis://:***@127.0.0.1:{port}/0 did not answer" in line
    assert "hunter2" not in line and "streamlme dev up" in line


def test_debug_shows_the_traceback(down_redis: Path) -> None:
    for args, env in ((["--debug"], None), ([], {"STREAMLME_DEBUG": "1"})):
        result = run(*args, "model", "--config", str(down_redis), env=env)
        assert result.returncode == 4
        assert "Traceback" in result.stderr and "ConnectionError" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("Error: Redis at ")


def test_redis_refusing_the_password_is_exit_5(tmp_path: Path, redis_server_factory) -> None:
    server = redis_server_factory()  # a private server: setting its password harms no one
    redis.Redis(port=server.port).config_set("requirepass", "right")
    cfg = write(tmp_path, MODEL + f'[redis]\nurl = "redis://:wrong@127.0.0.1:{server.port}/0"\n')
    result = run("model", "--config", str(cfg))
    assert result.returncode == 5, result.stderr
    line = one_line(result)
    assert "refused the credentials" in line and "wrong" not in line
    check = run("config", "check", str(cfg), "--connect")
    assert check.returncode == 5, check.stderr
    assert f"redis: redis://:***@127.0.0.1:{server.port}/0 refused the credentials" in check.stderr
    assert "kafka: none configured" in check.stdout


def test_kafka_down_answers_within_the_timeout(tmp_path: Path) -> None:
    port = free_port()
    cfg = write(tmp_path, MODEL + f'[kafka]\nbootstrap_servers = "127.0.0.1:{port}"\n'
                'topic = "t"\n[kafka.client]\nbootstrap_timeout_ms = 3000\n')
    rows = write(tmp_path, "g,x,y\na,1,2\n", "rows.csv")
    started = time.monotonic()
    result = run("publish", str(rows), "--config", str(cfg), "--no-progress")
    assert time.monotonic() - started < 25  # kafka-python's own default waited 30 s and more
    assert result.returncode == 4, result.stderr
    line = one_line(result)
    assert f"Kafka at 127.0.0.1:{port} did not answer within 3 s" in line


def test_missing_files_are_exit_2(tmp_path: Path) -> None:
    cfg = write(tmp_path, MODEL)
    cases = [("fit", str(tmp_path / "nope.csv"), "y ~ x + (1 | g)"),
             ("model", "--config", str(tmp_path / "nope.toml")),
             ("consume", "--config", str(cfg), "--input", str(tmp_path / "nope.jsonl")),
             ("publish", str(tmp_path / "nope.csv"), "--config", str(cfg))]
    for args in cases:
        result = run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "nope." in one_line(result)


def test_a_bad_column_is_exit_1(tmp_path: Path, kafka_bootstrap: str) -> None:
    data = write(tmp_path, "g,x,y\na,1,2\na,2,3\nb,1,1\nb,3,2\n", "d.csv")
    result = run("fit", str(data), "y ~ z + (1 | g)")
    assert result.returncode in (1, 2), result.stderr
    assert "'z'" in one_line(result)
    cfg = write(tmp_path, MODEL + f'[kafka]\nbootstrap_servers = "{kafka_bootstrap}"\n'
                'topic = "bad-column"\n')
    rows = write(tmp_path, "group,x,y\na,1,2\n", "rows.csv")  # no column g
    result = run("publish", str(rows), "--config", str(cfg), "--no-progress")
    assert result.returncode == 1, result.stderr
    assert "'g'" in one_line(result)


def test_a_bad_config_names_every_problem_exit_2(tmp_path: Path) -> None:
    cfg = write(tmp_path, MODEL + "[kafka]\ngroup_id = 'x'\n[refresh]\nevry = '1m'\n")
    result = run("model", "--config", str(cfg))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert any("kafka.bootstrap_servers: missing" in line for line in lines), lines
    assert any("kafka.topic: missing" in line for line in lines), lines
    assert any("refresh.evry: unknown key (did you mean 'every'?)" in line for line in lines)
    check = run("config", "check", str(cfg))
    assert check.returncode == 2 and len(check.stderr.strip().splitlines()) == 3, check.stderr


def test_usage_errors_are_one_line() -> None:
    runner = CliRunner()
    for args in (["model", "--bogus"], ["refresh", "--config", "x", "--once", "--every", "1s"],
                 ["plot", "pie", "--config", "x", "-o", "y"], ["nosuch"]):
        result = runner.invoke(main, args, prog_name="streamlme")
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: streamlme"), lines
        assert "--help" in lines[0]


def _walk(cmd: click.Command, path: str = "streamlme"):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _walk(sub, f"{path} {name}")


def test_every_command_has_an_example_and_every_option_a_help_text() -> None:
    runner = CliRunner()
    problems = []
    for path, cmd in _walk(main):
        text = runner.invoke(main, [*path.split()[1:], "--help"], prog_name="streamlme").output
        if not any(line.strip().startswith(f"Example: {path.split()[0]}")
                   for line in text.splitlines()):
            problems.append(f"{path}: no 'Example: streamlme ...' line")
        for param in cmd.params:
            if isinstance(param, click.Option) and not (param.help or "").strip():
                problems.append(f"{path} {param.opts[0]}: no help text")
    assert not problems, "\n".join(problems)


def test_the_exit_codes_are_documented() -> None:
    text = CliRunner().invoke(main, ["--help"], prog_name="streamlme").output
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for code, meaning in EXIT_CODES.items():
        assert f"{code}  {meaning}" in text
        assert f"| {code} |" in readme, f"exit code {code} is not in the README's table"


def test_json_times_are_iso_8601() -> None:
    from datetime import datetime, timedelta, timezone

    import numpy as np

    from streamlme.cli import emit_json

    @click.command()
    def show() -> None:
        paris = timezone(timedelta(hours=1))
        emit_json({"at": datetime(2026, 1, 2, 4, 5, 6, tzinfo=paris), "n": np.int64(3),
                   "naive": datetime(2026, 1, 2, 3, 4, 5)})

    out = CliRunner().invoke(show, []).output
    assert out.strip() == ('{"at": "2026-01-02T03:05:06Z", "n": 3, '
                           '"naive": "2026-01-02T03:04:05"}')


def test_dev_up_reports_its_start_in_iso_and_epoch() -> None:
    from streamlme.dev import DevServices, Service

    services = DevServices(Service("redis", 1, 2, "redis://127.0.0.1:2/0", "redis-server"),
                           Service("kafka", 3, 4, "127.0.0.1:4", "tansu"), 60.0, "/tmp/x")
    doc = services.to_dict()
    assert (doc["started_at"], doc["started_at_iso"]) == (60.0, "1970-01-01T00:01:00Z")
    assert "export STREAMLME_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:4" in services.exports()


def test_a_flagged_namespace_is_one_line_exit_3(tmp_path: Path, redis_url: str,
                                                namespace: str) -> None:
    from streamlme.store import RedisStore

    store = RedisStore(redis_url, namespace)
    store.set_flag("lost", "the store holds no record of events:0 (Redis restarted empty)")
    config = write(tmp_path, MODEL + f'[redis]\nurl = "{redis_url}"\nnamespace = "{namespace}"\n')
    result = run("effect", "a", "--config", str(config))
    assert result.returncode == 3, result.stderr
    line = one_line(result)
    assert "flagged 'lost'" in line and "Redis restarted empty" in line
