"""The Kafka fixtures give a broker that behaves like Kafka for what streamlme relies on:
keyed partitioning, consumer groups, committed offsets that a restarted consumer resumes from."""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

N = 2000


def _poll_until(consumer: KafkaConsumer, want: int, timeout: float = 60.0) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500, max_records=want - len(got)).values():
            got.extend(records)
    return got


def test_group_consumer_resumes_from_committed_offsets(kafka_topic, kafka_client_config):
    topic = kafka_topic(partitions=4)
    producer = KafkaProducer(bootstrap_servers=kafka_client_config["bootstrap_servers"])
    for i in range(N):
        producer.send(topic, key=f"g{i % 37}".encode(), value=str(i).encode())
    producer.flush()
    producer.close()
    settings = {**kafka_client_config, "group_id": f"{topic}-group"}

    first = KafkaConsumer(topic, **settings)
    part_one = _poll_until(first, N // 2)
    assert len(first.assignment()) == 4
    assert len(part_one) == N // 2
    first.commit()
    committed = {tp: first.committed(tp) for tp in first.assignment()}
    first.close()
    assert sum(committed.values()) == N // 2

    second = KafkaConsumer(topic, **settings)
    part_two = _poll_until(second, N - N // 2)
    assert not _poll_until(second, 1, timeout=1.0), "nothing beyond the N messages"
    # The second consumer starts every partition exactly at what the first one committed.
    first_offsets: dict[TopicPartition, int] = {}
    for record in part_two:
        tp = TopicPartition(record.topic, record.partition)
        first_offsets.setdefault(tp, record.offset)
    for tp, offset in first_offsets.items():
        assert offset == (committed[tp] or 0)
    second.commit()
    second.close()

    values = sorted(int(r.value) for r in part_one + part_two)
    assert values == list(range(N)), "every message once: none lost, none repeated"
    by_key: dict[bytes, set[int]] = {}
    for record in part_one + part_two:
        by_key.setdefault(record.key, set()).add(record.partition)
    assert all(len(parts) == 1 for parts in by_key.values()), "a key always maps to one partition"
