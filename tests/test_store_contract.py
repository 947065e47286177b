"""The StateStore contract, checked on MemoryStore and on RedisStore against a real Redis."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlme.stats import GroupStats
from streamlme.store import (
    MemoryStore,
    OffsetRange,
    RedisStore,
    StaleFenceError,
    StateStore,
    StoreError,
)
from streamlme.store.health import Gap

MakeStore = Callable[..., StateStore]

WEIRD_IDS = [
    "A17",
    "a:b",
    "{x}",
    "}{",
    "a/b\\c",
    "with space",
    "é日本🎉",
    "%41",
    "A",
    "*?[]",
    "tab\there",
    "é" * 128,  # 256 UTF-8 bytes, the longest id allowed
]


@pytest.fixture(params=["memory", "redis", "cluster"])
def make_store(request: pytest.FixtureRequest, namespace: str) -> Iterator[MakeStore]:
    """Makes fresh, empty stores of the parametrised kind (each Redis one its own namespace;
    "cluster" is a real local Redis Cluster of 3 masters and 3 replicas)."""
    if request.param == "memory":
        yield lambda **kw: MemoryStore(**kw)
        return
    if request.param == "cluster":
        client = request.getfixturevalue("redis_cluster").client()
    else:
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    counter = itertools.count()
    made: list[RedisStore] = []

    def make(**kw: object) -> RedisStore:
        store = RedisStore(client, f"{namespace}-{next(counter)}", **kw)  # type: ignore[arg-type]
        made.append(store)
        return store

    yield make
    for store in made:
        store.clear()


def everything(store: StateStore) -> GroupStats:
    parts = list(store.scan(chunk=7))
    keys = [k for p in parts for k in p.keys]
    assert len(keys) == len(set(keys)), "scan returned a group twice"
    return store.get_many(keys)


def assert_stats_close(got: GroupStats, want: GroupStats, rtol: float = 1e-10) -> None:
    """Same groups; n, mean and C equal to rtol (absolute parts judged against their scale)."""
    assert sorted(got.keys) == sorted(want.keys)
    got = got.select(want.keys)
    np.testing.assert_allclose(got.n, want.n, rtol=rtol, atol=rtol * max(1.0, want.n.max()))
    m_scale = max(1.0, float(np.abs(want.mean).max()))
    np.testing.assert_allclose(got.mean, want.mean, rtol=rtol, atol=rtol * m_scale)
    # Means near 1e6 are rounded to ~1e-10 absolute, and that rounding enters C through the
    # merge's mean difference, scaled by n |delta|: judge C against that as well.
    live = want.n > 0
    spread = np.abs(np.diagonal(want.C, axis1=1, axis2=2))[live].max(initial=0.0)
    delta = float(np.sqrt(spread / want.n[live].min())) if live.any() else 0.0
    # ten ulps of the means, in units of rtol (an exact comparison, rtol = 0, needs none)
    rounding = 10 * np.finfo(float).eps / rtol if rtol > 0 else 0.0
    c_scale = max(1.0, float(np.abs(want.C).max()), want.n.max() * m_scale * delta * rounding)
    np.testing.assert_allclose(got.C, want.C, rtol=rtol, atol=rtol * c_scale)


def random_rows(seed: int, n: int, d: int, groups: list[str]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.array(groups, dtype=object)[rng.integers(0, len(groups), n)]
    W = rng.normal(size=(n, d)) * rng.uniform(0.5, 5, d) + rng.uniform(-10, 10, d)
    W[:, -1] += 1e6  # a response far from zero: centred co-moments must not cancel
    return labels, W


def tp(partition: int, topic: str = "events") -> tuple[str, int]:
    return (topic, partition)


# -- merging ----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 300),
    d=st.integers(1, 4),
    n_groups=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    cuts=st.lists(st.floats(0, 1), max_size=6),
    weighted=st.booleans(),
)
def test_merging_batches_equals_one_pass(make_store, n, d, n_groups, seed, cuts, weighted):
    labels, W = random_rows(seed, n, d, WEIRD_IDS[:n_groups])
    v = np.random.default_rng(seed + 1).uniform(0.1, 3, n) if weighted else None
    store = make_store(d=d)
    bounds = [0, *sorted(int(c * n) for c in cuts), n]
    for a, b in itertools.pairwise(bounds):
        if a == b:
            continue
        part = GroupStats.from_rows(labels[a:b], W[a:b], None if v is None else v[a:b])
        result = store.merge(part, offsets={tp(0): OffsetRange(a, b)})
        assert result.applied and not result.overdrawn
    assert_stats_close(everything(store), GroupStats.from_rows(labels, W, v))
    assert store.offsets("events") == {0: n}
    assert store.n_groups() == len(set(labels))
    store.clear()


def test_retract_undoes_merge(make_store):
    labels, W = random_rows(1, 400, 3, WEIRD_IDS)
    first = GroupStats.from_rows(labels[:250], W[:250])
    second = GroupStats.from_rows(labels[250:], W[250:])
    store = make_store(d=3)
    store.merge(first)
    store.merge(second)
    result = store.merge(GroupStats.empty(3), retracts=second)
    assert result.applied and result.overdrawn == []
    assert_stats_close(store.get_many(first.keys), first, rtol=1e-9)
    # taking everything out leaves exact zeros, not rounding dust
    store.merge(GroupStats.empty(3), retracts=first)
    left = store.get_many(first.keys)
    assert np.all(left.n == 0) and np.all(left.mean == 0) and np.all(left.C == 0)


def test_adds_apply_before_retracts_in_one_batch(make_store):
    labels, W = random_rows(2, 50, 2, ["g"])
    store = make_store()
    whole = GroupStats.from_rows(labels, W)
    result = store.merge(whole, retracts=GroupStats.from_rows(labels[:20], W[:20]))
    assert result.applied and result.overdrawn == []
    assert_stats_close(store.get_many(["g"]), GroupStats.from_rows(labels[20:], W[20:]), 1e-9)


def test_overdrawn_retraction_is_refused_and_reported(make_store):
    labels, W = random_rows(3, 100, 2, ["a", "b", "c"])
    store = make_store()
    store.merge(GroupStats.from_rows(labels, W))
    before = store.get_many(["a", "b", "c"])
    a_rows = labels == "a"
    too_much = GroupStats.from_rows(np.r_[labels[a_rows], ["a"]], np.r_[W[a_rows], W[:1]])
    b_part = GroupStats.from_rows(labels[labels == "b"][:3], W[labels == "b"][:3])
    unseen = GroupStats.from_rows(["never"], W[:1])
    retracts = GroupStats(
        ["a", "b", "never"],
        np.r_[too_much.n, b_part.n, unseen.n],
        np.r_[too_much.mean, b_part.mean, unseen.mean],
        np.r_[too_much.C, b_part.C, unseen.C],
        np.full(3, np.nan),
    )
    result = store.merge(GroupStats.empty(2), retracts=retracts,
                         offsets={tp(0): OffsetRange(0, 5)})
    assert result.applied
    assert sorted(result.overdrawn) == ["a", "never"]
    after = store.get_many(["a", "b", "c", "never"])
    assert after.keys == ["a", "b", "c"], "a refused retraction must not create the group"
    assert_stats_close(after.select(["a", "c"]), before.select(["a", "c"]), rtol=0)
    assert after.get("b")[0] == pytest.approx(before.get("b")[0] - 3)
    assert store.offsets("events") == {0: 5}


def test_retraction_within_rounding_of_the_mass_is_allowed(make_store):
    store = make_store()
    store.merge(GroupStats(["g"], [1.0], [[1.0, 2.0]], np.zeros((1, 2, 2)), [np.nan]))
    slightly_more = GroupStats(["g"], [1.0 + 1e-12], [[1.0, 2.0]], np.zeros((1, 2, 2)), [np.nan])
    assert store.merge(GroupStats.empty(2), retracts=slightly_more).overdrawn == []
    assert store.get("g").n.tolist() == [0.0]


# -- offsets ----------------------------------------------------------------------------------


def snapshot_of(store: StateStore) -> tuple[list[str], bytes, dict[int, int]]:
    stats = everything(store)
    return sorted(stats.keys), b"".join(stats.select(sorted(stats.keys)).to_bytes()), \
        store.offsets("events")


def test_offsets_are_recorded_with_the_batch_and_a_replay_changes_nothing(make_store):
    labels, W = random_rows(4, 60, 2, ["a", "b"])
    batch = GroupStats.from_rows(labels, W)
    store = make_store()
    offsets = {tp(0): OffsetRange(0, 40), tp(1): OffsetRange(7, 27), tp(0, "other"): OffsetRange(3, 4)}
    assert store.merge(batch, offsets=offsets).applied
    assert store.offsets("events") == {0: 40, 1: 27}
    assert store.offsets("other") == {0: 4}
    assert store.offsets("unknown") == {}
    before = snapshot_of(store)
    replay = store.merge(batch, offsets=offsets)
    assert not replay.applied
    assert replay.conflicts == {tp(0): 40, tp(1): 27, tp(0, "other"): 4}
    assert snapshot_of(store) == before


def test_a_stale_batch_is_refused_whole(make_store):
    labels, W = random_rows(5, 60, 2, ["a", "b"])
    store = make_store()
    store.merge(GroupStats.from_rows(labels[:30], W[:30]),
                offsets={tp(0): OffsetRange(0, 30), tp(1): OffsetRange(0, 10)})
    before = snapshot_of(store)
    # partition 1 continues correctly, partition 0 starts before what was applied (a zombie)
    stale = store.merge(GroupStats.from_rows(labels[30:], W[30:]),
                        retracts=GroupStats.from_rows(labels[:2], W[:2]),
                        offsets={tp(0): OffsetRange(20, 50), tp(1): OffsetRange(10, 20)})
    assert not stale.applied and stale.conflicts == {tp(0): 30}
    assert snapshot_of(store) == before
    assert store.offsets("events") == {0: 30, 1: 10}
    # a gap ahead of the record is refused too: events in between would be lost
    assert not store.merge(GroupStats.from_rows(labels[30:], W[30:]),
                           offsets={tp(0): OffsetRange(31, 50)}).applied
    # the continuation is accepted, and a new partition may start anywhere
    ok = store.merge(GroupStats.from_rows(labels[30:], W[30:]),
                     offsets={tp(0): OffsetRange(30, 50), tp(2): OffsetRange(100, 110)})
    assert ok.applied
    assert store.offsets("events") == {0: 50, 1: 10, 2: 110}


def test_an_empty_batch_moves_offsets_only(make_store):
    store = make_store(d=2)
    assert store.merge(GroupStats.empty(2), offsets={tp(0): OffsetRange(0, 9)}).applied
    assert store.offsets("events") == {0: 9} and store.n_groups() == 0


# -- decay ------------------------------------------------------------------------------------


def test_decay_matches_python_and_one_pass(make_store):
    rng = np.random.default_rng(6)
    labels, W = random_rows(6, 500, 3, WEIRD_IDS[:5])
    ts = np.sort(rng.uniform(0, 100, 500))
    ts[250:300] -= 30  # some events arrive late
    half_life = 17.0
    store = make_store()
    python = None
    for a, b in [(0, 120), (120, 300), (300, 301), (301, 500)]:
        part = GroupStats.from_rows(labels[a:b], W[a:b], ts=ts[a:b], half_life=half_life)
        assert store.merge(part, half_life=half_life).applied
        python = part.copy() if python is None else python.merge(part, half_life=half_life)
    got = everything(store)
    assert_stats_close(got, python, rtol=1e-13)
    np.testing.assert_array_equal(got.select(python.keys).t, python.t)
    assert_stats_close(got, GroupStats.from_rows(labels, W, ts=ts, half_life=half_life))


# -- groups -----------------------------------------------------------------------------------


def test_weird_group_ids_round_trip(make_store):
    labels = np.array(WEIRD_IDS * 3, dtype=object)
    W = np.random.default_rng(7).normal(size=(len(labels), 2))
    want = GroupStats.from_rows(labels, W)
    store = make_store()
    store.merge(want)
    assert store.n_groups() == len(WEIRD_IDS)
    for g in WEIRD_IDS:
        one = store.get(g)
        assert one is not None and one.keys == [g]
        assert_stats_close(one, want.select([g]), rtol=0)
    asked = [*reversed(WEIRD_IDS), "absent", WEIRD_IDS[0]]
    assert store.get_many(asked).keys == list(reversed(WEIRD_IDS))
    assert store.get("absent") is None
    assert sorted(everything(store).keys) == sorted(WEIRD_IDS)


@pytest.mark.parametrize("chunk", [1, 100, 999, 1000, 5000])
def test_scan_returns_every_group_once_in_chunks(make_store, chunk):
    keys = [f"g{i}" for i in range(1000)]
    W = np.random.default_rng(8).normal(size=(1000, 2))
    store = make_store()
    for lo in range(0, 1000, 400):  # groups arrive over several batches
        store.merge(GroupStats.from_codes(np.arange(lo, min(lo + 400, 1000)) - lo,
                                          keys[lo:lo + 400], W[lo:lo + 400]))
    parts = list(store.scan(chunk=chunk))
    assert all(len(p) <= chunk for p in parts)
    seen = [k for p in parts for k in p.keys]
    assert len(seen) == len(set(seen)) == 1000
    assert set(seen) == set(keys)
    for p in parts:
        assert_stats_close(p, store.get_many(p.keys), rtol=0)


def test_empty_store(make_store):
    store = make_store(d=2)
    assert store.n_groups() == 0
    assert list(store.scan()) == []
    assert store.get("x") is None
    assert len(store.get_many(["x", "y"])) == 0
    assert store.offsets("events") == {}


def test_width_mismatch_is_refused_and_changes_nothing(make_store):
    store = make_store()
    store.merge(GroupStats.from_rows(["a"], [[1.0, 2.0]]), offsets={tp(0): OffsetRange(0, 1)})
    with pytest.raises(StoreError, match="columns"):
        store.merge(GroupStats.from_rows(["b"], [[1.0, 2.0, 3.0]]),
                    offsets={tp(0): OffsetRange(1, 2)})
    assert store.n_groups() == 1 and store.offsets("events") == {0: 1}


def test_clear_deletes_everything(make_store):
    store = make_store()
    store.merge(GroupStats.from_rows(["a", "b"], [[1.0], [2.0]]), offsets={tp(0): OffsetRange(0, 2)})
    store.put_model(b"m")
    assert store.acquire_lease("me", 30.0) == 1
    store.clear()
    assert store.n_groups() == 0 and store.offsets("events") == {} and store.get("a") is None
    assert store.get_model() is None and store.model_versions() == []
    assert store.lease_holder() is None and store.acquire_lease("me", 30.0) == 1
    assert store.merge(GroupStats.from_rows(["a"], [[1.0, 2.0]])).applied  # any width again


# -- models -----------------------------------------------------------------------------------


def test_model_versions(make_store):
    store = make_store(model_history=3)
    assert store.get_model() is None and store.current_model_version() is None
    versions = [store.put_model(f"model {i}".encode()) for i in range(5)]
    assert versions == [1, 2, 3, 4, 5]
    assert store.model_versions() == [3, 4, 5]
    assert store.get_model() == b"model 4" and store.current_model_version() == 5
    assert store.get_model(3) == b"model 2" and store.get_model(1) is None
    store.set_current(4)
    assert store.get_model() == b"model 3"
    with pytest.raises(StoreError, match="not stored"):
        store.set_current(1)
    assert store.put_model("text record") == 6 and store.get_model() == b"text record"


def test_model_fencing_refuses_a_deposed_writer(make_store):
    store = make_store()
    t1 = store.acquire_lease("one", 5.0)
    assert store.put_model(b"leader 1", fence=t1) == 1
    assert store.release_lease("one", t1)
    t2 = store.acquire_lease("two", 5.0)
    assert t2 > t1 and store.put_model(b"leader 2", fence=t2) == 2
    with pytest.raises(StaleFenceError, match="not the lease"):
        store.put_model(b"late leader 1", fence=t1)
    assert store.get_model() == b"leader 2" and store.model_versions() == [1, 2]
    assert store.put_model(b"leader 2 again", fence=t2) == 3
    assert store.release_lease("two", t2)
    with pytest.raises(StaleFenceError, match="expired or was released"):
        store.put_model(b"leader 2 after letting go", fence=t2)
    assert store.put_model(b"unfenced") == 4  # a put without a token is not checked


# -- the index of cells by level ------------------------------------------------------------------


def cell(*levels: str) -> str:
    import json

    return json.dumps(list(levels), ensure_ascii=False, separators=(",", ":"))


def test_cells_are_indexed_by_each_level_once_atomically_with_their_merge(make_store):
    store = make_store()
    weird = [w for w in WEIRD_IDS if len(w.encode()) < 100]
    keys = [cell(a, b) for a in weird[:6] for b in ("x", "y:z")] + [cell("A", "x", "3")]
    batch = GroupStats.from_rows(keys, np.ones((len(keys), 2)))
    off = {("events", 0): OffsetRange(0, 5)}
    assert store.merge(batch, offsets=off).applied
    assert not store.merge(batch, offsets=off).applied           # a replay indexes nothing
    assert store.merge(batch, offsets={("events", 0): OffsetRange(5, 9)}).applied  # known cells
    for a in weird[:6]:
        assert sorted(store.cells_of(0, a)) == sorted([cell(a, "x"), cell(a, "y:z")])
    assert sorted(store.cells_of(1, "y:z")) == sorted(cell(a, "y:z") for a in weird[:6])
    assert store.cells_of(2, "3") == [cell("A", "x", "3")]
    assert store.cells_of(0, "nowhere") == [] and store.cells_of(5, "x") == []
    # a retraction to zero keeps the cell (and its index entries), as it keeps its record
    store.merge(GroupStats.empty(2), retracts=batch.select([keys[0]]))
    store.merge(GroupStats.empty(2), retracts=batch.select([keys[0]]))
    assert keys[0] in store.cells_of(0, weird[0])
    # keys of a one-column model are not cells of several columns: nothing to index
    plain = make_store()
    plain.merge(GroupStats.from_rows(["A17", '["lone"]', "[", '["a",1]'], np.ones((4, 2))))
    assert plain.cells_of(0, "A17") == [] and plain.cells_of(0, "lone") == []
    assert plain.cells_of(0, "a") == []
    store.clear()
    assert store.cells_of(0, weird[0]) == []


def test_a_refused_batch_indexes_nothing(make_store):
    store = make_store(d=2)
    with pytest.raises(StoreError):
        store.merge(GroupStats.from_rows([cell("a", "b")], np.ones((1, 3))))
    assert store.cells_of(0, "a") == []


# -- identity and health ----------------------------------------------------------------------


def test_a_namespace_has_an_epoch_that_a_reset_does_not_repeat(make_store):
    store = make_store()
    store.merge(GroupStats.from_rows(["a"], np.ones((1, 2))), offsets={tp(0): OffsetRange(0, 1)})
    first = store.epoch()
    assert first and store.health().created_at is not None
    store.put_model(b"m")
    assert store.model_key() == (first, 1)
    values, key = store.values_and_model_key(["a", "zz"])
    assert key == (first, 1) and values[0] is not None and values[1] is None
    store.clear()  # what a Redis restart without persistence does to the namespace
    store.merge(GroupStats.from_rows(["a"], np.ones((1, 2))), offsets={tp(0): OffsetRange(0, 1)})
    store.put_model(b"m")
    assert store.model_key().version == 1 and store.model_key().epoch not in (None, first)


def test_flags_and_gaps_are_recorded_and_cleared(make_store):
    store = make_store()
    assert store.health().ready and store.health().complete
    store.set_flag("rebuilding", "consume --rebuild is replaying events from offset 0")
    health = store.health()
    assert not health.ready and health.flag == "rebuilding"
    assert "replaying" in health.reason and health.since is not None
    with pytest.raises(StoreError, match="unknown namespace flag"):
        store.set_flag("sleepy", "no")
    store.clear_flag()
    assert store.health().ready
    store.record_gap(Gap("events", 1, 10, 40, 5.0))
    store.record_gap(Gap("events", 0, 3, 7, 6.0))
    gaps = store.health().gaps
    assert [(g.partition, g.start, g.end) for g in gaps] == [(0, 3, 7), (1, 10, 40)]
    assert store.health().to_dict()["gaps"][1] == {
        "topic": "events", "partition": 1, "from": 10, "to": 40, "events": 30,
        "recorded_at": "1970-01-01T00:00:05Z"}


def test_clear_statistics_keeps_the_models_and_the_epoch(make_store):
    store = make_store()
    store.merge(GroupStats.from_rows(["a", "b"], np.ones((2, 2))),
                offsets={tp(0): OffsetRange(0, 2)})
    store.put_model(b"m")
    store.record_gap(Gap("events", 0, 0, 1, 1.0))
    epoch = store.epoch()
    assert any(stats for stats, _ in store.shard_presence())
    assert all(offsets for _, offsets in store.shard_presence())
    store.clear_statistics()
    assert store.n_groups() == 0 and store.offsets("events") == {}
    assert store.shard_presence() == [(False, False)] * store.n_shards
    assert store.epoch() == epoch and store.get_model() == b"m" and store.health().gaps == ()
