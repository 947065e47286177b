"""The Dask engine of the refresh: shards loaded by workers straight from Redis, the deviance a
map over them (``[refresh] engine = "dask"``, ``streamlme refresh --dask ADDRESS``).

A refresh on Dask (`DaskRefresh`):

1. **Read.** Tasks ``load_shards(address, shards, created, versions)`` of a few consecutive
   shards each (one pipelined read), keyed by the store's address, the namespace's creation
   time, the shard ids and the shards' versions: pure tasks, so if a worker is lost Dask
   recomputes its shards from Redis (``shards_per_task=1`` gives one task per shard). Each
   loaded shard carries the version it was read at; the driver records them, and every partial
   sum later returned names the versions of the shards it came from, so a shard recomputed
   after it changed (a live stream merges into it) is detected (`ShardMovedError`), never
   silently mixed with the old frame. The futures keep the shards in the workers' memory for
   the whole refresh. Cells whose statistics are not finite or not valid are left out there
   (`streamlme.refresh.valid_cells`) and named to the driver, as the local engine does.
2. **Summaries.** One small task per worker returns its shards' pooled moments and digests
   (`streamlme.estimate.blocks.summarise`, `streamlme.refresh.stats_digest`); the driver
   combines them into the frame (the global centring) and the statistics' fingerprint, which
   is the local engine's for the same statistics.
3. **Blocks.** Each worker thread's shards become one bundle of blocks
   (`streamlme.estimate.blocks.build_block`), held as a future on that worker.
4. **Fit.** `streamlme.estimate.blocks.fit_blocks` runs the optimiser in this process; each
   map is ``client.map(run_bundle, bundles, fn=...)`` and a gather of small partial sums (per
   shard, added in shard order, so the result does not depend on which worker held what).

Why bundles and grouped loads rather than one task per shard: on this 2-core machine a scheduler
round of a map over 256 shard futures cost about 180 ms, over one bundle per worker thread about
10-15 ms; and loading 256 shards (1e5 groups) as 256 tasks took about 2 s against about 0.2 s for
the local engine's read.

The store must be a `RedisStore` (standalone or Cluster): a `MemoryStore` lives in this process,
which workers cannot read, and is refused (`DaskEngineError`). Models with several random-effect
terms are refused by `streamlme.estimate.blocks.check_spec`.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import numpy as np

from streamlme.estimate import blocks
from streamlme.estimate.blocks import Block, Frame
from streamlme.estimate.result import FitResult
from streamlme.refresh import StatsDigest, drop_invalid, stats_digest
from streamlme.spec import ModelSpec
from streamlme.stats import GroupStats

log = logging.getLogger(__name__)


class DaskEngineError(RuntimeError):
    """The Dask engine cannot run this refresh (a store workers cannot read, no scheduler)."""


class ShardMovedError(RuntimeError):
    """A shard recomputed after a lost worker is not the version the fit started from."""


# -- worker side: pure functions of their arguments -----------------------------------------------


@dataclass
class Shard:
    """One shard as a worker read it."""

    index: int
    version: int
    stats: GroupStats
    excluded: list[str] = field(default_factory=list)  # cells left out: not valid statistics


_stores: dict[Any, Any] = {}
_stores_lock = threading.Lock()


def _open(address: Any) -> Any:
    """This process's connection to ``address`` (one per address, shared by its threads)."""
    with _stores_lock:
        store = _stores.get(address)
        if store is None:
            store = _stores[address] = address.open()
        return store


def load_shards(address: Any, shards: Sequence[int], created: float | None = None,
                versions: Sequence[int] = ()) -> list[Shard]:
    """Shards ``shards`` of the store at ``address`` (one pipelined read), each with the
    version it was read at.

    ``created`` and ``versions`` only name the task (a namespace cleared and refilled is another
    one; shards that moved are another task). The version recorded is the one read just before
    the shards' snapshots, which is conservative: a shard that changed between the two reads
    shows a version that a later read will not match.
    """
    store = _open(address)
    read = store.shard_versions()
    return [Shard(s, int(read[s]), *drop_invalid(stats))
            for s, stats in zip(shards, store.read_shards(list(shards)), strict=True)]


@dataclass(frozen=True)
class ShardSummary:
    index: int
    version: int
    rows: int
    mass: float
    summary: blocks.Summary
    digest: StatsDigest
    excluded: list[str] = field(default_factory=list)


def summarise_shards(loads: Sequence[list[Shard]], spec: ModelSpec) -> list[ShardSummary]:
    """What the driver needs of some loaded shards before it can build blocks (small)."""
    return [ShardSummary(s.index, s.version, len(s.stats), float(s.stats.n.sum()),
                         blocks.summarise(s.stats, spec), stats_digest(s.stats), s.excluded)
            for shards in loads for s in shards]


@dataclass
class Bundle:
    """The blocks of one worker thread's shards, in shard order, with the shards' versions."""

    versions: dict[int, int]
    blocks: list[Block]


def build_bundle(loads: Sequence[list[Shard]], fr: Frame) -> Bundle:
    ordered = sorted((s for shards in loads for s in shards), key=lambda s: s.index)
    return Bundle({s.index: s.version for s in ordered},
                  [blocks.build_block(s.stats, fr, s.index) for s in ordered
                   if (s.stats.n > 0).any()])


def run_bundle(bundle: Bundle, fn: Callable[[Block], Any]
               ) -> tuple[dict[int, int], list[int], Any, float]:
    """``fn`` of every block of the bundle: (the shards' versions, the blocks' shards, their
    results packed by `pack`, the seconds it took here)."""
    t0 = time.perf_counter()
    out = [fn(b) for b in bundle.blocks]
    return bundle.versions, [b.index for b in bundle.blocks], pack(out), time.perf_counter() - t0


def pack(parts: list[Any]) -> Any:
    """Results that are instances of one dataclass as (class, {field: stacked values}): a few
    arrays cross the network instead of hundreds of small objects (a map's transfer over 128
    blocks a worker fell from about 20 ms to a few). Anything else as it is."""
    if not parts or not is_dataclass(parts[0]) or any(type(p) is not type(parts[0])
                                                        for p in parts):
        return parts
    return type(parts[0]), {f.name: np.asarray([getattr(p, f.name) for p in parts])
                            for f in fields(parts[0])}


def unpack(packed: Any) -> list[Any]:
    """The results `pack` packed."""
    if isinstance(packed, list):
        return packed
    cls, columns = packed
    n = len(next(iter(columns.values())))
    return [cls(**{k: (v[i] if v.ndim > 1 else v[i].item()) for k, v in columns.items()})
            for i in range(n)]


def warm_up() -> float:
    """Compile (or load from numba's cache) the kernels on a worker."""
    from streamlme.estimate import kernels

    t = kernels.warm_up()
    stats_digest(GroupStats.from_rows(["a", "b"], np.ones((2, 2))))
    return t


# -- clients ---------------------------------------------------------------------------------


_clients: dict[str, Any] = {}
_warm: set[str] = set()


def client_for(address: str, timeout: float = 10.0) -> Any:
    """A `distributed.Client` of the scheduler at ``address``, one per address and process
    (a long-lived leader reuses it from refresh to refresh). DaskEngineError if none answers."""
    import distributed

    client = _clients.get(address)
    if client is not None and client.status == "running":
        return client
    try:
        client = distributed.Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise DaskEngineError(f"no Dask scheduler answers at {address}: {exc}") from exc
    _clients[address] = client
    return client


def close_clients() -> None:
    """Close the clients `client_for` opened."""
    for address in list(_clients):
        client = _clients.pop(address)
        _warm.discard(address)
        try:
            client.close()
        except Exception:  # a scheduler already gone
            log.debug("closing the Dask client of %s", address, exc_info=True)


atexit.register(close_clients)


# -- the driver --------------------------------------------------------------------------------


@dataclass
class Loaded:
    """What the read phase gives the refresh."""

    fingerprint: str
    rows: int       # the store's valid groups (cells), those without mass included
    mass: float     # total weight mass
    seconds: float
    excluded: list[str] = field(default_factory=list)  # cells left out: not valid statistics


@dataclass
class DaskFit:
    """A fit on Dask: the result, and what it cost."""

    result: FitResult
    maps: int
    map_seconds: float
    worker_seconds: float  # the slowest bundle of each map, summed: the computation

    @property
    def overhead_ms_per_map(self) -> float:
        """Wall time of a map that was not computation: scheduling, transfer, the gather."""
        return 1e3 * (self.map_seconds - self.worker_seconds) / max(self.maps, 1)


class DaskRefresh:
    """One refresh's shards on the workers of ``client``: `load`, then `fit`, then `close`.

    >>> # engine = DaskRefresh(client_for("tcp://scheduler:8786"), store, spec)
    >>> # loaded = engine.load(); result = engine.fit("REML").result; engine.close()
    """

    def __init__(self, client: Any, store: Any, spec: ModelSpec,
                 shards_per_task: int | None = None) -> None:
        check_store(store)
        self.client, self.store, self.spec = client, store, spec
        self.shards_per_task = shards_per_task
        self.shards: list[Any] = []         # one future per load task (a list of shards)
        self.loads: list[list[int]] = []    # the shards of each load task
        self.versions: dict[int, int] = {}  # as loaded
        self.summaries: list[ShardSummary] = []
        self.bundles: list[Any] = []
        self.frame: Frame | None = None
        self._worker_seconds = 0.0

    # -- read ------------------------------------------------------------------------------

    def load(self) -> Loaded:
        """Load every shard into the workers and summarise them (the refresh's read)."""
        from dask.base import tokenize

        t0 = time.perf_counter()
        address = self.store.address()
        created = self.store.created_at()
        versions = [int(v) for v in self.store.shard_versions()]
        S = len(versions)
        threads = sum(int(w.get("nthreads", 1))
                      for w in self.client.scheduler_info()["workers"].values())
        k = self.shards_per_task or max(1, -(-S // (4 * max(threads, 1))))
        self.loads = [list(range(lo, min(lo + k, S))) for lo in range(0, S, k)]
        name = tokenize(address, created)
        self.shards = [
            self.client.submit(
                load_shards, address, tuple(ids), created, tuple(versions[s] for s in ids),
                key=f"streamlme-shards-{name}-{ids[0]}-{ids[-1]}-"
                    f"{tokenize(*(versions[s] for s in ids))}")
            for ids in self.loads]
        groups = self._by_thread(self.shards)
        parts = self.client.gather([
            self.client.submit(summarise_shards, futures, self.spec, workers=[w],
                               allow_other_workers=True, pure=False)
            for w, futures in groups])
        self.summaries = sorted((s for part in parts for s in part), key=lambda s: s.index)
        self.versions = {s.index: s.version for s in self.summaries}
        digest = StatsDigest(0, len(self.spec.columns))
        for s in self.summaries:
            digest = digest + s.digest
        return Loaded(digest.hexdigest(), sum(s.rows for s in self.summaries),
                      float(sum(s.mass for s in self.summaries)), time.perf_counter() - t0,
                      [key for s in self.summaries for key in s.excluded])

    def _by_thread(self, futures: Sequence[Any]) -> list[tuple[str, list[Any]]]:
        """The futures grouped by the worker holding them, one group per worker thread
        (groups balanced by the shards' sizes where sizes are known)."""
        import distributed

        with self.client.as_current():
            distributed.wait(futures)
        who = self.client.who_has(futures)
        threads = {w: int(info.get("nthreads", 1))
                   for w, info in self.client.scheduler_info()["workers"].items()}
        rows = {s.index: s.rows for s in self.summaries}
        size = {i: sum(rows.get(s, 0) for s in ids) for i, ids in enumerate(self.loads)}
        by_worker: dict[str, list[tuple[int, Any]]] = {}
        for i, f in enumerate(futures):
            holders = who.get(f.key) or list(threads) or [""]
            by_worker.setdefault(holders[0], []).append((i, f))
        out: list[tuple[str, list[Any]]] = []
        for w, items in by_worker.items():
            k = max(1, min(threads.get(w, 1), len(items)))
            bins: list[list[Any]] = [[] for _ in range(k)]
            load = [0] * k
            for i, f in sorted(items, key=lambda it: -size.get(it[0], 0)):
                j = int(np.argmin(load))
                bins[j].append(f)
                load[j] += size.get(i, 1)
            out += [(w, b) for b in bins if b]
        return out

    # -- fit -------------------------------------------------------------------------------

    def fit(self, method: str | None = None, *, start: FitResult | Mapping[str, Any] | None = None,
            tol: float = 1e-10, max_iter: int = 500) -> DaskFit:
        """The one-term fit of the loaded shards (`streamlme.estimate.blocks.fit_blocks`)."""
        if not self.summaries:
            raise DaskEngineError("nothing loaded: call load() first")
        method = blocks.check_spec(self.spec, method)
        self.frame = blocks.frame(self.spec, blocks.combine([s.summary for s in self.summaries]))
        self.bundles = [
            self.client.submit(build_bundle, futures, self.frame, workers=[w],
                               allow_other_workers=True, pure=False)
            for w, futures in self._by_thread(self.shards)]
        self._worker_seconds = 0.0
        out = blocks.fit_blocks(self.frame, self.spec, self.map_blocks, method, start=start,
                                tol=tol, max_iter=max_iter)
        return DaskFit(out.result, out.maps, out.map_seconds, self._worker_seconds)

    def map_blocks(self, fn: Callable[[Block], Any]) -> list[Any]:
        """``fn(block)`` for every block, on the workers holding them, in shard order."""
        futures = self.client.map(run_bundle, self.bundles, fn=fn, pure=False)
        try:
            results = self.client.gather(futures, direct=True)
        finally:
            for f in futures:
                f.release()
        parts: list[tuple[int, Any]] = []
        slowest = 0.0
        for versions, indices, packed, seconds in results:
            moved = {s: v for s, v in versions.items() if self.versions.get(s) != v}
            if moved:
                s, v = next(iter(moved.items()))
                raise ShardMovedError(
                    f"shard {s} was recomputed at version {v} after its worker was lost, but the "
                    f"fit started from version {self.versions.get(s)}: its statistics changed "
                    "meanwhile; the next refresh reads them again")
            parts += zip(indices, unpack(packed), strict=True)
            slowest = max(slowest, seconds)
        self._worker_seconds += slowest
        parts.sort(key=lambda item: item[0])
        return [p for _, p in parts]

    def close(self) -> None:
        """Release the shards and blocks from the workers' memory."""
        for f in [*self.bundles, *self.shards]:
            f.release()
        self.bundles, self.shards = [], []


def check_store(store: Any) -> None:
    """DaskEngineError unless workers can read ``store`` straight from Redis."""
    from streamlme.store import RedisStore

    if not isinstance(store, RedisStore):
        raise DaskEngineError(
            f"the Dask engine reads shards straight from Redis on the workers, but this store "
            f"is a {type(store).__name__}, which lives in this process only: configure [redis] "
            "or use [refresh] engine = \"local\"")


def warm_workers(client: Any, address: str | None = None) -> None:
    """Have every worker compile (or load) the kernels once, before a fit is timed."""
    if address is not None and address in _warm:
        return
    client.run(warm_up)
    if address is not None:
        _warm.add(address)


def dask_fit(
    client: Any, store: Any, spec: ModelSpec, method: str | None = None, *,
    start: FitResult | Mapping[str, Any] | None = None, tol: float = 1e-10, max_iter: int = 500,
) -> tuple[Loaded, DaskFit]:
    """Load, fit, release: what `streamlme.refresh` does with engine "dask" (without the
    lease, the skip check or the model record)."""
    blocks.check_spec(spec, method)
    engine = DaskRefresh(client, store, spec)
    try:
        loaded = engine.load()
        return loaded, engine.fit(method, start=start, tol=tol, max_iter=max_iter)
    finally:
        engine.close()


@dataclass
class Overhead:
    """The cost of one map on Dask beside the computation it runs (``streamlme bench``)."""

    maps: int
    per_map_ms: float        # median wall time of a map (deviance or gradient)
    per_eval_ms: float       # median wall time of an evaluation: a deviance and a gradient map
    compute_ms: float        # median of the slowest bundle's computation in a map
    overhead_ms: float       # per_eval_ms minus its two maps' computation
    workers: int
    threads: int
    shards: int
    extra: dict[str, Any] = field(default_factory=dict)


def measure_overhead(engine: DaskRefresh, evaluations: int = 30) -> Overhead:
    """Time ``evaluations`` deviance-and-gradient evaluations of a loaded (and fitted, or at
    least frame-built) `DaskRefresh` near its optimum."""
    if engine.frame is None or not engine.bundles:
        raise DaskEngineError("measure_overhead needs a DaskRefresh after fit()")
    from streamlme.estimate.theta import Parametrisation

    fr = engine.frame
    par = Parametrisation(fr.q, engine.spec.covariance, fr.T_Z, fr.z_scale)
    ev = blocks.Evaluator(fr, par, engine.map_blocks, engine.spec.method.upper() == "REML")
    walls, computes = [], []
    theta0 = par.start()
    for k in range(evaluations + 3):
        before = engine._worker_seconds
        t0 = time.perf_counter()
        st = ev.state(theta0 * (1.0 + 1e-3 * k))
        ev.gradient(st)
        walls.append(time.perf_counter() - t0)
        computes.append(engine._worker_seconds - before)
    walls, computes = walls[3:], computes[3:]  # the first maps warm caches
    info = engine.client.scheduler_info()["workers"]
    per_eval = 1e3 * float(np.median(walls))
    compute = 1e3 * float(np.median(computes))
    return Overhead(ev.maps, per_eval / 2, per_eval, compute / 2, per_eval - compute,
                    len(info), sum(int(w.get("nthreads", 1)) for w in info.values()),
                    len(engine.versions))


class DaskEngine:
    """The refresh's engine "dask" (`streamlme.refresh`): ``read()`` loads the shards into the
    workers and gives (fingerprint, cells, mass) of the valid cells (``excluded`` names the
    others), ``fit(...)`` fits them, ``close()`` releases them. Refuses a store workers cannot
    read and a model the block fit does not handle. The flag, the pin and the skip check (shard
    change counters and fingerprint) are the refresh's own, the same for both engines."""

    name = "dask"

    def __init__(self, store: Any, spec: ModelSpec, scheduler: str | None,
                 method: str | None = None) -> None:
        blocks.check_spec(spec, method)
        check_store(store)
        if not scheduler:
            raise DaskEngineError('engine "dask" needs a scheduler address: [refresh] '
                                  'dask_scheduler = "tcp://host:8786" or --dask ADDRESS')
        self.client = client_for(scheduler)
        warm_workers(self.client, scheduler)
        self.engine = DaskRefresh(self.client, store, spec)
        self.last: DaskFit | None = None
        #: keys of the cells the last read left out (`streamlme.refresh.valid_cells`)
        self.excluded: list[str] = []

    def read(self) -> tuple[str, int, float]:
        loaded = self.engine.load()
        self.excluded = loaded.excluded
        return loaded.fingerprint, loaded.rows, loaded.mass

    def fit(self, method: str | None, *, start: FitResult | Mapping[str, Any] | None = None,
            ranef: bool = False, **kwargs: Any) -> FitResult:
        self.last = self.engine.fit(method, start=start, **kwargs)
        log.info("Dask fit: %d maps over %d shards, %.1f ms a map beside the computation",
                 self.last.maps, len(self.engine.versions), self.last.overhead_ms_per_map)
        return self.last.result

    def close(self) -> None:
        self.engine.close()
