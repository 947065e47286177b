"""Consumer status in the store: what each ingest process did lately, for ``GET /v1/status``.

Consumers run in other processes than the API, so each one publishes a small record after every
batch it applies, and while idle every few seconds (a heartbeat: the same counters, its lag now),
and the API reads them back, through the store's `write_status` and
`read_status` (in Redis: ``{ns}:consumers:<id>`` records expiring `STATUS_TTL` s after their last
report, an index ``{ns}:consumers`` and all-time totals ``{ns}:ingest`` that survive restarts; a
`MemoryStore` keeps them in this process).
Publishing is best effort: a status that cannot be written is logged, never fails a batch.

>>> from streamlme.store import MemoryStore
>>> from streamlme.stream.consumer import ConsumeReport
>>> store = MemoryStore()
>>> publisher = StatusPublisher(store, "c1")
>>> publisher.publish(ConsumeReport(events_read=10, events_applied=9, rejected={"bad": 1}), lag=3)
>>> s = read_status(store)
>>> s.events_total, s.events_rejected_total, s.lag, [c.consumer for c in s.consumers]
(9, 1, 3, ['c1'])
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from streamlme.store.base import StateStore

log = logging.getLogger(__name__)

#: Seconds a consumer's record outlives its last report (a stopped consumer drops off after this).
STATUS_TTL = 60.0
#: Seconds over which a consumer measures its ingest rate.
RATE_WINDOW = 10.0

_INT_FIELDS = ("events_read", "events_applied", "events_rejected", "batches")
_FLOAT_FIELDS = ("rate", "interval", "started_at", "updated_at")


@dataclass(frozen=True)
class ConsumerStatus:
    """One consumer's record: its counters since it started, its recent rate and lag.

    ``rate`` is events applied per second over the last `RATE_WINDOW` seconds as the consumer
    measured it when it published (a heartbeat of an idle consumer brings it down to 0);
    ``interval`` the seconds between its last two reports (batches or heartbeats).
    """

    consumer: str
    events_read: int
    events_applied: int
    events_rejected: int
    batches: int
    lag: int | None
    rate: float
    interval: float
    started_at: float
    updated_at: float

    def current_rate(self, now: float) -> float:
        """``rate``, or 0 once the consumer has been quiet for longer than it usually is."""
        quiet = now - self.updated_at
        return self.rate if quiet <= max(RATE_WINDOW, 2.0 * self.interval) else 0.0

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        out = asdict(self)
        if now is not None:
            out["rate"] = self.current_rate(now)
            out["age_s"] = max(now - self.updated_at, 0.0)
        return out


@dataclass(frozen=True)
class IngestStatus:
    """What all consumers of a store report: totals, combined rate and lag, and each record."""

    events_total: int
    events_rejected_total: int
    ingest_rate: float
    lag: int | None
    consumers: list[ConsumerStatus]


def default_consumer_id() -> str:
    """``<host>-<pid>``: unique per process, and readable (a Kubernetes pod's name)."""
    return f"{socket.gethostname()}-{os.getpid()}"


class StatusPublisher:
    """Publishes one consumer's record into ``store`` after each batch (`publish`)."""

    def __init__(self, store: StateStore, consumer_id: str | None = None) -> None:
        self.store = store
        self.consumer_id = consumer_id or default_consumer_id()
        self.started_at = time.time()
        self._samples: deque[tuple[float, int]] = deque([(time.monotonic(), 0)])
        self._last = time.monotonic()
        self._published = (0, 0)  # (applied, rejected) already added to the all-time totals
        self._warned = False

    def publish(self, report: Any, lag: int | None) -> None:
        """Record ``report``'s counters (a `ConsumeReport`) and ``lag``; never raises."""
        now = time.monotonic()
        applied, rejected = int(report.events_applied), int(report.events_rejected)
        samples = self._samples
        samples.append((now, applied))
        while len(samples) > 2 and samples[1][0] <= now - RATE_WINDOW:
            samples.popleft()
        t0, a0 = samples[0]
        status = ConsumerStatus(
            consumer=self.consumer_id, events_read=int(report.events_read),
            events_applied=applied, events_rejected=rejected, batches=int(report.batches),
            lag=lag, rate=(applied - a0) / (now - t0) if now > t0 else 0.0,
            interval=now - self._last, started_at=self.started_at, updated_at=time.time())
        self._last = now
        # A new report (an Ingestor run restarting its counters) starts from zero again.
        done_a, done_r = self._published
        delta = (applied - done_a if applied >= done_a else applied,
                 rejected - done_r if rejected >= done_r else rejected)
        try:
            _write(self.store, status, delta)
        except Exception as exc:  # a dashboard nicety must never stop ingest
            if not self._warned:
                log.warning("cannot publish consumer status (%s); ingest goes on", exc)
                self._warned = True
            return
        self._published = (applied, rejected)


def publish_status(store: StateStore, consumer_id: str, report: Any, lag: int | None) -> None:
    """One-off `StatusPublisher.publish` (its rate then spans the time since this call)."""
    StatusPublisher(store, consumer_id).publish(report, lag)


def read_status(store: StateStore, now: float | None = None) -> IngestStatus:
    """The records of consumers alive in the last `STATUS_TTL` seconds, and their totals."""
    now = time.time() if now is None else now
    consumers, totals = _read(store, now)
    consumers.sort(key=lambda c: c.consumer)
    lags = [c.lag for c in consumers if c.lag is not None]
    return IngestStatus(
        events_total=totals.get("events_applied", sum(c.events_applied for c in consumers)),
        events_rejected_total=totals.get("events_rejected",
                                         sum(c.events_rejected for c in consumers)),
        ingest_rate=sum(c.current_rate(now) for c in consumers),
        lag=sum(lags) if lags else None,
        consumers=consumers,
    )


# -- through the store ------------------------------------------------------------------------


def _write(store: StateStore, status: ConsumerStatus, delta: tuple[int, int]) -> None:
    record: dict[str, str | int | float] = {
        k: v for k, v in asdict(status).items() if k != "consumer" and v is not None}
    record["lag"] = "" if status.lag is None else status.lag
    store.write_status(status.consumer, record, STATUS_TTL,
                       {"events_applied": delta[0], "events_rejected": delta[1]})


def _read(store: StateStore, now: float) -> tuple[list[ConsumerStatus], dict[str, int]]:
    records, totals = store.read_status(now - STATUS_TTL)
    return [_parse(consumer, h) for consumer, h in records.items()], totals


def _parse(consumer: str, h: dict[str, str]) -> ConsumerStatus:
    return ConsumerStatus(
        consumer=consumer,
        lag=int(h["lag"]) if h.get("lag") else None,
        **{k: int(h.get(k, 0)) for k in _INT_FIELDS},
        **{k: float(h.get(k, 0.0)) for k in _FLOAT_FIELDS},
    )
