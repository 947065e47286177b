"""Faults on a real Redis Cluster under a live stream: every test sends events through a real
Kafka-protocol broker to real ``streamlme consume`` processes writing into a real local Redis
Cluster (3 masters, 3 replicas; tests/fixtures_cluster.py), breaks something mid-stream, and
ends with the statistics equal to one pass over the rows and a refresh equal to the batch fit:

- a master killed with SIGKILL, its replica promoted while merges are in flight;
- 1000 slots migrated (``redis-cli --cluster reshard``) while merges go on;
- a failover that loses acknowledged writes (the replica frozen and cut off, the master killed,
  the stale replica promoted): the per-shard offset check sees it and Kafka replays, also when
  no later event touches the stale shards (only their offsets-only syncs meet the old records);
- the consumer killed between two shard calls: SIGKILL at random moments, and deterministically
  a store that applies part of a batch's shards and then dies;
- two consumers and a rebalance, with a zombie's stale batch refused.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
from fixtures_cluster import LocalRedisCluster, RedisClusterHandle
from redis.crc import key_slot
from redis.exceptions import RedisError
from stream_helpers import (
    REPO,
    Events,
    assert_stats_equal,
    make_events,
    read_all,
    start_consumer,
    wait_for,
    write_config,
)

from streamlme.config import Config, load_config
from streamlme.estimate import fit
from streamlme.refresh import current_model, refresh_once
from streamlme.store.connect import redis_client
from streamlme.store.redis import RedisStore
from streamlme.stream.app import make_ingestor
from streamlme.stream.publish import send_events

#: Consumer-group settings that Apache Kafka accepts too (its minimum session is 6 s); a group
#: join then takes ~3 s instead of ~23 s with kafka-python's defaults.
GROUP = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}
SHARDS = 256


# -- helpers --------------------------------------------------------------------------------


def cluster_config(tmp_path: Path, ev: Events, bootstrap: str, topic: str,
                   cluster: RedisClusterHandle, namespace: str, **kafka: object
                   ) -> tuple[Path, Config]:
    settings = {"bootstrap_servers": bootstrap, "topic": topic, "group_id": f"g-{topic}",
                "batch_max_events": 3_000, "batch_max_seconds": 0.2, **kafka}
    path = write_config(tmp_path / f"{uuid.uuid4().hex[:6]}.toml", ev.spec, kafka=settings,
                        client=GROUP, redis={"url": cluster.url, "namespace": namespace,
                                             "shards": SHARDS})
    config = load_config(path, env={})
    assert config.redis is not None and config.redis.cluster
    return path, config


def watcher(cluster: RedisClusterHandle, config: Config) -> RedisStore:
    """The test's own view of the namespace (short retries, so a probe never hangs long)."""
    return RedisStore(cluster.client(), config.redis.namespace, columns=config.spec.columns,
                      shards=SHARDS, retry_seconds=3.0)


def progress(store: RedisStore, topic: str) -> int:
    """Events every shard has accounted for: per partition the lowest shard record, summed."""
    try:
        return sum(store.offsets(topic).values())
    except RedisError:
        return -1


def reached(store: RedisStore, topic: str) -> int:
    """Events some shard has got to: per partition the highest shard record, summed (a batch
    is merged when this passes its end, whatever shards it touched)."""
    try:
        per = store.shard_offsets(topic)
    except RedisError:
        return -1
    top: dict[int, int] = {}
    for offsets in per.values():
        for partition, offset in offsets.items():
            top[partition] = max(offset, top.get(partition, 0))
    return sum(top.values())


def send(messages: list[tuple[bytes, bytes]], topic: str, bootstrap: str) -> None:
    send_events(messages, topic, {"bootstrap_servers": bootstrap}, progress=False)


def stop(proc: subprocess.Popen) -> dict:
    """SIGTERM a consumer (it finishes its batch and syncs) and return its JSON report."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    report = json.loads(proc.stdout.read())
    print("consumer report:", report)  # shown when a test fails
    return report


def batch_fit(ev: Events):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit(ev.batch_stats(), ev.spec, ranef=False)


def assert_exact(store: RedisStore, topic: str, ev: Events) -> None:
    """Every event once: each shard at the end of every partition, statistics of one pass."""
    assert progress(store, topic) == len(ev)
    assert_stats_equal(read_all(store), ev.batch_stats())


def assert_refresh_is_batch_fit(config: Config, store: RedisStore, ev: Events,
                                cli: Path | None = None) -> None:
    """A refresh (in process, or ``streamlme refresh --once`` on the config ``cli``) writes the
    model the batch fit of the rows gives: beta to 1e-7, each element of G to 1e-6 of
    sqrt(G_ii G_jj), sigma^2 to 1e-7 (as tests/test_stream_kafka.py measures rounding)."""
    if cli is None:
        outcome = refresh_once(config)
        assert outcome.status == "written", outcome.message
        assert outcome.n_obs == len(ev)
    else:
        done = subprocess.run([sys.executable, "-m", "streamlme.cli", "refresh", "--once",
                               "--config", str(cli)], capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        assert done.returncode == 0, done.stdout + done.stderr
    record = current_model(store)
    assert record is not None
    got, want = record.fit, batch_fit(ev)
    assert got["converged"] and want.converged
    assert got["n_obs"] == len(ev) and got["n_groups"] == want.n_groups
    assert abs(got["criterion"] - want.criterion) <= 1e-9 * abs(want.criterion)
    np.testing.assert_allclose([got["beta"][k] for k in want.fixed], want.beta, rtol=1e-7)
    G, G0 = np.asarray(got["G"]), np.asarray(want.G)
    scale = np.sqrt(np.outer(np.diag(G0), np.diag(G0)))
    assert np.all(np.abs(G - G0) <= 1e-6 * scale), (G, G0)
    np.testing.assert_allclose(got["sigma2"], want.sigma2, rtol=1e-7)


def shards_on(cluster: RedisClusterHandle, store: RedisStore, master: str) -> list[int]:
    """The namespace's shards whose slot ``master`` owns."""
    slots = cluster.owned_slots(master)
    return [s for s in range(SHARDS)
            if key_slot(store.keys.shard(s).stats.encode()) in slots]


def busiest_master(cluster: RedisClusterHandle, store: RedisStore) -> str:
    return max(cluster.masters(), key=lambda m: len(shards_on(cluster, store, m)))


def wait_replicated(cluster: LocalRedisCluster, master: str) -> None:
    """WAIT until the master's replica has received everything the master holds now."""
    node = cluster.node(master, timeout=10.0)
    try:
        assert node.execute_command("WAIT", 1, 5000) == 1
    finally:
        node.close()


def logged(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# -- a master dies --------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_a_master_mid_stream(tmp_path, kafka_bootstrap, kafka_topic,
                                    private_redis_cluster, cluster_namespace) -> None:
    """A master holding a third of the shards is killed with SIGKILL while the consumer merges;
    events keep arriving while its replica takes over. The consumer rides through the
    failover (the store retries ConnectionError / CLUSTERDOWN) and the result is exact."""
    cluster = private_redis_cluster
    ev = make_events(45_000, 1_500, seed=31)
    topic = kafka_topic(2)
    cfg, config = cluster_config(tmp_path, ev, kafka_bootstrap, topic, cluster,
                                 cluster_namespace)
    store = watcher(cluster, config)
    messages = list(ev.messages())
    a, b = len(messages) // 3, 2 * len(messages) // 3
    log = tmp_path / "consumer.log"
    proc = start_consumer(cfg, log_path=log)
    try:
        send(messages[:a], topic, kafka_bootstrap)
        wait_for(lambda: reached(store, topic) >= a, 90, what="the first third merged")
        victim = busiest_master(cluster, store)
        assert shards_on(cluster, store, victim)
        wait_replicated(cluster, victim)  # a failover that keeps what was acknowledged
        replica = cluster.kill_master(victim, wait_failover=False)
        # merges of these events hit the dead master until its replica is promoted
        send(messages[a:b], topic, kafka_bootstrap)
        cluster.wait_promoted(replica)
        send(messages[b:], topic, kafka_bootstrap)
        wait_for(lambda: progress(store, topic) == len(ev), 120, what="every event merged")
        report = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert report["reconnects"] >= 1, report  # it did meet the dead master
    assert report["events_read"] >= len(ev)
    assert victim not in cluster.masters() and replica in cluster.masters()
    assert_exact(store, topic, ev)
    assert_refresh_is_batch_fit(config, store, ev)


# -- slots migrate --------------------------------------------------------------------------


@pytest.mark.slow
def test_reshard_1000_slots_mid_stream(tmp_path, kafka_bootstrap, kafka_topic,
                                       private_redis_cluster, cluster_namespace) -> None:
    """``redis-cli --cluster reshard`` moves 1000 slots (some of them the namespace's shards)
    from one master to another while batches are merged (MOVED, ASK, TRYAGAIN): exact."""
    cluster = private_redis_cluster
    ev = make_events(45_000, 1_500, seed=32)
    topic = kafka_topic(2)
    cfg, config = cluster_config(tmp_path, ev, kafka_bootstrap, topic, cluster,
                                 cluster_namespace, batch_max_events=2_000)
    store = watcher(cluster, config)
    messages = list(ev.messages())
    half = len(messages) // 2
    proc = start_consumer(cfg, log_path=tmp_path / "consumer.log")
    try:
        # a backlog of ~20,000 events: the consumer merges batch after batch throughout the
        # reshard (about 1 s here; a batch of 2,000 events takes ~0.3 s on 256 shards)
        send(messages[:half], topic, kafka_bootstrap)
        wait_for(lambda: reached(store, topic) >= 2_000, 90, what="the first batch merged")
        source = busiest_master(cluster, store)
        target = next(m for m in cluster.masters() if m != source)
        moving = set(sorted(cluster.owned_slots(source))[:1000])  # redis-cli moves the lowest
        moved_shards = [s for s in range(SHARDS)
                        if key_slot(store.keys.shard(s).stats.encode()) in moving]
        assert moved_shards, "no shard of the namespace in the slots that move"
        before = reached(store, topic)
        reshard = cluster.reshard(source, target, slots=1000)
        assert reshard.wait(300) == 0, reshard.log_path.read_text()  # type: ignore[attr-defined]
        after = reached(store, topic)
        print(f"merged {before} -> {after} of {half} sent while the slots moved")
        assert after > before, "no batch was merged while the slots moved"
        send(messages[half:], topic, kafka_bootstrap)
        wait_for(lambda: progress(store, topic) == len(ev), 120, what="every event merged")
        report = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    cluster.wait_ok()
    assert moving <= cluster.owned_slots(target)
    assert all(cluster.master_for_key(store.keys.shard(s).stats) == target for s in moved_shards)
    assert report["events_read"] >= len(ev)
    assert_exact(store, topic, ev)
    assert_refresh_is_batch_fit(config, store, ev)


# -- a failover loses acknowledged writes ---------------------------------------------------


def kill_9(cluster: LocalRedisCluster, node: str) -> None:
    """SIGKILL one node of a local cluster and wait for it to be gone."""
    proc = cluster.processes[int(node.rpartition(":")[2])]
    proc.kill()
    proc.wait(10)


def lose_acknowledged_writes(cluster: LocalRedisCluster, store: RedisStore, topic: str,
                             master: str, send_then_wait) -> tuple[dict, dict]:
    """The failover that loses acknowledged writes: ``master``'s replica is made to take over
    however stale, frozen and cut off (after a WAIT: it holds what was merged so far);
    ``send_then_wait()`` sends events and waits until the master has merged them (acknowledged
    writes the replica never gets); the master is killed and the stale replica promoted.
    Returns the shards' offsets as acknowledged and as they survived."""
    replica = cluster.replica_of(master)
    assert replica is not None
    node = cluster.node(replica)
    try:  # promote it however stale its data (by default: at most ~30 s behind)
        node.config_set("cluster-replica-validity-factor", 0)
    finally:
        node.close()
    wait_replicated(cluster, master)  # the replica holds what was merged so far ...
    assert cluster.lag(replica) == master  # ... and nothing after it
    send_then_wait()
    acknowledged = store.shard_offsets(topic)
    kill_9(cluster, master)  # not kill_master: it wants a replica not flagged as failed
    cluster.thaw(replica)
    cluster.wait_promoted(replica)
    # The consumer is idle (nothing new to read, every shard synced): what the promoted
    # replica holds is what survived.
    return acknowledged, store.shard_offsets(topic)


@pytest.mark.slow
def test_failover_that_loses_acknowledged_writes_is_replayed(
        tmp_path, kafka_bootstrap, kafka_topic, private_redis_cluster, cluster_namespace) -> None:
    """The replica of a master holding shards is frozen and cut off; the master acknowledges a
    third of the stream that the replica never gets; the master is killed and the stale replica
    promoted. Its shards hold older offsets than the consumer has applied: the next merge is
    refused, the consumer seeks back and Kafka replays what was lost. Exact."""
    cluster = private_redis_cluster
    ev = make_events(45_000, 1_500, seed=33)
    topic = kafka_topic(2)
    cfg, config = cluster_config(tmp_path, ev, kafka_bootstrap, topic, cluster,
                                 cluster_namespace)
    store = watcher(cluster, config)
    master = busiest_master(cluster, store)
    lost = shards_on(cluster, store, master)
    messages = list(ev.messages())
    a, b = len(messages) // 3, 2 * len(messages) // 3
    log = tmp_path / "consumer.log"
    proc = start_consumer(cfg, log_path=log)
    try:
        send(messages[:a], topic, kafka_bootstrap)
        wait_for(lambda: progress(store, topic) == a, 90, what="the first third merged")

        def second_third() -> None:
            send(messages[a:b], topic, kafka_bootstrap)
            wait_for(lambda: progress(store, topic) == b, 90, what="the second third merged")

        acknowledged, survived = lose_acknowledged_writes(cluster, store, topic, master,
                                                          second_third)
        # the shards of the dead master are back at the first third
        assert all(sum(survived[s].values()) == a for s in lost), (survived, acknowledged)
        assert all(sum(acknowledged[s].values()) == b for s in lost)
        assert progress(store, topic) == a
        send(messages[b:], topic, kafka_bootstrap)
        wait_for(lambda: progress(store, topic) == len(ev), 120, what="every event merged")
        report = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "lost acknowledged writes" in logged(log)
    assert report["batches_refused"] >= 1
    assert report["events_read"] >= len(ev) + (b - a)  # the lost third was read again
    assert_exact(store, topic, ev)
    assert_refresh_is_batch_fit(config, store, ev)


@pytest.mark.slow
def test_lost_writes_of_shards_that_go_quiet_are_replayed(
        tmp_path, kafka_bootstrap, kafka_topic, private_redis_cluster, cluster_namespace) -> None:
    """As above, but after the failover no event of the stale shards' groups arrives: only the
    offsets-only syncs of those shards meet their old records. The consumer must replay from
    there too, or their lost events stay lost. Exact."""
    cluster = private_redis_cluster
    base = make_events(45_000, 1_500, seed=37)
    topic = kafka_topic(2)
    cfg, config = cluster_config(tmp_path, base, kafka_bootstrap, topic, cluster,
                                 cluster_namespace)
    store = watcher(cluster, config)
    master = busiest_master(cluster, store)
    lost = set(shards_on(cluster, store, master))
    a, b = len(base) // 3, 2 * len(base) // 3
    quiet = [i for i in range(b, len(base)) if store.shard_of(base.groups[i]) not in lost]
    rows = [*range(b), *quiet]
    ev = Events(base.spec, [base.groups[i] for i in rows], base.W[rows])
    messages = list(ev.messages())
    log = tmp_path / "consumer.log"
    proc = start_consumer(cfg, log_path=log)
    try:
        send(messages[:a], topic, kafka_bootstrap)
        wait_for(lambda: progress(store, topic) == a, 90, what="the first third merged")

        def second_third() -> None:
            send(messages[a:b], topic, kafka_bootstrap)
            wait_for(lambda: progress(store, topic) == b, 90, what="the second third merged")

        _, survived = lose_acknowledged_writes(cluster, store, topic, master, second_third)
        assert all(sum(survived[s].values()) == a for s in lost)
        send(messages[b:], topic, kafka_bootstrap)  # none of them for the stale shards
        wait_for(lambda: progress(store, topic) == len(ev), 60,
                 what="the stale shards replayed (their records back at the end)")
        report = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "lost acknowledged writes" in logged(log)
    assert report["events_read"] >= len(ev) + (b - a)
    assert_exact(store, topic, ev)
    assert_refresh_is_batch_fit(config, store, ev)


# -- the consumer dies between two shard calls ----------------------------------------------


@pytest.mark.slow
def test_kill_9_the_consumer_at_random_moments(tmp_path, kafka_bootstrap, kafka_topic,
                                               redis_cluster, cluster_namespace) -> None:
    """SIGKILL the consumer twice while it merges 256-shard batches into the cluster (a batch is
    one script call per shard, pipelined per node: a kill lands between shard calls),
    restarting it each time: nothing lost, nothing twice. (Each restart waits ~14 s for the
    killed member's Kafka session to expire, hence two kills, not more.)"""
    ev = make_events(60_000, 2_000, seed=34)
    topic = kafka_topic(2)
    cfg, config = cluster_config(tmp_path, ev, kafka_bootstrap, topic, redis_cluster,
                                 cluster_namespace, batch_max_events=4_000)
    store = watcher(redis_cluster, config)
    send(list(ev.messages()), topic, kafka_bootstrap)
    rng = random.Random(34)
    targets = sorted(rng.uniform(0.05, 0.8) * len(ev) for _ in range(2))
    for i, target in enumerate(targets):
        proc = start_consumer(cfg, log_path=tmp_path / f"run{i}.log")
        try:
            wait_for(lambda t=target: reached(store, topic) >= t, 120,
                     what=f"progress past {target:.0f}")
            time.sleep(rng.uniform(0, 0.2))  # land anywhere inside a batch
        finally:
            proc.kill()
            proc.wait()
    assert progress(store, topic) < len(ev), "the kills came too late to test anything"
    final = start_consumer(cfg, "--until-idle", "3", log_path=tmp_path / "final.log")
    assert final.wait(180) == 0
    assert_exact(store, topic, ev)
    assert_refresh_is_batch_fit(config, store, ev)


class Crash(BaseException):
    """The process dies: not an error any layer catches (as a SIGKILL is not)."""


class DiesMidBatch(RedisStore):
    """A real RedisStore that, at its ``after``-th merge carrying statistics, applies only the
    parts of ``keep`` (a fraction) of the shards, then dies: the state a crash between two shard
    calls leaves in the cluster, reproduced exactly."""

    def __init__(self, *args, after: int, keep: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.after, self.keep = after, keep
        self.data_merges = 0
        self.applied: list[int] = []
        self.skipped: list[int] = []

    def merge_shards(self, parts, half_life=None):
        if any(len(p.adds) for p in parts.values()):
            self.data_merges += 1
            if self.data_merges == self.after:
                shards = sorted(parts)
                cut = max(1, int(len(shards) * self.keep))
                self.applied, self.skipped = shards[:cut], shards[cut:]
                super().merge_shards({s: parts[s] for s in self.applied}, half_life)
                raise Crash
        return super().merge_shards(parts, half_life)


@pytest.mark.slow
def test_a_crash_between_two_shard_calls_is_completed_by_the_next_consumer(
        tmp_path, kafka_bootstrap, kafka_topic, redis_cluster, cluster_namespace) -> None:
    """A consumer dies in its third batch after 40% of the shards applied their part: the
    cluster holds shards at the batch's end beside shards at its start. A fresh consumer seeks
    to the lowest record, folds each event only into shards that lack it: exact."""
    ev = make_events(30_000, 1_500, seed=35)
    topic = kafka_topic(2)
    cfg, config = cluster_config(tmp_path, ev, kafka_bootstrap, topic, redis_cluster,
                                 cluster_namespace, batch_max_events=3_000)
    store = watcher(redis_cluster, config)
    send(list(ev.messages()), topic, kafka_bootstrap)
    r = config.redis
    dying = DiesMidBatch(redis_client(r.url, cluster=True, nodes=r.startup_nodes),
                         r.namespace, d=len(config.spec.columns), columns=config.spec.columns,
                         shards=r.shards, after=3, keep=0.4)
    ingestor = make_ingestor(config, dying)
    with pytest.raises(Crash):
        ingestor.run(until_idle=30)
    dying.client.close()
    assert dying.applied and dying.skipped
    # the crash point: the applied shards are past the skipped ones on some partition
    recorded = store.shard_offsets(topic)
    ahead = {(s, p) for s in dying.applied for p, o in recorded[s].items()
             if o > min(recorded[t][p] for t in dying.skipped)}
    assert ahead, recorded
    assert 0 < progress(store, topic) < len(ev)
    with pytest.raises(AssertionError):
        assert_stats_equal(read_all(store), ev.batch_stats())

    final = start_consumer(cfg, "--until-idle", "3", log_path=tmp_path / "final.log")
    assert final.wait(120) == 0
    report = json.loads(final.stdout.read())
    assert report["events_applied"] < len(ev)  # what the dead one had applied is not redone
    assert_exact(store, topic, ev)
    assert_refresh_is_batch_fit(config, store, ev)


# -- two consumers, a rebalance and a zombie ------------------------------------------------


@pytest.mark.slow
def test_two_consumers_a_rebalance_and_a_zombie(tmp_path, kafka_bootstrap, kafka_topic,
                                                redis_cluster, cluster_namespace) -> None:
    """Two consumers share a 4-partition topic on the cluster; one leaves mid-stream and the
    other takes its partitions over: exact. A zombie's batch of partitions taken from it is
    refused by every shard; the CLI refresh then writes the batch fit."""
    ev = make_events(40_000, 1_500, seed=36)
    topic = kafka_topic(4)
    cfg, config = cluster_config(tmp_path, ev, kafka_bootstrap, topic, redis_cluster,
                                 cluster_namespace, batch_max_events=2_000)
    store = watcher(redis_cluster, config)
    messages = list(ev.messages())
    half = len(messages) // 2

    # The zombie joins first and takes a batch; then it loses its membership while it still
    # holds that batch in memory (as after a long pause).
    r = config.redis
    zombie_store = RedisStore(redis_client(r.url, cluster=True, nodes=r.startup_nodes),
                              r.namespace, d=len(config.spec.columns),
                              columns=config.spec.columns, shards=r.shards)
    zombie = make_ingestor(config, zombie_store)
    zombie.batch_max_events = 10**9
    zombie.source.open(zombie._on_assigned, zombie._on_revoked)
    send(messages[:1000], topic, kafka_bootstrap)
    wait_for(lambda: bool(_stash(zombie)) and zombie._n_pending >= 1000, 60, what="zombie batch")
    held = (dict(zombie._pending), zombie._n_pending)
    zombie.source.close()  # a zombie misses the revocation: it keeps what it held
    zombie._pending, zombie._n_pending = held

    first = start_consumer(cfg, log_path=tmp_path / "first.log")
    second = start_consumer(cfg, log_path=tmp_path / "second.log")
    try:
        send(messages[1000:half], topic, kafka_bootstrap)
        wait_for(lambda: progress(store, topic) >= half // 2, 90,
                 what="both consumers making progress")
        first_report = stop(first)  # graceful: finish the batch, commit, leave
        send(messages[half:], topic, kafka_bootstrap)
        # the second takes the first's partitions over (not --until-idle: a rebalance of
        # several seconds counts as idle there)
        wait_for(lambda: progress(store, topic) == len(ev), 120, what="every event merged")
        second_report = stop(second)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
    assert first_report["events_applied"] > 0 and second_report["events_applied"] > 0
    taken = [line for line in logged(tmp_path / "second.log").splitlines()
             if "streamlme.stream.consumer: assigned" in line]
    assert taken and all(f"'{topic}', {p})" in taken[-1] for p in range(4)), taken
    assert_exact(store, topic, ev)
    final = read_all(store)

    # The zombie wakes up and writes what it took long ago: every shard refuses it.
    zombie._flush()
    assert zombie.report.batches_refused == 1 and zombie.report.events_applied == 0
    assert_stats_equal(read_all(store), final, rtol=0)
    zombie.dead_letters.close()
    zombie_store.client.close()
    assert_refresh_is_batch_fit(config, store, ev, cli=cfg)


def _stash(ingestor) -> dict:
    for tp, records in ingestor.source.poll(0.2, 5000).items():
        ingestor._pending.setdefault(tp, []).extend(records)
        ingestor._n_pending += len(records)
    return ingestor._pending
