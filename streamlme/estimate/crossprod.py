"""Per-group cross-products Z'Z, Z'[X y] and the pooled [X y]'[X y], from sufficient statistics.

Everything the profiled deviance needs is a cross-product of the model's columns within a group.
From a group's (n, m, C) they follow exactly about any reference point r:

    sum_i u_i u_i' = [[n, n e'], [n e, C + n e e']],   u_i = (1, w_i - r),  e = m - r.

We take r at the pooled mean of each column wherever that is a reparametrisation of the model
(a covariate may move when the intercept absorbs the shift in every part it appears in; the response
may move when there is a fixed intercept). Random covariates are also scaled to unit
pooled standard deviation, so that one starting value of theta suits a slope on age in years and
one on income in dollars. The fit then runs in this centred, scaled basis, which keeps
y ~ 1e7 + noise and covariates with mean 1e5 from costing digits, and `CrossProducts` carries the
exact linear maps back to the user's basis:

    beta = T_X beta_c + r_y e_0,      b_j = T_Z b_c,j,      G = T_Z G_c T_Z'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from streamlme.spec import INTERCEPT, ModelSpec
from streamlme.stats import GroupStats

Array = NDArray[np.float64]


class DataError(ValueError):
    """Statistics that cannot identify the model: too few groups, collinear columns, no variation."""


@dataclass
class CrossProducts:
    """The model's cross-products in the centred basis, stacked over groups.

    ZtZ (G, q, q), ZtXy (G, q, p + 1) with y last, XyXy (p + 1, p + 1) pooled over groups; N total
    mass; T_X (p, p), T_Z (q, q) and r_y map centred-basis estimates back to the user's basis;
    z_scale (q,) is the scaling of each random term (1 for the intercept), T_Z = shift @ diag(z_scale);
    z_centre (q,) is where each random covariate was centred (0 for the intercept and for
    covariates the model does not let move).
    """

    keys: list[str]
    n: Array
    ZtZ: Array
    ZtXy: Array
    XyXy: Array
    N: float
    T_X: Array
    T_Z: Array
    z_scale: Array
    z_centre: Array
    r_y: float
    intercept_fixed: int | None
    #: the response's exact centre is r_y + delta_y (`Basis.delta`)
    delta_y: float = 0.0

    @property
    def p(self) -> int:
        return self.XyXy.shape[0] - 1

    @property
    def q(self) -> int:
        return self.ZtZ.shape[1]

    @property
    def n_groups(self) -> int:
        return len(self.keys)

    @property
    def ZtX(self) -> Array:
        return self.ZtXy[:, :, :-1]

    @property
    def Zty(self) -> Array:
        return self.ZtXy[:, :, -1]

    def centred_covariance(self, G_fit: Array) -> Array:
        """G in the centred, unscaled basis (z - z_centre) from G in the fit's scaled basis."""
        G_c = self.z_scale[:, None] * G_fit * self.z_scale[None, :]
        return 0.5 * (G_c + G_c.T)

    def beta_to_user(self, beta_c: Array) -> Array:
        beta = self.T_X @ beta_c
        if self.intercept_fixed is not None:
            # the response's centre is r_y + delta_y: its small part first, then its level
            beta[self.intercept_fixed] += self.delta_y
            beta[self.intercept_fixed] += self.r_y
        return beta


def centred_columns(spec: ModelSpec) -> NDArray[np.bool_]:
    """Which columns of the statistics may be centred without changing the model."""
    ok = np.zeros(len(spec.columns), dtype=bool)
    fixed_icpt = INTERCEPT in spec.fixed
    random_icpt = INTERCEPT in spec.random
    for k, col in enumerate(spec.covariates):
        ok[k] = (col not in spec.fixed or fixed_icpt) and (col not in spec.random or random_icpt)
    ok[-1] = fixed_icpt
    return ok


def reference_point(spec: ModelSpec, mean: Array, spread: Array | None = None) -> Array:
    """Where each column of the statistics is centred: near its pooled mean where that does not
    change the model (`centred_columns`), else at 0."""
    spread = np.zeros(len(spec.columns)) if spread is None else spread
    return np.array([_snap(m, s) if ok else 0.0
                     for m, s, ok in zip(mean, spread, centred_columns(spec))])


def _snap(m: float, s: float) -> float:
    """A mean m of spread s rounded to a multiple of 2^16 units of the last digit of |m| + s
    (exactly: a power of two).

    Any r near the pooled mean is a valid centre, and the fit in the centred basis depends on
    which: pooled means formed in another order or split (a block fit, a reordered store) differ
    by a few units of that digit, and snapped they give the same r, hence the same centred-basis
    numbers. The offset this leaves (at most 7e-12 of |m| + s) costs no digits.
    """
    h = float(np.spacing(abs(float(m)) + abs(float(s)))) * 65536.0
    return float(np.round(m / h) * h)


def _shift_matrix(terms: tuple[str, ...], columns: tuple[str, ...], r: Array) -> Array:
    """T with (user-basis coefficients) = T (centred-basis coefficients) for these terms."""
    T = np.eye(len(terms))
    if INTERCEPT in terms:
        i0 = terms.index(INTERCEPT)
        for j, term in enumerate(terms):
            if term != INTERCEPT:
                T[i0, j] = -r[columns.index(term)]
    return T


def check_width(stats: GroupStats, spec: ModelSpec) -> None:
    """Statistics of another model's columns are refused before anything reads them."""
    if stats.d != len(spec.columns):
        raise DataError(
            f"statistics have {stats.d} columns but the model needs {len(spec.columns)} "
            f"({', '.join(spec.columns)})"
        )


@dataclass
class Basis:
    """The global part of the cross-products: the reference point r, the scaling of random
    covariates, the pooled [X y]'[X y] about r and the maps back to the user's basis, with
    ``iz`` and ``ixy`` the positions of the random terms and of [X y] in u = (1, w - r)."""

    r: Array
    XyXy: Array
    T_X: Array
    T_Z: Array
    z_scale: Array
    z_centre: Array
    intercept_fixed: int | None
    iz: list[int]
    ixy: list[int]
    #: (d,) the exact pooled mean minus r in the centred columns (0 elsewhere): the groups'
    #: offsets are taken about r + delta, so that they sum to exactly zero, as the pooled block
    #: says, however the pooled mean was rounded (T_X, T_Z, z_centre use r + delta, rounded)
    delta: Array


def basis(spec: ModelSpec, N: float, M: Array, C_pool: Array, mean_error: Array) -> Basis:
    """Check the pooled moments can identify the model and form the global part of its
    cross-products.

    (N, M, C_pool) are the pooled mass, mean and co-moments, ``mean_error`` the exact pooled
    mean minus M (`pooled_moments`). A centred column's groups are taken about its exact pooled
    mean, r + delta with delta = (M - r) + mean_error (r a rounded centre, `_snap`), so that their
    offsets sum to zero as the pooled block (about that same point) says. Taken about r with
    the pooled block about M, they disagreed by N (M - r): with a response near 1e14, N ulp(1e14)
    in the intercept-y entry, an error the Schur complement multiplies by about theta^2 (it
    moved the intercept by 90 standard errors and G by 13x).
    """
    p = len(spec.fixed)
    if p >= N:
        raise DataError(f"{N:g} observations cannot estimate {p} fixed effects")
    spread = np.sqrt(np.maximum(np.diag(C_pool), 0.0) / N)
    r = reference_point(spec, M, spread)
    cols = spec.columns
    _check_constant(spec, M, C_pool, N, r)
    check_response(spec.response, M[-1], C_pool[-1, -1], N)
    # index of each term in the augmented vector u = (1, w - r)
    aug = {INTERCEPT: 0, **{c: 1 + k for k, c in enumerate(cols)}}
    ix = [aug[t] for t in spec.fixed]
    iz = [aug[t] for t in spec.random]
    ixy = [*ix, aug[spec.response]]

    scale = np.sqrt(np.maximum(np.diag(C_pool), 0.0) / N)
    for t in spec.random:
        if t != INTERCEPT:
            k = cols.index(t)
            if never_varies(scale[k], M[k]):
                if r[k] != 0.0 or M[k] == 0.0:
                    raise DataError(
                        f"random term {t!r} is {M[k]:g} in every row: beside an intercept it "
                        "spans nothing the intercept does not; drop one of them")
                # a constant column is an intercept under its own name (statsmodels-style
                # designs carry one): scale it to 1 rather than to unit spread
                scale[k] = abs(M[k])
    # z_s = z_c / s for random covariates: b_c = diag(1/s) b_s
    z_scale = np.array([1.0 if t == INTERCEPT else 1.0 / scale[cols.index(t)]
                        for t in spec.random])
    offset = (M - r) + mean_error
    delta = np.where(centred_columns(spec), offset, 0.0)
    e_pool = np.concatenate([[1.0], offset - delta])
    XyXy = _block(np.array([N]), e_pool[None], C_pool[None], ixy, ixy)[0]
    _check_rank(XyXy[:p, :p], spec)
    check_residual(XyXy, spec.fixed_names, spec.response)
    centre = r + delta
    T_X = _shift_matrix(spec.fixed, cols, centre)
    T_Z = _shift_matrix(spec.random, cols, centre) @ np.diag(z_scale)
    z_centre = np.array([0.0 if t == INTERCEPT else centre[cols.index(t)] for t in spec.random])
    i0 = spec.fixed.index(INTERCEPT) if INTERCEPT in spec.fixed else None
    return Basis(r, XyXy, T_X, T_Z, z_scale, z_centre, i0, iz, ixy, delta)


def cross_products(stats: GroupStats, spec: ModelSpec) -> CrossProducts:
    """Check the statistics can identify the model and form its centred cross-products."""
    check_width(stats, spec)
    stats.check_finite()
    live = stats.n > 0
    if not live.all():
        stats = stats.select([k for k, ok in zip(stats.keys, live) if ok])
    if len(stats) < 2:
        raise DataError(
            f"{len(stats)} group(s) with data; a random effect needs at least 2 groups"
        )
    N, M, C_pool, err = pooled_moments(stats)
    b = basis(spec, N, M, C_pool, err)
    e = np.concatenate([np.ones((len(stats), 1)), (stats.mean - b.r) - b.delta], axis=1)
    s = b.z_scale
    # C-contiguous: the compiled per-group passes walk these arrays row by row
    ZtZ = np.ascontiguousarray(
        _block(stats.n, e, stats.C, b.iz, b.iz) * s[None, :, None] * s[None, None, :])
    ZtXy = np.ascontiguousarray(_block(stats.n, e, stats.C, b.iz, b.ixy) * s[None, :, None])
    return CrossProducts(list(stats.keys), stats.n.copy(), ZtZ, ZtXy, b.XyXy, N, b.T_X, b.T_Z,
                         s, b.z_centre, float(b.r[-1]), b.intercept_fixed, float(b.delta[-1]))


def pooled_moments(stats: GroupStats) -> tuple[float, Array, Array, Array]:
    """(N, M, C, err) of groups with data: the pooled mass, mean (rounded to its last digit),
    co-moments about the exact pooled mean, and err = exact mean - M, formed from the groups'
    offsets to the first group's mean, so that (M - r) + err is the pooled mean about any
    r near the data to the digits of the data's spread (`basis`). A block fit's summaries
    (`blocks.summarise`) are these numbers."""
    ref = stats.mean[0]
    N, e, C = stats.pooled_about(ref)
    M = ref + e
    return N, M, C, e - (M - ref)


def _block(n: Array, e: Array, C: Array, rows: list[int], cols: list[int]) -> Array:
    """Stacked sum u u' restricted to rows x cols: C (padded with the intercept) + n e e'."""
    ri, ci = np.asarray(rows), np.asarray(cols)
    out = n[:, None, None] * e[:, ri, None] * e[:, None, ci]
    both = (ri[:, None] > 0) & (ci[None, :] > 0)
    if both.any():
        a, b = np.nonzero(both)
        out[:, a, b] += C[:, ri[a] - 1, ci[b] - 1]
    return out


def _check_constant(spec: ModelSpec, M: Array, C_pool: Array, N: float, r: Array) -> None:
    """A fixed covariate that never varies is the intercept again: name it, and say why."""
    if INTERCEPT not in spec.fixed:
        return
    for k, col in enumerate(spec.covariates):
        spread = np.sqrt(max(C_pool[k, k], 0.0) / N)
        if col in spec.fixed and r[k] != 0.0 and never_varies(spread, M[k]):
            raise DataError(
                f"fixed-effect columns ['(Intercept)', {col!r}] are linearly dependent: {col!r} "
                f"is {M[k]:g} in every row, which the intercept already spans; drop one of them")


def _check_rank(XtX: Array, spec: ModelSpec) -> None:
    s = np.sqrt(np.maximum(np.diag(XtX), 0.0))
    names = spec.fixed_names
    zero = [names[i] for i in np.flatnonzero(s == 0)]
    if zero:
        raise DataError(f"fixed-effect column(s) {zero} are zero in every row")
    R = XtX / np.outer(s, s)
    w, V = np.linalg.eigh(R)
    if w[0] < 1e-10 * w[-1]:
        v = V[:, 0]
        involved = [names[i] for i in np.flatnonzero(np.abs(v) > 1e-3)]
        raise DataError(
            f"fixed-effect columns {involved} are linearly dependent (X is rank deficient); "
            "drop one of them"
        )


def never_varies(spread: float, level: float) -> bool:
    """Whether a column of this pooled standard deviation and mean is constant.

    Its co-moments are exactly zero then (every offset from its mean is), up to dust far below
    the last digit of its level; a real spread is at least about that digit. (A tolerance
    relative to the level refused y = 1e14 + N(0, 1), whose spread is 1e-14 of its level.)
    """
    return not spread > 1e-3 * float(np.spacing(max(abs(level), 1.0)))


def check_response(name: str, level: float, co_moment: float, N: float) -> None:
    """A response that never varies has no variance to split: say so before anything fails."""
    spread = np.sqrt(max(co_moment, 0.0) / N)
    if never_varies(spread, level):
        raise DataError(f"response {name!r} is {level:g} in every row: it never varies, so there "
                        "is no variance to split between groups and residual")


def check_residual(XyXy: Array, fixed_names: list[str], response: str) -> None:
    """The fixed effects must leave some of y unexplained: with none left, sigma^2 is 0 and the
    profiled deviance cannot be evaluated. ``XyXy`` is [X y]'[X y] with y last."""
    s = np.sqrt(np.maximum(np.diag(XyXy), 0.0))
    if s[-1] == 0.0:
        return  # y is zero in every row: check_response says so
    try:
        left = np.linalg.cholesky(XyXy / np.outer(s, s))[-1, -1] ** 2
    except np.linalg.LinAlgError:
        left = 0.0
    if not left > 1e-12:
        raise DataError(f"the fixed effects {fixed_names} fit {response!r} exactly (no residual "
                        "variation is left): there is no variance to split between groups and "
                        "residual; drop the column that copies the response")


def alike_rows(n: Array, C: Array, pooled_var: Array) -> NDArray[np.bool_]:
    """Which groups (or cells) hold rows that are all alike — one row, as far as statistics can
    tell: every column's co-moment is zero, to rounding (1e-10 of the group's mass times the
    column's pooled variance). ``n`` (G,), ``C`` (G, d, d), ``pooled_var`` (d,)."""
    diag = np.diagonal(C, axis1=1, axis2=2)
    return np.asarray((diag <= 1e-10 * n[:, None] * pooled_var[None, :]).all(axis=1))
