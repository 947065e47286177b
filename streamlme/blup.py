"""Group effects on demand: BLUPs, their conditional covariance, shrinkage, and predictions.

Given a model (beta, G, sigma^2) and a group's running statistics, the best linear unbiased
predictor of its random effects and its conditional covariance are (design.md section 4)

    b_j = Lambda P_j^-1 Lambda' Z_j'(y_j - X_j beta),   Var(b_j - b) = sigma^2 Lambda P_j^-1 Lambda',
    P_j = Lambda' Z_j'Z_j Lambda + I,   Lambda Lambda' = G / sigma^2,

which is (Z'Z + sigma^2 G^-1)^-1 Z'(y - X beta) written so that a singular G needs no inverse. The
cross-products come straight from the group's (n, m, C): with the rows' random design z = B w + e
and residual r = a'w + c both affine in w,

    Z'r = n (B m + e)(a'm + c) + B C a,      Z'Z = n (B m + e)(B m + e)' + B C B'.

The mean residual a'm + c is formed directly, so a response around 1e7 costs no digits. With the
model's ``z_centre`` and ``G_centred`` (what a fit reports), the algebra runs in the centred basis
z - z_centre and maps back exactly (b = T b_c, Var = T Var_c T'), so a random slope on a covariate
whose mean is far from zero (a timestamp) costs no digits either.

For a random intercept the shrinkage is tau^2 / (tau^2 + sigma^2 / n_j): 1 means the group's own
data decide its effect, 0 that the prior does. In general ``shrinkage`` is this reliability for the
first random term at the centre, 1 - Var(b_c,j0 - b_c,0) / G_c,00: for (1 + x | g), how much of
the group's offset at the typical x comes from its own data.

>>> import numpy as np
>>> from streamlme import GroupStats, ModelSpec
>>> spec = ModelSpec("y", ["1"], ["1"], "g")
>>> s = GroupStats.from_rows(["a"] * 4, np.array([[3.0], [5.0], [4.0], [4.0]]))
>>> eff = group_effects(s, spec, beta=np.array([2.0]), G=np.array([[1.0]]), sigma2=4.0)
>>> round(float(eff.shrinkage[0]), 12)  # tau^2 / (tau^2 + sigma^2 / n) = 1 / (1 + 4/4)
0.5
>>> round(float(eff.b[0, 0]), 12)       # half of the mean residual 4 - 2
1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from streamlme.estimate.linalg import chol, psd_factor, solve_lower
from streamlme.spec import INTERCEPT, ModelSpec
from streamlme.stats import GroupStats

Array = NDArray[np.float64]


@dataclass
class Effects:
    """Effects of several groups, row i for ``keys[i]``.

    ``b`` (G, q) conditional modes, ``cov`` (G, q, q) conditional covariances, ``shrinkage``
    (G,) reliability of the first random term, ``n`` (G,) weight mass seen, ``known`` (G,) False
    for groups never seen (their effect is 0 with the prior covariance G).
    """

    keys: list[str]
    b: Array
    cov: Array
    shrinkage: Array
    n: Array
    known: Array


def _affine_maps(spec: ModelSpec, beta: Array) -> tuple[Array, Array, Array, float]:
    """B, e, a, c with z = B w + e and r = y - x'beta = a'w + c."""
    cols = spec.columns
    d, q = len(cols), len(spec.random)
    B, e = np.zeros((q, d)), np.zeros(q)
    for i, t in enumerate(spec.random):
        if t == INTERCEPT:
            e[i] = 1.0
        else:
            B[i, cols.index(t)] = 1.0
    a, c = np.zeros(d), 0.0
    a[-1] = 1.0
    for k, t in enumerate(spec.fixed):
        if t == INTERCEPT:
            c -= beta[k]
        else:
            a[cols.index(t)] -= beta[k]
    return B, e, a, c


def group_effects(
    stats: GroupStats, spec: ModelSpec, beta: Array, G: Array, sigma2: float, *,
    z_centre: Array | None = None, G_centred: Array | None = None,
) -> Effects:
    """BLUPs of every group in ``stats`` under (beta, G, sigma^2), vectorised over groups.

    ``z_centre`` and ``G_centred`` (from the fit, both or neither) make the computation run in
    the centred basis; the results are in the user's basis either way.
    """
    beta, G = np.asarray(beta, float), np.asarray(G, float)
    q = len(spec.random)
    if (z_centre is None) != (G_centred is None):
        raise ValueError("give z_centre and G_centred together, or neither")
    c = np.zeros(q) if z_centre is None else np.asarray(z_centre, float)
    G_c = G if G_centred is None else np.asarray(G_centred, float)
    B, e, a, r0 = _affine_maps(spec, beta)
    zbar = stats.mean @ B.T + e - c                   # (G, q): mean centred random design
    rbar = stats.mean @ a + r0                         # (G,): mean residual
    n = stats.n
    Ztr = n[:, None] * zbar * rbar[:, None] + np.einsum("qd,gde,e->gq", B, stats.C, a)
    ZtZ = n[:, None, None] * zbar[:, :, None] * zbar[:, None, :] + np.einsum(
        "qd,gde,re->gqr", B, stats.C, B
    )
    Lam = psd_factor(G_c / sigma2)
    P = np.einsum("ai,gab,bj->gij", Lam, ZtZ, Lam) + np.eye(q)
    L = chol(P)
    W = solve_lower(L, np.broadcast_to(Lam.T, (len(stats), q, q)))   # L^-1 Lambda'
    cov = sigma2 * np.einsum("gki,gkj->gij", W, W)
    b = np.einsum("gki,gkj,gj->gi", W, W, Ztr)
    shrink = 1.0 - cov[:, 0, 0] / G_c[0, 0] if G_c[0, 0] > 0 else np.zeros(len(stats))
    if c.any():
        T = centring_map(spec, c)
        b = b @ T.T
        cov = np.einsum("ab,gbc,dc->gad", T, cov, T)
    return Effects(list(stats.keys), b, cov, shrink, n.copy(), np.ones(len(stats), bool))


def centring_map(spec: ModelSpec, z_centre: Array) -> Array:
    """T with b = T b_c for random effects b_c of the centred design z - z_centre."""
    q = len(spec.random)
    T = np.eye(q)
    if INTERCEPT in spec.random:
        i0 = spec.random.index(INTERCEPT)
        T[i0, :] -= z_centre
        T[i0, i0] = 1.0
    return T


def effects_for(
    stats: GroupStats, groups: Sequence[str], spec: ModelSpec, beta: Array, G: Array,
    sigma2: float, *, z_centre: Array | None = None, G_centred: Array | None = None,
) -> Effects:
    """Effects of ``groups`` in the order asked; groups absent from ``stats`` get the prior."""
    groups = list(groups)
    seen = [g for g in groups if g in stats]
    eff = (group_effects(stats.select(seen), spec, beta, G, sigma2, z_centre=z_centre,
                         G_centred=G_centred) if seen else None)
    q = len(spec.random)
    b, cov = np.zeros((len(groups), q)), np.broadcast_to(np.asarray(G, float),
                                                            (len(groups), q, q)).copy()
    shrink, n, known = np.zeros(len(groups)), np.zeros(len(groups)), np.zeros(len(groups), bool)
    if eff is not None:
        where = {k: i for i, k in enumerate(eff.keys)}
        for i, g in enumerate(groups):
            j = where.get(g)
            if j is not None:
                b[i], cov[i], shrink[i], n[i], known[i] = (
                    eff.b[j], eff.cov[j], eff.shrinkage[j], eff.n[j], True)
    return Effects(groups, b, cov, shrink, n, known)


def predict(
    spec: ModelSpec, beta: Array, beta_cov: Array | None, sigma2: float, b: Array, b_cov: Array,
    row: dict[str, float], level: float = 0.95,
) -> tuple[float, float, float, float]:
    """(prediction, its standard error, interval low, interval high) for one new row of a group.

    The prediction is x'beta + z'b_j; the interval is for a new observation: it adds sigma^2 to
    z' Var(b_j - b) z and, when ``beta_cov`` is given, x' Cov(beta) x.
    """
    from scipy.stats import norm

    missing = [c for c in spec.covariates if c not in row]
    if missing:
        raise KeyError(f"row lacks column(s) {missing}")
    x = np.array([1.0 if t == INTERCEPT else float(row[t]) for t in spec.fixed])
    z = np.array([1.0 if t == INTERCEPT else float(row[t]) for t in spec.random])
    mu = float(x @ beta + z @ b)
    var = float(z @ b_cov @ z) + sigma2
    if beta_cov is not None:
        var += float(x @ beta_cov @ x)
    se = var**0.5
    k = float(norm.ppf(0.5 + level / 2.0))
    return mu, se, mu - k * se, mu + k * se
