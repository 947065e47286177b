"""Properties of the mergeable per-group statistics (design.md section 3)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from streamlme.stats import GroupStats, StatsError, packed_size

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@st.composite
def rows(draw: st.DrawFn, d: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = d or draw(st.integers(1, 4))
    n = draw(st.integers(1, 60))
    groups = draw(arrays(np.int64, n, elements=st.integers(0, 5)))
    W = draw(arrays(np.float64, (n, d), elements=finite))
    weights = draw(arrays(np.float64, n, elements=st.floats(0.1, 10.0)))
    return groups, W, weights


def assert_same(a: GroupStats, b: GroupStats, rtol: float = 1e-10, scale: float = 1.0) -> None:
    """Equal to rtol, absolute differences judged against ``scale`` (or the largest C in a)."""
    assert sorted(a.keys) == sorted(b.keys)
    b = b.select(a.keys)
    scale = max(1.0, scale, float(np.max(np.abs(a.C))) if a.C.size else 1.0)
    np.testing.assert_allclose(a.n, b.n, rtol=rtol)
    np.testing.assert_allclose(a.mean, b.mean, rtol=rtol, atol=rtol * max(1.0, np.abs(a.mean).max()))
    np.testing.assert_allclose(a.C, b.C, rtol=rtol, atol=rtol * scale)


def reference(groups: np.ndarray, W: np.ndarray, v: np.ndarray | None = None) -> GroupStats:
    """Two-pass textbook statistics per group, one group at a time (no shared code path)."""
    v = np.ones(len(W)) if v is None else v
    keys = sorted({str(g) for g in groups})
    n, m, C = [], [], []
    for k in keys:
        rows = np.array([str(g) == k for g in groups])
        w, X = v[rows], W[rows]
        mean = (w[:, None] * X).sum(0) / w.sum()
        dev = X - mean
        n.append(w.sum())
        m.append(mean)
        C.append((w[:, None, None] * dev[:, :, None] * dev[:, None, :]).sum(0))
    return GroupStats(keys, np.array(n), np.array(m), np.array(C), np.full(len(keys), np.nan))


@settings(max_examples=150, deadline=None)
@given(rows(), st.data())
def test_merging_any_split_in_any_order_equals_one_pass(r, data) -> None:
    groups, W, v = r
    one_pass = GroupStats.from_rows(groups, W, v)
    assert_same(one_pass, reference(groups, W, v))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(W)), max_size=5)))
    parts = np.split(np.arange(len(W)), cuts)
    order = data.draw(st.permutations(range(len(parts))))
    merged = GroupStats.empty(W.shape[1])
    for i in order:
        idx = parts[i]
        if len(idx):
            merged += GroupStats.from_rows(groups[idx], W[idx], v[idx])
    assert_same(one_pass, merged)


@settings(max_examples=150, deadline=None)
@given(rows(), st.data())
def test_retract_undoes_merge(r, data) -> None:
    groups, W, v = r
    k = data.draw(st.integers(1, len(W)))
    base = GroupStats.from_rows(groups[:k], W[:k], v[:k])
    if k < len(W):
        extra = GroupStats.from_rows(groups[k:], W[k:], v[k:])
        both = base + extra
        back = both - extra
        back_live = back.select([key for key in back.keys if key in base])
        # retraction subtracts: rounding is relative to what was there before
        assert_same(base, back_live, rtol=1e-8, scale=float(np.abs(both.C).max()))
        gone = [key for key in back.keys if key not in base]
        assert all(back.get(key)[0] == 0.0 for key in gone)


def test_retracting_everything_leaves_exact_zero() -> None:
    W = np.array([[1e7 + 0.1, 3.0], [1e7 - 0.3, 4.0]])
    s = GroupStats.from_rows(["a", "a"], W)
    s -= GroupStats.from_rows(["a"], W[:1])
    s -= GroupStats.from_rows(["a"], W[1:])
    n, m, C = s.get("a")
    assert n == 0.0 and not m.any() and not C.any()


def test_weights_are_case_weights() -> None:
    W = np.array([[1.0], [2.0], [4.0]])
    weighted = GroupStats.from_rows(["g"] * 3, W, weights=[1.0, 2.0, 1.0])
    repeated = GroupStats.from_rows(["g"] * 4, np.array([[1.0], [2.0], [2.0], [4.0]]))
    assert_same(weighted, repeated)


def test_huge_offset_keeps_digits() -> None:
    rng = np.random.default_rng(3)
    x = 1e7 + rng.normal(size=10_000)
    s = GroupStats.from_rows(np.zeros(10_000, int), x[:, None])
    half = GroupStats.from_rows(np.zeros(5_000, int), x[:5_000, None])
    half += GroupStats.from_rows(np.zeros(5_000, int), x[5_000:, None])
    exact = np.var(x - 1e7) * 10_000
    assert abs(s.C[0, 0, 0] - exact) < 1e-6 * exact
    assert abs(half.C[0, 0, 0] - exact) < 1e-6 * exact


@settings(max_examples=60, deadline=None)
@given(rows(d=2), st.floats(0.5, 50.0), st.data())
def test_decay_matches_weighting_each_row_by_its_age(r, half_life, data) -> None:
    groups, W, _ = r
    ts = np.sort(data.draw(arrays(np.float64, len(W), elements=st.floats(0, 100))))
    split = data.draw(st.integers(0, len(W)))
    merged = GroupStats.empty(2)
    for sl in (slice(0, split), slice(split, None)):
        if len(W[sl]):
            merged.merge(GroupStats.from_rows(groups[sl], W[sl], ts=ts[sl], half_life=half_life),
                         half_life=half_life)
    # each group's rows weighted by 2^-(t_last - t_i)/h, t_last the group's latest event
    last = {str(g): ts[groups == g].max() for g in np.unique(groups)}
    v = np.array([2.0 ** (-(last[str(g)] - t) / half_life) for g, t in zip(groups, ts)])
    assert_same(reference(groups, W, v), merged, rtol=1e-9)


@given(rows())
def test_bytes_round_trip(r) -> None:
    groups, W, v = r
    s = GroupStats.from_rows(groups, W, v)
    back = GroupStats.from_bytes(s.keys, s.to_bytes())
    assert_same(s, back, rtol=0)
    assert s.to_bytes()[0] == s.to_bytes_one(0)
    n, m, _C, _t = GroupStats.from_bytes_one(s.to_bytes_one(0))
    assert n == s.n[0] and (m == s.mean[0]).all()


def test_serialised_size_for_seven_columns_is_under_400_bytes() -> None:
    s = GroupStats.from_rows(["a", "a"], np.arange(14.0).reshape(2, 7))
    assert len(s.to_bytes_one(0)) == packed_size(7) < 400


def test_bad_bytes_and_bad_rows_are_rejected_with_reasons() -> None:
    with pytest.raises(StatsError, match="magic"):
        GroupStats.from_bytes_one(b"XX\x01\x02" + bytes(64))
    good = GroupStats.from_rows(["a"], np.ones((1, 2))).to_bytes_one(0)
    with pytest.raises(StatsError, match="not all"):
        GroupStats.from_bytes(["a"], [good[:-1]])
    with pytest.raises(StatsError, match="NaN"):
        GroupStats.from_rows(["a"], np.array([[np.nan, 1.0]]))
    with pytest.raises(StatsError, match="weights"):
        GroupStats.from_rows(["a"], np.ones((1, 2)), weights=[-1.0])
    with pytest.raises(StatsError, match="unseen"):
        GroupStats.from_rows(["a"], np.ones((1, 2))).retract(
            GroupStats.from_rows(["b"], np.ones((1, 2))))
