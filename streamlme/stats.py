"""Per-group sufficient statistics: weight mass n, mean vector m, centered co-moment matrix C.

For the columns w = (covariates, response) of a ModelSpec, a group's rows are summarised by

    n = sum_i v_i,   m = sum_i v_i w_i / n,   C = sum_i v_i (w_i - m)(w_i - m)'

with case weights v_i (1 unless given). Two summaries merge exactly with the pairwise update of
Chan, Golub and LeVeque (1979), "Updating formulae and a pairwise algorithm for computing sample
variances", and a merged part is retracted with the inverse update. Storing the centered C, not
raw sums, keeps the cross-products about any reference point r,

    sum_i v_i (w_i - r)(w_i - r)' = C + n (m - r)(m - r)',

free of the cancellation raw sums suffer when y ~ 1e7 + noise. Exponential forgetting multiplies
a group's mass (n and C, not m) by 2^(-dt / half_life); each group carries the time t its mass is
valid at, so decay stays exact however updates interleave.

`GroupStats` holds many groups at once in numpy arrays and behaves like river's mergeable
statistics: ``update`` folds rows in, ``+=`` merges, ``-=`` retracts.

>>> import numpy as np
>>> W = np.array([[1.0, 2.0], [2.0, 4.5], [3.0, 5.5], [10.0, 1.0]])
>>> s = GroupStats.from_rows(["a", "a", "a", "b"], W)
>>> s.keys, s.n.tolist()
(['a', 'b'], [3.0, 1.0])
>>> part = GroupStats.from_rows(["a"], W[2:3])
>>> s -= part                      # take the third row back out
>>> np.allclose(s.get("a")[1], W[:2].mean(axis=0))
True
>>> GroupStats.from_bytes_one(s.to_bytes_one(0))[0]
2.0
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

MAGIC = b"SL"
FORMAT_VERSION = 1
HEADER = struct.Struct("<2sBB")  # magic, format version, d (number of columns)

Array = NDArray[np.float64]


class StatsError(ValueError):
    """Statistics that are malformed, of the wrong width, or not finite."""


def packed_size(d: int) -> int:
    """Bytes of one serialised group with d columns: header, n, t, m, upper triangle of C."""
    return HEADER.size + 8 * (2 + d + d * (d + 1) // 2)


def merge_moments(
    n_a: Array, m_a: Array, C_a: Array, n_b: Array, m_b: Array, C_b: Array
) -> tuple[Array, Array, Array]:
    """Pairwise (Chan et al.) merge of stacked summaries; leading axes are groups."""
    n = n_a + n_b
    safe = np.where(n > 0, n, 1.0)
    delta = m_b - m_a
    m = m_a + delta * (n_b / safe)[..., None]
    w = (n_a * n_b / safe)[..., None, None]
    C = C_a + C_b + w * delta[..., :, None] * delta[..., None, :]
    return n, m, C


def retract_moments(
    n: Array, m: Array, C: Array, n_b: Array, m_b: Array, C_b: Array, rtol: float = 1e-12
) -> tuple[Array, Array, Array]:
    """Inverse of `merge_moments`: remove summary b from the merged summary (n, m, C).

    Where the mass left is zero (to ``rtol`` of what was there) the result is exactly zero, so
    retracting everything a group ever saw leaves no rounding dust behind.
    """
    n_a = n - n_b
    empty = n_a <= rtol * np.maximum(n, 1.0)
    safe = np.where(empty, 1.0, n_a)
    m_a = m + (n_b / safe)[..., None] * (m - m_b)
    delta = m_b - m_a
    w = (n_a * n_b / np.where(n > 0, n, 1.0))[..., None, None]
    C_a = C - C_b - w * delta[..., :, None] * delta[..., None, :]
    n_a = np.where(empty, 0.0, n_a)
    m_a = np.where(empty[..., None], 0.0, m_a)
    C_a = np.where(empty[..., None, None], 0.0, C_a)
    return n_a, m_a, C_a


def decay_factor(dt: Array | float, half_life: float) -> Array:
    """The multiplier 2^(-dt / half_life) for mass that is dt old (dt <= 0 gives 1)."""
    return np.exp2(-np.maximum(np.asarray(dt, dtype=float), 0.0) / half_life)


@dataclass
class GroupStats:
    """Sufficient statistics of many groups, one row per group.

    Attributes
    ----------
    keys
        Group ids, in row order.
    n
        Weight mass per group, shape (G,).
    mean
        Mean of the columns per group, shape (G, d).
    C
        Centered co-moment matrices, shape (G, d, d).
    t
        Time each group's mass is valid at (NaN when decay is not used), shape (G,).
    """

    keys: list[str]
    n: Array
    mean: Array
    C: Array
    t: Array

    def __post_init__(self) -> None:
        self.keys = list(self.keys)  # owned: merging new groups extends it in place
        G = len(self.keys)
        self.n = np.asarray(self.n, dtype=float).reshape(G)
        d = np.asarray(self.mean).shape[-1]
        self.mean = np.asarray(self.mean, dtype=float).reshape(G, d)
        self.C = np.asarray(self.C, dtype=float).reshape(G, d, d)
        self.t = np.asarray(self.t, dtype=float).reshape(G)
        self._index = {k: i for i, k in enumerate(self.keys)}
        if len(self._index) != G:
            raise StatsError("duplicate group keys")

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def empty(cls, d: int) -> GroupStats:
        return cls([], np.zeros(0), np.zeros((0, d)), np.zeros((0, d, d)), np.zeros(0))

    @classmethod
    def from_rows(
        cls,
        groups: Sequence[object] | ArrayLike,
        W: ArrayLike,
        weights: ArrayLike | None = None,
        ts: ArrayLike | None = None,
        half_life: float | None = None,
        *,
        columns: Sequence[str] | None = None,
    ) -> GroupStats:
        """Summarise rows in one vectorised pass.

        ``groups`` holds each row's group id (converted to ``str``), ``W`` the rows (N, d).
        ``W`` may be a data frame: then ``columns`` (a spec's ``columns``) picks and orders
        its columns, so that they line up with the model's. With ``half_life`` and event times
        ``ts``, each row is weighted by 2^(-(t_group - ts)/half_life) where t_group is the
        group's latest event time.
        """
        if hasattr(W, "columns"):
            if columns is None:
                raise StatsError("W is a data frame: pass columns=spec.columns so that its "
                                 "columns are taken in the model's order")
            missing = [c for c in columns if c not in W.columns]  # type: ignore[union-attr]
            if missing:
                raise StatsError(f"W lacks column(s) {missing}")
            W = W[list(columns)].to_numpy(dtype=float)  # type: ignore[index]
        elif columns is not None and np.shape(W)[-1] != len(columns):
            raise StatsError(f"W has {np.shape(W)[-1]} columns but columns names {len(columns)}")
        labels = np.asarray(groups)
        if labels.ndim != 1:
            raise StatsError("groups must be one-dimensional")
        keys, codes = np.unique(labels.astype(str), return_inverse=True)
        return cls.from_codes(codes, [str(k) for k in keys], W, weights, ts, half_life)

    @classmethod
    def from_codes(
        cls,
        codes: ArrayLike,
        keys: Sequence[str],
        W: ArrayLike,
        weights: ArrayLike | None = None,
        ts: ArrayLike | None = None,
        half_life: float | None = None,
    ) -> GroupStats:
        """Like `from_rows` for rows already coded 0..len(keys)-1; groups without mass drop."""
        codes = np.asarray(codes, dtype=np.intp).ravel()
        W = np.asarray(W, dtype=float)
        if W.ndim != 2 or W.shape[0] != codes.shape[0]:
            raise StatsError(f"W must be (N, d) with N = {codes.shape[0]} rows, got {W.shape}")
        if not np.isfinite(W).all():
            raise StatsError("rows contain NaN or infinite values")
        G, d = len(keys), W.shape[1]
        v = np.ones(codes.shape[0]) if weights is None else np.asarray(weights, float).ravel()
        if v.shape != codes.shape or not np.isfinite(v).all() or (v < 0).any():
            raise StatsError("weights must be finite, non-negative, one per row")
        t = np.full(G, np.nan)
        if half_life is not None:
            if ts is None:
                raise StatsError("decay needs event times ts")
            ts = np.asarray(ts, dtype=float).ravel()
            t = np.full(G, -np.inf)
            np.maximum.at(t, codes, ts)
            v = v * decay_factor(t[codes] - ts, half_life)
        n = np.bincount(codes, weights=v, minlength=G)
        safe = np.where(n > 0, n, 1.0)
        # Sum offsets from one of each group's rows, not raw values: a raw sum of values near
        # 1e14 rounds to units of 0.5 and the mean loses the digits the rows had. (With
        # repeated indices the assignment keeps one of them: any row of the group will do.)
        ref = np.zeros((G, d))
        ref[codes] = W
        shifted = W - ref[codes]
        mean = np.empty((G, d))
        for k in range(d):
            mean[:, k] = ref[:, k] + np.bincount(codes, weights=v * shifted[:, k],
                                                 minlength=G) / safe
        dev = W - mean[codes]
        C = np.empty((G, d, d))
        for a in range(d):
            va = v * dev[:, a]
            for b in range(a, d):
                C[:, a, b] = C[:, b, a] = np.bincount(codes, weights=va * dev[:, b], minlength=G)
        keep = n > 0
        kept = [k for k, ok in zip(keys, keep) if ok]
        return cls(kept, n[keep], mean[keep], C[keep], t[keep])

    # -- access -----------------------------------------------------------------------------

    @property
    def d(self) -> int:
        return self.mean.shape[1]

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def index(self, key: str) -> int:
        return self._index[key]

    def get(self, key: str) -> tuple[float, Array, Array]:
        """(n, mean, C) of one group; KeyError if unseen."""
        i = self._index[key]
        return float(self.n[i]), self.mean[i], self.C[i]

    def select(self, keys: Iterable[str]) -> GroupStats:
        """The given groups, in the given order (KeyError if one is unseen)."""
        keys = list(keys)
        idx = np.array([self._index[k] for k in keys], dtype=np.intp)
        return GroupStats(keys, self.n[idx], self.mean[idx], self.C[idx], self.t[idx])

    def copy(self) -> GroupStats:
        return GroupStats(list(self.keys), self.n.copy(), self.mean.copy(), self.C.copy(),
                          self.t.copy())

    def total(self) -> tuple[float, Array, Array]:
        """(n, mean, C) of all groups pooled, merged exactly."""
        N, e, C = self.pooled_about(self.mean[0] if len(self) else np.zeros(self.d))
        return N, self.mean[0] + e, C

    def pooled_about(self, r: Array) -> tuple[float, Array, Array]:
        """(N, e, C) of all groups pooled: the mass, the pooled mean minus ``r`` and the
        co-moments about the pooled mean.

        e is formed from the groups' offsets m_j - r, never from raw sums, so with r near the
        data (y ~ 1e14 + noise, r ~ 1e14) it keeps the digits of the data's spread, and
        sum_j n_j (m_j - r) = N e holds to those digits: the pooled cross-products about r
        then agree with the sum of the groups' ones, which a fit needs (see
        `streamlme.estimate.crossprod`).
        """
        if not len(self):
            raise StatsError("no groups")
        N = float(self.n.sum())
        off = self.mean - np.asarray(r, dtype=float)
        e = (self.n @ off) / N
        dev = off - e
        C = self.C.sum(axis=0) + np.einsum("g,ga,gb->ab", self.n, dev, dev)
        return N, e, C

    def check_finite(self) -> None:
        """Raise StatsError if any statistic is NaN/inf or a mass is negative."""
        if not (np.isfinite(self.n).all() and np.isfinite(self.mean).all()
                and np.isfinite(self.C).all()):
            bad = ~(np.isfinite(self.n) & np.isfinite(self.mean).all(1)
                    & np.isfinite(self.C).all((1, 2)))
            first = [self.keys[i] for i in np.flatnonzero(bad)[:5]]
            raise StatsError(f"statistics of group(s) {first} contain NaN or infinite values")
        if (self.n < 0).any():
            raise StatsError("negative weight mass")

    # -- merge, retract, decay --------------------------------------------------------------

    def _align(self, other: GroupStats) -> tuple[np.ndarray, np.ndarray]:
        if other.d != self.d:
            raise StatsError(f"cannot combine statistics of {self.d} and {other.d} columns")
        new = [k for k in other.keys if k not in self._index]
        if new:
            self._grow(new)
        idx = np.array([self._index[k] for k in other.keys], dtype=np.intp)
        return idx, np.arange(len(other.keys))

    def _grow(self, new: list[str]) -> None:
        """Append empty rows for new groups; capacity doubles, so a long stream of batches that
        each bring a few new groups costs amortised O(new), not O(all groups) per batch."""
        G0, G1 = len(self.keys), len(self.keys) + len(new)
        buf = getattr(self, "_buf", None)
        if buf is None or buf[0].shape[0] < G1:
            cap = max(G1, 2 * G0, 16)
            grown = (np.zeros(cap), np.zeros((cap, self.d)), np.zeros((cap, self.d, self.d)),
                     np.full(cap, np.nan))
            for old, fresh in zip((self.n, self.mean, self.C, self.t), grown):
                fresh[:G0] = old
            buf = self._buf = grown
        self.keys.extend(new)
        self._index.update({k: G0 + i for i, k in enumerate(new)})
        self.n, self.mean, self.C, self.t = (b[:G1] for b in buf)
        self.n[G0:], self.mean[G0:], self.C[G0:], self.t[G0:] = 0.0, 0.0, 0.0, np.nan

    def decay_to(self, t: Array | float, half_life: float, idx: np.ndarray | None = None) -> None:
        """Age the mass of groups (all, or rows idx) to time t; earlier times never move back."""
        idx = np.arange(len(self)) if idx is None else idx
        t_now = np.broadcast_to(np.asarray(t, dtype=float), idx.shape)
        t_old = self.t[idx]
        f = np.where(np.isfinite(t_old), decay_factor(t_now - t_old, half_life), 1.0)
        self.n[idx] *= f
        self.C[idx] *= f[:, None, None]
        self.t[idx] = np.fmax(t_old, t_now)

    def merge(self, other: GroupStats, half_life: float | None = None) -> GroupStats:
        """Fold ``other`` in (groups it has that self lacks are added); returns self."""
        idx, jdx = self._align(other)
        if half_life is not None:
            t = np.fmax(self.t[idx], other.t[jdx])
            self.decay_to(t, half_life, idx)
            b = other.copy()
            b.decay_to(t, half_life, jdx)
            other = b
        n, m, C = merge_moments(self.n[idx], self.mean[idx], self.C[idx],
                                other.n[jdx], other.mean[jdx], other.C[jdx])
        self.n[idx], self.mean[idx], self.C[idx] = n, m, C
        self.t[idx] = np.fmax(self.t[idx], other.t[jdx])
        return self

    def retract(self, other: GroupStats) -> GroupStats:
        """Take rows summarised in ``other`` back out (each must be a group of self)."""
        missing = [k for k in other.keys if k not in self._index]
        if missing:
            raise StatsError(f"cannot retract from unseen group(s) {missing[:5]}")
        idx, jdx = self._align(other)
        n, m, C = retract_moments(self.n[idx], self.mean[idx], self.C[idx],
                                  other.n[jdx], other.mean[jdx], other.C[jdx])
        self.n[idx], self.mean[idx], self.C[idx] = n, m, C
        return self

    def __iadd__(self, other: GroupStats) -> GroupStats:
        return self.merge(other)

    def __isub__(self, other: GroupStats) -> GroupStats:
        return self.retract(other)

    def __add__(self, other: GroupStats) -> GroupStats:
        return self.copy().merge(other)

    def __sub__(self, other: GroupStats) -> GroupStats:
        return self.copy().retract(other)

    # -- bytes ------------------------------------------------------------------------------

    def to_bytes_one(self, i: int) -> bytes:
        """One group as compact little-endian float64 bytes (see `packed_size`)."""
        return pack(self.n[i], self.t[i], self.mean[i], self.C[i])

    def to_bytes(self) -> list[bytes]:
        """Every group, in row order, as `to_bytes_one` would give them."""
        d = self.d
        iu = np.triu_indices(d)
        body = np.concatenate(
            [self.n[:, None], self.t[:, None], self.mean, self.C[:, iu[0], iu[1]]], axis=1
        ).astype("<f8")
        head = HEADER.pack(MAGIC, FORMAT_VERSION, d)
        return [head + row.tobytes() for row in body]

    @staticmethod
    def from_bytes_one(data: bytes) -> tuple[float, Array, Array, float]:
        """(n, mean, C, t) of one serialised group."""
        n, t, m, C = unpack_many([data])
        return float(n[0]), m[0], C[0], float(t[0])

    @classmethod
    def from_bytes(cls, keys: Sequence[str], values: Sequence[bytes]) -> GroupStats:
        """Rebuild many groups from serialised values, one per key."""
        if len(keys) != len(values):
            raise StatsError("one value per key is needed")
        if not values:
            raise StatsError("no values to decode; use GroupStats.empty(d)")
        n, t, m, C = unpack_many(values)
        return cls(list(keys), n, m, C, t)


def pack(n: float, t: float, mean: Array, C: Array) -> bytes:
    d = mean.shape[0]
    iu = np.triu_indices(d)
    body = np.concatenate([[n, t], mean, C[iu]]).astype("<f8")
    return HEADER.pack(MAGIC, FORMAT_VERSION, d) + body.tobytes()


def unpack_many(values: Sequence[bytes]) -> tuple[Array, Array, Array, Array]:
    """Decode serialised groups of one width into stacked (n, t, mean, C)."""
    first = values[0]
    if len(first) < HEADER.size:
        raise StatsError("value too short for a statistics header")
    magic, version, d = HEADER.unpack_from(first)
    if magic != MAGIC:
        raise StatsError(f"not a streamlme statistics value (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise StatsError(f"statistics format version {version}; this build reads {FORMAT_VERSION}")
    size = packed_size(d)
    blob = b"".join(values)
    if len(blob) != size * len(values) or any(v[: HEADER.size] != first[: HEADER.size]
                                                for v in values):
        raise StatsError(f"values are not all {size}-byte statistics of {d} columns")
    rows = np.frombuffer(blob, dtype=np.uint8).reshape(len(values), size)[:, HEADER.size :]
    body = rows.copy().view("<f8").astype(float)
    n, t, m = body[:, 0], body[:, 1], body[:, 2 : 2 + d]
    tri = body[:, 2 + d :]
    iu = np.triu_indices(d)
    C = np.zeros((len(values), d, d))
    C[:, iu[0], iu[1]] = tri
    C[:, iu[1], iu[0]] = tri
    return n, t, m, C
