"""State stores: where per-group statistics, Kafka offsets and model versions live.

`MemoryStore` keeps them in this process (with file snapshots); `RedisStore` in Redis, merged by
one Lua script per batch. Both implement `StateStore` (see `streamlme.store.base`).
"""

from streamlme.store.base import MergeResult, OffsetRange, StateStore, TopicPartition
from streamlme.store.errors import KeyNameError, StaleFenceError, StoreError
from streamlme.store.keys import decode_group, encode_group
from streamlme.store.memory import MemoryStore
from streamlme.store.redis import RedisStore

__all__ = [
    "KeyNameError",
    "MemoryStore",
    "MergeResult",
    "OffsetRange",
    "RedisStore",
    "StaleFenceError",
    "StateStore",
    "StoreError",
    "TopicPartition",
    "decode_group",
    "encode_group",
]
