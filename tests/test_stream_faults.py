"""Faults: the consumer killed with SIGKILL mid-ingest, and Redis restarted under it."""

from __future__ import annotations

import json
import random
import time

import redis
from stream_helpers import (
    assert_stats_equal,
    make_events,
    read_all,
    start_consumer,
    wait_for,
    write_config,
)

from streamlme.config import load_config
from streamlme.store.connect import open_store
from streamlme.stream.publish import send_events


def progress(store, topic: str) -> int:
    try:
        return sum(store.offsets(topic).values())
    except redis.exceptions.ConnectionError:
        return -1


def test_kill_9_at_random_moments_loses_nothing(tmp_path, kafka_bootstrap, kafka_topic,
                                                 redis_url, namespace) -> None:
    """SIGKILL the consumer 5 times while it ingests 200,000 events, restarting it each time:
    the final statistics equal the one-pass statistics — nothing lost, nothing twice."""
    ev = make_events(200_000, 5_000, seed=21)
    topic = kafka_topic(2)
    cfg = write_config(tmp_path / "c.toml", ev.spec,
                       kafka={"bootstrap_servers": kafka_bootstrap, "topic": topic,
                              "group_id": f"g-{topic}", "batch_max_events": 4_000,
                              "batch_max_seconds": 0.2},
                       redis={"url": redis_url, "namespace": namespace})
    store = open_store(load_config(cfg))
    send_events(ev.messages(), topic, {"bootstrap_servers": kafka_bootstrap}, progress=False)
    rng = random.Random(21)
    targets = sorted(rng.uniform(0.05, 0.9) * len(ev) for _ in range(5))
    for i, target in enumerate(targets):
        proc = start_consumer(cfg, log_path=tmp_path / f"run{i}.log")
        try:
            wait_for(lambda t=target: progress(store, topic) >= t, 120,
                     what=f"progress past {target:.0f}")
            time.sleep(rng.uniform(0, 0.3))  # land anywhere inside a batch
        finally:
            proc.kill()
            proc.wait()
    assert progress(store, topic) < len(ev), "the kills came too late to test anything"
    final = start_consumer(cfg, "--until-idle", "3", log_path=tmp_path / "final.log")
    assert final.wait(180) == 0
    assert progress(store, topic) == len(ev)
    assert_stats_equal(read_all(store), ev.batch_stats())


def test_redis_restart_mid_stream(tmp_path, kafka_bootstrap, kafka_topic,
                                  redis_server_factory) -> None:
    """A Redis with appendonly/appendfsync always is killed and restarted mid-stream: the
    consumer reconnects and the result is exact."""
    server = redis_server_factory(appendonly="yes", appendfsync="always")
    ev = make_events(100_000, 2_000, seed=22)
    topic = kafka_topic(2)
    cfg = write_config(tmp_path / "c.toml", ev.spec,
                       kafka={"bootstrap_servers": kafka_bootstrap, "topic": topic,
                              "group_id": f"g-{topic}", "batch_max_events": 5_000,
                              "batch_max_seconds": 0.2},
                       redis={"url": server.url, "namespace": "restart"})
    store = open_store(load_config(cfg))
    messages = list(ev.messages())
    half = len(messages) // 2
    send_events(messages[:half], topic, {"bootstrap_servers": kafka_bootstrap}, progress=False)
    proc = start_consumer(cfg, "--until-idle", "5", log_path=tmp_path / "consumer.log")
    try:
        wait_for(lambda: progress(store, topic) >= half // 3, 120, what="progress")
        server.stop(kill=True)
        send_events(messages[half:], topic, {"bootstrap_servers": kafka_bootstrap},
                    progress=False)
        time.sleep(1.0)
        server.start()
        assert proc.wait(180) == 0
        report = json.loads(proc.stdout.read())
    finally:
        if proc.poll() is None:
            proc.kill()
    assert report["reconnects"] >= 1
    assert progress(store, topic) == len(ev)
    assert_stats_equal(read_all(store), ev.batch_stats())
