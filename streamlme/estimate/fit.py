"""REML and ML fits from group statistics: minimise lme4's profiled deviance over theta.

The deviance and its exact gradient come from `pls`, so a bounded quasi-Newton method (L-BFGS-B)
needs few evaluations, each one pass over the groups; a warm start from the previous model makes a
refresh after a few more events a handful of passes. Nothing here sees a raw row.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize

from streamlme.estimate.crossprod import CrossProducts, alike_rows, check_width, cross_products
from streamlme.estimate.pls import NumericalError, PLSState, evaluate, gradient
from streamlme.estimate.result import FitResult, OptSummary, TermFit
from streamlme.estimate.theta import Parametrisation
from streamlme.spec import INTERCEPT, ModelSpec
from streamlme.stats import GroupStats

if TYPE_CHECKING:
    from streamlme.estimate.blocked import CellDesign

Array = NDArray[np.float64]

#: lme4's tolerance for calling a fit singular (a diagonal element of theta at its bound).
SINGULAR_TOL = 1e-4


class SingularFitWarning(UserWarning):
    """A variance component sits on the boundary of the parameter space."""


class ConvergenceWarning(UserWarning):
    """The optimiser stopped before meeting its convergence criterion."""


class IdentifiabilityWarning(UserWarning):
    """A variance component the data cannot tell apart from the residual variance."""


def fit(
    stats: GroupStats,
    spec: ModelSpec,
    method: str | None = None,
    *,
    start: FitResult | Mapping[str, Any] | None = None,
    tol: float = 1e-10,
    max_iter: int = 500,
    ranef: bool = True,
) -> FitResult:
    """Fit the model from per-group statistics by REML, ML or EM.

    ``start`` warm-starts from a previous fit (a FitResult or its ``to_dict()``); ``tol`` is the
    relative tolerance on the deviance (and, for EM, the default stopping rule), ``max_iter``
    bounds optimiser iterations.
    """
    _check_arguments(stats, spec)
    method = (method or spec.method).upper()
    if len(spec.terms) > 1:
        if method not in ("REML", "ML"):
            raise ValueError(f"method {method!r}: a model with several random-effect terms is "
                             "fitted by REML or ML")
        from streamlme.estimate.blocked import fit_cells

        return fit_cells(cell_design(stats, spec), method, start=start, tol=tol,
                         max_iter=max_iter, ranef=ranef)
    if method == "EM":
        from streamlme.estimate.em import fit_em

        res = with_terms(fit_em(stats, spec, start=start, tol=tol, max_iter=max_iter,
                                ranef=ranef), spec)
    elif method in ("REML", "ML"):
        res = with_terms(_fit_one_term(stats, spec, method, start, tol, max_iter, ranef), spec)
    else:
        raise ValueError(f"method {method!r} is not one of REML, ML, EM")
    return note_confounded(res, [spec.terms[0].group] if _all_alike(stats) else [])


def _all_alike(stats: GroupStats) -> bool:
    """Whether every group with data holds a single row (see `alike_rows`)."""
    live = stats.n > 0
    N, _, C_pool = stats.total()
    return bool(alike_rows(stats.n[live], stats.C[live], np.diag(C_pool) / N).all())


def note_confounded(res: FitResult, groups: Sequence[str]) -> FitResult:
    """Warn, in the result and as an `IdentifiabilityWarning`, of each term whose levels all
    hold a single row: its variance and the residual variance then only enter the likelihood
    through their sum, and the fit's split between them means nothing."""
    for group in groups:
        note = (f"variance components not identifiable: every level of {group!r} has a single "
                f"row, so the {group!r} variance and the residual variance are confounded and "
                "the split between them is arbitrary; give levels more rows or drop the term")
        res.warnings.append(note)
        warnings.warn(note, IdentifiabilityWarning, stacklevel=3)
    return res


def _check_arguments(stats: object, spec: object) -> None:
    """Say what was passed where, rather than failing on a missing attribute later."""
    if not isinstance(spec, ModelSpec):
        hint = (" (for a formula, pass ModelSpec.from_formula(formula))" if isinstance(spec, str)
                else "")
        raise TypeError(f"spec: expected a ModelSpec, got {type(spec).__name__}{hint}")
    if not isinstance(stats, GroupStats):
        hint = (" (to fit rows of a data frame, call streamlme.lmer(formula, df))"
                if hasattr(stats, "columns") else "")
        raise TypeError(f"stats: expected GroupStats, got {type(stats).__name__}{hint}")


def with_terms(res: FitResult, spec: ModelSpec) -> FitResult:
    """Fill ``terms`` of a one-term fit, naming its levels as lme4 does (``A:a``)."""
    term = spec.terms[0]
    if len(spec.grouping_columns) > 1:
        res.group_keys = spec.term_levels(term, spec.cell_levels(res.group_keys))
    res.terms = [TermFit(term.group, list(res.random), res.covariance, res.G, res.theta,
                         list(res.group_keys), res.ranef, res.ranef_var)]
    return res


def cell_design(stats: GroupStats, spec: ModelSpec) -> CellDesign:
    """The per-cell statistics of a several-term model, with each term's level of every cell."""
    from streamlme.estimate.blocked import CellDesign, TermDesign

    check_width(stats, spec)
    live = stats.n > 0
    if not live.all():
        stats = stats.select([k for k, ok in zip(stats.keys, live) if ok])
    cells = spec.cell_levels(stats.keys)
    terms = []
    for term in spec.terms:
        levels, codes = np.unique(np.asarray(spec.term_levels(term, cells), dtype=object),
                                  return_inverse=True)
        terms.append(TermDesign(
            group=term.group, random=term.names,
            columns=[-1 if r == INTERCEPT else spec.columns.index(r) for r in term.random],
            covariance=term.covariance, levels=[str(v) for v in levels],
            codes=np.asarray(codes, dtype=np.intp).ravel()))
    return CellDesign(
        n=stats.n, mean=stats.mean, C=stats.C,
        fixed=[-1 if f == INTERCEPT else spec.columns.index(f) for f in spec.fixed],
        fixed_names=spec.fixed_names, terms=terms, response=spec.response)


def _fit_one_term(
    stats: GroupStats, spec: ModelSpec, method: str, start: FitResult | Mapping[str, Any] | None,
    tol: float, max_iter: int, ranef: bool,
) -> FitResult:
    cp = cross_products(stats, spec)
    par = Parametrisation(cp.q, spec.covariance, cp.T_Z, cp.z_scale)
    theta0 = _start_theta(par, start)
    reml = method == "REML"
    t0 = time.perf_counter()
    ev = TermEvaluator(cp, par, reml)
    theta, info = minimise(ev, theta0, tol, max_iter)
    theta, info = escape_boundary(ev, theta, info, tol, max_iter)
    st = info.pop("state")
    if ranef and st.L is None:
        st = evaluate(cp, par.lam(theta), reml)
    res = _result(cp, par, st, spec, method, theta, info, ranef)
    res.optsummary.seconds = time.perf_counter() - t0
    res.optsummary.warm_start = start is not None
    res.optsummary.theta_start = par.user_factor(theta0)[par.rows, par.cols].tolist()
    return res


class Evaluator(Protocol):
    """The profiled deviance and its gradient at theta, however the groups are held."""

    par: Parametrisation

    @property
    def n_groups(self) -> int: ...

    def state(self, theta: Array) -> PLSState:
        """The state at theta; NumericalError where the deviance cannot be evaluated."""
        ...

    def gradient(self, st: PLSState) -> Array:
        """d deviance / d theta at the state ``st``."""
        ...


class TermEvaluator:
    """`Evaluator` over the stacked cross-products of one process (`pls`)."""

    def __init__(self, cp: CrossProducts, par: Parametrisation, reml: bool) -> None:
        self.cp, self.par, self.reml = cp, par, reml

    @property
    def n_groups(self) -> int:
        return self.cp.n_groups

    def state(self, theta: Array) -> PLSState:
        return evaluate(self.cp, self.par.lam(theta), self.reml, factors=False)

    def gradient(self, st: PLSState) -> Array:
        return self.par.grad(gradient(self.cp, st))


def objective_scale(d0: float, n_groups: int) -> tuple[float, float]:
    """(shift, scale): the optimiser minimises (deviance - shift) / scale.

    The deviance is a constant of order N (the N log(r^2 / N) part) plus a part that moves with
    theta, whose size and curvature grow with the number of groups, not with N. L-BFGS-B's
    first step is the scaled gradient itself, so dividing by the deviance (as the fit once did)
    made it ~J/N long: with frequency weights of 1e6 a row, that step changed the deviance by
    less than ftol and the fit stopped at its start. The scale is the start value, as long as
    that is at most 50 per group (typical data: a few rows a group), else 50 per group; the
    shift keeps the difference's digits.
    """
    cap = 50.0 * max(float(n_groups), 1.0)
    if not np.isfinite(d0):
        return 0.0, cap
    return float(d0), min(max(abs(d0), 1.0), cap)


def gradient_floor(d0: float, n_groups: int, tol: float) -> float:
    """The largest free gradient component (per group) that still counts as converged.

    sqrt(tol), or what the deviance's rounding allows if that is more: a deviance of size |d0|
    is known to eps |d0|, so a line search cannot resolve a per-group gradient much below
    sqrt(eps |d0| / n_groups) (at N / J = 1e6 rows a group, about 1e-5).
    """
    eps = np.finfo(float).eps
    noise = 64.0 * eps * abs(d0) / max(float(n_groups), 1.0) if np.isfinite(d0) else 0.0
    return float(np.sqrt(tol + noise))


def minimise(
    ev: Evaluator, theta0: Array, tol: float, max_iter: int
) -> tuple[Array, dict[str, Any]]:
    """theta minimising the profiled (RE)ML deviance, and what the optimiser said.

    L-BFGS-B with the analytic gradient, on the deviance shifted and scaled by
    `objective_scale`. ``info["state"]`` is the `PLSState` at the returned theta, possibly
    without its per-group factors (see `evaluate`).
    """
    par = ev.par
    # Each evaluation is a pass over all groups: never repeat one (L-BFGS-B asks again for its
    # start, and we ask again for its answer).
    seen: dict[bytes, tuple[float, Array, PLSState | None]] = {}

    def state_at(theta: Array) -> tuple[float, Array, PLSState | None]:
        key = np.asarray(theta, dtype=float).tobytes()
        if key not in seen:
            try:
                st = ev.state(theta)
                seen[key] = (st.deviance, ev.gradient(st), st)
            except NumericalError:
                seen[key] = (np.inf, np.zeros_like(theta), None)
            # keep the latest state's factors only: a state may hold G x q x (p + q) floats
            for k, v in seen.items():
                if k != key and v[2] is not None and v[2].L is not None:
                    seen[k] = (v[0], v[1], replace(v[2], L=None, RZXy=None))
        return seen[key]

    d0 = state_at(theta0)[0]
    shift, scale = objective_scale(d0, ev.n_groups)

    def fun(theta: Array) -> tuple[float, Array]:
        f, g, _ = state_at(theta)
        return (f - shift) / scale, g / scale

    opt = minimize(
        fun, theta0, jac=True, method="L-BFGS-B", bounds=par.bounds,
        options={"maxiter": max_iter, "ftol": tol * 1e-3, "gtol": tol, "maxcor": 20},
    )
    theta = np.asarray(opt.x, dtype=float)
    _, g, st = state_at(theta)
    if st is None:
        st = ev.state(theta)
    g = g / scale
    free = ~((theta <= par.lower + 1e-12) & (g > 0))
    gnorm = float(np.max(np.abs(g[free]))) if free.any() else 0.0
    converged = bool(opt.success or gnorm < gradient_floor(d0, ev.n_groups, tol))
    info = {"n_evals": len(seen), "iterations": int(opt.nit), "converged": converged,
            "message": str(opt.message), "gradient_norm": gnorm * scale, "state": st}
    return theta, info


def escape_boundary(
    ev: Evaluator, theta: Array, info: dict[str, Any], tol: float, max_iter: int
) -> tuple[Array, dict[str, Any]]:
    """Re-run from inside the region when the optimum found sits on a bound.

    A bounded quasi-Newton method can stop on the boundary of a variance component that a start
    inside the region would not reach (the deviance is even in a last diagonal element, so the
    gradient there says nothing). Keep whichever deviance is lower (those of the states both
    runs end with).
    """
    on_bound = (ev.par.lower == 0.0) & (theta < SINGULAR_TOL)
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


def _start_theta(par: Parametrisation, start: FitResult | Mapping[str, Any] | None) -> Array:
    if start is None:
        return par.start()
    theta_user = np.asarray(start.theta if isinstance(start, FitResult) else start["theta"], float)
    if theta_user.shape != (par.n_theta,) or not np.isfinite(theta_user).all():
        return par.start()
    # placed() only lays theta out in lme4's order, which is the same in either basis
    theta0 = par.from_user_factor(par.placed(theta_user))
    # A start exactly on the boundary can trap a bounded optimiser there; nudge it inside.
    on_bound = (par.lower == 0.0) & (theta0 < 1e-4)
    theta0[on_bound] = 1e-4
    return theta0


def fit_report(
    optimizer: str, theta: Array, diag_theta: Array, info: dict[str, Any]
) -> tuple[bool, list[str], OptSummary]:
    """Whether the fit is singular, the warnings it gives (also raised as warnings), and the
    optimiser's summary, the same for every engine."""
    singular = bool(np.any(diag_theta < SINGULAR_TOL))
    notes: list[str] = []
    if singular:
        notes.append("boundary (singular) fit: a variance component is at or near zero")
        warnings.warn(notes[-1], SingularFitWarning, stacklevel=4)
    if not info["converged"]:
        notes.append(f"optimiser did not converge: {info['message']}")
        warnings.warn(notes[-1], ConvergenceWarning, stacklevel=4)
    opt = OptSummary(
        optimizer=optimizer, theta_start=[], theta=theta.tolist(),
        n_evals=info["n_evals"], iterations=info["iterations"], converged=info["converged"],
        message=info["message"], gradient_norm=info["gradient_norm"], seconds=0.0,
        warm_start=False,
    )
    return singular, notes, opt


def _result(
    cp: CrossProducts, par: Parametrisation, st: PLSState, spec: ModelSpec, method: str,
    theta: Array, info: dict[str, Any], ranef: bool,
) -> FitResult:
    sigma2 = st.sigma2
    Lam_user = par.user_factor(theta)
    G = sigma2 * Lam_user @ Lam_user.T
    Rinv = np.linalg.inv(st.R_X)
    beta_cov = cp.T_X @ (sigma2 * Rinv @ Rinv.T) @ cp.T_X.T
    singular, notes, opt = fit_report("L-BFGS-B (analytic gradient)", theta,
                                      theta[par.rows == par.cols], info)
    res = FitResult(
        method=method, converged=info["converged"], n_obs=cp.N, n_groups=cp.n_groups,
        fixed=spec.fixed_names, random=spec.random_names, beta=cp.beta_to_user(st.beta),
        beta_cov=beta_cov, G=G, sigma2=sigma2,
        theta=Lam_user[par.rows, par.cols] if spec.covariance == "unstructured"
        else np.diag(Lam_user).copy(),
        criterion=st.deviance, covariance=spec.covariance, optsummary=opt,
        singular=singular, warnings=notes, z_centre=cp.z_centre.copy(),
        G_centred=cp.centred_covariance(sigma2 * (st.Lam @ st.Lam.T)),
    )
    if ranef:
        res.group_keys = list(cp.keys)
        res.ranef = st.conditional_modes() @ cp.T_Z.T
        res.ranef_var = np.einsum("ab,gbc,dc->gad", cp.T_Z, st.conditional_variances(), cp.T_Z)
    return res
