"""streamlme.lmer and `streamlme fit --formula`: the DataFrame API against mixedlm-rs and
statsmodels, its accessors, its predictions, and the errors a new user meets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mixedlm_rs
import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf

import streamlme
from streamlme import GroupStats, SpecError, StatsError
from streamlme.estimate import fit


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    G, per = 30, 12
    g = np.repeat([f"clinic-{i:02d}" for i in range(G)], per)
    sex = rng.choice(["F", "M"], G * per)
    x = rng.normal(size=G * per)
    u0, u1 = rng.normal(scale=1.5, size=G), rng.normal(scale=0.6, size=G)
    idx = np.repeat(np.arange(G), per)
    y = (2.0 + 0.7 * x - 0.9 * (sex == "M") + u0[idx] + u1[idx] * x
         + rng.normal(scale=0.8, size=G * per))
    return pd.DataFrame({"clinic": g, "sex": sex, "x": x, "y": y})


def _rs_fit(frame: pd.DataFrame, reml: bool):
    X = np.column_stack([np.ones(len(frame)), frame.x, (frame.sex == "M").astype(float)])
    Z = np.column_stack([np.ones(len(frame)), frame.x])
    return mixedlm_rs.MixedLM(frame.y.to_numpy(), X, groups=frame.clinic.to_numpy(),
                              exog_re=Z).fit(reml=reml)


@pytest.mark.parametrize("REML", [True, False])
def test_lmer_with_a_categorical_covariate_agrees_with_mixedlm_rs(frame, REML: bool) -> None:
    m = streamlme.lmer("y ~ x + sex + (x | clinic)", frame, REML=REML)
    ref = _rs_fit(frame, REML)
    assert m.fit.fixed == ["(Intercept)", "x", "sexM"]
    assert abs(m.fit.criterion - (-2 * ref.llf)) < 1e-8 * abs(m.fit.criterion)
    np.testing.assert_allclose(m.fit.beta, np.asarray(ref.fe_params), rtol=1e-6)
    np.testing.assert_allclose(m.fit.sigma2, ref.scale, rtol=1e-6)


def test_predict_equals_statsmodels_fitted_values(frame) -> None:
    m = streamlme.lmer("y ~ x + sex + (x | clinic)", frame)
    sm = smf.mixedlm("y ~ x + C(sex)", frame, groups=frame["clinic"], re_formula="~x").fit(
        reml=True, method=["lbfgs"])
    got = m.predict(frame)
    # statsmodels' optimum is a little off lme4's; the conditional means follow it closely
    np.testing.assert_allclose(got["fit"], sm.fittedvalues, rtol=0, atol=2e-3 * frame.y.std())
    assert (got["lower"] < got["fit"]).all() and (got["fit"] < got["upper"]).all()


def test_predict_new_levels(frame) -> None:
    m = streamlme.lmer("y ~ x + sex + (x | clinic)", frame)
    new = pd.DataFrame({"clinic": ["nowhere"], "x": [0.5], "sex": ["F"]})
    out = m.predict(new)
    beta = m.fixef()["Estimate"]
    assert out["fit"][0] == pytest.approx(beta["(Intercept)"] + 0.5 * beta["x"], rel=1e-12)
    z = np.array([1.0, 0.5])
    G = m.fit.terms[0].G
    X = np.array([1.0, 0.5, 0.0])
    var = m.fit.sigma2 + z @ G @ z + X @ m.fit.beta_cov @ X
    assert out["se"][0] == pytest.approx(np.sqrt(var), rel=1e-12)
    with pytest.raises(SpecError, match="'nowhere' of 'clinic', which the fit never saw"):
        m.predict(new, allow_new_levels=False)
    with pytest.raises(SpecError, match="not one of its levels F, M"):
        m.predict(new.assign(sex="X"))


def test_accessors_have_lme4s_layout(frame) -> None:
    m = streamlme.lmer("y ~ x + sex + (x | clinic)", frame)
    vc = m.VarCorr()
    assert list(vc.columns) == ["grp", "var1", "var2", "vcov", "sdcor"]
    G = m.fit.terms[0].G
    assert vc.vcov.iloc[0] == pytest.approx(G[0, 0])
    assert vc.sdcor.iloc[2] == pytest.approx(G[1, 0] / np.sqrt(G[0, 0] * G[1, 1]))
    re = m.ranef()
    assert list(re.columns) == ["grpvar", "term", "grp", "condval", "condsd"]
    assert len(re) == 2 * frame.clinic.nunique()
    assert "condsd" not in m.ranef(condVar=False).columns
    text = m.summary()
    assert text.splitlines()[1] == "Formula: y ~ x + sex + (x | clinic)"
    assert " clinic " in text and " group " not in text
    assert json.loads(m.to_json())["terms"][0]["group"] == "clinic"
    assert repr(m).startswith("<LMMResult REML: y ~ x + sex + (x | clinic); 360 obs;")


def test_other_frames_through_narwhals(frame) -> None:
    import pyarrow as pa
    m1 = streamlme.lmer("y ~ x + (1 | clinic)", frame)
    m2 = streamlme.lmer("y ~ x + (1 | clinic)", pa.Table.from_pandas(frame))
    assert m2.fit.criterion == pytest.approx(m1.fit.criterion, rel=1e-14)


def test_wrong_inputs_get_clear_errors(frame) -> None:
    spec = streamlme.ModelSpec.from_formula("y ~ x + (1 | clinic)")
    with pytest.raises(TypeError, match=r"stats: expected GroupStats, got DataFrame .*lmer"):
        fit(frame, spec)  # type: ignore[arg-type]
    stats = GroupStats.from_rows(frame.clinic, frame[["x", "y"]], columns=spec.columns)
    with pytest.raises(TypeError, match=r"spec: expected a ModelSpec, got str .*from_formula"):
        fit(stats, "y ~ x + (1 | clinic)")  # type: ignore[arg-type]
    with pytest.raises(StatsError, match=r"pass columns=spec\.columns"):
        GroupStats.from_rows(frame.clinic, frame[["x", "y"]])
    with pytest.raises(SpecError, match="lmer takes rows"):
        streamlme.lmer("y ~ x + (1 | clinic)", stats)
    with pytest.raises(SpecError, match="got a string"):
        streamlme.lmer("y ~ x + (1 | clinic)", "data.csv")
    with pytest.raises(SpecError, match=r"unknown column\(s\) 'clnic'"):
        streamlme.lmer("y ~ x + (1 | clnic)", frame)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamlme.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_fit_formula(frame, tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    frame.assign(clinic=frame.clinic.str.replace("clinic-", "")).to_csv(path, index=False)
    out = _cli("fit", str(path), "--formula", "y ~ x + sex + (x | clinic)", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["fixed"] == ["(Intercept)", "x", "sexM"]
    term = doc["terms"][0]
    assert term["group"] == "clinic" and term["random"] == ["(Intercept)", "x"]
    assert term["G"] == doc["G"] and term["ranef"] == doc["ranef"]
    assert "00" in term["ranef"]  # ids read as text: "00" stays "00"
    positional = _cli("fit", str(path), "y ~ x + sex + (x | clinic)", "--json")
    assert json.loads(positional.stdout)["criterion"] == doc["criterion"]
    text = _cli("fit", str(path), "y ~ x + sex + (x | clinic)")
    assert "Formula: y ~ x + sex + (x | clinic)" in text.stdout


def test_cli_fit_refuses_what_it_cannot_mean(tmp_path: Path, frame) -> None:
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    two = _cli("fit", str(path), "--response", "y", "--fixed", "1", "--random", "1",
               "--group", "clinic", "--group", "sex")
    assert two.returncode != 0 and "use --formula" in two.stderr
    both = _cli("fit", str(path), "y ~ 1 + (1 | clinic)", "--response", "y")
    assert both.returncode != 0 and "not both" in both.stderr
    none = _cli("fit", str(path))
    assert none.returncode != 0 and "give a formula" in none.stderr
