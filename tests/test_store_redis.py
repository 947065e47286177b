"""RedisStore beyond the shared contract: key layout, encoding, the script, restarts, failures."""

from __future__ import annotations

import string

import numpy as np
import pytest
import redis
from fixtures_redis import CountingRedis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot
from test_store_contract import WEIRD_IDS, assert_stats_close, random_rows

from streamlme.stats import GroupStats
from streamlme.store import KeyNameError, OffsetRange, RedisStore, StoreError
from streamlme.store.keys import MAX_GROUP_BYTES, decode_group, encode_group


@pytest.fixture
def store(redis_url: str, namespace: str) -> RedisStore:
    return RedisStore(redis_url, namespace)


def namespace_keys(store: RedisStore) -> list[bytes]:
    pattern = "{" + store.namespace + "*"
    return sorted(store.client.scan_iter(match=pattern, count=1000))


def command_calls(client: redis.Redis, command: str) -> int:
    """How often the server ran ``command`` (INFO commandstats), pipelined or not."""
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


# -- key layout -------------------------------------------------------------------------------


def test_every_key_is_under_the_namespace_tag_or_one_shard_tag(redis_url, namespace):
    store = RedisStore(redis_url, namespace, columns=["x", "y"], shards=8)
    store.merge(GroupStats.from_rows(WEIRD_IDS, np.ones((len(WEIRD_IDS), 2))),
                offsets={("events", 0): OffsetRange(0, 1)})
    store.put_model(b"m", fence=store.acquire_lease("writer", 60.0))
    keys = namespace_keys(store)
    own = [k for k in keys if k.startswith(f"{{{namespace}}}".encode())]
    # meta, 4 model keys, the lease and its token counter
    assert len(own) == 7 and {key_slot(k) for k in own} == {key_slot(namespace.encode())}
    for shard in range(8):
        tag = f"{namespace}:s{shard}".encode()
        mine = [k for k in keys if k.startswith(b"{" + tag + b"}")]
        assert mine and {key_slot(k) for k in mine} == {key_slot(tag)}
    assert len(keys) == len(own) + sum(
        len([k for k in keys if k.startswith(f"{{{namespace}:s{s}}}".encode())]) for s in range(8))
    got = sorted(g for s in range(8) for g in store.read_shard(s).keys)
    assert got == sorted(WEIRD_IDS)
    assert all(store.shard_of(g) == s for s in range(8) for g in store.read_shard(s).keys)


def test_layout_is_as_documented(redis_url, namespace):
    store = RedisStore(redis_url, namespace, shards=4)
    store.merge(GroupStats.from_rows(["A17"], [[1.0, 2.0]]),
                offsets={("events", 3): OffsetRange(0, 1)})
    ns, c = store.namespace, store.client
    meta = c.hgetall(f"{{{ns}}}:meta")
    assert meta[b"layout"] == b"2" and meta[b"shards"] == b"4" and b"created_at" in meta
    s = store.shard_of("A17")
    n, m, _, _ = GroupStats.from_bytes_one(c.hget(f"{{{ns}:s{s}}}:stats", "A17"))
    assert n == 1.0 and m.tolist() == [1.0, 2.0]
    for shard in range(4):  # the batch's offsets are recorded by every shard
        assert c.hgetall(f"{{{ns}:s{shard}}}:offsets") == {b"events:3": b"1"}
    shard_meta = c.hgetall(f"{{{ns}:s{s}}}:meta")
    assert shard_meta[b"d"] == b"2" and shard_meta[b"format"] == b"1"
    assert shard_meta[b"version"] == b"1"
    store.merge(GroupStats.from_rows(['["A","x:y"]'], [[1.0, 2.0]]))
    cell = "%5B%22A%22%2C%22x%3Ay%22%5D"
    s = store.shard_of('["A","x:y"]')
    assert s == store.shard_of("A")  # a cell lives with its first grouping level
    assert c.zrange(f"{{{ns}:s{s}}}:levels", 0, -1) == [f"0:A:{cell}".encode(),
                                                        f"1:x%3Ay:{cell}".encode()]
    assert c.hexists(f"{{{ns}:s{s}}}:stats", cell)


def test_the_shard_count_is_fixed_when_the_namespace_is_created(redis_url, namespace):
    first = RedisStore(redis_url, namespace, shards=8)
    assert first.n_shards == 8
    first.merge(GroupStats.from_rows(["a"], [[1.0, 2.0]]))
    later = RedisStore(redis_url, namespace, shards=64)
    assert later.n_shards == 8 and later.get("a").n.tolist() == [1.0]


def test_a_namespace_in_the_one_slot_layout_is_refused_not_misread(redis_url, namespace):
    c = redis.Redis.from_url(redis_url)
    c.hset(f"{{{namespace}}}:meta", mapping={"d": 2, "format": 1, "layout": 1})
    c.zadd(f"{{{namespace}}}:groups", {"a": 0})
    store = RedisStore(c, namespace)
    with pytest.raises(StoreError, match="store migrate"):
        store.get("a")
    with pytest.raises(StoreError, match="one-slot layout"):
        store.merge(GroupStats.from_rows(["b"], [[1.0, 2.0]]))
    assert c.zrange(f"{{{namespace}}}:groups", 0, -1) == [b"a"]


@pytest.mark.parametrize("bad", ["", "a{b", "a}b", "{x}", "a b", "a\nb"])
def test_namespace_must_be_a_valid_hash_tag(redis_url, bad):
    with pytest.raises(KeyNameError):
        RedisStore(redis_url, bad)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.text(max_size=80))
def test_group_encoding_is_injective_and_tag_safe(a, b):
    ea, eb = encode_group(a), encode_group(b)
    assert decode_group(ea) == a
    assert set(ea) <= set(string.ascii_letters + string.digits + "_.-~%")
    assert (ea == eb) == (a == b)


def test_group_ids_longer_than_256_bytes_are_refused(store):
    assert decode_group(encode_group("x" * MAX_GROUP_BYTES)) == "x" * MAX_GROUP_BYTES
    with pytest.raises(KeyNameError, match="257 UTF-8 bytes"):
        store.merge(GroupStats.from_rows(["x" * (MAX_GROUP_BYTES + 1)], [[1.0]]))
    assert store.n_groups() == 0


# -- the merge script -------------------------------------------------------------------------


def test_script_matches_python_merge_to_the_bit(store):
    labels, W = random_rows(10, 3000, 5, [f"g{i}" for i in range(200)])
    a = GroupStats.from_rows(labels[:1500], W[:1500])
    b = GroupStats.from_rows(labels[1500:], W[1500:])
    out = GroupStats.from_rows(labels[1500:1600], W[1500:1600])
    store.merge(a)
    store.merge(b, retracts=out)
    python = a.copy().merge(b).retract(out)
    got = store.get_many(python.keys)
    iu = np.triu_indices(5)
    np.testing.assert_array_equal(got.n, python.n)
    np.testing.assert_array_equal(got.mean, python.mean)
    np.testing.assert_array_equal(got.C[:, iu[0], iu[1]], python.C[:, iu[0], iu[1]])


def test_a_merge_is_one_script_call_per_shard_in_one_round_trip(redis_url, namespace):
    client = CountingRedis.from_url(redis_url)
    store = RedisStore(client, namespace, shards=8)
    labels, W = random_rows(11, 2000, 3, [f"g{i}" for i in range(300)])
    store.merge(GroupStats.from_rows(labels[:10], W[:10]))
    before = command_calls(client, "evalsha")
    client.commands.clear()
    store.merge(GroupStats.from_rows(labels, W), retracts=GroupStats.from_rows(labels[:5], W[:5]),
                offsets={("events", 0): OffsetRange(0, 2000)})
    assert len(client.commands) == 1 and client.commands[0].startswith("PIPELINE:EVALSHA")
    assert command_calls(client, "evalsha") - before == 8


def test_a_corrupt_value_fails_that_shards_part_before_any_write(redis_url, namespace):
    store = RedisStore(redis_url, namespace, shards=1)
    store.merge(GroupStats.from_rows(["a", "b"], [[1.0, 2.0], [3.0, 4.0]]),
                offsets={("events", 0): OffsetRange(0, 2)})
    store.client.hset(store.keys.shard(0).stats, "b", b"not statistics")
    with pytest.raises(StoreError, match="not a record"):
        store.merge(GroupStats.from_rows(["a", "b", "c"], np.ones((3, 2))),
                    offsets={("events", 0): OffsetRange(2, 5)})
    assert store.get("a").n.tolist() == [1.0]
    assert store.get("c") is None
    assert store.offsets("events") == {0: 2}


def test_width_and_columns_are_checked_against_the_namespace(redis_url, namespace):
    RedisStore(redis_url, namespace, columns=["x", "y"]).merge(
        GroupStats.from_rows(["a"], [[1.0, 2.0]]))
    with pytest.raises(StoreError, match="2 columns, not 3"):
        RedisStore(redis_url, namespace, d=3)
    with pytest.raises(StoreError, match="columns"):
        RedisStore(redis_url, namespace, columns=["x", "z"])
    unchecked = RedisStore(redis_url, namespace)  # no width given: another width is refused
    with pytest.raises(StoreError, match="batch has 3 columns; this store holds 2"):
        unchecked.merge(GroupStats.from_rows(["b"], [[1.0, 2.0, 3.0]]))
    assert unchecked.d == 2 and unchecked.n_groups() == 1


def test_a_client_decoding_responses_is_refused(redis_url):
    with pytest.raises(StoreError, match="decode_responses"):
        RedisStore(redis.Redis.from_url(redis_url, decode_responses=True), "x")


def test_zombie_writer_through_another_connection_is_refused(redis_url, namespace):
    live, zombie = RedisStore(redis_url, namespace), RedisStore(redis_url, namespace)
    labels, W = random_rows(12, 40, 2, ["a", "b"])
    batch = GroupStats.from_rows(labels[:20], W[:20])
    assert zombie.merge(batch, offsets={("events", 0): OffsetRange(0, 20)}).applied
    # the partition moved to `live`, which continued from the store's offset
    assert live.merge(GroupStats.from_rows(labels[20:], W[20:]),
                      offsets={("events", 0): OffsetRange(20, 40)}).applied
    late = zombie.merge(batch, offsets={("events", 0): OffsetRange(0, 20)})
    assert not late.applied and late.conflicts == {("events", 0): 40}
    assert_stats_close(live.get_many(["a", "b"]), GroupStats.from_rows(labels, W))


# -- restarts and failures --------------------------------------------------------------------


def test_restart_reloads_the_script_and_keeps_aof_data(redis_server_factory):
    server = redis_server_factory(appendonly="yes", appendfsync="always")
    store = RedisStore(server.url, "restart")
    labels, W = random_rows(13, 600, 3, [f"g{i}" for i in range(50)])
    store.merge(GroupStats.from_rows(labels[:300], W[:300]),
                offsets={("events", 0): OffsetRange(0, 300)})
    server.stop(kill=True)  # a crash: only what appendfsync wrote survives
    server.start()
    assert store.client.script_exists(store._merge.sha) == [False]
    assert store.offsets("events") == {0: 300}
    result = store.merge(GroupStats.from_rows(labels[300:], W[300:]),
                         offsets={("events", 0): OffsetRange(300, 600)})  # NOSCRIPT, reloaded
    assert result.applied
    assert_stats_close(store.get_many(sorted(set(labels))), GroupStats.from_rows(labels, W))


def test_a_lost_connection_raises_and_leaves_state_whole(redis_server_factory):
    server = redis_server_factory(appendonly="yes", appendfsync="always")
    client = redis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1,
                                  retry=None)
    store = RedisStore(client, "lost")
    labels, W = random_rows(14, 100, 2, ["a", "b", "c"])
    store.merge(GroupStats.from_rows(labels[:50], W[:50]),
                offsets={("events", 0): OffsetRange(0, 50)})
    server.stop()
    with pytest.raises(redis.exceptions.ConnectionError):
        store.merge(GroupStats.from_rows(labels[50:], W[50:]),
                    offsets={("events", 0): OffsetRange(50, 100)})
    server.start()
    assert store.offsets("events") == {0: 50}
    assert_stats_close(store.get_many(["a", "b", "c"]), GroupStats.from_rows(labels[:50], W[:50]))
    assert store.merge(GroupStats.from_rows(labels[50:], W[50:]),
                       offsets={("events", 0): OffsetRange(50, 100)}).applied


# -- reads ------------------------------------------------------------------------------------


def test_a_levels_cells_are_read_from_its_shard_and_clear_leaves_nothing(redis_url, namespace):
    store = RedisStore(redis_url, namespace, shards=16)
    keys = [f'["{a}","{b}"]' for a in ("p", "q") for b in range(50)]
    store.merge(GroupStats.from_rows(keys, np.ones((len(keys), 2))))
    q = store.keys.shard(store.shard_of("q")).levels
    assert store.client.zcard(q) >= 100  # the 50 cells of q, indexed by both their levels
    assert sorted(store.cells_of(0, "q")) == sorted(k for k in keys if k.startswith('["q"'))
    assert sorted(store.cells_of(1, "7")) == ['["p","7"]', '["q","7"]']
    store.clear()
    assert namespace_keys(store) == []


def test_get_is_one_command_and_scan_is_bounded(redis_url, namespace):
    client = CountingRedis.from_url(redis_url)
    store = RedisStore(client, namespace, shards=8)
    keys = [f"g{i}" for i in range(2500)]
    store.merge(GroupStats.from_codes(np.arange(2500), keys, np.ones((2500, 2))))
    client.commands.clear()
    store.get("g7")
    assert client.commands == ["HGET"]
    client.commands.clear()
    store.get_many(keys[:700])
    assert len(client.commands) == 1  # one pipelined round trip
    assert store.get_many(keys[:700]).keys == keys[:700]
    parts = list(store.scan(chunk=1000))
    assert all(len(p) <= 1000 for p in parts)
    assert sorted(k for p in parts for k in p.keys) == sorted(keys)
