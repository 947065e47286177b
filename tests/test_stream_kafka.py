"""The consumer against a real broker and a real Redis: streaming equals batch, rebalances,
zombies, and bad input going to the dead-letter topic."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
import warnings

import msgspec
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from stream_helpers import (
    Events,
    assert_stats_equal,
    make_events,
    read_all,
    read_topic,
    start_consumer,
    wait_for,
    write_config,
)

from streamlme.config import load_config
from streamlme.estimate import fit
from streamlme.store.connect import open_store
from streamlme.stream.app import make_ingestor, run_consume, run_publish
from streamlme.stream.dlq import DeadLetterRecord
from streamlme.stream.publish import send_events


def kafka_config(tmp_path, ev: Events, bootstrap: str, topic: str, redis_url: str,
                 namespace: str, **kafka: object):
    settings_ = {"bootstrap_servers": bootstrap, "topic": topic, "group_id": f"g-{topic}",
                 "batch_max_events": 20_000, "batch_max_seconds": 0.3, **kafka}
    path = write_config(tmp_path / f"{uuid.uuid4().hex[:6]}.toml", ev.spec, kafka=settings_,
                        redis={"url": redis_url, "namespace": namespace})
    return path, load_config(path)


def test_streaming_equals_batch(tmp_path, kafka_bootstrap, kafka_topic, redis_url,
                                namespace) -> None:
    """200,000 events for 5,000 groups through publish and consume: the statistics in Redis
    equal the one-pass statistics of the same rows to 1e-10, and a REML fit on them equals
    `streamlme fit` on the CSV."""
    ev = make_events(200_000, 5_000, seed=11)
    topic = kafka_topic(4)
    _, config = kafka_config(tmp_path, ev, kafka_bootstrap, topic, redis_url, namespace)
    csv_path = ev.write_csv(tmp_path / "events.csv")
    assert run_publish(config, csv_path, progress=False) == 200_000
    report = run_consume(config, until_idle=2.0)
    assert report.events_read == report.events_applied == 200_000
    assert report.events_rejected == 0 and report.batches_refused == 0
    store = open_store(config)
    assert store.n_groups() == 5_000
    streamed = read_all(store)
    assert_stats_equal(streamed, ev.batch_stats())
    assert sum(store.offsets(topic).values()) == 200_000
    lags = [REGISTRY.get_sample_value("streamlme_consumer_lag",
                                      {"topic": topic, "partition": str(p)}) for p in range(4)]
    assert lags == [0.0] * 4  # read to the end of every partition

    spec = ev.spec
    cli = subprocess.run(
        [sys.executable, "-m", "streamlme.cli", "fit", str(csv_path), "--response", spec.response,
         "--fixed", ",".join(spec.fixed), "--random", ",".join(spec.random), "--group", spec.group,
         "--json", "--no-ranef"], capture_output=True, text=True, timeout=300, check=True)
    batch = json.loads(cli.stdout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        live = fit(streamed, spec, "REML", ranef=False)
    assert live.converged and batch["converged"]
    assert abs(live.criterion - batch["criterion"]) <= 1e-9 * abs(batch["criterion"])
    np.testing.assert_allclose(live.beta, list(batch["beta"].values()), rtol=1e-7)
    # Each element of G to 1e-6 of its own scale, sqrt(G_ii G_jj): this data's covariance is
    # ~0.003 of that scale, and statistics that differ by rounding (streamed in timing-dependent
    # batches vs one pass) move a near-zero covariance by ~1e-6 of itself (measured: a 1e-10
    # relative change of the means moves G_01 by 4.5e-7 of itself and G_11 by 6e-9).
    G_batch = np.asarray(batch["G"])
    scale = np.sqrt(np.outer(np.diag(G_batch), np.diag(G_batch)))
    assert np.all(np.abs(live.G - G_batch) <= 1e-6 * scale)
    np.testing.assert_allclose(live.sigma2, batch["sigma2"], rtol=1e-7)
    assert batch["n_obs"] == 200_000 and batch["n_groups"] == 5_000


def test_rebalance_and_zombie(tmp_path, kafka_bootstrap, kafka_topic, redis_url,
                              namespace) -> None:
    """Two consumers share a 4-partition topic; one stops mid-stream and the other takes over:
    exact. A zombie holding a batch of partitions that were taken from it is refused."""
    ev = make_events(80_000, 2_000, seed=12)
    topic = kafka_topic(4)
    cfg_path, config = kafka_config(tmp_path, ev, kafka_bootstrap, topic, redis_url, namespace,
                                    batch_max_events=2_000)
    messages = list(ev.messages())
    half = len(messages) // 2
    store = open_store(config)

    # The zombie: joins first and takes a batch of records; then it loses its partitions (its
    # membership ends, as after a long pause) while it still holds the batch in memory.
    zombie = make_ingestor(config, open_store(config))
    zombie.batch_max_events = 10**9
    zombie.source.open(zombie._on_assigned, zombie._on_revoked)
    send_events(messages[:1000], topic, {"bootstrap_servers": kafka_bootstrap}, progress=False)
    wait_for(lambda: bool(_stash(zombie)) and zombie._n_pending >= 1000, 60, what="zombie batch")
    held = (dict(zombie._pending), zombie._n_pending)
    zombie.source.close()  # a zombie misses the revocation: it keeps what it held
    zombie._pending, zombie._n_pending = held

    first = start_consumer(cfg_path, "--until-idle", "60", log_path=tmp_path / "first.log")
    second = start_consumer(cfg_path, "--until-idle", "8", log_path=tmp_path / "second.log")
    try:
        send_events(messages[1000:half], topic, {"bootstrap_servers": kafka_bootstrap},
                    progress=False)
        wait_for(lambda: sum(store.offsets(topic).values()) >= half // 2, 90,
                 what="both consumers making progress")
        first.send_signal(signal.SIGTERM)  # graceful: finish the batch, commit, leave
        assert first.wait(60) == 0
        first_report = json.loads(first.stdout.read())
        send_events(messages[half:], topic, {"bootstrap_servers": kafka_bootstrap},
                    progress=False)
        assert second.wait(180) == 0
        second_report = json.loads(second.stdout.read())
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
    assert first_report["events_applied"] > 0 and second_report["events_applied"] > 0
    final = read_all(store)
    assert_stats_equal(final, ev.batch_stats())

    # The zombie finally wakes up and tries to write what it took long ago.
    zombie._flush()
    assert zombie.report.batches_refused == 1 and zombie.report.events_applied == 0
    assert_stats_equal(read_all(store), final, rtol=0)
    zombie.dead_letters.close()


def _stash(ingestor) -> dict:
    ingestor_poll = ingestor.source.poll(0.2, 5000)
    for tp, records in ingestor_poll.items():
        ingestor._pending.setdefault(tp, []).extend(records)
        ingestor._n_pending += len(records)
    return ingestor._pending


def _bad_messages() -> st.SearchStrategy[bytes]:
    junk = st.binary(max_size=200)
    not_object = st.sampled_from([b"[]", b"1", b'"s"', b"null", b"true", b""])
    malformed_rows = st.fixed_dictionaries(
        {"g": st.one_of(st.just(""), st.text(min_size=257, max_size=300), st.none(),
                        st.just("ok"))},
        optional={
            "x1": st.one_of(st.text(max_size=5), st.none(), st.booleans()),
            "x2": st.just(1.0),
            "op": st.sampled_from(["delete", "ADD", 3]),
        },
    ).map(msgspec.json.encode)
    overflow = st.just(b'{"g": "a", "x1": 1e400, "x2": 1, "y": 1}')
    return st.one_of(junk, not_object, malformed_rows, overflow)


def _is_good(ev_spec, value: bytes) -> bool:
    from streamlme.events import EventDecoder

    return not EventDecoder(ev_spec).decode([value]).rejections


@settings(max_examples=3, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(bad=st.lists(_bad_messages(), min_size=20, max_size=80), seed=st.integers(0, 2**16))
def test_bad_input_goes_to_dead_letters(tmp_path, kafka_bootstrap, kafka_topic, redis_url,
                                        bad, seed) -> None:
    """Arbitrary bytes and malformed rows between good events: every bad one is dead-lettered
    with its bytes, position and reason; every good one is counted exactly once."""
    ev = make_events(3_000, 100, seed=seed)
    bad = [b for b in bad if not _is_good(ev.spec, b)]
    good = list(ev.messages())
    rng = np.random.default_rng(seed)
    slots = np.sort(rng.integers(0, len(good), len(bad)))
    stream: list[tuple[bytes | None, bytes]] = []
    j = 0
    for i, message in enumerate(good):
        while j < len(bad) and slots[j] == i:
            stream.append((None, bad[j]))
            j += 1
        stream.append(message)
    topic = kafka_topic(2)
    ns = f"t-{uuid.uuid4().hex[:8]}"
    _, config = kafka_config(tmp_path, ev, kafka_bootstrap, topic, redis_url, ns,
                             batch_max_events=700)
    store = open_store(config)
    try:
        send_events(stream, topic, {"bootstrap_servers": kafka_bootstrap}, progress=False)
        report = run_consume(config, until_idle=1.5)
        assert report.events_applied == len(good)
        assert report.events_rejected == len(bad)
        assert report.events_read == len(stream)
        assert_stats_equal(read_all(store), ev.batch_stats())
        letters = read_topic(kafka_bootstrap, config.kafka.dead_letter_topic, len(bad))
        records = [msgspec.json.decode(m.value, type=DeadLetterRecord) for m in letters]
        assert sorted(r.value() for r in records) == sorted(bad)
        assert all(r.reason and r.topic == topic for r in records)
        assert len({(r.partition, r.offset) for r in records}) == len(bad)
    finally:
        store.clear()
