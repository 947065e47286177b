"""The StateStore protocol: where per-group statistics, Kafka offsets and models live.

The store knows nothing of REML; it keeps bytes of `streamlme.stats` and applies deltas with the
pairwise merge. Its state is cut into `n_shards` shards (`streamlme.store.shards`: a cell's shard
is a hash of its first grouping level); each shard keeps its own record of Kafka offsets, and
`merge_shards` applies each shard's part atomically with that record. Every implementation gives
the same guarantees, per shard:

- `merge` applies a micro-batch of per-group deltas **and** records the next offset of every
  Kafka partition in the batch, atomically. A batch is accepted only if, for every partition it
  carries, it starts exactly where the recorded offset ends; a shard may lack a record of the
  partition only in a call that records partitions' starts (`ShardBatch.starts`; `merge` always
  does), else it lost state. Otherwise nothing changes and `merge` returns a refusal. That one
  check makes replays no-ops and stops a consumer whose partitions were taken away (a zombie)
  from applying anything twice.
- Retractions that would take more mass out of a group than it holds, or leave a co-moment
  diagonal negative, are refused per group (or per `Step`, checked in order) and reported, so
  the caller can dead-letter the events that asked for them; a refused step's dead-letter
  record is kept in the store by the same call (`dead_letters`).
- A merge whose result would hold a non-finite value is refused whole, naming the cell.
- A key that is a JSON array of two or more strings is the key of a *cell* of a model with
  several grouping columns (`streamlme.spec.ModelSpec.cell_key`): element i is the cell's level
  of grouping column i. When such a cell first arrives, the merge that brings it also indexes it
  under (i, level) for every i, atomically with its statistics, and `cells_of(i, level)` lists
  the cells carrying a level (what a query of one level of a several-term model reads). Keys of
  a one-column model are the levels themselves and are not indexed (one that happens to read as
  such an array is indexed harmlessly).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

from streamlme.stats import GroupStats
from streamlme.store.errors import StoreError
from streamlme.store.health import Gap, Health, ModelKey

#: A Kafka partition as (topic, partition).
TopicPartition = tuple[str, int]


@dataclass(frozen=True)
class OffsetRange:
    """The offsets of one partition a batch covers: ``start`` (first) to ``end`` (next to read)."""

    start: int
    end: int


@dataclass(frozen=True)
class Step:
    """One step of the per-event path of a group with retractions in a batch: a run of its adds
    (aggregated, ``retract`` False) or one retraction. A retraction may carry its dead-letter
    record (``dead``, keyed ``dead_field`` = ``topic:partition:offset``), which the store keeps
    in the same atomic call when it refuses the retraction (see `StateStore.dead_letters`)."""

    key: str
    stats: GroupStats
    retract: bool = False
    dead_field: str = ""
    dead: bytes = b""


@dataclass(frozen=True)
class ShardBatch:
    """One shard's part of a micro-batch: its cells' deltas and the offset ranges it covers
    (every partition of the batch, including those that brought none of its cells).

    ``adds`` and ``retracts`` hold groups aggregated over the batch (adds first); ``steps`` the
    ordered per-event path of groups with retractions (none of which is in ``adds``).
    ``starts`` says the call records partitions' starts: only then may the shard lack a record
    of a partition (otherwise that is statistics without their offsets, lost state).
    """

    adds: GroupStats
    retracts: GroupStats | None = None
    offsets: Mapping[TopicPartition, OffsetRange] = field(default_factory=dict)
    steps: Sequence[Step] = ()
    starts: bool = False


@dataclass
class MergeResult:
    """What `StateStore.merge` did.

    ``applied`` is False when the batch was refused (nothing changed): because a partition's
    recorded offset did not equal the batch's start (``conflicts`` maps those partitions to the
    recorded offset), because the shard has no record of partitions it should have
    (``missing``: it lost state), or because cell ``nonfinite``'s result would not be finite.
    ``overdrawn`` lists groups whose aggregated retraction was refused (more than their mass, or
    a co-moment diagonal left negative); ``refused_steps`` the indices of refused retraction
    steps (their dead letters are kept in the store).
    """

    applied: bool
    conflicts: dict[TopicPartition, int] = field(default_factory=dict)
    overdrawn: list[str] = field(default_factory=list)
    missing: list[TopicPartition] = field(default_factory=list)
    nonfinite: str | None = None
    refused_steps: list[int] = field(default_factory=list)


def cell_levels(key: str) -> tuple[str, ...]:
    """The levels a cell key names, or () for a key that is not a JSON array of two or more
    strings (the key of a one-column model's group, which is not indexed).

    >>> cell_levels('["A","a"]'), cell_levels("A17"), cell_levels('["only"]')
    (('A', 'a'), (), ())
    """
    if not key.startswith("["):
        return ()
    try:
        levels = json.loads(key)
    except ValueError:
        return ()
    if (not isinstance(levels, list) or len(levels) < 2
            or not all(isinstance(v, str) for v in levels)):
        return ()
    return tuple(levels)


# -- pinned model ---------------------------------------------------------------------------


class ModelWriteRefusedError(StoreError):
    """`StateStore.put_model_checked` wrote nothing: ``reason`` is "pinned" (an operator pinned
    a version with ``streamlme model --rollback``), "flagged" (the namespace is rebuilding or
    lost) or "epoch" (the namespace was reset since its statistics were read)."""

    #: the scripts' refusal codes -> reasons
    REASONS: ClassVar[dict[str, str]] = {"PINNED": "pinned", "FLAGGED": "flagged", "EPOCH": "epoch"}

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

@runtime_checkable
class StateStore(Protocol):
    """Per-cell statistics plus Kafka offsets, merged atomically per shard; model versions,
    the refresh lease and consumer status beside them."""

    @property
    def n_shards(self) -> int:
        """Shards of the namespace (fixed when it was created)."""
        ...

    def shard_of(self, key: str) -> int:
        """The shard holding cell ``key``."""
        ...

    def merge(
        self,
        adds: GroupStats,
        retracts: GroupStats | None = None,
        offsets: Mapping[TopicPartition, OffsetRange] | None = None,
        half_life: float | None = None,
    ) -> MergeResult:
        """Fold ``adds`` in, take ``retracts`` out, record ``offsets`` in every shard."""
        ...

    def merge_shards(self, parts: Mapping[int, ShardBatch],
                     half_life: float | None = None) -> dict[int, MergeResult]:
        """Apply each shard's part with its offset check, atomically per shard."""
        ...

    def offsets(self, topic: str) -> dict[int, int]:
        """Per partition of ``topic``, the lowest next offset any shard recorded."""
        ...

    def shard_offsets(self, topic: str) -> dict[int, dict[int, int]]:
        """Per shard, the next offset per partition it recorded (shards with none absent)."""
        ...

    def get(self, group: str) -> GroupStats | None:
        """One group's statistics in one round trip; None if never seen."""
        ...

    def get_many(self, groups: Sequence[str]) -> GroupStats:
        """The groups that exist among ``groups``, in the order asked (one round trip)."""
        ...

    def ping(self) -> bool:
        ...

    def read_shard(self, shard: int) -> GroupStats:
        """Every cell of one shard, as one consistent snapshot."""
        ...

    def shard_versions(self) -> list[int]:
        """Per shard, a counter that every merge changing its statistics bumps."""
        ...

    def scan(self, chunk: int = 10_000) -> Iterator[GroupStats]:
        """Every group, in chunks of about ``chunk``, with bounded memory."""
        ...

    def cells_of(self, position: int, level: str) -> list[str]:
        """Keys of the cells whose grouping column ``position`` holds ``level``."""
        ...

    def n_groups(self) -> int:
        ...

    def clear(self) -> None:
        """Delete everything under this store's namespace."""
        ...

    # model records (see streamlme.model) and the refresh leader's lease (streamlme.lease)

    def put_model(self, record: bytes | str, fence: int | None = None,
                  keep: int | None = None) -> int:
        ...

    def get_model(self, version: int | None = None) -> bytes | None:
        ...

    def model_versions(self) -> list[int]:
        ...

    def current_model_version(self) -> int | None:
        ...

    def set_current(self, version: int) -> None:
        ...

    def acquire_lease(self, owner: str, ttl: float) -> int | None:
        ...

    def renew_lease(self, owner: str, token: int, ttl: float) -> bool:
        ...

    def release_lease(self, owner: str, token: int) -> bool:
        ...

    def lease_holder(self) -> tuple[str, int, float] | None:
        ...

    # identity and health (see streamlme.store.health)

    def epoch(self) -> str | None:
        """The namespace's epoch, drawn when it was created (None if it does not exist)."""
        ...

    def health(self) -> Health:
        """Epoch, creation time, flag and accepted offset gaps, in one round trip."""
        ...

    def set_flag(self, flag: str, reason: str) -> None:
        """Flag the namespace ("rebuilding" or "lost"): readers refuse it until cleared."""
        ...

    def clear_flag(self) -> None:
        ...

    def record_gap(self, gap: Gap) -> None:
        ...

    def shard_presence(self) -> list[tuple[bool, bool]]:
        """Per shard: (holds statistics, holds an offsets record)."""
        ...

    def clear_statistics(self) -> None:
        """Drop every shard's statistics and offsets and the gaps; keep epoch, flag, models."""
        ...

    def model_key(self) -> ModelKey | None:
        """(epoch, current model version), or None before any model."""
        ...

    def values_and_model_key(self, groups: Sequence[str]
                             ) -> tuple[list[bytes | None], ModelKey | None]:
        """The byte records of ``groups`` and the current `ModelKey`, in one round trip."""
        ...

    # pinned model (``streamlme model --rollback V`` pins V, ``--unpin`` removes the pin)

    def pin_model(self, version: int) -> None:
        """Make stored ``version`` current and pin it, in one atomic step."""
        ...

    def unpin_model(self) -> int | None:
        """Remove the pin; the version that was pinned, or None."""
        ...

    def pinned_model(self) -> int | None:
        """The pinned version, or None when none is pinned."""
        ...

    def model_pin(self) -> tuple[int, float] | None:
        """(pinned version, unix time it was pinned), or None."""
        ...

    def put_model_checked(self, record: bytes | str, epoch: str | None,
                          fence: int | None = None, keep: int | None = None) -> int:
        """`put_model` unless a version is pinned, the namespace is flagged or its epoch is not
        ``epoch``: then `ModelWriteRefusedError` and nothing is written, atomically."""
        ...

    # dead letters kept by the merge (refused retraction steps), until the consumer sent them

    def dead_letters(self) -> dict[int, dict[str, bytes]]:
        """Per shard, the dead-letter records the merge kept (``topic:partition:offset`` ->
        record), not yet sent."""
        ...

    def delete_dead_letters(self, shard: int, fields: Sequence[str]) -> None:
        """Forget the given dead letters of ``shard`` (sent; by field, never by count)."""
        ...

    # consumer status (see streamlme.status)

    def write_status(self, consumer: str, record: Mapping[str, str | int | float], ttl: float,
                     totals: Mapping[str, int]) -> None:
        """Record a consumer's status (expiring after ``ttl`` s) and add to the totals."""
        ...

    def read_status(self, since: float) -> tuple[dict[str, dict[str, str]], dict[str, int]]:
        """Records of consumers that reported at or after ``since``, and all-time totals."""
        ...
