"""deploy/ cannot run here (no Docker engine), so check what can be checked: every file parses,
every container runs a real `streamlme` command with options that command has, and every
configuration it mounts or injects passes `streamlme config check`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from streamlme.cli import main
from streamlme.config import check_config_file, load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec.get("template", {}).get("spec", {}).get("containers", [])


def assert_real_command(argv: list[str]) -> None:
    """argv (after the `streamlme` entry point) names a command and only options it accepts."""
    cmd: click.Command = main
    args = list(argv)
    while isinstance(cmd, click.Group):
        name = args.pop(0)
        assert name in cmd.commands, f"`streamlme {name}` is not a command"
        cmd = cmd.commands[name]
    known = {opt for p in cmd.params for opt in getattr(p, "opts", [])}
    for a in args:
        if a.startswith("--"):
            assert a.split("=")[0] in known, f"{cmd.name} has no option {a}"


def test_compose_services_run_real_commands_with_a_valid_config(tmp_path) -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    roles = {name: s for name, s in compose["services"].items() if s.get("image", "").startswith("streamlme")}
    assert {"consumer", "refresher", "api"} <= set(roles)
    for svc in roles.values():
        assert_real_command(svc["command"])
        for volume in svc["volumes"]:
            host = volume.split(":")[0]
            assert (DEPLOY / host).exists(), host
    assert compose["services"]["redis"]["command"][1:3] == ["--appendonly", "yes"]
    assert "broker,controller" in compose["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    ok, message = check_config_file(DEPLOY / "streamlme.toml")
    assert ok, message


def test_kubernetes_manifests(tmp_path) -> None:
    docs = k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "Secret", "Deployment", "CronJob", "Service"} <= kinds
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    path = tmp_path / "streamlme.toml"
    path.write_text(config["data"]["streamlme.toml"])
    ok, message = check_config_file(path)
    assert ok, message
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert all(k.startswith("STREAMLME_") for k in secret["stringData"])
    loaded = load_config(path, env=secret["stringData"])  # the overrides are real keys
    assert loaded.api.token == secret["stringData"]["STREAMLME_API_TOKEN"]
    for doc in docs:
        for c in containers(doc):
            assert_real_command(c["args"])
            assert c["args"][c["args"].index("--config") + 1].startswith("/etc/streamlme/")


def test_dockerfile_entry_point_and_sources() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["streamlme"\]', text, re.M)
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, _dest = shlex.split(line)
        for src in sources:
            assert (DEPLOY.parent / src).exists(), src


@pytest.mark.parametrize("name", ["consume", "refresh", "serve", "publish", "fit", "demo"])
def test_documented_commands_exist(name: str) -> None:
    assert name in main.commands
