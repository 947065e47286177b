"""A real Redis Cluster for the tests, never a mock (pytest plugin, loaded by conftest.py).

``LocalRedisCluster`` starts six ``redis-server --cluster-enabled yes`` processes on free ports,
joins them with ``redis-cli --cluster create ... --cluster-replicas 1`` (3 masters, 3 replicas)
and waits until every node says ``cluster_state:ok`` and every master has its replica attached.
It also offers the faults the stream tests need: ``kill_master`` (kill -9, then wait for the
replica's promotion), ``freeze``/``thaw`` (SIGSTOP/SIGCONT), ``restart`` and ``reshard``
(``redis-cli --cluster reshard`` in the background).

Fixtures:

- ``redis_cluster`` (session): ``STREAMLME_TEST_REDIS_CLUSTER`` (comma-separated host:port startup
  nodes of an existing cluster) if set, else one local cluster for the whole session. On an
  existing cluster the fault tools are not available: a test calling them is skipped.
- ``private_redis_cluster`` (function): a fresh local cluster per test, for tests that kill,
  freeze or reshard. Skipped when ``STREAMLME_TEST_REDIS_CLUSTER`` names a cluster to use instead.
- ``cluster_namespace`` (function): a unique namespace; afterwards every key of it (hash tags
  ``{ns}`` and ``{ns:s<N>}``) is deleted on every master of ``redis_cluster`` (and from
  ``redis_url`` if the test used it). A cluster the tests did not start is never flushed. Keys a
  test left in ``private_redis_cluster`` go with it. At the end of the session a key with no
  expiry left in ``redis_cluster`` fails the run (as in `fixtures_redis`).

Without ``redis-server``/``redis-cli`` the tests that need a cluster are skipped, except under
``CI=true``, where they fail: CI must run them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from fixtures_redis import (
    assert_no_keys_left,
    cleanup_namespace,
    keys_without_expiry,
    namespace_patterns,
    new_namespace,
)
from net_helpers import free_port
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

ENV = "STREAMLME_TEST_REDIS_CLUSTER"
SLOTS = 16384


def _missing_binaries() -> None:
    """Skip (fail under CI=true) when redis-server or redis-cli is not installed."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if not missing:
        return
    message = (f"{' and '.join(missing)} not installed "
               "(apt-get install redis-server redis-tools): no local Redis Cluster")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def cluster_ports(n: int) -> list[int]:
    """``n`` free ports for cluster nodes: each node's bus listens on port + 10000, so that one
    must be free too (and so at most 55535), and no port may be another's bus port."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port > 55535 or port in ports or port + 10000 in ports or port - 10000 in ports:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


def _split(name: str) -> tuple[str, int]:
    host, _, port = name.rpartition(":")
    return host, int(port)


@dataclass(frozen=True)
class NodeInfo:
    """One line of CLUSTER NODES."""

    id: str
    name: str  # "host:port"
    flags: frozenset[str]
    master_id: str | None  # the master's id for a replica
    link: str  # "connected" / "disconnected"
    slots: tuple[tuple[int, int], ...] = field(default=())  # inclusive ranges

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return "fail" in self.flags or "noaddr" in self.flags

    def owns(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)

    @property
    def slot_count(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.slots)


def parse_cluster_nodes(text: str) -> list[NodeInfo]:
    """CLUSTER NODES output as NodeInfo (slots in migration, ``[s->-id]``, are left out)."""
    out = []
    for line in text.strip().splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        address = parts[1].split("@")[0].split(",")[0]
        slots = []
        for item in parts[8:]:
            if item.startswith("["):
                continue
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        flags = frozenset(parts[2].split(","))
        out.append(NodeInfo(id=parts[0], name=address, flags=flags,
                            master_id=None if parts[3] == "-" else parts[3], link=parts[7],
                            slots=tuple(slots)))
    return out


class RedisClusterHandle:
    """A Redis Cluster the tests talk to: addresses, clients and topology, no faults.

    Used as is for an existing cluster (``STREAMLME_TEST_REDIS_CLUSTER``); ``LocalRedisCluster``
    adds the processes and the fault tools."""

    fault_tools = False

    def __init__(self, startup_nodes: Iterable[str], password: str | None = None) -> None:
        self._startup = list(startup_nodes)
        self.password = password

    # ---- addresses ---------------------------------------------------------------------
    @property
    def startup_nodes(self) -> list[str]:
        """["host:port", ...]: the nodes to start from."""
        return list(self._startup)

    @property
    def url(self) -> str:
        """``redis+cluster://h1:p1,h2:p2,...``: the form streamlme's config accepts."""
        return "redis+cluster://" + ",".join(self.startup_nodes)

    @property
    def redis_url(self) -> str:
        """``redis://h1:p1``: one startup node, for ``RedisCluster.from_url``."""
        return f"redis://{self.startup_nodes[0]}"

    # ---- clients -----------------------------------------------------------------------
    def client(self, **kwargs: object) -> RedisCluster:
        """A ``redis.cluster.RedisCluster`` over all the startup nodes (kwargs passed on)."""
        nodes = [ClusterNode(*_split(n)) for n in self.startup_nodes]
        kwargs.setdefault("socket_timeout", 5.0)
        kwargs.setdefault("socket_connect_timeout", 2.0)
        kwargs.setdefault("password", self.password)
        return RedisCluster(startup_nodes=nodes, **kwargs)  # type: ignore[arg-type]

    def node(self, name: str, timeout: float = 1.0) -> redis.Redis:
        """A plain client to one node ("host:port"), e.g. for CLUSTER INFO or SCAN."""
        host, port = _split(name)
        return redis.Redis(host=host, port=port, socket_timeout=timeout,
                           socket_connect_timeout=timeout, password=self.password)

    def _ask(self, name: str, *command: str, timeout: float = 1.0) -> str | None:
        """The reply of one node as text, or None if it does not answer."""
        host, port = _split(name)
        conn = redis.Connection(host=host, port=port, socket_timeout=timeout,
                                socket_connect_timeout=timeout, password=self.password)
        try:  # a bare connection: the raw reply, not redis-py's parse of INFO into a dict
            conn.send_command(*command)
            reply = conn.read_response()
        except (redis.RedisError, OSError):
            return None
        finally:
            conn.disconnect()
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def _seeds(self) -> list[str]:
        """The nodes asked for CLUSTER NODES (a local cluster: its live, unfrozen ones)."""
        return self.startup_nodes

    def reachable_nodes(self) -> list[str]:
        """The nodes the topology checks ask: every node not flagged as failed."""
        return [n.name for n in self.nodes() if not n.failed]

    # ---- topology ----------------------------------------------------------------------
    def nodes(self) -> list[NodeInfo]:
        """CLUSTER NODES as one reachable node sees it."""
        for name in self._seeds():
            text = self._ask(name, "CLUSTER", "NODES")
            if text:
                return parse_cluster_nodes(text)
        raise RuntimeError(f"no node of {self.startup_nodes} answers CLUSTER NODES")

    def masters(self) -> list[str]:
        """Names ("host:port") of the masters that have not failed, by port."""
        return sorted((n.name for n in self.nodes() if n.is_master and not n.failed),
                      key=lambda s: _split(s)[1])

    def replicas(self) -> list[str]:
        return sorted((n.name for n in self.nodes() if not n.is_master and not n.failed),
                      key=lambda s: _split(s)[1])

    def node_id(self, name: str) -> str:
        for n in self.nodes():
            if n.name == name:
                return n.id
        raise KeyError(name)

    def replica_of(self, master: str) -> str | None:
        """The (first, non-failed) replica of ``master``, or None."""
        infos = self.nodes()
        mid = next(n.id for n in infos if n.name == master)
        names = [n.name for n in infos if n.master_id == mid and not n.failed]
        return sorted(names)[0] if names else None

    def slot_owner(self, slot: int) -> str:
        for n in self.nodes():
            if n.is_master and not n.failed and n.owns(slot):
                return n.name
        raise LookupError(f"no master owns slot {slot}")

    def slots_of(self, master: str) -> int:
        """How many slots ``master`` owns."""
        return next(n.slot_count for n in self.nodes() if n.name == master)

    def owned_slots(self, master: str) -> set[int]:
        """The slots ``master`` owns (one CLUSTER NODES call)."""
        node = next(n for n in self.nodes() if n.name == master)
        return {s for lo, hi in node.slots for s in range(lo, hi + 1)}

    def master_for_key(self, key: str | bytes) -> str:
        """The master that owns ``key``'s slot (the slot as CLUSTER KEYSLOT computes it)."""
        raw = key.encode() if isinstance(key, str) else key
        slot = None
        for name in self.reachable_nodes():
            client = self.node(name)
            try:
                slot = int(client.execute_command("CLUSTER", "KEYSLOT", raw))
                break
            except (redis.RedisError, OSError):
                continue
            finally:
                client.close()
        if slot is None:
            slot = key_slot(raw)
        return self.slot_owner(slot)

    def is_ok(self) -> bool:
        """Every reachable node says cluster_state:ok, all agree on every node's role and slots,
        all 16384 slots are served and every master has a connected replica whose link to it is
        up."""
        names = self.reachable_nodes()
        views = []
        for name in names:
            info = self._ask(name, "CLUSTER", "INFO")
            if info is None or "cluster_state:ok" not in info:
                return False
            text = self._ask(name, "CLUSTER", "NODES")
            if not text:
                return False
            views.append(parse_cluster_nodes(text))
        if not views:
            return False
        # every node sees the same roles: (id, master or the id of its master, slots), and no
        # master is left without slots (a node redis-cli has not yet made a replica)
        roles = [{(n.id, "master" if n.is_master else n.master_id, n.slots)
                  for n in v if not n.failed} for v in views]
        if any(r != roles[0] for r in roles) or any(m == "master" and not sl
                                                    for _, m, sl in roles[0]):
            return False
        masters = [{(n.id, n.slots) for n in v if n.is_master and not n.failed and n.slots}
                   for v in views]
        if sum(hi - lo + 1 for _, slots in masters[0] for lo, hi in slots) != SLOTS:
            return False
        view = views[0]
        for mid, _ in masters[0]:
            replicas = [n for n in view if n.master_id == mid and not n.failed
                        and n.link == "connected" and n.name in names]
            if not replicas:
                return False
            for replica in replicas:
                info = self._ask(replica.name, "INFO", "replication") or ""
                if "master_link_status:up" not in info:
                    return False
        return True

    def wait_ok(self, timeout: float = 30.0) -> float:
        """Wait until ``is_ok``; returns the seconds it took."""
        start = time.monotonic()
        while not self.is_ok():
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"Redis Cluster {self.startup_nodes} not ok after {timeout}s:\n"
                                   + "\n".join(f"{n.name} {sorted(n.flags)} {n.slots}"
                                               for n in self.nodes()))
            time.sleep(0.05)
        return time.monotonic() - start

    # ---- faults: only on a cluster the tests started -----------------------------------
    def _no_faults(self, what: str) -> None:
        pytest.skip(f"{what} needs a Redis Cluster the tests started; "
                    f"{ENV} names an existing one")

    def kill_master(self, node: str, wait_failover: bool = True, timeout: float = 30.0) -> str:
        self._no_faults("kill_master")
        raise AssertionError

    def freeze(self, node: str) -> None:
        self._no_faults("freeze")

    def thaw(self, node: str) -> None:
        self._no_faults("thaw")

    def restart(self, node: str, timeout: float = 30.0) -> None:
        self._no_faults("restart")

    def reshard(self, from_node: str, to_node: str, slots: int = 1000,
                wait: bool = False) -> subprocess.Popen[bytes]:
        self._no_faults("reshard")
        raise AssertionError

    def stop(self) -> None:
        """Nothing: a cluster the tests did not start is left as it is."""


class LocalRedisCluster(RedisClusterHandle):
    """Six local ``redis-server --cluster-enabled yes`` processes (3 masters, 3 replicas)."""

    fault_tools = True

    def __init__(self, directory: Path, masters: int = 3, replicas: int = 1,
                 node_timeout_ms: int = 2000) -> None:
        _missing_binaries()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n_masters, self.n_replicas = masters, replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports = cluster_ports(masters * (1 + replicas))
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.frozen: set[int] = set()
        self.started_s: float | None = None  # seconds from the first process to cluster ok
        super().__init__([f"127.0.0.1:{p}" for p in self.ports])

    # ---- processes ---------------------------------------------------------------------
    def _node_dir(self, port: int) -> Path:
        return self.dir / str(port)

    def log(self, node: str) -> str:
        """The tail of a node's log file (for failure messages)."""
        path = self._node_dir(_split(node)[1]) / "redis.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def _spawn(self, port: int) -> None:
        d = self._node_dir(port)
        d.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms), "--dir", str(d),
                "--save", "", "--appendonly", "no", "--logfile", str(d / "redis.log"),
                # a replica's first sync waits 5 s by default (diskless, for more replicas to join)
                "--repl-diskless-sync-delay", "0"]
        self.processes[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)

    def _wait_answers(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        name = f"127.0.0.1:{port}"
        while self._ask(name, "PING", timeout=0.2) is None:
            proc = self.processes[port]
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server {name} exited with {proc.returncode}: "
                                   f"{self.log(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server {name} did not answer in {timeout}s")
            time.sleep(0.02)

    def alive(self, node: str) -> bool:
        proc = self.processes.get(_split(node)[1])
        return proc is not None and proc.poll() is None

    def reachable_nodes(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports
                if p not in self.frozen and self.alive(f"127.0.0.1:{p}")]

    _seeds = reachable_nodes

    def start(self, timeout: float = 30.0) -> LocalRedisCluster:
        """Start the processes, create the cluster, wait until it is ok."""
        t0 = time.monotonic()
        try:
            for port in self.ports:
                self._spawn(port)
            for port in self.ports:
                self._wait_answers(port, timeout)
            create = subprocess.run(
                ["redis-cli", "--cluster", "create", *self.startup_nodes,
                 "--cluster-replicas", str(self.n_replicas), "--cluster-yes"],
                capture_output=True, timeout=timeout, check=False)
            if create.returncode != 0:
                raise RuntimeError("redis-cli --cluster create failed: "
                                   + (create.stdout + create.stderr).decode(errors="replace"))
            self.wait_ok(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except BaseException:
            self.stop()
            raise
        self.started_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """kill -9 every process (frozen ones too) and wait for them."""
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.frozen.clear()

    # ---- faults ------------------------------------------------------------------------
    def _port_of(self, node: str) -> int:
        port = _split(node)[1]
        if port not in self.processes:
            raise KeyError(f"{node} is not a node of this cluster")
        return port

    def kill_master(self, node: str, wait_failover: bool = True, timeout: float = 30.0) -> str:
        """kill -9 the master ``node``; with ``wait_failover``, wait until its replica is promoted
        and the cluster is ok again. Returns the name of the replica (the new master)."""
        replica = self.replica_of(node)
        if replica is None:
            raise RuntimeError(f"{node} has no replica to take over")
        port = self._port_of(node)
        proc = self.processes[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        self.frozen.discard(port)
        if wait_failover:
            self.wait_promoted(replica, timeout=timeout)
        return replica

    def wait_promoted(self, replica: str, timeout: float = 30.0) -> float:
        """Wait until every reachable node sees ``replica`` as a master and the cluster state is
        ok; returns the seconds it took. (Every master having a replica again is not required:
        the dead master's replica is gone until ``restart``.)"""
        start = time.monotonic()
        while True:
            names = self.reachable_nodes()
            done = bool(names)
            for name in names:
                info = self._ask(name, "CLUSTER", "INFO")
                text = self._ask(name, "CLUSTER", "NODES")
                if not info or "cluster_state:ok" not in info or not text:
                    done = False
                    break
                view = {n.name: n for n in parse_cluster_nodes(text)}
                if replica not in view or not view[replica].is_master or not view[replica].slots:
                    done = False
                    break
            if done:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{replica} was not promoted in {timeout}s: {self.log(replica)}")
            time.sleep(0.05)

    def freeze(self, node: str) -> None:
        """SIGSTOP: the node keeps its sockets but answers nothing (a stalled machine).

        What is sent to a frozen node still lands in its kernel socket buffer and is read when
        it is thawed: a frozen replica catches up on the writes sent meanwhile (up to a few MB).
        For a replica that really misses them, see ``lag``."""
        port = self._port_of(node)
        self.processes[port].send_signal(signal.SIGSTOP)
        self.frozen.add(port)

    def lag(self, replica: str) -> str:
        """Freeze ``replica`` and cut its master's link to it (CLIENT KILL TYPE replica on the
        master), so nothing the master acknowledges from now on reaches it. With
        ``kill_master(master, wait_failover=False)``, ``thaw(replica)`` and
        ``wait_promoted(replica)`` this is the failover that loses acknowledged writes. Keep the
        freeze short: a replica cut off for longer than node-timeout x 10 + 10 s refuses to
        take over. Returns the master's name."""
        infos = self.nodes()
        me = next(n for n in infos if n.name == replica)
        master = next(n.name for n in infos if n.id == me.master_id)
        self.freeze(replica)
        client = self.node(master)
        try:
            client.execute_command("CLIENT", "KILL", "TYPE", "replica")
        finally:
            client.close()
        return master

    def thaw(self, node: str) -> None:
        """SIGCONT a frozen node."""
        port = self._port_of(node)
        self.processes[port].send_signal(signal.SIGCONT)
        self.frozen.discard(port)

    def restart(self, node: str, timeout: float = 30.0) -> None:
        """Start a killed node again on its port and nodes.conf; it rejoins (a former master as
        a replica of its promoted replica). Waits until the whole cluster is ok."""
        port = self._port_of(node)
        if self.alive(node):
            raise RuntimeError(f"{node} is still running")
        self._spawn(port)
        self._wait_answers(port, timeout)
        self.wait_ok(timeout)

    def reshard(self, from_node: str, to_node: str, slots: int = 1000,
                wait: bool = False) -> subprocess.Popen[bytes]:
        """``redis-cli --cluster reshard``: move ``slots`` slots from one master to another.

        Runs in the background and returns the Popen (a test streams events meanwhile, then
        ``wait()``s and checks ``returncode``); with ``wait`` it returns once it is done and the
        cluster is ok, raising if redis-cli failed."""
        from_id, to_id = self.node_id(from_node), self.node_id(to_node)
        log = open(self.dir / f"reshard-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            ["redis-cli", "--cluster", "reshard", from_node, "--cluster-from", from_id,
             "--cluster-to", to_id, "--cluster-slots", str(slots), "--cluster-yes"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child holds its own descriptor
        proc.log_path = Path(log.name)  # type: ignore[attr-defined]
        if wait:
            proc.wait(timeout=300)
            if proc.returncode != 0:
                raise RuntimeError("redis-cli --cluster reshard failed: "
                                   + Path(log.name).read_text(errors="replace")[-3000:])
            self.wait_ok()
        return proc


# ---- namespace cleanup ------------------------------------------------------------------
def delete_cluster_namespace(cluster: RedisClusterHandle, namespace: str) -> int:
    """UNLINK every key of ``namespace`` (hash tags ``{ns}``, ``{ns:s<N>}`` and those of
    ``<ns>-...`` namespaces a test derived from it) on every master.

    SCANs each master with `fixtures_redis.namespace_patterns`; the keys found are unlinked
    through the cluster client, one slot at a time (a multi-key call must stay in one slot)."""
    patterns = namespace_patterns(namespace)
    client = cluster.client()
    deleted = 0
    try:
        for master in cluster.masters():
            node = cluster.node(master, timeout=5.0)
            try:
                by_slot: dict[int, list[bytes]] = {}
                for pattern in patterns:
                    for key in node.scan_iter(match=pattern, count=1000):
                        by_slot.setdefault(key_slot(key), []).append(key)
            finally:
                node.close()
            for keys in by_slot.values():
                for i in range(0, len(keys), 1000):
                    deleted += int(client.unlink(*keys[i:i + 1000]))
    finally:
        client.close()
    return deleted


# ---- fixtures ---------------------------------------------------------------------------
def _env_cluster() -> RedisClusterHandle | None:
    env = os.environ.get(ENV, "").strip()
    if not env:
        return None
    handle = RedisClusterHandle([n.strip() for n in env.split(",") if n.strip()])
    info = handle._ask(handle.startup_nodes[0], "CLUSTER", "INFO", timeout=2.0)
    if not info or "cluster_state:ok" not in info:
        pytest.fail(f"{ENV}={env}: {handle.startup_nodes[0]} does not say cluster_state:ok")
    return handle


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterHandle]:
    """The session's Redis Cluster: ``STREAMLME_TEST_REDIS_CLUSTER`` if set, else a local one."""
    handle = _env_cluster()
    if handle is not None:
        yield handle
        assert_no_cluster_keys_left(handle, private=False)
        return
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield cluster
        assert_no_cluster_keys_left(cluster, private=True)
    finally:
        cluster.stop()


def assert_no_cluster_keys_left(cluster: RedisClusterHandle, private: bool) -> None:
    """`fixtures_redis.assert_no_keys_left` over every master of ``cluster``."""
    keys: list[bytes] = []
    for master in cluster.masters():
        node = cluster.node(master, timeout=5.0)
        try:
            keys += keys_without_expiry(node, "*" if private else "{t-*")
        finally:
            node.close()
    assert_no_keys_left(f"the session's Redis Cluster {cluster.url}", keys, private)


@pytest.fixture
def private_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """A fresh local cluster for this test alone (kill, freeze, reshard at will)."""
    if os.environ.get(ENV, "").strip():
        pytest.skip(f"{ENV} names an existing cluster; this test needs one it can break")
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster-private")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_namespace(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace; afterwards its keys are deleted from ``redis_cluster`` (if the test
    used it). A ``private_redis_cluster`` is thrown away whole, keys and all."""
    ns = new_namespace(request)
    yield ns
    cleanup_namespace(request, ns)
