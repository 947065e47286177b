"""Against lme4 itself: the lmer fits statsmodels ships with its test suite (data and results).

statsmodels' regression/tests/results holds twelve simulated data sets (lme00.csv ... lme11.csv) and
the numbers ``lmer`` printed for them (lme_r_results.py, made by lme_results.R): fixed effects,
random-effect covariance, residual variance, log-likelihood and, for correlated effects, the first
group's conditional mode and variance. Models are ``endog ~ 0 + fe... + (0 + re... | groups)``
("drf") and, with two random terms, ``(0 + re0 | groups) + (0 + re1 | groups)`` ("irf").
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from streamlme import GroupStats, ModelSpec
from streamlme.estimate import fit

spec_ = importlib.util.find_spec("statsmodels.regression.tests.results.lme_r_results")
if spec_ is None or spec_.origin is None:
    pytest.skip("statsmodels' lme4 reference results are not installed", allow_module_level=True)
RESULTS = Path(spec_.origin).parent
lme4 = importlib.import_module("statsmodels.regression.tests.results.lme_r_results")


def cases():
    for ix in range(12):
        data = pd.read_csv(RESULTS / f"lme{ix:02d}.csv")
        n_re = sum(c.startswith("exog_re") for c in data.columns)
        for irf in (False, True):
            if irf and n_re == 1:
                continue
            for meth in ("ml", "reml"):
                yield pytest.param(ix, irf, meth, id=f"lme{ix:02d}-{'irf' if irf else 'drf'}-{meth}")


@pytest.mark.parametrize(("ix", "irf", "meth"), list(cases()))
def test_matches_lme4(ix: int, irf: bool, meth: str) -> None:
    data = pd.read_csv(RESULTS / f"lme{ix:02d}.csv")
    fe = [c for c in data.columns if c.startswith("exog_fe")]
    re = [c for c in data.columns if c.startswith("exog_re")]
    # a column of ones is lme4's intercept; everything else is a covariate
    random = ["1" if np.all(data[c] == 1.0) else c for c in re]
    spec = ModelSpec("endog", fe, random, "groups", covariance="diagonal" if irf else "unstructured")
    W = data[list(spec.columns)].to_numpy(float)
    groups = data["groups"].astype(int).astype(str).to_numpy()
    name = f"_{meth}_{'irf' if irf else 'drf'}_{ix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit(GroupStats.from_rows(groups, W), spec, meth.upper())

    # lme4 prints 7 significant digits and its optimiser (bobyqa) stops near 1e-6
    tol = dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(res.beta, getattr(lme4, "coef" + name), **tol)
    np.testing.assert_allclose(res.G, np.atleast_2d(getattr(lme4, "cov_re" + name)), **tol)
    np.testing.assert_allclose(res.sigma2, getattr(lme4, "scale" + name)[0], **tol)
    np.testing.assert_allclose(res.beta_cov, np.atleast_2d(getattr(lme4, "vcov" + name)), **tol)
    # lme4's logLik at its own optimum can only be lower than ours, and by no more than rounding
    ll_lme4 = float(getattr(lme4, "loglike" + name)[0])
    assert res.loglik >= ll_lme4 - 1e-4
    assert res.loglik - ll_lme4 < 1e-3
    if not irf:
        first = res.ranef_dict()["0"]
        np.testing.assert_allclose(first, np.atleast_1d(getattr(lme4, "ranef_mean" + name)),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(res.ranef_var[res.group_keys.index("0")],
                                   np.atleast_2d(getattr(lme4, "ranef_condvar" + name)),
                                   rtol=1e-4, atol=1e-5)
