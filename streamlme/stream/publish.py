"""`streamlme publish`: send the rows of a CSV or JSON-lines file to the topic, one event each.

Each message is keyed by its group id, so Kafka's partitioner puts all of a group's events in one
partition (in order). CSV cells become JSON numbers when they read as numbers — except the group
column, which stays a string so that ``"007"`` and ``"7"`` remain different groups — and empty
cells become ``null`` (the consumer dead-letters such a row if it needs that column). JSON lines
are sent byte for byte; a line that is not a JSON object with the group field is still sent
(unkeyed), so the consumer's dead-letter topic shows what was wrong with it.

>>> list(csv_events(io.StringIO("g,x,y\\n007,1,2.5\\nb,,oops\\n"), "g"))
[(b'007', b'{"g":"007","x":1,"y":2.5}'), (b'b', b'{"g":"b","x":null,"y":"oops"}')]
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

import msgspec
from kafka import KafkaProducer
from tqdm import tqdm

#: Producer settings for a backfill: large batches, a short linger, every replica acknowledges.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "linger_ms": 20,
    "batch_size": 512 * 1024,
    "max_request_size": 8 * 1024 * 1024,
}

Event = tuple[bytes | None, bytes]


class PublishError(RuntimeError):
    """The broker did not take every event."""


def _number(cell: str) -> Any:
    if cell == "":
        return None
    try:
        return int(cell)
    except ValueError:
        pass
    try:
        return float(cell)
    except ValueError:
        return cell


def csv_events(text: IO[str], group: str) -> Iterator[Event]:
    """(key, JSON value) per CSV row."""
    reader = csv.reader(text)
    header = next(reader, None)
    if header is None:
        return
    if group not in header:
        raise ValueError(f"the CSV has no group column {group!r}; its columns are {header}")
    gi = header.index(group)
    encode = msgspec.json.encode
    for row in reader:
        if not row:
            continue
        obj = {name: (cell if i == gi else _number(cell))
               for i, (name, cell) in enumerate(zip(header, row, strict=False))}
        yield str(obj.get(group, "")).encode(), encode(obj)


def jsonl_events(lines: Iterable[bytes], group: str) -> Iterator[Event]:
    """(key, original line) per non-blank line; the key is None when no group id can be read."""
    decode = msgspec.json.decode
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            continue
        key = None
        try:
            obj = decode(line)
        except msgspec.DecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get(group), (str, int)):
            key = str(obj[group]).encode()
        yield key, line


def publish_file(
    path: str | os.PathLike[str],
    topic: str,
    group: str,
    settings: Mapping[str, Any],
    progress: bool = True,
) -> int:
    """Send every row of a ``.csv`` or ``.jsonl``/``.json``/``.ndjson`` file; returns the count.

    ``settings`` are KafkaProducer keyword arguments (at least ``bootstrap_servers``).
    """
    path = os.fspath(path)
    lower = path.lower()
    with open(path, "rb") as fh:
        if lower.endswith(".csv"):
            events = csv_events(io.TextIOWrapper(fh, encoding="utf-8", newline=""), group)
        elif lower.endswith((".jsonl", ".json", ".ndjson")):
            events = jsonl_events(fh, group)
        else:
            raise ValueError(f"{path}: expected a .csv or .jsonl file")
        return send_events(events, topic, settings, progress=progress, desc=os.path.basename(path))


def send_events(
    events: Iterable[Event],
    topic: str,
    settings: Mapping[str, Any],
    progress: bool = True,
    desc: str = "publish",
) -> int:
    """Send (key, value) pairs to ``topic``, flush, and raise PublishError if any failed."""
    producer = KafkaProducer(**{**PRODUCER_DEFAULTS, **settings})
    failures: list[BaseException] = []
    count = 0
    try:
        with tqdm(desc=desc, unit="ev", disable=not progress, mininterval=0.5) as bar:
            send = producer.send
            for key, value in events:
                send(topic, key=key, value=value).add_errback(failures.append)
                count += 1
                if count % 2000 == 0:
                    bar.update(2000)
            bar.update(count % 2000)
            producer.flush()
    finally:
        producer.close()
    if failures:
        raise PublishError(
            f"{len(failures)} of {count} events were not accepted by the broker "
            f"(first error: {failures[0]}); check the topic exists and the broker is up"
        )
    return count
