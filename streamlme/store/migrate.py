"""Moving a namespace from the one-slot layout of streamlme 0.1 to the sharded layout.

In 0.1 every key of a namespace carried the one hash tag ``{ns}``: a string per group
(``{ns}:g:<id>``), a registry (``{ns}:groups``), offsets (``{ns}:offsets``), a level index
(``{ns}:levels``) and a meta hash with ``layout`` 1. `migrate` copies every group into its shard
(a merge into an empty shard is an exact copy), gives every shard the old offsets, records the
new layout and only then deletes the old keys. Model records, the lease, the fence and consumer
status keep their keys under ``{ns}``.

Stop the consumers first. A migration that stops half-way can be run again: a shard that
already holds its copy (its meta has a ``version``) is skipped, and the old keys stay until
every shard is written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from streamlme.stats import GroupStats
from streamlme.store.base import OffsetRange, ShardBatch
from streamlme.store.errors import StoreError
from streamlme.store.keys import decode_group, parse_offset_field
from streamlme.store.redis import LAYOUT, RedisStore
from streamlme.store.shards import split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MigrationReport:
    """What `migrate` did (its JSON form is what ``streamlme store migrate`` prints)."""

    namespace: str
    status: str  # "migrated", or "current" when the namespace was already sharded
    groups: int
    shards: int
    offsets: dict[str, int]
    seconds: float


def migrate(store: RedisStore, chunk: int = 10_000) -> MigrationReport:
    """Move ``store``'s namespace to the sharded layout (see the module docstring)."""
    t0 = time.perf_counter()
    k = store.keys
    client = store.client
    meta = {f.decode(): v.decode() for f, v in client.hgetall(k.meta).items()}
    legacy = bool(client.exists(k.legacy_groups) or client.exists(k.legacy_offsets))
    if meta.get("layout") == str(LAYOUT) and "migrating" not in meta and not legacy:
        return MigrationReport(store.namespace, "current", store.n_groups(), store.n_shards,
                               {}, time.perf_counter() - t0)
    if not meta and not legacy:
        raise StoreError(f"namespace {store.namespace!r} holds nothing to migrate")
    offsets = {f.decode(): int(v) for f, v in client.hgetall(k.legacy_offsets).items()}
    ranges = {parse_offset_field(f): OffsetRange(v, v) for f, v in offsets.items()}
    columns = json.loads(meta["columns"]) if "columns" in meta else None
    # Record the new layout (marked unfinished) so the shards can be written; readers that
    # see "migrating" are refused until the end.
    client.hset(k.meta, mapping={"layout": LAYOUT, "migrating": 1,
                                 "shards": meta.get("shards", store._new_shards),
                                 "created_at": meta.get("created_at", repr(time.time()))})
    n_shards = int(client.hget(k.meta, "shards"))
    target = RedisStore(client, store.namespace, shards=n_shards,
                        model_history=store.model_history)
    target._shards = n_shards  # readers are refused while "migrating" is set; this writer isn't
    target.columns = tuple(columns) if columns is not None else None
    done = target.shard_versions()
    groups = _legacy_groups(store, chunk)
    by_shard: dict[int, list[GroupStats]] = {}
    n_groups = 0
    for part in groups:
        n_groups += len(part)
        for shard, stats in split(part, n_shards).items():
            if not done[shard]:
                by_shard.setdefault(shard, []).append(stats)
    for shard in range(n_shards):
        if done[shard]:
            continue
        parts = by_shard.get(shard, [])
        adds = _concat(parts) if parts else GroupStats.empty(int(meta.get("d", 0)))
        target.merge_shards({shard: ShardBatch(adds, None, ranges, starts=True)})
        if not len(adds):  # an empty shard still records that it is done
            client.hset(k.shard(shard).meta, "version", 1)
    _delete_legacy(store)
    client.hdel(k.meta, "migrating", "d", "format", "columns")
    log.info("namespace %s: %d groups moved into %d shards", store.namespace, n_groups, n_shards)
    return MigrationReport(store.namespace, "migrated", n_groups, n_shards, offsets,
                           time.perf_counter() - t0)


def _legacy_groups(store: RedisStore, chunk: int) -> Iterator[GroupStats]:
    """Every group of the old layout: the registry paged by value, values by MGET."""
    k, client = store.keys, store.client
    prefix = k.legacy_group_prefix.encode()
    low = b"-"
    while True:
        members = client.zrangebylex(k.legacy_groups, low, b"+", start=0, num=chunk)
        if not members:
            return
        values = client.mget([prefix + m for m in members])
        found = [(decode_group(m), v) for m, v in zip(members, values, strict=True) if v]
        if found:
            keys, vals = zip(*found, strict=True)
            yield GroupStats.from_bytes(list(keys), list(vals))
        if len(members) < chunk:
            return
        low = b"(" + members[-1]


def _concat(parts: list[GroupStats]) -> GroupStats:
    if len(parts) == 1:
        return parts[0]
    out = parts[0].copy()
    for p in parts[1:]:
        out.merge(p)  # distinct groups: a merge appends them unchanged
    return out


def _delete_legacy(store: RedisStore, batch: int = 1000) -> None:
    k, client = store.keys, store.client
    prefix = k.legacy_group_prefix.encode()
    while True:
        members = client.zrange(k.legacy_groups, 0, batch - 1)
        if not members:
            break
        client.unlink(*[prefix + m for m in members])
        client.zrem(k.legacy_groups, *members)
    client.unlink(k.legacy_groups, k.legacy_offsets, k.legacy_levels)
