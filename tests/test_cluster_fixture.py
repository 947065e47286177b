"""The Redis Cluster fixture gives a real cluster: 3 masters with a replica each, hash tags
spread over the masters, a kill -9 of a master ends in its replica's promotion, a reshard moves
slots, a frozen replica promoted after its master's death has lost writes, and a namespace's
keys are gone after the test."""

from __future__ import annotations

import time

import pytest
from fixtures_cluster import (
    SLOTS,
    LocalRedisCluster,
    RedisClusterHandle,
    _missing_binaries,
    delete_cluster_namespace,
)
from redis.crc import key_slot


def test_three_masters_each_with_a_replica(redis_cluster: RedisClusterHandle) -> None:
    masters, replicas = redis_cluster.masters(), redis_cluster.replicas()
    assert len(masters) == 3 and len(replicas) == 3
    assert sorted(redis_cluster.replica_of(m) for m in masters) == replicas
    assert sum(redis_cluster.slots_of(m) for m in masters) == SLOTS
    assert redis_cluster.is_ok()
    assert redis_cluster.url == "redis+cluster://" + ",".join(redis_cluster.startup_nodes)
    assert redis_cluster.redis_url == f"redis://{redis_cluster.startup_nodes[0]}"
    client = redis_cluster.client()
    try:
        assert client.ping()
        assert {f"{n.host}:{n.port}" for n in client.get_primaries()} == set(masters)
    finally:
        client.close()


def test_hash_tags_land_on_different_masters_and_the_namespace_is_cleaned(
        redis_cluster: RedisClusterHandle, cluster_namespace: str) -> None:
    ns = cluster_namespace
    keys = [f"{{{ns}}}meta"] + [f"{{{ns}:s{i}}}cells" for i in range(32)]
    client = redis_cluster.client()
    try:
        for key in keys:
            client.set(key, b"1")
        owners = {key: redis_cluster.master_for_key(key) for key in keys}
        assert len(set(owners.values())) == 3  # 32 shard tags reach every master
        for key, owner in owners.items():
            assert redis_cluster.slot_owner(key_slot(key.encode())) == owner
            node = redis_cluster.node(owner)
            try:  # the key really lives there: a plain client to that master reads it
                assert node.get(key) == b"1"
            finally:
                node.close()
        # A neighbour whose name starts with this one is not ours and must survive.
        other = f"{{{ns}x}}meta"
        client.set(other, b"keep")
        assert delete_cluster_namespace(redis_cluster, ns) == len(keys)
        assert not any(client.exists(key) for key in keys)
        assert client.get(other) == b"keep"
        client.delete(other)
    finally:
        client.close()


def test_kill_master_promotes_its_replica_and_writes_go_on(
        private_redis_cluster: LocalRedisCluster) -> None:
    cluster = private_redis_cluster
    client = cluster.client()  # made before the kill: its slot map names the dead master
    try:
        victim = cluster.master_for_key("{a}k")
        client.set("{a}k", b"before")
        node = cluster.node(victim)
        try:
            assert node.execute_command("WAIT", 1, 5000) == 1  # the replica has it
        finally:
            node.close()
        replica = cluster.replica_of(victim)
        start = time.monotonic()
        promoted = cluster.kill_master(victim)
        took = time.monotonic() - start
        assert promoted == replica
        assert victim not in cluster.masters() and promoted in cluster.masters()
        assert cluster.master_for_key("{a}k") == promoted
        assert client.get("{a}k") == b"before"  # redis-py: ConnectionError, new slot map, retry
        assert client.set("{a}k", b"after")
        assert client.get("{a}k") == b"after"
        print(f"failover took {took:.2f} s (start {cluster.started_s:.2f} s)")
        cluster.restart(victim)  # the old master comes back as a replica of the new one
        assert cluster.replica_of(promoted) == victim
    finally:
        client.close()


def test_reshard_moves_slot_ownership_while_writes_go_on(
        private_redis_cluster: LocalRedisCluster) -> None:
    cluster = private_redis_cluster
    source, target = cluster.masters()[:2]
    before = {m: cluster.slots_of(m) for m in (source, target)}
    moved = sorted(cluster.owned_slots(source))[:1000]
    client = cluster.client()
    try:
        proc = cluster.reshard(source, target, slots=1000)
        written = 0
        while proc.poll() is None:  # writes while slots migrate (MOVED/ASK handled by redis-py)
            client.set(f"{{t{written % 50}}}k", written)
            written += 1
        assert proc.returncode == 0, proc.log_path.read_text()  # type: ignore[attr-defined]
        cluster.wait_ok()
        assert cluster.slots_of(source) == before[source] - 1000
        assert cluster.slots_of(target) == before[target] + 1000
        # redis-cli takes the source's lowest slots first
        assert set(moved) <= cluster.owned_slots(target)
        assert written > 0
        for i in range(min(written, 50)):
            assert client.get(f"{{t{i}}}k") is not None
    finally:
        client.close()


def test_frozen_replica_promoted_after_its_master_dies_has_lost_writes(
        private_redis_cluster: LocalRedisCluster) -> None:
    """The failover that loses acknowledged writes, as the stream fault tests provoke it."""
    cluster = private_redis_cluster
    client = cluster.client()
    try:
        master = cluster.master_for_key("{lag}k")
        replica = cluster.replica_of(master)
        assert replica is not None
        client.set("{lag}k", b"old")
        node = cluster.node(master)
        try:
            assert node.execute_command("WAIT", 1, 5000) == 1
        finally:
            node.close()
        assert cluster.lag(replica) == master
        assert client.set("{lag}k", b"new")  # acknowledged by the master alone
        cluster.kill_master(master, wait_failover=False)
        cluster.thaw(replica)
        cluster.wait_promoted(replica)
        assert client.get("{lag}k") == b"old"  # the acknowledged write is gone
    finally:
        client.close()


def test_an_existing_cluster_has_no_fault_tools(redis_cluster: RedisClusterHandle) -> None:
    handle = RedisClusterHandle(redis_cluster.startup_nodes)
    assert handle.masters() == redis_cluster.masters()
    with pytest.raises(pytest.skip.Exception, match="STREAMLME_TEST_REDIS_CLUSTER"):
        handle.kill_master(handle.masters()[0])
    with pytest.raises(pytest.skip.Exception):
        handle.reshard(*handle.masters()[:2])


def test_missing_binaries_skip_but_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fixtures_cluster.shutil.which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install redis-server"):
        _missing_binaries()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="redis-cli"):
        _missing_binaries()


def test_the_app_config_accepts_the_cluster_url(redis_cluster: RedisClusterHandle) -> None:
    from streamlme.config import RedisConfig

    config = RedisConfig(url=redis_cluster.url)
    assert config.cluster
    assert [f"{h}:{p}" for h, p in config.startup_nodes] == redis_cluster.startup_nodes
