"""Fold a decoded micro-batch into per-group deltas: one `GroupStats` of adds, one of retracts.

Rows are coded to small integers once (a dict lookup per event, which is cheaper than sorting
strings with ``np.unique``), then `GroupStats.from_codes` builds every statistic with vectorised
``bincount`` passes — there is no Python loop per event per statistic.

>>> import numpy as np
>>> groups = ["a", "b", "a", "a"]
>>> W = np.array([[1.0, 2.0], [5.0, 1.0], [3.0, 4.0], [3.0, 4.0]])
>>> retract = np.array([False, False, False, True])
>>> delta = fold(groups, W, retract=retract)
>>> delta.adds.keys, delta.adds.n.tolist(), delta.retracts.keys
(['a', 'b'], [2.0, 1.0], ['a'])
>>> delta.retract_rows.tolist()
[3]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from streamlme.stats import GroupStats


@dataclass
class Delta:
    """Per-group deltas of one micro-batch.

    ``retracts`` is None when the batch asks for no retraction. ``retract_rows`` are the positions
    (in the folded rows) of the retract events, so a refused retraction of a group can be traced
    back to the events that asked for it.
    """

    adds: GroupStats
    retracts: GroupStats | None
    retract_rows: NDArray[np.intp]
    retract_groups: list[str]
    n_events: int


def code_groups(groups: Sequence[str]) -> tuple[NDArray[np.intp], list[str]]:
    """Integer codes 0..G-1 for the group ids, in order of first appearance, and the ids.

    >>> code_groups(["x", "y", "x"])
    (array([0, 1, 0]), ['x', 'y'])
    """
    index: dict[str, int] = {}
    setdefault = index.setdefault
    codes = np.fromiter((setdefault(g, len(index)) for g in groups), np.intp, len(groups))
    return codes, list(index)


def fold(
    groups: Sequence[str],
    W: ArrayLike,
    weights: ArrayLike | None = None,
    ts: ArrayLike | None = None,
    retract: ArrayLike | None = None,
    half_life: float | None = None,
) -> Delta:
    """Summarise the add rows and the retract rows of a batch, each per group.

    ``W`` is (N, d) in the spec's column order, ``weights`` optional case weights, ``ts`` event
    times (with ``half_life``; a missing time, NaN, means "now"), ``retract`` a boolean mask of
    rows to take back out.
    """
    W, d, codes, keys, v, t, mask = _columns(groups, W, weights, ts, retract, half_life)
    if not mask.any():
        adds = _stats(codes, keys, W, v, t, half_life, None, d)
        return Delta(adds, None, np.zeros(0, np.intp), [], len(codes))
    keep = ~mask
    adds = _stats(codes, keys, W, v, t, half_life, keep, d)
    retracts = _stats(codes, keys, W, v, t, half_life, mask, d)
    rows = np.flatnonzero(mask)
    return Delta(adds, retracts, rows, [keys[c] for c in codes[rows]], len(codes))


@dataclass
class Ordered:
    """Per-group deltas of one micro-batch for the store's per-event path (`fold_ordered`).

    ``adds`` aggregates the groups with no retraction in the batch. Each group with one gets
    ``steps`` in row order: (group, delta, is_retraction, row), a run of adds aggregated, each
    retraction alone (``row`` is its position in the folded rows, -1 for a run of adds).
    """

    adds: GroupStats
    steps: list[tuple[str, GroupStats, bool, int]]


def fold_ordered(
    groups: Sequence[str],
    W: ArrayLike,
    weights: ArrayLike | None = None,
    ts: ArrayLike | None = None,
    retract: ArrayLike | None = None,
    half_life: float | None = None,
) -> Ordered:
    """`fold`, but with the retractions kept in order, so that the store checks each one
    against its group as it stands at that event (whatever the batching).

    >>> import numpy as np
    >>> W = np.array([[1.0, 2.0], [5.0, 1.0], [3.0, 4.0], [3.0, 4.0], [1.0, 1.0]])
    >>> out = fold_ordered(["a", "b", "a", "a", "a"], W,
    ...                    retract=np.array([False, False, False, True, False]))
    >>> out.adds.keys, [(g, len(s), r, row) for g, s, r, row in out.steps]
    (['b'], [('a', 1, False, -1), ('a', 1, True, 3), ('a', 1, False, -1)])
    >>> out.steps[0][1].n.tolist()
    [2.0]
    """
    W, d, codes, keys, v, t, mask = _columns(groups, W, weights, ts, retract, half_life)
    ordered = np.zeros(len(keys), bool)
    ordered[codes[mask]] = True
    plain = ~ordered[codes]
    adds = _stats(codes, keys, W, v, t, half_life, plain, d)
    steps: list[tuple[str, GroupStats, bool, int]] = []
    rows_of: dict[int, list[int]] = {}
    for row in np.flatnonzero(~plain).tolist():
        rows_of.setdefault(int(codes[row]), []).append(row)
    for code, rows in rows_of.items():
        run: list[int] = []
        for row in [*rows, -1]:
            if row >= 0 and not mask[row]:
                run.append(row)
                continue
            if run:
                steps.append((keys[code], _rows(keys[code], W, v, t, half_life, run), False, -1))
                run = []
            if row >= 0:
                steps.append((keys[code], _rows(keys[code], W, v, t, half_life, [row]), True,
                              row))
    return Ordered(adds, steps)


def _columns(groups: Sequence[str], W: ArrayLike, weights: ArrayLike | None,
             ts: ArrayLike | None, retract: ArrayLike | None, half_life: float | None
             ) -> tuple[NDArray[np.float64], int, NDArray[np.intp], list[str],
                        NDArray[np.float64] | None, NDArray[np.float64] | None,
                        NDArray[np.bool_]]:
    """A batch's arrays as `fold` and `fold_ordered` read them: W, d, group codes and ids,
    weights, times (with ``half_life`` only) and the retraction mask."""
    W = np.asarray(W, dtype=float)
    d = W.shape[1] if W.ndim == 2 else 0
    codes, keys = code_groups(groups)
    v = None if weights is None else np.asarray(weights, dtype=float)
    t = None
    if half_life is not None:
        now = time.time()
        t = np.full(len(codes), now) if ts is None else np.asarray(ts, dtype=float)
        # Events without a time are taken to happen as they are processed.
        t = np.where(np.isnan(t), now, t)
    mask = np.zeros(len(codes), bool) if retract is None else np.asarray(retract, dtype=bool)
    return W, d, codes, keys, v, t, mask


def _rows(key: str, W: NDArray[np.float64], v: NDArray[np.float64] | None,
          t: NDArray[np.float64] | None, half_life: float | None, rows: list[int]) -> GroupStats:
    """One group's statistics over ``rows``."""
    idx = np.array(rows, dtype=np.intp)
    return GroupStats.from_codes(np.zeros(len(idx), np.intp), [key], W[idx],
                                 None if v is None else v[idx], None if t is None else t[idx],
                                 half_life)


def _stats(
    codes: NDArray[np.intp],
    keys: list[str],
    W: NDArray[np.float64],
    v: NDArray[np.float64] | None,
    t: NDArray[np.float64] | None,
    half_life: float | None,
    rows: NDArray[np.bool_] | None,
    d: int,
) -> GroupStats:
    if rows is not None:
        codes, W = codes[rows], W[rows]
        v = None if v is None else v[rows]
        t = None if t is None else t[rows]
    if not len(codes):
        return GroupStats.empty(d)
    return GroupStats.from_codes(codes, keys, W, v, t, half_life)
