"""EM for the linear mixed model (maximum likelihood), from group statistics.

The seed algorithm (Laird and Ware 1982; Dempster, Rubin and Tsutakawa 1981): treat the random
effects as missing data. With the current (beta, G, sigma^2) and Lambda Lambda' = G / sigma^2:

    E-step:  P_j = Lambda' Z_j'Z_j Lambda + I
             b_j = Lambda P_j^-1 Lambda' Z_j'(y_j - X_j beta)      V_j = sigma^2 Lambda P_j^-1 Lambda'
    M-step:  beta    = (X'X)^-1 (X'y - sum_j X_j'Z_j b_j)
             sigma^2 = (sum_j |y_j - X_j beta - Z_j b_j|^2 + tr(Z_j'Z_j V_j)) / N
             G       = (1/J) sum_j (b_j b_j' + V_j)        (its diagonal, for a diagonal G)

Every quantity is a cross-product the statistics hold, so one iteration is one pass over groups.
EM climbs the likelihood monotonically but slowly near the optimum; it is here to compare with the
profiled-deviance fit and for users who want to own the iteration (see ``callback``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from streamlme.estimate.crossprod import CrossProducts, cross_products
from streamlme.estimate.linalg import chol, psd_factor, solve_lower, solve_lower_t
from streamlme.estimate.pls import LOG_2PI, evaluate, gradient
from streamlme.estimate.result import FitResult, OptSummary
from streamlme.estimate.theta import Parametrisation
from streamlme.spec import ModelSpec
from streamlme.stats import GroupStats

Array = NDArray[np.float64]


@dataclass
class EMState:
    """One EM iterate, in the centred basis of the cross-products."""

    iteration: int
    beta: Array
    G: Array
    sigma2: float
    deviance: float


#: A callback sees each iterate and returns True to stop.
Callback = Callable[[EMState], bool]


def fit_em(
    stats: GroupStats,
    spec: ModelSpec,
    *,
    start: FitResult | Mapping[str, Any] | None = None,
    tol: float | None = 1e-10,
    param_tol: float | None = None,
    max_iter: int = 10_000,
    callback: Callback | None = None,
    ranef: bool = True,
) -> FitResult:
    """Maximum-likelihood fit by EM.

    Stops when the deviance changes by less than ``tol`` (relative; None turns this rule off),
    or every parameter by less than ``param_tol`` (relative, if given), or after ``max_iter``
    iterations, or when ``callback(state)`` returns True.
    """
    cp = cross_products(stats, spec)
    t0 = time.perf_counter()
    beta, G, sigma2 = _start(cp, start)
    diagonal = spec.covariance == "diagonal"
    dev_old = _deviance(cp, beta, G, sigma2)
    converged, message, it = False, "max_iter reached", 0
    for it in range(1, max_iter + 1):
        beta_new, G_new, sigma2_new = em_step(cp, beta, G, sigma2, diagonal)
        dev = _deviance(cp, beta_new, G_new, sigma2_new)
        param_change = _rel_change((beta, G, sigma2), (beta_new, G_new, sigma2_new))
        beta, G, sigma2 = beta_new, G_new, sigma2_new
        if callback is not None and callback(EMState(it, beta, G, sigma2, dev)):
            converged, message = True, "stopped by callback"
            break
        if tol is not None and abs(dev_old - dev) <= tol * max(abs(dev), 1.0):
            converged, message = True, "deviance change below tol"
            break
        if param_tol is not None and param_change <= param_tol:
            converged, message = True, "parameter change below param_tol"
            break
        dev_old = dev
    return _result(cp, spec, beta, G, sigma2, it, converged, message, time.perf_counter() - t0,
                   start is not None, ranef)


def em_step(
    cp: CrossProducts, beta: Array, G: Array, sigma2: float, diagonal: bool
) -> tuple[Array, Array, float]:
    """One E-step and M-step; returns the new (beta, G, sigma^2), centred basis."""
    p, n_groups = cp.p, cp.n_groups
    Lam = psd_factor(G / sigma2)
    b, PinvLamT, _ = _e_step(cp, Lam, beta)
    V = sigma2 * np.einsum("ab,gbc->gac", Lam, PinvLamT)
    XtX, Xty = cp.XyXy[:p, :p], cp.XyXy[:p, p]
    beta = np.linalg.solve(XtX, Xty - np.einsum("gam,ga->m", cp.ZtX, b))
    w = np.append(-beta, 1.0)
    rss = (w @ cp.XyXy @ w - 2.0 * np.einsum("ga,gam,m->", b, cp.ZtXy, w)
           + np.einsum("ga,gab,gb->", b, cp.ZtZ, b))
    sigma2 = float((rss + np.einsum("gab,gba->", cp.ZtZ, V)) / cp.N)
    G = (np.einsum("ga,gb->ab", b, b) + V.sum(axis=0)) / n_groups
    if diagonal:
        G_user = np.diag(np.diag(cp.T_Z @ G @ cp.T_Z.T))
        T_inv = np.linalg.inv(cp.T_Z)
        G = T_inv @ G_user @ T_inv.T
    return beta, 0.5 * (G + G.T), sigma2


def _e_step(cp: CrossProducts, Lam: Array, beta: Array) -> tuple[Array, Array, Array]:
    q = cp.q
    P = np.einsum("ai,gab,bj->gij", Lam, cp.ZtZ, Lam) + np.eye(q)
    L = chol(P)
    LamT = np.broadcast_to(Lam.T, (cp.n_groups, q, q))
    PinvLamT = solve_lower_t(L, solve_lower(L, LamT))
    Ztr = cp.Zty - cp.ZtX @ beta
    b = np.einsum("ab,gbc,gc->ga", Lam, PinvLamT, Ztr)
    return b, PinvLamT, L


def _deviance(cp: CrossProducts, beta: Array, G: Array, sigma2: float) -> float:
    """-2 log-likelihood at (beta, G, sigma^2), not profiled."""
    p, q = cp.p, cp.q
    Lam = psd_factor(G / sigma2)
    P = np.einsum("ai,gab,bj->gij", Lam, cp.ZtZ, Lam) + np.eye(q)
    L = chol(P)
    c = solve_lower(L, np.einsum("ai,ga->gi", Lam, cp.Zty - cp.ZtX @ beta)[:, :, None])[:, :, 0]
    w = np.append(-beta, 1.0)
    quad = w @ cp.XyXy @ w - float(np.sum(c * c))
    logdet = 2.0 * float(np.sum(np.log(np.diagonal(L, axis1=1, axis2=2))))
    del p
    return float(cp.N * (LOG_2PI + np.log(sigma2)) + logdet + quad / sigma2)


def _rel_change(old: tuple[Array, Array, float], new: tuple[Array, Array, float]) -> float:
    out = 0.0
    for a, b in zip(old, new):
        a, b = np.asarray(a, float), np.asarray(b, float)
        out = max(out, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))))
    return out


def _start(
    cp: CrossProducts, start: FitResult | Mapping[str, Any] | None
) -> tuple[Array, Array, float]:
    p = cp.p
    T_X_inv, T_Z_inv = np.linalg.inv(cp.T_X), np.linalg.inv(cp.T_Z)
    if start is not None:
        get = (lambda k: getattr(start, k)) if isinstance(start, FitResult) else start.__getitem__
        beta = np.asarray(
            list(get("beta").values()) if isinstance(get("beta"), dict) else get("beta"), float
        ).copy()
        if cp.intercept_fixed is not None:
            beta[cp.intercept_fixed] -= cp.r_y
        G = np.asarray(get("G"), float)
        sigma2 = float(get("sigma2"))
        return T_X_inv @ beta, T_Z_inv @ G @ T_Z_inv.T, sigma2
    XtX, Xty = cp.XyXy[:p, :p], cp.XyXy[:p, p]
    beta = np.linalg.solve(XtX, Xty)
    w = np.append(-beta, 1.0)
    sigma2 = float(w @ cp.XyXy @ w / cp.N)
    # lme4's start, Lambda = I in the user's basis
    return beta, sigma2 * T_Z_inv @ T_Z_inv.T, sigma2


def _result(
    cp: CrossProducts, spec: ModelSpec, beta: Array, G: Array, sigma2: float, iterations: int,
    converged: bool, message: str, seconds: float, warm: bool, ranef: bool,
) -> FitResult:
    par = Parametrisation(cp.q, spec.covariance, cp.T_Z, cp.z_scale)
    G_user = cp.T_Z @ G @ cp.T_Z.T
    Lam_user = psd_factor(G_user / sigma2)
    theta = (Lam_user[par.rows, par.cols] if spec.covariance == "unstructured"
             else np.sqrt(np.maximum(np.diag(G_user) / sigma2, 0.0)))
    Lam_c = psd_factor(G / sigma2)
    st = evaluate(cp, Lam_c, reml=False)
    Rinv = np.linalg.inv(st.R_X)
    beta_cov = cp.T_X @ (sigma2 * Rinv @ Rinv.T) @ cp.T_X.T
    deviance = _deviance(cp, beta, G, sigma2)
    opt = OptSummary(
        optimizer="EM", theta_start=[], theta=theta.tolist(), n_evals=iterations,
        iterations=iterations, converged=converged, message=message,
        # EM has no gradient of its own: report the ML deviance's, with respect to the relative
        # factor, at EM's answer (how far from the optimum it stopped); NaN broke --json
        gradient_norm=float(np.max(np.abs(gradient(cp, st)))),
        seconds=seconds, warm_start=warm,
    )
    res = FitResult(
        method="EM", converged=converged, n_obs=cp.N, n_groups=cp.n_groups,
        fixed=spec.fixed_names, random=spec.random_names, beta=cp.beta_to_user(beta),
        beta_cov=beta_cov, G=G_user, sigma2=sigma2, theta=theta, criterion=deviance,
        covariance=spec.covariance, optsummary=opt,
        singular=bool(np.any(np.diag(Lam_user) < 1e-4)),
        z_centre=cp.z_centre.copy(), G_centred=cp.centred_covariance(G),
    )
    if not converged:
        res.warnings.append(f"EM did not converge: {message}")
    if ranef:
        b, PinvLamT, _ = _e_step(cp, Lam_c, beta)
        V = sigma2 * np.einsum("ab,gbc->gac", Lam_c, PinvLamT)
        res.group_keys = list(cp.keys)
        res.ranef = b @ cp.T_Z.T
        res.ranef_var = np.einsum("ab,gbc,dc->gad", cp.T_Z, V, cp.T_Z)
    return res
