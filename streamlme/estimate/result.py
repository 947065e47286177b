"""FitResult: what a fit reports, on lme4's scales, with the optimiser's summary kept alongside."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


@dataclass
class OptSummary:
    """How the optimum was reached (lme4's optinfo, MixedModels.jl's OptSummary)."""

    optimizer: str
    theta_start: list[float]
    theta: list[float]
    n_evals: int
    iterations: int
    converged: bool
    message: str
    gradient_norm: float
    seconds: float
    warm_start: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TermFit:
    """One random-effect term of a fit: lme4's ``VarCorr`` row block and ``ranef`` for it.

    ``group`` is the grouping factor as the formula writes it (``plate``, ``batch:cask``),
    ``random`` the names of the term's random effects, ``G`` their covariance (user basis) and
    ``theta`` lme4's relative factor elements for this term. ``levels`` names the factor's levels
    (an interaction's level joins its parts with ``:``, as lme4 does), and ``ranef`` (L, q) and
    ``ranef_var`` (L, q, q) are their conditional modes and conditional covariances.
    """

    group: str
    random: list[str]
    covariance: str
    G: Array
    theta: Array
    levels: list[str] = field(default_factory=list)
    ranef: Array | None = None
    ranef_var: Array | None = None

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    def to_dict(self, ranef: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "group": self.group,
            "random": list(self.random),
            "covariance": self.covariance,
            "G": np.asarray(self.G).tolist(),
            "theta": np.asarray(self.theta).tolist(),
            "n_levels": self.n_levels,
        }
        if ranef:
            out.update(_per_level(self.levels, self.ranef, self.ranef_var))
        return out


@dataclass
class FitResult:
    """A fitted linear mixed model.

    ``criterion`` is lme4's: -2 x the restricted log-likelihood for REML, the deviance
    (-2 logLik) for ML and EM. ``G`` is the random-effects covariance, ``sigma2`` the residual
    variance, ``theta`` lme4's relative factor elements (user basis). ``ranef`` and
    ``ranef_var`` are the conditional modes and conditional covariances per group, in the user's
    basis (lme4's ``ranef(fit, condVar = TRUE)``). ``z_centre`` holds, per random term, the value
    its covariate was centred at in the fit (0 for the intercept), and ``G_centred`` the random
    effects' covariance in that centred basis (z - z_centre): computed directly, it keeps its
    digits when a covariate's mean is far from zero, where G itself is ill-conditioned.
    """

    method: str
    converged: bool
    n_obs: float
    n_groups: int
    fixed: list[str]
    random: list[str]
    beta: Array
    beta_cov: Array
    G: Array
    sigma2: float
    theta: Array
    criterion: float
    covariance: str
    optsummary: OptSummary
    group_keys: list[str] = field(default_factory=list)
    ranef: Array | None = None
    ranef_var: Array | None = None
    singular: bool = False
    warnings: list[str] = field(default_factory=list)
    z_centre: Array | None = None
    G_centred: Array | None = None
    #: every random-effect term, in the formula's order; a one-term fit has one entry
    terms: list[TermFit] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        """Parameters counted by AIC/BIC: fixed effects, theta and sigma."""
        return len(self.beta) + len(self.theta) + 1

    @property
    def loglik(self) -> float:
        return -0.5 * self.criterion

    @property
    def aic(self) -> float:
        return self.criterion + 2.0 * self.n_params

    @property
    def bic(self) -> float:
        return self.criterion + self.n_params * math.log(self.n_obs)

    @property
    def beta_se(self) -> Array:
        return np.sqrt(np.diag(self.beta_cov))

    @property
    def iterations(self) -> int:
        return self.optsummary.iterations

    def ranef_dict(self) -> dict[str, Array]:
        if self.ranef is None:
            return {}
        return dict(zip(self.group_keys, self.ranef))

    def to_dict(self, ranef: bool = True) -> dict[str, Any]:
        """The JSON shape of ``streamlme fit --json`` (field names are a public contract)."""
        out: dict[str, Any] = {
            "method": self.method,
            "converged": self.converged,
            "n_obs": _num(self.n_obs),
            "n_groups": self.n_groups,
            "fixed": list(self.fixed),
            "beta": dict(zip(self.fixed, map(float, self.beta))),
            "beta_se": dict(zip(self.fixed, map(float, self.beta_se))),
            "beta_cov": self.beta_cov.tolist(),
            "random": list(self.random),
            "covariance": self.covariance,
            "G": self.G.tolist(),
            "G_centred": (self.G if self.G_centred is None else self.G_centred).tolist(),
            "z_centre": ([0.0] * len(self.random) if self.z_centre is None
                         else self.z_centre.tolist()),
            "sigma2": float(self.sigma2),
            "theta": self.theta.tolist(),
            "criterion": float(self.criterion),
            "loglik": float(self.loglik),
            "aic": float(self.aic),
            "bic": float(self.bic),
            "iterations": self.iterations,
            "singular": self.singular,
            "warnings": list(self.warnings),
            "optsummary": self.optsummary.to_dict(),
        }
        if ranef:
            out.update(_per_level(self.group_keys, self.ranef, self.ranef_var))
        if self.terms:
            out["terms"] = [t.to_dict(ranef=ranef) for t in self.terms]
        return out

    def _terms(self) -> list[TermFit]:
        """The terms, or for a result built without them its one term (named "group")."""
        if self.terms:
            return self.terms
        return [TermFit("group", list(self.random), self.covariance, self.G, self.theta,
                        list(self.group_keys))]

    def summary(self) -> str:
        """A text summary laid out like lme4's ``summary(merMod)``."""
        crit = "REML criterion at convergence" if self.method == "REML" else "deviance"
        width = max(9, *(len(t.group) + 1 for t in self._terms()))
        lines = [
            f"Linear mixed model fit by {_method_words(self.method)}",
            "",
            f"{crit}: {self.criterion:.4f}" if self.method == "REML"
            else f"     AIC      BIC   logLik deviance\n{self.aic:8.1f} {self.bic:8.1f} "
                 f"{self.loglik:8.1f} {self.criterion:8.1f}",
            "",
            "Random effects:",
            f" {'Groups':<{width}}{'Name':<13}{'Variance':>12}{'Std.Dev.':>11}"
            + ("  Corr" if any(len(t.random) > 1 and t.covariance == "unstructured"
                               for t in self._terms()) else ""),
        ]
        for term in self._terms():
            G = np.asarray(term.G)
            sd = np.sqrt(np.maximum(np.diag(G), 0.0))
            for i, name in enumerate(term.random):
                row = f" {term.group if i == 0 else '':<{width}}{name:<13}{G[i, i]:>12.4g}{sd[i]:>11.4g}"
                if term.covariance == "unstructured" and i > 0:
                    corr = [G[i, j] / (sd[i] * sd[j]) if sd[i] * sd[j] > 0 else float("nan")
                            for j in range(i)]
                    row += "  " + " ".join(f"{c:5.2f}" for c in corr)
                lines.append(row)
        lines.append(
            f" {'Residual':<{width}}{'':<13}{self.sigma2:>12.4g}{math.sqrt(self.sigma2):>11.4g}"
        )
        counts = "; ".join(f"{t.group}, {t.n_levels or self.n_groups}" for t in self._terms())
        lines.append(f"Number of obs: {_num(self.n_obs)}, groups:  {counts}")
        lines += ["", "Fixed effects:", f"{'':<14}{'Estimate':>12}{'Std. Error':>12}{'t value':>9}"]
        for name, b, se in zip(self.fixed, self.beta, self.beta_se):
            lines.append(f"{name:<14}{b:>12.4f}{se:>12.4f}{b / se:>9.3f}")
        lines.append("")
        lines.append(
            f"optimizer ({self.optsummary.optimizer}) "
            f"{'converged' if self.converged else 'did NOT converge'} after "
            f"{self.optsummary.iterations} iterations, {self.optsummary.n_evals} evaluations"
        )
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _per_level(levels: list[str], ranef: Array | None,
               ranef_var: Array | None) -> dict[str, Any]:
    """``ranef`` and ``ranef_var`` keyed by level, when the fit computed them."""
    if ranef is None or ranef_var is None:
        return {}
    return {"ranef": {k: v.tolist() for k, v in zip(levels, ranef)},
            "ranef_var": {k: v.tolist() for k, v in zip(levels, ranef_var)}}


def _method_words(method: str) -> str:
    return {"REML": "REML", "ML": "maximum likelihood", "EM": "maximum likelihood (EM)"}[method]


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)
