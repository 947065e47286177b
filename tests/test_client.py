"""Client: effects on demand from the running statistics, against a real Redis."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures_redis import CountingRedis
from query_helpers import (
    ODD_GROUPS,
    SPEC,
    dense_blup,
    fit_record,
    make_rows,
    rel_err,
    seed_store,
    write_config,
)

from streamlme import GroupStats, ModelSpec
from streamlme.blup import group_effects
from streamlme.blup import predict as blup_predict
from streamlme.client import Client, ModelNotReady, ModelVersionNotFoundError, effect_lines
from streamlme.config import load_config
from streamlme.stats import StatsError
from streamlme.store import KeyNameError, MemoryStore, RedisStore

EFFECT_KEYS = ["group", "n", "effect", "cov", "shrinkage", "model_version", "known"]


@pytest.fixture
def store(redis_url: str, namespace: str) -> RedisStore:
    return RedisStore(redis_url, namespace, columns=SPEC.columns)


@pytest.mark.parametrize("spec", [
    ModelSpec("y", ["1", "x"], ["1"], "g"),
    SPEC,
    ModelSpec("y", ["1", "x", "z"], ["1", "x", "z"], "g"),
    ModelSpec("y", ["x", "z"], ["z", "x"], "g", covariance="diagonal"),
], ids=["q1", "q2", "q3", "q2-diag-no-intercept"])
@pytest.mark.filterwarnings("ignore::streamlme.estimate.fit.SingularFitWarning")
def test_effects_equal_group_effects(redis_url, namespace, spec):
    groups, W = make_rows(1, spec=spec)
    store = RedisStore(redis_url, namespace, columns=spec.columns)
    stats, rec = seed_store(store, groups, W, spec)
    ref = rec.effects(stats)  # blup.group_effects with the record's centring
    with Client(redis_url, namespace) as client:
        many = client.effects(stats.keys)
        for i, key in enumerate(stats.keys):
            one = client.effect(key)
            assert one == many[i]
            assert list(one.effect) == [("(Intercept)" if t == "1" else t) for t in spec.random]
            assert rel_err(list(one.effect.values()), ref.b[i]) < 1e-12
            assert rel_err(one.cov, ref.cov[i]) < 1e-12
            assert abs(one.shrinkage - ref.shrinkage[i]) < 1e-12
            assert one.n == ref.n[i] and one.known and one.model_version == rec.version


def test_effects_move_with_events_between_refreshes_and_equal_dense_blups(store, redis_url,
                                                                          namespace):
    groups, W = make_rows(2, n_rows=1600)
    first, later = slice(0, 800), slice(800, None)
    _, rec = seed_store(store, groups[first], W[first])
    client = Client(redis_url, namespace)
    target = "g7"
    before = client.effect(target)
    b, cov = dense_blup(W[first][groups[first] == target], SPEC, rec)
    assert rel_err(list(before.effect.values()), b) < 1e-9
    assert rel_err(before.cov, cov) < 1e-9

    store.merge(GroupStats.from_rows(groups[later], W[later]))   # events, no refresh
    after = client.effect(target)
    assert after.model_version == before.model_version == rec.version
    assert after.n == np.sum(groups == target) > before.n
    assert rel_err(list(after.effect.values()), list(before.effect.values())) > 1e-3
    b, cov = dense_blup(W[groups == target], SPEC, rec)
    assert rel_err(list(after.effect.values()), b) < 1e-9
    assert rel_err(after.cov, cov) < 1e-9
    assert after.shrinkage > before.shrinkage  # more data, less shrinkage toward zero


def test_a_new_model_version_is_picked_up(store, redis_url, namespace):
    groups, W = make_rows(3)
    stats, rec1 = seed_store(store, groups, W)
    client = Client(redis_url, namespace)
    assert client.effect("g1").model_version == rec1.version
    more = GroupStats.from_rows(*make_rows(4))
    store.merge(more)
    stats += more
    rec2 = fit_record(stats)
    rec2.version = store.put_model(rec2.to_json())
    eff = client.effect("g1")
    ref = group_effects(stats.select(["g1"]), SPEC, rec2.beta, rec2.G, rec2.sigma2)
    assert eff.model_version == rec2.version == rec1.version + 1
    assert rel_err(list(eff.effect.values()), ref.b[0]) < 1e-12
    assert client.model().version == rec2.version
    assert client.model(rec1.version).fit["beta"] == rec1.fit["beta"]
    assert client.model_versions() == [rec1.version, rec2.version]


def test_unknown_group_gets_the_prior(store, redis_url, namespace):
    _, rec = seed_store(store, *make_rows(5))
    eff = Client(redis_url, namespace).effect("never-seen")
    assert eff.to_dict() == {
        "group": "never-seen", "n": 0, "effect": {"(Intercept)": 0.0, "x": 0.0},
        "cov": rec.G.tolist(), "shrinkage": 0.0, "model_version": rec.version, "known": False}


def test_effect_json_line_shape(store, redis_url, namespace):
    seed_store(store, *make_rows(6))
    line = Client(redis_url, namespace).effect("g3").to_json()
    doc = json.loads(line)
    assert list(doc) == EFFECT_KEYS
    assert isinstance(doc["n"], int) and doc["known"] is True
    assert len(doc["cov"]) == 2 and all(len(row) == 2 for row in doc["cov"])
    assert 0.0 < doc["shrinkage"] < 1.0


def test_no_model_yet_says_to_refresh(store, redis_url, namespace):
    store.merge(GroupStats.from_rows(*make_rows(7)))
    client = Client(redis_url, namespace)
    with pytest.raises(ModelNotReady, match="streamlme refresh"):
        client.effect("g1")
    with pytest.raises(ModelNotReady):
        client.effects(["g1", "g2"])
    with pytest.raises(ModelNotReady):
        client.model()
    with pytest.raises(ModelVersionNotFoundError, match="not stored"):
        client.model(3)


def test_one_round_trip_per_query(store, redis_url, namespace):
    seed_store(store, *make_rows(8))
    counting = CountingRedis.from_url(redis_url)
    client = Client(counting, namespace)
    client.effect("g1")  # first query also fetches the model
    counting.commands.clear()
    client.effect("g2")
    client.effects([f"g{i}" for i in range(30)] + ["nope", "g2"])
    # one pipelined round trip each: the cells' HMGETs and the model key (epoch, version);
    # the namespace's health was read by the first query and is trusted for HEALTH_TTL
    assert len(counting.commands) == 2
    assert all(c.startswith("PIPELINE:HMGET") and c.endswith(",HGET,GET")
               for c in counting.commands)


def test_effects_keep_order_duplicates_and_odd_ids(redis_url, namespace):
    groups, W = make_rows(9, groups=ODD_GROUPS)
    store = RedisStore(redis_url, namespace, columns=SPEC.columns)
    seed_store(store, groups, W)
    client = Client(redis_url, namespace)
    asked = [*reversed(ODD_GROUPS), "missing", ODD_GROUPS[0]]
    got = client.effects(asked)
    assert [e.group for e in got] == asked
    assert [e.known for e in got] == [True] * len(ODD_GROUPS) + [False, True]
    assert got[0] == client.effect(ODD_GROUPS[-1])
    with pytest.raises(KeyNameError, match="256"):
        client.effect("x" * 300)
    assert client.effects([]) == []


def test_predict_is_fixed_plus_group_part_with_an_interval(store, redis_url, namespace):
    _, rec = seed_store(store, *make_rows(10))
    client = Client(redis_url, namespace)
    eff = client.effect("g4")
    pred = client.predict("g4", {"x": 0.5, "z": -1.0, "ignored": "text"}, level=0.9)
    b = np.array(list(eff.effect.values()))
    mu, se, lo, hi = blup_predict(SPEC, rec.beta, rec.beta_cov, rec.sigma2, b,
                                  np.array(eff.cov), {"x": 0.5, "z": -1.0}, 0.9)
    assert (pred.prediction, pred.se, pred.lower, pred.upper) == pytest.approx((mu, se, lo, hi),
                                                                               rel=1e-12)
    assert pred.fixed == pytest.approx(rec.beta @ [1.0, 0.5, -1.0], rel=1e-12)
    assert pred.random == pytest.approx(b @ [1.0, 0.5], rel=1e-9)
    assert pred.se > rec.sigma2**0.5 and pred.known
    unseen = client.predict("nope", {"x": 0.5, "z": -1.0})
    assert unseen.random == 0.0 and not unseen.known and unseen.se > pred.se
    with pytest.raises(ValueError, match=r"lacks \['z'\]"):
        client.predict("g4", {"x": 1.0})
    with pytest.raises(ValueError, match="not a number"):
        client.predict("g4", {"x": "a", "z": 1.0})
    with pytest.raises(ValueError, match="not finite"):
        client.predict("g4", {"x": float("nan"), "z": 1.0})
    with pytest.raises(ValueError, match="overflows"):
        client.predict("g4", {"x": 1e300, "z": 1.0})
    with pytest.raises(ValueError, match="level"):
        client.predict("g4", {"x": 1.0, "z": 1.0}, level=1.0)


def test_effect_lines_match_client_and_accept_a_config_file(store, redis_url, namespace,
                                                            tmp_path):
    seed_store(store, *make_rows(11))
    path = write_config(tmp_path / "c.toml", redis_url, namespace)
    asked = ["g2", "absent", "g1"]
    lines = effect_lines(str(path), asked)
    expected = [e.to_dict() for e in Client(load_config(path)).effects(asked)]
    assert [json.loads(line) for line in lines] == expected
    text = effect_lines(path, asked, as_json=False)
    assert len(text) == 3 and text[0].startswith("g2: (Intercept) ")
    assert "never seen: prior" in text[1]


def test_memory_store_gives_the_same_numbers(store, redis_url, namespace):
    groups, W = make_rows(12)
    _, rec = seed_store(store, groups, W)
    memory = MemoryStore(columns=SPEC.columns)
    memory.merge(GroupStats.from_rows(groups, W))
    memory.put_model(rec.to_json())
    asked = ["g0", "g5", "absent"]
    from_memory = [e.to_dict() for e in Client(memory).effects(asked)]
    from_redis = [e.to_dict() for e in Client(redis_url, namespace).effects(asked)]
    for a, b in zip(from_memory, from_redis):
        a.pop("model_version"), b.pop("model_version")
        assert a == b


def test_bad_targets_and_records_are_reported(store, redis_url, namespace):
    with pytest.raises(ValueError, match="namespace"):
        Client(redis_url)
    seed_store(store, *make_rows(13))
    store.client.hset(store.keys.shard(store.shard_of("broken")).stats, "broken",
                      b"SL\x01\x02" + b"\0" * 8)
    with pytest.raises(StatsError, match="columns"):
        Client(redis_url, namespace).effect("broken")
