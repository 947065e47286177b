"""Dead letters against a real broker and Redis: a refused retraction's dead letter survives a
crash right after the merge; a refused message of more than 1 MB still fits the dead-letter
topic; values that would overflow a statistic are dead-lettered as ``overflow`` and ingestion
goes on, with every statistic finite."""

from __future__ import annotations

import hashlib
import json
import uuid

import msgspec
import numpy as np
from kafka import KafkaProducer
from stream_helpers import read_all, read_topic, write_config

from streamlme.config import load_config
from streamlme.spec import ModelSpec
from streamlme.stats import GroupStats
from streamlme.store.base import OffsetRange
from streamlme.store.connect import open_store
from streamlme.store.redis import RedisStore
from streamlme.stream.app import make_ingestor, run_consume
from streamlme.stream.dlq import DeadLetterRecord

SPEC = ModelSpec(response="y", fixed=["1", "x"], random=["1"], group="g")
GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


class Crash(BaseException):
    """The process dying: nothing after it runs (not an error any retry would catch)."""


class CrashAfterRefusal(RedisStore):
    """A real RedisStore whose process dies right after a merge that refused a retraction."""

    def merge_shards(self, parts, half_life=None):
        results = super().merge_shards(parts, half_life)
        if any(r.refused_steps for r in results.values()):
            raise Crash
        return results


def configure(tmp_path, bootstrap, topic, redis_url, namespace, **kafka):
    path = write_config(tmp_path / f"{uuid.uuid4().hex[:6]}.toml", SPEC,
                        kafka={"bootstrap_servers": bootstrap, "topic": topic,
                               "group_id": f"g-{topic}", "batch_max_events": 10_000,
                               "batch_max_seconds": 1.0, **kafka},
                        client=GROUP, redis={"url": redis_url, "namespace": namespace,
                                             "shards": 4})
    return load_config(path, env={})


def send(bootstrap, topic, values, **settings):
    producer = KafkaProducer(bootstrap_servers=bootstrap, **settings)
    for value in values:
        producer.send(topic, value if isinstance(value, bytes) else json.dumps(value).encode(),
                      key=b"k", partition=0)
    producer.flush()
    producer.close()


def letters(bootstrap, topic, count):
    return [msgspec.json.decode(m.value, type=DeadLetterRecord)
            for m in read_topic(bootstrap, topic, count)]


def test_a_refused_retraction_survives_a_crash_right_after_the_merge(
        tmp_path, kafka_bootstrap, kafka_topic, redis_url, namespace) -> None:
    topic = kafka_topic(1)
    config = configure(tmp_path, kafka_bootstrap, topic, redis_url, namespace)
    kafka_topic_dlq = config.kafka.dead_letter_topic
    row = {"g": "one", "x": 1.0, "y": 2.0}
    send(kafka_bootstrap, topic, [row, {**row, "op": "retract"}, {**row, "op": "retract"},
                                  {"g": "other", "x": 0.0, "y": 1.0}])
    crashing = CrashAfterRefusal(redis_url, namespace, columns=SPEC.columns, shards=4)
    try:
        make_ingestor(config, crashing).run(until_idle=3)
        raise AssertionError("the store should have crashed the consumer")
    except Crash:
        pass
    store = open_store(config)
    assert store.get("one").n.tolist() == [0.0], "the merge landed before the crash"
    assert sum(len(v) for v in store.dead_letters().values()) == 1
    report = run_consume(config, until_idle=2)  # a restart drains what the merge kept
    assert report.rejected == {"retract_exceeds_group": 1}
    (letter,) = letters(kafka_bootstrap, kafka_topic_dlq, 1)
    assert (letter.code, letter.offset, json.loads(letter.value())) == (
        "retract_exceeds_group", 2, {**row, "op": "retract"})
    assert store.dead_letters() == {}
    assert store.get("other").n.tolist() == [1.0]


def test_a_refused_message_over_1mb_is_dead_lettered_with_prefix_length_and_sha256(
        tmp_path, kafka_bootstrap, kafka_topic, redis_url, namespace) -> None:
    topic = kafka_topic(1)
    config = configure(tmp_path, kafka_bootstrap, topic, redis_url, namespace)
    huge = json.dumps({"g": "a", "x": 1.0, "y": 2.0, "pad": "z" * 1_300_000}).encode()
    send(kafka_bootstrap, topic, [huge, {"g": "a", "x": 1.0, "y": 2.0}],
         max_request_size=4 << 20)
    report = run_consume(config, until_idle=2)
    assert report.events_read == 2 and report.events_applied == 1
    (letter,) = letters(kafka_bootstrap, config.kafka.dead_letter_topic, 1)
    assert letter.code == "oversized" and letter.truncated
    assert letter.value_length == len(huge)
    assert letter.value_sha256 == hashlib.sha256(huge).hexdigest()
    assert huge.startswith(letter.value()) and len(letter.value()) > 500_000


def test_overflowing_values_are_dead_lettered_and_ingestion_goes_on(
        tmp_path, kafka_bootstrap, kafka_topic, redis_url, namespace) -> None:
    """x = 1e200 and weight 1e308 twice (refused by the decoder), and events that would make a
    cell's co-moments overflow in the merge (refused by the script, dead-lettered by the
    consumer): all ``overflow``; every other event applied, every statistic finite."""
    topic = kafka_topic(1)
    config = configure(tmp_path, kafka_bootstrap, topic, redis_url, namespace)
    store = open_store(config)
    # a cell whose mean lies at 1e160: any event of it far from there overflows C
    far = GroupStats(["far"], np.array([1.0]), np.array([[1e160, 1.0]]), np.zeros((1, 2, 2)),
                     np.array([np.nan]))
    store.merge(far, offsets={(topic, 0): OffsetRange(0, 0)})
    events = [{"g": "a", "x": 1e200, "y": 1.0},
              {"g": "b", "x": 1.0, "y": 1.0, "weight": 1e308},
              {"g": "b", "x": 2.0, "y": 1.0, "weight": 1e308},
              {"g": "far", "x": -1e99, "y": 1.0},
              {"g": "far", "x": -1e99, "y": 2.0}]
    good = [{"g": f"ok{i % 3}", "x": float(i), "y": 2.0 * i} for i in range(20)]
    send(kafka_bootstrap, topic, events[:3] + good[:10] + events[3:] + good[10:])
    report = run_consume(config, until_idle=2)
    assert report.events_read == 25 and report.events_applied == 20
    assert report.rejected == {"overflow": 5}
    codes = sorted((r.offset, r.code) for r in letters(kafka_bootstrap,
                                                        config.kafka.dead_letter_topic, 5))
    assert codes == [(0, "overflow"), (1, "overflow"), (2, "overflow"), (13, "overflow"),
                     (14, "overflow")]
    stats = read_all(store)
    stats.check_finite()
    assert sorted(stats.keys) == ["far", "ok0", "ok1", "ok2"]
    assert stats.select(["far"]).n.tolist() == [1.0]
    assert sum(stats.select(["ok0", "ok1", "ok2"]).n) == 20
