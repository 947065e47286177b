"""State stores: where per-group statistics, Kafka offsets and model versions live.

`MemoryStore` keeps them in this process (with file snapshots); `RedisStore` in Redis or a Redis
Cluster, spread over shards (`streamlme.store.shards`) and merged by one Lua script per shard.
Both implement `StateStore` (see `streamlme.store.base`); `open_store` builds the configured one.
"""

from streamlme.store.base import MergeResult, OffsetRange, ShardBatch, StateStore, TopicPartition
from streamlme.store.connect import StoreAddress, close_store, open_store, redis_client
from streamlme.store.errors import KeyNameError, StaleFenceError, StoreError
from streamlme.store.health import Gap, Health, ModelKey, StateLostError
from streamlme.store.keys import decode_group, encode_group
from streamlme.store.memory import MemoryStore
from streamlme.store.redis import RedisStore

__all__ = [
    "Gap",
    "Health",
    "KeyNameError",
    "MemoryStore",
    "MergeResult",
    "ModelKey",
    "OffsetRange",
    "RedisStore",
    "ShardBatch",
    "StaleFenceError",
    "StateLostError",
    "StateStore",
    "StoreAddress",
    "StoreError",
    "TopicPartition",
    "close_store",
    "decode_group",
    "encode_group",
    "open_store",
    "redis_client",
]
