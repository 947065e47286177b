"""A long-running `streamlme consume` started before Redis is up waits for it (logging where it
waits), then consumes; an idle consumer keeps its status live."""

from __future__ import annotations

import signal
import time

from stream_helpers import make_events, start_consumer, wait_for, write_config

from streamlme.config import load_config
from streamlme.status import read_status
from streamlme.store.connect import open_store
from streamlme.stream.publish import send_events

GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}


def test_consume_waits_for_redis_then_consumes_and_stays_live_while_idle(
        tmp_path, kafka_bootstrap, kafka_topic, redis_server_factory) -> None:
    server = redis_server_factory()
    server.stop()
    ev = make_events(500, 20, seed=51)
    topic = kafka_topic(1)
    cfg = write_config(tmp_path / "c.toml", ev.spec,
                       kafka={"bootstrap_servers": kafka_bootstrap, "topic": topic,
                              "group_id": f"g-{topic}", "batch_max_seconds": 0.2},
                       client=GROUP, redis={"url": server.url, "namespace": "wait",
                                            "shards": 4})
    log = tmp_path / "consume.log"
    proc = start_consumer(cfg, log_path=log)
    try:
        wait_for(lambda: "waiting for Redis at redis://127.0.0.1" in log.read_text(), 30,
                 what="the waiting line")
        assert proc.poll() is None
        server.start()
        send_events(ev.messages(), topic, {"bootstrap_servers": kafka_bootstrap},
                    progress=False)
        store = open_store(load_config(cfg, env={}))
        wait_for(lambda: sum(store.offsets(topic).values()) == len(ev), 60, what="every event")
        first = read_status(store)
        time.sleep(4)  # idle: no batch, only the heartbeat refreshes the status
        later = read_status(store)
        assert later.consumers and first.consumers
        assert later.consumers[0].updated_at > first.consumers[0].updated_at
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
