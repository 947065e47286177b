"""The engine's other promises: exact gradient, EM, bad input refused, ModelSpec validation, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lmm_data import Data, dense_blups, simulate

from streamlme import GroupStats, ModelSpec, SpecError
from streamlme.blup import effects_for, group_effects
from streamlme.estimate import DataError, fit, fit_em
from streamlme.estimate.crossprod import cross_products
from streamlme.estimate.em import EMState
from streamlme.estimate.pls import evaluate, gradient
from streamlme.estimate.theta import Parametrisation


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["unstructured", "diagonal"]), st.booleans(), st.integers(0, 10_000),
       st.lists(st.floats(0.05, 3.0), min_size=3, max_size=3))
def test_gradient_matches_finite_differences(covariance, reml, seed, theta_raw) -> None:
    d = simulate(np.random.default_rng(seed).integers(1, 25, size=20), slope=True,
                 covariance=covariance, seed=seed)
    cp = cross_products(d.stats(), d.spec)
    par = Parametrisation(cp.q, covariance, cp.T_Z, cp.z_scale)
    theta = np.array(theta_raw[: par.n_theta])
    analytic = par.grad(gradient(cp, evaluate(cp, par.lam(theta), reml)))
    h = 1e-6
    numeric = []
    for k in range(par.n_theta):
        e = np.zeros_like(theta)
        e[k] = h
        numeric.append((evaluate(cp, par.lam(theta + e), reml).deviance
                        - evaluate(cp, par.lam(theta - e), reml).deviance) / (2 * h))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("covariance", ["unstructured", "diagonal"])
def test_em_climbs_to_the_ml_optimum(covariance: str) -> None:
    d = simulate(np.random.default_rng(3).integers(3, 30, size=40), slope=True,
                 covariance=covariance, seed=3)
    s = d.stats()
    ml = fit(s, d.spec, "ML")
    seen: list[float] = []
    em = fit_em(s, d.spec, tol=1e-14, max_iter=20_000,
                callback=lambda state: seen.append(state.deviance) or False)
    assert em.converged and em.method == "EM"
    assert np.all(np.diff(seen) <= 1e-7)  # EM never goes downhill
    assert abs(em.criterion - ml.criterion) < 1e-6 * abs(ml.criterion)
    np.testing.assert_allclose(em.beta, ml.beta, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(em.sigma2, ml.sigma2, rtol=1e-3)


def test_em_stopping_rules() -> None:
    d = simulate(np.full(20, 10), slope=False, seed=1)
    s = d.stats()
    capped = fit_em(s, d.spec, tol=None, max_iter=3)
    assert not capped.converged and capped.iterations == 3 and capped.warnings

    def stop_at_two(state: EMState) -> bool:
        return state.iteration == 2

    stopped = fit_em(s, d.spec, tol=None, callback=stop_at_two)
    assert stopped.converged and stopped.iterations == 2
    by_params = fit_em(s, d.spec, tol=None, param_tol=1e-6)
    assert by_params.converged and by_params.optsummary.message.startswith("parameter")


def test_fit_dispatches_em() -> None:
    d = simulate(np.full(20, 10), slope=False, seed=1)
    assert fit(d.stats(), d.spec, "EM").method == "EM"


def test_blups_on_demand_match_the_fit_and_unknown_groups_get_the_prior() -> None:
    d = simulate(np.random.default_rng(2).integers(1, 30, size=30), slope=True, seed=2)
    s = d.stats()
    res = fit(s, d.spec)
    eff = group_effects(s, d.spec, res.beta, res.G, res.sigma2)
    ranef = res.ranef_dict()
    for i, key in enumerate(eff.keys):
        np.testing.assert_allclose(eff.b[i], ranef[key], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(eff.cov[i], res.ranef_var[res.group_keys.index(key)],
                                   rtol=1e-9, atol=1e-12)
    asked = effects_for(s, ["never-seen", eff.keys[0]], d.spec, res.beta, res.G, res.sigma2)
    assert not asked.known[0] and asked.known[1]
    assert not asked.b[0].any() and np.array_equal(asked.cov[0], res.G)


def test_random_intercept_shrinkage_is_tau2_over_tau2_plus_sigma2_over_n() -> None:
    d = simulate(np.array([1, 5, 50, 500]), slope=False, seed=4)
    eff = group_effects(d.stats(), d.spec, np.array([2.0, 0.5, 0.3]), np.array([[1.5]]), 2.0)
    expected = 1.5 / (1.5 + 2.0 / eff.n)
    np.testing.assert_allclose(eff.shrinkage, expected, rtol=1e-12)


def test_bad_input_gets_a_clear_error() -> None:
    spec = ModelSpec("y", ["1", "x"], ["1", "x"], "g")
    rng = np.random.default_rng(0)
    one_group = GroupStats.from_rows(np.zeros(50, int), rng.normal(size=(50, 2)))
    with pytest.raises(DataError, match="at least 2 groups"):
        fit(one_group, spec)
    W = rng.normal(size=(100, 3))
    W[:, 1] = 2 * W[:, 0]
    collinear = GroupStats.from_rows(np.repeat(np.arange(10), 10), W)
    with pytest.raises(DataError, match="linearly dependent"):
        fit(collinear, ModelSpec("y", ["1", "a", "b"], ["1"], "g"))
    flat = rng.normal(size=(100, 2))
    flat[:, 0] = 3.0
    with pytest.raises(DataError, match="is 3 in every row"):
        fit(GroupStats.from_rows(np.repeat(np.arange(10), 10), flat), spec)
    nan = GroupStats.from_rows(np.repeat(np.arange(10), 10), rng.normal(size=(100, 2)))
    nan.C[3, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit(nan, spec)
    with pytest.raises(DataError, match="columns"):
        fit(nan, ModelSpec("y", ["1", "x", "z"], ["1"], "g"))


def test_model_spec_validates_itself() -> None:
    with pytest.raises(SpecError, match="fixed part is empty"):
        ModelSpec("y", [], ["1"], "g")
    with pytest.raises(SpecError, match="no random terms"):
        ModelSpec("y", ["1"], [], "g")
    with pytest.raises(SpecError, match="covariance"):
        ModelSpec("y", ["1"], ["1"], "g", covariance="banded")
    with pytest.raises(SpecError, match="response"):
        ModelSpec("y", ["1", "y"], ["1"], "g")
    with pytest.raises(SpecError, match="twice"):
        ModelSpec("y", ["1", "x", "x"], ["1"], "g")
    with pytest.raises(SpecError, match="unknown column"):
        ModelSpec("y", ["1", "x"], ["1"], "g").check_columns(["y", "g"])
    s = ModelSpec("y", "1,x", "1,x", "g", covariance="diagonal", method="ml")
    assert s.method == "ML" and s.formula == "y ~ 1 + x + (1 + x || g)"
    assert ModelSpec.from_dict(s.to_dict()) == s


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamlme.cli", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def csv_path(tmp_path):
    d = simulate(np.random.default_rng(8).integers(2, 20, size=25), slope=True, seed=8)
    frame = pd.DataFrame({"Subject": [f"s{g}" for g in d.groups], "Days": d.W[:, 0],
                          "v0": d.W[:, 1], "Reaction": d.W[:, 2]})
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    return path, frame


def test_cli_fit_json_contract(csv_path) -> None:
    path, frame = csv_path
    out = run_cli("fit", str(path), "--response", "Reaction", "--fixed", "1,Days,v0",
                  "--random", "1,Days", "--group", "Subject", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    for key in ("method", "converged", "n_obs", "n_groups", "fixed", "beta", "beta_se", "random",
                "G", "sigma2", "criterion", "loglik", "aic", "bic", "iterations", "ranef",
                "ranef_var"):
        assert key in doc, key
    assert doc["fixed"] == ["(Intercept)", "Days", "v0"]
    assert doc["random"] == ["(Intercept)", "Days"]
    assert doc["n_obs"] == len(frame) and doc["n_groups"] == frame.Subject.nunique()
    assert set(doc["ranef"]) == set(frame.Subject)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = ModelSpec("Reaction", ["1", "Days", "v0"], ["1", "Days"], "Subject")
        direct = fit(GroupStats.from_rows(frame.Subject.to_numpy(),
                                          frame[["Days", "v0", "Reaction"]].to_numpy()), spec)
    assert doc["criterion"] == pytest.approx(direct.criterion, rel=1e-12)
    assert doc["loglik"] == pytest.approx(-doc["criterion"] / 2)


def test_cli_fit_summary_and_errors(csv_path) -> None:
    path, _ = csv_path
    out = run_cli("fit", str(path), "--response", "Reaction", "--fixed", "1,Days",
                  "--random", "1,Days", "--group", "Subject", "--method", "ML")
    assert out.returncode == 0, out.stderr
    assert "Random effects:" in out.stdout and "Fixed effects:" in out.stdout
    bad = run_cli("fit", str(path), "--response", "Reaction", "--fixed", "1,Nope",
                  "--random", "1", "--group", "Subject")
    assert bad.returncode != 0 and "Nope" in bad.stderr
    missing = run_cli("fit", "no-such.csv", "--response", "y", "--fixed", "1", "--random", "1",
                      "--group", "g")
    assert missing.returncode != 0 and "no such file" in missing.stderr


def test_effects_keep_their_digits_for_a_slope_on_a_timestamp() -> None:
    """x = epoch seconds (~1.7e9, a month of them): G in the user's basis is hopelessly
    ill-conditioned, yet the on-demand effects equal the dense BLUPs of an exactly shifted copy."""
    from streamlme.model import ModelRecord

    rng = np.random.default_rng(12)
    g = np.repeat(np.arange(40), rng.integers(2, 40, size=40))
    t = 1.7e9 + np.round(rng.uniform(0, 30 * 86400, size=len(g)))  # whole seconds: exact shift
    b = rng.multivariate_normal([0, 0], [[1.5, 0.3], [0.3, 0.5]], size=40)
    per_week = (t - t.mean()) / 604800.0
    y = 2.0 + 0.2 * per_week + b[g, 0] + b[g, 1] * per_week + rng.normal(size=len(g))
    spec = ModelSpec("y", ["1", "t"], ["1", "t"], "g")

    def data(t_: np.ndarray) -> Data:
        X = np.column_stack([np.ones(len(g)), t_])
        return Data(g, X, X, y, spec, np.column_stack([t_, y]))

    big, small = data(t), data(t - 1.7e9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big_fit, small_fit = fit(big.stats(), spec), fit(small.stats(), spec)
    assert big_fit.converged and small_fit.converged
    assert abs(big_fit.criterion - small_fit.criterion) < 1e-9 * abs(small_fit.criterion)
    eff = ModelRecord.from_fit(big_fit, spec).effects(big.stats())
    dense = dense_blups(small, small_fit.beta, small_fit.G, small_fit.sigma2)
    shift = np.array([[1.0, -1.7e9], [0.0, 1.0]])  # intercept at t = 0 from intercept at 1.7e9
    # (computed from G in the user's basis instead, these are off by ~2e-8: measured)
    for i, key in enumerate(eff.keys):
        np.testing.assert_allclose(eff.b[i, 1], dense[key][1], rtol=1e-9)
        np.testing.assert_allclose(eff.b[i], shift @ dense[key], rtol=1e-9)
    small_eff = ModelRecord.from_fit(small_fit, spec).effects(small.stats())
    np.testing.assert_allclose(eff.shrinkage, small_eff.shrinkage, rtol=1e-9)
