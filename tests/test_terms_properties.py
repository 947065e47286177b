"""Properties of several-term models that tie them to the one-term engine, and designs as lme4
reads them (no intercept, a constant column that spans it, rank deficiency named)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streamlme
from streamlme.estimate import DataError


def _one_factor_frame(seed: int, groups: int, per: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    x = rng.normal(size=groups * per)
    y = 1.0 + 0.5 * x + rng.normal(scale=1.3, size=groups)[g] + rng.normal(size=groups * per)
    return pd.DataFrame({"g": [f"g{i}" for i in g], "h": [f"h{i}" for i in g], "x": x, "y": y})


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), groups=st.integers(4, 12), per=st.integers(2, 6),
       method=st.sampled_from(["REML", "ML"]))
def test_nested_with_one_inner_level_per_outer_level_is_the_one_factor_fit(
    seed: int, groups: int, per: int, method: str
) -> None:
    """(1 | g/h) with one h per g has two identical columns of Z: the deviance depends on the
    sum of the two variances only, so the optimum is the one-factor optimum."""
    df = _one_factor_frame(seed, groups, per)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = streamlme.lmer("y ~ x + (1 | g)", df, method=method)
        nested = streamlme.lmer("y ~ x + (1 | g/h)", df, method=method)
    assert nested.fit.criterion == pytest.approx(one.fit.criterion, rel=1e-8, abs=1e-8)
    G_sum = sum(float(t.G[0, 0]) for t in nested.fit.terms)
    scale = float(one.fit.G[0, 0]) + one.fit.sigma2
    # the criterion agrees to 1e-9, and near an optimum a criterion error e moves the variance
    # by about sqrt(e): the search stops with the sum 1e-4..2e-4 off on a few percent of draws
    assert abs(G_sum - float(one.fit.G[0, 0])) < 1e-3 * scale
    # along the ridge only the sum of the variances is determined, and the derivative-free
    # search stops on it to ~1e-5: judge beta on the scale of its standard error
    assert (np.abs(nested.fit.beta - one.fit.beta) < 1e-3 * one.fit.beta_se).all()


def _frame(seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    G, per = 25, 8
    g = np.repeat(np.arange(G), per)
    x, z = rng.normal(size=G * per), rng.normal(size=G * per)
    y = (0.5 + x + rng.normal(size=G)[g] + 0.7 * rng.normal(size=G)[g] * z
         + rng.normal(scale=0.5, size=G * per))
    return pd.DataFrame({"g": g.astype(str), "x": x, "z": z, "y": y, "one": 1.0})


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_a_constant_column_spans_the_intercept_under_its_own_name(method: str) -> None:
    """statsmodels-style designs carry an explicit ones column; lme4 reads it as the intercept."""
    df = _frame()
    ref = streamlme.lmer("y ~ 1 + x + (1 + z | g)", df, method=method)
    ones = streamlme.lmer("y ~ 0 + one + x + (0 + one + z | g)", df, method=method)
    assert ones.fit.fixed == ["one", "x"] and ones.fit.random == ["one", "z"]
    assert ones.fit.criterion == pytest.approx(ref.fit.criterion, rel=1e-10)
    np.testing.assert_allclose(ones.fit.beta, ref.fit.beta, rtol=1e-7)
    np.testing.assert_allclose(ones.fit.G, ref.fit.G, rtol=1e-5, atol=1e-8)


def test_no_intercept_in_the_fixed_part() -> None:
    df = _frame()
    m = streamlme.lmer("y ~ 0 + x + (1 | g)", df)
    assert m.fit.fixed == ["x"]
    assert m.spec.formula == "y ~ 0 + x + (1 | g)"


@pytest.mark.parametrize(("formula", "named"), [
    ("y ~ 1 + one + x + (1 | g)", "['(Intercept)', 'one']"),
    ("y ~ 1 + x + z + w + (1 | g)", "['x', 'z', 'w']"),
    ("y ~ 1 + x + z + w + (1 | g) + (1 | h)", "['x', 'z', 'w']"),
])
def test_a_rank_deficient_design_is_refused_naming_the_columns(formula: str, named: str) -> None:
    df = _frame().assign(h=lambda d: d.g.str[:1], w=lambda d: d.x - 2.0 * d.z)
    with pytest.raises(DataError, match="linearly dependent") as info:
        streamlme.lmer(formula, df)
    assert named in str(info.value)
