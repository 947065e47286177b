"""Stacked small dense linear algebra: one q x q problem per group, vectorised over groups.

q (the number of random terms) is small, usually 1 to 3, while the number of groups runs to
millions, so the loops here go over q and every step is one numpy operation across all groups.

>>> import numpy as np
>>> A = np.array([[[4.0, 2.0], [2.0, 3.0]]])
>>> L = chol(A)
>>> np.allclose(L @ L.transpose(0, 2, 1), A)
True
>>> np.allclose(A @ solve_lower_t(L, solve_lower(L, np.ones((1, 2, 1)))), 1.0)
True
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


def chol(A: Array) -> Array:
    """Lower Cholesky factors of stacked symmetric positive-definite matrices (G, q, q)."""
    q = A.shape[-1]
    L = np.zeros_like(A)
    for k in range(q):
        s = A[:, k, k] - np.einsum("gi,gi->g", L[:, k, :k], L[:, k, :k])
        L[:, k, k] = np.sqrt(s)
        for i in range(k + 1, q):
            t = A[:, i, k] - np.einsum("gj,gj->g", L[:, i, :k], L[:, k, :k])
            L[:, i, k] = t / L[:, k, k]
    return L


def solve_lower(L: Array, B: Array) -> Array:
    """X with L X = B for stacked lower-triangular L (G, q, q) and B (G, q, m)."""
    q = L.shape[-1]
    X = np.empty_like(B)
    for i in range(q):
        acc = B[:, i, :] - np.einsum("gj,gjm->gm", L[:, i, :i], X[:, :i, :])
        X[:, i, :] = acc / L[:, i, i, None]
    return X


def solve_lower_t(L: Array, B: Array) -> Array:
    """X with L' X = B for stacked lower-triangular L (G, q, q) and B (G, q, m)."""
    q = L.shape[-1]
    X = np.empty_like(B)
    for i in reversed(range(q)):
        acc = B[:, i, :] - np.einsum("gj,gjm->gm", L[:, i + 1 :, i], X[:, i + 1 :, :])
        X[:, i, :] = acc / L[:, i, i, None]
    return X


def psd_factor(D: Array) -> Array:
    """A lower-triangular F with F F' = D for a symmetric positive semi-definite D (q, q).

    Falls back from Cholesky to an LDL'-style factor with zero pivots clipped, so a singular D
    (a variance component on the boundary) still has a factor.
    """
    D = 0.5 * (D + D.T)
    try:
        return np.linalg.cholesky(D)
    except np.linalg.LinAlgError:
        pass
    q = D.shape[0]
    F = np.zeros_like(D)
    scale = max(float(np.max(np.abs(np.diag(D)))), 1e-300)
    for k in range(q):
        s = D[k, k] - F[k, :k] @ F[k, :k]
        if s <= 1e-14 * scale:
            continue
        F[k, k] = np.sqrt(s)
        for i in range(k + 1, q):
            F[i, k] = (D[i, k] - F[i, :k] @ F[k, :k]) / F[k, k]
    return F
