"""Dead letters: events the consumer refuses, kept with their original bytes and a reason.

A dead-letter record is a JSON object

    {"reason": "missing_column: y", "code": "missing_column", "topic": "...", "partition": 0,
     "offset": 17,
     "value_b64": "<original bytes, base64>", "key_b64": "<original key, base64 or null>"}

keyed by the original key, with the reason also in the ``streamlme-reason`` header. The
``code`` is the reason's stable first word (see `streamlme.events`); counts are kept per code.

When the record with the whole value would not fit a message (the producer's
``max_request_size``, the topic's ``[kafka] max_message_bytes``), it keeps the value's prefix
that fits, with ``value_length`` (the whole value's bytes) and ``value_sha256``, and
``truncated`` true: a refused message of any size is dead-lettered, never a poison pill.

Ordering guarantee: the consumer flushes dead letters of a batch *before* it merges the batch
into the store. A crash can therefore at worst send a dead letter twice (the batch is replayed),
never lose one. A retraction the store refuses because it exceeds its group
(``retract_exceeds_group``) is only known in the merge: the merge keeps its dead-letter record
in the store, atomically with the batch, and the consumer sends it from there and then deletes
exactly what it sent (also after a crash, when it starts again).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any, Protocol

import msgspec
from kafka import KafkaProducer

log = logging.getLogger(__name__)

REASON_HEADER = "streamlme-reason"
#: The reason given to retractions the store refused because they exceed the group's mass.
RETRACT_EXCEEDS_GROUP = "retract_exceeds_group"


def reason_code(reason: str) -> str:
    """The stable code of a reason: ``"missing_column: y"`` -> ``"missing_column"``."""
    return reason.split(":", 1)[0]


class DeadLetterError(RuntimeError):
    """Dead letters the broker did not acknowledge; they are re-sent on the next flush."""


class DeadLetterRecord(msgspec.Struct):
    """The value of one dead-letter message."""

    reason: str
    code: str
    topic: str
    partition: int
    offset: int
    value_b64: str
    key_b64: str | None = None
    truncated: bool = False
    value_length: int | None = None
    value_sha256: str | None = None

    def value(self) -> bytes:
        """The original value (its prefix when ``truncated``)."""
        return base64.b64decode(self.value_b64)

    def key(self) -> bytes | None:
        return None if self.key_b64 is None else base64.b64decode(self.key_b64)


#: Bytes a dead-letter message needs beyond its value: key, headers, record batch framing.
MESSAGE_OVERHEAD = 1024


def encode_dead_letter(
    reason: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes,
    max_bytes: int | None = None,
) -> bytes:
    """The JSON value of a dead-letter message, at most ``max_bytes`` long (the value cut to a
    prefix, with its length and sha256, when the whole would not fit).

    >>> raw = encode_dead_letter("invalid_json", "ev", 2, 9, b"k", b"{oops")
    >>> rec = msgspec.json.decode(raw, type=DeadLetterRecord)
    >>> rec.reason, rec.partition, rec.offset, rec.value(), rec.truncated
    ('invalid_json', 2, 9, b'{oops', False)
    >>> raw = encode_dead_letter("too_large", "ev", 0, 1, None, b"x" * 5000, max_bytes=2000)
    >>> rec = msgspec.json.decode(raw, type=DeadLetterRecord)
    >>> len(raw) <= 2000, rec.truncated, rec.value_length, rec.value() == b"x" * len(rec.value())
    (True, True, 5000, True)
    """
    b64 = base64.b64encode
    key_b64 = None if key is None else b64(key).decode()
    record = DeadLetterRecord(reason, reason_code(reason), topic, partition, offset,
                              b64(value).decode(), key_b64)
    raw = msgspec.json.encode(record)
    if max_bytes is None or len(raw) <= max_bytes:
        return raw
    cut = DeadLetterRecord(reason, reason_code(reason), topic, partition, offset, "", key_b64,
                           True, len(value), hashlib.sha256(value).hexdigest())
    room = max_bytes - len(msgspec.json.encode(cut))
    if room < 0:
        raise ValueError(f"a dead-letter record of {topic}:{partition}:{offset} cannot fit "
                         f"{max_bytes} bytes even without its value (its key is too long)")
    prefix = value[:room // 4 * 3]  # base64 turns 3 bytes into 4 characters
    return msgspec.json.encode(
        DeadLetterRecord(reason, reason_code(reason), topic, partition, offset,
                         b64(prefix).decode(), key_b64, True, len(value),
                         hashlib.sha256(value).hexdigest()))


class DeadLetters(Protocol):
    """A sink for refused events; `flush` returns only once every one is safely stored."""

    counts: Counter[str]

    def add(
        self, reason: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes
    ) -> None: ...

    def add_record(self, record: bytes) -> None:
        """Send an already encoded dead-letter record (one the store kept)."""
        ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class KafkaDeadLetters:
    """Dead letters sent to a Kafka topic; `flush` raises if the broker did not take them all."""

    def __init__(
        self, topic: str, settings: Mapping[str, Any], flush_timeout: float = 30.0,
        max_message_bytes: int | None = None,
    ) -> None:
        """``settings`` are KafkaProducer keyword arguments (bootstrap_servers, security, ...);
        a record never exceeds the producer's ``max_request_size`` nor ``max_message_bytes``."""
        self.topic = topic
        self.counts: Counter[str] = Counter()
        self._flush_timeout = flush_timeout
        self._producer = KafkaProducer(**{"acks": "all", "linger_ms": 5, **settings})
        limit = int(self._producer.config["max_request_size"])
        if max_message_bytes is not None:
            limit = min(limit, int(max_message_bytes))
        #: Longest dead-letter record (JSON) sent; longer ones keep a prefix of the value.
        self.max_record_bytes = max(limit - MESSAGE_OVERHEAD, MESSAGE_OVERHEAD)
        self._pending: list[tuple[tuple[bytes | None, bytes, str], Any]] = []

    def encode(self, reason: str, topic: str, partition: int, offset: int, key: bytes | None,
               value: bytes) -> bytes:
        """The record `add` would send (what a merge keeps for a refused retraction)."""
        return encode_dead_letter(reason, topic, partition, offset, key, value,
                                  self.max_record_bytes)

    def add(
        self, reason: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes
    ) -> None:
        message = (key, self.encode(reason, topic, partition, offset, key, value), reason)
        self._pending.append((message, self._send(message)))
        self.counts[reason_code(reason)] += 1

    def add_record(self, record: bytes) -> None:
        rec = msgspec.json.decode(record, type=DeadLetterRecord)
        message = (rec.key(), record, rec.reason)
        self._pending.append((message, self._send(message)))
        self.counts[rec.code] += 1

    def _send(self, message: tuple[bytes | None, bytes, str]) -> Any:
        key, value, reason = message
        return self._producer.send(
            self.topic, key=key, value=value, headers=[(REASON_HEADER, reason.encode())]
        )

    def flush(self) -> None:
        if not self._pending:
            return
        self._producer.flush(timeout=self._flush_timeout)
        failed: list[tuple[tuple[bytes | None, bytes, str], Any]] = []
        error: Exception | None = None
        for message, future in self._pending:
            try:
                future.get(timeout=0)
            except Exception as exc:  # any delivery error: send again on the next flush
                error = error or exc
                failed.append((message, self._send(message)))
        self._pending = failed
        if error is not None:
            # The caller must not merge the batch until its dead letters are stored.
            raise DeadLetterError(
                f"{len(failed)} dead letter(s) not delivered to {self.topic!r}: {error}"
            ) from error

    def close(self) -> None:
        self._producer.close(timeout=self._flush_timeout)


class LoggedDeadLetters:
    """Embedded mode without Kafka: refused events are only counted (and logged by reason)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(
        self, reason: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes
    ) -> None:
        self.counts[reason_code(reason)] += 1

    def encode(self, reason: str, topic: str, partition: int, offset: int, key: bytes | None,
               value: bytes) -> bytes:
        return encode_dead_letter(reason, topic, partition, offset, key, value)

    def add_record(self, record: bytes) -> None:
        self.counts[msgspec.json.decode(record, type=DeadLetterRecord).code] += 1

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        """Nothing to release."""


class FileDeadLetters:
    """Embedded mode: refused events appended to a JSON-lines file, one dead-letter record a line.

    `flush` writes and fsyncs, so the same ordering guarantee as the Kafka topic holds.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "dead.jsonl")
    >>> dlq = FileDeadLetters(path)
    >>> dlq.add("not_an_object: got array", "file:events.jsonl", 0, 7, None, b"[1]")
    >>> dlq.flush(); dlq.close()
    >>> rec = msgspec.json.decode(open(path, "rb").readline(), type=DeadLetterRecord)
    >>> rec.code, rec.offset, rec.value()
    ('not_an_object', 7, b'[1]')
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.counts: Counter[str] = Counter()
        self._pending: list[bytes] = []
        self._file = open(self.path, "ab")  # noqa: SIM115 - held for the consumer's lifetime

    def add(
        self, reason: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes
    ) -> None:
        self._pending.append(self.encode(reason, topic, partition, offset, key, value))
        self.counts[reason_code(reason)] += 1

    def encode(self, reason: str, topic: str, partition: int, offset: int, key: bytes | None,
               value: bytes) -> bytes:
        return encode_dead_letter(reason, topic, partition, offset, key, value)

    def add_record(self, record: bytes) -> None:
        self._pending.append(record)
        self.counts[msgspec.json.decode(record, type=DeadLetterRecord).code] += 1

    def flush(self) -> None:
        if not self._pending:
            return
        self._file.write(b"".join(line + b"\n" for line in self._pending))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._pending = []

    def close(self) -> None:
        self.flush()
        self._file.close()
