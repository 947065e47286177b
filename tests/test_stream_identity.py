"""Store identity against a real broker and real Redis: a store that lost its state is never
folded into (exit 3, flag "lost"), ``consume --rebuild`` recovers it to one pass over every
event, and an empty shard of a real Redis Cluster is detected."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid

import pytest
import redis
from stream_helpers import REPO, assert_stats_equal, make_events, read_all, wait_for, write_config

from streamlme.config import load_config
from streamlme.store.connect import open_store
from streamlme.store.health import StateLostError
from streamlme.stream.app import run_consume
from streamlme.stream.publish import send_events

GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


def config_for(tmp_path, ev, bootstrap, topic, url, namespace, **redis_extra):
    path = write_config(tmp_path / f"{uuid.uuid4().hex[:6]}.toml", ev.spec,
                        kafka={"bootstrap_servers": bootstrap, "topic": topic,
                               "group_id": f"g-{topic}", "batch_max_events": 2_000,
                               "batch_max_seconds": 0.2},
                       client=GROUP, redis={"url": url, "namespace": namespace, "shards": 8,
                                            **redis_extra})
    return path, load_config(path, env={})


def offsets_sum(store, topic):
    try:
        return sum(store.offsets(topic).values())
    except redis.exceptions.ConnectionError:
        return -1


def test_flushdb_mid_stream_stops_and_rebuild_recovers(tmp_path, kafka_bootstrap, kafka_topic,
                                                        redis_server_factory) -> None:
    """A FLUSHDB under a running consumer: it exits with StateLostError having folded nothing
    after the flush, the namespace is flagged "lost"; a plain restart refuses too (exit 3 from
    the CLI, one line naming --rebuild); `consume --rebuild` replays everything, ending equal to
    one pass over every event with the flag cleared."""
    server = redis_server_factory()
    ev = make_events(6_000, 300, seed=31)
    messages = list(ev.messages())
    topic = kafka_topic(2)
    path, config = config_for(tmp_path, ev, kafka_bootstrap, topic, server.url, "ident")
    store = open_store(config)
    send_events(iter(messages[:4_000]), topic, {"bootstrap_servers": kafka_bootstrap},
                progress=False)
    outcome: list[BaseException | object] = []

    def consume() -> None:
        try:
            outcome.append(run_consume(config, until_idle=60))
        except BaseException as exc:  # the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    wait_for(lambda: offsets_sum(store, topic) == 4_000, 60, what="the first 4000 events")
    redis.Redis.from_url(server.url).flushdb()
    send_events(iter(messages[4_000:]), topic, {"bootstrap_servers": kafka_bootstrap},
                progress=False)
    thread.join(60)
    assert not thread.is_alive()
    assert isinstance(outcome[0], StateLostError), outcome
    assert "--rebuild" in str(outcome[0])
    health = store.health()
    assert health.flag == "lost" and "--rebuild" in health.reason
    assert store.n_groups() == 0, "nothing may be folded onto the emptied store"

    cli = subprocess.run([sys.executable, "-m", "streamlme.cli", "consume", "--config",
                          str(path), "--until-idle", "5"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert cli.returncode == 3, cli.stderr
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1 and "--rebuild" in lines[0], cli.stderr
    assert store.n_groups() == 0

    report = run_consume(config, until_idle=3, rebuild=True)
    assert report.events_read == len(ev)
    assert store.health().flag is None
    assert_stats_equal(read_all(store), ev.batch_stats())
    assert sum(store.offsets(topic).values()) == len(ev)


def test_restarted_empty_redis_is_detected_at_start(tmp_path, kafka_bootstrap, kafka_topic,
                                                     redis_server_factory) -> None:
    """Redis restarted without persistence between two runs: the next consumer finds no record
    while Kafka holds the group's committed offsets, and refuses (nothing folded, flag lost)."""
    server = redis_server_factory()
    ev = make_events(3_000, 100, seed=32)
    topic = kafka_topic(1)
    _, config = config_for(tmp_path, ev, kafka_bootstrap, topic, server.url, "restart")
    send_events(ev.messages(), topic, {"bootstrap_servers": kafka_bootstrap}, progress=False)
    assert run_consume(config, until_idle=2).events_read == len(ev)
    server.stop(kill=True)
    server.start()
    send_events(make_events(500, 20, seed=33).messages(), topic,
                {"bootstrap_servers": kafka_bootstrap}, progress=False)
    with pytest.raises(StateLostError, match="committed offset"):
        run_consume(config, until_idle=5)
    store = open_store(config)
    assert store.n_groups() == 0 and store.health().flag == "lost"


def test_an_empty_cluster_shard_is_detected(tmp_path, kafka_bootstrap, kafka_topic,
                                            redis_cluster, cluster_namespace) -> None:
    """One shard's keys deleted on a real Redis Cluster (as a failover to an empty replica
    leaves it): the next consumer refuses, naming the shard, before folding anything."""
    ev = make_events(3_000, 200, seed=34)
    topic = kafka_topic(1)
    _, config = config_for(tmp_path, ev, kafka_bootstrap, topic, redis_cluster.url,
                           cluster_namespace)
    send_events(ev.messages(), topic, {"bootstrap_servers": kafka_bootstrap}, progress=False)
    assert run_consume(config, until_idle=2).events_read == len(ev)
    store = open_store(config)
    before = read_all(store)
    shard = 3
    client = redis_cluster.client()
    for key in store.keys.shard(shard).all:
        client.delete(key)
    send_events(make_events(300, 20, seed=35).messages(), topic,
                {"bootstrap_servers": kafka_bootstrap}, progress=False)
    with pytest.raises(StateLostError, match=f"shard\\(s\\) \\[{shard}\\]"):
        run_consume(config, until_idle=5)
    assert store.health().flag == "lost"
    after = read_all(store)
    assert sorted(after.keys) == sorted(k for k in before.keys if store.shard_of(k) != shard)


def test_an_idle_consumer_notices_a_flushdb(tmp_path, kafka_bootstrap, kafka_topic,
                                            redis_server_factory) -> None:
    """No event after the FLUSHDB, so no merge would find out: the idle consumer's heartbeat
    sees the namespace's epoch gone and stops with StateLostError."""
    server = redis_server_factory()
    ev = make_events(1_000, 50, seed=36)
    topic = kafka_topic(1)
    _, config = config_for(tmp_path, ev, kafka_bootstrap, topic, server.url, "idle")
    store = open_store(config)
    send_events(ev.messages(), topic, {"bootstrap_servers": kafka_bootstrap}, progress=False)
    outcome: list[object] = []

    def consume() -> None:
        try:
            outcome.append(run_consume(config, until_idle=30))
        except StateLostError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    wait_for(lambda: offsets_sum(store, topic) == len(ev), 60, what="every event")
    wait_for(lambda: store.epoch() is not None, 10, what="the namespace's epoch")
    redis.Redis.from_url(server.url).flushdb()
    thread.join(20)
    assert not thread.is_alive() and isinstance(outcome[0], StateLostError), outcome
    assert store.health().flag == "lost" and store.n_groups() == 0
