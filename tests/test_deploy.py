"""deploy/ cannot run here (no Docker engine), so check what can be checked: every file parses,
every container runs a real command (a `streamlme` command with options that command has; `dask
scheduler`/`dask worker` parsed by distributed's own command line; `redis-server` started here
with the deployed options; the Redis Cluster's init script run here against six local nodes
started with those options), every host a command or a configuration names is a service of the
same deployment, and every configuration it mounts or injects passes `streamlme config check`."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import click
import pytest
import redis
import yaml
from fixtures_cluster import RedisClusterHandle, _missing_binaries, cluster_ports

from streamlme.cli import main
from streamlme.config import check_config_file, load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.cluster.yml"]


# ---- reading the files ------------------------------------------------------------------
def compose(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def pod_spec(doc: dict) -> dict:
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec.get("template", {}).get("spec", {})


def containers(doc: dict) -> list[dict]:
    return pod_spec(doc).get("containers", [])


def streamlme_image(image: str) -> bool:
    return image.split(":")[0] == "streamlme"


def compose_argv(svc: dict) -> list[str]:
    """The argv a compose service runs: its entrypoint (the image's, `streamlme`, for ours)
    followed by its command."""
    entry = svc.get("entrypoint")
    if entry is None:
        entry = ["streamlme"] if streamlme_image(svc.get("image", "")) else []
    return [*([entry] if isinstance(entry, str) else entry), *svc.get("command", [])]


def k8s_argv(c: dict) -> list[str]:
    """A container's argv: ``command`` (else the image's entry point) followed by ``args``."""
    entry = c.get("command", ["streamlme"] if streamlme_image(c["image"]) else [])
    return [*entry, *c.get("args", [])]


def k8s_substitute(text: str, values: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), text)


def env_values(c: dict, docs: list[dict], pod_name: str) -> dict[str, str]:
    """A container's env as the pod would see it: fieldRef metadata.name and Secret keys."""
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in docs if d["kind"] == "Secret"}
    out = {}
    for item in c.get("env", []):
        if "value" in item:
            out[item["name"]] = str(item["value"])
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name", source
            out[item["name"]] = pod_name
        else:
            ref = source["secretKeyRef"]
            assert ref["name"] in secrets, f"no Secret {ref['name']}"
            assert ref["key"] in secrets[ref["name"]], f"Secret {ref['name']} has no {ref['key']}"
            out[item["name"]] = secrets[ref["name"]][ref["key"]]
    return out


def host_port(address: str, default: int) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    return str(parts.hostname), int(parts.port or default)


# ---- checking commands ------------------------------------------------------------------
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


def dask_command(name: str) -> click.Command:
    """distributed's own click command behind `dask NAME` (its `dask_cli` entry point)."""
    from importlib.metadata import entry_points

    try:
        import distributed  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("dask[distributed] is not installed (pip install -e '.[test]')")
        pytest.skip("dask[distributed] is not installed: the dask commands cannot be checked")
    points = {e.name: e for e in entry_points(group="dask_cli")}
    assert name in points, f"`dask {name}` is not a command (have {sorted(points)})"
    return points[name].load()


def assert_dask_command(argv: list[str]) -> click.Command:
    """`dask scheduler|worker ...`: every option is one the command has, and the whole line
    parses (types included) as distributed's command line parses it."""
    assert argv[0] == "dask", argv
    cmd = dask_command(argv[1])
    known = {opt for p in cmd.params for opt in getattr(p, "opts", [])}
    for a in argv[2:]:
        if a.startswith("--"):
            assert a.split("=")[0] in known, f"dask {argv[1]} has no option {a}"
    ctx = cmd.make_context(f"dask {argv[1]}", list(argv[2:]))
    assert not ctx.params.get("preload_argv"), f"unparsed arguments: {ctx.params['preload_argv']}"
    return cmd


def dask_worker_scheduler(argv: list[str]) -> str:
    ctx = assert_dask_command(argv).make_context("dask worker", list(argv[2:]))
    return str(ctx.params["scheduler"])


def dask_scheduler_port(argv: list[str]) -> int:
    ctx = assert_dask_command(argv).make_context("dask scheduler", list(argv[2:]))
    return int(ctx.params["port"])


def redis_options(argv: list[str]) -> dict[str, str]:
    """``redis-server --a x --b y`` as {a: x, b: y}."""
    assert argv[0] == "redis-server", argv
    opts, rest = {}, argv[1:]
    assert len(rest) % 2 == 0 and all(k.startswith("--") for k in rest[::2]), rest
    for key, value in zip(rest[::2], rest[1::2]):
        opts[key[2:]] = value
    return opts


#: options redis-server takes from the deployment as they are; these are replaced here
LOCAL = ("port", "dir", "cluster-config-file", "bind")


class DeployedRedisNodes:
    """Six local redis-servers started with a deployment's own options (port, dir, bind and
    nodes.conf made local), and a fake `redis-cli` on PATH that sends the deployment's host
    names to them, so the deployment's init script can run here unchanged."""

    def __init__(self, base: Path, argvs: dict[str, list[str]]) -> None:
        _missing_binaries()
        self.base, self.procs, self.ports = base, [], {}
        self.options = {host: redis_options(argv) for host, argv in argvs.items()}
        for (host, opts), port in zip(self.options.items(), cluster_ports(len(self.options))):
            d = base / host
            d.mkdir(parents=True)
            args = ["redis-server"]
            for key, value in opts.items():
                if key not in LOCAL:
                    args += [f"--{key}", value]
            args += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                     "--cluster-config-file", str(d / "nodes.conf"), "--logfile", str(d / "log"),
                     "--repl-diskless-sync-delay", "0"]
            self.procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
            self.ports[host] = port
        self.bin = base / "bin"
        self.bin.mkdir()
        cli = self.bin / "redis-cli"
        cli.write_text(f"#!{sys.executable}\n" + _FAKE_CLI.format(
            real=shutil.which("redis-cli"), ports=dict(self.ports)))
        cli.chmod(0o755)

    def client(self, host: str) -> redis.Redis:
        password = self.options[host].get("requirepass")
        return redis.Redis(port=self.ports[host], password=password, socket_timeout=2)

    def wait_answer(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for host, proc in zip(self.ports, self.procs):
            while True:
                assert proc.poll() is None, (self.base / host / "log").read_text()
                try:
                    if self.client(host).ping():
                        break
                except (redis.RedisError, OSError):
                    pass
                assert time.monotonic() < deadline, f"{host} did not answer"
                time.sleep(0.05)

    def run(self, script_argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        environ = {**os.environ, **env, "PATH": f"{self.bin}:{os.environ['PATH']}"}
        return subprocess.run(script_argv, env=environ, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120, check=False)

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


_FAKE_CLI = '''\
import os, sys
ports = {ports!r}
args, out = sys.argv[1:], []
i = 0
while i < len(args):
    a = args[i]
    if a == "-h" and i + 1 < len(args) and args[i + 1] in ports:
        out += ["-h", "127.0.0.1", "-p", str(ports[args[i + 1]])]
        i += 2
        continue
    host, _, port = a.rpartition(":")
    if host in ports and port == "6379":
        a = "127.0.0.1:%d" % ports[host]
    out.append(a)
    i += 1
os.execv({real!r}, [{real!r}, *out])
'''


def check_cluster_init(tmp_path: Path, nodes: dict[str, list[str]], script: list[str],
                       env: dict[str, str]) -> None:
    """Start six nodes with the deployed redis-server options, run the deployed init script:
    it must leave a cluster of 3 masters with a replica each; run again, it must say so, exit 0
    and change nothing."""
    local = DeployedRedisNodes(tmp_path, nodes)
    try:
        local.wait_answer()
        for host, opts in local.options.items():  # the deployed options took effect
            client = local.client(host)
            for key, value in opts.items():
                if key not in LOCAL:
                    assert client.config_get(key)[key] == value, (host, key)
        first = local.run(script, env)
        assert first.returncode == 0, first.stdout + first.stderr
        passwords = {o.get("requirepass") for o in local.options.values()}
        assert len(passwords) == 1  # one password for every node (masterauth is the same)
        handle = RedisClusterHandle([f"127.0.0.1:{p}" for p in local.ports.values()],
                                    password=passwords.pop())
        handle.wait_ok(timeout=30)
        assert len(handle.masters()) == 3 and len(handle.replicas()) == 3
        ids = sorted(n.id for n in handle.nodes())
        again = local.run(script, env)
        assert again.returncode == 0 and "already created" in again.stdout, \
            again.stdout + again.stderr
        assert sorted(n.id for n in handle.nodes()) == ids
    finally:
        local.stop()


def assert_shell_syntax(argv: list[str]) -> None:
    assert argv[0] in ("sh", "bash") and argv[1].startswith("-") and "c" in argv[1], argv
    check = subprocess.run(["sh", "-n", "-c", argv[2]], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr


# ---- compose ----------------------------------------------------------------------------
def check_compose_roles(name: str) -> dict:
    """The common checks of a compose file; returns it."""
    spec = compose(name)
    services = spec["services"]
    roles = {n: s for n, s in services.items() if streamlme_image(s.get("image", ""))}
    assert {"consumer", "refresher", "api"} <= set(roles)
    for svc_name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name}: {svc_name} depends on unknown service {dep}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
            else:
                assert source in (spec.get("volumes") or {}), f"{name}: volume {source} undeclared"
        if "extends" in svc:
            base = compose(svc["extends"]["file"])
            assert svc["extends"]["service"] in base["services"]
    for svc in roles.values():
        argv = compose_argv(svc)
        if argv[0] == "streamlme":
            assert_real_command(argv[1:])
            config = next(v for v in svc["volumes"] if v.endswith("/etc/streamlme/streamlme.toml:ro"))
            ok, message = check_config_file(DEPLOY / config.split(":")[0])
            assert ok, message
    return spec


def test_compose_services_run_real_commands_with_a_valid_config(tmp_path) -> None:
    spec = check_compose_roles("docker-compose.yml")
    assert spec["services"]["redis"]["command"][1:3] == ["--appendonly", "yes"]
    assert "broker,controller" in spec["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    ok, message = check_config_file(DEPLOY / "streamlme.toml")
    assert ok, message


def test_compose_cluster_config_names_its_own_redis_nodes_and_dask_scheduler() -> None:
    spec = check_compose_roles("docker-compose.cluster.yml")
    services = spec["services"]
    nodes = {n for n, s in services.items() if compose_argv(s)[:1] == ["redis-server"]}
    assert len(nodes) == 6
    config = load_config(DEPLOY / "streamlme-cluster.toml")
    assert config.redis.cluster
    assert {host for host, port in config.redis.startup_nodes} == nodes
    assert all(port == 6379 for _, port in config.redis.startup_nodes)
    assert config.refresh.engine == "dask"
    host, port = host_port(config.refresh.dask_scheduler, 8786)
    assert dask_scheduler_port(compose_argv(services[host])) == port
    worker = compose_argv(services["dask-worker"])
    assert host_port(dask_worker_scheduler(worker), 8786) == (host, port)
    assert streamlme_image(services["dask-worker"]["image"])  # the workers import streamlme
    for name in nodes:
        opts = redis_options(compose_argv(services[name]))
        assert opts["cluster-enabled"] == "yes" and opts["port"] == "6379"
        assert opts["cluster-announce-hostname"] == name  # redirections name the service
        assert opts["cluster-config-file"].startswith(opts["dir"])  # on the node's volume
    for svc in ("consumer", "refresher", "api", "dask-worker"):
        assert services[svc]["depends_on"]["redis-cluster-init"] == {
            "condition": "service_completed_successfully"}


def test_compose_cluster_init_creates_the_cluster_from_the_deployed_nodes(tmp_path) -> None:
    services = compose("docker-compose.cluster.yml")["services"]
    nodes = {n: compose_argv(s) for n, s in services.items()
             if compose_argv(s)[:1] == ["redis-server"]}
    init = compose_argv(services["redis-cluster-init"])
    assert_shell_syntax(init)
    assert set(services["redis-cluster-init"]["depends_on"]) == set(nodes)
    create = next(line for line in init[2].splitlines() if "--cluster create" in line)
    words = shlex.split(create)
    assert {w.split(":")[0] for w in words if w.endswith(":6379")} == set(nodes)
    assert words[words.index("--cluster-replicas") + 1] == "1" and "--cluster-yes" in words
    check_cluster_init(tmp_path, nodes, init, {})


# ---- Kubernetes -------------------------------------------------------------------------
def test_kubernetes_manifests(tmp_path) -> None:
    docs = k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "Secret", "Deployment", "CronJob", "Service", "StatefulSet", "Job"} <= kinds
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    path = tmp_path / "streamlme.toml"
    path.write_text(config["data"]["streamlme.toml"])
    ok, message = check_config_file(path)
    assert ok, message
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "streamlme-secrets")
    assert all(k.startswith("STREAMLME_") for k in secret["stringData"])
    loaded = load_config(path, env=secret["stringData"])  # the overrides are real keys
    assert loaded.api.token == secret["stringData"]["STREAMLME_API_TOKEN"]
    ok, message = check_config_file(path, env=secret["stringData"])
    assert ok, message
    for doc in docs:
        for c in containers(doc):
            argv = k8s_argv(c)
            if argv[0] == "streamlme":
                assert_real_command(argv[1:])
                assert argv[argv.index("--config") + 1].startswith("/etc/streamlme/")
            elif argv[0] == "dask":
                assert_dask_command(argv)
            elif argv[0] == "redis-server":
                redis_options(argv)
            else:
                assert_shell_syntax(argv)


def redis_statefulset(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "StatefulSet")


def test_kubernetes_config_names_the_redis_cluster_pods_and_the_dask_service(tmp_path) -> None:
    docs = k8s_docs()
    sts = redis_statefulset(docs)
    assert sts["spec"]["replicas"] == 6
    service = next(d for d in docs if d["kind"] == "Service"
                   and d["metadata"]["name"] == sts["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS name per pod
    assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    pods = {f"{sts['metadata']['name']}-{i}.{service['metadata']['name']}" for i in range(6)}
    [c] = containers(sts)
    opts = redis_options(k8s_argv(c))
    assert opts["cluster-enabled"] == "yes"
    assert k8s_substitute(opts["cluster-announce-hostname"], {"POD_NAME": "redis-cluster-0"}) \
        == f"redis-cluster-0.{service['metadata']['name']}"
    env = env_values(c, docs, "redis-cluster-0")
    password = env["REDIS_PASSWORD"]

    config = next(d for d in docs if d["kind"] == "ConfigMap")
    path = tmp_path / "streamlme.toml"
    path.write_text(config["data"]["streamlme.toml"])
    secret = next(d for d in docs if d["metadata"]["name"] == "streamlme-secrets")
    for environ in ({}, secret["stringData"]):
        loaded = load_config(path, env=environ)
        assert loaded.redis.cluster
        assert {h for h, _ in loaded.redis.startup_nodes} <= pods
        assert loaded.redis.startup_nodes and all(p == 6379 for _, p in loaded.redis.startup_nodes)
    assert urlsplit(secret["stringData"]["STREAMLME_REDIS_URL"]).password == password

    assert loaded.refresh.engine == "dask"
    host, port = host_port(loaded.refresh.dask_scheduler, 8786)
    dask_service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == host)
    assert port in [p["port"] for p in dask_service["spec"]["ports"]]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    scheduler = next(d for d in deployments
                     if dask_service["spec"]["selector"].items()
                     <= d["spec"]["template"]["metadata"]["labels"].items())
    [sc] = containers(scheduler)
    target = next(p["targetPort"] for p in dask_service["spec"]["ports"] if p["port"] == port)
    assert dask_scheduler_port(k8s_argv(sc)) == next(
        p["containerPort"] for p in sc["ports"] if p["name"] == target or p["containerPort"] == target)
    workers = [d for d in deployments if any(k8s_argv(c)[:2] == ["dask", "worker"]
                                             for c in containers(d))]
    assert workers
    for w in workers:
        [wc] = containers(w)
        assert streamlme_image(wc["image"])  # the workers import streamlme
        assert host_port(dask_worker_scheduler(k8s_argv(wc)), 8786) == (host, port)
        env_values(wc, docs, "dask-worker-0")


def test_kubernetes_redis_cluster_job_creates_the_cluster(tmp_path) -> None:
    docs = k8s_docs()
    sts = redis_statefulset(docs)
    [c] = containers(sts)
    nodes = {}
    for i in range(6):
        pod = f"{sts['metadata']['name']}-{i}"
        values = env_values(c, docs, pod)
        nodes[f"{pod}.{sts['spec']['serviceName']}"] = [
            k8s_substitute(a, values) for a in k8s_argv(c)]
    job = next(d for d in docs if d["kind"] == "Job")
    [jc] = containers(job)
    script = k8s_argv(jc)
    assert_shell_syntax(script)
    assert pod_spec(job)["restartPolicy"] in ("OnFailure", "Never")
    env = env_values(jc, docs, "redis-cluster-create-x")
    assert env["REDISCLI_AUTH"] == nodes[next(iter(nodes))][
        nodes[next(iter(nodes))].index("--requirepass") + 1]
    check_cluster_init(tmp_path, nodes, script, env)


def test_dockerfile_entry_point_and_sources() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["streamlme"\]', text, re.M)
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, _dest = shlex.split(line)
        for src in sources:
            assert (DEPLOY.parent / src).exists(), src
    # the image runs the Dask scheduler and workers too: it installs the dask extra
    assert re.search(r'^RUN pip install .*"streamlme\[dask\]"', text, re.M)
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    assert any(r.startswith("dask[distributed]") for r in project["optional-dependencies"]["dask"])


@pytest.mark.parametrize("name", ["consume", "refresh", "serve", "publish", "fit", "demo"])
def test_documented_commands_exist(name: str) -> None:
    assert name in main.commands
