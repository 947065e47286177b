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

from streamlme.estimate import kernels
from streamlme.estimate.crossprod import (
    CrossProducts,
    DataError,
    _block,
    alike_rows,
    basis,
    check_width,
    pooled_moments,
)
from streamlme.estimate.fit import (
    _check_arguments,
    _result,
    _start_theta,
    escape_boundary,
    minimise,
    note_confounded,
    with_terms,
)
from streamlme.estimate.pls import NumericalError, PLSState
from streamlme.estimate.result import FitResult
from streamlme.estimate.theta import Parametrisation
from streamlme.spec import ModelSpec
from streamlme.stats import GroupStats

Array = NDArray[np.float64]
P = TypeVar("P")

#: ``map_blocks(fn)`` returns ``[fn(block) for block in blocks]``, in the blocks' order.
MapBlocks = Callable[[Callable[["Block"], Any]], list[Any]]


class BlocksUnsupportedError(ValueError):
    """A model the block decomposition does not fit (several random-effect terms, EM)."""


# -- 1. summaries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Pooled moments of the groups with data (n > 0) of a block, or of several blocks.

    ``mean_error`` is the exact pooled mean minus ``mean`` (which is rounded to the last digit
    of the data's level), formed from the groups' offsets: `frame` needs the pooled mean about
    its reference point to the digits of the data's spread (see `crossprod.basis`)."""

    groups: int   # groups with data
    N: float      # their total mass
    mean: Array   # (d,)
    C: Array      # (d, d) pooled centred co-moments
    mean_error: Array | None = None   # (d,); None: zero
    alike: int = 0  # groups whose rows are all alike (one row: `crossprod.alike_rows`)


def summarise(stats: GroupStats, spec: ModelSpec) -> Summary:
    """A block's `Summary`, after the checks `cross_products` makes of every group (width,
    finite statistics, no negative mass)."""
    check_width(stats, spec)
    stats.check_finite()
    live = stats.n > 0
    if not live.any():
        return Summary(0, 0.0, np.zeros(stats.d), np.zeros((stats.d, stats.d)), np.zeros(stats.d))
    if not live.all():
        stats = stats.select([k for k, ok in zip(stats.keys, live) if ok])
    N, m, C, err = pooled_moments(stats)
    alike = int(alike_rows(stats.n, stats.C, np.diag(C) / N).sum())
    return Summary(len(stats), N, m, C, err, alike)


def combine(summaries: Sequence[Summary]) -> Summary:
    """The `Summary` of the union of the blocks (the pairwise update, in the order given)."""
    if not summaries:
        raise DataError("no blocks: 0 group(s) with data; a random effect needs at least 2 groups")
    d = len(summaries[0].mean)
    groups, n, m, C, err = 0, 0.0, np.zeros(d), np.zeros((d, d)), np.zeros(d)
    alike = 0
    for s in summaries:
        if s.groups == 0:
            continue
        alike += s.alike
        s_err = np.zeros(d) if s.mean_error is None else s.mean_error
        if groups == 0:
            groups, n, m, C, err = s.groups, s.N, s.mean, s.C, s_err
            continue
        total = n + s.N
        # the difference of the exact means, kept to the digits of the spread
        delta = (s.mean - m) + (s_err - err)
        m_new = m + (s.mean - m) * (s.N / total)
        C = C + s.C + (n * s.N / total) * np.outer(delta, delta)
        err = (n * ((m - m_new) + err) + s.N * ((s.mean - m_new) + s_err)) / total
        groups, n, m = groups + s.groups, total, m_new
    return Summary(groups, float(n), m, C, err, alike)


# -- 2. the frame ---------------------------------------------------------------------------


@dataclass
class Frame(CrossProducts):
    """`CrossProducts` without per-group arrays (ZtZ, ZtXy have no rows; keys and n are empty):
    the pooled [X y]'[X y], N and the basis maps, with ``groups`` the number of groups."""

    groups: int = 0
    #: where the columns of the statistics are centred: r + delta (`crossprod.Basis`)
    r: Array = field(default_factory=lambda: np.zeros(0))
    delta: Array = field(default_factory=lambda: np.zeros(0))
    #: positions of the random terms and of [X y] in the augmented vector (1, w - r)
    iz: tuple[int, ...] = ()
    ixy: tuple[int, ...] = ()
    #: groups whose rows are all alike (`Summary.alike`)
    alike: int = 0

    @property
    def n_groups(self) -> int:  # type: ignore[override]
        return self.groups


def frame(spec: ModelSpec, summary: Summary) -> Frame:
    """The global part of `crossprod.cross_products`, from the pooled moments of all blocks:
    the same reference point, scaling, checks and error messages (`crossprod.basis`)."""
    if summary.groups < 2:
        raise DataError(
            f"{summary.groups} group(s) with data; a random effect needs at least 2 groups")
    N, M = summary.N, summary.mean
    err = np.zeros_like(M) if summary.mean_error is None else summary.mean_error
    b = basis(spec, N, M, summary.C, err)
    q, m = len(b.iz), len(b.ixy)
    return Frame(keys=[], n=np.zeros(0), ZtZ=np.zeros((0, q, q)), ZtXy=np.zeros((0, q, m)),
                 XyXy=b.XyXy, N=N, T_X=b.T_X, T_Z=b.T_Z, z_scale=b.z_scale,
                 z_centre=b.z_centre, r_y=float(b.r[-1]), intercept_fixed=b.intercept_fixed,
                 delta_y=float(b.delta[-1]),
                 groups=summary.groups, r=b.r, delta=b.delta, iz=tuple(b.iz), ixy=tuple(b.ixy),
                 alike=summary.alike)


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
    e = np.concatenate([np.ones((len(n), 1)), (mean - fr.r) - fr.delta], axis=1)
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

    @property
    def n_groups(self) -> int:
        return self.frame.groups

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
    res = note_confounded(with_terms(res, spec),
                          [spec.terms[0].group] if fr.alike == fr.groups else [])
    return BlockFit(res, ev.maps, ev.map_seconds)


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
