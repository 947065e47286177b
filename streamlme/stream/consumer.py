"""The ingest loop: poll -> decode -> dead-letter -> fold -> store.merge_shards -> commit.

Exactly once rests on one fact: each shard of the store records, atomically with its part of
each batch, the next offset of every partition in the batch, and refuses a part that does not
start where that shard's record ends. So the loop

- on (re)assignment reads every shard's recorded offset of its partitions and seeks each
  partition to the lowest (Kafka's committed offset or the earliest one only when no shard has
  a record), and folds an event into a shard only when the event's offset is at or past that
  shard's record (`_Positions`);
- before a partition's first batch, records its start in every shard (offsets only), so that
  no shard is ever without a record once any shard holds statistics of it;
- splits each batch by shard and applies every shard's part with one script call, pipelined;
  shards the batch does not touch get offsets-only calls at least every `sync_seconds`, so
  that a restart does not replay far;
- covers *every* polled record, good or bad, by the parts' offset ranges;
- flushes the batch's dead letters *before* the merge (a crash may duplicate a dead letter,
  never lose one);
- commits to Kafka only after the merge; a failed commit is harmless (logged), since the store,
  not Kafka, is where a restart resumes;
- on a refused shard call re-reads that shard's offsets: if the shard is ahead (a retry whose
  first attempt landed, a zombie's partition taken over), re-folds only the events past its
  record and applies them; if it is behind the part's start (a failover lost acknowledged
  writes), drops that part and seeks the partition back so Kafka replays what it lost;
- on a Redis failure during a merge, whose outcome is then unknown, retries the same parts with
  capped exponential backoff (the refusal rule above sorts out which had landed).

It folds nothing from a store that lost its state (`StateLostError`, exit 3, after flagging
the namespace "lost"): a namespace without records of a partition for which Kafka holds
committed offsets of the group beyond the earliest available one (or committed against another
namespace epoch, which the commit's metadata carries); a shard with statistics but no offsets
record, or without any record in a namespace whose other shards have one; a shard refusing a
part because it has no record of a partition (only a call recording a partition's start may
find none). ``rebuild`` clears the statistics and replays every partition from its beginning
under the flag "rebuilding", cleared once the replay reaches the end offsets seen at start;
it refuses when the topic no longer holds every event the namespace covered.

An offset gap (the next record lies beyond a partition's recorded offset, and that offset is
below the partition's log start: retention deleted events the store never saw) stops the
consumer with exit 3 (``on_gap="stop"``), or is applied and recorded (``on_gap="record"``).

Retractions go to the store in order, event by event (`streamlme.stream.batch.fold_ordered`),
each with its dead-letter record, which the merge keeps when it refuses the retraction; the
consumer sends those and then deletes exactly what it sent, and drains any left over at start.
A merge refused as non-finite dead-letters that cell's events of the batch (``overflow``) and
applies the rest.

docs/operations.md gives the argument, including a crash between two shard calls. Pending
records of partitions that are revoked are dropped; their new owner reads them again.
"""

from __future__ import annotations

import json
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
from streamlme.stats import GroupStats
from streamlme.status import StatusPublisher
from streamlme.store.base import MergeResult, OffsetRange, ShardBatch, StateStore, Step
from streamlme.store.health import Gap, StateLostError
from streamlme.store.shards import shard_ids
from streamlme.stream.batch import fold_ordered
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
    #: Seconds spent decoding, folding and merging batches (the rest is waiting for events).
    busy_seconds: float = 0.0

    @property
    def events_rejected(self) -> int:
        return sum(self.rejected.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["events_rejected"] = self.events_rejected
        out["events_per_second"] = round(self.events_read / self.seconds, 1) if self.seconds else 0
        out["events_per_busy_second"] = (round(self.events_read / self.busy_seconds, 1)
                                         if self.busy_seconds else 0)
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
    """Runs the loop over one source into one store. Stop it with `stop` (or SIGTERM/SIGINT).

    ``on_gap`` is "stop" or "record" (see the module docstring); ``rebuild`` replays the topic
    into fresh statistics; ``config_hint`` names the configuration in recovery messages.
    """

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
        sync_seconds: float = 2.0,
        on_gap: str = "stop",
        rebuild: bool = False,
        config_hint: str = "FILE",
        heartbeat_seconds: float = 2.0,
        progress_seconds: float = 30.0,
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
        # Per partition, each shard's next offset as the store recorded it.
        self._positions = _Positions()
        self.sync_seconds = sync_seconds
        self._synced_at = 0.0
        # Per partition, (first, end) of what this consumer has read without a jump.
        self._read: dict[TP, tuple[int, int]] = {}
        self._pending: dict[TP, list[Any]] = {}
        self._n_pending = 0
        self._ever_assigned = False
        self._assigned_at = 0.0
        self.on_gap = on_gap
        self.rebuild = rebuild
        self.config_hint = config_hint
        self.heartbeat_seconds = heartbeat_seconds
        self._status_at = 0.0
        self.progress_seconds = progress_seconds
        self._progress = (time.monotonic(), 0)  # (when, events read) at the last progress line
        # partitions assigned since the last poll, whose store state is not checked yet
        self._unchecked: set[TP] = set()
        # while rebuilding: per partition, the end offset the replay must reach
        self._rebuild_ends: dict[TP, int] | None = None
        self._epoch: str | None = None
        self._origins: dict[TP, int] = {}
        self._gaps: list[Gap] = []
        #: Retry opening the source while the broker does not answer (a long-running service).
        self.wait_for_source = False

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
                recorded = self.store.shard_offsets(topic)
            except self._transient as exc:
                # The first merge will be refused and seek to the store's offsets then.
                log.warning("cannot read offsets of %s from the store (%s); resuming from "
                            "Kafka's committed offsets until the store answers", topic, exc)
                continue
            for tp in tps:
                if tp[0] == topic:
                    self._read.pop(tp, None)
                    self._positions.load(tp, recorded)
                    if tp in self._positions and self.source.replayable:
                        self.source.seek(tp, self._positions.resume(tp))
                    elif self.source.replayable:
                        self._unchecked.add(tp)
        log.info("assigned %s", sorted(tps))

    def _on_revoked(self, tps: list[TP]) -> None:
        dropped = 0
        for tp in tps:
            dropped += len(self._pending.pop(tp, ()))
            self._unchecked.discard(tp)
            self._positions.forget(tp)
            self._read.pop(tp, None)
        self._n_pending -= dropped
        if dropped:
            log.info("dropped %d pending records of revoked partitions; their new owner "
                     "reads them again from the store's offsets", dropped)

    # -- the loop ---------------------------------------------------------------------------

    def run(self, max_events: int | None = None, until_idle: float | None = None) -> ConsumeReport:
        """Consume until stopped, ``max_events`` read, ``until_idle`` s idle, or input ends."""
        start = time.monotonic()
        store_retries = getattr(self.store, "retries", 0)  # retries inside the store
        last_record = start
        batch_started = None
        try:
            if self.wait_for_source:
                self._retry("waiting for Kafka", lambda: self.source.open(self._on_assigned,
                                                                          self._on_revoked))
            else:
                self.source.open(self._on_assigned, self._on_revoked)
            self._prepare()
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
                if not self._n_pending:
                    self._sync()
                    self._heartbeat()
                if until_idle is not None and self._idle_for(now, last_record) >= until_idle:
                    break
            self._flush()
            self._sync(force=True)
        except StoppedError:
            log.warning("stopped while a service was away; the unfinished batch is dropped and "
                        "will be read again from the store's offsets")
        finally:
            self.report.reconnects += getattr(self.store, "retries", 0) - store_retries
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
            polled = self.source.poll(timeout, room)
        except self._transient as exc:
            log.warning("poll failed (%s); retrying", exc)
            self.report.reconnects += 1
            self._sleep(self.backoff.first)
            return {}
        if self._unchecked:
            polled = self._check_new(polled)
        return polled

    def _heartbeat(self) -> None:
        """While idle, tell `/v1/status` every ``heartbeat_seconds`` that this consumer lives
        (and see whether a rebuild has caught up)."""
        now = time.monotonic()
        if now - self._status_at < self.heartbeat_seconds:
            return
        self._status_at = now
        self._check_epoch()
        if self._rebuild_ends is not None:
            self._rebuilt()
        try:
            self.status.publish(self.report, self._lag())
        except self._transient as exc:
            log.debug("status heartbeat failed: %s", exc)

    # -- store identity ---------------------------------------------------------------------

    def _lost(self, found: str) -> StateLostError:
        """Flag the namespace "lost" and return the error to raise (nothing was folded)."""
        message = (f"{found}; nothing was folded. Recover with `streamlme consume --config "
                   f"{self.config_hint} --rebuild` (replays the topic into fresh statistics)")
        self._retry("flagging the namespace", lambda: self.store.set_flag("lost", message))
        return StateLostError(message)

    def _prepare(self) -> None:
        """Before the first poll: refuse a store flagged or found without its state, start a
        rebuild, send dead letters merges kept."""
        health = self._retry("reading the namespace's health", self.store.health)
        self._epoch = health.epoch
        if self.rebuild:
            self._start_rebuild()
        elif health.flag == "lost":
            raise StateLostError(health.reason or "the namespace is flagged lost; run "
                                 f"`streamlme consume --config {self.config_hint} --rebuild`")
        else:
            if health.flag == "rebuilding":
                # a rebuild stopped half-way: its shards may hold partial records, by design
                log.info("the namespace is being rebuilt (%s); going on with it", health.reason)
                self._rebuild_ends = self._ends()
            elif self.source.replayable:  # stdin records no offsets: nothing to compare
                self._check_presence()
        self._drain_dead()
        if self._rebuild_ends == {}:
            self._finish_rebuild()  # nothing to replay

    def _check_epoch(self) -> None:
        """An idle consumer's check that the namespace is still the one it folds into (a Redis
        back empty has no epoch, or a new one): a merge would find out, but none may come."""
        if not self._positions:
            return
        epoch = self._retry("reading the namespace's epoch", self.store.epoch)
        if self._epoch is None:
            self._epoch = epoch
        elif epoch != self._epoch:
            raise self._lost(f"the namespace's epoch is {epoch}, not the {self._epoch} this "
                             "consumer folded into (Redis restarted empty or was flushed)")

    def _check_presence(self) -> None:
        presence = self._retry("reading shard presence", self.store.shard_presence)
        with_stats_only = [s for s, (stats, offsets) in enumerate(presence)
                           if stats and not offsets]
        if with_stats_only:
            raise self._lost(f"shard(s) {with_stats_only[:10]} of the store hold statistics "
                             "but no offsets record (their offsets were lost)")
        recorded = [s for s, (_, offsets) in enumerate(presence) if offsets]
        empty = [s for s, (stats, offsets) in enumerate(presence) if not stats and not offsets]
        if recorded and empty:
            raise self._lost(f"shard(s) {empty[:10]} of the store hold no record at all while "
                             f"{len(recorded)} other shard(s) do (a failover to an empty "
                             "replica, or keys deleted)")

    def _ends(self) -> dict[TP, int]:
        parts = self._retry("listing the topic's partitions", self.source.partitions)
        bounds = self._retry("reading the topic's offsets", lambda: self.source.bounds(parts))
        return {tp: end for tp, (begin, end) in bounds.items() if end > begin}

    def _start_rebuild(self) -> None:
        """Refuse when the topic lost events the namespace covered; else flag "rebuilding",
        clear the statistics (models stay) and replay every partition from its beginning."""
        parts = self._retry("listing the topic's partitions", self.source.partitions)
        bounds = self._retry("reading the topic's offsets", lambda: self.source.bounds(parts))
        gone = []
        for tp, (begin, _) in sorted(bounds.items()):
            origin = self._origin(tp)
            if begin > origin:
                gone.append(f"{tp[0]}:{tp[1]} offsets {origin}..{begin - 1}")
        if gone:
            raise StateLostError(
                "cannot rebuild: the topic no longer holds every event the namespace covered "
                f"({'; '.join(gone)} were deleted by retention); nothing was changed. Restore "
                "the namespace from a backup, or start a new namespace from what the topic holds")
        self._retry("flagging the namespace", lambda: self.store.set_flag(
            "rebuilding", "consume --rebuild is replaying the topic into fresh statistics"))
        self._retry("clearing the statistics", self.store.clear_statistics)
        self._rebuild_ends = {tp: end for tp, (begin, end) in bounds.items() if end > begin}
        log.info("rebuilding: statistics cleared; replaying %s up to %s", sorted(bounds),
                 self._rebuild_ends)

    def _origin(self, tp: TP) -> int:
        """The offset the namespace started ``tp`` from: as the group's commit records it,
        else 0 (a namespace that started at the beginning)."""
        committed = self._retry("reading committed offsets", lambda: self.source.committed(tp))
        meta = _commit_metadata(committed[1]) if committed else {}
        return int(meta.get("origin", 0))

    def _check_new(self, polled: Mapping[TP, list[Any]]) -> Mapping[TP, list[Any]]:
        """Partitions newly assigned without any record in the store: replay them from the
        beginning (rebuilding), or make sure the store did not lose them."""
        out = dict(polled)
        todo, self._unchecked = sorted(self._unchecked), set()
        bounds = self._retry("reading the topic's offsets", lambda: self.source.bounds(todo))
        for tp in todo:
            begin = bounds[tp][0]
            if self._rebuild_ends is not None:  # rebuilding: replay it all
                self.source.seek(tp, begin)
                out.pop(tp, None)
                continue
            committed = self._retry("reading committed offsets",
                                    lambda tp=tp: self.source.committed(tp))
            if committed is None:
                continue
            offset, metadata = committed
            meta = _commit_metadata(metadata)
            if "origin" in meta:
                self._origins[tp] = int(meta["origin"])
            if meta.get("epoch") and meta["epoch"] != self._epoch:
                raise self._lost(
                    f"Kafka's committed offset {offset} of {tp[0]}:{tp[1]} was made against "
                    f"namespace epoch {meta['epoch']}, the store's is {self._epoch} (the store "
                    "was reset) and holds no record of the partition")
            if offset > begin:
                raise self._lost(
                    f"the store holds no record of {tp[0]}:{tp[1]} while Kafka holds the "
                    f"group's committed offset {offset}, beyond the earliest {begin} (Redis "
                    "restarted empty or was flushed)")
        return out

    def _check_gaps(self, pending: Mapping[TP, list[Any]]) -> dict[TP, int]:
        """Per partition whose records jump past the recorded offset, where its range starts
        (the recorded offset). A jump over offsets retention deleted (the record is below the
        log start) is a gap: refused (`on_gap` "stop") or kept to record after the merge."""
        starts: dict[TP, int] = {}
        jumped = [tp for tp, recs in pending.items() if recs and tp in self._positions
                  and recs[0].offset > self._positions.resume(tp)]
        if not jumped:
            return starts
        bounds = self._retry("reading the topic's offsets", lambda: self.source.bounds(jumped))
        for tp in jumped:
            at, first = self._positions.resume(tp), pending[tp][0].offset
            starts[tp] = at
            if at >= bounds[tp][0]:
                continue  # transaction markers or compaction: nothing was lost
            if self.on_gap != "record":
                raise StateLostError(
                    f"offset gap in {tp[0]}:{tp[1]}: the store holds events up to offset {at}, "
                    f"the partition now starts at {bounds[tp][0]} (retention deleted offsets "
                    f"{at}..{first - 1} before they were folded); nothing was folded. Set "
                    "[kafka] on_gap = \"record\" to go on and record the gap (models will not "
                    "cover it); --rebuild cannot help, those events are gone")
            log.warning("offset gap in %s:%d: offsets %d..%d were deleted before they were "
                        "folded; recording it (on_gap = \"record\")", tp[0], tp[1], at, first - 1)
            self._gaps.append(Gap(tp[0], tp[1], at, first, time.time()))
        return starts

    def _rebuilt(self) -> None:
        """Clear the "rebuilding" flag once every partition reached the end seen at start."""
        if not self._rebuild_ends:
            if self._rebuild_ends is not None:
                self._finish_rebuild()
            return
        topics = {tp[0] for tp in self._rebuild_ends}
        recorded = {t: self._retry("reading offsets", lambda t=t: self.store.offsets(t))
                    for t in topics}
        if all(recorded[tp[0]].get(tp[1], -1) >= end for tp, end in self._rebuild_ends.items()):
            self._finish_rebuild()

    def _finish_rebuild(self) -> None:
        self._retry("clearing the namespace's flag", self.store.clear_flag)
        self._rebuild_ends = None
        log.info("rebuild caught up with the end offsets seen at start; the namespace is ready")

    def _drain_dead(self) -> None:
        """Send the dead letters merges kept (refused retractions), then delete what was sent."""
        kept = self._retry("reading kept dead letters", self.store.dead_letters)
        if not kept:
            return
        for records in kept.values():
            for record in records.values():
                self.dead_letters.add_record(record)
        self._retry("sending dead letters", self.dead_letters.flush)
        for shard, records in kept.items():
            self._retry("deleting sent dead letters",
                        lambda s=shard, f=list(records): self.store.delete_dead_letters(s, f))

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
        started = time.monotonic()
        try:
            self._flush_batch()
        finally:
            self.report.busy_seconds += time.monotonic() - started
        self._log_progress()

    def _log_progress(self) -> None:
        """A progress line every ``progress_seconds``: events, rate over the interval, lag."""
        now = time.monotonic()
        at, read = self._progress
        if now - at < self.progress_seconds:
            return
        self._progress = (now, self.report.events_read)
        log.info("progress: %d events read, %.0f/s over the last %.0f s, lag %s",
                 self.report.events_read, (self.report.events_read - read) / (now - at),
                 now - at, self._lag())

    def _flush_batch(self) -> None:
        jumps = self._check_gaps(self._pending) if self.source.replayable else {}
        pending, self._pending, self._n_pending = self._pending, {}, 0
        rejected_before = dict(self.dead_letters.counts)
        tps = [tp for tp, recs in pending.items() if recs]
        records = [r for tp in tps for r in pending[tp]]
        values = [r.value for r in records]
        tp_of = np.repeat(np.arange(len(tps)), [len(pending[tp]) for tp in tps])

        decoded = self.decoder.decode(values)
        for rejection in decoded.rejections:
            self._dead_letter(rejection.reason, tps[tp_of[rejection.index]],
                              records[rejection.index])
        if decoded.rejections and self.on_rejection is not None:
            self.on_rejection(decoded.rejections)
        self._retry("sending dead letters", self.dead_letters.flush)
        self.report.events_read += len(values)

        ranges: dict[TP, OffsetRange] = {}
        if self.source.replayable:
            for tp in tps:
                start = jumps.get(tp, pending[tp][0].offset)
                ranges[tp] = OffsetRange(start, pending[tp][-1].offset + 1)
            self._record_starts(ranges)
        batch = _Batch(decoded, tp_of[decoded.index] if len(decoded) else np.zeros(0, np.intp),
                       np.array([r.offset for r in records], dtype=np.int64)[decoded.index]
                       if len(decoded) else np.zeros(0, np.int64),
                       shard_ids(decoded.groups, self.store.n_shards), tps, ranges, records,
                       np.zeros(len(decoded), bool))
        for tp, rng in ranges.items():
            if self._read.get(tp, (None, None))[1] != rng.start:
                self._read[tp] = (rng.start, rng.end)  # read afresh from here (a seek)
            else:
                self._read[tp] = (self._read[tp][0], rng.end)
        applied, refused = self._apply(batch)
        self.report.batches += 1
        self.report.events_applied += applied - refused
        for gap in self._gaps:
            self._retry("recording an offset gap", lambda g=gap: self.store.record_gap(g))
        self._gaps = []
        self._sync()
        if ranges:
            self._commit({tp: self._positions.resume(tp) for tp in ranges
                          if tp in self._positions})
        if self._rebuild_ends is not None:
            self._rebuilt()
        self.report.rejected = dict(self.dead_letters.counts)
        self.status.publish(self.report, self._lag())
        self._record_metrics(applied - refused, rejected_before)

    def _sync(self, force: bool = False) -> None:
        """Move the records of shards that recent batches did not touch up to the end of what
        this consumer has read (offsets-only calls), at most every `sync_seconds`.

        A shard's record may move from p to the end e of this consumer's contiguous reading
        when p is within it: every event of [p, e) went through a batch, and none was the
        shard's, or its part would have moved the record past it.
        """
        if not self._read or not (force or time.monotonic() - self._synced_at
                                  >= self.sync_seconds):
            return
        self._synced_at = time.monotonic()
        parts: dict[int, ShardBatch] = {}
        for shard in range(self.store.n_shards):
            offsets = {}
            for tp, (first, end) in self._read.items():
                at = self._positions.get(tp, shard, first)
                if tp in self._positions and first <= at < end:
                    offsets[tp] = OffsetRange(at, end)
            if offsets:
                parts[shard] = ShardBatch(_EMPTY, None, offsets)
        if not parts:
            return
        results = self._retry("recording offsets",
                              lambda: self.store.merge_shards(parts, self.half_life))
        for shard, result in results.items():
            if result.applied:
                for tp, rng in parts[shard].offsets.items():
                    self._positions.set(tp, shard, rng.end)
                continue
            if result.missing:
                raise self._lost_shard(shard, result)
            # Refused: the shard's record is not where this consumer had it. Ahead (a retry
            # that landed, another consumer): take it. Behind (a failover lost acknowledged
            # writes): take it and replay from Kafka, even if no later batch touches the shard.
            for tp, have in result.conflicts.items():
                rng = parts[shard].offsets.get(tp)
                if rng is None:
                    continue
                self._positions.set(tp, shard, have)
                if have < rng.start:
                    log.warning("shard %d holds offset %d of %s:%d, behind the %d it had "
                                "applied (a failover lost acknowledged writes); replaying "
                                "from Kafka", shard, have, tp[0], tp[1], rng.start)
                    self._seek_back(tp)

    def _record_starts(self, ranges: Mapping[TP, OffsetRange]) -> None:
        """Before a partition's first batch, record its start in every shard (offsets only)."""
        new = {tp: OffsetRange(r.start, r.start) for tp, r in ranges.items()
               if tp not in self._positions}
        if not new:
            return
        parts = {s: ShardBatch(_EMPTY, None, new, starts=True)
                 for s in range(self.store.n_shards)}
        results = self._retry("recording offsets",
                              lambda: self.store.merge_shards(parts, self.half_life))
        for shard, result in results.items():
            for tp, rng in new.items():
                # refused: another consumer got there first; its record is the shard's truth
                self._positions.set(tp, shard, result.conflicts.get(tp, rng.start))
                self._origins.setdefault(tp, rng.start)
        if self._epoch is None:  # the namespace was created just now: the epoch to keep
            self._epoch = self._retry("reading the namespace's epoch", self.store.epoch)

    def _lost_shard(self, shard: int, result: MergeResult) -> StateLostError:
        where = ", ".join(f"{t}:{p}" for t, p in result.missing)
        return self._lost(f"shard {shard} of the store has no offsets record of {where}, which "
                          "this consumer had recorded there (its state was lost: Redis "
                          "restarted empty, was flushed, or failed over to an empty replica)")

    def _apply(self, batch: _Batch) -> tuple[int, int]:
        """Merge every shard's part; returns the events applied and those refused in the
        merge (overdrawn retractions, dead-lettered from the store)."""
        todo = {int(s): self._part(batch, int(s)) for s in np.unique(batch.shards).tolist()}
        todo = {s: p for s, p in todo.items() if p is not None}
        # a batch the store held (part of) already: a replay, a retry, or a zombie's
        refused = sum(len(p.rows) for p in todo.values()) < len(batch.shards)
        applied = overdrawn = 0
        attempts = 0
        while todo and attempts < 5:
            parts = {s: p.batch for s, p in todo.items()}
            results = self._retry("merging into the store",
                                  lambda parts=parts: self.store.merge_shards(parts,
                                                                              self.half_life))
            again: dict[int, _Part] = {}
            overflowed = False
            for shard, result in results.items():
                part = todo[shard]
                if result.applied or part.landed_earlier(result):
                    for tp, rng in part.batch.offsets.items():
                        self._positions.set(tp, shard, rng.end)
                    applied += len(part.rows)
                    self.report.groups_touched += len(part.batch.adds) + len(
                        {step.key for step in part.batch.steps})
                    overdrawn += self._send_kept(shard, part, result)
                    continue
                if result.missing:
                    raise self._lost_shard(shard, result)
                if result.nonfinite is not None:
                    self._overflow(batch, part, result.nonfinite)
                    overflowed = True
                    retry = self._part(batch, shard)
                else:
                    refused = True
                    retry = self._refused(batch, shard, result)
                if retry is not None:
                    again[shard] = retry
            todo = again
            attempts += not overflowed  # each overflow drops a cell: it always ends
        self.report.batches_refused += refused
        if todo:
            log.warning("shards %s refused the batch five times; their part is dropped and "
                        "read again from their offsets", sorted(todo))
            for tp in batch.ranges:
                self._seek_back(tp)
        return applied, overdrawn

    def _overflow(self, batch: _Batch, part: _Part, cell: str) -> None:
        """Dead-letter (``overflow``) the batch's events of ``cell``, which the store refused
        as making its statistics non-finite, before the rest is merged again."""
        groups = batch.decoded.groups
        rows = [r for r in part.rows.tolist() if groups[r] == cell]
        log.warning("cell %r would hold non-finite statistics with this batch; its %d event(s) "
                    "of the batch are dead-lettered as overflow", cell, len(rows))
        rejections = []
        for row in rows:
            position = int(batch.decoded.index[row])
            self._dead_letter(f"overflow: cell {cell} would hold non-finite statistics",
                              batch.tps[batch.tp_of[row]], batch.records[position])
            rejections.append(Rejection(position, "overflow"))
        batch.excluded[rows] = True
        self._retry("sending dead letters", self.dead_letters.flush)
        if self.on_rejection is not None:
            self.on_rejection(rejections)

    def _send_kept(self, shard: int, part: _Part, result: MergeResult) -> int:
        """Send the dead letters of the retractions the merge refused (it kept them), then
        delete exactly those from the store. Returns how many."""
        if not result.applied:
            # a retry whose first attempt landed: its refusals are unknown here, the store has
            # them
            self._drain_dead()
            return 0
        steps = [part.batch.steps[i] for i in result.refused_steps]
        if not steps:
            return 0
        for step in steps:
            self.dead_letters.add_record(step.dead)
        self._retry("sending dead letters", self.dead_letters.flush)
        fields = [step.dead_field for step in steps]
        self._retry("deleting sent dead letters",
                    lambda: self.store.delete_dead_letters(shard, fields))
        if self.on_rejection is not None:
            self.on_rejection([Rejection(int(part.step_positions[i]), RETRACT_EXCEEDS_GROUP)
                               for i in result.refused_steps])
        return len(steps)

    def _part(self, batch: _Batch, shard: int) -> _Part | None:
        """Shard ``shard``'s part: its events at or past its record, and offset ranges from its
        record to the batch's end (None when the shard is past the whole batch)."""
        offsets: dict[TP, OffsetRange] = {}
        for tp, rng in batch.ranges.items():
            start = self._positions.get(tp, shard, rng.start)
            if start < rng.end:
                offsets[tp] = OffsetRange(start, rng.end)
        rows = np.flatnonzero((batch.shards == shard) & ~batch.excluded)
        if batch.ranges:
            floor = np.array([offsets[tp].start if tp in offsets else np.iinfo(np.int64).max
                              for tp in batch.tps], dtype=np.int64)
            rows = rows[batch.offsets[rows] >= floor[batch.tp_of[rows]]]
        if not len(rows) and not offsets:
            return None
        d = batch.decoded
        delta = fold_ordered([d.groups[i] for i in rows.tolist()], d.W[rows], d.weights[rows],
                             d.ts[rows], d.retract[rows], self.half_life)
        steps, positions = [], []
        for key, stats, retract, row in delta.steps:
            if not retract:
                steps.append(Step(key, stats))
                positions.append(-1)
                continue
            position = int(d.index[rows[row]])
            tp, rec = batch.tps[batch.tp_of[rows[row]]], batch.records[position]
            value = rec.value if rec.value is not None else b""
            steps.append(Step(key, stats, True, f"{tp[0]}:{tp[1]}:{rec.offset}",
                              self.dead_letters.encode(RETRACT_EXCEEDS_GROUP, tp[0], tp[1],
                                                       rec.offset, rec.key, value)))
            positions.append(position)
        return _Part(ShardBatch(delta.adds, None, offsets, steps), rows, positions)

    def _refused(self, batch: _Batch, shard: int, result: MergeResult) -> _Part | None:
        """After shard ``shard`` refused its part: re-read its offsets and return the part to
        apply now, or None (nothing of this batch is left for it, or Kafka must replay)."""
        behind = False
        for topic in {tp[0] for tp in batch.ranges}:
            recorded = self._retry("reading offsets", lambda t=topic: self.store.shard_offsets(t))
            for tp, rng in batch.ranges.items():
                if tp[0] != topic:
                    continue
                have = recorded.get(shard, {}).get(tp[1])
                expected = self._positions.get(tp, shard, rng.start)
                if have is None or have < expected:
                    log.warning("shard %d holds offset %s of %s:%d, behind the %d it had "
                                "applied (a failover lost acknowledged writes); replaying "
                                "from Kafka", shard, have, tp[0], tp[1], expected)
                    behind = True
                    self._positions.set(tp, shard, have if have is not None else rng.start)
                else:
                    self._positions.set(tp, shard, have)
        if behind:
            # The shard's whole part is dropped, so every partition of the batch is read again,
            # not only those it fell behind on: a later part of this shard starts at its record,
            # and must carry this batch's events of the shard, not claim their offsets without.
            for tp in batch.ranges:
                self._seek_back(tp)
            return None
        log.info("shard %d was ahead of this consumer (%s); applying only what it lacks",
                 shard, result.conflicts)
        return self._part(batch, shard)

    def _seek_back(self, tp: TP) -> None:
        self._read.pop(tp, None)
        if tp in self._positions and tp in self.source.assignment():
            self.source.seek(tp, self._positions.resume(tp))

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

    def _commit(self, offsets: dict[TP, int]) -> None:
        # the metadata names the namespace epoch folded into, so that a store that comes back
        # empty (a new epoch) is told apart from a new namespace, and where it started
        metadata = {tp: json.dumps({"epoch": self._epoch, **(
            {"origin": self._origins[tp]} if tp in self._origins else {})}) for tp in offsets}
        try:
            self.source.commit(offsets, metadata)
        except Exception as exc:  # the store is the source of truth; Kafka's offset is a hint
            self.report.commit_failures += 1
            log.warning("Kafka commit failed after a successful merge (harmless, the store "
                        "holds the offsets): %s", exc)


_EMPTY = GroupStats.empty(0)


def _commit_metadata(text: str) -> dict[str, Any]:
    """The consumer's commit metadata (``{"epoch": ..., "origin": ...}``), {} if none."""
    try:
        meta = json.loads(text) if text else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


class _Positions:
    """Per assigned partition, each shard's next offset to read as the shard recorded it.

    A shard without a record of a partition that others have recorded has applied none of its
    events (the consumer records a partition's start in every shard before its first batch),
    so it counts from the lowest record.
    """

    def __init__(self) -> None:
        self._by_tp: dict[TP, dict[int, int]] = {}

    def __contains__(self, tp: object) -> bool:
        return tp in self._by_tp

    def __bool__(self) -> bool:
        return bool(self._by_tp)

    def load(self, tp: TP, recorded: Mapping[int, Mapping[int, int]]) -> None:
        mine = {s: per[tp[1]] for s, per in recorded.items() if tp[1] in per}
        if mine:
            self._by_tp[tp] = mine
        else:
            self._by_tp.pop(tp, None)

    def forget(self, tp: TP) -> None:
        self._by_tp.pop(tp, None)

    def get(self, tp: TP, shard: int, default: int) -> int:
        per = self._by_tp.get(tp)
        if not per:
            return default
        return per.get(shard, min(per.values()))

    def set(self, tp: TP, shard: int, offset: int) -> None:
        self._by_tp.setdefault(tp, {})[shard] = int(offset)

    def resume(self, tp: TP) -> int:
        """Where reading ``tp`` must resume: the lowest shard record."""
        return min(self._by_tp[tp].values())


@dataclass
class _Batch:
    """A decoded micro-batch with, per decoded row, its partition, offset and shard."""

    decoded: Any
    tp_of: np.ndarray
    offsets: np.ndarray
    shards: np.ndarray
    tps: list[TP]
    ranges: dict[TP, OffsetRange]
    records: list[Any]
    excluded: np.ndarray  # decoded rows dead-lettered as overflow


@dataclass
class _Part:
    """One shard's part of a batch, and the decoded rows it carries."""

    batch: ShardBatch
    rows: np.ndarray
    step_positions: list[int]  # per step, its record's position in the batch (-1: adds)

    def landed_earlier(self, result: MergeResult) -> bool:
        """Refused only because a first attempt of this very call did apply (a retry)."""
        offsets = self.batch.offsets
        return bool(result.conflicts) and len(result.conflicts) == len(offsets) and all(
            tp in offsets and recorded == offsets[tp].end and offsets[tp].end > offsets[tp].start
            for tp, recorded in result.conflicts.items())
