"""Scheduled re-estimation: read every group's statistics, refit, write a new model version.

One refresh (`refresh_once`):

1. takes the leader lease (`streamlme.lease`), waiting while another refresher holds it;
   then writes nothing, and says why, while the namespace is flagged (``rebuilding`` or
   ``lost``, `streamlme.store.health`) or a version is pinned (``streamlme model --rollback
   V``; the refresher skips until ``streamlme model --unpin``);
2. reads all group statistics with ``store.scan(chunk)`` into arrays — memory grows with the
   number of groups, never with the number of events (for a model with several grouping
   columns the store's groups are its cells, and `fit` takes the terms' levels from them);
3. fits by the configured method, warm-started from the current model's theta (every term's,
   in the formula's order), with the tolerance and iteration limit of ``[refresh]``. A cell
   whose statistics are not finite or not valid (`valid_cells`) is left out and named in the
   model's ``warnings``: one bad group cannot stop a refresh. Nothing is fitted when the
   statistics are those the current model was fitted to: the same namespace epoch and shard
   versions (a counter every merge that changes a shard bumps) and the same digest of every
   cell's bytes (`stats_fingerprint`);
4. writes the result as a new model version with the lease's fencing token, so a refresher whose
   lease lapsed mid-fit cannot write; the same script refuses the write if meanwhile a version
   was pinned, the namespace was flagged or reset (another epoch). A fit that raises or does
   not converge is logged, counted and never written: the good model stays current. The record
   carries the epoch and the offset gaps the statistics lacked (`streamlme.model`).

`run_refresh` runs it once (cron, Kubernetes CronJob) or every N seconds as a long-lived
leader (which waits for Redis to answer, and logs a flag or a pin once, not every tick);
`model_command` backs ``streamlme model`` (current version, history, rollback and pin, unpin).

>>> from streamlme.store import MemoryStore
>>> from streamlme import GroupStats, ModelSpec
>>> import numpy as np
>>> rng = np.random.default_rng(1)
>>> groups = np.repeat(np.arange(30), 10)
>>> y = rng.normal(size=30)[groups] + rng.normal(size=300)
>>> store = MemoryStore(columns=["y"])
>>> _ = store.merge(GroupStats.from_rows([f"g{i}" for i in groups], y[:, None]))
>>> outcome = refresh_once(store, ModelSpec("y", ["1"], ["1"], "g"))
>>> outcome.status, outcome.version, outcome.n_groups
('written', 1, 30)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
from redis.exceptions import AuthenticationError, AuthorizationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamlme.config import Config
from streamlme.estimate import ConvergenceWarning, SingularFitWarning, fit
from streamlme.lease import DEFAULT_TTL, Lease
from streamlme.metrics import MODEL_VERSION, REFRESH_DURATION
from streamlme.metrics import REFRESH_OUTCOMES_TOTAL as REFRESH_OUTCOMES
from streamlme.model import MAX_EXCLUDED, ModelRecord, ModelRecordError
from streamlme.spec import ModelSpec
from streamlme.stats import GroupStats
from streamlme.store.base import ModelWriteRefusedError
from streamlme.store.errors import StaleFenceError, StoreError
from streamlme.store.health import Health, iso_time
from streamlme.store.shards import take

log = logging.getLogger(__name__)

#: Values of the ``outcome`` label of REFRESH_OUTCOMES (``streamlme_refresh_outcomes_total``);
#: the duration of every attempt goes to REFRESH_DURATION. Both live in `streamlme.metrics`.
OUTCOMES = ("written", "unchanged", "fit_failed", "not_converged", "fenced", "no_lease", "error",
            "flagged", "pinned", "reset")
#: Outcomes a looping refresher logs once while they last (a flag, a pin), not every tick.
STEADY = ("flagged", "pinned")


class RedisUnavailableError(StoreError):
    """Redis does not answer where the configuration says (``refresh --once`` fails fast)."""

    exit_code = 4  # the command line's "Redis or Kafka did not answer"


@dataclass(frozen=True)
class RefreshSettings:
    """How to refresh. ``None`` for method/tol/max_iter means the spec's or the engine's own."""

    method: str | None = None
    tol: float | None = None
    max_iter: int | None = None
    history: int = 50
    chunk: int = 10_000
    lease_ttl: float = DEFAULT_TTL
    warm_start: bool = True
    #: Write nothing when the statistics are those the current model was fitted to.
    skip_unchanged: bool = True
    #: Where the fit runs: "local" (this process) or "dask" (`streamlme.refresh_dask`: the
    #: shards are read by the workers of the scheduler at ``dask_scheduler``).
    engine: str = "local"
    dask_scheduler: str | None = None

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> RefreshSettings:
        r = config.refresh
        base = cls(method=config.model.method, tol=r.tolerance, max_iter=r.max_iter,
                   history=r.history, lease_ttl=r.lease_ttl, skip_unchanged=r.skip_unchanged,
                   engine=r.engine, dask_scheduler=r.dask_scheduler)
        return cls(**{**asdict(base), **overrides})

    def fit_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.tol is not None:
            out["tol"] = self.tol
        if self.max_iter is not None:
            out["max_iter"] = self.max_iter
        return out


@dataclass
class RefreshOutcome:
    """What one refresh did. ``ok`` only when a new version was written; ``current`` also when
    nothing changed since the current model (status ``unchanged``)."""

    status: str
    message: str = ""
    version: int | None = None  # the version written, if any
    current_version: int | None = None  # the version current afterwards
    start_version: int | None = None  # the model the fit was warm-started from
    token: int | None = None
    n_groups: int = 0
    n_obs: float = 0.0
    n_cells: int = 0  # the store's groups: the cells of a model with several grouping columns
    method: str = ""
    converged: bool | None = None
    criterion: float | None = None
    iterations: int = 0
    n_evals: int = 0
    read_seconds: float = 0.0
    fit_seconds: float = 0.0
    write_seconds: float = 0.0
    seconds: float = 0.0
    created_at: float = 0.0
    excluded: int = 0  # cells left out of the fit: statistics not finite or not valid
    pinned: int | None = None  # the version an operator pinned, if any

    @property
    def ok(self) -> bool:
        return self.status == "written"

    @property
    def current(self) -> bool:
        """The current model covers the statistics: just written, or nothing changed."""
        return self.status in ("written", "unchanged")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


# -- reading --------------------------------------------------------------------------------


def read_stats(store: Any, d: int, chunk: int = 10_000) -> GroupStats:
    """Every group's statistics, read ``chunk`` groups at a time into one `GroupStats`.

    Chunks are gathered as arrays and joined once; the result holds O(groups x d^2) floats.
    """
    keys: list[str] = []
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for part in store.scan(chunk):
        keys.extend(part.keys)
        parts.append((part.n, part.mean, part.C, part.t))
    if not parts:
        return GroupStats.empty(d)
    n, mean, C, t = (np.concatenate(arrays) for arrays in zip(*parts))
    return GroupStats(keys, n, mean, C, t)


def valid_cells(stats: GroupStats) -> np.ndarray:
    """Which cells a fit can use: finite statistics, a non-negative mass, and no co-moment
    diagonal below zero beyond rounding. Others (an event that overflowed, a retraction of a row
    never added) are left out of the fit and named in the model's warnings."""
    ok = (np.isfinite(stats.n) & np.isfinite(stats.mean).all(axis=1)
          & np.isfinite(stats.C).all(axis=(1, 2)) & (stats.n >= 0))
    with np.errstate(invalid="ignore", over="ignore"):
        diagonal = np.diagonal(stats.C, axis1=1, axis2=2)
        # a sum of squares loses about eps x (n m^2 + C) to rounding in retractions
        scale = 1.0 + np.abs(stats.n)[:, None] * (1.0 + stats.mean ** 2) + np.abs(diagonal)
        ok &= ~(diagonal < -1e-8 * scale).any(axis=1)
    return ok


def drop_invalid(stats: GroupStats) -> tuple[GroupStats, list[str]]:
    """``stats`` without the cells `valid_cells` refuses, and the keys of those cells."""
    ok = valid_cells(stats)
    if ok.all():
        return stats, []
    return take(stats, np.flatnonzero(ok)), [stats.keys[i] for i in np.flatnonzero(~ok)]


def excluded_warning(keys: list[str], count: int) -> str:
    """The model's warning naming the cells left out of its fit."""
    named = ", ".join(map(repr, keys[:5])) + (", ..." if count > 5 else "")
    return (f"{count} cell(s) left out of the fit because their statistics are not finite or "
            f"not valid (an event that overflowed, or a retraction of a row never added): "
            f"{named}; they get no effect until their statistics are repaired")


def stats_version(epoch: str | None, shard_versions: list[int]) -> str:
    """A digest of the namespace's epoch and every shard's change counter: equal only when no
    merge changed any shard's statistics (and the namespace was not reset) in between."""
    h = hashlib.blake2b(json.dumps([epoch, shard_versions]).encode(), digest_size=16)
    return h.hexdigest()


@dataclass(frozen=True)
class StatsDigest:
    """An order-free digest of statistics that adds up over parts: the digest of a store is the
    sum of its shards' (a Dask worker digests the shards it reads), whatever order the groups
    are read in. ``rows`` groups; ``a``, ``b`` sums modulo 2^64 of two hashes of each group's
    bytes (n, mean, C)."""

    rows: int = 0
    d: int = 0
    a: int = 0
    b: int = 0

    def __add__(self, other: StatsDigest) -> StatsDigest:
        if self.rows and other.rows and self.d != other.d:
            raise ValueError(f"digests of statistics of {self.d} and {other.d} columns")
        return StatsDigest(self.rows + other.rows, self.d or other.d,
                           (self.a + other.a) % 2**64, (self.b + other.b) % 2**64)

    def hexdigest(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(np.array([self.rows, self.d, self.a, self.b], dtype="<u8").tobytes())
        return h.hexdigest()


def stats_digest(stats: GroupStats) -> StatsDigest:
    """The `StatsDigest` of some groups (a compiled pass, about 50 ms per million groups)."""
    if not len(stats):
        return StatsDigest(0, stats.d)
    bits = [np.ascontiguousarray(x, dtype="<f8").view(np.uint64).reshape(len(stats), -1)
            for x in (stats.n, stats.mean, stats.C)]
    a, b = _digest_rows(*bits)
    return StatsDigest(len(stats), stats.d, int(a), int(b))


def stats_fingerprint(stats: GroupStats | StatsDigest) -> str:
    """A digest of the statistics a fit sees: the same statistics give the same digest in any
    order and however they are split (both refresh engines agree on it), and any event folded
    in or taken out changes it (its mass, moments or co-moments move)."""
    digest = stats if isinstance(stats, StatsDigest) else stats_digest(stats)
    return digest.hexdigest()


def _digest_rows_numpy(*parts: np.ndarray) -> tuple[int, int]:
    """Each row's bytes hashed (splitmix64's finaliser over its 64-bit words), summed."""
    with np.errstate(over="ignore"):
        h = np.full(parts[0].shape[0], np.uint64(0x9E3779B97F4A7C15))
        for part in parts:
            for j in range(part.shape[1]):
                h = _mix(h ^ part[:, j])
        a = h.sum(dtype=np.uint64)
        b = _mix(h ^ np.uint64(0x632BE59BD9B4E019)).sum(dtype=np.uint64)
    return int(a), int(b)


def _mix(z: Any) -> Any:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


try:
    import numba

    _mix_numba = numba.njit(cache=True, nogil=True, inline="always")(_mix)

    @numba.njit(cache=True, nogil=True)
    def _digest_rows_numba(n, mean, C):  # type: ignore[no-untyped-def]
        a, b = np.uint64(0), np.uint64(0)
        for i in range(n.shape[0]):
            h = _mix_numba(np.uint64(0x9E3779B97F4A7C15) ^ n[i, 0])
            for j in range(mean.shape[1]):
                h = _mix_numba(h ^ mean[i, j])
            for j in range(C.shape[1]):
                h = _mix_numba(h ^ C[i, j])
            a += h
            b += _mix_numba(h ^ np.uint64(0x632BE59BD9B4E019))
        return a, b

    _digest_rows = _digest_rows_numba
except ImportError:  # pragma: no cover - numba is a dependency
    _digest_rows = _digest_rows_numpy


def current_model(store: Any) -> ModelRecord | None:
    """The current model version, or None if none is stored."""
    version = store.current_model_version()
    data = store.get_model(version) if version is not None else None
    return None if data is None else ModelRecord.from_json(data, version=version)


# -- one refresh ----------------------------------------------------------------------------


def refresh_once(
    target: Config | Any,
    spec: ModelSpec | None = None,
    settings: RefreshSettings | None = None,
    *,
    lease: Lease | None = None,
    wait: float | None = None,
) -> RefreshOutcome:
    """Refit from the store's statistics and write a new model version (see the module doc).

    ``target`` is a `Config` (its store is opened and closed here, ``spec`` and ``settings``
    come from it) or a store, with ``spec`` and ``settings`` given. ``lease`` is a lease this
    caller already holds (a long-running leader); without one, the lease is taken here —
    waiting at most ``wait`` seconds (None: as long as it takes) — and released at the end.
    Errors of the store itself (a lost Redis connection) propagate; fit failures do not.
    """
    if isinstance(target, Config):
        from streamlme.store.connect import close_store

        store = _open(target)
        try:
            return refresh_once(store, target.spec, settings or RefreshSettings.from_config(target),
                                lease=lease, wait=wait)
        finally:
            close_store(target, store)
    if spec is None:
        raise TypeError("refresh_once(store, spec, settings): spec is required with a store")
    outcome = _attempt(target, spec, settings or RefreshSettings(), lease, wait)
    _report(outcome)
    return outcome


def _attempt(store: Any, spec: ModelSpec, settings: RefreshSettings, lease: Lease | None,
             wait: float | None) -> RefreshOutcome:
    """One timed refresh, not yet reported (`_report`)."""
    with REFRESH_DURATION.time(), _leased(store, settings, lease, wait) as held:
        if held is None:
            return RefreshOutcome("no_lease", f"the refresh lease stayed busy for {wait:g}s")
        return _refresh(store, spec, settings, held)


@contextmanager
def _leased(store: Any, settings: RefreshSettings, lease: Lease | None, wait: float | None
            ) -> Iterator[Lease | None]:
    if lease is not None:
        yield lease
        return
    own = Lease(store, ttl=settings.lease_ttl)
    if own.acquire(timeout=wait) is None:
        yield None
        return
    own.keep_alive()
    try:
        yield own
    finally:
        own.release()


def _refresh(store: Any, spec: ModelSpec, settings: RefreshSettings, lease: Lease
             ) -> RefreshOutcome:
    t0 = time.perf_counter()
    out = RefreshOutcome("error", token=lease.token, method=(settings.method or spec.method))
    out.current_version = store.current_model_version()
    health = store.health()
    if _held(store, health, out):
        return _done(out, t0)
    current = _warm_start(store, spec)
    start = current if settings.warm_start else None
    out.start_version = start.version if start is not None else None

    try:
        engine = _engine(store, spec, settings, out.method)
    except Exception as exc:  # a store or model the engine cannot handle: nothing was read
        out.status = "fit_failed" if isinstance(exc, ValueError) else "error"
        out.message = f"{type(exc).__name__}: {exc}"
        return _done(out, t0)
    try:
        return _refresh_with(engine, store, spec, settings, lease, out, current, start,
                             health, t0)
    finally:
        engine.close()


def _held(store: Any, health: Health, out: RefreshOutcome) -> bool:
    """Whether no model may be written now: the namespace is flagged or a version is pinned
    (``out`` then says which, and why)."""
    if not health.ready:
        out.status, out.message = "flagged", _flag_message(health)
        return True
    pinned = store.pinned_model()
    if pinned is not None:
        out.status, out.pinned, out.message = "pinned", pinned, _pin_message(pinned)
        return True
    return False


def _flag_message(health: Health) -> str:
    return (f"the namespace is flagged {health.flag!r} since {iso_time(health.since)}: "
            f"{health.reason or 'no reason recorded'}; no model is written from it until the "
            "flag clears")


def _pin_message(version: int) -> str:
    return (f"version {version} is pinned by `model --rollback`; run `streamlme model --unpin` "
            "to resume")


class _LocalEngine:
    """The engine "local": every group's statistics read into this process, then `fit`."""

    name = "local"

    def __init__(self, store: Any, spec: ModelSpec, chunk: int) -> None:
        self.store, self.spec, self.chunk = store, spec, chunk
        self.stats: GroupStats | None = None
        #: keys of the cells the last read left out (`valid_cells`)
        self.excluded: list[str] = []

    def read(self) -> tuple[str, int, float]:
        """(fingerprint, the store's groups, their total mass), of the valid cells."""
        stats = read_stats(self.store, len(self.spec.columns), self.chunk)
        self.stats, self.excluded = drop_invalid(stats)
        return stats_fingerprint(self.stats), len(self.stats), float(self.stats.n.sum())

    def fit(self, method: str | None, **kwargs: Any) -> Any:
        assert self.stats is not None, "read() first"
        return fit(self.stats, self.spec, method, **kwargs)

    def close(self) -> None:
        self.stats = None


def _engine(store: Any, spec: ModelSpec, settings: RefreshSettings, method: str) -> Any:
    """The configured engine: `_LocalEngine`, or `streamlme.refresh_dask.DaskEngine` (which
    refuses a store its workers cannot read and a model of several random-effect terms)."""
    if settings.engine == "local":
        return _LocalEngine(store, spec, settings.chunk)
    if settings.engine != "dask":
        raise ValueError(f"engine {settings.engine!r} is not one of local, dask")
    from streamlme.refresh_dask import DaskEngine

    return DaskEngine(store, spec, settings.dask_scheduler, method)


def _refresh_with(engine: Any, store: Any, spec: ModelSpec, settings: RefreshSettings,
                  lease: Lease, out: RefreshOutcome, current: ModelRecord | None,
                  start: ModelRecord | None, health: Health, t0: float) -> RefreshOutcome:
    # the counters first: a merge landing during the read then shows as a change next time
    version = stats_version(health.epoch, [int(v) for v in store.shard_versions()])
    fingerprint, cells, out.n_obs = engine.read()
    excluded = list(engine.excluded)
    out.excluded = len(excluded)
    out.n_groups = out.n_cells = cells + len(excluded)
    out.read_seconds = time.perf_counter() - t0
    if (settings.skip_unchanged and current is not None
            and current.version == out.current_version
            and current.fit.get("stats_versions") == version
            and current.fit.get("stats_fingerprint") == fingerprint
            and current.fit.get("method") == out.method):
        out.status, out.version = "unchanged", current.version
        out.message = f"no event since model v{current.version}; nothing written"
        return _done(out, t0)

    t1 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # the outcome and the record carry these; the log line says them once
            warnings.simplefilter("ignore", (ConvergenceWarning, SingularFitWarning))
            # several terms: the record keeps every level's conditional mode, which the
            # between-refresh effects of crossed terms start from (see `streamlme.model`)
            result = engine.fit(out.method, start=start.fit if start is not None else None,
                                ranef=len(spec.terms) > 1, **settings.fit_kwargs())
    except Exception as exc:  # any failure of the fit must leave the current model in place
        out.status, out.message = "fit_failed", f"{type(exc).__name__}: {exc}"
        log.debug("refresh fit failed", exc_info=True)
        return _done(out, t0)
    finally:
        out.fit_seconds = time.perf_counter() - t1
    out.converged, out.criterion = bool(result.converged), float(result.criterion)
    out.iterations, out.n_evals = result.iterations, result.optsummary.n_evals
    out.n_groups = result.n_groups
    if not result.converged:
        out.status = "not_converged"
        out.message = f"optimiser stopped: {result.optsummary.message}"
        return _done(out, t0)
    if not (math.isfinite(result.criterion) and np.isfinite(result.beta).all()
            and np.isfinite(result.G).all() and math.isfinite(result.sigma2)
            and all(np.isfinite(t.G).all() for t in result.terms)):
        out.status, out.message = "fit_failed", "the fit produced non-finite estimates"
        return _done(out, t0)

    record = _record(result, spec, out.fit_seconds, health, excluded)
    record.fit["stats_fingerprint"] = fingerprint
    record.fit["stats_versions"] = version
    try:
        data = record.to_json()
    except (TypeError, ValueError) as exc:  # a record queries could not read must not be current
        out.status, out.message = "fit_failed", f"the fit cannot be stored as JSON: {exc}"
        return _done(out, t0)
    return _write(store, data, health, lease, settings, out, record, t0)


def _record(result: Any, spec: ModelSpec, fit_seconds: float, health: Health,
            excluded: list[str]) -> ModelRecord:
    """The model record of a fit, with what it was fitted from: the namespace's epoch, the
    offset gaps its statistics lack and the cells left out (each also a warning)."""
    record = ModelRecord.from_fit(result, spec, fit_seconds=fit_seconds)
    record.epoch = health.epoch
    record.gaps = [g.to_dict() for g in health.gaps]
    if health.gaps:
        spans = ", ".join(f"{g.topic}[{g.partition}] {g.start}-{g.end - 1}"
                          for g in health.gaps[:5]) + (", ..." if len(health.gaps) > 5 else "")
        record.fit["warnings"].append(
            f"the statistics lack {sum(g.events for g in health.gaps)} offset(s) that retention "
            f"deleted before they were read ({spans}): the model does not cover those events")
    if excluded:
        record.excluded, record.n_excluded = excluded[:MAX_EXCLUDED], len(excluded)
        record.fit["warnings"].append(excluded_warning(excluded, len(excluded)))
    return record


def _write(store: Any, data: str, health: Health, lease: Lease, settings: RefreshSettings,
           out: RefreshOutcome, record: ModelRecord, t0: float) -> RefreshOutcome:
    """Write the record unless, atomically with the write, a pin, a flag or another epoch
    refuses it."""
    t2 = time.perf_counter()
    try:
        out.version = store.put_model_checked(data, health.epoch, fence=lease.token,
                                              keep=settings.history)
    except StaleFenceError as exc:
        out.status, out.message = "fenced", f"model not written: {exc}"
        return _done(out, t0)
    except ModelWriteRefusedError as exc:  # pinned or flagged while this refresh fitted
        now = store.health()
        if exc.reason == "pinned":
            out.pinned = store.pinned_model()
            out.status, out.message = "pinned", _pin_message(out.pinned or 0)
        elif exc.reason == "flagged" and not now.ready:
            out.status, out.message = "flagged", _flag_message(now)
        else:
            out.status = "reset"
            out.message = (f"model not written: {exc}; the namespace changed while the fit ran, "
                           "the next refresh reads it again")
        return _done(out, t0)
    finally:
        out.write_seconds = time.perf_counter() - t2
    out.status, out.current_version, out.created_at = "written", out.version, record.created_at
    return _done(out, t0)


def _warm_start(store: Any, spec: ModelSpec) -> ModelRecord | None:
    """The current model if it is of this spec (a changed config starts cold)."""
    try:
        record = current_model(store)
    except ModelRecordError as exc:
        log.warning("current model cannot be read (%s); fitting from a cold start", exc)
        return None
    if record is None:
        return None
    if record.spec != spec:
        log.info("current model v%d is of another model (%s); fitting from a cold start",
                 record.version, record.spec.formula)
        return None
    return record


def _done(out: RefreshOutcome, t0: float) -> RefreshOutcome:
    out.seconds = time.perf_counter() - t0
    return out


def _report(out: RefreshOutcome, again: bool = False) -> None:
    """Count and log an outcome; ``again``: a flag or pin already logged, logged at DEBUG."""
    REFRESH_OUTCOMES.labels(out.status).inc()
    current = "none yet" if out.current_version is None else f"v{out.current_version}"
    if out.status == "unchanged":
        log.info("refresh: %s", out.message)
    elif out.ok:
        MODEL_VERSION.set(out.version)
        log.info("refresh wrote model v%d: %d groups, %g events, %s criterion %.6g, "
                 "%d evaluations, %.2fs (read %.2fs, fit %.2fs)", out.version, out.n_groups,
                 out.n_obs, out.method, out.criterion, out.n_evals, out.seconds,
                 out.read_seconds, out.fit_seconds)
        if out.excluded:
            log.warning("refresh left %d cell(s) out of model v%d: their statistics are not "
                        "finite or not valid (see the model's warnings)", out.excluded,
                        out.version)
    elif out.status in STEADY:
        log.log(logging.DEBUG if again else logging.WARNING,
                "refresh %s: %s; the current model (%s) stays", out.status, out.message, current)
    elif out.status == "error":  # the store did not answer: what is current is unknown here
        log.error("refresh %s: %s; whatever model is current stays", out.status, out.message)
    else:
        log.error("refresh %s: %s; the current model (%s) stays", out.status, out.message,
                  current)


# -- the refresh command --------------------------------------------------------------------

#: Backoff while waiting for Redis: first delay and cap, in seconds.
WAIT_FIRST, WAIT_CAP = 0.1, 5.0
#: How often a refresher still waiting for Redis says so again, in seconds.
WAIT_LOG_EVERY = 60.0
T = TypeVar("T")


def run_refresh(
    config: Config,
    once: bool = False,
    every: float | None = None,
    *,
    settings: RefreshSettings | None = None,
    stop: threading.Event | None = None,
    wait: float | None = None,
) -> int:
    """``streamlme refresh``: the exit status.

    With ``once``, one refresh, waiting for the lease while another refresher holds it (at most
    ``wait`` seconds; None: as long as it takes); status 0 if the current model covers the
    statistics (written, or nothing changed) or a version is pinned, 1 otherwise (the reason is
    logged); `RedisUnavailableError` at once if Redis does not answer. Otherwise a leader loop:
    it waits for Redis to answer ("waiting for Redis at ..." with capped backoff), takes the
    lease, keeps renewing it, refreshes every ``every`` seconds (default ``[refresh] every``)
    until SIGTERM/SIGINT or ``stop`` is set; a standby refresher waits for the lease and takes
    over when the leader stops or dies. A lost Redis is waited for the same way; a flag or a
    pin is logged once while it lasts. A clean stop returns 0.
    """
    from streamlme.store.connect import close_store

    stop = threading.Event() if stop is None else stop
    settings = settings or RefreshSettings.from_config(config)
    period = config.refresh.every if every is None else every
    with _signals_set(stop):
        store = _open(config) if once else _wait_for_redis(lambda: _open(config), config, stop)
        if store is None:  # stopped while waiting
            return 0
        try:
            return _lead(store, config, once, period, settings, stop, wait)
        finally:
            close_store(config, store)


def _lead(store: Any, config: Config, once: bool, period: float, settings: RefreshSettings,
          stop: threading.Event, wait: float | None) -> int:
    """The leader loop of `run_refresh` over an open store."""
    lease = Lease(store, ttl=settings.lease_ttl)
    last: RefreshOutcome | None = None
    said: tuple[str, str] | None = None  # the flag or pin logged already
    try:
        while not stop.is_set():
            try:
                if not lease.held:
                    lease.release()
                    if lease.acquire(timeout=wait if once else None, stop=stop) is None:
                        if not stop.is_set():
                            last = RefreshOutcome("no_lease", f"lease busy for {wait:g}s")
                            _report(last)
                        break
                    log.info("refresh leader: lease token %d", lease.token)
                    lease.keep_alive()
                last = _attempt(store, config.spec, settings, lease, None)
                steady = (last.status, last.message) if last.status in STEADY else None
                _report(last, again=steady is not None and steady == said)
                said = steady
                if last.status == "fenced":
                    lease.lost.set()  # take the lease again before the next attempt
            except (StoreError, RedisError, OSError) as exc:
                last = RefreshOutcome("error", f"{type(exc).__name__}: {exc}")
                _report(last)
                if not once and isinstance(exc, UNREACHABLE):
                    if _wait_for_redis(lambda: _reach(config, store.ping), config, stop) is None:
                        break
                    continue  # Redis answers again: refresh now
            if once:
                break
            stop.wait(period)
    finally:
        lease.release()
    if once:
        return 0 if last is not None and (last.current or last.status == "pinned") else 1
    return 0


#: Failures of a Redis that is not up (yet): waited for in the loop, `RedisUnavailableError`
#: at once. A refused password is not among them (redis-py's AuthenticationError is a
#: ConnectionError): it propagates as it is, as waiting cannot cure it.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def _open(config: Config) -> Any:
    """The configured store; `RedisUnavailableError` if Redis does not answer."""
    from streamlme.store.connect import open_store

    def connect() -> Any:
        store = open_store(config)
        store.ping()
        return store

    return _reach(config, connect)


def _reach(config: Config, fn: Callable[[], T]) -> T:
    """``fn()``, with a Redis that does not answer raised as `RedisUnavailableError`."""
    try:
        return fn()
    except (AuthenticationError, AuthorizationError):
        raise
    except UNREACHABLE as exc:
        url = config.redis.safe_url if config.redis is not None else "?"
        raise RedisUnavailableError(
            f"Redis at {url} does not answer ({type(exc).__name__}: {exc}); start it or fix "
            "[redis] url in the configuration") from exc


def _wait_for_redis(connect: Callable[[], T], config: Config, stop: threading.Event
                    ) -> T | None:
    """``connect()``, retried with capped backoff while Redis does not answer, saying so at
    first and then once every `WAIT_LOG_EVERY` s; None if ``stop`` is set first."""
    url = config.redis.safe_url if config.redis is not None else "?"
    delay, started, said = WAIT_FIRST, time.monotonic(), None
    while True:
        try:
            value = connect()
        except RedisUnavailableError as exc:
            now = time.monotonic()
            if said is None or now - said >= WAIT_LOG_EVERY:
                cause = exc.__cause__ or exc
                log.warning("waiting for Redis at %s (%s: %s; waited %.0fs, retrying every "
                            "%gs at most)", url, type(cause).__name__, cause, now - started,
                            WAIT_CAP)
                said = now
            if stop.wait(delay):
                return None
            delay = min(delay * 2, WAIT_CAP)
            continue
        if said is not None:
            log.info("Redis at %s answers after %.1fs", url, time.monotonic() - started)
        return value


@contextmanager
def _signals_set(stop: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop`` (only the main thread may install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping after the current refresh", signum)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -- the model command ----------------------------------------------------------------------


def model_history(store: Any) -> list[dict[str, Any]]:
    """One row per stored version, oldest first: version, created_at (unix seconds) and
    created_at_iso, criterion, n_groups, n_obs, converged, method, current, pinned, epoch and
    complete (False when the statistics lacked offsets). Unreadable records are listed with
    an ``error``."""
    current = store.current_model_version()
    pinned = store.pinned_model()
    rows = []
    for version in store.model_versions():
        row: dict[str, Any] = {"version": version, "current": version == current,
                               "pinned": version == pinned}
        data = store.get_model(version)
        if data is None:  # trimmed between the two reads
            continue
        try:
            rec = ModelRecord.from_json(data, version=version)
        except ModelRecordError as exc:
            rows.append({**row, "error": str(exc)})
            continue
        f = rec.fit
        rows.append({
            **row, "created_at": rec.created_at, "created_at_iso": rec.to_dict()["created_at_iso"],
            "method": f.get("method"), "criterion": f.get("criterion"),
            "n_groups": f.get("n_groups"), "n_obs": f.get("n_obs"),
            "converged": f.get("converged"), "fit_seconds": rec.fit_seconds,
            "epoch": rec.epoch, "complete": not rec.gaps,
        })
    return rows


def rollback(store: Any, version: int) -> ModelRecord:
    """Make a stored version current again and pin it (refreshers then write no new version
    until `unpin`); StoreError if it is not stored (any more)."""
    data = store.get_model(version)
    if data is None:
        stored = store.model_versions()
        raise StoreError(
            f"model version {version} is not stored; stored versions: "
            f"{', '.join(map(str, stored)) or 'none'} (see streamlme model --history)"
        )
    record = ModelRecord.from_json(data, version=version)
    store.pin_model(version)
    return record


def model_command(
    config: Config, *, as_json: bool = False, history: bool = False,
    rollback_to: int | None = None, unpin: bool = False,
) -> tuple[int, str]:
    """``streamlme model``: (exit status, text to print).

    Default: the current model in lme4's layout (``--json``: one object, ``streamlme fit
    --json`` fields plus ``version``, ``created_at``, ``epoch``, ``gaps``, ``complete``,
    ``excluded``, ``pinned`` (this version is pinned), ``pinned_version`` (null if none is),
    ``pinned_at`` and ``namespace`` (its health now)). ``--history``: one row per version
    (``--json``: one JSON object per line, oldest first). ``--rollback V``: make V current and
    pin it, then print it. ``--unpin``: remove the pin, then print the model. Status 1 when
    there is no model or V is not stored; `RedisUnavailableError` when Redis does not answer.
    """
    from streamlme.store.connect import close_store

    store = _open(config)
    try:
        notes = []
        if unpin:
            was = store.unpin_model()
            notes.append("no version was pinned" if was is None else
                         f"version {was} unpinned: the refresher writes new versions again")
        if rollback_to is not None:
            try:
                rollback(store, rollback_to)
            except StoreError as exc:
                return 1, str(exc)
        if history:
            rows = model_history(store)
            if as_json:
                return 0, "\n".join(json.dumps(r, allow_nan=False) for r in rows)
            return 0, "\n".join([*notes, format_history(rows)])
        record = current_model(store)
        if record is None:
            return (0 if notes else 1), "\n".join(
                [*notes, "no model yet: run `streamlme refresh --config FILE --once`"])
        pin, health = store.model_pin(), store.health()
        if as_json:
            return 0, json.dumps({**record.to_dict(), **_pin_fields(pin, record.version),
                                  "namespace": health.to_dict()}, allow_nan=False)
        return 0, "\n".join([*notes, format_model(record, pin, health)])
    finally:
        close_store(config, store)


def _pin_fields(pin: tuple[int, float] | None, version: int) -> dict[str, Any]:
    """The pin as ``/v1/model`` shows it: ``pinned`` (this version is), ``pinned_version``
    (null if none is pinned), and ``pinned_at``."""
    return {"pinned": pin is not None and pin[0] == version,
            "pinned_version": None if pin is None else pin[0],
            "pinned_at": None if pin is None else iso_time(pin[1])}


def format_history(rows: list[dict[str, Any]]) -> str:
    """The ``model --history`` table: ``*`` marks the current version; a pinned one and one
    whose statistics lacked offsets say so at the end of their line."""
    if not rows:
        return "no model versions stored"
    lines = [f"{'':1}{'version':>7}  {'created (UTC)':<20}  {'method':<6}  {'criterion':>14}  "
             f"{'groups':>8}  {'events':>12}  converged"]
    for r in rows:
        mark = "*" if r["current"] else " "
        if "error" in r:
            lines.append(f"{mark}{r['version']:>7}  unreadable: {r['error']}")
            continue
        lines.append(
            f"{mark}{r['version']:>7}  {r['created_at_iso']:<20}  {r['method']:<6}  "
            f"{r['criterion']:>14.6f}  {r['n_groups']:>8}  {r['n_obs']:>12g}  "
            f"{'yes' if r['converged'] else 'no'}"
            + ("  pinned" if r.get("pinned") else "")
            + ("" if r.get("complete", True) else "  (offsets missing)")
        )
    return "\n".join(lines)


def format_model(record: ModelRecord, pin: tuple[int, float] | None = None,
                 health: Health | None = None) -> str:
    """The current model as ``streamlme model`` prints it: what it is and what it covers, then
    the fit in lme4's ``summary`` layout (`streamlme.estimate.FitResult.summary`)."""
    lines = [f"model version {record.version}, created {record.to_dict()['created_at_iso']}, "
             f"formula: {record.spec.formula}"]
    if pin is not None:
        lines.append(f"pinned: version {pin[0]} since {iso_time(pin[1])} (`model --rollback`); "
                     "refreshers write no new version until `streamlme model --unpin`")
    if health is not None and not health.ready:
        lines.append(f"namespace flagged {health.flag!r} since {iso_time(health.since)}: "
                     f"{health.reason}; refreshers write no new version meanwhile")
    if health is not None and record.epoch is not None and health.epoch != record.epoch:
        lines.append(f"fitted from namespace epoch {record.epoch}, but the namespace is now "
                     f"epoch {health.epoch}: it was reset since; the next refresh refits")
    for g in record.gaps:
        lines.append(f"does not cover offsets {g['from']}-{g['to'] - 1} of {g['topic']}"
                     f"[{g['partition']}] ({g['events']} offsets deleted before they were read)")
    return "\n".join([*lines, "", record.fit_result().summary()])
