"""The StateStore protocol: where per-group statistics, Kafka offsets and models live.

The store knows nothing of REML; it keeps bytes of `streamlme.stats` and applies deltas with the
pairwise merge. Every implementation gives the same guarantees:

- `merge` applies a micro-batch of per-group deltas **and** records the next offset of every
  Kafka partition in the batch, atomically. A batch is accepted only if, for every partition it
  carries, it starts exactly where the recorded offset ends (or the partition has no record yet);
  otherwise nothing changes and `merge` returns a refusal. That one check makes replays no-ops and
  stops a consumer whose partitions were taken away (a zombie) from applying anything twice.
- Retractions that would take more mass out of a group than it holds are refused per group and
  reported, so the caller can dead-letter the events that asked for them.
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
from typing import Protocol, runtime_checkable

from streamlme.stats import GroupStats

#: A Kafka partition as (topic, partition).
TopicPartition = tuple[str, int]


@dataclass(frozen=True)
class OffsetRange:
    """The offsets of one partition a batch covers: ``start`` (first) to ``end`` (next to read)."""

    start: int
    end: int


@dataclass
class MergeResult:
    """What `StateStore.merge` did.

    ``applied`` is False when the batch was refused because a partition's recorded offset did not
    equal the batch's start (``conflicts`` maps those partitions to the recorded offset).
    ``overdrawn`` lists groups whose retraction was refused because it exceeded their mass.
    """

    applied: bool
    conflicts: dict[TopicPartition, int] = field(default_factory=dict)
    overdrawn: list[str] = field(default_factory=list)


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


@runtime_checkable
class StateStore(Protocol):
    """Per-group statistics plus Kafka offsets, merged atomically."""

    def merge(
        self,
        adds: GroupStats,
        retracts: GroupStats | None = None,
        offsets: Mapping[TopicPartition, OffsetRange] | None = None,
        half_life: float | None = None,
    ) -> MergeResult:
        """Fold ``adds`` in, take ``retracts`` out, record ``offsets``; all or nothing."""
        ...

    def offsets(self, topic: str) -> dict[int, int]:
        """Next offset to read, per partition of ``topic``, as recorded by applied batches."""
        ...

    def get(self, group: str) -> GroupStats | None:
        """One group's statistics in one round trip; None if never seen."""
        ...

    def get_many(self, groups: Sequence[str]) -> GroupStats:
        """The groups that exist among ``groups``, in the order asked (one round trip)."""
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
