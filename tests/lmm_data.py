"""Simulated grouped data and dense reference formulas for the estimation tests.

The dense formulas build each group's V_j = Z_j G Z_j' + sigma^2 I from raw rows, the textbook way,
so they share no code and no algebra with the sufficient-statistics engine they check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamlme import GroupStats, ModelSpec


@dataclass
class Data:
    groups: np.ndarray      # int group codes
    X: np.ndarray           # (N, p) fixed design, intercept column first when present
    Z: np.ndarray           # (N, q) random design
    y: np.ndarray
    spec: ModelSpec
    W: np.ndarray           # the statistics' columns, spec.columns order

    def stats(self) -> GroupStats:
        return GroupStats.from_rows(self.groups, self.W)

    def shifted(self, dy: float, dx: float) -> Data:
        """The same data with y - dy and the covariate x - dx (an exact reparametrisation)."""
        W = self.W.copy()
        W[:, 0] -= dx
        W[:, -1] -= dy
        X, Z = self.X.copy(), self.Z.copy()
        X[:, 1] -= dx
        if Z.shape[1] > 1:
            Z[:, 1] -= dx
        return Data(self.groups, X, Z, self.y - dy, self.spec, W)


def simulate(
    sizes: np.ndarray, *, slope: bool, covariance: str = "unstructured", seed: int = 0,
    y_offset: float = 0.0, x_mean: float = 0.0, x_sd: float = 1.0, n_extra: int = 1,
) -> Data:
    """y = y_offset + 2 + 0.5 (x - x_mean) + 0.3 v + b0 + b1 (x - x_mean) + e, e ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(len(sizes)), sizes)
    N = len(g)
    x = x_mean + x_sd * rng.normal(size=N)
    extra = rng.normal(size=(N, n_extra))
    G_true = np.array([[1.5, 0.4], [0.4, 0.6]]) if slope else np.array([[1.5]])
    b = rng.multivariate_normal(np.zeros(len(G_true)), G_true, size=len(sizes))
    xc = x - x_mean
    y = y_offset + 2.0 + 0.5 * xc + extra @ np.full(n_extra, 0.3) + b[g, 0] + rng.normal(size=N)
    if slope:
        y += b[g, 1] * xc
    names = ["x"] + [f"v{k}" for k in range(n_extra)]
    spec = ModelSpec("y", ["1", *names], ["1", "x"] if slope else ["1"], "g",
                     covariance=covariance)
    X = np.column_stack([np.ones(N), x, extra])
    Z = X[:, :2] if slope else X[:, :1]
    return Data(g, X, Z, y, spec, np.column_stack([x, extra, y]))


def dense_criterion(d: Data, beta: np.ndarray, G: np.ndarray, sigma2: float, reml: bool) -> float:
    """lme4's criterion at (beta, G, sigma^2) from raw rows: -2 log L (ML) or -2 log L_R (REML)."""
    N, p = d.X.shape
    total, XtVinvX = 0.0, np.zeros((p, p))
    for j in np.unique(d.groups):
        rows = d.groups == j
        Zj, Xj = d.Z[rows], d.X[rows]
        V = Zj @ G @ Zj.T + sigma2 * np.eye(rows.sum())
        r = d.y[rows] - Xj @ beta
        _sign, logdet = np.linalg.slogdet(V)
        total += logdet + r @ np.linalg.solve(V, r)
        XtVinvX += Xj.T @ np.linalg.solve(V, Xj)
    if reml:
        return float(total + np.linalg.slogdet(XtVinvX)[1] + (N - p) * np.log(2 * np.pi))
    return float(total + N * np.log(2 * np.pi))


def dense_blups(d: Data, beta: np.ndarray, G: np.ndarray, sigma2: float) -> dict[str, np.ndarray]:
    """b_j = G Z_j' V_j^-1 (y_j - X_j beta) per group, keyed like GroupStats keys."""
    out = {}
    for j in np.unique(d.groups):
        rows = d.groups == j
        Zj = d.Z[rows]
        V = Zj @ G @ Zj.T + sigma2 * np.eye(rows.sum())
        out[str(j)] = G @ Zj.T @ np.linalg.solve(V, d.y[rows] - d.X[rows] @ beta)
    return out
