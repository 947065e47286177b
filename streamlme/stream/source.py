"""Where events come from: a Kafka consumer group, or a JSON-lines file / stdin (embedded mode).

Both kinds of source look the same to the ingest loop (`streamlme.stream.consumer`): `poll`
returns records grouped by (topic, partition), each record carrying ``offset``, ``key`` and
``value``; the loop records the offsets it applied in the store and `seek`\\ s back to them
when a merge is refused. A JSON-lines file is one pseudo partition ``("file:<path>", 0)`` whose
offsets are line numbers, so a restart on the same file resumes where the store says it stopped.
stdin cannot be re-read, so it records no offsets.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, NamedTuple, Protocol

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

log = logging.getLogger(__name__)

#: (topic, partition); kafka-python's TopicPartition is a namedtuple and compares equal to it.
TP = tuple[str, int]
#: Called with the partitions a source was given / is about to lose.
PartitionsCallback = Callable[[list[TP]], None]


class Line(NamedTuple):
    """One line of a JSON-lines input, shaped like a Kafka record."""

    offset: int
    key: bytes | None
    value: bytes


class Source(Protocol):
    """A partitioned, replayable (or not) stream of records."""

    #: Whether offsets identify records across restarts (False for stdin).
    replayable: bool

    def open(self, on_assigned: PartitionsCallback, on_revoked: PartitionsCallback) -> None: ...

    def poll(self, timeout: float, max_records: int) -> Mapping[TP, list[Any]]: ...

    def seek(self, tp: TP, offset: int) -> None: ...

    def commit(self, offsets: Mapping[TP, int],
               metadata: Mapping[TP, str] | None = None) -> None: ...

    def committed(self, tp: TP) -> tuple[int, str] | None:
        """The group's committed (offset, metadata) of ``tp``; None if it committed none."""
        ...

    def bounds(self, tps: list[TP]) -> dict[TP, tuple[int, int]]:
        """Per partition, (beginning, end) offsets: the log start, and the log end."""
        ...

    def partitions(self) -> list[TP]:
        """Every partition of the source's topic."""
        ...

    def assignment(self) -> set[TP]: ...

    def exhausted(self) -> bool:
        """True when no record will ever come again (end of a file)."""
        ...

    def lag(self) -> int | None: ...

    def partition_lags(self) -> dict[TP, int]:
        """Messages behind the log end per assigned partition, where known."""
        ...

    def close(self) -> None: ...


class JsonLinesSource:
    """A JSON-lines file (or ``"-"`` for stdin) as a single pseudo partition.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
    ...     _ = f.write('{"g": "a"}\\n\\n{"g": "b"}\\n')
    >>> src = JsonLinesSource(f.name)
    >>> src.open(lambda tps: None, lambda tps: None)
    >>> [(r.offset, r.value) for r in src.poll(0, 10)[src.tp]]
    [(0, b'{"g": "a"}'), (2, b'{"g": "b"}')]
    >>> src.exhausted()
    True
    """

    def __init__(self, path: str | os.PathLike[str], stream: IO[bytes] | None = None) -> None:
        path = os.fspath(path)
        self.replayable = path != "-"
        self.tp: TP = ("stdin", 0) if not self.replayable else ("file:" + os.path.abspath(path), 0)
        self._path = path
        self._stream = stream
        self._file: IO[bytes] | None = None
        self._line = 0
        self._eof = False

    @property
    def topic(self) -> str:
        return self.tp[0]

    def open(self, on_assigned: PartitionsCallback, on_revoked: PartitionsCallback) -> None:
        if self._stream is not None:
            self._file = self._stream
        elif self.replayable:
            self._file = open(self._path, "rb")  # noqa: SIM115 - closed in close()
        else:
            self._file = sys.stdin.buffer
        on_assigned([self.tp])

    def seek(self, tp: TP, offset: int) -> None:
        """Skip forward to line ``offset`` (a file is only ever resumed forward)."""
        if not self.replayable:
            raise ValueError("stdin cannot seek; give a file to resume")
        assert self._file is not None
        if offset < self._line:
            self._file.seek(0)
            self._line = 0
            self._eof = False
        while self._line < offset:
            if not self._file.readline():
                self._eof = True
                break
            self._line += 1

    def poll(self, timeout: float, max_records: int) -> dict[TP, list[Line]]:
        assert self._file is not None
        out: list[Line] = []
        readline = self._file.readline
        while len(out) < max_records:
            raw = readline()
            if not raw:
                self._eof = True
                break
            value = raw.rstrip(b"\r\n")
            if value.strip():
                out.append(Line(self._line, None, value))
            self._line += 1
        return {self.tp: out} if out else {}

    def commit(self, offsets: Mapping[TP, int],
               metadata: Mapping[TP, str] | None = None) -> None:
        """Nothing to do: the store's recorded offsets are the resume point."""

    def committed(self, tp: TP) -> tuple[int, str] | None:
        return None

    def bounds(self, tps: list[TP]) -> dict[TP, tuple[int, int]]:
        """A file's lines start at 0 and its end is not known ahead (0: nothing to wait for)."""
        return {tp: (0, 0) for tp in tps}

    def partitions(self) -> list[TP]:
        return [self.tp]

    def assignment(self) -> set[TP]:
        return {self.tp}

    def exhausted(self) -> bool:
        return self._eof

    def lag(self) -> int | None:
        return None

    def partition_lags(self) -> dict[TP, int]:
        return {}

    def close(self) -> None:
        if self._file is not None and self._stream is None and self.replayable:
            self._file.close()
        self._file = None


class _Listener(ConsumerRebalanceListener):
    def __init__(self, on_assigned: PartitionsCallback, on_revoked: PartitionsCallback) -> None:
        self._assigned, self._revoked = on_assigned, on_revoked

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._revoked([(tp.topic, tp.partition) for tp in revoked])

    def on_partitions_assigned(self, assigned: Any) -> None:
        self._assigned([(tp.topic, tp.partition) for tp in assigned])


#: Consumer settings streamlme chooses; a [kafka] client section may override any of them.
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    # A join takes ~3 s with these, ~23 s with kafka-python's defaults.
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "fetch_max_wait_ms": 100,
    "max_partition_fetch_bytes": 4 * 1024 * 1024,
}


class KafkaSource:
    """One topic read by a kafka-python consumer in a consumer group."""

    replayable = True

    def __init__(self, topic: str, settings: Mapping[str, Any]) -> None:
        """``settings`` are KafkaConsumer keyword arguments (bootstrap_servers, group_id, ...);
        they override `CONSUMER_DEFAULTS`."""
        self.topic = topic
        self._settings = {**CONSUMER_DEFAULTS, **settings, "enable_auto_commit": False}
        self._consumer: KafkaConsumer | None = None

    @property
    def consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("the Kafka source is not open; call open() first")
        return self._consumer

    def open(self, on_assigned: PartitionsCallback, on_revoked: PartitionsCallback) -> None:
        self._consumer = KafkaConsumer(**self._settings)
        self._consumer.subscribe([self.topic], listener=_Listener(on_assigned, on_revoked))

    def poll(self, timeout: float, max_records: int) -> Mapping[TP, list[Any]]:
        return self.consumer.poll(timeout_ms=int(timeout * 1000), max_records=max_records)

    def seek(self, tp: TP, offset: int) -> None:
        self.consumer.seek(TopicPartition(*tp), offset)

    def commit(self, offsets: Mapping[TP, int],
               metadata: Mapping[TP, str] | None = None) -> None:
        """Commit ``offsets`` with per-partition ``metadata`` (the consumer's: the namespace
        epoch it folded into and where it started, so that a store that lost its state is told
        apart from a new one)."""
        metadata = metadata or {}
        self.consumer.commit({TopicPartition(*tp): OffsetAndMetadata(off, metadata.get(tp, ""), -1)
                              for tp, off in offsets.items()})

    def committed(self, tp: TP) -> tuple[int, str] | None:
        got = self.consumer.committed(TopicPartition(*tp), metadata=True)
        if got is None or got.offset is None or got.offset < 0:
            return None
        return int(got.offset), got.metadata or ""

    def bounds(self, tps: list[TP]) -> dict[TP, tuple[int, int]]:
        parts = [TopicPartition(*tp) for tp in tps]
        begin = self.consumer.beginning_offsets(parts)
        end = self.consumer.end_offsets(parts)
        return {(tp.topic, tp.partition): (int(begin[tp]), int(end[tp])) for tp in parts}

    def partitions(self) -> list[TP]:
        found = self.consumer.partitions_for_topic(self.topic) or set()
        return [(self.topic, p) for p in sorted(found)]

    def assignment(self) -> set[TP]:
        if self._consumer is None:
            return set()
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def exhausted(self) -> bool:
        return False

    def lag(self) -> int | None:
        """Messages behind the log end, from the last fetch (None when unknown)."""
        if self._consumer is None:
            return None
        lags = self.partition_lags()
        if len(lags) < len(self._consumer.assignment()):
            return None
        return sum(lags.values())

    def partition_lags(self) -> dict[TP, int]:
        """Per assigned partition whose log end the last fetch reported."""
        if self._consumer is None:
            return {}
        out: dict[TP, int] = {}
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is not None:
                position = self._consumer.position(tp, timeout_ms=1000)
                out[(tp.topic, tp.partition)] = max(high - position, 0)
        return out

    def close(self) -> None:
        if self._consumer is not None:
            start = time.monotonic()
            self._consumer.close(autocommit=False)
            log.debug("Kafka consumer closed in %.2fs", time.monotonic() - start)
            self._consumer = None
