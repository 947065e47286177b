"""No single event stops ingestion or poisons state (issue 10 item 5), end to end: poison pills
between good events go through the real broker to a real consumer process and Redis.

Each pill once crashed the consumer on every restart or turned a group's statistics into inf or
NaN: JSON nested 1,000 deep in an extra key (RecursionError in the decoder), a 10,000-digit
number, x = 1e200 (w x x overflows), weight 1e308 sent twice (n overflows), an event time in the
year 9999 (under half_life it aged every other row of its group to weight 0), and a refused
message of 900 KB (its base64 dead-letter record was larger than a message may be). The consumer
must end normally with each pill in the dead-letter topic under its reason, and the statistics
must equal one pass over the good events.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid

import msgspec
import numpy as np
from stream_helpers import (
    assert_stats_equal,
    make_events,
    read_all,
    read_topic,
    start_consumer,
    write_config,
)

from streamlme.config import load_config
from streamlme.stats import GroupStats
from streamlme.store.connect import open_store
from streamlme.stream.dlq import DeadLetterRecord
from streamlme.stream.publish import send_events

HALF_LIFE = 3600.0


def event(group: str, **fields: object) -> bytes:
    return msgspec.json.encode({"g": group, "x1": 1.0, "x2": 2.0, "y": 3.0, **fields})


def poison(ts: float) -> list[tuple[bytes, str]]:
    """(message, the reason code it must be dead-lettered with)."""
    deep = b"[" * 1000 + b"]" * 1000
    return [
        (event("grp-1", ts=ts)[:-1] + b',"extra":' + deep + b"}", "invalid_json"),
        (event("grp-1", ts=ts).replace(b'"x1":1.0', b'"x1":1' + b"0" * 10_000), "not_finite"),
        (event("grp-2", x1=1e200, ts=ts), "overflow"),
        (event("grp-3", weight=1e308, ts=ts), "overflow"),
        (event("grp-3", weight=1e308, ts=ts), "overflow"),
        (event("grp-4", ts="9999-12-31T23:59:59Z"), "bad_ts"),
        (event("grp-5", ts=ts, pad="p" * 900_000).replace(b'"y":3.0,', b""), "missing_column"),
        (b'{"g": "grp-\xff\xfe", "x1": 1, "x2": 2, "y": 3, "ts": ' + str(ts).encode() + b"}",
         "invalid_json"),
        (b"\x00" * 16, "invalid_json"),
        (b"[1, 2, 3]", "not_an_object"),
    ]


def test_poison_pills_are_dead_lettered_and_the_rest_equals_one_pass(
        tmp_path, kafka_bootstrap, kafka_topic, redis_url, namespace) -> None:
    ev = make_events(3_000, 40, seed=31)
    ts = time.time() - 86_400.0  # every good event at one past time: no decay between them
    names = [ev.spec.group, *ev.spec.columns]
    good = [(g.encode(), msgspec.json.encode({**dict(zip(names, [g, *row], strict=True)),
                                             "ts": ts}))
            for g, row in zip(ev.groups, ev.W.tolist(), strict=True)]
    bad = poison(ts)
    rng = np.random.default_rng(31)
    slots = dict(zip(rng.choice(len(good), len(bad), replace=False).tolist(), bad, strict=True))
    stream: list[tuple[bytes | None, bytes]] = []
    for i, message in enumerate(good):
        if i in slots:
            stream.append((None, slots[i][0]))
        stream.append(message)

    topic = kafka_topic(2)
    path = write_config(tmp_path / f"{uuid.uuid4().hex[:6]}.toml", ev.spec,
                        kafka={"bootstrap_servers": kafka_bootstrap, "topic": topic,
                               "group_id": f"g-{topic}", "batch_max_events": 500,
                               "batch_max_seconds": 0.3},
                        redis={"url": redis_url, "namespace": namespace})
    text = path.read_text()
    path.write_text(text.replace("[model]\n", f"[model]\nhalf_life = {HALF_LIFE}\n", 1))
    config = load_config(path)
    assert config.model.half_life == HALF_LIFE

    send_events(stream, topic, {"bootstrap_servers": kafka_bootstrap}, progress=False)
    log = tmp_path / "consumer.log"
    consumer = start_consumer(path, "--until-idle", "3", log_path=log)
    try:
        assert consumer.wait(180) == 0, log.read_text()[-3000:]
        report = json.loads(consumer.stdout.read())
    finally:
        if consumer.poll() is None:
            consumer.kill()
    assert "Traceback" not in log.read_text()
    assert report["events_read"] == len(stream)
    assert report["events_applied"] == len(good)
    assert report["events_rejected"] == len(bad)

    expected = GroupStats.from_rows(ev.groups, ev.W, ts=np.full(len(good), ts),
                                    half_life=HALF_LIFE)
    streamed = read_all(open_store(config))
    assert np.isfinite(streamed.n).all() and np.isfinite(streamed.C).all()
    assert_stats_equal(streamed, expected)
    assert streamed.n.sum() == len(good)  # no row aged away by the year-9999 event

    letters = read_topic(kafka_bootstrap, config.kafka.dead_letter_topic, len(bad))
    records = [msgspec.json.decode(m.value, type=DeadLetterRecord) for m in letters]
    assert len(records) == len(bad)
    assert all(r.topic == topic and r.code == r.reason.split(":")[0] for r in records)
    got = sorted((_fingerprint(r), r.code) for r in records)
    want = sorted((hashlib.sha256(value).hexdigest(), code) for value, code in bad)
    assert got == want
    big = [r for r in records if r.truncated]
    assert len(big) == 1 and big[0].value_length == len(bad[6][0])
    assert len(msgspec.json.encode(big[0])) <= config.kafka.max_message_bytes


def _fingerprint(record: DeadLetterRecord) -> str:
    """The sha256 of the value the record stands for (whole or cut to its prefix)."""
    if record.truncated:
        assert record.value_sha256 is not None
        return record.value_sha256
    return hashlib.sha256(record.value()).hexdigest()
