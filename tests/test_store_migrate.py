"""`streamlme store migrate`: a namespace written in the one-slot layout of streamlme 0.1 is
moved to the sharded layout exactly, and until then it is refused, never misread."""

from __future__ import annotations

import json

import numpy as np
import pytest
import redis
from click.testing import CliRunner
from test_store_contract import assert_stats_close, random_rows

from streamlme.cli import main
from streamlme.stats import GroupStats
from streamlme.store import OffsetRange, RedisStore, ShardBatch, StoreError
from streamlme.store.keys import encode_group
from streamlme.store.migrate import migrate
from streamlme.store.shards import split


def write_legacy(client: redis.Redis, ns: str, stats: GroupStats,
                 offsets: dict[str, int]) -> None:
    """The 0.1 layout, key by key as its merge script wrote it."""
    pipe = client.pipeline(transaction=False)
    for key, value in zip(stats.keys, stats.to_bytes(), strict=True):
        pipe.set(f"{{{ns}}}:g:{encode_group(key)}", value)
        pipe.zadd(f"{{{ns}}}:groups", {encode_group(key): 0})
    pipe.hset(f"{{{ns}}}:offsets", mapping=offsets)
    pipe.hset(f"{{{ns}}}:meta", mapping={"d": stats.d, "format": 1, "layout": 1,
                                         "columns": json.dumps(["x", "y"])})
    pipe.hset(f"{{{ns}}}:models", "1", b'{"m": 1}')
    pipe.set(f"{{{ns}}}:model:current", 1)
    pipe.set(f"{{{ns}}}:model:seq", 1)
    pipe.execute()


def test_migration_copies_every_group_exactly_and_keeps_offsets_and_models(redis_url, namespace):
    client = redis.Redis.from_url(redis_url)
    keys = [f"g{i}" for i in range(300)] + ['["A","a"]', '["A","b"]', "ward 3/{icu}:é"]
    labels, W = random_rows(5, 3000, 2, keys)
    old = GroupStats.from_rows(labels, W)
    write_legacy(client, namespace, old, {"events:0": 1700, "events:1": 1300})
    with pytest.raises(StoreError, match="store migrate"):
        RedisStore(client, namespace, columns=["x", "y"])

    report = migrate(RedisStore(client, namespace, shards=16))
    assert report.status == "migrated" and report.groups == len(old) and report.shards == 16

    store = RedisStore(client, namespace, columns=["x", "y"])
    got = store.get_many(old.keys)
    np.testing.assert_array_equal(got.n, old.n)
    np.testing.assert_array_equal(got.mean, old.mean)
    np.testing.assert_array_equal(got.C, old.C)
    assert store.n_shards == 16 and store.n_groups() == len(old)
    assert store.offsets("events") == {0: 1700, 1: 1300}
    assert all(per == {0: 1700, 1: 1300} for per in store.shard_offsets("events").values())
    assert sorted(store.cells_of(0, "A")) == ['["A","a"]', '["A","b"]']
    assert store.get_model() == b'{"m": 1}' and store.current_model_version() == 1
    assert not client.exists(f"{{{namespace}}}:groups", f"{{{namespace}}}:offsets",
                             f"{{{namespace}}}:g:g1")
    # the migrated namespace goes on from its offsets
    more = GroupStats.from_rows(["g1"], [[1.0, 2.0]])
    assert store.merge(more, offsets={("events", 0): OffsetRange(1700, 1701)}).applied
    assert_stats_close(store.get("g1"), old.select(["g1"]).merge(more))
    assert migrate(RedisStore(client, namespace)).status == "current"


def test_a_migration_stopped_half_way_can_be_run_again(redis_url, namespace):
    client = redis.Redis.from_url(redis_url)
    labels, W = random_rows(6, 500, 2, [f"g{i}" for i in range(60)])
    old = GroupStats.from_rows(labels, W)
    write_legacy(client, namespace, old, {"events:0": 500})
    first = RedisStore(client, namespace, shards=8)
    # a first run that wrote two shards and stopped: what migrate leaves at that moment
    client.hset(first.keys.meta, mapping={"layout": 2, "migrating": 1, "shards": 8})
    first._shards = 8
    for shard, part in list(split(old, 8).items())[:2]:
        first.merge_shards({shard: ShardBatch(part, None, {("events", 0): OffsetRange(500, 500)},
                                              starts=True)})
    with pytest.raises(StoreError, match="being migrated"):
        RedisStore(client, namespace).get("g1")
    assert migrate(RedisStore(client, namespace)).status == "migrated"
    store = RedisStore(client, namespace)
    assert_stats_close(store.get_many(old.keys), old)
    assert store.n_groups() == len(old)


def test_the_cli_migrates_and_reports(tmp_path, redis_url, namespace):
    client = redis.Redis.from_url(redis_url)
    old = GroupStats.from_rows(["a", "b", "a"], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    write_legacy(client, namespace, old, {"events:0": 3})
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\nformula = "y ~ 1 + x + (1 | g)"\n[redis]\nurl = "{redis_url}"\n'
                   f'namespace = "{namespace}"\nshards = 4\n')
    result = CliRunner().invoke(main, ["store", "migrate", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["status"] == "migrated" and report["groups"] == 2 and report["shards"] == 4
    empty = tmp_path / "e.toml"
    empty.write_text(cfg.read_text().replace(namespace, namespace + "-none"))
    result = CliRunner().invoke(main, ["store", "migrate", "--config", str(empty)])
    assert result.exit_code == 1 and "nothing to migrate" in result.output
