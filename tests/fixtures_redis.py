"""Redis for the tests: a real server, never a mock (pytest plugin, loaded by conftest.py).

``redis_url`` is ``STREAMLME_REDIS`` from the environment if set (e.g. the machine's own Redis),
else a ``redis-server`` this session starts on a free port (a testcontainers Redis if no
``redis-server`` is installed but a Docker engine answers). The suite never writes into a Redis
nobody named: by default each session (each xdist worker) has its own private server.

Each test works under its own ``namespace``; afterwards every key under that namespace's hash tags
(``{ns}``, ``{ns:s<i>}``, ``{ns-...}``) is deleted, from ``redis_url`` and ``redis_cluster``
alike. Tests never FLUSHALL/FLUSHDB a server they did not start. At the end of the session
`assert_no_keys_left` fails the run if a test namespace still holds a key with no expiry (a
write that outlived its test, or a namespace made without the fixture and not cleared): on a
private server every key counts, on a shared one those of the namespaces this session made.

``redis_server_factory`` starts private servers (e.g. with an append-only file) that a test may
stop and restart on the same port and directory, to exercise crashes and reconnects.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from net_helpers import free_port


class CountingRedis(redis.Redis):
    """A real client that remembers which commands it sent (to count round trips)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[str] = []

    def execute_command(self, *args: object, **options: object) -> object:
        self.commands.append(str(args[0]))
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: object = None) -> Any:
        """A pipeline whose execution is remembered as one round trip,
        ``"PIPELINE:<command>,<command>,..."``."""
        pipe = super().pipeline(transaction, shard_hint)
        execute, commands = pipe.execute, self.commands

        def counted(raise_on_error: bool = True) -> Any:
            names = ",".join(str(args[0]) for args, _ in pipe.command_stack)
            commands.append(f"PIPELINE:{names}")
            return execute(raise_on_error)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe


def _answers(url: str, timeout: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


class RedisServer:
    """A ``redis-server`` process this test session owns, restartable on its port and dir."""

    def __init__(self, directory: Path, options: dict[str, str] | None = None) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.options = {"save": "", "appendonly": "no", **(options or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (or restart) the server; data in its directory (AOF/RDB) comes back."""
        if self.process is not None and self.process.poll() is None:
            return self
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")]
        for key, value in self.options.items():
            args += [f"--{key}", value]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _answers(self.url, timeout=0.2):
            if self.process.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout}s")
            time.sleep(0.05)
        return self

    def stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        """SIGTERM (or SIGKILL with ``kill``) and wait; SIGKILL if SIGTERM is not enough."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start_container() -> Any:
    """A started testcontainers Redis, or None without testcontainers or a Docker engine."""
    try:
        from testcontainers.redis import RedisContainer

        return RedisContainer().start()
    except Exception:  # ImportError, or docker's errors when no engine answers
        return None


#: Namespaces the ``namespace`` fixtures made this session -> the test that made each one.
NAMESPACES: dict[str, str] = {}
#: Keys named in a leak report (more are counted, not listed).
LEAK_SHOWN = 20


def new_namespace(request: pytest.FixtureRequest) -> str:
    """A unique test namespace, remembered with its test's id for the leak report."""
    ns = f"t-{uuid.uuid4().hex[:8]}"
    NAMESPACES[ns] = request.node.nodeid
    return ns


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def namespace_of(key: bytes) -> str:
    """The namespace a key belongs to: its hash tag less any ``:s<i>`` shard suffix."""
    text = key.decode(errors="replace")
    if not text.startswith("{") or "}" not in text:
        return ""
    return text[1:text.index("}")].split(":", 1)[0]


def _owner(name: str) -> str | None:
    """The test whose namespace ``name`` is, or derives from (``<ns>-...``), if any."""
    if name in NAMESPACES:
        return NAMESPACES[name]
    return next((test for ns, test in NAMESPACES.items() if name.startswith(ns + "-")), None)


def keys_without_expiry(client: redis.Redis, pattern: str = "*") -> list[bytes]:
    """Keys matching ``pattern`` on one server (one node) that have no TTL."""
    keys = list(client.scan_iter(match=pattern, count=1000))
    found: list[bytes] = []
    for i in range(0, len(keys), 1000):
        pipe = client.pipeline(transaction=False)
        for key in keys[i:i + 1000]:
            pipe.pttl(key)
        found += [k for k, ttl in zip(keys[i:i + 1000], pipe.execute()) if ttl == -1]
    return found


def assert_no_keys_left(where: str, keys: list[bytes], private: bool) -> None:
    """Fail, naming the keys and the tests that made their namespaces, if a key of a test
    namespace has no expiry (``private``: every key counts; else only this session's)."""
    left = sorted(k for k in keys if private or _owner(namespace_of(k)))
    if not left:
        return
    owners = sorted({_owner(namespace_of(k)) or "a namespace made without the fixture"
                     for k in left})
    shown = ", ".join(k.decode(errors="replace") for k in left[:LEAK_SHOWN])
    more = f" and {len(left) - LEAK_SHOWN} more" if len(left) > LEAK_SHOWN else ""
    pytest.fail(f"{len(left)} key(s) with no expiry left in {where} after the tests: {shown}{more}"
                f" (written by {'; '.join(owners)}); delete them in the test's teardown or let "
                "the namespace fixture own them", pytrace=False)


def _check_server(url: str, private: bool) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = keys_without_expiry(client, "*" if private else "{t-*")
    finally:
        client.close()
    assert_no_keys_left(f"the session's Redis {url}", keys, private)


def _private_server(base: Path, attempts: int = 3) -> RedisServer:
    """A started session server; another free port if one was taken between probe and bind
    (two xdist workers can draw the same port)."""
    for attempt in range(attempts):
        try:
            return RedisServer(base / f"redis-{attempt}").start()
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Redis the whole session shares (see the module docstring for the order)."""
    env = os.environ.get("STREAMLME_REDIS")
    if env:
        if not _answers(env, timeout=2.0):
            pytest.fail(f"STREAMLME_REDIS={env} does not answer PING; start it or unset "
                        "STREAMLME_REDIS to let the tests start their own redis-server")
        yield env
        _check_server(env, private=False)
        return
    if shutil.which("redis-server") is None:
        container = _start_container()
        if container is not None:
            try:
                host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
                url = f"redis://{host}:{port}/0"
                yield url
                _check_server(url, private=True)
            finally:
                container.stop()
            return
    server = _private_server(tmp_path_factory.mktemp("redis-session"))
    try:
        yield server.url
        _check_server(server.url, private=True)
    finally:
        server.stop()


def namespace_patterns(namespace: str) -> list[str]:
    """SCAN patterns of a namespace's keys: its tag ``{ns}``, its shards' ``{ns:s<i>}`` and
    those of ``<ns>-...`` namespaces a test derived from it (not a neighbour ``{nsx}``)."""
    ns = _glob_escape(namespace)
    return ["{" + ns + "}*", "{" + ns + ":*", "{" + ns + "-*"]


def delete_namespace(url: str, namespace: str) -> int:
    """UNLINK every key of ``namespace`` (`namespace_patterns`; SCAN MATCH, in batches)."""
    client = redis.Redis.from_url(url)
    deleted = 0
    try:
        batch: list[bytes] = []
        for pattern in namespace_patterns(namespace):
            for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += client.unlink(*batch)
                    batch.clear()
        if batch:
            deleted += client.unlink(*batch)
    finally:
        client.close()
    return deleted


def cleanup_namespace(request: pytest.FixtureRequest, ns: str) -> None:
    """Delete ``ns``'s keys from each shared server the test used: ``redis_url``, and
    ``redis_cluster`` (a private per-test server or cluster goes away with its keys)."""
    if "redis_url" in request.fixturenames:
        delete_namespace(request.getfixturevalue("redis_url"), ns)
    if "redis_cluster" in request.fixturenames:
        from fixtures_cluster import delete_cluster_namespace

        delete_cluster_namespace(request.getfixturevalue("redis_cluster"), ns)


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace; afterwards its keys (and those of ``<namespace>-...``) are deleted."""
    ns = new_namespace(request)
    yield ns
    cleanup_namespace(request, ns)


class RedisServerFactory:
    """Starts private Redis servers; all of them are stopped when the test ends."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.servers: list[RedisServer] = []

    def __call__(self, **options: str) -> RedisServer:
        """A started server; options are redis.conf settings, e.g. ``appendonly="yes"``."""
        server = RedisServer(self.base / f"redis-{len(self.servers)}", options)
        self.servers.append(server)
        return server.start()

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop(kill=True)


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[RedisServerFactory]:
    factory = RedisServerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()
