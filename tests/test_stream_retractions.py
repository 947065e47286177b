"""Retractions event by event, and non-finite results refused, in both stores (memory and a
real Redis, bit for bit) and through the real consumer: the outcome of a retraction does not
depend on how the stream is cut into batches."""

from __future__ import annotations

import json
import uuid

import msgspec
import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stream_helpers import assert_stats_equal, read_all

from streamlme.events import EventDecoder
from streamlme.spec import ModelSpec
from streamlme.stats import GroupStats
from streamlme.store.base import OffsetRange, ShardBatch, Step
from streamlme.store.memory import MemoryStore
from streamlme.store.redis import RedisStore
from streamlme.stream.consumer import Ingestor
from streamlme.stream.dlq import DeadLetterRecord, FileDeadLetters
from streamlme.stream.source import JsonLinesSource

SPEC = ModelSpec(response="y", fixed=["1", "x"], random=["1"], group="g")
TP = ("events", 0)


def row(key: str, x: float, y: float) -> GroupStats:
    return GroupStats.from_rows([key], np.array([[x, y]]))


@pytest.fixture
def stores(redis_url):
    """A MemoryStore and a RedisStore (one shard, so a batch is one script call)."""
    client = redis.Redis.from_url(redis_url)
    made = []

    def make() -> tuple[MemoryStore, RedisStore]:
        store = RedisStore(client, f"retract-{uuid.uuid4().hex[:8]}", shards=1)
        made.append(store)
        return MemoryStore(), store

    yield make
    for store in made:
        store.clear()


def contents(store) -> tuple[list[str], list[bytes]]:
    parts = list(store.scan())
    keys = sorted(k for p in parts for k in p.keys)
    stats = store.get_many(keys)
    return keys, stats.to_bytes() if keys else []


def test_two_retractions_of_a_one_row_group_first_applied_second_refused(stores) -> None:
    for store in stores():
        store.merge(row("g", 1.0, 2.0), offsets={TP: OffsetRange(0, 1)})
        steps = [Step("g", row("g", 1.0, 2.0), True, "events:0:1", b'{"dead":1}'),
                 Step("g", row("g", 1.0, 2.0), True, "events:0:2", b'{"dead":2}')]
        result = store.merge_shards({0: ShardBatch(GroupStats.empty(2), None,
                                                   {TP: OffsetRange(1, 3)}, steps)})[0]
        assert result.applied and result.refused_steps == [1], type(store).__name__
        assert store.get("g").n.tolist() == [0.0]
        # the refused retraction's dead letter is kept in the store, until deleted by field
        assert store.dead_letters() == {0: {"events:0:2": b'{"dead":2}'}}
        store.delete_dead_letters(0, ["events:0:2"])
        assert store.dead_letters() == {}


def test_a_never_added_row_is_refused_when_it_would_leave_a_negative_diagonal(stores) -> None:
    for store in stores():
        store.merge(GroupStats.from_rows(["g"] * 3, np.array([[1.0, 5.0]] * 3)))
        before = contents(store)
        steps = [Step("g", row("g", 1.0, 9.0), True)]
        result = store.merge_shards({0: ShardBatch(GroupStats.empty(2), steps=steps,
                                                   starts=True)})[0]
        assert result.applied and result.refused_steps == [0]
        assert contents(store) == before


def test_a_non_finite_result_is_refused_whole_naming_the_cell(stores) -> None:
    for store in stores():
        big = GroupStats(["huge"], np.array([1.0]), np.array([[1e160, 1.0]]),
                         np.zeros((1, 2, 2)), np.array([np.nan]))
        store.merge(big, offsets={TP: OffsetRange(0, 1)})
        store.merge(row("fine", 1.0, 1.0), offsets={TP: OffsetRange(1, 2)})
        before = contents(store), store.offsets("events")
        adds = GroupStats.from_rows(["fine", "huge"], np.array([[2.0, 2.0], [-1e160, 0.0]]))
        result = store.merge_shards({0: ShardBatch(adds, None, {TP: OffsetRange(2, 4)})})[0]
        assert not result.applied and result.nonfinite == "huge", type(store).__name__
        assert (contents(store), store.offsets("events")) == before


def test_a_shard_without_a_record_refuses_unless_the_call_records_starts(stores) -> None:
    for store in stores():
        part = ShardBatch(row("g", 1.0, 1.0), None, {TP: OffsetRange(5, 6)})
        result = store.merge_shards({0: part})[0]
        assert not result.applied and result.missing == [TP]
        assert store.n_groups() == 0
        start = ShardBatch(GroupStats.empty(2), None, {TP: OffsetRange(5, 5)}, starts=True)
        assert store.merge_shards({0: start})[0].applied
        assert store.merge_shards({0: part})[0].applied


steps_strategy = st.lists(st.tuples(st.sampled_from(["a", "b"]), st.booleans(),
                                    st.integers(0, 3), st.integers(0, 3)), min_size=1,
                          max_size=25)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=steps_strategy)
def test_memory_and_redis_apply_steps_bit_for_bit(stores, ops) -> None:
    """Random adds and retractions (valid, overdrawn, never added) as steps: both stores give
    the same refusals and the same bytes."""
    memory, store = stores()
    seed = GroupStats.from_rows(["a", "a", "b"], np.array([[1.0, 2.0], [3.0, 1.0], [2.0, 2.0]]))
    steps = [Step(g, row(g, float(x), float(y) + 0.5 * x), retract) for g, retract, x, y in ops]
    outs = []
    for s in (memory, store):
        s.merge(seed)
        outs.append((s.merge_shards({0: ShardBatch(GroupStats.empty(2), steps=steps,
                                                   starts=True)})[0].refused_steps,
                     contents(s)))
    assert outs[0] == outs[1]


# -- through the consumer ---------------------------------------------------------------------


def simulate(ops: list[tuple[int, bool, int]]) -> tuple[list[dict], set[int], GroupStats]:
    """Events of ``ops`` and, by a multiset of each group's rows, which retractions must be
    refused (those of an empty group) and the one-pass statistics of the rows left."""
    present: dict[str, list[tuple[float, float]]] = {}
    events, refused = [], set()
    for offset, (g, retract, v) in enumerate(ops):
        key = f"g{g}"
        rows = present.setdefault(key, [])
        if not retract:
            rows.append((float(v), 2.0 * v + g))
            events.append({"g": key, "x": float(v), "y": 2.0 * v + g})
        elif rows:
            x, y = rows.pop(v % len(rows))
            events.append({"g": key, "x": x, "y": y, "op": "retract"})
        else:
            events.append({"g": key, "x": float(v), "y": float(v), "op": "retract"})
            refused.add(offset)
    left = [(k, r) for k, rows in present.items() for r in rows]
    stats = GroupStats.from_rows([k for k, _ in left], np.array([r for _, r in left])) \
        if left else GroupStats.empty(2)
    return events, refused, stats


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.integers(0, 2), st.booleans(), st.integers(0, 3)),
                    min_size=1, max_size=40),
       batch=st.integers(1, 40))
def test_retraction_outcomes_do_not_depend_on_batching(tmp_path_factory, redis_url, ops,
                                                       batch) -> None:
    """Events through the real consumer into a real Redis with any batch size: exactly the
    retractions of an empty group are dead-lettered (from the store), and the statistics
    equal one pass over the rows left."""
    events, refused, want = simulate(ops)
    base = tmp_path_factory.mktemp("retract")
    path = base / "events.jsonl"
    path.write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in events))
    store = RedisStore(redis.Redis.from_url(redis_url), f"retract-{uuid.uuid4().hex[:8]}",
                       shards=4, columns=SPEC.columns)
    try:
        dead = FileDeadLetters(base / "dead.jsonl")
        Ingestor(JsonLinesSource(path), store, EventDecoder(SPEC), dead,
                 batch_max_events=batch, batch_max_seconds=60).run()
        records = [msgspec.json.decode(line, type=DeadLetterRecord)
                   for line in (base / "dead.jsonl").read_bytes().splitlines()]
        assert {r.offset for r in records} == refused
        assert {r.code for r in records} <= {"retract_exceeds_group"}
        assert store.dead_letters() == {}, "sent dead letters are deleted from the store"
        got = read_all(store)
        alive = got.select([k for k, n in zip(got.keys, got.n, strict=True) if n > 0]) \
            if len(got) else got
        if len(want):
            assert_stats_equal(alive, want, rtol=1e-9)
        else:
            assert not len(alive)
    finally:
        store.clear()
