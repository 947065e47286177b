"""`streamlme publish`: send the rows of a CSV or JSON-lines file to the topic, one event each.

Each message is keyed by its level of the model's first grouping column (its group id in a
one-factor model), so Kafka's partitioner puts all of that level's events in one partition (in
order) — for nested factors, all the cells of an outer level. CSV cells become JSON numbers when
they read as numbers — except the grouping and categorical columns, which stay strings so that
``"007"`` and ``"7"`` remain different levels — and empty cells become ``null`` (the consumer
dead-letters such a row if it needs that column). A CSV must have every column the model reads.
JSON lines are sent byte for byte; a line that is not a JSON object with the key field is still
sent (unkeyed), so the consumer's dead-letter topic shows what was wrong with it.

>>> list(csv_events(io.StringIO("g,x,y\\n007,1,2.5\\nb,,oops\\n"), "g"))
[(b'007', b'{"g":"007","x":1,"y":2.5}'), (b'b', b'{"g":"b","x":null,"y":"oops"}')]
>>> list(csv_events(io.StringIO("s,d,sex,y\\n01,7,1,2.5\\n"), "s", as_text=["s", "d", "sex"]))
[(b'01', b'{"s":"01","d":"7","sex":"1","y":2.5}')]
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

import msgspec
from kafka import KafkaProducer
from tqdm import tqdm

from streamlme.spec import ModelSpec

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


def csv_events(text: IO[str], group: str, as_text: Sequence[str] = (),
               required: Sequence[str] = ()) -> Iterator[Event]:
    """(key, JSON value) per CSV row: keyed by column ``group``, whose cells stay strings, as
    do those of the ``as_text`` columns. ValueError if the header lacks ``group`` or a
    ``required`` column."""
    reader = csv.reader(text)
    header = next(reader, None)
    if header is None:
        return
    if group not in header:
        raise ValueError(f"the CSV has no group column {group!r}; its columns are {header}")
    missing = [c for c in dict.fromkeys(required) if c not in header]
    if missing:
        raise ValueError(f"the CSV has no column(s) {', '.join(map(repr, missing))}, which every "
                         f"event of the model needs; its columns are {header}")
    keep = {group, *as_text}
    strings = [name in keep for name in header]
    encode = msgspec.json.encode
    for row in reader:
        if not row:
            continue
        obj = {name: (cell if is_text else _number(cell))
               for name, is_text, cell in zip(header, strings, row, strict=False)}
        yield str(obj.get(group, "")).encode(), encode(obj)


def jsonl_events(lines: Iterable[bytes], group: str) -> Iterator[Event]:
    """(key, original line) per non-blank line; the key is None when no group id (level of
    the key column ``group``) can be read."""
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
    *,
    as_text: Sequence[str] = (),
    required: Sequence[str] = (),
) -> int:
    """Send every row of a ``.csv`` or ``.jsonl``/``.json``/``.ndjson`` file; returns the count.

    Messages are keyed by column ``group``; ``as_text`` and ``required`` are as in `csv_events`
    (`spec_columns` gives all three for a model). ``settings`` are KafkaProducer keyword
    arguments (at least ``bootstrap_servers``).
    """
    path = os.fspath(path)
    lower = path.lower()
    with open(path, "rb") as fh:
        if lower.endswith(".csv"):
            events = csv_events(io.TextIOWrapper(fh, encoding="utf-8", newline=""), group,
                                as_text, required)
        elif lower.endswith((".jsonl", ".json", ".ndjson")):
            events = jsonl_events(fh, group)
        else:
            raise ValueError(f"{path}: expected a .csv or .jsonl file")
        return send_events(events, topic, settings, progress=progress, desc=os.path.basename(path))


def spec_columns(spec: ModelSpec) -> dict[str, Any]:
    """`publish_file` arguments for a model: the key column (the first grouping column), the
    columns kept as text (grouping and categorical) and the columns every row needs.

    >>> from streamlme.spec import ModelSpec
    >>> spec_columns(ModelSpec.from_formula('y ~ x + C(sex, levels=["F", "M"]) + (1 | s/d)'))
    {'group': 's', 'as_text': ('s', 'd', 'sex'), 'required': ('s', 'd', 'sex', 'x', 'y')}
    """
    return {"group": spec.grouping_columns[0],
            "as_text": (*spec.grouping_columns, *spec.categorical_inputs),
            "required": spec.input_columns}


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
