"""RedisStore: per-cell statistics, Kafka offsets and model versions in Redis (or a Cluster).

The state of a namespace ``ns`` is spread over S shards (S fixed when the namespace is created,
`streamlme.store.shards`). Each shard has its own hash tag, so each lives in one Redis Cluster
slot, and the shards of a namespace spread over the Cluster's nodes. Standalone Redis uses the
same layout:

==================================  ======  ====================================================
key                                 type    value
==================================  ======  ====================================================
``{ns}:meta``                       hash    ``layout`` (2), ``shards``, ``created_at``,
                                            ``epoch``; ``flag``, ``reason``, ``since`` while
                                            flagged (`streamlme.store.health`); ``pinned``,
                                            ``pinned_at`` while a version is pinned
``{ns}:gaps``                       hash    ``<topic>:<partition>:<from>`` -> an accepted
                                            offset gap (JSON)
``{ns}:models``                     hash    model version -> record (bytes)
``{ns}:model:seq``                  string  last model version issued (INCR)
``{ns}:model:current``              string  the version queries use
``{ns}:model:fence``                string  highest fencing token a model writer has shown
``{ns}:lease``                      string  refresh leader: ``owner|token``, expires (PX ttl)
``{ns}:lease:seq``                  string  last lease token issued (INCR)
``{ns}:consumers``, ``…:<id>``      zset,   consumer status (`streamlme.status`)
                                    hash
``{ns}:ingest``                     hash    all-time ingest totals
``{ns:s<i>}:stats``                 hash    encoded cell id -> statistics (`streamlme.stats`)
``{ns:s<i>}:levels``                zset    cells by level: ``<j>:<encoded level>:<encoded id>``
``{ns:s<i>}:offsets``               hash    ``<topic>:<partition>`` -> next offset this shard
                                            has applied
``{ns:s<i>}:meta``                  hash    ``d``, ``format``, ``columns`` (JSON), ``version``
``{ns:s<i>}:dead``                  hash    ``topic:partition:offset`` -> a dead letter the
                                            merge refused and kept until it is sent
==================================  ======  ====================================================

Cell ids are percent-encoded (`streamlme.store.keys.encode_group`). A shard's statistics are one
hash: reading a shard is one HGETALL, an atomic snapshot that sees every cell once, and a
refresh reads all shards pipelined, a node at a time.

`RedisStore.merge_shards` applies a batch's parts with one EVALSHA of ``merge.lua`` per shard,
pipelined (per node, on a Cluster): each call checks that shard's recorded offset of every
partition against the part's start, merges additions and retractions with the same arithmetic as
`streamlme.stats`, and records the new offsets, all atomically. A lost connection leaves each
shard's part applied entirely or not at all; a retried call whose first attempt did land is
refused with ``conflicts`` equal to the part's ends (an exact replay), which the consumer
recognises. Redirections of a Cluster (MOVED, ASK, TRYAGAIN during a slot migration, CLUSTERDOWN
and lost connections during a failover) are retried here with backoff for up to
``retry_seconds``; after that the error reaches the caller, which retries the same parts. On
standalone Redis errors reach the caller at once (there, a lost connection is an outage).

A namespace in the one-slot layout of streamlme 0.1 (every key under ``{ns}``) is refused with
a message naming ``streamlme store migrate`` (`streamlme.store.migrate`); it is never misread.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import redis
from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    NoScriptError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamlme.stats import FORMAT_VERSION, HEADER, MAGIC, GroupStats
from streamlme.store.base import (
    MergeResult,
    ModelWriteRefusedError,
    OffsetRange,
    ShardBatch,
    Step,
    TopicPartition,
)
from streamlme.store.errors import StaleFenceError, StoreError
from streamlme.store.health import Gap, Health, ModelKey, check_flag, new_epoch
from streamlme.store.keys import (
    Keys,
    decode_group,
    encode_group,
    offset_field,
    parse_offset_field,
)
from streamlme.store.policy import MODEL_HISTORY
from streamlme.store.shards import DEFAULT_SHARDS, shard_of, split, take

if TYPE_CHECKING:
    from streamlme.store.connect import StoreAddress

_SCRIPT_ERRORS = ("WIDTH", "COLUMNS", "CORRUPT", "NO_VERSION")
#: The sharded layout's version, recorded in ``{ns}:meta`` (1 was the one-slot layout).
LAYOUT = 2
#: Errors of a Cluster in motion (a slot migrating, a failover) or of a connection, after which
#: the same command may succeed.
REDIRECTIONS: tuple[type[BaseException], ...] = (
    TryAgainError, AskError, ClusterDownError, ClusterError, RedisClusterException,
    RedisConnectionError, RedisTimeoutError,
)
#: Shards read per pipelined round trip by `scan`, at most.
SHARDS_PER_ROUND = 64

T = TypeVar("T")
Client = redis.Redis | RedisCluster


def _lua(name: str) -> str:
    return files("streamlme.store").joinpath(name).read_text(encoding="utf-8")


def _records(stats: GroupStats | None) -> bytes:
    """All groups of ``stats`` as one concatenation of their byte records."""
    return b"".join(stats.to_bytes()) if stats is not None and len(stats) else b""


def _step_records(steps: Sequence[Step]) -> bytes:
    """The steps' one-group deltas as one concatenation of their byte records."""
    return b"".join(step.stats.to_bytes_one(0) for step in steps)


def _merge_result(reply: Sequence[Any], retract_keys: Sequence[str]) -> MergeResult:
    """A `MergeResult` from merge.lua's reply (see the script's header)."""
    code = reply[0]
    if code == 0:
        return MergeResult(applied=False, conflicts={
            parse_offset_field(reply[i]): int(reply[i + 1]) for i in range(1, len(reply), 2)})
    if code == 2:
        return MergeResult(applied=False, missing=[parse_offset_field(f) for f in reply[1:]])
    if code == 3:
        return MergeResult(applied=False, nonfinite=_decode(reply[1]))
    nr = len(retract_keys)
    refused = [int(i) for i in reply[1:]]
    return MergeResult(applied=True, overdrawn=[retract_keys[i - 1] for i in refused if i <= nr],
                       refused_steps=[i - 1 - nr for i in refused if i > nr])


def _decode(field: bytes) -> str:
    # ordinary ids carry no escape: skip the percent-decoder for them
    return field.decode("ascii") if b"%" not in field else decode_group(field)


def _decode_all(fields: Sequence[bytes]) -> list[str]:
    """`_decode` of many fields: when none carries an escape (ordinary ids), one join, decode
    and split for them all (an encoded id never holds a newline)."""
    joined = b"\n".join(fields)
    if b"%" not in joined:
        return joined.decode("ascii").split("\n")
    return [_decode(f) for f in fields]


class LegacyLayoutError(StoreError):
    """The namespace is in the one-slot layout of streamlme 0.1; it must be migrated."""


@dataclass(frozen=True)
class Script:
    """A Lua script run by SHA, loaded again where a node does not have it (a promoted
    replica, a restarted server)."""

    source: str
    sha: str

    @classmethod
    def of(cls, name: str) -> Script:
        source = _lua(name)
        return cls(source, hashlib.sha1(source.encode("utf-8")).hexdigest())


class RedisStore:
    """The `StateStore` over Redis: standalone (`redis.Redis`) or a Cluster
    (`redis.cluster.RedisCluster`), in the sharded layout of the module docstring.

    Parameters
    ----------
    client_or_url
        A redis-py client made with ``decode_responses=False`` (the default), standalone or
        Cluster, or a URL such as ``redis://:password@host:6379/0`` or ``rediss://...`` for TLS
        (`streamlme.store.connect.redis_client` builds Cluster clients from configuration).
    namespace
        Names the model. No braces, spaces or control characters.
    d
        Number of statistics columns, if known: checked against what the namespace holds.
    columns
        Column names (covariates then response), recorded on first merge and checked after.
    model_history
        How many model versions to keep.
    shards
        Shards of the namespace if this store creates it (default 256); a namespace that exists
        keeps the count it was created with.
    retry_seconds
        How long a command is retried through Cluster redirections and lost connections (on a
        Cluster only).
    """

    def __init__(
        self,
        client_or_url: Client | str,
        namespace: str,
        d: int | None = None,
        columns: Sequence[str] | None = None,
        model_history: int = MODEL_HISTORY,
        shards: int | None = None,
        retry_seconds: float = 30.0,
    ) -> None:
        client = (
            redis.Redis.from_url(client_or_url)
            if isinstance(client_or_url, str)
            else client_or_url
        )
        if not isinstance(client, (redis.Redis, RedisCluster)):
            raise StoreError(f"RedisStore needs a redis.Redis or redis.cluster.RedisCluster, "
                             f"not {type(client).__name__}")
        kwargs = getattr(client, "get_connection_kwargs", dict)()
        if kwargs.get("decode_responses"):
            raise StoreError("RedisStore needs a client with decode_responses=False (bytes values)")
        if model_history < 1:
            raise StoreError(f"model_history must be at least 1, got {model_history}")
        if shards is not None and not 1 <= shards <= 16384:
            raise StoreError(f"shards must be between 1 and 16384, got {shards}")
        self.client = client
        self.is_cluster = isinstance(client, RedisCluster)
        self.keys = Keys(namespace)
        self.namespace = namespace
        self.columns = tuple(columns) if columns is not None else None
        if self.columns is not None and d is not None and len(self.columns) != d:
            raise StoreError(f"{len(self.columns)} columns given for statistics of width d={d}")
        self._d = d if d is not None else (len(self.columns) if self.columns else None)
        self.model_history = model_history
        self.retry_seconds = retry_seconds
        self._new_shards = shards or DEFAULT_SHARDS
        self._shards: int | None = None  # as the namespace records it, once read
        #: Commands retried through redirections or lost connections so far (for reports).
        self.retries = 0
        self._merge = Script.of("merge.lua")
        self._models = client.register_script(_lua("models.lua"))
        if self._d is not None or self.columns is not None:
            self._check_meta()

    def __repr__(self) -> str:
        return f"RedisStore({self.client!r}, namespace={self.namespace!r}, d={self._d})"

    # -- retries ----------------------------------------------------------------------------

    def _retrying(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried with capped backoff through redirections and failovers."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        while True:
            try:
                return fn()
            except REDIRECTIONS as exc:
                # standalone Redis has no redirections: an error there is an outage, for the
                # caller to handle (the consumer retries, the API answers 503)
                if not self.is_cluster or time.monotonic() + delay > deadline:
                    if isinstance(exc, RedisClusterException):  # not a RedisError: make it one
                        raise RedisConnectionError(f"Redis Cluster: {exc}") from exc
                    raise
                self.retries += 1
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                if self.is_cluster:
                    self.client.nodes_manager.initialize()

    def _pipeline(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Run ``commands`` (tuples of a command's arguments) in pipelines: one round trip
        standalone, one per node on a Cluster; retried as a whole through redirections."""
        if not commands:
            return []

        def run() -> list[Any]:
            pipe = (self.client.pipeline() if self.is_cluster
                    else self.client.pipeline(transaction=False))
            for command in commands:
                pipe.execute_command(*command)
            return pipe.execute()

        return self._retrying(run)

    # -- layout and metadata ----------------------------------------------------------------

    @property
    def n_shards(self) -> int:
        """Shards of the namespace: as it records them, or as it will be created with."""
        if self._shards is None:
            shards = self._read_layout()
            if shards is None:
                return self._new_shards
            self._shards = shards
        return self._shards

    def _read_layout(self) -> int | None:
        k = self.keys
        meta, legacy_groups, legacy_offsets = self._pipeline([
            ("HGETALL", k.meta), ("EXISTS", k.legacy_groups), ("EXISTS", k.legacy_offsets)])
        meta = {f.decode(): v.decode() for f, v in dict(meta).items()}
        if meta.get("layout", "1") != str(LAYOUT) and (meta or legacy_groups or legacy_offsets):
            raise LegacyLayoutError(
                f"namespace {self.namespace!r} is in the one-slot layout of streamlme 0.1; run "
                "`streamlme store migrate --config FILE` to move it to the sharded layout "
                "(nothing was read or written)"
            )
        if "migrating" in meta:
            raise LegacyLayoutError(
                f"namespace {self.namespace!r} is being migrated to the sharded layout; wait "
                "for `streamlme store migrate` to finish (or run it again if it stopped)")
        return int(meta["shards"]) if "shards" in meta else None

    def _create(self) -> int:
        """Record the namespace's layout if it is new (the first writer's shard count wins)."""
        if self._shards is not None:
            return self._shards
        k = self.keys
        *_, meta = self._pipeline([
            ("HSETNX", k.meta, "shards", self._new_shards),
            ("HSETNX", k.meta, "layout", LAYOUT),
            ("HSETNX", k.meta, "created_at", repr(time.time())),
            ("HSETNX", k.meta, "epoch", new_epoch()),
            ("HGET", k.meta, "shards"),
        ])
        self._read_layout()  # refuse a legacy namespace that a shards field was just added to
        self._shards = int(meta)
        return self._shards

    def shard_of(self, key: str) -> int:
        """The shard holding cell ``key``."""
        return shard_of(key, self.n_shards)

    def created_at(self) -> float | None:
        """When the namespace was created (unix time), None if it does not exist yet."""
        value = self._retrying(lambda: self.client.hget(self.keys.meta, "created_at"))
        return None if value is None else float(value)

    def _columns_json(self) -> str:
        if self.columns is None:
            return ""
        return json.dumps(list(self.columns), ensure_ascii=False, separators=(",", ":"))

    def _shard_meta(self) -> tuple[int | None, list[str] | None]:
        """(d, columns) as the first shard that holds statistics records them."""
        metas = self._pipeline([("HMGET", self.keys.shard(s).meta, "d", "columns")
                                for s in range(self.n_shards)])
        for d, cols in metas:
            if d is not None:
                return int(d), (json.loads(cols) if cols is not None else None)
        return None, None

    def _check_meta(self) -> None:
        d, have = self._shard_meta()
        if d is not None and self._d is not None and d != self._d:
            raise StoreError(
                f"namespace {self.namespace!r} holds statistics of {d} columns, not "
                f"{self._d}; use another namespace or clear this one"
            )
        if have is not None and self.columns is not None and list(have) != list(self.columns):
            raise StoreError(
                f"namespace {self.namespace!r} holds statistics of columns {have}, not "
                f"{list(self.columns)}; use another namespace or clear this one"
            )

    @property
    def d(self) -> int | None:
        """Width of the statistics: as given, else as the namespace records, else None."""
        if self._d is None:
            self._d = self._shard_meta()[0]
        return self._d

    def address(self) -> StoreAddress:
        """How another process (a Dask worker) connects to this namespace."""
        from streamlme.store.connect import StoreAddress

        return StoreAddress.of(self)

    # -- merge ------------------------------------------------------------------------------

    def merge(
        self,
        adds: GroupStats,
        retracts: GroupStats | None = None,
        offsets: Mapping[TopicPartition, OffsetRange] | None = None,
        half_life: float | None = None,
    ) -> MergeResult:
        """Fold ``adds`` in, then take ``retracts`` out, and record ``offsets`` in every shard.

        Atomic per shard (`merge_shards`); when every shard records the same offsets, as this
        method leaves them, a refused batch is refused by every shard and changes nothing.
        """
        offsets = dict(offsets or {})
        parts_a = split(adds, self.n_shards)
        parts_r = split(retracts, self.n_shards)
        touched = set(parts_a) | set(parts_r)
        shards = range(self.n_shards) if offsets else sorted(touched)
        empty = GroupStats.empty(adds.d)
        # the whole-store call records offsets in every shard at once: a partition's start too
        parts = {s: ShardBatch(parts_a.get(s, empty), parts_r.get(s), offsets, starts=True)
                 for s in shards}
        results = self.merge_shards(parts, half_life)
        out = MergeResult(applied=all(r.applied for r in results.values()))
        for r in results.values():
            out.conflicts.update(r.conflicts)
            out.overdrawn.extend(r.overdrawn)
            out.missing.extend(r.missing)
            out.nonfinite = out.nonfinite or r.nonfinite
        return out

    def merge_shards(self, parts: Mapping[int, ShardBatch], half_life: float | None = None
                     ) -> dict[int, MergeResult]:
        """Apply each shard's part (its adds, retracts and offset ranges) with one script call
        per shard, pipelined; each call is atomic. Returns each shard's `MergeResult`.

        Raises StoreError (changing nothing in that shard) if a part's width or columns differ
        from what the namespace holds or a stored value is corrupt; connection errors that
        outlast ``retry_seconds`` pass through, with any shard's part applied or not.
        """
        if half_life is not None and not (half_life > 0 and half_life != float("inf")):
            raise StoreError(f"half_life must be a positive finite number, got {half_life}")
        n_shards = self._create()
        if self._d is None:
            _ = self.d  # a width any shard records binds the whole namespace
        calls: dict[int, tuple[Any, ...]] = {}
        retract_keys: dict[int, list[str]] = {}
        width = None
        for shard, part in parts.items():
            if not 0 <= shard < n_shards:
                raise StoreError(f"shard {shard} is not one of the namespace's {n_shards}")
            calls[shard], retract_keys[shard], w = self._call(shard, part, half_life)
            width = width or w
        replies = self._evalsha_all(calls)
        results: dict[int, MergeResult] = {}
        for shard, reply in replies.items():
            results[shard] = _merge_result(reply, retract_keys[shard])
        if width is not None and self._d is None:
            self._d = width
        return results

    def _call(self, shard: int, part: ShardBatch, half_life: float | None
              ) -> tuple[tuple[Any, ...], list[str], int | None]:
        adds, retracts = part.adds, part.retracts
        retracts = retracts if retracts is not None and len(retracts) else None
        n_adds = len(adds) if adds is not None else 0
        steps = list(part.steps)
        widths = {s.d for s in (adds if n_adds else None, retracts) if s is not None}
        widths |= {step.stats.d for step in steps}
        if len(widths) > 1:
            raise StoreError(f"the deltas of one batch differ in width: {sorted(widths)}")
        touches = bool(n_adds or retracts or steps)
        width = widths.pop() if widths else self._d
        if self._d is not None and width is not None and touches and width != self._d:
            raise StoreError(f"batch has {width} columns; this store holds {self._d}")
        triples: list[str | int] = []
        for (topic, partition), rng in part.offsets.items():
            if rng.end < rng.start:
                raise StoreError(f"offset range of {topic}:{partition} ends before it starts")
            triples += [offset_field(topic, partition), int(rng.start), int(rng.end)]
        r_keys = list(retracts.keys) if retracts is not None else []
        a_keys = list(adds.keys) if n_adds else []
        args: list[bytes | str | int] = [
            HEADER.pack(MAGIC, FORMAT_VERSION, width or 0),
            "" if half_life is None else repr(float(half_life)),
            n_adds, len(r_keys),
            _records(adds if n_adds else None), _records(retracts),
            self._columns_json(), len(part.offsets), len(steps), _step_records(steps),
            "".join("r" if step.retract else "a" for step in steps),
            "start" if part.starts else "", *triples,
            *[encode_group(k) for k in a_keys], *[encode_group(k) for k in r_keys],
            *[encode_group(step.key) for step in steps],
            *[x for step in steps for x in (step.dead_field, step.dead)],
        ]
        keys = (*self.keys.shard(shard).all, self.keys.shard(shard).dead)
        return (len(keys), *keys, *args), r_keys, width if touches else None

    def _evalsha_all(self, calls: Mapping[int, tuple[Any, ...]]) -> dict[int, Any]:
        """EVALSHA every call, pipelined; load the script where a node lacks it; raise the
        scripts' refusals as StoreError."""
        pending = dict(calls)
        replies: dict[int, Any] = {}
        for _ in range(3):
            order = list(pending)
            got = self._pipeline_raw([("EVALSHA", self._merge.sha, *pending[s]) for s in order])
            missing = {}
            for shard, reply in zip(order, got, strict=True):
                if isinstance(reply, NoScriptError):
                    missing[shard] = pending[shard]
                elif isinstance(reply, ResponseError):
                    _raise_refusal(reply)
                    raise reply
                else:
                    replies[shard] = reply
            if not missing:
                return replies
            self._retrying(lambda: self.client.script_load(self._merge.source))
            pending = missing
        raise StoreError("the merge script could not be loaded on every node")

    def _pipeline_raw(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """`_pipeline` that returns each command's server error in its place; redirections and
        lost connections are retried for the commands they hit (a retried merge whose first
        attempt landed is refused as a replay, which the caller recognises)."""
        results: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        while True:
            try:
                pipe = (self.client.pipeline() if self.is_cluster
                        else self.client.pipeline(transaction=False))
                for i in todo:
                    pipe.execute_command(*commands[i])
                got = pipe.execute(raise_on_error=False)
            except REDIRECTIONS:
                if not self.is_cluster:
                    raise
                got = None
            if got is not None:
                again, errors = [], []
                for i, reply in zip(todo, got, strict=True):
                    if isinstance(reply, REDIRECTIONS) and not isinstance(reply, NoScriptError):
                        again.append(i)
                        errors.append(reply)
                    else:
                        results[i] = reply
                if not again:
                    return results
                if not self.is_cluster:
                    raise errors[0]
                todo = again
            if time.monotonic() + delay > deadline:
                raise RedisConnectionError(
                    f"{len(todo)} of {len(commands)} commands to Redis did not get through in "
                    f"{self.retry_seconds:g}s (cluster redirections or a lost connection)")
            self.retries += 1
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
            if self.is_cluster:
                self.client.nodes_manager.initialize()

    # -- reads ------------------------------------------------------------------------------

    def shard_offsets(self, topic: str) -> dict[int, dict[int, int]]:
        """Next offset per partition of ``topic`` as each shard recorded it (shards with no
        record of the topic are absent)."""
        replies = self._pipeline([("HGETALL", self.keys.shard(s).offsets)
                                  for s in range(self.n_shards)])
        out: dict[int, dict[int, int]] = {}
        for shard, fields in enumerate(replies):
            for field, value in dict(fields).items():
                t, partition = parse_offset_field(field)
                if t == topic:
                    out.setdefault(shard, {})[partition] = int(value)
        return out

    def offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the lowest offset any shard recorded: where a restart resumes."""
        out: dict[int, int] = {}
        for per in self.shard_offsets(topic).values():
            for partition, offset in per.items():
                out[partition] = min(offset, out.get(partition, offset))
        return out

    def get(self, group: str) -> GroupStats | None:
        field = encode_group(group)
        key = self.keys.shard(self.shard_of(group)).stats
        value = self._retrying(lambda: self.client.hget(key, field))
        return None if value is None else GroupStats.from_bytes([group], [value])

    def get_many(self, groups: Sequence[str]) -> GroupStats:
        groups = list(dict.fromkeys(groups))
        found = [(g, v) for g, v in zip(groups, self.get_values(groups), strict=True)
                 if v is not None]
        return self._stats(found)

    def get_values(self, groups: Sequence[str]) -> list[bytes | None]:
        """The byte records of ``groups`` (None where unseen), one HMGET per shard, pipelined."""
        return self._values_with(groups, [])[0]

    def _values_with(self, groups: Sequence[str], tail: Sequence[tuple[Any, ...]]
                     ) -> tuple[list[bytes | None], list[Any]]:
        """The byte records of ``groups`` and the replies of ``tail``, in one round trip."""
        by_shard: dict[int, list[int]] = {}
        fields = [encode_group(g) for g in groups]
        for i, g in enumerate(groups):
            by_shard.setdefault(self.shard_of(g), []).append(i)
        order = list(by_shard)
        commands: list[tuple[Any, ...]] = [
            ("HMGET", self.keys.shard(s).stats, *[fields[i] for i in by_shard[s]]) for s in order]
        replies = self._pipeline([*commands, *tail])
        values: list[bytes | None] = [None] * len(groups)
        for shard, got in zip(order, replies[:len(order)], strict=True):
            for i, v in zip(by_shard[shard], got, strict=True):
                values[i] = v
        return values, replies[len(order):]

    def ping(self) -> bool:
        return bool(self._retrying(self.client.ping))

    def _stats(self, found: Sequence[tuple[str, bytes]]) -> GroupStats:
        if not found:
            return GroupStats.empty(self.d or 0)
        keys, values = zip(*found, strict=True)
        return GroupStats.from_bytes(list(keys), list(values))

    def read_shard(self, shard: int) -> GroupStats:
        """Every cell of one shard: one HGETALL, an atomic snapshot."""
        return self.read_shards([shard])[0]

    def read_shards(self, shards: Sequence[int]) -> list[GroupStats]:
        """Every cell of each of ``shards``, pipelined (binary records, no per-cell command)."""
        replies = self._pipeline([("HGETALL", self.keys.shard(s).stats) for s in shards])
        out = []
        for fields in replies:
            if not fields:
                out.append(GroupStats.empty(self.d or 0))
                continue
            if not isinstance(fields, dict):
                fields = dict(fields)
            # keys and values as two lists, decoded in bulk: no per-cell tuple or call
            out.append(GroupStats.from_bytes(_decode_all(list(fields)), list(fields.values())))
        return out

    def shard_versions(self) -> list[int]:
        """Each shard's version: bumped by every merge that changes its statistics."""
        replies = self._pipeline([("HGET", self.keys.shard(s).meta, "version")
                                  for s in range(self.n_shards)])
        return [int(v) if v is not None else 0 for v in replies]

    def shard_sizes(self) -> list[int]:
        """Cells per shard (one pipelined HLEN each)."""
        return [int(n) for n in self._pipeline([("HLEN", self.keys.shard(s).stats)
                                                for s in range(self.n_shards)])]

    def scan(self, chunk: int = 10_000) -> Iterator[GroupStats]:
        """Every cell once, at most ``chunk`` at a time: shard by shard, each shard an atomic
        snapshot, several shards per round trip (up to `SHARDS_PER_ROUND`)."""
        if chunk < 1:
            raise StoreError(f"chunk must be at least 1, got {chunk}")
        sizes = self.shard_sizes()
        batch: list[int] = []
        held = 0
        for shard, size in enumerate(sizes):
            if size:
                batch.append(shard)
                held += size
            last = shard == len(sizes) - 1
            if batch and (held >= chunk or len(batch) >= SHARDS_PER_ROUND or last):
                for stats in self.read_shards(batch):
                    for lo in range(0, len(stats), chunk):
                        yield stats if len(stats) <= chunk else take(
                            stats, np.arange(lo, min(lo + chunk, len(stats))))
                batch, held = [], 0

    def cells_of(self, position: int, level: str) -> list[str]:
        """Keys of the cells whose grouping column ``position`` holds ``level`` (cells keyed by
        a JSON array of levels; see `streamlme.store.base`): one ZRANGEBYLEX in the level's
        shard for the first grouping column, one per shard (pipelined) for the others."""
        low, high = self.keys.level_range(position, level)
        skip = len(low) - 1
        shards = [shard_of(level, self.n_shards)] if position == 0 else range(self.n_shards)
        replies = self._pipeline([("ZRANGEBYLEX", self.keys.shard(s).levels, low, high)
                                  for s in shards])
        return [decode_group(m[skip:]) for members in replies for m in members]

    def n_groups(self) -> int:
        return sum(self.shard_sizes())

    def clear(self) -> None:
        """Delete every key of the namespace: its shards', then its own."""
        if self._read_layout() is not None or self._shards is not None:
            for lo in range(0, self.n_shards, SHARDS_PER_ROUND):
                self._pipeline([("UNLINK", *self.keys.shard(s).all, self.keys.shard(s).dead)
                                for s in range(lo, min(lo + SHARDS_PER_ROUND, self.n_shards))])
        k = self.keys
        consumers = self._retrying(lambda: self.client.zrange(k.consumers, 0, -1))
        self._pipeline([("UNLINK", key) for key in (
            k.meta, k.gaps, k.models, k.model_seq, k.model_current, k.model_fence, k.lease,
            k.lease_seq, k.consumers,
            k.ingest, *[f"{k.tag}:consumers:{m.decode()}" for m in consumers])])
        self._shards = None
        self._d = None if self.columns is None else len(self.columns)

    # -- identity and health (see streamlme.store.health) -----------------------------------

    def epoch(self) -> str | None:
        """The namespace's epoch, drawn when it was created; None if it does not exist."""
        value = self._retrying(lambda: self.client.hget(self.keys.meta, "epoch"))
        return None if value is None else value.decode()

    def health(self) -> Health:
        """The namespace's epoch, flag and recorded gaps, in one round trip."""
        k = self.keys
        meta, gaps = self._pipeline([
            ("HMGET", k.meta, "epoch", "created_at", "flag", "reason", "since"),
            ("HGETALL", k.gaps)])
        epoch, created, flag, reason, since = (v.decode() if v is not None else None
                                               for v in meta)
        found = sorted((Gap.from_json(v) for v in dict(gaps).values()),
                       key=lambda g: (g.topic, g.partition, g.start))
        return Health(epoch, None if created is None else float(created), flag, reason or "",
                      None if since is None else float(since), tuple(found))

    def set_flag(self, flag: str, reason: str) -> None:
        """Flag the namespace (creating it if new): readers refuse its statistics until
        `clear_flag`."""
        check_flag(flag)
        self._shards = None  # the namespace may be gone (a FLUSHDB): record it again if so
        self._create()
        self._pipeline([("HSET", self.keys.meta, "flag", flag, "reason", reason,
                         "since", repr(time.time()))])

    def clear_flag(self) -> None:
        self._pipeline([("HDEL", self.keys.meta, "flag", "reason", "since")])

    def record_gap(self, gap: Gap) -> None:
        """Record an accepted offset gap (again for the same start: the later record wins)."""
        self._create()
        self._pipeline([("HSET", self.keys.gaps, gap.field, gap.to_json())])

    def shard_presence(self) -> list[tuple[bool, bool]]:
        """Per shard, whether it holds (statistics, an offsets record): a shard with statistics
        but no offsets, or none at all in a namespace whose other shards have them, lost state."""
        if self._read_layout() is None:
            return [(False, False)] * self.n_shards
        out: list[tuple[bool, bool]] = []
        for lo in range(0, self.n_shards, SHARDS_PER_ROUND):
            shards = range(lo, min(lo + SHARDS_PER_ROUND, self.n_shards))
            replies = self._pipeline([c for s in shards for c in (
                ("EXISTS", self.keys.shard(s).stats), ("EXISTS", self.keys.shard(s).offsets))])
            out += [(bool(replies[2 * i]), bool(replies[2 * i + 1])) for i in range(len(shards))]
        return out

    def clear_statistics(self) -> None:
        """Delete every shard's statistics, index, offsets and meta, and the recorded gaps;
        keep the namespace's epoch, flag, models and lease (what a rebuild starts from)."""
        if self._read_layout() is not None:
            for lo in range(0, self.n_shards, SHARDS_PER_ROUND):
                self._pipeline([("UNLINK", *self.keys.shard(s).all)
                                for s in range(lo, min(lo + SHARDS_PER_ROUND, self.n_shards))])
        self._pipeline([("UNLINK", self.keys.gaps)])
        self._d = None if self.columns is None else len(self.columns)

    def model_key(self) -> ModelKey | None:
        """(epoch, current model version) in one round trip: what a model cache keys by, as
        a reset namespace can repeat a version but not an epoch. None before any model."""
        epoch, version = self._pipeline([("HGET", self.keys.meta, "epoch"),
                                         ("GET", self.keys.model_current)])
        if version is None:
            return None
        return ModelKey(None if epoch is None else epoch.decode(), int(version))

    def values_and_model_key(self, groups: Sequence[str]
                             ) -> tuple[list[bytes | None], ModelKey | None]:
        """`get_values` and the current model's `ModelKey`, in one pipelined round trip (what
        a query reads)."""
        values, (epoch, version) = self._values_with(groups, [
            ("HGET", self.keys.meta, "epoch"), ("GET", self.keys.model_current)])
        if version is None:
            return values, None
        return values, ModelKey(None if epoch is None else epoch.decode(), int(version))

    # -- pinned model (`streamlme model --rollback V` / `--unpin`) ---------------------------

    def _pin_keys(self) -> list[str]:
        return [*self._model_keys(), self.keys.meta]

    def _pin_script(self, args: list[Any]) -> Any:
        try:
            return self._retrying(lambda: self._models(keys=self._pin_keys(), args=args))
        except ResponseError as e:
            _raise_pin_refusal(e)
            raise

    def pin_model(self, version: int) -> None:
        """Make stored ``version`` current and pin it, atomically: `put_model_checked` writes
        nothing until `unpin_model`. StoreError if the version is not stored."""
        self._create()  # the pin lives in the namespace's meta, which must record the layout
        self._pin_script(["pin", int(version), repr(time.time())])

    def unpin_model(self) -> int | None:
        """Remove the pin; the version that was pinned (None if none was)."""
        reply = self._pin_script(["unpin"])
        return None if reply is None else int(reply)

    def pinned_model(self) -> int | None:
        """The pinned model version, or None when no version is pinned."""
        return None if (pin := self.model_pin()) is None else pin[0]

    def model_pin(self) -> tuple[int, float] | None:
        """(pinned version, when it was pinned), or None."""
        version, since = self._retrying(
            lambda: self.client.hmget(self.keys.meta, "pinned", "pinned_at"))
        return None if version is None else (int(version), float(since or 0.0))

    def put_model_checked(self, record: bytes | str, epoch: str | None,
                          fence: int | None = None, keep: int | None = None) -> int:
        """`put_model`, refused atomically (`ModelWriteRefusedError`, nothing written) while a
        version is pinned, while the namespace is flagged, or when its epoch is no longer
        ``epoch`` (the namespace was reset since the statistics were read)."""
        keep = self.model_history if keep is None else keep
        if keep < 1:
            raise StoreError(f"keep must be at least 1, got {keep}")
        return int(self._pin_script(["put_checked", record, "" if fence is None else int(fence),
                                     keep, epoch or ""]))

    # -- dead letters the merge kept (refused retraction steps) -------------------------------

    def dead_letters(self) -> dict[int, dict[str, bytes]]:
        """Per shard (those holding any), the dead letters merges kept and nobody sent yet."""
        out: dict[int, dict[str, bytes]] = {}
        for lo in range(0, self.n_shards, SHARDS_PER_ROUND):
            shards = range(lo, min(lo + SHARDS_PER_ROUND, self.n_shards))
            replies = self._pipeline([("HGETALL", self.keys.shard(s).dead) for s in shards])
            for shard, fields in zip(shards, replies, strict=True):
                if fields:
                    out[shard] = {f.decode(): bytes(v) for f, v in dict(fields).items()}
        return out

    def delete_dead_letters(self, shard: int, fields: Sequence[str]) -> None:
        """HDEL exactly ``fields`` (sent) from shard ``shard``'s kept dead letters."""
        if fields:
            self._pipeline([("HDEL", self.keys.shard(shard).dead, *fields)])

    # -- consumer status (see streamlme.status) ----------------------------------------------

    def write_status(self, consumer: str, record: Mapping[str, str | int | float], ttl: float,
                     totals: Mapping[str, int]) -> None:
        """Record one consumer's status (expiring after ``ttl`` s) and add ``totals`` to the
        namespace's all-time counters; consumers silent for ``ttl`` drop out of the index."""
        k, now = self.keys, float(record.get("updated_at", time.time()))
        member = encode_group(consumer)
        commands: list[tuple[Any, ...]] = [
            ("HSET", k.consumer(consumer), *[x for kv in record.items() for x in kv]),
            ("PEXPIRE", k.consumer(consumer), int(ttl * 1000)),
            ("ZADD", k.consumers, now, member),
            ("ZREMRANGEBYSCORE", k.consumers, "-inf", f"({now - ttl}"),
        ]
        commands += [("HINCRBY", k.ingest, name, n) for name, n in totals.items() if n]
        self._pipeline(commands)

    def read_status(self, since: float) -> tuple[dict[str, dict[str, str]], dict[str, int]]:
        """Records of consumers that reported at or after ``since``, and the all-time totals."""
        k = self.keys
        members, raw_totals = self._pipeline([("ZRANGEBYSCORE", k.consumers, since, "+inf"),
                                              ("HGETALL", k.ingest)])
        totals = {f.decode(): int(v) for f, v in dict(raw_totals).items()}
        names = [decode_group(m) for m in members]
        records = self._pipeline([("HGETALL", k.consumer(name)) for name in names])
        return ({name: {f.decode(): v.decode() for f, v in dict(h).items()}
                 for name, h in zip(names, records, strict=True) if h}, totals)

    # -- models -----------------------------------------------------------------------------

    def _model_keys(self) -> list[str]:
        k = self.keys
        return [k.models, k.model_seq, k.model_current, k.model_fence, k.lease, k.lease_seq]

    def put_model(self, record: bytes | str, fence: int | None = None,
                  keep: int | None = None) -> int:
        """Store a model record as a new version, make it current, return its version.

        ``fence`` is the writer's lease token (`acquire_lease`): the put raises StaleFenceError
        and stores nothing unless the lease is held with that token right now and no larger
        token was used before. Without ``fence`` nothing is checked (an operator's manual put).
        ``keep`` versions are kept (default ``model_history``).
        """
        keep = self.model_history if keep is None else keep
        if keep < 1:
            raise StoreError(f"keep must be at least 1, got {keep}")
        args = ["put", record, "" if fence is None else int(fence), keep]
        try:
            return int(self._retrying(lambda: self._models(keys=self._model_keys(), args=args)))
        except ResponseError as e:
            _raise_refusal(e)
            raise

    def get_model(self, version: int | None = None) -> bytes | None:
        """The current model record (or the given version); None if there is none."""
        args = ["get", "" if version is None else int(version)]
        return self._retrying(lambda: self._models(keys=self._model_keys(), args=args))

    def model_versions(self) -> list[int]:
        """Stored model versions, oldest first."""
        return sorted(int(v) for v in self._retrying(lambda: self.client.hkeys(self.keys.models)))

    def current_model_version(self) -> int | None:
        v = self._retrying(lambda: self.client.get(self.keys.model_current))
        return None if v is None else int(v)

    def set_current(self, version: int) -> None:
        """Make a stored version current (roll back or forward); StoreError if not stored."""
        try:
            self._retrying(lambda: self._models(keys=self._model_keys(),
                                                args=["current", int(version)]))
        except ResponseError as e:
            _raise_refusal(e)
            raise

    # -- the refresh leader's lease (see streamlme.lease) -------------------------------------

    def acquire_lease(self, owner: str, ttl: float) -> int | None:
        """Take the lease for ``ttl`` seconds if it is free (or already ``owner``'s): its token.

        None if someone else holds it. Tokens grow with every acquisition.
        """
        args = ["acquire", owner, _ms(ttl)]
        reply = self._retrying(lambda: self._models(keys=self._model_keys(), args=args))
        return int(reply[1]) if reply[0] == 1 else None

    def renew_lease(self, owner: str, token: int, ttl: float) -> bool:
        """Extend the lease to ``ttl`` seconds from now if it is still ``owner``'s ``token``."""
        args = ["renew", owner, int(token), _ms(ttl)]
        return bool(self._retrying(lambda: self._models(keys=self._model_keys(), args=args)))

    def release_lease(self, owner: str, token: int) -> bool:
        """Give the lease up if it is still ``owner``'s ``token``; False if it was not."""
        args = ["release", owner, int(token)]
        return bool(self._retrying(lambda: self._models(keys=self._model_keys(), args=args)))

    def lease_holder(self) -> tuple[str, int, float] | None:
        """(owner, token, seconds left) of the lease, or None when it is free."""
        reply = self._retrying(lambda: self._models(keys=self._model_keys(), args=["holder"]))
        if not reply:
            return None
        owner, _, token = reply[0].decode("utf-8").rpartition("|")
        return owner, int(token), max(int(reply[1]), 0) / 1000.0


def _ms(seconds: float) -> int:
    if not seconds > 0:
        raise StoreError(f"a lease needs a positive ttl, got {seconds}")
    return max(1, round(seconds * 1000))


def _raise_refusal(e: ResponseError) -> None:
    """Raise the scripts' own refusals as StoreError; return for any other server error."""
    code, _, message = str(e).partition(" ")
    if code == "STALE_FENCE":
        raise StaleFenceError(message) from e
    if code in _SCRIPT_ERRORS:
        raise StoreError(message) from e


def _raise_pin_refusal(e: ResponseError) -> None:
    """`ModelWriteRefusedError` for the pin's refusals; else as `_raise_refusal`."""
    code, _, message = str(e).partition(" ")
    if code in ModelWriteRefusedError.REASONS:
        raise ModelWriteRefusedError(ModelWriteRefusedError.REASONS[code], message) from e
    _raise_refusal(e)
