"""The shard layout: which of a namespace's S shards holds a cell.

A namespace's state is spread over S shards, S fixed when the namespace is created. A cell lives
in shard ``crc32c(encoded level of the first grouping factor) mod S``: a one-factor model hashes
its group id, and every cell of one hospital of a nested ``(1 | hospital) + (1 | hospital:ward)``
model shares that hospital's shard (a query of one hospital's cells reads one shard). Each shard
is one Redis Cluster hash tag, so one script call can check and apply a shard's part of a batch
atomically; Flink's key groups are the same idea.

>>> shard_key("A17"), shard_key('["A17","ward 3"]')
('A17', 'A17')
>>> shard_of("A17", 256) == shard_of('["A17","ward 3"]', 256)
True
>>> shard_ids(["a", "b", "a"], 1).tolist()
[0, 0, 0]
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import crc32c
import numpy as np

from streamlme.stats import GroupStats
from streamlme.store.keys import encode_group

#: Shards of a new namespace unless configured (``[redis] shards``).
DEFAULT_SHARDS = 256


def shard_key(key: str) -> str:
    """The level a cell is sharded by: its first grouping level (a cell key is a JSON array of
    levels, `streamlme.spec.ModelSpec.cell_key`), or the key itself (a one-factor group id)."""
    if key.startswith("["):
        try:
            levels = json.loads(key)
        except ValueError:
            return key
        if isinstance(levels, list) and levels and isinstance(levels[0], str):
            return levels[0]
    return key


def shard_of(key: str, n_shards: int) -> int:
    """The shard of one cell key."""
    return crc32c.crc32c(encode_group(shard_key(key)).encode("ascii")) % n_shards


def shard_ids(keys: Sequence[str], n_shards: int) -> np.ndarray:
    """The shard of every key, as an int array (one hash per distinct first level)."""
    if n_shards == 1:
        return np.zeros(len(keys), dtype=np.intp)
    seen: dict[str, int] = {}
    out = np.empty(len(keys), dtype=np.intp)
    for i, key in enumerate(keys):
        s = seen.get(key)
        if s is None:
            s = seen[key] = shard_of(key, n_shards)
        out[i] = s
    return out


def take(stats: GroupStats, idx: np.ndarray) -> GroupStats:
    """The groups at positions ``idx`` of ``stats``."""
    return GroupStats([stats.keys[i] for i in idx.tolist()], stats.n[idx], stats.mean[idx],
                      stats.C[idx], stats.t[idx])


def split(stats: GroupStats | None, n_shards: int) -> Mapping[int, GroupStats]:
    """``stats`` cut into one `GroupStats` per shard it touches."""
    if stats is None or not len(stats):
        return {}
    ids = shard_ids(stats.keys, n_shards)
    if n_shards == 1:
        return {0: stats}
    order = np.argsort(ids, kind="stable")
    bounds = np.flatnonzero(np.diff(ids[order])) + 1
    return {int(ids[part[0]]): take(stats, part) for part in np.split(order, bounds)}
