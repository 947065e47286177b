"""RedisStore: per-group statistics, Kafka offsets and model versions in Redis.

Key layout of a namespace ``ns`` (all keys share the hash tag ``{ns}``, so they live in one Redis
Cluster slot and one Lua script may touch any of them):

=============================  ======  =========================================================
key                            type    value
=============================  ======  =========================================================
``{ns}:g:<encoded group id>``  string  the group's statistics, `streamlme.stats` byte record
``{ns}:groups``                zset    registry: every encoded group id, score 0 (lex-ordered)
``{ns}:levels``                zset    cells by level: ``<i>:<encoded level>:<encoded cell id>``
``{ns}:offsets``               hash    ``<topic>:<partition>`` -> next offset to read
``{ns}:meta``                  hash    ``d``, ``format``, ``layout``, ``columns`` (JSON list)
``{ns}:models``                hash    model version -> record (bytes)
``{ns}:model:seq``             string  last model version issued (INCR)
``{ns}:model:current``         string  the version queries use
``{ns}:model:fence``           string  highest fencing token a model writer has shown
``{ns}:lease``                 string  refresh leader: ``owner|token``, expires (PX ttl)
``{ns}:lease:seq``             string  last lease token issued (INCR)
=============================  ======  =========================================================

Group ids are percent-encoded (`streamlme.store.keys.encode_group`). The registry is a sorted
set, not a set: paging it by value (ZRANGE BYLEX from the last id seen) visits every group
exactly once with bounded memory even while groups are being added, where SSCAN may return an
element twice if the set is rehashed mid-scan — and a group counted twice would bias a refit.

The level index holds, for every cell of a model with several grouping columns (a group id that
is a JSON array of levels, see `streamlme.store.base`), one member per grouping column i; the
merge that brings a new cell writes them in the same script. `cells_of` reads one level's cells
with one ZRANGEBYLEX. Ids of a one-column model are not indexed.

`RedisStore.merge` is one EVALSHA of ``merge.lua``: it checks every partition's recorded offset
against the batch start, merges additions and retractions with the same arithmetic as
`streamlme.stats`, and records the new offsets, all atomically. A lost connection therefore
leaves a batch either applied entirely or not at all; redis-py's ConnectionError reaches the
caller unchanged. (redis-py may retry a command after a timeout; if the first attempt did run,
the retry is refused with ``conflicts`` equal to the batch's ends — an exact replay.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from importlib.resources import files

import redis
from redis.exceptions import ResponseError

from streamlme.stats import FORMAT_VERSION, HEADER, MAGIC, GroupStats
from streamlme.store.base import MergeResult, OffsetRange, TopicPartition
from streamlme.store.errors import StaleFenceError, StoreError
from streamlme.store.keys import (
    Keys,
    decode_group,
    encode_group,
    offset_field,
    parse_offset_field,
)
from streamlme.store.policy import MODEL_HISTORY

_SCRIPT_ERRORS = ("WIDTH", "COLUMNS", "CORRUPT", "NO_VERSION")


def _lua(name: str) -> str:
    return files("streamlme.store").joinpath(name).read_text(encoding="utf-8")


def _records(stats: GroupStats) -> bytes:
    """All groups of ``stats`` as one concatenation of their byte records."""
    return b"".join(stats.to_bytes()) if len(stats) else b""


class RedisStore:
    """The `StateStore` over Redis (standalone, or Cluster: every key is in one slot).

    Parameters
    ----------
    client_or_url
        A redis-py client made with ``decode_responses=False`` (the default), or a URL such as
        ``redis://:password@host:6379/0`` or ``rediss://...`` for TLS.
    namespace
        Names the model; every key lives under ``{namespace}``. No braces, spaces or control
        characters.
    d
        Number of statistics columns, if known: checked against what the namespace holds.
    columns
        Column names (covariates then response), recorded on first merge and checked after.
    model_history
        How many model versions to keep.
    """

    def __init__(
        self,
        client_or_url: redis.Redis | str,
        namespace: str,
        d: int | None = None,
        columns: Sequence[str] | None = None,
        model_history: int = MODEL_HISTORY,
    ) -> None:
        client = (
            redis.Redis.from_url(client_or_url)
            if isinstance(client_or_url, str)
            else client_or_url
        )
        kwargs = getattr(client, "get_connection_kwargs", dict)()
        if kwargs.get("decode_responses"):
            raise StoreError("RedisStore needs a client with decode_responses=False (bytes values)")
        if model_history < 1:
            raise StoreError(f"model_history must be at least 1, got {model_history}")
        self.client = client
        self.keys = Keys(namespace)
        self.namespace = namespace
        self.columns = tuple(columns) if columns is not None else None
        if self.columns is not None and d is not None and len(self.columns) != d:
            raise StoreError(f"{len(self.columns)} columns given for statistics of width d={d}")
        self._d = d if d is not None else (len(self.columns) if self.columns else None)
        self.model_history = model_history
        self._prefix = self.keys.group_prefix
        self._prefix_len = len(self._prefix.encode("utf-8"))
        self._merge = client.register_script(_lua("merge.lua"))
        self._models = client.register_script(_lua("models.lua"))
        if self._d is not None or self.columns is not None:
            self._check_meta()

    def __repr__(self) -> str:
        return f"RedisStore({self.client!r}, namespace={self.namespace!r}, d={self._d})"

    # -- metadata ---------------------------------------------------------------------------

    def _columns_json(self) -> str:
        if self.columns is None:
            return ""
        return json.dumps(list(self.columns), ensure_ascii=False, separators=(",", ":"))

    def _check_meta(self) -> None:
        d, cols = self.client.hmget(self.keys.meta, ["d", "columns"])
        if d is not None and self._d is not None and int(d) != self._d:
            raise StoreError(
                f"namespace {self.namespace!r} holds statistics of {int(d)} columns, not "
                f"{self._d}; use another namespace or clear this one"
            )
        if cols is not None and self.columns is not None:
            have = json.loads(cols)
            if list(have) != list(self.columns):
                raise StoreError(
                    f"namespace {self.namespace!r} holds statistics of columns {have}, not "
                    f"{list(self.columns)}; use another namespace or clear this one"
                )

    @property
    def d(self) -> int | None:
        """Width of the statistics: as given, else as the namespace records, else None."""
        if self._d is None:
            d = self.client.hget(self.keys.meta, "d")
            self._d = int(d) if d is not None else None
        return self._d

    # -- merge ------------------------------------------------------------------------------

    def merge(
        self,
        adds: GroupStats,
        retracts: GroupStats | None = None,
        offsets: Mapping[TopicPartition, OffsetRange] | None = None,
        half_life: float | None = None,
    ) -> MergeResult:
        """Fold ``adds`` in, then take ``retracts`` out, and record ``offsets``: one script.

        With ``half_life``, each added group's stored mass and its delta are aged to the later
        of their times before merging (as `GroupStats.merge`); retractions are not aged.
        Raises StoreError (changing nothing) if the batch's width or columns differ from what
        the namespace holds or a stored value is corrupt; redis-py's errors pass through.
        """
        retracts = retracts if retracts is not None and len(retracts) else None
        width = adds.d if len(adds) else (retracts.d if retracts is not None else self._d)
        if retracts is not None and len(adds) and retracts.d != adds.d:
            raise StoreError(f"adds have {adds.d} columns but retracts have {retracts.d}")
        if self._d is not None and width is not None and (len(adds) or retracts) \
                and width != self._d:
            raise StoreError(f"batch has {width} columns; this store holds {self._d}")
        if half_life is not None and not (half_life > 0 and half_life != float("inf")):
            raise StoreError(f"half_life must be a positive finite number, got {half_life}")
        r_keys = retracts.keys if retracts is not None else []
        keys = [self.keys.meta, self.keys.groups, self.keys.offsets, self.keys.levels]
        keys += [self._prefix + encode_group(k) for k in adds.keys]
        keys += [self._prefix + encode_group(k) for k in r_keys]
        args: list[bytes | str | int] = [
            HEADER.pack(MAGIC, FORMAT_VERSION, width or 0),
            "" if half_life is None else repr(float(half_life)),
            len(adds),
            len(r_keys),
            _records(adds),
            _records(retracts) if retracts is not None else b"",
            self._columns_json(),
            self._prefix_len,
        ]
        for (topic, partition), rng in (offsets or {}).items():
            if rng.end < rng.start:
                raise StoreError(f"offset range of {topic}:{partition} ends before it starts")
            args += [offset_field(topic, partition), int(rng.start), int(rng.end)]
        try:
            reply = self._merge(keys=keys, args=args)
        except ResponseError as e:
            _raise_refusal(e)
            raise
        if reply[0] == 0:
            conflicts = {
                parse_offset_field(reply[i]): int(reply[i + 1]) for i in range(1, len(reply), 2)
            }
            return MergeResult(applied=False, conflicts=conflicts)
        if width is not None and self._d is None and (len(adds) or retracts is not None):
            self._d = width
        return MergeResult(applied=True, overdrawn=[r_keys[i - 1] for i in reply[1:]])

    # -- reads ------------------------------------------------------------------------------

    def offsets(self, topic: str) -> dict[int, int]:
        out = {}
        for field, value in self.client.hgetall(self.keys.offsets).items():
            t, partition = parse_offset_field(field)
            if t == topic:
                out[partition] = int(value)
        return out

    def get(self, group: str) -> GroupStats | None:
        value = self.client.get(self.keys.group(group))
        return None if value is None else GroupStats.from_bytes([group], [value])

    def get_many(self, groups: Sequence[str]) -> GroupStats:
        groups = list(dict.fromkeys(groups))
        values = self.client.mget([self.keys.group(g) for g in groups]) if groups else []
        found = [(g, v) for g, v in zip(groups, values, strict=True) if v is not None]
        return self._stats(found)

    def _stats(self, found: Sequence[tuple[str, bytes]]) -> GroupStats:
        if not found:
            return GroupStats.empty(self.d or 0)
        keys, values = zip(*found, strict=True)
        return GroupStats.from_bytes(list(keys), list(values))

    def scan(self, chunk: int = 10_000) -> Iterator[GroupStats]:
        """Every group once, ``chunk`` at a time, in the order of their encoded ids."""
        if chunk < 1:
            raise StoreError(f"chunk must be at least 1, got {chunk}")
        low: bytes = b"-"
        while True:
            members = self.client.zrangebylex(self.keys.groups, low, b"+", start=0, num=chunk)
            if not members:
                return
            values = self.client.mget([self._prefix.encode() + m for m in members])
            found = [
                (decode_group(m), v) for m, v in zip(members, values, strict=True) if v is not None
            ]
            if found:
                yield self._stats(found)
            if len(members) < chunk:
                return
            low = b"(" + members[-1]

    def cells_of(self, position: int, level: str) -> list[str]:
        """Keys of the cells whose grouping column ``position`` holds ``level`` (cells keyed by
        a JSON array of levels; see `streamlme.store.base`): one ZRANGEBYLEX."""
        low, high = self.keys.level_range(position, level)
        skip = len(low) - 1
        return [decode_group(m[skip:]) for m in self.client.zrangebylex(self.keys.levels, low, high)]

    def n_groups(self) -> int:
        return int(self.client.zcard(self.keys.groups))

    def clear(self, batch: int = 1000) -> None:
        """Delete every key of the namespace (groups found through the registry, in batches)."""
        prefix = self._prefix.encode()
        while True:
            members = self.client.zrange(self.keys.groups, 0, batch - 1)
            if not members:
                break
            self.client.unlink(*[prefix + m for m in members])
            self.client.zrem(self.keys.groups, *members)
        k = self.keys
        self.client.unlink(k.groups, k.levels, k.offsets, k.meta, k.models, k.model_seq,
                           k.model_current, k.model_fence)
        self._d = None if self.columns is None else len(self.columns)

    # -- models -----------------------------------------------------------------------------

    def _model_keys(self) -> list[str]:
        k = self.keys
        return [k.models, k.model_seq, k.model_current, k.model_fence,
                f"{k.tag}:lease", f"{k.tag}:lease:seq"]

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
            return int(self._models(keys=self._model_keys(), args=args))
        except ResponseError as e:
            _raise_refusal(e)
            raise

    def get_model(self, version: int | None = None) -> bytes | None:
        """The current model record (or the given version); None if there is none."""
        args = ["get", "" if version is None else int(version)]
        return self._models(keys=self._model_keys(), args=args)

    def model_versions(self) -> list[int]:
        """Stored model versions, oldest first."""
        return sorted(int(v) for v in self.client.hkeys(self.keys.models))

    def current_model_version(self) -> int | None:
        v = self.client.get(self.keys.model_current)
        return None if v is None else int(v)

    def set_current(self, version: int) -> None:
        """Make a stored version current (roll back or forward); StoreError if not stored."""
        try:
            self._models(keys=self._model_keys(), args=["current", int(version)])
        except ResponseError as e:
            _raise_refusal(e)
            raise

    # -- the refresh leader's lease (see streamlme.lease) -------------------------------------

    def acquire_lease(self, owner: str, ttl: float) -> int | None:
        """Take the lease for ``ttl`` seconds if it is free (or already ``owner``'s): its token.

        None if someone else holds it. Tokens grow with every acquisition.
        """
        reply = self._models(keys=self._model_keys(), args=["acquire", owner, _ms(ttl)])
        return int(reply[1]) if reply[0] == 1 else None

    def renew_lease(self, owner: str, token: int, ttl: float) -> bool:
        """Extend the lease to ``ttl`` seconds from now if it is still ``owner``'s ``token``."""
        args = ["renew", owner, int(token), _ms(ttl)]
        return bool(self._models(keys=self._model_keys(), args=args))

    def release_lease(self, owner: str, token: int) -> bool:
        """Give the lease up if it is still ``owner``'s ``token``; False if it was not."""
        args = ["release", owner, int(token)]
        return bool(self._models(keys=self._model_keys(), args=args))

    def lease_holder(self) -> tuple[str, int, float] | None:
        """(owner, token, seconds left) of the lease, or None when it is free."""
        reply = self._models(keys=self._model_keys(), args=["holder"])
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
