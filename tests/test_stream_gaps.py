"""Offset gaps and a rebuild after retention, against a real broker: events the store never saw
deleted from the topic (DeleteRecords, as retention does). The default stops with exit 3 and
folds nothing; ``on_gap = "record"`` applies the rest and records the gap; ``--rebuild``
refuses, naming the offsets that are gone.

These need a broker that implements DeleteRecords (Apache Kafka: STREAMLME_KAFKA=host:port).
tansu 0.6, the broker the suite starts by itself, drops the connection on DeleteRecords and
keeps no retention, so there they are skipped, and say so.
"""

from __future__ import annotations

import uuid

import pytest
from kafka import KafkaAdminClient, TopicPartition
from stream_helpers import make_events, write_config

from streamlme.config import load_config
from streamlme.store.connect import open_store
from streamlme.store.health import StateLostError
from streamlme.stream.app import run_consume
from streamlme.stream.publish import send_events

GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


def configure(tmp_path, ev, bootstrap, topic, url, namespace, **kafka):
    path = write_config(tmp_path / f"{uuid.uuid4().hex[:6]}.toml", ev.spec,
                        kafka={"bootstrap_servers": bootstrap, "topic": topic,
                               "group_id": f"g-{topic}", "batch_max_seconds": 0.2, **kafka},
                        client=GROUP, redis={"url": url, "namespace": namespace, "shards": 4})
    return load_config(path, env={})


def delete_before(bootstrap: str, topic: str, offset: int) -> None:
    """Delete partition 0's records below ``offset``, or skip when the broker cannot."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_records({TopicPartition(topic, 0): offset})
    except Exception as exc:  # the broker does not implement it: say so, do not pass
        pytest.skip(f"the broker does not implement DeleteRecords ({type(exc).__name__}: "
                    f"{exc}); point STREAMLME_KAFKA at Apache Kafka to run this test")
    finally:
        admin.close()


def test_an_offset_gap_stops_by_default_and_is_recorded_on_request(
        tmp_path, kafka_bootstrap, kafka_topic, redis_url, namespace) -> None:
    ev = make_events(300, 20, seed=41)
    messages = list(ev.messages())
    topic = kafka_topic(1)
    config = configure(tmp_path, ev, kafka_bootstrap, topic, redis_url, namespace)
    send_events(iter(messages[:100]), topic, {"bootstrap_servers": kafka_bootstrap},
                progress=False)
    assert run_consume(config, until_idle=2).events_read == 100
    send_events(iter(messages[100:]), topic, {"bootstrap_servers": kafka_bootstrap},
                progress=False)
    delete_before(kafka_bootstrap, topic, 150)
    store = open_store(config)
    with pytest.raises(StateLostError, match=rf"offset gap in {topic}:0.*100.*150.*on_gap"):
        run_consume(config, until_idle=5)
    assert store.offsets(topic) == {0: 100} and store.health().flag is None
    recording = configure(tmp_path, ev, kafka_bootstrap, topic, redis_url, namespace,
                          on_gap="record")
    assert run_consume(recording, until_idle=2).events_applied == 150
    (gap,) = store.health().gaps
    assert (gap.topic, gap.partition, gap.start, gap.end) == (topic, 0, 100, 150)
    assert store.offsets(topic) == {0: 300}


def test_rebuild_refuses_when_retention_deleted_events_the_namespace_covered(
        tmp_path, kafka_bootstrap, kafka_topic, redis_url, namespace) -> None:
    ev = make_events(200, 20, seed=42)
    topic = kafka_topic(1)
    config = configure(tmp_path, ev, kafka_bootstrap, topic, redis_url, namespace)
    send_events(ev.messages(), topic, {"bootstrap_servers": kafka_bootstrap}, progress=False)
    assert run_consume(config, until_idle=2).events_read == 200
    delete_before(kafka_bootstrap, topic, 50)
    store = open_store(config)
    groups = store.n_groups()
    with pytest.raises(StateLostError, match=rf"cannot rebuild.*{topic}:0 offsets 0\.\.49"):
        run_consume(config, until_idle=2, rebuild=True)
    assert store.n_groups() == groups, "a refused rebuild changes nothing"
