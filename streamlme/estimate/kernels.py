"""The two per-group passes behind the profiled deviance and its gradient, compiled or in numpy.

`pls` defines the mathematics; this module runs its per-group part. A deviance evaluation is one
pass over the groups (factor P_j, form RZXy_j, accumulate sum_j RZXy_j'RZXy_j and log|P_j|), the
gradient a second pass (the three sums of `pls`'s docstring). With numba each pass is one
compiled loop over the groups — written out in scalars for q = 1 and q = 2, the common models,
so a group's blocks stay in registers, and with small loops for larger q. The numpy version
makes a dozen stacked passes over memory and is kept as the fallback (no numba, or
``STREAMLME_KERNELS=numpy``) and as the reference the compiled loops are tested against.

Measured at G = 1e5, p = 5, one thread, REML (ms per deviance pass / gradient pass): q = 1
2.0 / 1.6 (numpy 8 / 13), q = 2 3.5 / 4.1 (numpy 15 / 24), q = 3 14 / 23 (numpy 80 / 170); at
G = 1e6, q = 2: 35 / 41. The first call
compiles for about 3 s; numba caches the result on disk (``cache=True``), after which loading
takes about 0.15 s — `warm_up` does either ahead of time.

Sums over groups are accumulated in blocks of `BLOCK` groups and the block totals added, so the
rounding error grows like log G rather than G, as numpy's pairwise sums do.

>>> import numpy as np
>>> ZtZ = np.array([[[2.0, 1.0], [1.0, 3.0]], [[1.0, 0.0], [0.0, 1.0]]])
>>> ZtXy = np.array([[[2.0, 1.0], [1.0, 0.5]], [[1.0, 2.0], [0.0, 1.0]]])
>>> a = deviance_pass(ZtZ, ZtXy, np.eye(2), backend="numpy")
>>> b = deviance_pass(ZtZ, ZtXy, np.eye(2))
>>> all(np.allclose(x, y, rtol=1e-14) for x, y in zip(a, b))
True
"""

from __future__ import annotations

import os

import numpy as np
from numpy.typing import NDArray

from streamlme.estimate.linalg import chol, solve_lower, solve_lower_t

Array = NDArray[np.float64]

#: Groups summed per block before the block total joins the grand total.
BLOCK = 256

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
    numba = None


def backend() -> str:
    """The implementation `deviance_pass` and `gradient_pass` use by default."""
    choice = os.environ.get("STREAMLME_KERNELS", "numba").lower()
    if choice not in ("numba", "numpy"):
        raise ValueError(f"STREAMLME_KERNELS={choice!r}: use 'numba' or 'numpy'")
    return "numba" if choice == "numba" and numba is not None else "numpy"


def deviance_pass(
    ZtZ: Array, ZtXy: Array, Lam: Array, backend: str | None = None, store: bool = True
) -> tuple[Array | None, Array | None, Array, float]:
    """(L, RZXy, sum_j RZXy_j'RZXy_j, sum_j log|L_j|^2) at relative factor Lam.

    L (G, q, q) are the lower Cholesky factors of P_j = Lam'Z_j'Z_j Lam + I and
    RZXy_j = L_j^-1 Lam'Z_j'[X_j y_j] (G, q, p + 1); with ``store=False`` the compiled q <= 2
    kernels skip writing them (they return None), which is all an optimiser step needs. A factor
    that is not positive definite shows as a non-finite log-determinant.
    """
    q = ZtZ.shape[1]
    if _use_numba(backend):
        if q in (1, 2):
            kernel = _deviance_q1 if q == 1 else _deviance_q2
            L, RZXy, SS, logdet = kernel(_c(ZtZ), _c(ZtXy), _c(Lam), store)
            return (L, RZXy, SS, logdet) if store else (None, None, SS, logdet)
        return _deviance_numba(_c(ZtZ), _c(ZtXy), _c(Lam))
    return _deviance_numpy(ZtZ, ZtXy, Lam)


def gradient_pass(
    ZtZ: Array, ZtXy: Array, L: Array | None, RZXy: Array | None, Lam: Array, beta: Array,
    R_X: Array | None, backend: str | None = None,
) -> tuple[Array, Array, Array]:
    """The gradient's three sums over groups, each q x q:

    sum_j Z_j'Z_j Lam P_j^-1,   sum_j Z_j'e_j u_j',   sum_j K_j K_j' (K_j = Q_j R_X^-1)

    the last only for REML (``R_X`` given), else zeros; `pls.gradient` scales and combines them.
    L and RZXy are `deviance_pass`'s at the same Lam, or None to have them recomputed.
    """
    q = ZtZ.shape[1]
    numba_ = _use_numba(backend)
    reml = R_X is not None
    if numba_ and q in (1, 2):
        kernel = _gradient_q1 if q == 1 else _gradient_q2
        R = _c(R_X) if reml else np.zeros((1, 1))
        return kernel(_c(ZtZ), _c(ZtXy), _c(Lam), _c(beta), R, reml)
    if L is None or RZXy is None:
        L, RZXy, _, _ = deviance_pass(ZtZ, ZtXy, Lam, backend=backend)
    if numba_:
        R = _c(R_X) if reml else np.zeros((1, 1))
        return _gradient_numba(_c(ZtZ), _c(ZtXy), _c(L), _c(RZXy), _c(Lam), _c(beta), R, reml)
    return _gradient_numpy(ZtZ, ZtXy, L, RZXy, Lam, beta, R_X)


def warm_up() -> float:
    """Compile (or load from numba's cache) the kernels for every q; seconds taken. Call before timing."""
    import time

    t0 = time.perf_counter()
    if numba is not None:
        for q in (1, 2, 3):
            ZtZ = np.tile(np.eye(q), (2, 1, 1))
            ZtXy = np.ones((2, q, 3))
            L, RZXy, _, _ = deviance_pass(ZtZ, ZtXy, np.eye(q), backend="numba")
            gradient_pass(ZtZ, ZtXy, L, RZXy, np.eye(q), np.zeros(2), np.eye(2), "numba")
    return time.perf_counter() - t0


def _use_numba(choice: str | None) -> bool:
    choice = choice or backend()
    if choice == "numba" and numba is None:
        raise RuntimeError("the numba backend was asked for but numba is not installed; "
                           "pip install numba, or use backend='numpy'")
    return choice == "numba"


def _c(a: Array) -> Array:
    return np.ascontiguousarray(a, dtype=np.float64)


# -- numpy: stacked over groups, one operation per matrix element ----------------------------


def _deviance_numpy(ZtZ: Array, ZtXy: Array, Lam: Array) -> tuple[Array, Array, Array, float]:
    q = ZtZ.shape[1]
    P = np.einsum("ai,gab,bj->gij", Lam, ZtZ, Lam) + np.eye(q)
    with np.errstate(invalid="ignore", divide="ignore"):
        L = chol(P)
        RZXy = solve_lower(L, np.einsum("ai,gam->gim", Lam, ZtXy))
        logdet = 2.0 * float(np.sum(np.log(np.diagonal(L, axis1=1, axis2=2))))
    SS = np.einsum("gim,gin->mn", RZXy, RZXy)
    return L, RZXy, SS, logdet


def _gradient_numpy(
    ZtZ: Array, ZtXy: Array, L: Array, RZXy: Array, Lam: Array, beta: Array, R_X: Array | None
) -> tuple[Array, Array, Array]:
    G, q = L.shape[0], Lam.shape[0]
    ZtX, Zty = ZtXy[:, :, :-1], ZtXy[:, :, -1]
    RZX = RZXy[:, :, :-1]
    u = solve_lower_t(L, (RZXy[:, :, -1] - RZX @ beta)[:, :, None])[:, :, 0]
    b = u @ Lam.T
    Zte = Zty - ZtX @ beta - np.einsum("gab,gb->ga", ZtZ, b)
    e_u = np.einsum("ga,gb->ab", Zte, u)
    # P_j^-1 Lambda' by two triangular solves
    Pinv_LamT = solve_lower_t(L, solve_lower(L, np.broadcast_to(Lam.T, (G, q, q))))
    ZtZ_LamPinv = np.einsum("gab,gcb->ac", ZtZ, Pinv_LamT)
    KK = np.zeros((q, q))
    if R_X is not None:
        # Q_j = Z'X - Z'Z Lambda L^-T R_ZX;  K_j = Q_j R_X^-1 so that Q S^-1 Q' = K K'
        Q = ZtX - np.einsum("gab,gbm->gam", ZtZ,
                            np.einsum("ab,gbm->gam", Lam, solve_lower_t(L, RZX)))
        p = Q.shape[2]
        K = np.linalg.solve(R_X.T, Q.reshape(G * q, p).T).T.reshape(G, q, p)
        KK = np.einsum("gam,gbm->ab", K, K)
    return ZtZ_LamPinv, e_u, KK


# -- numba: one loop over groups, a group's blocks in scratch arrays ---------------------------

if numba is not None:

    @numba.njit(cache=True, nogil=True, inline="always")
    def _drain_upper(SS, blk):
        """SS += blk on the upper triangle and clear blk: a block's partial sums join the total
        only once per BLOCK groups, so rounding grows like log G rather than G."""
        m = SS.shape[0]
        for c in range(m):
            for d in range(c, m):
                SS[c, d] += blk[c, d]
                blk[c, d] = 0.0

    @numba.njit(cache=True, nogil=True, inline="always")
    def _mirror_upper(SS):
        """Copy the upper triangle into the lower one."""
        m = SS.shape[0]
        for c in range(m):
            for d in range(c):
                SS[c, d] = SS[d, c]

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def _deviance_numba(ZtZ, ZtXy, Lam):
        G, q, m = ZtXy.shape
        L = np.zeros((G, q, q))
        RZXy = np.empty((G, q, m))
        SS, blk = np.zeros((m, m)), np.zeros((m, m))
        M = np.empty((q, q))
        B = np.empty((q, m))
        logdet, prod = 0.0, 1.0
        for g in range(G):
            # M = Z'Z Lam, then P = Lam'M + I, factored in place into L[g]
            for a in range(q):
                for j in range(q):
                    s = 0.0
                    for b in range(q):
                        s += ZtZ[g, a, b] * Lam[b, j]
                    M[a, j] = s
            for k in range(q):
                for i in range(k, q):
                    s = 1.0 if i == k else 0.0
                    for a in range(q):
                        s += Lam[a, i] * M[a, k]
                    for j in range(k):
                        s -= L[g, i, j] * L[g, k, j]
                    if i == k:
                        L[g, k, k] = np.sqrt(s)
                    else:
                        L[g, i, k] = s / L[g, k, k]
                # log|L_j| as a running product whose log is taken only when it grows large:
                # each L_j[k, k] >= 1 in exact arithmetic (P_j >= I), so it cannot underflow, and
                # one log per many groups replaces one per element. NaN and 0 reach the result.
                if prod > 1e150:
                    logdet += np.log(prod)
                    prod = 1.0
                prod *= L[g, k, k]
            # RZXy = L^-1 Lam' Z'[X y]
            for i in range(q):
                for c in range(m):
                    s = 0.0
                    for a in range(q):
                        s += Lam[a, i] * ZtXy[g, a, c]
                    B[i, c] = s
            for i in range(q):
                for c in range(m):
                    s = B[i, c]
                    for j in range(i):
                        s -= L[g, i, j] * RZXy[g, j, c]
                    RZXy[g, i, c] = s / L[g, i, i]
            for c in range(m):
                for d in range(c, m):
                    s = 0.0
                    for i in range(q):
                        s += RZXy[g, i, c] * RZXy[g, i, d]
                    blk[c, d] += s
            if (g + 1) % BLOCK == 0 or g == G - 1:
                _drain_upper(SS, blk)
        _mirror_upper(SS)
        return L, RZXy, SS, 2.0 * (logdet + np.log(prod))

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def _gradient_numba(ZtZ, ZtXy, L, RZXy, Lam, beta, R_X, reml):
        G, q, m = ZtXy.shape
        p = m - 1
        out = np.zeros((3, q, q))
        blk = np.zeros((3, q, q))
        u, b, Zte = np.empty(q), np.empty(q), np.empty(q)
        W = np.empty((q, q))
        V = np.empty((q, p))
        LV = np.empty((q, p))
        Q = np.empty((q, p))
        for g in range(G):
            # u = L^-T (c_u - R_ZX beta), b = Lam u, Z'e = Z'y - Z'X beta - Z'Z b
            for i in range(q - 1, -1, -1):
                s = RZXy[g, i, p]
                for c in range(p):
                    s -= RZXy[g, i, c] * beta[c]
                for j in range(i + 1, q):
                    s -= L[g, j, i] * u[j]
                u[i] = s / L[g, i, i]
            for a in range(q):
                s = 0.0
                for j in range(q):
                    s += Lam[a, j] * u[j]
                b[a] = s
            for a in range(q):
                s = ZtXy[g, a, p]
                for c in range(p):
                    s -= ZtXy[g, a, c] * beta[c]
                for j in range(q):
                    s -= ZtZ[g, a, j] * b[j]
                Zte[a] = s
            for a in range(q):
                for j in range(q):
                    blk[1, a, j] += Zte[a] * u[j]
            # W = P^-1 Lam' = L^-T L^-1 Lam', then sum Z'Z W'
            for c in range(q):
                for i in range(q):
                    s = Lam[c, i]
                    for j in range(i):
                        s -= L[g, i, j] * W[j, c]
                    W[i, c] = s / L[g, i, i]
                for i in range(q - 1, -1, -1):
                    s = W[i, c]
                    for j in range(i + 1, q):
                        s -= L[g, j, i] * W[j, c]
                    W[i, c] = s / L[g, i, i]
            for a in range(q):
                for c in range(q):
                    s = 0.0
                    for j in range(q):
                        s += ZtZ[g, a, j] * W[c, j]
                    blk[0, a, c] += s
            if reml:
                # V = L^-T R_ZX; Q = Z'X - Z'Z Lam V; K = Q R_X^-1 (in Q's place)
                for c in range(p):
                    for i in range(q - 1, -1, -1):
                        s = RZXy[g, i, c]
                        for j in range(i + 1, q):
                            s -= L[g, j, i] * V[j, c]
                        V[i, c] = s / L[g, i, i]
                for j in range(q):
                    for c in range(p):
                        s = 0.0
                        for k in range(q):
                            s += Lam[j, k] * V[k, c]
                        LV[j, c] = s
                for a in range(q):
                    for c in range(p):
                        s = ZtXy[g, a, c]
                        for j in range(q):
                            s -= ZtZ[g, a, j] * LV[j, c]
                        Q[a, c] = s
                for a in range(q):
                    for c in range(p):
                        s = Q[a, c]
                        for k in range(c):
                            s -= Q[a, k] * R_X[k, c]
                        Q[a, c] = s / R_X[c, c]
                for a in range(q):
                    for j in range(q):
                        s = 0.0
                        for c in range(p):
                            s += Q[a, c] * Q[j, c]
                        blk[2, a, j] += s
            if (g + 1) % BLOCK == 0 or g == G - 1:
                for t in range(3):
                    for a in range(q):
                        for j in range(q):
                            out[t, a, j] += blk[t, a, j]
                            blk[t, a, j] = 0.0
        return out[0], out[1], out[2]

    # q = 1 and q = 2 (random intercept; intercept and slope: the common models) are written out
    # in scalars, so a group's blocks stay in registers. Their gradient pass does not read L_j or
    # RZXy_j back: it refactors P_j (a few flops) and uses u_j = W_j e_j, Q_j = Z'X_j - N_j Lam'Z'X_j
    # with W_j = P_j^-1 Lam', N_j = Z'Z_j W_j', which are the module docstring's quantities
    # rearranged; so the optimiser's deviance pass need not store the factors at all, and a pass
    # streams Z'Z and Z'[X y] (16 floats a group for p = 5) from memory and nothing else.

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def _deviance_q1(ZtZ, ZtXy, Lam, store):
        G, _, m = ZtXy.shape
        Gs = G if store else 0
        L = np.empty((Gs, 1, 1))
        RZXy = np.empty((Gs, 1, m))
        SS, blk = np.zeros((m, m)), np.zeros((m, m))
        r = np.empty(m)
        lam = Lam[0, 0]
        logdet, prod = 0.0, 1.0
        for g in range(G):
            a = np.sqrt(1.0 + lam * (ZtZ[g, 0, 0] * lam))
            if prod > 1e150:  # see _deviance_numba
                logdet += np.log(prod)
                prod = 1.0
            prod *= a
            s = lam / a
            for k in range(m):
                r[k] = s * ZtXy[g, 0, k]
            if store:
                L[g, 0, 0] = a
                for k in range(m):
                    RZXy[g, 0, k] = r[k]
            for k in range(m):
                for j in range(k, m):
                    blk[k, j] += r[k] * r[j]
            if (g + 1) % BLOCK == 0 or g == G - 1:
                _drain_upper(SS, blk)
        _mirror_upper(SS)
        return L, RZXy, SS, 2.0 * (logdet + np.log(prod))

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def _gradient_q1(ZtZ, ZtXy, Lam, beta, R_X, reml):
        G, _, m = ZtXy.shape
        p = m - 1
        out = np.zeros((3, 1, 1))
        blk = np.zeros(3)
        lam = Lam[0, 0]
        K = np.empty(p)
        R_inv_diag = np.empty(p)
        if reml:
            for k in range(p):
                R_inv_diag[k] = 1.0 / R_X[k, k]
        for g in range(G):
            z = ZtZ[g, 0, 0]
            ia = 1.0 / np.sqrt(1.0 + lam * (z * lam))
            w = (lam * ia) * ia
            n = z * w
            e = ZtXy[g, 0, p]
            for k in range(p):
                e -= ZtXy[g, 0, k] * beta[k]
            u = w * e
            e -= z * (lam * u)
            blk[0] += n
            blk[1] += e * u
            if reml:
                t = n * lam
                for k in range(p):
                    x = ZtXy[g, 0, k]
                    v = x - t * x
                    for j in range(k):
                        v -= K[j] * R_X[j, k]
                    K[k] = v * R_inv_diag[k]
                    blk[2] += K[k] * K[k]
            if (g + 1) % BLOCK == 0 or g == G - 1:
                for t in range(3):
                    out[t, 0, 0] += blk[t]
                    blk[t] = 0.0
        return out[0], out[1], out[2]

    @numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
    def _factor_q2(z00, z01, z10, z11, l00, l01, l10, l11):
        """(a, c, d) with [[a, 0], [c, d]] the Cholesky factor of Lam'Z'Z Lam + I."""
        m00, m01 = z00 * l00 + z01 * l10, z00 * l01 + z01 * l11
        m10, m11 = z10 * l00 + z11 * l10, z10 * l01 + z11 * l11
        a = np.sqrt(1.0 + (l00 * m00 + l10 * m10))
        c = (l01 * m00 + l11 * m10) / a
        d = np.sqrt(1.0 + (l01 * m01 + l11 * m11) - c * c)
        return a, c, d

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def _deviance_q2(ZtZ, ZtXy, Lam, store):
        G, _, m = ZtXy.shape
        Gs = G if store else 0
        L = np.empty((Gs, 2, 2))
        RZXy = np.empty((Gs, 2, m))
        SS, blk = np.zeros((m, m)), np.zeros((m, m))
        r0, r1 = np.empty(m), np.empty(m)
        l00, l01, l10, l11 = Lam[0, 0], Lam[0, 1], Lam[1, 0], Lam[1, 1]
        logdet, prod = 0.0, 1.0
        for g in range(G):
            a, c, d = _factor_q2(ZtZ[g, 0, 0], ZtZ[g, 0, 1], ZtZ[g, 1, 0], ZtZ[g, 1, 1],
                                 l00, l01, l10, l11)
            f = a * d
            if f > 1e100 or prod > 1e150:  # see _deviance_numba
                logdet += np.log(prod)
                prod = 1.0
            prod *= f
            # divisions become products with reciprocals: a divide costs several multiplies
            ia, id_ = 1.0 / a, 1.0 / d
            for k in range(m):
                x0, x1 = ZtXy[g, 0, k], ZtXy[g, 1, k]
                r0[k] = (l00 * x0 + l10 * x1) * ia
                r1[k] = ((l01 * x0 + l11 * x1) - c * r0[k]) * id_
            if store:
                L[g, 0, 0], L[g, 0, 1], L[g, 1, 0], L[g, 1, 1] = a, 0.0, c, d
                for k in range(m):
                    RZXy[g, 0, k], RZXy[g, 1, k] = r0[k], r1[k]
            for k in range(m):
                for j in range(k, m):
                    blk[k, j] += r0[k] * r0[j] + r1[k] * r1[j]
            if (g + 1) % BLOCK == 0 or g == G - 1:
                _drain_upper(SS, blk)
        _mirror_upper(SS)
        return L, RZXy, SS, 2.0 * (logdet + np.log(prod))

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def _gradient_q2(ZtZ, ZtXy, Lam, beta, R_X, reml):
        G, _, m = ZtXy.shape
        p = m - 1
        out = np.zeros((3, 2, 2))
        blk = np.zeros(11)
        l00, l01, l10, l11 = Lam[0, 0], Lam[0, 1], Lam[1, 0], Lam[1, 1]
        K0, K1 = np.empty(p), np.empty(p)
        R_inv_diag = np.empty(p)
        if reml:
            for k in range(p):
                R_inv_diag[k] = 1.0 / R_X[k, k]
        for g in range(G):
            z00, z01, z10, z11 = ZtZ[g, 0, 0], ZtZ[g, 0, 1], ZtZ[g, 1, 0], ZtZ[g, 1, 1]
            a, c, d = _factor_q2(z00, z01, z10, z11, l00, l01, l10, l11)
            ia, id_ = 1.0 / a, 1.0 / d
            # W = P^-1 Lam' column by column (two triangular solves); N = Z'Z W'
            v0 = l00 * ia
            v1 = (l01 - c * v0) * id_
            w10 = v1 * id_
            w00 = (v0 - c * w10) * ia
            v0 = l10 * ia
            v1 = (l11 - c * v0) * id_
            w11 = v1 * id_
            w01 = (v0 - c * w11) * ia
            n00, n01 = z00 * w00 + z01 * w01, z00 * w10 + z01 * w11
            n10, n11 = z10 * w00 + z11 * w01, z10 * w10 + z11 * w11
            blk[0] += n00
            blk[1] += n01
            blk[2] += n10
            blk[3] += n11
            # e = Z'y - Z'X beta; u = W e; Z'e (the residual's) = e - Z'Z Lam u
            e0, e1 = ZtXy[g, 0, p], ZtXy[g, 1, p]
            for k in range(p):
                e0 -= ZtXy[g, 0, k] * beta[k]
                e1 -= ZtXy[g, 1, k] * beta[k]
            u0, u1 = w00 * e0 + w01 * e1, w10 * e0 + w11 * e1
            b0, b1 = l00 * u0 + l01 * u1, l10 * u0 + l11 * u1
            e0 -= z00 * b0 + z01 * b1
            e1 -= z10 * b0 + z11 * b1
            blk[4] += e0 * u0
            blk[5] += e0 * u1
            blk[6] += e1 * u0
            blk[7] += e1 * u1
            if reml:
                # Q = (I - N Lam') Z'X, then K = Q R_X^-1 row by row
                t00, t01 = n00 * l00 + n01 * l01, n00 * l10 + n01 * l11
                t10, t11 = n10 * l00 + n11 * l01, n10 * l10 + n11 * l11
                for k in range(p):
                    x0, x1 = ZtXy[g, 0, k], ZtXy[g, 1, k]
                    s0 = x0 - (t00 * x0 + t01 * x1)
                    s1 = x1 - (t10 * x0 + t11 * x1)
                    for j in range(k):
                        s0 -= K0[j] * R_X[j, k]
                        s1 -= K1[j] * R_X[j, k]
                    K0[k] = s0 * R_inv_diag[k]
                    K1[k] = s1 * R_inv_diag[k]
                    blk[8] += K0[k] * K0[k]
                    blk[9] += K0[k] * K1[k]
                    blk[10] += K1[k] * K1[k]
            if (g + 1) % BLOCK == 0 or g == G - 1:
                for t in range(2):
                    for i in range(2):
                        for j in range(2):
                            out[t, i, j] += blk[4 * t + 2 * i + j]
                out[2, 0, 0] += blk[8]
                out[2, 0, 1] += blk[9]
                out[2, 1, 1] += blk[10]
                blk[:] = 0.0
        out[2, 1, 0] = out[2, 0, 1]
        return out[0], out[1], out[2]

else:  # pragma: no cover
    _deviance_numba = _gradient_numba = _deviance_q1 = _gradient_q1 = None
    _drain_upper = _mirror_upper = None
    _deviance_q2 = _gradient_q2 = _factor_q2 = None
