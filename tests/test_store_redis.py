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
    return sorted(store.client.scan_iter(match=store.keys.pattern, count=1000))


# -- key layout -------------------------------------------------------------------------------


def test_every_key_of_a_namespace_is_in_one_cluster_slot(redis_url, namespace):
    store = RedisStore(redis_url, namespace, columns=["x", "y"])
    store.merge(GroupStats.from_rows(WEIRD_IDS, np.ones((len(WEIRD_IDS), 2))),
                offsets={("events", 0): OffsetRange(0, 1)})
    store.put_model(b"m", fence=store.acquire_lease("writer", 60.0))
    keys = namespace_keys(store)
    # groups, registry, offsets, meta, 4 model keys, lease and its token counter
    assert len(keys) == len(WEIRD_IDS) + 9
    assert {key_slot(k) for k in keys} == {key_slot(namespace.encode())}
    prefix = store.keys.group_prefix.encode()
    groups = sorted(decode_group(k[len(prefix):]) for k in keys if k.startswith(prefix))
    assert groups == sorted(WEIRD_IDS)


def test_layout_is_as_documented(store):
    store.merge(GroupStats.from_rows(["A17"], [[1.0, 2.0]]),
                offsets={("events", 3): OffsetRange(0, 1)})
    ns, c = store.namespace, store.client
    assert c.type(f"{{{ns}}}:g:A17") == b"string"
    assert c.zrange(f"{{{ns}}}:groups", 0, -1) == [b"A17"]
    assert c.hgetall(f"{{{ns}}}:offsets") == {b"events:3": b"1"}
    meta = c.hgetall(f"{{{ns}}}:meta")
    assert meta[b"d"] == b"2" and meta[b"format"] == b"1"
    n, m, _, _ = GroupStats.from_bytes_one(c.get(f"{{{ns}}}:g:A17"))
    assert n == 1.0 and m.tolist() == [1.0, 2.0]
    store.merge(GroupStats.from_rows(['["A","x:y"]'], [[1.0, 2.0]]))
    cell = "%5B%22A%22%2C%22x%3Ay%22%5D"
    assert c.zrange(f"{{{ns}}}:levels", 0, -1) == [f"0:A:{cell}".encode(),
                                                   f"1:x%3Ay:{cell}".encode()]
    assert c.zscore(f"{{{ns}}}:groups", cell) == 0


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


def test_a_merge_is_one_script_call(redis_url, namespace):
    client = CountingRedis.from_url(redis_url)
    store = RedisStore(client, namespace)
    labels, W = random_rows(11, 2000, 3, [f"g{i}" for i in range(300)])
    store.merge(GroupStats.from_rows(labels[:10], W[:10]))
    client.commands.clear()
    store.merge(GroupStats.from_rows(labels, W), retracts=GroupStats.from_rows(labels[:5], W[:5]),
                offsets={("events", 0): OffsetRange(0, 2000)})
    assert client.commands == ["EVALSHA"]


def test_a_corrupt_value_fails_the_batch_before_any_write(store):
    store.merge(GroupStats.from_rows(["a", "b"], [[1.0, 2.0], [3.0, 4.0]]),
                offsets={("events", 0): OffsetRange(0, 2)})
    store.client.set(store.keys.group("b"), b"not statistics")
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
    with pytest.raises(StoreError, match="holds statistics of 2 columns"):
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


def test_a_levels_cells_are_one_round_trip_and_the_index_is_in_the_namespace_slot(
        redis_url, namespace):
    client = CountingRedis.from_url(redis_url)
    store = RedisStore(client, namespace)
    keys = [f'["{a}","{b}"]' for a in ("p", "q") for b in range(50)]
    store.merge(GroupStats.from_rows(keys, np.ones((len(keys), 2))))
    assert key_slot(store.keys.levels.encode()) == key_slot(namespace.encode())
    client.commands.clear()
    assert len(store.cells_of(0, "q")) == 50 and client.commands == ["ZRANGEBYLEX"]
    store.clear()
    assert namespace_keys(store) == []


def test_get_is_one_round_trip_and_scan_is_bounded(redis_url, namespace):
    client = CountingRedis.from_url(redis_url)
    store = RedisStore(client, namespace)
    keys = [f"g{i}" for i in range(2500)]
    store.merge(GroupStats.from_codes(np.arange(2500), keys, np.ones((2500, 2))))
    client.commands.clear()
    store.get("g7")
    assert client.commands == ["GET"]
    client.commands.clear()
    store.get_many(keys[:700])
    assert client.commands == ["MGET"]
    client.commands.clear()
    parts = list(store.scan(chunk=1000))
    assert [len(p) for p in parts] == [1000, 1000, 500]
    assert client.commands == ["ZRANGEBYLEX", "MGET"] * 3
