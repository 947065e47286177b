"""The ingest loop: poll -> decode -> dead-letter -> fold -> store.merge (with offsets) -> commit.

Exactly once rests on one fact: the store records, atomically with each batch's statistics, the
next offset of every partition in the batch, and refuses a batch that does not start where the
record ends. So the loop

- seeks every newly assigned partition to the store's recorded offset (Kafka's committed offset
  or the earliest one only when the store has no record);
- covers *every* polled record, good or bad, by the batch's offset ranges, so nothing is
  re-processed once applied;
- flushes the batch's dead letters *before* the merge (a crash may duplicate a dead letter, never
  lose one);
- commits to Kafka only after the merge; a failed commit is harmless (logged), since the store,
  not Kafka, is where a restart resumes;
- on a refused merge (another consumer owns the partition now, or this one is replaying) drops
  the batch and seeks back to the store's offsets;
- on a Redis failure during a merge, whose outcome is then unknown, retries the same merge with
  capped exponential backoff: if the first attempt did land, the retry is refused with the
  recorded offsets equal to the batch's end, which the loop recognises as "already applied".

Pending records of partitions that are revoked are dropped; their new owner reads them again from
the store's offsets.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from streamlme.events import Rejection
from streamlme.metrics import CONSUMER_LAG, EVENTS_DEAD_LETTERED, EVENTS_INGESTED
from streamlme.status import StatusPublisher
from streamlme.store.base import MergeResult, OffsetRange, StateStore
from streamlme.stream.batch import fold
from streamlme.stream.dlq import RETRACT_EXCEEDS_GROUP, DeadLetterError, DeadLetters
from streamlme.stream.source import TP, Source

log = logging.getLogger(__name__)

T = TypeVar("T")


class Decoder(Protocol):
    """`streamlme.events.EventDecoder`, as far as the loop needs it."""

    def decode(self, values: Any) -> Any: ...


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors after which the same operation may succeed later (a service went away)."""
    from kafka.errors import KafkaError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError, KafkaError, DeadLetterError, OSError)


class StoppedError(Exception):
    """A stop was requested while waiting for a service to come back."""


@dataclass
class ConsumeReport:
    """Counters of one `consume` run (its JSON form is what the CLI prints)."""

    events_read: int = 0
    events_applied: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    batches_refused: int = 0
    groups_touched: int = 0
    reconnects: int = 0
    commit_failures: int = 0
    lag: int | None = None
    seconds: float = 0.0

    @property
    def events_rejected(self) -> int:
        return sum(self.rejected.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["events_rejected"] = self.events_rejected
        out["events_per_second"] = round(self.events_read / self.seconds, 1) if self.seconds else 0
        return out


@dataclass
class Backoff:
    """Capped exponential backoff: 0.1 s, 0.2 s, ... up to ``cap`` seconds."""

    first: float = 0.1
    cap: float = 5.0

    def delays(self) -> Any:
        delay = self.first
        while True:
            yield delay
            delay = min(delay * 2, self.cap)


class Ingestor:
    """Runs the loop over one source into one store. Stop it with `stop` (or SIGTERM/SIGINT)."""

    def __init__(
        self,
        source: Source,
        store: StateStore,
        decoder: Decoder,
        dead_letters: DeadLetters,
        *,
        batch_max_events: int = 20_000,
        batch_max_seconds: float = 0.5,
        half_life: float | None = None,
        on_rejection: Callable[[list[Rejection]], None] | None = None,
        backoff: Backoff | None = None,
        status: StatusPublisher | None = None,
    ) -> None:
        self.source = source
        self.store = store
        self.decoder = decoder
        self.dead_letters = dead_letters
        self.batch_max_events = batch_max_events
        self.batch_max_seconds = batch_max_seconds
        self.half_life = half_life
        self.on_rejection = on_rejection
        self.backoff = backoff or Backoff()
        self.report = ConsumeReport()
        # What the dashboard shows of this process (`GET /v1/status`), refreshed every batch.
        self.status = status or StatusPublisher(store)
        self._stop = threading.Event()
        self._transient = transient_errors()
        # Next offset per partition as the store recorded it; absent = store has no record.
        self._expected: dict[TP, int] = {}
        self._pending: dict[TP, list[Any]] = {}
        self._n_pending = 0
        self._ever_assigned = False
        self._assigned_at = 0.0

    # -- control ----------------------------------------------------------------------------

    def stop(self, *_: object) -> None:
        """Finish the current batch, merge, commit, and return from `run`."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)

    # -- rebalance --------------------------------------------------------------------------

    def _on_assigned(self, tps: list[TP]) -> None:
        self._ever_assigned = True
        self._assigned_at = time.monotonic()
        for topic in {tp[0] for tp in tps}:
            try:
                recorded = self.store.offsets(topic)
            except self._transient as exc:
                # The first merge will be refused and seek to the store's offsets then.
                log.warning("cannot read offsets of %s from the store (%s); resuming from "
                            "Kafka's committed offsets until the store answers", topic, exc)
                continue
            for tp in tps:
                if tp[0] != topic:
                    continue
                if tp[1] in recorded:
                    self._expected[tp] = recorded[tp[1]]
                    if self.source.replayable:
                        self.source.seek(tp, recorded[tp[1]])
                else:
                    self._expected.pop(tp, None)
        log.info("assigned %s", sorted(tps))

    def _on_revoked(self, tps: list[TP]) -> None:
        dropped = 0
        for tp in tps:
            dropped += len(self._pending.pop(tp, ()))
            self._expected.pop(tp, None)
        self._n_pending -= dropped
        if dropped:
            log.info("dropped %d pending records of revoked partitions; their new owner "
                     "reads them again from the store's offsets", dropped)

    # -- the loop ---------------------------------------------------------------------------

    def run(self, max_events: int | None = None, until_idle: float | None = None) -> ConsumeReport:
        """Consume until stopped, ``max_events`` read, ``until_idle`` s idle, or input ends."""
        start = time.monotonic()
        self.source.open(self._on_assigned, self._on_revoked)
        last_record = start
        batch_started = None
        try:
            while not self._stop.is_set():
                room = self.batch_max_events - self._n_pending
                if max_events is not None:
                    room = min(room, max_events - self.report.events_read - self._n_pending)
                if room <= 0:
                    self._flush()
                    batch_started = None
                    if max_events is not None and self.report.events_read >= max_events:
                        break
                    continue
                timeout = self.batch_max_seconds
                if batch_started is not None:
                    timeout = max(0.0, batch_started + self.batch_max_seconds - time.monotonic())
                polled = self._poll(timeout, room)
                now = time.monotonic()
                if polled:
                    last_record = now
                    batch_started = batch_started or now
                    for tp, records in polled.items():
                        self._pending.setdefault(tp, []).extend(records)
                        self._n_pending += len(records)
                due = batch_started is not None and now - batch_started >= self.batch_max_seconds
                if self._n_pending and (due or self._n_pending >= self.batch_max_events
                                        or self.source.exhausted()):
                    self._flush()
                    batch_started = None
                if self.source.exhausted() and not self._n_pending:
                    break
                if until_idle is not None and self._idle_for(now, last_record) >= until_idle:
                    break
            self._flush()
        except StoppedError:
            log.warning("stopped while a service was away; the unfinished batch is dropped and "
                        "will be read again from the store's offsets")
        finally:
            self.report.lag = self._lag()
            self.source.close()
            self.dead_letters.close()
            self.report.seconds = time.monotonic() - start
            self.report.rejected = dict(self.dead_letters.counts)
        return self.report

    def _idle_for(self, now: float, last_record: float) -> float:
        if self._n_pending:
            return 0.0
        if not self._ever_assigned:
            # A consumer-group join takes seconds; idleness counts only once we own partitions.
            return 0.0
        return now - max(last_record, self._assigned_at)

    def _poll(self, timeout: float, room: int) -> Mapping[TP, list[Any]]:
        try:
            return self.source.poll(timeout, room)
        except self._transient as exc:
            log.warning("poll failed (%s); retrying", exc)
            self.report.reconnects += 1
            self._sleep(self.backoff.first)
            return {}

    def _lag(self) -> int | None:
        try:
            return self.source.lag()
        except Exception:  # lag is a nicety; never fail a run over it
            return None

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise StoppedError

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Call fn until it succeeds, backing off while a service is away."""
        for delay in self.backoff.delays():
            try:
                return fn()
            except self._transient as exc:
                self.report.reconnects += 1
                log.warning("%s failed (%s: %s); retrying in %.1fs", what,
                            type(exc).__name__, exc, delay)
                self._sleep(delay)
        raise AssertionError("unreachable")

    # -- one batch --------------------------------------------------------------------------

    def _flush(self) -> None:
        if not self._n_pending:
            return
        pending, self._pending, self._n_pending = self._pending, {}, 0
        rejected_before = dict(self.dead_letters.counts)
        tps = [tp for tp, recs in pending.items() if recs]
        values: list[bytes] = []
        for tp in tps:
            values.extend(r.value for r in pending[tp])
        bounds = np.cumsum([len(pending[tp]) for tp in tps])

        def locate(i: int) -> tuple[TP, Any]:
            j = int(np.searchsorted(bounds, i, side="right"))
            return tps[j], pending[tps[j]][i - (int(bounds[j - 1]) if j else 0)]

        decoded = self.decoder.decode(values)
        for rejection in decoded.rejections:
            tp, rec = locate(rejection.index)
            self._dead_letter(rejection.reason, tp, rec)
        if decoded.rejections and self.on_rejection is not None:
            self.on_rejection(decoded.rejections)
        delta = fold(decoded.groups, decoded.W, decoded.weights, decoded.ts, decoded.retract,
                     self.half_life)
        self._retry("sending dead letters", self.dead_letters.flush)

        offsets: dict[TP, OffsetRange] = {}
        if self.source.replayable:
            for tp in tps:
                first, last = pending[tp][0].offset, pending[tp][-1].offset
                offsets[tp] = OffsetRange(self._expected.get(tp, first), last + 1)

        result = self._retry(
            "merging into the store",
            lambda: self.store.merge(delta.adds, delta.retracts, offsets, self.half_life),
        )
        self.report.events_read += len(values)
        if not result.applied and not self._landed_earlier(result, offsets):
            self._refused(result, offsets)
            return
        self.report.batches += 1
        self.report.groups_touched += len(delta.adds) + (len(delta.retracts or ()))
        overdrawn = set(result.overdrawn)
        refused: list[Rejection] = []
        if overdrawn:
            for row, group in zip(delta.retract_rows, delta.retract_groups, strict=True):
                if group in overdrawn:
                    position = int(decoded.index[row])
                    tp, rec = locate(position)
                    self._dead_letter(RETRACT_EXCEEDS_GROUP, tp, rec)
                    refused.append(Rejection(position, RETRACT_EXCEEDS_GROUP))
            self._retry("sending dead letters", self.dead_letters.flush)
            if self.on_rejection is not None:
                self.on_rejection(refused)
        self.report.events_applied += len(decoded.groups) - len(refused)
        for tp, rng in offsets.items():
            self._expected[tp] = rng.end
        if offsets:
            self._commit({tp: rng.end for tp, rng in offsets.items()})
        self.report.rejected = dict(self.dead_letters.counts)
        self.status.publish(self.report, self._lag())
        self._record_metrics(len(decoded.groups) - len(refused), rejected_before)

    def _record_metrics(self, applied: int, rejected_before: Mapping[str, int]) -> None:
        """This batch into the process's Prometheus metrics (`streamlme.metrics`)."""
        EVENTS_INGESTED.inc(applied)
        for reason, count in self.report.rejected.items():
            new = count - rejected_before.get(reason, 0)
            if new:
                EVENTS_DEAD_LETTERED.labels(reason).inc(new)
        for (topic, partition), lag in self.source.partition_lags().items():
            CONSUMER_LAG.labels(topic, str(partition)).set(lag)

    def _dead_letter(self, reason: str, tp: TP, rec: Any) -> None:
        value = rec.value if rec.value is not None else b""
        self.dead_letters.add(reason, tp[0], tp[1], rec.offset, rec.key, value)

    @staticmethod
    def _landed_earlier(result: MergeResult, offsets: Mapping[TP, OffsetRange]) -> bool:
        """A retried merge refused only because its first attempt did apply."""
        return bool(result.conflicts) and all(
            tp in offsets and recorded == offsets[tp].end
            for tp, recorded in result.conflicts.items()
        ) and len(result.conflicts) == len(offsets)

    def _refused(self, result: MergeResult, offsets: Mapping[TP, OffsetRange]) -> None:
        self.report.batches_refused += 1
        log.warning("store refused a batch (recorded offsets %s differ from the batch's start); "
                    "dropping it and resuming from the store's offsets", result.conflicts)
        owned = self.source.assignment()
        for topic in {tp[0] for tp in offsets}:
            recorded = self._retry("reading offsets", lambda t=topic: self.store.offsets(t))
            for tp, rng in offsets.items():
                if tp[0] != topic:
                    continue
                if tp[1] in recorded:
                    self._expected[tp] = recorded[tp[1]]
                else:
                    self._expected.pop(tp, None)
                if tp in owned:
                    self.source.seek(tp, recorded.get(tp[1], rng.start))

    def _commit(self, offsets: dict[TP, int]) -> None:
        try:
            self.source.commit(offsets)
        except Exception as exc:  # the store is the source of truth; Kafka's offset is a hint
            self.report.commit_failures += 1
            log.warning("Kafka commit failed after a successful merge (harmless, the store "
                        "holds the offsets): %s", exc)
