"""MixedEffectsRegressor: river's conventions, the engine's numbers, and the stream's edge cases."""

from __future__ import annotations

import doctest
import inspect
import logging
import math
import pickle

import numpy as np
import pandas as pd
import pytest

river = pytest.importorskip("river")

from river import compose, datasets, evaluate, linear_model, metrics, preprocessing  # noqa: E402
from river.checks import common  # noqa: E402

import streamlme.river as sriver  # noqa: E402
from streamlme.blup import effects_for  # noqa: E402
from streamlme.demo import SPEC, simulate  # noqa: E402
from streamlme.estimate import fit  # noqa: E402
from streamlme.river import MixedEffectsRegressor  # noqa: E402
from streamlme.stats import GroupStats  # noqa: E402


def demo_stream(n_groups: int = 60, n_events: int = 3000, seed: int = 3):
    sc = simulate(n_groups, n_events, seed)
    xs = [{"hospital": f"H{h:03d}", "age": float(a), "severity": float(s)}
          for h, a, s in zip(sc.hospital, sc.age, sc.severity)]
    return xs, [float(y) for y in sc.los]


def model(**kw) -> MixedEffectsRegressor:
    kw.setdefault("group", "hospital")
    kw.setdefault("random", ["1", "age"])
    return MixedEffectsRegressor(**kw)


def test_docstring_example_runs():
    assert doctest.testmod(sriver, optionflags=doctest.ELLIPSIS).failed == 0


def test_before_the_first_refresh_it_predicts_running_means():
    m = model(first_refresh=1000)
    assert m.predict_one({"hospital": "A", "age": 50.0}) == 0.0
    for g, y in [("A", 1.0), ("A", 3.0), ("B", 10.0)]:
        m.learn_one({"hospital": g, "age": 50.0}, y)
    assert m.fit_ is None and m.n_refreshes_ == 0
    assert m.predict_one({"hospital": "A", "age": 80.0}) == pytest.approx(2.0)
    assert m.predict_one({"hospital": "B"}) == pytest.approx(10.0)
    assert m.predict_one({"hospital": "unseen", "age": 1.0}) == pytest.approx(14.0 / 3)
    X = pd.DataFrame([{"hospital": "A"}, {"hospital": "zzz"}])
    assert m.predict_many(X).tolist() == pytest.approx([2.0, 14.0 / 3])


def test_a_failed_refresh_is_logged_and_keeps_the_previous_model(caplog, monkeypatch):
    m = model(first_refresh=5, refresh_every=5)
    with caplog.at_level(logging.WARNING, logger="streamlme.river"):
        for i in range(5):  # one group only: no random effect can be estimated
            m.learn_one({"hospital": "only", "age": float(i)}, float(i))
    assert m.fit_ is None and "at least 2 groups" in m.last_error_
    assert "keeping the previous model" in caplog.text
    assert m.predict_one({"hospital": "only", "age": 3.0}) == pytest.approx(2.0)

    xs, ys = demo_stream(n_groups=30, n_events=600)
    for x, y in zip(xs, ys):
        m.learn_one(x, y)
    assert m.last_error_ is None and m.fit_ is not None
    good, done = m.fit_, m.n_refreshes_
    q = {"hospital": xs[0]["hospital"], "age": 40.0, "severity": 1.0}
    before = m.predict_one(q)

    def broken(*args, **kwargs):
        raise np.linalg.LinAlgError("injected failure")

    monkeypatch.setattr(sriver, "fit", broken)
    assert m.refresh() is False
    assert m.fit_ is good and m.last_error_ == "LinAlgError: injected failure"
    assert m.predict_one(q) == before
    for x, y in zip(xs[:600], ys[:600]):  # scheduled refreshes fail too; learning goes on
        m.learn_one(x, y)
    assert m.fit_ is good and m.n_refreshes_ == done and m.predict_one(q) != before


def test_odd_events_never_raise():
    m = model(first_refresh=20, refresh_every=20)
    xs, ys = demo_stream(n_groups=10, n_events=200)
    odd = [
        ({"age": 40.0, "severity": 1.0}, 5.0),  # no group key
        ({"hospital": None, "age": 41.0}, 5.5),  # missing group value
        ({"hospital": float("nan"), "age": 42.0}, 6.0),
        ({"hospital": "H001", "age": "old", "ward": "A"}, 7.0),  # non-numeric values
        ({"hospital": "H001", "age": float("nan"), "severity": math.inf}, 7.0),
        ({"hospital": "H001", "age": 40.0}, float("nan")),  # skipped: no target
        ({"hospital": ("tuple", 1), 3: 1.5, "flag": True}, 4.0),  # odd keys and values
    ]
    for i, (x, y) in enumerate(zip(xs, ys)):
        if i % 20 == 0:
            x, y = odd[(i // 20) % len(odd)]
        m.predict_one(x)
        m.learn_one(x, y)
    assert m.n_refreshes_ > 0 and m.last_error_ is None
    assert None in m._groups and ("tuple", 1) in m._groups
    assert m.features_[:1] == ["age"] and {"severity", 3, "flag"} <= set(m.features_)
    # term names fall back to positions when a feature's str() is not a usable name ("3" is)
    assert "flag" in m.fit_.fixed


def _engine_prediction(res, stats, x, group):
    """beta'x + z'b from streamlme.blup with the FitResult's parameters."""
    eff = effects_for(stats, [group], SPEC, res.beta, res.G, res.sigma2)
    xv = np.array([1.0, x["age"], x["severity"]])
    zv = np.array([1.0, x["age"]])
    return float(xv @ res.beta + zv @ eff.b[0])


def test_predictions_are_beta_plus_blup_of_the_engine():
    xs, ys = demo_stream()
    N = 2000
    m = model(first_refresh=N, refresh_every=10 * N)
    for x, y in zip(xs[:N], ys[:N]):
        m.learn_one(x, y)
    assert m.n_refreshes_ == 1 and m.fit_.fixed == ["(Intercept)", "age", "severity"]

    def stats_of(k):
        W = np.array([[x["age"], x["severity"], y] for x, y in zip(xs[:k], ys[:k])])
        return GroupStats.from_rows([x["hospital"] for x in xs[:k]], W)

    ref = fit(stats_of(N), SPEC, ranef=False)
    np.testing.assert_allclose(m.fit_.beta, ref.beta, rtol=1e-7)
    np.testing.assert_allclose(m.fit_.G, ref.G, rtol=1e-5, atol=1e-10)
    assert m.fit_.sigma2 == pytest.approx(ref.sigma2, rel=1e-7)

    # between refreshes the parameters stay, the groups' statistics move with every event
    for x, y in zip(xs[N:N + 300], ys[N:N + 300]):
        m.learn_one(x, y)
    assert m.n_refreshes_ == 1
    stats = stats_of(N + 300)
    queries = [*xs[N + 300:N + 340], {"hospital": "never seen", "age": 50.0, "severity": 2.0}]
    got = [m.predict_one(x) for x in queries]
    want = [_engine_prediction(m.fit_, stats, x, x["hospital"]) for x in queries]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert got[-1] == pytest.approx(float(m.fit_.beta @ [1.0, 50.0, 2.0]), rel=1e-12)
    np.testing.assert_allclose(m.predict_many(pd.DataFrame(queries)), want, rtol=1e-10)


@pytest.mark.filterwarnings("ignore::streamlme.estimate.SingularFitWarning")
def test_forgetting_matches_decayed_statistics():
    xs, ys = demo_stream(n_groups=20, n_events=900)
    hl = 200.0
    m = model(first_refresh=900, refresh_every=900, half_life=hl)
    for x, y in zip(xs, ys):
        m.learn_one(x, y)
    assert m.n_refreshes_ == 1
    W = np.array([[x["age"], x["severity"], y] for x, y in zip(xs, ys)])
    ts = np.arange(1.0, len(ys) + 1)
    stats = GroupStats.from_rows([x["hospital"] for x in xs], W, ts=ts, half_life=hl)
    stats.decay_to(float(len(ys)), hl)
    assert stats.n.sum() == pytest.approx(hl / math.log(2), rel=0.05)  # ~ the forgetting window
    ref = fit(stats, SPEC, ranef=False)
    np.testing.assert_allclose(m.fit_.beta, ref.beta, rtol=1e-6)
    q = {"hospital": xs[-1]["hospital"], "age": 70.0, "severity": 1.0}
    assert m.predict_one(q) == pytest.approx(_engine_prediction(m.fit_, stats, q, q["hospital"]),
                                             rel=1e-9)


@pytest.mark.parametrize("half_life", [None, 300.0])
def test_learn_many_is_learn_one_in_batches(half_life):
    xs, ys = demo_stream(n_groups=40, n_events=2400)
    # a feature that appears half way, and events without a group
    for i, x in enumerate(xs):
        if i >= 1200:
            x["extra"] = float(i % 7)
        if i % 97 == 0:
            del x["hospital"]
    one = model(first_refresh=150, refresh_every=500, half_life=half_life)
    many = one.clone()
    for x, y in zip(xs, ys):
        one.learn_one(x, y)
    for lo in range(0, len(xs), 257):  # batches straddle the refresh points
        many.learn_many(pd.DataFrame(xs[lo:lo + 257]), pd.Series(ys[lo:lo + 257]))
    assert one.n_refreshes_ == many.n_refreshes_ >= 5
    assert one.features_ == many.features_ == ["age", "severity", "extra"]
    np.testing.assert_allclose(many.fit_.beta, one.fit_.beta, rtol=1e-6)
    test = pd.DataFrame([*xs[:50], {"hospital": "new", "age": 30.0}])
    batch = many.predict_many(test)
    assert list(batch.index) == list(test.index)
    np.testing.assert_allclose(batch, [one.predict_one(x) for x in test.to_dict("records")],
                               rtol=1e-7)
    rows = [*xs[:50], {"hospital": "new", "age": 30.0}]
    np.testing.assert_allclose(batch, [many.predict_one(x) for x in rows], rtol=1e-12)


def test_missing_features_count_as_zero_and_unknown_ones_are_ignored():
    xs, ys = demo_stream(n_groups=30, n_events=1500)
    m = model(first_refresh=1000)
    for x, y in zip(xs, ys):
        m.learn_one(x, y)
    q = {"hospital": "H002", "age": 55.0}
    assert m.predict_one(q) == pytest.approx(m.predict_one({**q, "severity": 0.0}), rel=1e-12)
    assert m.predict_one(q) == m.predict_one({**q, "never_seen": 123.0, "ward": "B"})


def test_inside_a_pipeline_with_progressive_validation_it_beats_ignoring_the_groups():
    xs, ys = demo_stream(n_groups=100, n_events=3000, seed=5)
    stream = [({**x, "ward": "A"}, y) for x, y in zip(xs, ys)]
    mixed = compose.Select("hospital", "age", "severity") | model(refresh_every=500)
    mae_mixed = evaluate.progressive_val_score(stream, mixed, metrics.MAE()).get()
    pooled = (compose.Select("age", "severity") | preprocessing.StandardScaler()
              | linear_model.LinearRegression())
    mae_pooled = evaluate.progressive_val_score(stream, pooled, metrics.MAE()).get()
    assert mae_mixed < 0.9 * mae_pooled, (mae_mixed, mae_pooled)
    assert mixed["MixedEffectsRegressor"].n_refreshes_ > 3

    # a union that scales the numeric features and passes the (string) group key through works
    # mechanically; the docstring says why stateless steps are the better choice
    union = (compose.Select("hospital")
             + (compose.Select("age", "severity") | preprocessing.StandardScaler())
             ) | model(refresh_every=500)
    mae_union = evaluate.progressive_val_score(stream[:1500], union, metrics.MAE()).get()
    assert math.isfinite(mae_union)
    X = pd.DataFrame([x for x, _ in stream[:20]])
    union.learn_many(X, pd.Series(ys[:20]))
    assert union.predict_many(X).notna().all()


def test_clone_gives_a_fresh_model_with_the_same_parameters():
    m = model(refresh_every=123, half_life=50.0, fixed=("age",), covariance="diagonal")
    xs, ys = demo_stream(n_groups=10, n_events=300)
    for x, y in zip(xs, ys):
        m.learn_one(x, y)
    c = m.clone()
    assert repr(c) == repr(m) and c._get_params() == m._get_params()
    assert c.fit_ is None and c.n_groups_ == 0 and c.features_ == ["age"]
    assert m.fit_.fixed == ["(Intercept)", "age"]  # fixed= keeps severity out
    assert pickle.loads(pickle.dumps(m)).predict_one(xs[0]) == m.predict_one(xs[0])


@pytest.mark.parametrize("bad", [
    {"random": []}, {"random": ["1", "1"]}, {"random": ["1", "hospital"]},
    {"refresh_every": 0}, {"first_refresh": 2.5}, {"covariance": "banded"}, {"method": "OLS"},
    {"half_life": -1.0},
])
def test_bad_parameters_say_what_is_wrong(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        model(**bad)


#: river's estimator checks, called directly: river.checks.check_estimator would also run them
#: but needs scikit-learn for its dataset list, which this project does not otherwise need
RIVER_CHECKS = [
    "check_repr", "check_str", "check_tags", "check_clone_same_class",
    "check_clone_is_idempotent", "check_init_has_default_params_for_tests",
    "check_init_default_params_are_not_mutable", "check_doc",
    "check_clone_changes_memory_addresses", "check_mutate_can_be_idempotent",
    "check_pickling_supports_roundtrip", "check_repr_roundtrips_clone",
    "check_clone_with_new_params_applies", "check_get_params_matches_signature",
    "check_learn_one", "check_pickling", "check_shuffle_features_no_impact",
    "check_emerging_features", "check_disappearing_features",
    "check_radically_disappearing_features", "check_predict_one_pure",
    "check_predict_one_before_any_learn", "check_no_state_aliasing_with_input",
    "check_clone_is_independent", "check_predict_many_matches_predict_one",
    "check_learn_many_matches_learn_one", "check_bounded_memory_growth",
]


@pytest.mark.parametrize("params", list(MixedEffectsRegressor._unit_test_params()),
                         ids=["random-intercept", "random-slope-forgetting", "formula"])
def test_river_estimator_checks(params):
    m = MixedEffectsRegressor(**params)
    ran = 0
    for name in RIVER_CHECKS:
        check = getattr(common, name, None)
        if check is None:  # an older river without this check
            continue
        if "dataset" in inspect.signature(check).parameters:
            size = 2000 if name == "check_bounded_memory_growth" else 200
            check(m.clone(), dataset=datasets.TrumpApproval().take(size))
        else:
            check(m.clone())
        ran += 1
    assert ran >= 20
    trained = m.clone()
    for x, y in datasets.TrumpApproval().take(200):
        trained.learn_one(x, y)
    assert trained.n_refreshes_ > 0 and trained.last_error_ is None


# -- formulas -------------------------------------------------------------------------------------


def test_a_formula_states_the_same_model_as_group_and_random():
    xs, ys = demo_stream(n_events=1500)
    a = model(first_refresh=500, refresh_every=500)
    b = MixedEffectsRegressor(formula="los ~ age + severity + (1 + age | hospital)",
                              first_refresh=500, refresh_every=500)
    for x, y in zip(xs[:1200], ys[:1200]):
        a.learn_one(x, y)
        b.learn_one(x, y)
    assert b.n_refreshes_ == a.n_refreshes_ > 0 and b.last_error_ is None
    assert b.fit_.fixed == ["(Intercept)", "age", "severity"] and b.features_ == ["age", "severity"]
    np.testing.assert_allclose(b.fit_.beta, a.fit_.beta, rtol=1e-9)
    queries = [*xs[1200:1300], {"hospital": "never seen", "age": 50.0, "severity": 2.0}]
    np.testing.assert_allclose([b.predict_one(x) for x in queries],
                               [a.predict_one(x) for x in queries], rtol=1e-9)
    np.testing.assert_allclose(b.predict_many(pd.DataFrame(queries)),
                               [a.predict_one(x) for x in queries], rtol=1e-9)


def _with_sex(xs, ys, seed=5):
    rng = np.random.default_rng(seed)
    sex = rng.choice(["F", "M"], size=len(xs))
    out = [dict(x, sex=str(s)) for x, s in zip(xs, sex)]
    return out, [y + (0.7 if s == "M" else 0.0) for y, s in zip(ys, sex)]


def test_a_categorical_covariate_is_coded_as_lme4_codes_it():
    from streamlme.data import frame_stats
    from streamlme.spec import ModelSpec

    xs, ys = _with_sex(*demo_stream(n_events=2000))
    formula = "los ~ age + C(sex, levels=['F', 'M']) + (1 + age | hospital)"
    m = MixedEffectsRegressor(formula=formula, first_refresh=1500, refresh_every=10_000)
    for x, y in zip(xs[:1500], ys[:1500]):
        m.learn_one(x, y)
    assert m.n_refreshes_ == 1 and m.fit_.fixed == ["(Intercept)", "age", "sexM"]
    spec = ModelSpec.from_formula(formula)
    frame = pd.DataFrame(xs[:1500]).assign(los=ys[:1500])
    ref = fit(frame_stats(frame, spec), spec, ranef=False)
    np.testing.assert_allclose(m.fit_.beta, ref.beta, rtol=1e-7)
    assert m.fit_.beta[2] == pytest.approx(0.7, abs=0.15)
    # between refreshes: x'beta + z'b from the engine's BLUP of the current statistics
    for x, y in zip(xs[1500:1700], ys[1500:1700]):
        m.learn_one(x, y)
    now = pd.DataFrame(xs[:1700]).assign(los=ys[:1700])
    stats = frame_stats(now, spec)
    res = m.fit_
    for x in [*xs[1700:1720], {"hospital": "never seen", "age": 50.0, "sex": "M"}]:
        eff = effects_for(stats, [x["hospital"]], spec, res.beta, res.G, res.sigma2,
                          z_centre=res.z_centre, G_centred=res.G_centred)
        xv = np.array([1.0, x["age"], 1.0 if x["sex"] == "M" else 0.0])
        want = float(xv @ res.beta + np.array([1.0, x["age"]]) @ eff.b[0])
        assert m.predict_one(x) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="'sex' = 'X' is not one of its declared levels"):
        m.learn_one(dict(xs[0], sex="X"), 1.0)
    with pytest.raises(ValueError, match="declared levels"):
        m.predict_many(pd.DataFrame([dict(xs[0], sex=None)]))


def test_a_formula_on_an_interaction_factor_groups_by_both_columns():
    xs, ys = demo_stream(n_events=1200)
    xs = [dict(x, ward="AB"[i % 2]) for i, x in enumerate(xs)]
    m = MixedEffectsRegressor(formula="los ~ age + (1 | hospital:ward)", first_refresh=600)
    for x, y in zip(xs, ys):
        m.learn_one(x, y)
    assert m.last_error_ is None and m.n_refreshes_ > 0
    assert (xs[0]["hospital"], xs[0]["ward"]) in m._groups
    assert m.n_groups_ == len({(x["hospital"], x["ward"]) for x in xs})


@pytest.mark.parametrize(("kw", "match"), [
    ({"formula": "y ~ x + (1 | s) + (1 | d)"}, "has 2 random-effect terms .* fits one"),
    ({"formula": "y ~ x + (1 | g/h)"}, "has 2 random-effect terms"),
    ({"formula": "y ~ x + (1 | g)", "group": "g"}, "formula or with group, not both"),
    ({"formula": "y ~ x + (1 | g)", "random": ["1", "x"]}, "not both"),
    ({"formula": "y ~ x + (1 | )"}, "formula: at character"),
    ({"levels": {"sex": ["F", "M"]}}, "give formula too"),
])
def test_formula_mistakes_say_what_is_wrong(kw, match):
    with pytest.raises(ValueError, match=match):
        MixedEffectsRegressor(**kw)
