"""Effects on demand: the one BLUP core behind the Client, the HTTP API, the river estimator and
model records (conditional modes, conditional covariances, shrinkage and predictions).

Everything here is numpy on statistics (it knows nothing of Redis or Kafka). Two pieces:

- `Kernel`: one random-effect term, vectorised over independent groups (a one-term model, where
  each group is its own block), with `Kernel.scalar` the same algebra compiled to plain Python
  floats and positions in a stored record for the Client's single-group latency path;
- `TermsModel`: several terms (nested, crossed, several on one factor), where a level's effect
  comes from a small system over the cells that carry it.

Both are built from the same maps (`term_maps`, `residual_map`, `centring_map`) and solve with the
same algebra (`lambda_solve`).

One term
--------

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

Several terms: what an on-demand effect is
------------------------------------------

The statistics are kept per *cell* (the combination of the levels of every grouping column an
event carries). Terms k = 1..K have covariances G_k, design maps z_k = B_k w + e_k, and the last
refresh left their conditional modes b_k (the joint BLUP, ``ranef``). A query names a factor F
(every term on F answers together, as lme4's ``ranef(fit)$F``) and one of its levels l. Its
effect is computed from the *current* statistics of a block of cells and the latest model:

- **Block columns.** F0 is the set of grouping columns that every term's factor contains. If F0
  is not empty (**nested** terms, e.g. ``(1 | hospital) + (1 | hospital:doctor)``, F0 =
  {hospital}; also one term, or several terms on one factor), the cells split into independent
  blocks by their level of F0; the block of l is the cells sharing l's level of F0. Otherwise
  (**crossed** terms, e.g. ``(1 | subject) + (1 | item)``) the block of l is the cells of l.
- **Unknowns.** S is every level, present in the block, of every term whose factor contains the
  block columns (for nested terms: every term; for crossed ones: the terms on F and on finer
  factors that include F). The other terms' effects are held at the last refresh's modes (0 for
  a level the refresh did not see).
- **Effect.** The exact solution for S of the mixed-model equations restricted to the block,

      b_S = (Z_S'Z_S + sigma^2 G_S^-1)^-1 Z_S'(y - X beta - sum_{m not in S} Z_m b_m),
      Var(b_S - b) = sigma^2 (Z_S'Z_S + sigma^2 G_S^-1)^-1,

  over the block's cells, computed in the Lambda form above (no G inverse); the answer is l's part
  of b_S and its diagonal block of Var.

So for **nested** terms nothing is held fixed: a level's effect is the exact joint BLUP given
the model (beta, G, sigma^2), from its block's current statistics, with its exact conditional
covariance, as lme4's ``ranef(condVar = TRUE)`` would give on the data seen so far. For
**crossed** terms it is one block Gauss-Seidel step from the last refresh: the level's effect
updated from its own cells' current statistics given the other factors' effects from the last
refresh, and its covariance is conditional on those (so smaller than lme4's condVar, which also
carries their uncertainty). The joint BLUP is a fixed point of this step (it solves every block
of rows of the mixed-model equations), so right after a refresh, with no event since, the effect
is the joint BLUP; after new events it moves towards the new joint solution, and repeating the
step over every level (Gauss-Seidel sweeps) converges to it. A level never seen has effect 0 and
the prior covariance blockdiag(G_k) of the terms on F (exact in both cases: no data involve it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from streamlme.estimate.linalg import chol, psd_factor, solve_lower
from streamlme.spec import INTERCEPT, ModelSpec, RandomTerm, term_name
from streamlme.stats import GroupStats

Array = NDArray[np.float64]

#: Blocks with more unknowns than this are solved with a sparse factorisation.
DENSE_MAX = 400


# -- the maps ---------------------------------------------------------------------------------


def term_maps(spec: ModelSpec, random: Sequence[str]) -> tuple[Array, Array]:
    """B, e with z = B w + e: the random design of ``random`` from a row w of ``spec.columns``."""
    cols = spec.columns
    B, e = np.zeros((len(random), len(cols))), np.zeros(len(random))
    for i, t in enumerate(random):
        if t == INTERCEPT:
            e[i] = 1.0
        else:
            B[i, cols.index(t)] = 1.0
    return B, e


def residual_map(spec: ModelSpec, beta: Array) -> tuple[Array, float]:
    """a, c with r = y - x'beta = a'w + c for a row w of ``spec.columns``."""
    cols = spec.columns
    a, c = np.zeros(len(cols)), 0.0
    a[-1] = 1.0
    for k, t in enumerate(spec.fixed):
        if t == INTERCEPT:
            c -= float(beta[k])
        else:
            a[cols.index(t)] -= float(beta[k])
    return a, c


def _centring(random: Sequence[str], z_centre: Array) -> Array:
    q = len(random)
    T = np.eye(q)
    if INTERCEPT in random and np.any(z_centre):
        i0 = list(random).index(INTERCEPT)
        T[i0, :] -= z_centre
        T[i0, i0] = 1.0
    return T


def centring_map(spec: ModelSpec, z_centre: Array) -> Array:
    """T with b = T b_c for random effects b_c of the centred design z - z_centre."""
    return _centring(spec.random, np.asarray(z_centre, float))


def lambda_solve(ZtZ: Array, Ztr: Array, Lam: Array, sigma2: float) -> tuple[Array, Array]:
    """(b, Var) for stacked systems: b = Lam P^-1 Lam' Z'r, Var = sigma^2 Lam P^-1 Lam',
    P = Lam' Z'Z Lam + I; ZtZ (G, q, q), Ztr (G, q), Lam (q, q). No inverse of G is formed."""
    q = Lam.shape[0]
    P = np.einsum("ai,gab,bj->gij", Lam, ZtZ, Lam) + np.eye(q)
    L = chol(P)
    W = solve_lower(L, np.broadcast_to(Lam.T, (ZtZ.shape[0], q, q)))   # L^-1 Lambda'
    cov = sigma2 * np.einsum("gki,gkj->gij", W, W)
    b = np.einsum("gki,gkj,gj->gi", W, W, Ztr)
    return b, cov


# -- one term ---------------------------------------------------------------------------------


class Kernel:
    """One random-effect term's BLUP algebra under one model, vectorised over groups.

    ``B, e`` map a statistics row w to the term's design, ``a, c`` to the residual
    y - x'beta; ``G`` (user basis), ``G_centred`` and ``z_centre`` are the fit's. Every
    interface computes one-term effects through this class: `group_effects` and
    `ModelRecord.effects` with `effects`, the river estimator with `centred_modes`, the Client
    with `scalar` (the same algebra on plain floats).
    """

    def __init__(self, random: Sequence[str], B: Array, e: Array, a: Array, c: float, G: Array,
                 sigma2: float, *, z_centre: Array | None = None,
                 G_centred: Array | None = None) -> None:
        if (z_centre is None) != (G_centred is None):
            raise ValueError("give z_centre and G_centred together, or neither")
        self.random = tuple(random)
        self.names = [term_name(t) for t in self.random]
        self.q = len(self.random)
        self.B, self.e = np.asarray(B, float), np.asarray(e, float)
        self.a, self.c = np.asarray(a, float), float(c)
        self.G = np.asarray(G, float)
        self.sigma2 = float(sigma2)
        self.zc = np.zeros(self.q) if z_centre is None else np.asarray(z_centre, float)
        self.G_c = self.G if G_centred is None else np.asarray(G_centred, float)
        self.Lam = psd_factor(self.G_c / self.sigma2)
        self.T = _centring(self.random, self.zc)
        self.centred = bool(self.zc.any()) and INTERCEPT in self.random
        self._Kk: tuple[Array, Array] | None = None

    @classmethod
    def for_spec(cls, spec: ModelSpec, beta: Array, G: Array, sigma2: float, *,
                 z_centre: Array | None = None, G_centred: Array | None = None) -> Kernel:
        """The kernel of a one-term spec's (first) term on statistics of ``spec.columns``."""
        B, e = term_maps(spec, spec.random)
        a, c = residual_map(spec, np.asarray(beta, float))
        return cls(spec.random, B, e, a, c, G, sigma2, z_centre=z_centre, G_centred=G_centred)

    def on_columns(self, index: Sequence[int], width: int) -> Kernel:
        """The same kernel on rows of ``width`` columns where column j of the spec sits at
        ``index[j]`` (the river estimator keeps more columns than a spec uses)."""
        out = object.__new__(Kernel)
        out.__dict__.update(self.__dict__)
        idx = np.asarray(index, dtype=np.intp)
        out.B = np.zeros((self.q, width))
        out.B[:, idx] = self.B
        out.a = np.zeros(width)
        out.a[idx] = self.a
        out._Kk = None
        return out

    # -- vectorised -------------------------------------------------------------------------

    def cross_products(self, n: Array, mean: Array, C: Array) -> tuple[Array, Array]:
        """Z'Z (G, q, q) and Z'r (G, q) of each group, in the centred basis.

        Both are blocks of one product: with K = [B; a'] and k = (e - z_centre, c), the rows'
        (z, r) = K w + k, so [Z r]'[Z r] = n u u' + K C K' with u = K m + k, the mean (z, r).
        """
        K, k = self._K()
        q = self.q
        u = mean @ K.T + k
        M = n[:, None, None] * u[:, :, None] * u[:, None, :] + K @ C @ K.T
        return M[:, :q, :q], M[:, :q, q]

    def _K(self) -> tuple[Array, Array]:
        if self._Kk is None:
            self._Kk = (np.vstack([self.B, self.a]), np.append(self.e - self.zc, self.c))
        return self._Kk

    def centred_modes(self, n: Array, mean: Array, C: Array) -> tuple[Array, Array]:
        """(b_c, Var_c) per group in the centred basis z - z_centre."""
        ZtZ, Ztr = self.cross_products(n, mean, C)
        return lambda_solve(ZtZ, Ztr, self.Lam, self.sigma2)

    def modes(self, n: Array, mean: Array, C: Array) -> Array:
        """b_c = Lam P^-1 Lam' Z'r per group in the centred basis, without covariances (what
        a prediction needs; one stacked solve)."""
        ZtZ, Ztr = self.cross_products(n, mean, C)
        Lam = self.Lam
        P = Lam.T @ ZtZ @ Lam + np.eye(self.q)
        return (Lam @ np.linalg.solve(P, (Ztr @ Lam)[..., None]))[..., 0]

    def effects(self, n: Array, mean: Array, C: Array) -> tuple[Array, Array, Array]:
        """(b, Var(b - b_true), shrinkage) per group, in the user's basis."""
        b, cov = self.centred_modes(n, mean, C)
        G00 = self.G_c[0, 0]
        shrink = 1.0 - cov[:, 0, 0] / G00 if G00 > 0 else np.zeros(len(n))
        if self.centred:
            T = self.T
            b = b @ T.T
            cov = np.einsum("ab,gbc,dc->gad", T, cov, T)
        return b, cov, shrink

    def fixed_part(self, F: Array) -> Array:
        """x'beta of rows F holding every column but the response."""
        return -(F @ self.a[:-1] + self.c)

    def random_design(self, F: Array) -> Array:
        """The centred random design z - z_centre of rows F (every column but the response)."""
        return F @ self.B[:, :-1].T + self.e - self.zc

    def scalar(self) -> ScalarKernel:
        """This kernel on plain floats, reading a decoded `streamlme.stats` record."""
        return ScalarKernel(self)


class ScalarKernel:
    """`Kernel` for one group at a time, in plain Python floats (numpy's per-call overhead
    costs more than the arithmetic when q is 1 to 3): the Client's latency path.

    It reads a decoded record (n, t, m, upper triangle of C) followed by two constants, 0.0 and
    1.0, so that an intercept term (z = 1, no co-moments) reads its entries from the same kind
    of positions as a covariate does and the arithmetic never branches on term types. The
    positions come from the kernel's maps B (each row selects one column or none) and a.
    With zbar = B m + e - z_centre, rbar = a'm + c, Z'r = n zbar rbar + B C a,
    Z'Z = n zbar zbar' + B C B': P = Lam' Z'Z Lam + I = L L', W = L^-1 Lam', Var_c = sigma^2 W'W,
    b_c = W'W Z'r, then b = T b_c and Var = T Var_c T' (`lambda_solve`, written out).
    """

    def __init__(self, k: Kernel) -> None:
        d = k.B.shape[1]
        nvals = 2 + d + d * (d + 1) // 2
        zero, one = nvals, nvals + 1
        tri = _triangle_positions(d)
        rcols: list[int | None] = []
        for i in range(k.q):
            nz = np.flatnonzero(k.B[i])
            if len(nz) > 1 or (len(nz) == 1 and k.B[i, nz[0]] != 1.0):
                raise ValueError("the scalar kernel needs each random term to be one column")
            rcols.append(int(nz[0]) if len(nz) else None)
        a = {int(j): float(k.a[j]) for j in np.flatnonzero(k.a)}
        self.q = k.q
        self.c = k.c
        self.pm = [(2 + j, coef) for j, coef in sorted(a.items())]            # rbar = c + a'm
        self.pz = [one if r is None else 2 + r for r in rcols]                 # zbar_i
        self.pa = [[] if r is None else [(tri[r][j], coef) for j, coef in sorted(a.items())]
                   for r in rcols]                                             # (B C a)_i
        self.pc = [[zero if ri is None or rj is None else tri[ri][rj] for rj in rcols]
                   for ri in rcols]                                            # (B C B')_ij
        self.sigma2 = k.sigma2
        self.G00 = float(k.G_c[0, 0])
        self.lam = [[float(v) for v in row] for row in k.Lam]
        self.zc = [float(v) for v in k.zc]
        self.i0 = k.random.index(INTERCEPT) if INTERCEPT in k.random else None
        self.centred = k.centred
        self.solve = {1: self._solve1, 2: self._solve2}.get(k.q, self._solve_any)

    def effect(self, v: Sequence[float]) -> tuple[list[float], list[list[float]], float]:
        """(b, Var, shrinkage) of one group from its decoded record ``v`` (with the two
        trailing constants)."""
        n = v[0]
        rbar = self.c
        for p, coef in self.pm:
            rbar += coef * v[p]
        zbar = [v[p] - zc for p, zc in zip(self.pz, self.zc)]
        Ztr = []
        for z, pa in zip(zbar, self.pa):
            s = n * z * rbar
            for p, coef in pa:
                s += coef * v[p]
            Ztr.append(s)
        b, WtW = self.solve(n, zbar, v, Ztr)
        sigma2 = self.sigma2
        cov = [[sigma2 * x for x in row] for row in WtW]
        shrink = 1.0 - cov[0][0] / self.G00 if self.G00 > 0 else 0.0
        if self.centred:
            b, cov = self._uncentre(b, cov)
        return b, cov, shrink

    def _uncentre(self, b: list[float], cov: list[list[float]]
                  ) -> tuple[list[float], list[list[float]]]:
        """b = T b_c, Var = T Var_c T': the intercept row of T is e_i0 - z_centre."""
        i0, zc, q = self.i0, self.zc, self.q
        assert i0 is not None
        b = list(b)
        b[i0] -= sum(z * x for z, x in zip(zc, b))
        row = [cov[i0][j] - sum(zc[k] * cov[k][j] for k in range(q)) for j in range(q)]
        cov = [list(r) for r in cov]
        cov[i0] = row
        for i in range(q):
            cov[i][i0] = row[i]
        cov[i0][i0] = row[i0] - sum(zc[k] * row[k] for k in range(q))
        return b, cov

    # (b, W'W) from Z'r; Z'Z is formed inside: q = 1 and 2 written out, any q by loops.

    def _solve1(self, n: float, zbar: list[float], v: Sequence[float], Ztr: list[float]
                ) -> tuple[list[float], list[list[float]]]:
        l00 = self.lam[0][0]
        a00 = n * zbar[0] * zbar[0] + v[self.pc[0][0]]
        w = l00 / math.sqrt(l00 * (a00 * l00) + 1.0)
        ww = w * w
        return [ww * Ztr[0]], [[ww]]

    def _solve2(self, n: float, zbar: list[float], v: Sequence[float], Ztr: list[float]
                ) -> tuple[list[float], list[list[float]]]:
        (l00, _), (l10, l11) = self.lam
        z0, z1 = zbar
        pc = self.pc
        a00 = n * z0 * z0 + v[pc[0][0]]
        a01 = n * z1 * z0 + v[pc[1][0]]
        a11 = n * z1 * z1 + v[pc[1][1]]
        p00 = l00 * (a00 * l00 + a01 * l10) + l10 * (a01 * l00 + a11 * l10) + 1.0
        p01 = l00 * (a01 * l11) + l10 * (a11 * l11)
        p11 = l11 * (a11 * l11) + 1.0
        c00 = math.sqrt(p00)
        c10 = p01 / c00
        c11 = math.sqrt(p11 - c10 * c10)
        w00, w01 = l00 / c00, l10 / c00
        w10, w11 = -c10 * w00 / c11, (l11 - c10 * w01) / c11
        s00 = w00 * w00 + w10 * w10
        s01 = w00 * w01 + w10 * w11
        s11 = w01 * w01 + w11 * w11
        t0, t1 = Ztr
        return [s00 * t0 + s01 * t1, s01 * t0 + s11 * t1], [[s00, s01], [s01, s11]]

    def _solve_any(self, n: float, zbar: list[float], v: Sequence[float], Ztr: list[float]
                   ) -> tuple[list[float], list[list[float]]]:
        q, lam, pc = self.q, self.lam, self.pc
        A = [[n * zbar[i] * zbar[j] + v[pc[i][j]] for j in range(q)] for i in range(q)]
        T = [[sum(A[i][k] * lam[k][j] for k in range(q)) for j in range(q)] for i in range(q)]
        P = [[sum(lam[k][i] * T[k][j] for k in range(q)) + (i == j) for j in range(q)]
             for i in range(q)]
        L = [[0.0] * q for _ in range(q)]
        for k in range(q):
            L[k][k] = math.sqrt(P[k][k] - sum(L[k][j] * L[k][j] for j in range(k)))
            for i in range(k + 1, q):
                L[i][k] = (P[i][k] - sum(L[i][j] * L[k][j] for j in range(k))) / L[k][k]
        W = [[0.0] * q for _ in range(q)]  # L^-1 Lam' by forward substitution
        for col in range(q):
            for i in range(q):
                W[i][col] = (lam[col][i] - sum(L[i][j] * W[j][col] for j in range(i))) / L[i][i]
        WtW = [[sum(W[k][i] * W[k][j] for k in range(q)) for j in range(q)] for i in range(q)]
        return [sum(WtW[i][j] * Ztr[j] for j in range(q)) for i in range(q)], WtW


def _triangle_positions(d: int) -> list[list[int]]:
    """pos[i][j]: where C[i, j] sits in a decoded record (n, t, m, upper triangle of C)."""
    pos = [[0] * d for _ in range(d)]
    k = 2 + d
    for i in range(d):
        for j in range(i, d):
            pos[i][j] = pos[j][i] = k
            k += 1
    return pos


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


def group_effects(
    stats: GroupStats, spec: ModelSpec, beta: Array, G: Array, sigma2: float, *,
    z_centre: Array | None = None, G_centred: Array | None = None,
) -> Effects:
    """BLUPs of every group in ``stats`` under (beta, G, sigma^2), vectorised over groups
    (a one-term model: each group is its own block).

    ``z_centre`` and ``G_centred`` (from the fit, both or neither) make the computation run in
    the centred basis; the results are in the user's basis either way.
    """
    k = Kernel.for_spec(spec, beta, G, sigma2, z_centre=z_centre, G_centred=G_centred)
    b, cov, shrink = k.effects(stats.n, stats.mean, stats.C)
    return Effects(list(stats.keys), b, cov, shrink, stats.n.copy(), np.ones(len(stats), bool))


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


# -- several terms ----------------------------------------------------------------------------


@dataclass
class TermPart:
    """One random-effect term of a `TermsModel`: its maps, covariance and last modes."""

    term: RandomTerm
    B: Array
    e: Array
    G: Array
    G_c: Array
    zc: Array
    Lam: Array
    T: Array
    ranef: Mapping[str, Array] = field(default_factory=dict)

    @property
    def q(self) -> int:
        return self.term.q


@dataclass
class LevelEffect:
    """The effect of one level of a factor: every term on the factor, in the formula's order.

    ``names`` the random effects (one per term column), ``b`` their conditional modes, ``cov``
    their conditional covariance, ``shrinkage`` the reliability of the first one, ``n`` the
    weight mass of the level's cells, ``cells`` how many cells carry the level, ``known`` False
    for a level never seen (0, prior covariance). ``solution`` is ``"exact"`` (the joint BLUP of
    the level's block: one term, nested terms, terms on one factor) or ``"gauss_seidel"`` (crossed
    terms: the block step given the other factors' effects from the last refresh).
    """

    factor: str
    level: str
    names: list[str]
    b: Array
    cov: Array
    shrinkage: float
    n: float
    cells: int
    known: bool
    solution: str


@dataclass
class BlockSolution:
    """The solution of one block: per term of S, its levels, modes ``b`` (L, q) and, for a
    dense solve, conditional covariances ``cov`` (L, q, q), in the user's basis; ``want_cov``
    the centred joint covariance of the levels asked for."""

    terms: list[int]
    levels: dict[int, list[str]]
    b: dict[int, Array]
    cov: dict[int, Array]
    offsets: dict[int, int] = field(default_factory=dict)
    want_cov: Array | None = None


class TermsModel:
    """A model with one or more random-effect terms, for effects on demand (see the module
    docstring for what an effect is for each structure).

    Parameters: the spec, beta, sigma^2, and per term its covariance ``G`` (user basis), the
    last refresh's conditional modes ``ranef`` (level -> vector; only crossed models use them),
    and optionally ``z_centre``/``G_centred`` (a fit's centred basis).
    """

    def __init__(self, spec: ModelSpec, beta: Array, sigma2: float, G: Sequence[Array], *,
                 ranef: Sequence[Mapping[str, Sequence[float]] | None] | None = None,
                 z_centre: Sequence[Array | None] | None = None,
                 G_centred: Sequence[Array | None] | None = None) -> None:
        if len(G) != len(spec.terms):
            raise ValueError(f"{len(G)} covariance matrices for {len(spec.terms)} terms")
        self.spec = spec
        self.beta = np.asarray(beta, float)
        self.sigma2 = float(sigma2)
        self.a, self.c = residual_map(spec, self.beta)
        self.parts: list[TermPart] = []
        for k, term in enumerate(spec.terms):
            Gk = np.asarray(G[k], float).reshape(term.q, term.q)
            zc = z_centre[k] if z_centre is not None else None
            Gc = G_centred[k] if G_centred is not None else None
            zc = np.zeros(term.q) if zc is None else np.asarray(zc, float)
            Gc = Gk if Gc is None else np.asarray(Gc, float).reshape(term.q, term.q)
            B, e = term_maps(spec, term.random)
            modes = {str(lv): np.asarray(v, float).reshape(term.q)
                     for lv, v in ((ranef[k] if ranef is not None else None) or {}).items()}
            self.parts.append(TermPart(term, B, e, Gk, Gc, zc, psd_factor(Gc / self.sigma2),
                                       _centring(term.random, zc), modes))
        common = set(spec.terms[0].factors)
        for term in spec.terms[1:]:
            common &= set(term.factors)
        #: grouping columns every term's factor contains (F0); empty for crossed terms
        self.shared = tuple(c for c in spec.grouping_columns if c in common)

    @classmethod
    def from_fit(cls, spec: ModelSpec, fit: Mapping[str, Any]) -> TermsModel:
        """From a fit's JSON (``FitResult.to_dict()`` or a model record's ``fit``)."""
        beta = np.array([fit["beta"][name] for name in fit["fixed"]], dtype=float)
        terms = fit.get("terms")
        if not terms:  # an older one-term record
            return cls(spec, beta, fit["sigma2"], [fit["G"]],
                       ranef=[fit.get("ranef")], z_centre=[fit.get("z_centre")],
                       G_centred=[fit.get("G_centred")])
        if len(terms) != len(spec.terms):
            raise ValueError(f"the fit has {len(terms)} terms, the spec {len(spec.terms)}")
        zc = [t.get("z_centre") for t in terms]
        Gc = [t.get("G_centred") for t in terms]
        if len(terms) == 1 and zc[0] is None:
            zc, Gc = [fit.get("z_centre")], [fit.get("G_centred")]
        return cls(spec, beta, fit["sigma2"], [t["G"] for t in terms],
                   ranef=[t.get("ranef") for t in terms], z_centre=zc, G_centred=Gc)

    # -- structure --------------------------------------------------------------------------

    @property
    def nested(self) -> bool:
        """True when the cells split into independent blocks (some column in every factor)."""
        return bool(self.shared)

    def factor_terms(self, name: str) -> list[int]:
        """Indices of the terms on the factor ``name`` (see `ModelSpec.term`); SpecError if
        no term is on it."""
        group = self.spec.term(name).group
        return [k for k, t in enumerate(self.spec.terms) if t.group == group]

    def block_columns(self, name: str) -> tuple[str, ...]:
        """The grouping columns whose levels pick the block of a level of factor ``name``."""
        if self.shared:
            return self.shared
        return self.spec.terms[self.factor_terms(name)[0]].factors

    def solved_terms(self, columns: Sequence[str]) -> list[int]:
        """S: the terms whose factor contains every block column (the others are held)."""
        return [k for k, t in enumerate(self.spec.terms) if set(columns) <= set(t.factors)]

    def names(self, ks: Sequence[int]) -> list[str]:
        out: list[str] = []
        for k in ks:
            for name in self.spec.terms[k].names:
                base, i = name, 1
                while name in out:
                    name, i = f"{base}.{i}", i + 1
                out.append(name)
        return out

    # -- effects ----------------------------------------------------------------------------

    def prior(self, name: str, level: str) -> LevelEffect:
        ks = self.factor_terms(name)
        cov = _block_diag([self.parts[k].G for k in ks])
        return LevelEffect(self.spec.terms[ks[0]].group, level, self.names(ks),
                           np.zeros(cov.shape[0]), cov, 0.0, 0.0, 0, False,
                           "exact" if self.shared else "gauss_seidel")

    def level_effect(self, name: str, level: str | Sequence[str], stats: GroupStats
                     ) -> LevelEffect:
        """The effect of ``level`` of factor ``name`` from ``stats``, which must hold (at
        least) every cell of the level's block, with its current statistics."""
        spec = self.spec
        ks = self.factor_terms(name)
        term = spec.terms[ks[0]]
        level = self.level_name(name, level)
        if not len(stats):
            return self.prior(name, level)
        cells = spec.cell_levels(stats.keys)
        mine = np.array([lv == level for lv in spec.term_levels(term, cells)])
        if not mine.any():
            return self.prior(name, level)
        cols = self.block_columns(name)
        at = [spec.grouping_columns.index(c) for c in cols]
        key = tuple(cells[int(np.flatnonzero(mine)[0])][p] for p in at)
        idx = [i for i, c in enumerate(cells) if tuple(c[p] for p in at) == key]
        sub = stats.select([stats.keys[i] for i in idx]) if len(idx) < len(stats) else stats
        sol = self.solve(sub, [cells[i] for i in idx], self.solved_terms(cols),
                         want=[(k, level) for k in ks])
        b = np.concatenate([sol.b[k][sol.levels[k].index(level)] for k in ks])
        assert sol.want_cov is not None
        T = _block_diag([self.parts[k].T for k in ks])
        cov = T @ sol.want_cov @ T.T
        G00 = self.parts[ks[0]].G_c[0, 0]
        shrink = float(1.0 - sol.want_cov[0, 0] / G00) if G00 > 0 else 0.0
        return LevelEffect(term.group, level, self.names(ks), b, cov, shrink,
                           float(sub.n[mine[idx]].sum()), int(mine.sum()), True,
                           "exact" if self.shared else "gauss_seidel")

    def level_name(self, name: str, level: str | Sequence[str]) -> str:
        """A level as lme4 names it: the parts of an interaction's level joined with ``:``."""
        if isinstance(level, str):
            return level
        factor = self.spec.term(name).factors
        parts = [str(p) for p in level]
        if len(parts) != len(factor):
            raise ValueError(f"a level of {self.spec.term(name).group!r} has {len(factor)} "
                             f"part(s), got {parts}")
        return ":".join(parts)

    def joint(self, stats: GroupStats, covariances: bool = False) -> BlockSolution:
        """The joint BLUP of every level of every term from all of ``stats`` given the model
        (beta, G, sigma^2): what a refresh's ``ranef`` is. Covariances (dense) on request."""
        return self.solve(stats, self.spec.cell_levels(stats.keys),
                          list(range(len(self.parts))), dense=covariances)

    def solve(self, stats: GroupStats, cells: Sequence[tuple[str, ...]], S: Sequence[int], *,
              want: Sequence[tuple[int, str]] = (), dense: bool = False) -> BlockSolution:
        """Solve for every level of the terms ``S`` present in these cells (``cells[i]`` the
        levels of ``stats`` row i), the other terms held at their last modes.

        A block of at most `DENSE_MAX` unknowns (or with ``dense``) is solved densely and gets
        every level's covariance; a larger one by a sparse factorisation. Either way
        ``want_cov`` is the joint covariance, in the centred basis, of the ``want`` levels'
        effects (term, level), laid out in that order.
        """
        spec, parts = self.spec, self.parts
        S = list(S)
        n, mean, C = stats.n, stats.mean, stats.C
        a_cell = np.broadcast_to(self.a, mean.shape)
        c_cell = np.full(len(n), self.c)
        for m, part in enumerate(parts):
            if m in S or not part.ranef:
                continue
            zero = np.zeros(part.q)
            bm = np.array([part.ranef.get(lv, zero)
                           for lv in spec.term_levels(part.term, cells)]).reshape(-1, part.q)
            a_cell = a_cell - bm @ part.B
            c_cell = c_cell - bm @ part.e
        out = BlockSolution(S, {}, {}, {})
        idx_parts = []
        Q = 0
        for k in S:
            q = parts[k].q
            uniq, code = np.unique(np.asarray(spec.term_levels(parts[k].term, cells),
                                              dtype=object), return_inverse=True)
            out.levels[k] = [str(u) for u in uniq]
            out.offsets[k] = Q
            idx_parts.append(Q + q * np.asarray(code).reshape(-1, 1) + np.arange(q))
            Q += q * len(uniq)
        idx = np.concatenate(idx_parts, axis=1)                  # (cells, Qt): unknown of each
        Bs = np.vstack([parts[k].B for k in S])
        zhat = mean @ Bs.T + np.concatenate([parts[k].e - parts[k].zc for k in S])
        rbar = np.einsum("cd,cd->c", mean, a_cell) + c_cell
        BC = np.einsum("qd,cde->cqe", Bs, C)
        Ztr = n[:, None] * zhat * rbar[:, None] + np.einsum("cqe,ce->cq", BC, a_cell)
        ZtZ = n[:, None, None] * zhat[:, :, None] * zhat[:, None, :] + np.einsum(
            "cqe,re->cqr", BC, Bs)
        lams = [parts[k].Lam for k in S for _ in out.levels[k]]
        sel = np.array([out.offsets[k] + parts[k].q * out.levels[k].index(lv) + j
                        for k, lv in want for j in range(parts[k].q)], dtype=np.intp)
        if Q <= DENSE_MAX or dense:
            A = np.zeros((Q, Q))
            np.add.at(A, (idx[:, :, None], idx[:, None, :]), ZtZ)
            r = np.zeros(Q)
            np.add.at(r, idx, Ztr)
            bb, cc = lambda_solve(A[None], r[None], _block_diag(lams), self.sigma2)
            b_c, cov_c = bb[0], cc[0]
            for k in S:
                q, o, L = parts[k].q, out.offsets[k], len(out.levels[k])
                blk = cov_c[o:o + q * L, o:o + q * L].reshape(L, q, L, q)
                diag = blk[np.arange(L), :, np.arange(L), :]
                out.cov[k] = np.einsum("ab,lbc,dc->lad", parts[k].T, diag, parts[k].T)
            out.want_cov = cov_c[np.ix_(sel, sel)] if want else None
        else:
            b_c, out.want_cov = self._sparse(idx, ZtZ, Ztr, Q, lams, sel if want else None)
        for k in S:
            q, o, L = parts[k].q, out.offsets[k], len(out.levels[k])
            out.b[k] = b_c[o:o + q * L].reshape(L, q) @ parts[k].T.T
        return out

    def _sparse(self, idx: NDArray[np.intp], ZtZ: Array, Ztr: Array, Q: int,
                lams: list[Array], sel: NDArray[np.intp] | None) -> tuple[Array, Array | None]:
        """Centred modes of a large block by a sparse factorisation of
        P = Lam' Z'Z Lam + I, and the centred covariance of the unknowns ``sel``."""
        import scipy.sparse as sp
        from scipy.sparse.linalg import splu

        Qt = idx.shape[1]
        rows = np.broadcast_to(idx[:, :, None], (len(idx), Qt, Qt)).ravel()
        cols = np.broadcast_to(idx[:, None, :], (len(idx), Qt, Qt)).ravel()
        A = sp.csc_matrix((ZtZ.ravel(), (rows, cols)), shape=(Q, Q))
        r = np.bincount(idx.ravel(), weights=Ztr.ravel(), minlength=Q)
        Lam = sp.block_diag([sp.csc_matrix(L) for L in lams], format="csc")
        P = (Lam.T @ A @ Lam + sp.identity(Q, format="csc")).tocsc()
        lu = splu(P, permc_spec="MMD_AT_PLUS_A")
        b_c = np.asarray(Lam @ lu.solve(np.asarray(Lam.T @ r).ravel())).ravel()
        if sel is None:
            return b_c, None
        M = np.asarray(Lam.T[:, sel].todense())                    # Lam' E (Q, |sel|)
        return b_c, self.sigma2 * (M.T @ lu.solve(M))


def _block_diag(blocks: Sequence[Array]) -> Array:
    size = sum(b.shape[0] for b in blocks)
    out = np.zeros((size, size))
    i = 0
    for b in blocks:
        q = b.shape[0]
        out[i:i + q, i:i + q] = b
        i += q
    return out


# -- predictions ------------------------------------------------------------------------------


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
