"""`streamlme publish`: send the rows of a CSV or JSON-lines file to the topic, one event each.

Each message is keyed by its level of the model's first grouping column (its group id in a
one-factor model), so Kafka's partitioner puts all of that level's events in one partition (in
order) — for nested factors, all the cells of an outer level. CSV cells become JSON numbers when
they read as numbers — except the grouping and categorical columns, which stay strings so that
``"007"`` and ``"7"`` remain different levels — and empty cells become ``null`` (the consumer
dead-letters such a row if it needs that column). A CSV must have every column the model reads.
JSON lines are sent byte for byte; a line that is not a JSON object with the key field is still
sent (unkeyed), so the consumer's dead-letter topic shows what was wrong with it.

Before anything is sent, `publish_config` (what ``streamlme publish`` runs) decodes every message
with the consumer's own `EventDecoder` and refuses the file (`BadRowsError`, naming the first
bad lines and why) when any row would be dead-lettered; ``check=False`` (``--no-check``) sends
it anyway. A broker that does not answer is a `PublishError` that names its address.

>>> list(csv_events(io.StringIO("g,x,y\\n007,1,2.5\\nb,,oops\\n"), "g"))
[(b'007', b'{"g":"007","x":1,"y":2.5}'), (b'b', b'{"g":"b","x":null,"y":"oops"}')]
>>> list(csv_events(io.StringIO("s,d,sex,y\\n01,7,1,2.5\\n"), "s", as_text=["s", "d", "sex"]))
[(b'01', b'{"s":"01","d":"7","sex":"1","y":2.5}')]
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import IO, TYPE_CHECKING, Any

import msgspec
from kafka import KafkaProducer
from kafka.errors import KafkaError
from tqdm import tqdm

from streamlme.events import EventDecoder, did_you_mean
from streamlme.spec import ModelSpec

if TYPE_CHECKING:
    from streamlme.config import Config

#: Producer settings for a backfill: large batches, a short linger, every replica acknowledges.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "linger_ms": 20,
    "batch_size": 512 * 1024,
    "max_request_size": 8 * 1024 * 1024,
}

Event = tuple[bytes | None, bytes]
#: An event and the line of the file it starts on (1 is the first line, a CSV's header).
NumberedEvent = tuple[int, bytes | None, bytes]
#: Rows decoded at a time by the check (memory stays flat for any file size).
CHECK_CHUNK = 10_000
#: Bad rows named in a refusal.
SHOWN_BAD_ROWS = 5


class PublishError(RuntimeError):
    """The broker did not answer, or did not take every event."""


class BadRowsError(ValueError):
    """A file refused before sending: some rows would be dead-lettered by the consumer."""


def _servers(settings: Mapping[str, Any]) -> str:
    servers = settings.get("bootstrap_servers", "localhost:9092")  # kafka-python's default
    return servers if isinstance(servers, str) else ",".join(servers)


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
    return ((key, value) for _, key, value in numbered_csv_events(text, group, as_text, required))


def numbered_csv_events(text: IO[str], group: str, as_text: Sequence[str] = (),
                        required: Sequence[str] = ()) -> Iterator[NumberedEvent]:
    """`csv_events` with the line each row starts on (the header is line 1)."""
    reader = csv.reader(text)
    header = next(reader, None)
    if header is None:
        return
    if group not in header:
        raise ValueError(f"the CSV has no group column {group!r}{did_you_mean(group, header)}; "
                         f"its columns are {header}")
    missing = [c for c in dict.fromkeys(required) if c not in header]
    if missing:
        named = ", ".join(f"{c!r}{did_you_mean(c, header)}" for c in missing)
        raise ValueError(f"the CSV has no column(s) {named}, which every event of the model "
                         f"needs; its columns are {header}")
    keep = {group, *as_text}
    strings = [name in keep for name in header]
    encode = msgspec.json.encode
    end = reader.line_num  # a quoted cell may span lines: a row starts after the last one
    for row in reader:
        start, end = end + 1, reader.line_num
        if not row:
            continue
        obj = {name: (cell if is_text else _number(cell))
               for name, is_text, cell in zip(header, strings, row, strict=False)}
        yield start, str(obj.get(group, "")).encode(), encode(obj)


def jsonl_events(lines: Iterable[bytes], group: str) -> Iterator[Event]:
    """(key, original line) per non-blank line; the key is None when no group id (level of
    the key column ``group``) can be read."""
    return ((key, value) for _, key, value in numbered_jsonl_events(lines, group))


def numbered_jsonl_events(lines: Iterable[bytes], group: str) -> Iterator[NumberedEvent]:
    """`jsonl_events` with each line's number (from 1, blank lines counted)."""
    decode = msgspec.json.decode
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            continue
        key = None
        try:
            obj = decode(line)
        except (msgspec.DecodeError, RecursionError):  # the consumer dead-letters such a line
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get(group), (str, int)):
            key = str(obj[group]).encode()
        yield number, key, line


def file_events(fh: IO[bytes], path: str, group: str, as_text: Sequence[str] = (),
                required: Sequence[str] = ()) -> Iterator[NumberedEvent]:
    """The numbered events of an open ``.csv`` or ``.jsonl``/``.json``/``.ndjson`` file."""
    lower = path.lower()
    if lower.endswith(".csv"):
        return numbered_csv_events(io.TextIOWrapper(fh, encoding="utf-8", newline=""), group,
                                   as_text, required)
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return numbered_jsonl_events(fh, group)
    raise ValueError(f"{path}: expected a .csv or .jsonl file")


def check_events(events: Iterable[NumberedEvent], decoder: EventDecoder,
                 name: str = "the file", progress: bool = False) -> int:
    """Decode every event as the consumer would; returns how many there are, or raises
    `BadRowsError` naming the first `SHOWN_BAD_ROWS` bad lines and the count per reason."""
    total, codes = 0, Counter[str]()
    shown: list[str] = []
    events = iter(events)
    with tqdm(desc=f"check {name}", unit="ev", disable=not progress, mininterval=0.5) as bar:
        while chunk := list(islice(events, CHECK_CHUNK)):
            total += len(chunk)
            bar.update(len(chunk))
            for rejection in decoder.decode([value for _, _, value in chunk]).rejections:
                codes[rejection.code] += 1
                if len(shown) < SHOWN_BAD_ROWS:
                    shown.append(f"line {chunk[rejection.index][0]}: {rejection.reason}")
    if codes:
        bad = sum(codes.values())
        counts = ", ".join(f"{code} {n}" for code, n in codes.most_common())
        raise BadRowsError(
            f"{name}: {bad} of {total} rows would be dead-lettered by the consumer ({counts}), "
            f"nothing was sent; {'; '.join(shown)}{'; ...' if bad > len(shown) else ''}; fix "
            "the file or the model's columns, or pass --no-check to send it anyway"
        )
    return total


def publish_file(
    path: str | os.PathLike[str],
    topic: str,
    group: str,
    settings: Mapping[str, Any],
    progress: bool = True,
    *,
    as_text: Sequence[str] = (),
    required: Sequence[str] = (),
    decoder: EventDecoder | None = None,
) -> int:
    """Send every row of a ``.csv`` or ``.jsonl``/``.json``/``.ndjson`` file; returns the count.

    Messages are keyed by column ``group``; ``as_text`` and ``required`` are as in `csv_events`
    (`spec_columns` gives all three for a model). ``settings`` are KafkaProducer keyword
    arguments (at least ``bootstrap_servers``). With a ``decoder`` every row is first checked
    with it (`check_events`), and nothing is sent unless all of them pass.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    if decoder is not None:
        with open(path, "rb") as fh:
            check_events(file_events(fh, path, group, as_text, required), decoder, name,
                         progress)
    with open(path, "rb") as fh:
        events = ((key, value) for _, key, value in
                  file_events(fh, path, group, as_text, required))
        return send_events(events, topic, settings, progress=progress, desc=name)


def publish_config(config: Config, path: str | os.PathLike[str], progress: bool = True,
                   check: bool = True) -> int:
    """``streamlme publish``: send a file's rows to the configured topic, keyed by the model's
    first grouping column; with ``check``, only if the consumer would take every row (decoded
    as `stream.app.make_ingestor`'s decoder does). Returns how many were sent."""
    from streamlme.config import ConfigError

    if config.kafka is None:
        raise ConfigError([f"{config.source}: kafka: publish needs a [kafka] section"])
    k = config.kafka
    decoder = (EventDecoder(config.spec, k.max_message_bytes, max_future=config.model.max_future)
               if check else None)
    columns = spec_columns(config.spec)
    return publish_file(path, k.topic, columns.pop("group"), k.producer_kwargs(), progress,
                        decoder=decoder, **columns)


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
    """Send (key, value) pairs to ``topic``, flush, and raise PublishError if any failed or
    the broker did not answer (within ``bootstrap_timeout_ms`` / ``max_block_ms``)."""
    where = _servers(settings)
    try:
        producer = KafkaProducer(**{**PRODUCER_DEFAULTS, **settings})
    except KafkaError as exc:
        raise PublishError(f"Kafka at {where} did not answer ({exc}); start the broker or fix "
                           "[kafka] bootstrap_servers") from exc
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
    except KafkaError as exc:  # no metadata for the topic in time: the broker went, or no topic
        raise PublishError(f"Kafka at {where} did not take events for topic {topic!r} ({exc}); "
                           "check the broker is up and the topic exists") from exc
    finally:
        producer.close()
    if failures:
        raise PublishError(
            f"{len(failures)} of {count} events were not accepted by the broker "
            f"(first error: {failures[0]}); check the topic exists and the broker is up"
        )
    return count
