"""REML/ML from sufficient statistics against mixedlm-rs, statsmodels, lme4 and dense formulas."""

from __future__ import annotations

import warnings

import mixedlm_rs
import numpy as np
import pytest
import statsmodels.api as sm
from lmm_data import Data, dense_blups, dense_criterion, simulate
from statsmodels.regression.mixed_linear_model import MixedLMParams

from streamlme.estimate import FitResult, fit

rng = np.random.default_rng(20261125)
UNBALANCED = np.concatenate([[50_000], rng.integers(1, 4, size=3_000)])
CASES = {
    "intercept-balanced": dict(sizes=np.full(40, 25), slope=False),
    "intercept-unbalanced": dict(sizes=rng.integers(1, 60, size=80), slope=False),
    "slope-balanced": dict(sizes=np.full(30, 20), slope=True),
    "slope-unbalanced": dict(sizes=rng.integers(2, 50, size=60), slope=True),
    "slope-one-huge-group-many-tiny": dict(sizes=UNBALANCED, slope=True),
}


def mixedlm_rs_fit(d: Data, reml: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mixedlm_rs.MixedLM(d.y, d.X, groups=d.groups, exog_re=d.Z).fit(reml=reml)


def statsmodels_fit(d: Data, reml: bool, diagonal: bool = False):
    p, q = d.X.shape[1], d.Z.shape[1]
    kw = {}
    if diagonal:
        kw["free"] = MixedLMParams.from_components(fe_params=np.ones(p), cov_re=np.eye(q))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sm.MixedLM(d.y, d.X, groups=d.groups, exog_re=d.Z).fit(reml=reml, **kw)


def rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def our_fit(d: Data, method: str) -> FitResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit(d.stats(), d.spec, method)


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("case", list(CASES))
def test_agrees_with_mixedlm_rs(case: str, method: str) -> None:
    d = simulate(seed=7, **CASES[case])
    ours = our_fit(d, method)
    ref = mixedlm_rs_fit(d, method == "REML")
    assert ours.converged
    assert rel(ours.beta, ref.fe_params) < 1e-6
    assert rel(ours.G, ref.cov_re) < 1e-6
    assert rel(ours.sigma2, ref.scale) < 1e-6
    assert abs(ours.criterion - (-2 * ref.llf)) < 1e-9 * abs(ours.criterion)
    assert rel(ours.beta_se, ref.bse_fe) < 1e-5


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("case", ["intercept-unbalanced", "slope-unbalanced", "diagonal"])
def test_never_worse_than_statsmodels_and_close(case: str, method: str) -> None:
    diagonal = case == "diagonal"
    d = simulate(np.full(40, 15), slope=True, covariance="diagonal", seed=2) if diagonal \
        else simulate(seed=11, **CASES[case])
    ours = our_fit(d, method)
    ref = statsmodels_fit(d, method == "REML", diagonal)
    reml = method == "REML"
    theirs = dense_criterion(d, np.asarray(ref.fe_params), np.asarray(ref.cov_re), ref.scale, reml)
    assert ours.criterion <= theirs + 1e-9 * abs(theirs)
    assert rel(ours.beta, ref.fe_params) < 1e-3
    assert rel(ours.G, ref.cov_re) < 1e-3
    assert rel(ours.sigma2, ref.scale) < 1e-3


@pytest.mark.parametrize("covariance", ["unstructured", "diagonal"])
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_criterion_equals_the_dense_likelihood_at_the_estimates(covariance: str, method: str):
    d = simulate(np.random.default_rng(5).integers(1, 30, size=40), slope=True,
                 covariance=covariance, seed=5)
    ours = our_fit(d, method)
    dense = dense_criterion(d, ours.beta, ours.G, ours.sigma2, method == "REML")
    assert abs(ours.criterion - dense) < 1e-9 * abs(dense)
    if covariance == "diagonal":
        assert ours.G[0, 1] == 0.0 and ours.G[1, 0] == 0.0


def test_blups_equal_dense_formula_and_mixedlm_rs() -> None:
    d = simulate(np.random.default_rng(9).integers(1, 40, size=50), slope=True, seed=9)
    ours = our_fit(d, "REML")
    dense = dense_blups(d, ours.beta, ours.G, ours.sigma2)
    for key, b in ours.ranef_dict().items():
        np.testing.assert_allclose(b, dense[key], rtol=1e-9, atol=1e-10)
    ref = mixedlm_rs_fit(d, True)
    for key, b in ref.random_effects.items():
        np.testing.assert_allclose(ours.ranef_dict()[str(key)], np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_huge_offset_equals_the_shifted_copy(method: str) -> None:
    d = simulate(np.random.default_rng(4).integers(2, 40, size=60), slope=True, seed=4,
                 y_offset=1e7, x_mean=1e5, x_sd=1.0)
    small = d.shifted(dy=1e7, dx=1e5)
    ours = our_fit(d, method)
    ref = mixedlm_rs_fit(small, method == "REML")
    ours_small = our_fit(small, method)
    assert abs(ours.criterion - (-2 * ref.llf)) < 1e-9 * abs(ours.criterion)
    assert rel(ours.sigma2, ref.scale) < 1e-6
    # slopes are the same parameters in both bases; intercepts move by the exact shift
    assert rel(ours.beta[1:], ref.fe_params[1:]) < 1e-6
    # the slope variance is the same parameter in both bases; the intercept's variance at x = 0
    # (1e5 sd away from the data) is not comparable digit for digit, the criterion pins it down
    assert rel(ours.G[1, 1], ref.cov_re[1, 1]) < 1e-6
    assert rel(ours_small.G, ref.cov_re) < 1e-6


def test_warm_start_reaches_the_same_optimum_in_fewer_evaluations() -> None:
    d = simulate(np.random.default_rng(6).integers(2, 30, size=200), slope=True, seed=6)
    s = d.stats()
    cold = fit(s, d.spec)
    more = simulate(np.random.default_rng(7).integers(0, 2, size=200), slope=True, seed=8)
    s2 = s + more.stats()
    warm = fit(s2, d.spec, start=cold)
    cold2 = fit(s2, d.spec)
    assert abs(warm.criterion - cold2.criterion) < 1e-9 * abs(cold2.criterion)
    assert warm.optsummary.n_evals < cold2.optsummary.n_evals
    assert warm.optsummary.warm_start


def test_singular_fit_is_flagged() -> None:
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(30), 10)
    y = rng.normal(size=300)  # no group effect at all
    from streamlme import GroupStats, ModelSpec

    spec = ModelSpec("y", ["1"], ["1"], "g")
    s = GroupStats.from_rows(g, y[:, None])
    with pytest.warns(UserWarning, match="singular"):
        res = fit(s, spec)
    assert res.singular and res.G[0, 0] < 1e-6 and "singular" in res.warnings[0]
