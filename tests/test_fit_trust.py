"""Fits that cannot be trusted say so, and the cases that once gave silently wrong fits are right.

- every level of a term has one row: G and sigma^2 are not identifiable; the fit warns (in
  ``warnings``, the summary and ``fit --json``), and what it does identify, G + sigma^2, is
  statsmodels OLS's residual variance;
- frequency weights of 1e5 and more per row: REML and ML reach the optimum (the balanced one-way
  ANOVA estimates in closed form, EM's ML answer; mixedlm-rs and statsmodels on the expanded
  data at weight 50);
- y around 1e14: the fit equals statsmodels' (and our own) fit of y - 1e14, shifted back;
- ``fit`` reads group ids as the stream does (``007`` and ``7`` apart, ``1`` not ``1.0``) and
  refuses a blank id, a constant response and an unknown column with one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import mixedlm_rs
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf

import streamlme
from streamlme import GroupStats, ModelSpec
from streamlme.estimate import DataError, IdentifiabilityWarning, fit
from streamlme.estimate.blocks import fit_split
from streamlme.events import EventDecoder
from streamlme.spec import SpecError

NOT_IDENTIFIABLE = "variance components not identifiable"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamlme.cli", *args], capture_output=True,
                          text=True, timeout=120)


def _one_row_frame(J: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=J)
    return pd.DataFrame({"g": [f"g{i}" for i in range(J)], "x": x,
                         "y": 1.0 + 0.5 * x + rng.normal(scale=1.3, size=J)})


# -- not identifiable ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["REML", "ML", "EM"])
def test_one_row_per_group_warns_and_keeps_the_total_variance(method: str) -> None:
    df = _one_row_frame()
    with pytest.warns(IdentifiabilityWarning, match="every level of 'g' has a single row"):
        m = streamlme.lmer("y ~ x + (1 | g)", df, method=method)
    assert any(NOT_IDENTIFIABLE in w for w in m.fit.warnings)
    assert f"warning: {NOT_IDENTIFIABLE}" in m.summary()
    assert NOT_IDENTIFIABLE in json.loads(m.to_json())["warnings"][0]
    # what the data do identify: the total variance, OLS's residual variance
    ols = sm.OLS(df.y, sm.add_constant(df.x)).fit()
    dof = len(df) - 2 if method == "REML" else len(df)
    total = float(m.fit.G[0, 0]) + m.fit.sigma2
    # (EM crawls along the ridge G + sigma^2 = const, so it stops a little looser)
    assert total == pytest.approx(ols.ssr / dof, rel=1e-4 if method == "EM" else 1e-6)
    np.testing.assert_allclose(m.fit.beta, ols.params.to_numpy(), rtol=1e-5)


def test_groups_with_replicates_do_not_warn() -> None:
    df = _one_row_frame()
    df = pd.concat([df, df.iloc[:1].assign(y=df.y.iloc[0] + 1.0)], ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IdentifiabilityWarning)
        m = streamlme.lmer("y ~ x + (1 | g)", df)
    assert not any(NOT_IDENTIFIABLE in w for w in m.fit.warnings)


def test_the_distributed_fit_warns_as_the_local_one() -> None:
    df = _one_row_frame()
    spec = ModelSpec("y", ["1", "x"], ["1"], "g")
    stats = GroupStats.from_rows(df.g, df, columns=spec.columns)
    with pytest.warns(IdentifiabilityWarning):
        res = fit_split([stats.select(stats.keys[:15]), stats.select(stats.keys[15:])], spec)
    assert any(NOT_IDENTIFIABLE in w for w in res.warnings)


def test_a_term_whose_levels_are_single_rows_is_named() -> None:
    rng = np.random.default_rng(3)
    n = 120
    a = rng.integers(0, 8, n)
    df = pd.DataFrame({"a": a.astype(str), "b": [f"u{i}" for i in range(n)],
                       "y": rng.normal(size=8)[a] + rng.normal(size=n)})
    with pytest.warns(IdentifiabilityWarning):
        m = streamlme.lmer("y ~ 1 + (1 | a) + (1 | b)", df)
    named = [w for w in m.fit.warnings if NOT_IDENTIFIABLE in w]
    assert len(named) == 1 and "'b'" in named[0] and "'a'" not in named[0]


def test_fit_json_and_summary_carry_the_warning(tmp_path: Path) -> None:
    path = tmp_path / "one.csv"
    _one_row_frame().to_csv(path, index=False)
    out = _cli("fit", str(path), "y ~ x + (1 | g)", "--json")
    assert out.returncode == 0, out.stderr
    assert any(NOT_IDENTIFIABLE in w for w in json.loads(out.stdout)["warnings"])
    text = _cli("fit", str(path), "y ~ x + (1 | g)").stdout
    assert f"warning: {NOT_IDENTIFIABLE}" in text


# -- large frequency weights ---------------------------------------------------------------------


def _balanced(J: int = 8, n: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(J), n)
    return g, 2.0 + np.repeat(rng.normal(scale=1.2, size=J), n) + rng.normal(size=J * n)


def _anova(g: np.ndarray, y: np.ndarray, w: float) -> tuple[float, float, float, float]:
    """(G_REML, G_ML, sigma2_REML, sigma2_ML) of y ~ 1 + (1 | g) on the data with every row
    repeated w times, from the one-way ANOVA table (balanced: REML = the expected mean squares
    estimates, ML = the between sum of squares over J; both when G > 0)."""
    J = g.max() + 1
    n = np.bincount(g)[0] * w
    means = np.bincount(g, weights=y) / np.bincount(g)
    ssw = w * float(((y - means[g]) ** 2).sum())
    ssb = n * float(((means - means.mean()) ** 2).sum())
    s2 = ssw / (J * (n - 1))
    return (ssb / (J - 1) - s2) / n, (ssb / J - s2) / n, s2, s2


@pytest.mark.parametrize("w", [1.0, 50.0, 1e5, 1e6])
def test_large_weights_reach_the_anova_optimum(w: float) -> None:
    g, y = _balanced()
    spec = ModelSpec("y", ["1"], ["1"], "g")
    stats = GroupStats.from_rows(g, y[:, None], np.full(len(y), w))
    G_reml, G_ml, s2, _ = _anova(g, y, w)
    assert G_ml > 0
    reml, ml = fit(stats, spec, "REML"), fit(stats, spec, "ML")
    # a deviance of N = 2.4e7 rows is known to ~1e-8, which bounds theta to ~1e-5 at w = 1e6
    rel = 1e-5 if w <= 1e5 else 1e-4
    for res, G in ((reml, G_reml), (ml, G_ml)):
        assert res.converged and res.optsummary.iterations > 1
        assert float(res.G[0, 0]) == pytest.approx(G, rel=rel)
        assert res.sigma2 == pytest.approx(s2, rel=1e-5)
    em = fit(stats, spec, "EM", tol=1e-14, max_iter=100_000)
    assert float(ml.G[0, 0]) == pytest.approx(float(em.G[0, 0]), rel=1e-5)


def test_weight_50_equals_mixedlm_rs_and_statsmodels_on_the_expanded_rows() -> None:
    rng = np.random.default_rng(4)
    J, per, w = 10, 3, 50
    g = np.repeat(np.arange(J), per)
    x = rng.normal(size=J * per)
    y = 1.0 + 0.7 * x + np.repeat(rng.normal(scale=1.5, size=J), per) + rng.normal(size=J * per)
    spec = ModelSpec("y", ["1", "x"], ["1"], "g")
    stats = GroupStats.from_rows(g, np.column_stack([x, y]), np.full(J * per, float(w)))
    big = np.repeat(np.arange(J * per), w)
    X = sm.add_constant(x[big])
    for reml in (True, False):
        res = fit(stats, spec, "REML" if reml else "ML")
        rs = mixedlm_rs.MixedLM(y[big], X, groups=g[big],
                                exog_re=np.ones((len(big), 1))).fit(reml=reml)
        assert res.criterion == pytest.approx(-2 * rs.llf, rel=1e-9)
        np.testing.assert_allclose(res.beta, np.asarray(rs.fe_params), rtol=1e-6)
        assert float(res.G[0, 0]) == pytest.approx(float(np.asarray(rs.cov_re)[0, 0]), rel=1e-6)
        assert res.sigma2 == pytest.approx(rs.scale, rel=1e-6)
        # statsmodels stops a little short on this flat likelihood: never better than ours
        ref = sm.MixedLM(y[big], X, groups=g[big]).fit(reml=reml, method=["lbfgs"])
        assert res.criterion <= -2 * ref.llf + 1e-9 * abs(res.criterion)
        assert res.criterion == pytest.approx(-2 * ref.llf, rel=1e-8)


# -- y around 1e14 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offset_frame() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    J, per = 30, 40
    x = rng.normal(size=J * per)
    y = (2.0 + 0.5 * x + np.repeat(rng.normal(scale=1.3, size=J), per)
         + rng.normal(size=J * per) + 1e14)
    # y - 1e14 is exact (Sterbenz): both fits see the same doubles
    return pd.DataFrame({"g": np.repeat([f"g{i}" for i in range(J)], per), "x": x, "y": y,
                         "y0": y - 1e14})


def test_y_near_1e14_equals_the_shifted_fit(offset_frame: pd.DataFrame) -> None:
    df = offset_frame
    m = streamlme.lmer("y ~ x + (1 | g)", df)
    ref = smf.mixedlm("y0 ~ x", df, groups=df.g).fit(reml=True, method=["lbfgs"])
    ours0 = streamlme.lmer("y0 ~ x + (1 | g)", df)
    for other_beta, other_G, other_s2 in (
            (ref.fe_params.to_numpy(), float(ref.cov_re.iloc[0, 0]), ref.scale),
            (ours0.fit.beta, float(ours0.fit.G[0, 0]), ours0.fit.sigma2)):
        # each group's mean is stored to the last digit of 1e14 (1/64): the intercept is
        # known to about that, G and sigma^2 to ~1e-3 (it was off by 90 SE and 13x)
        assert abs((m.fit.beta[0] - 1e14) - other_beta[0]) < 0.05 * m.fit.beta_se[0]
        assert m.fit.beta[1] == pytest.approx(other_beta[1], rel=1e-4)
        assert float(m.fit.G[0, 0]) == pytest.approx(other_G, rel=5e-3)
        assert m.fit.sigma2 == pytest.approx(other_s2, rel=1e-3)
    np.testing.assert_allclose(m.fit.beta_se, ours0.fit.beta_se, rtol=2e-3)


def test_y_near_1e14_the_distributed_fit_agrees(offset_frame: pd.DataFrame) -> None:
    spec = ModelSpec("y", ["1", "x"], ["1"], "g")
    stats = GroupStats.from_rows(offset_frame.g, offset_frame, columns=spec.columns)
    whole = fit(stats, spec, ranef=False)
    split = fit_split([stats.select(stats.keys[:11]), stats.select(stats.keys[11:])], spec)
    assert split.criterion == pytest.approx(whole.criterion, rel=1e-9)
    assert float(split.G[0, 0]) == pytest.approx(float(whole.G[0, 0]), rel=1e-6)
    assert abs(split.beta[0] - whole.beta[0]) < 1e-3 * whole.beta_se[0]


def test_group_means_near_1e14_keep_their_digits() -> None:
    rng = np.random.default_rng(5)
    y0 = rng.normal(size=5000)
    stats = GroupStats.from_rows(np.zeros(5000, dtype=int), (y0 + 1e14)[:, None])
    exact = float(np.mean((y0 + 1e14) - 1e14))  # the rows' own doubles, averaged exactly enough
    assert abs((stats.mean[0, 0] - 1e14) - exact) <= np.spacing(1e14)


# -- group ids, constant responses, unknown columns ------------------------------------------


def test_fit_reads_ids_as_the_stream_does(tmp_path: Path) -> None:
    path = tmp_path / "ids.csv"
    rows = [("007", 1.0, 3.0), ("007", 2.0, 4.5), ("7", 3.0, 5.0), ("7", 4.0, 7.5),
            ("1", 5.0, 8.0), ("1", 6.0, 8.5), ("x", 7.0, 1.0), ("x", 8.0, 2.5)]
    pd.DataFrame(rows, columns=["g", "x", "y"]).to_csv(path, index=False)
    out = _cli("fit", str(path), "y ~ x + (1 | g)", "--json")
    assert out.returncode in (0, 1), out.stderr
    levels = set(json.loads(out.stdout)["ranef"])
    spec = ModelSpec("y", ["1", "x"], ["1"], "g")
    events = [json.dumps({"g": int(g) if g.isdigit() and g == str(int(g)) else g,
                          "x": x, "y": y}).encode() for g, x, y in rows]
    assert levels == set(EventDecoder(spec).decode(events).groups) == {"007", "7", "1", "x"}


def test_a_float_id_column_reads_as_integers_and_a_blank_id_is_refused(tmp_path: Path) -> None:
    df = pd.DataFrame({"g": [1.0, 1.0, 2.0, 2.0, 3.0, 3.0], "x": np.arange(6.0),
                       "y": [1.0, 2.5, 3.0, 5.5, 4.0, 4.5]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = streamlme.lmer("y ~ x + (1 | g)", df)
    assert m.fit.group_keys == ["1", "2", "3"]
    path = tmp_path / "blank.parquet"
    df.assign(g=df.g.where(df.index != 3)).to_parquet(path)
    out = _cli("fit", str(path), "y ~ x + (1 | g)")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert "column 'g': row 4 has no level (blank)" in out.stderr
    with pytest.raises(SpecError, match=r"row 2 holds 1\.5, not a group id"):
        streamlme.lmer("y ~ x + (1 | g)", df.assign(g=[1.0, 1.5, 2.0, 2.0, 3.0, 3.0]))


@pytest.mark.parametrize("formula", ["y ~ x + (1 | g)", "y ~ x + (1 | g) + (1 | h)"])
def test_a_response_that_never_varies_is_one_line(tmp_path: Path, formula: str) -> None:
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"g": np.repeat(list("abcd"), 6), "h": np.tile(list("uvw"), 8),
                       "x": rng.normal(size=24), "y": 3.0})
    with pytest.raises(DataError, match="response 'y' is 3 in every row: it never varies"):
        streamlme.lmer(formula, df)
    path = tmp_path / "const.csv"
    df.to_csv(path, index=False)
    out = _cli("fit", str(path), formula)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "never varies" in out.stderr
    with pytest.raises(DataError, match="fit 'y' exactly"):
        streamlme.lmer(formula, df.assign(y=2.0 * df.x + 1.0))
    with pytest.raises(DataError, match="'x' is 2 in every row"):
        streamlme.lmer(formula, df.assign(x=2.0, y=rng.normal(size=24)))


def test_an_unknown_column_gets_a_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    _one_row_frame().to_csv(path, index=False)
    out = _cli("fit", str(path), "y ~ xx + (1 | g)")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "'xx' (did you mean 'x'?)" in out.stderr and "'g', 'x', 'y'" in out.stderr
