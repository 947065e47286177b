"""The one-term REML/ML fit as a map over blocks of groups and a reduce: what a distributed
refresh runs.

The profiled deviance of `pls` and its gradient are sums over groups of per-group pieces (the
module docstrings of `pls` and `kernels`), so any split of the groups into blocks gives the same
fit: each block returns small partial sums, a driver adds them and does the rest exactly as
`streamlme.estimate.fit` does. Nothing here knows where a block lives (a list in this process,
a Dask worker's memory); the caller passes a ``map_blocks(fn) -> [fn(block) for each block]``.

1. **Summaries.** `summarise` gives a block's pooled moments of its groups with data (n, mean,
   C, and the number of such groups); `combine` merges them (Chan et al.'s pairwise update).
2. **Frame.** `frame` turns the pooled moments into what `crossprod.cross_products` derives
   from all groups at once — the reference point, the scaling of random covariates, the pooled
   [X y]'[X y], the maps back to the user's basis — with the same checks and errors.
3. **Blocks.** `build_block` forms a block's per-group Z'Z and Z'[X y] about the frame's
   reference point: the `CrossProducts` arrays of those groups. A block is built once.
4. **Per theta.** `deviance_partial` is `kernels.deviance_pass` over a block: the
   (p+1)x(p+1) sum of RZXy_j'RZXy_j and sum_j log|L_j|^2; `gradient_partial` is
   `kernels.gradient_pass` over a block at the reduced beta and R_X: its three q x q sums.
   `reduce_deviance` adds the first kind and factors the Schur complement (`pls.evaluate`'s
   tail), `reduce_gradient` adds the second and combines them (`pls.gradient`'s).
5. **Driver.** `fit_blocks` runs the optimiser path of `fit` for one term — the same start,
   L-BFGS-B with the analytic gradient, the same re-run from inside the region when a variance
   component ends on its bound — and returns the same `FitResult` (without conditional modes,
   as the refresh asks for). An evaluation is two maps: the gradient needs beta and R_X, which
   only the reduced deviance gives.

Only the order in which the groups' sums are added differs from `fit`, so the results agree to
rounding (1e-10 relative is tested). Models with several random-effect terms are refused: their
factor is not block diagonal by group (`streamlme.estimate.blocked`), so their deviance is not
a sum of per-block pieces of this kind.

>>> import numpy as np
>>> from streamlme import GroupStats, ModelSpec
>>> rng = np.random.default_rng(0)
>>> g = np.repeat(np.arange(40), 6)
>>> stats = GroupStats.from_rows(g, (rng.normal(size=40)[g] + rng.normal(size=240))[:, None])
>>> spec = ModelSpec("y", ["1"], ["1"], "g")
>>> res = fit_split([stats.select(stats.keys[:25]), stats.select(stats.keys[25:])], spec)
>>> from streamlme.estimate import fit
>>> bool(abs(res.criterion - fit(stats, spec, ranef=False).criterion) < 1e-9)
True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize

from streamlme.estimate import kernels
from streamlme.estimate.crossprod import (
    CrossProducts,
    DataError,
    _block,
    _check_constant,
    _check_rank,
    _shift_matrix,
    check_width,
    reference_point,
)
from streamlme.estimate.fit import SINGULAR_TOL, _check_arguments, _result, _start_theta, with_terms
from streamlme.estimate.pls import NumericalError, PLSState
from streamlme.estimate.result import FitResult
from streamlme.estimate.theta import Parametrisation
from streamlme.spec import INTERCEPT, ModelSpec
from streamlme.stats import GroupStats, merge_moments

Array = NDArray[np.float64]
P = TypeVar("P")

#: ``map_blocks(fn)`` returns ``[fn(block) for block in blocks]``, in the blocks' order.
MapBlocks = Callable[[Callable[["Block"], Any]], list[Any]]


class BlocksUnsupportedError(ValueError):
    """A model the block decomposition does not fit (several random-effect terms, EM)."""


# -- 1. summaries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Pooled moments of the groups with data (n > 0) of a block, or of several blocks."""

    groups: int   # groups with data
    N: float      # their total mass
    mean: Array   # (d,)
    C: Array      # (d, d) pooled centred co-moments


def summarise(stats: GroupStats, spec: ModelSpec) -> Summary:
    """A block's `Summary`, after the checks `cross_products` makes of every group (width,
    finite statistics, no negative mass)."""
    check_width(stats, spec)
    stats.check_finite()
    live = stats.n > 0
    if not live.any():
        return Summary(0, 0.0, np.zeros(stats.d), np.zeros((stats.d, stats.d)))
    if not live.all():
        stats = stats.select([k for k, ok in zip(stats.keys, live) if ok])
    N, m, C = stats.total()
    return Summary(len(stats), N, m, C)


def combine(summaries: Sequence[Summary]) -> Summary:
    """The `Summary` of the union of the blocks (pairwise merge, in the order given)."""
    if not summaries:
        raise DataError("no blocks: 0 group(s) with data; a random effect needs at least 2 groups")
    groups, n, m, C = 0, np.zeros(()), summaries[0].mean * 0.0, summaries[0].C * 0.0
    for s in summaries:
        if s.groups == 0:
            continue
        n, m, C = merge_moments(n, m, C, np.asarray(s.N), s.mean, s.C)
        groups += s.groups
    return Summary(groups, float(n), m, C)


# -- 2. the frame ---------------------------------------------------------------------------


@dataclass
class Frame(CrossProducts):
    """`CrossProducts` without per-group arrays (ZtZ, ZtXy have no rows; keys and n are empty):
    the pooled [X y]'[X y], N and the basis maps, with ``groups`` the number of groups."""

    groups: int = 0
    #: where the columns of the statistics are centred (the reference point r)
    r: Array = field(default_factory=lambda: np.zeros(0))
    #: positions of the random terms and of [X y] in the augmented vector (1, w - r)
    iz: tuple[int, ...] = ()
    ixy: tuple[int, ...] = ()

    @property
    def n_groups(self) -> int:  # type: ignore[override]
        return self.groups


def frame(spec: ModelSpec, summary: Summary) -> Frame:
    """The global part of `crossprod.cross_products`, from the pooled moments of all blocks:
    the same reference point, scaling, checks and error messages."""
    if summary.groups < 2:
        raise DataError(
            f"{summary.groups} group(s) with data; a random effect needs at least 2 groups")
    N, M, C_pool = summary.N, summary.mean, summary.C
    p = len(spec.fixed)
    if p >= N:
        raise DataError(f"{N:g} observations cannot estimate {p} fixed effects")
    r = reference_point(spec, M)
    cols = spec.columns
    _check_constant(spec, M, C_pool, N, r)
    aug = {INTERCEPT: 0, **{c: 1 + k for k, c in enumerate(cols)}}
    ix = [aug[t] for t in spec.fixed]
    iz = [aug[t] for t in spec.random]
    ixy = [*ix, aug[spec.response]]

    scale = np.sqrt(np.maximum(np.diag(C_pool), 0.0) / N)
    for t in spec.random:
        if t != INTERCEPT:
            k = cols.index(t)
            if not scale[k] > 1e-12 * max(abs(M[k]), 1.0):
                if r[k] != 0.0 or M[k] == 0.0:
                    raise DataError(
                        f"random term {t!r} is {M[k]:g} in every row: beside an intercept it "
                        "spans nothing the intercept does not; drop one of them")
                scale[k] = abs(M[k])
    z_scale = np.array([1.0 if t == INTERCEPT else 1.0 / scale[cols.index(t)]
                        for t in spec.random])
    e_pool = np.concatenate([[1.0], M - r])
    XyXy = _block(np.array([N]), e_pool[None], C_pool[None], ixy, ixy)[0]
    _check_rank(XyXy[:p, :p], spec)
    T_X = _shift_matrix(spec.fixed, cols, r)
    T_Z = _shift_matrix(spec.random, cols, r) @ np.diag(z_scale)
    z_centre = np.array([0.0 if t == INTERCEPT else r[cols.index(t)] for t in spec.random])
    i0 = spec.fixed.index(INTERCEPT) if INTERCEPT in spec.fixed else None
    q, m = len(iz), len(ixy)
    return Frame(keys=[], n=np.zeros(0), ZtZ=np.zeros((0, q, q)), ZtXy=np.zeros((0, q, m)),
                 XyXy=XyXy, N=N, T_X=T_X, T_Z=T_Z, z_scale=z_scale, z_centre=z_centre,
                 r_y=float(r[-1]), intercept_fixed=i0, groups=summary.groups, r=r,
                 iz=tuple(iz), ixy=tuple(ixy))


# -- 3. blocks ------------------------------------------------------------------------------


@dataclass
class Block:
    """The cross-products of a block's groups with data, about the frame's reference point:
    ZtZ (G, q, q) and ZtXy (G, q, p + 1), as `CrossProducts` holds them. ``index`` orders the
    blocks (a shard id); drivers add partial sums in that order."""

    index: int
    ZtZ: Array
    ZtXy: Array

    @property
    def n_groups(self) -> int:
        return self.ZtZ.shape[0]

    @property
    def nbytes(self) -> int:
        return self.ZtZ.nbytes + self.ZtXy.nbytes


def build_block(stats: GroupStats, fr: Frame, index: int = 0) -> Block:
    """A block from the statistics of some groups (those without data are left out)."""
    live = stats.n > 0
    n, mean, C = stats.n[live], stats.mean[live], stats.C[live]
    e = np.concatenate([np.ones((len(n), 1)), mean - fr.r], axis=1)
    iz, ixy = list(fr.iz), list(fr.ixy)
    s = fr.z_scale
    ZtZ = np.ascontiguousarray(_block(n, e, C, iz, iz) * s[None, :, None] * s[None, None, :])
    ZtXy = np.ascontiguousarray(_block(n, e, C, iz, ixy) * s[None, :, None])
    return Block(index, ZtZ, ZtXy)


# -- 4. per theta: partial sums and their reduce ----------------------------------------------


@dataclass(frozen=True)
class DeviancePartial:
    """A block's share of a deviance evaluation."""

    SS: Array       # (p + 1, p + 1): sum_j RZXy_j' RZXy_j
    logdet: float   # sum_j log|L_j|^2
    groups: int


@dataclass(frozen=True)
class GradientPartial:
    """A block's share of the gradient: `kernels.gradient_pass`'s three q x q sums."""

    ZtZ_LamPinv: Array
    Zte_u: Array
    KK: Array


def deviance_partial(block: Block, Lam: Array) -> DeviancePartial:
    """`kernels.deviance_pass` over the block's groups (the per-group factors are not kept)."""
    _, _, SS, logdet = kernels.deviance_pass(block.ZtZ, block.ZtXy, Lam, store=False)
    return DeviancePartial(SS, float(logdet), block.n_groups)


def gradient_partial(block: Block, Lam: Array, beta: Array, R_X: Array | None) -> GradientPartial:
    """`kernels.gradient_pass` over the block's groups at the reduced ``beta`` and ``R_X``
    (``R_X`` None for ML)."""
    a, b, c = kernels.gradient_pass(block.ZtZ, block.ZtXy, None, None, Lam, beta, R_X)
    return GradientPartial(np.asarray(a), np.asarray(b), np.asarray(c))


def reduce_deviance(fr: Frame, parts: Sequence[DeviancePartial], Lam: Array, reml: bool
                    ) -> PLSState:
    """`pls.evaluate` from the blocks' partial sums: the state at Lam, without per-group
    factors. NumericalError as `evaluate` raises it."""
    m = fr.XyXy.shape[0]
    SS, logdet = np.zeros((m, m)), 0.0
    for part in parts:
        SS = SS + part.SS
        logdet += part.logdet
    S = fr.XyXy - SS
    S = 0.5 * (S + S.T)
    try:
        R = np.linalg.cholesky(S).T
    except np.linalg.LinAlgError as exc:
        raise NumericalError("the fixed-effects Schur complement is not positive definite") from exc
    if not np.isfinite(logdet) or R[-1, -1] <= 0:
        raise NumericalError("penalised residual sum of squares is not positive")
    return PLSState(Lam, None, None, R, logdet, reml, fr.N)


def reduce_gradient(st: PLSState, parts: Sequence[GradientPartial]) -> Array:
    """`pls.gradient` (d deviance / d Lambda) from the blocks' partial sums."""
    q = st.Lam.shape[0]
    a, b, c = np.zeros((q, q)), np.zeros((q, q)), np.zeros((q, q))
    for part in parts:
        a, b, c = a + part.ZtZ_LamPinv, b + part.Zte_u, c + part.KK
    return 2.0 * a - 2.0 * (st.dof / st.r2) * b - 2.0 * c @ st.Lam


# -- 5. the driver --------------------------------------------------------------------------


def check_spec(spec: ModelSpec, method: str | None = None) -> str:
    """The method (REML or ML) if the block fit can fit this model; BlocksUnsupportedError if not."""
    method = (method or spec.method).upper()
    if len(spec.terms) > 1:
        terms = " + ".join(str(t) for t in spec.terms)
        raise BlocksUnsupportedError(
            f"the block (distributed) fit handles one random-effect term; this model has "
            f"{len(spec.terms)} ({terms}), whose factor is not block diagonal by group. Fit it "
            "with the local engine ([refresh] engine = \"local\")")
    if method not in ("REML", "ML"):
        raise BlocksUnsupportedError(f"method {method!r}: the block (distributed) fit does REML or "
                                "ML; EM runs in the local engine")
    return method


class Evaluator:
    """The profiled deviance and its gradient at theta, as maps over the blocks and a reduce.

    Counts what it did: ``maps`` (calls of ``map_blocks``) and ``map_seconds`` (their time)."""

    def __init__(self, fr: Frame, par: Parametrisation, map_blocks: MapBlocks, reml: bool
                 ) -> None:
        self.frame, self.par, self.map_blocks, self.reml = fr, par, map_blocks, reml
        self.maps = 0
        self.map_seconds = 0.0

    def _map(self, fn: Callable[[Block], P]) -> list[P]:
        t0 = time.perf_counter()
        try:
            return list(self.map_blocks(fn))
        finally:
            self.maps += 1
            self.map_seconds += time.perf_counter() - t0

    def state(self, theta: Array) -> PLSState:
        """The state at theta (NumericalError where the deviance cannot be evaluated)."""
        Lam = self.par.lam(theta)
        parts = self._map(partial(deviance_partial, Lam=Lam))
        return reduce_deviance(self.frame, parts, Lam, self.reml)

    def gradient(self, st: PLSState) -> Array:
        """d deviance / d theta at the state ``st``."""
        parts = self._map(partial(gradient_partial, Lam=st.Lam, beta=st.beta,
                                  R_X=st.R_X if st.reml else None))
        return self.par.grad(reduce_gradient(st, parts))


def minimise(ev: Evaluator, theta0: Array, tol: float, max_iter: int
             ) -> tuple[Array, dict[str, Any]]:
    """`fit.minimise_deviance` over an `Evaluator`: the same optimiser, options and report."""
    par = ev.par
    scale = [1.0]
    seen: dict[bytes, tuple[float, Array, PLSState | None]] = {}

    def state_at(theta: Array) -> tuple[float, Array, PLSState | None]:
        key = np.asarray(theta, dtype=float).tobytes()
        if key not in seen:
            try:
                st = ev.state(theta)
                seen[key] = (st.deviance, ev.gradient(st), st)
            except NumericalError:
                seen[key] = (np.inf, np.zeros_like(theta), None)
        return seen[key]

    def fun(theta: Array) -> tuple[float, Array]:
        f, g, _ = state_at(theta)
        return f / scale[0], g / scale[0]

    d0 = state_at(theta0)[0]
    scale[0] = max(abs(d0), 1.0) if np.isfinite(d0) else 1.0
    opt = minimize(
        fun, theta0, jac=True, method="L-BFGS-B", bounds=par.bounds,
        options={"maxiter": max_iter, "ftol": tol * 1e-3, "gtol": tol, "maxcor": 20},
    )
    theta = np.asarray(opt.x, dtype=float)
    _, g, st = state_at(theta)
    if st is None:
        st = ev.state(theta)
    g = g / scale[0]
    free = ~((theta <= par.lower + 1e-12) & (g > 0))
    gnorm = float(np.max(np.abs(g[free]))) if free.any() else 0.0
    converged = bool(opt.success or gnorm < np.sqrt(tol))
    info = {"n_evals": len(seen), "iterations": int(opt.nit), "converged": converged,
            "message": str(opt.message), "gradient_norm": gnorm * scale[0], "state": st}
    return theta, info


def escape_boundary(ev: Evaluator, theta: Array, info: dict[str, Any], tol: float,
                    max_iter: int) -> tuple[Array, dict[str, Any]]:
    """`fit._escape_boundary` over an `Evaluator`: re-run from inside the region when a
    variance component ends on its bound, keep the lower deviance. The deviances compared are
    those of the states both runs end with (the same numbers `evaluate` gives again)."""
    par = ev.par
    on_bound = (par.lower == 0.0) & (theta < SINGULAR_TOL)
    if not on_bound.any():
        return theta, info
    inside = theta.copy()
    inside[on_bound] = 0.5
    theta2, info2 = minimise(ev, inside, tol, max_iter)
    info2["n_evals"] += info["n_evals"]
    info2["iterations"] += info["iterations"]
    if info2["state"].deviance < info["state"].deviance:
        return theta2, info2
    info["n_evals"] = info2["n_evals"]
    return theta, info


@dataclass
class BlockFit:
    """What `fit_blocks` did besides its result: the maps it ran and their time."""

    result: FitResult
    maps: int
    map_seconds: float


def fit_blocks(
    fr: Frame,
    spec: ModelSpec,
    map_blocks: MapBlocks,
    method: str | None = None,
    *,
    start: FitResult | Mapping[str, Any] | None = None,
    tol: float = 1e-10,
    max_iter: int = 500,
) -> BlockFit:
    """`fit(stats, spec, method, start=start, tol=tol, max_iter=max_iter, ranef=False)` for a
    one-term model whose groups are held in blocks: ``map_blocks(fn)`` returns ``fn(block)``
    for every block, in the blocks' order (a list comprehension, or futures on workers)."""
    method = check_spec(spec, method)
    par = Parametrisation(fr.q, spec.covariance, fr.T_Z, fr.z_scale)
    theta0 = _start_theta(par, start)
    ev = Evaluator(fr, par, map_blocks, method == "REML")
    t0 = time.perf_counter()
    theta, info = minimise(ev, theta0, tol, max_iter)
    theta, info = escape_boundary(ev, theta, info, tol, max_iter)
    st = info.pop("state")
    res = _result(fr, par, st, spec, method, theta, info, False)
    res.optsummary.seconds = time.perf_counter() - t0
    res.optsummary.warm_start = start is not None
    res.optsummary.theta_start = par.user_factor(theta0)[par.rows, par.cols].tolist()
    return BlockFit(with_terms(res, spec), ev.maps, ev.map_seconds)


def list_map(blocks: Sequence[Block]) -> MapBlocks:
    """``map_blocks`` over blocks held in this process."""
    return lambda fn: [fn(b) for b in blocks]


def fit_split(
    parts: Sequence[GroupStats],
    spec: ModelSpec,
    method: str | None = None,
    *,
    start: FitResult | Mapping[str, Any] | None = None,
    tol: float = 1e-10,
    max_iter: int = 500,
) -> FitResult:
    """The block fit of statistics held in several parts (each part one block), in this
    process: equal to ``fit`` of all the parts' groups, to rounding."""
    for part in parts:
        _check_arguments(part, spec)
    method = check_spec(spec, method)
    fr = frame(spec, combine([summarise(s, spec) for s in parts]))
    blocks = [build_block(s, fr, i) for i, s in enumerate(parts)]
    return fit_blocks(fr, spec, list_map(blocks), method, start=start, tol=tol,
                      max_iter=max_iter).result
