"""Estimation from per-group sufficient statistics: REML/ML (profiled deviance) and EM."""

from streamlme.estimate.crossprod import DataError
from streamlme.estimate.em import fit_em
from streamlme.estimate.fit import (
    ConvergenceWarning,
    IdentifiabilityWarning,
    SingularFitWarning,
    fit,
)
from streamlme.estimate.pls import NumericalError
from streamlme.estimate.result import FitResult, OptSummary

__all__ = [
    "ConvergenceWarning",
    "DataError",
    "FitResult",
    "IdentifiabilityWarning",
    "NumericalError",
    "OptSummary",
    "SingularFitWarning",
    "fit",
    "fit_em",
]
