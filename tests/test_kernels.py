"""The compiled per-group passes agree with the numpy reference, and the fit does not care which."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamlme.estimate import kernels
from streamlme.estimate.crossprod import cross_products
from streamlme.estimate.fit import fit
from streamlme.estimate.pls import evaluate, gradient
from streamlme.spec import ModelSpec
from streamlme.stats import GroupStats

pytestmark = pytest.mark.skipif(kernels.numba is None, reason="numba is not installed")


def _problem(seed: int, G: int, q: int, m: int, boundary: bool):
    """Per-group cross-products of random rows, a relative factor Lam, beta and an R_X."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, size=G)
    ZtZ = np.empty((G, q, q))
    ZtXy = np.empty((G, q, m))
    for g, n in enumerate(sizes):
        Z = np.column_stack([np.ones(n), rng.normal(size=(n, q - 1))])
        Xy = rng.normal(size=(n, m)) * rng.lognormal(size=m)
        ZtZ[g], ZtXy[g] = Z.T @ Z, Z.T @ Xy
    Lam = np.tril(rng.normal(size=(q, q)))
    Lam[np.diag_indices(q)] = np.abs(np.diag(Lam)) + 0.1
    if boundary:
        Lam[-1, -1] = 0.0
    p = m - 1
    R_X = np.triu(rng.normal(size=(p, p))) + np.diag(rng.uniform(1.0, 3.0, size=p))
    return ZtZ, ZtXy, Lam, rng.normal(size=p), R_X


def _close(a, b, rtol: float = 1e-12) -> None:
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.max(np.abs(b))), 1e-300)
    assert float(np.max(np.abs(a - b))) <= rtol * scale


problems = st.builds(
    _problem,
    seed=st.integers(0, 2**32 - 1),
    G=st.integers(1, 600),           # past one summation block of 256 groups
    q=st.integers(1, 3),
    m=st.integers(2, 6),
    boundary=st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(problems)
def test_deviance_pass_matches_numpy(problem) -> None:
    ZtZ, ZtXy, Lam, _, _ = problem
    compiled = kernels.deviance_pass(ZtZ, ZtXy, Lam, backend="numba")
    reference = kernels.deviance_pass(ZtZ, ZtXy, Lam, backend="numpy")
    for a, b in zip(compiled, reference):
        _close(a, b)
    # what an optimiser step uses: the sums without the stored factors
    _, _, SS, logdet = kernels.deviance_pass(ZtZ, ZtXy, Lam, backend="numba", store=False)
    _close(SS, reference[2])
    _close(logdet, reference[3])


@settings(max_examples=60, deadline=None)
@given(problems, st.booleans())
def test_gradient_pass_matches_numpy(problem, reml: bool) -> None:
    ZtZ, ZtXy, Lam, beta, R_X = problem
    L, RZXy, _, _ = kernels.deviance_pass(ZtZ, ZtXy, Lam, backend="numpy")
    R = R_X if reml else None
    # the compiled q <= 2 passes refactor P_j themselves; give them no factors to lean on
    compiled = kernels.gradient_pass(ZtZ, ZtXy, None, None, Lam, beta, R, backend="numba")
    reference = kernels.gradient_pass(ZtZ, ZtXy, L, RZXy, Lam, beta, R, backend="numpy")
    for a, b in zip(compiled, reference):
        _close(a, b, rtol=1e-10)
    if not reml:
        assert not compiled[2].any()


def _stats(G: int, q: int, seed: int = 1) -> tuple[GroupStats, ModelSpec]:
    rng = np.random.default_rng(seed)
    sizes = 1 + rng.poisson(6, size=G)
    codes = np.repeat(np.arange(G), sizes)
    N = len(codes)
    x = rng.normal(size=(N, 3))
    b = rng.normal(size=(G, 3)) * [1.0, 0.5, 0.3]
    y = 2.0 + x @ [0.5, -0.2, 0.1] + b[codes, 0] + (b[codes, 1:q] * x[:, : q - 1]).sum(1)
    y += rng.normal(size=N)
    spec = ModelSpec(response="y", fixed=["1", "x1", "x2", "x3"],
                     random=["1", "x1", "x2"][:q], group="g")
    return GroupStats.from_codes(codes, [f"g{i}" for i in range(G)], np.column_stack([x, y])), spec


@pytest.mark.parametrize("q", [1, 2, 3])
@pytest.mark.parametrize("reml", [True, False])
def test_compiled_gradient_matches_finite_differences(q: int, reml: bool) -> None:
    stats, spec = _stats(300, q)
    cp = cross_products(stats, spec)
    cp.ZtZ, cp.ZtXy = np.ascontiguousarray(cp.ZtZ), np.ascontiguousarray(cp.ZtXy)
    Lam = np.tril(np.full((q, q), 0.3)) + 0.4 * np.eye(q)
    g = gradient(cp, evaluate(cp, Lam, reml))
    h = 1e-6
    for i in range(q):
        for j in range(i + 1):
            E = np.zeros((q, q))
            E[i, j] = h
            fd = (evaluate(cp, Lam + E, reml).deviance
                  - evaluate(cp, Lam - E, reml).deviance) / (2 * h)
            assert fd == pytest.approx(g[i, j], rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("q", [1, 2])
def test_fit_is_the_same_with_either_backend(q: int, monkeypatch: pytest.MonkeyPatch) -> None:
    stats, spec = _stats(400, q, seed=3)
    compiled = fit(stats, spec, "REML", ranef=False)
    monkeypatch.setenv("STREAMLME_KERNELS", "numpy")
    reference = fit(stats, spec, "REML", ranef=False)
    assert compiled.criterion == pytest.approx(reference.criterion, rel=1e-12)
    np.testing.assert_allclose(compiled.beta, reference.beta, rtol=1e-7)
    np.testing.assert_allclose(compiled.G, reference.G, rtol=1e-6)
    assert compiled.sigma2 == pytest.approx(reference.sigma2, rel=1e-7)


def test_unknown_backend_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMLME_KERNELS", "fortran")
    with pytest.raises(ValueError, match="STREAMLME_KERNELS"):
        kernels.backend()


def test_warm_refit_is_cheap_and_lands_on_the_cold_optimum() -> None:
    stats, spec = _stats(2000, 2, seed=5)
    first = fit(stats, spec, "REML", ranef=False)
    more, _ = _stats(300, 2, seed=6)  # 300 groups' worth of new events, same group keys g0..g299
    stats.merge(more)
    cold = fit(stats, spec, "REML", ranef=False)
    warm = fit(stats, spec, "REML", ranef=False, start=first)
    assert warm.optsummary.n_evals < cold.optsummary.n_evals
    assert warm.optsummary.n_evals <= 10
    assert warm.criterion == pytest.approx(cold.criterion, rel=1e-12)
    np.testing.assert_allclose(warm.G, cold.G, rtol=1e-5)
    np.testing.assert_allclose(warm.beta, cold.beta, rtol=1e-7)
