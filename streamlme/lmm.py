"""The DataFrame API: ``lmer(formula, data)`` and the result it returns, in lme4's vocabulary.

>>> import numpy as np, pandas as pd
>>> import streamlme
>>> rng = np.random.default_rng(1)
>>> g = np.repeat([f"s{i}" for i in range(8)], 10)
>>> x = np.tile(np.arange(10.0), 8)
>>> u = rng.normal(scale=2.0, size=8)
>>> df = pd.DataFrame({"g": g, "x": x,
...                    "y": 1.0 + 0.5 * x + np.repeat(u, 10) + rng.normal(size=80)})
>>> m = streamlme.lmer("y ~ x + (1 | g)", df)
>>> m  # doctest: +ELLIPSIS
<LMMResult REML: y ~ x + (1 | g); 80 obs; g: 8 levels; REML criterion ...>
>>> list(m.fixef().index), list(m.VarCorr().grp)
(['(Intercept)', 'x'], ['g', 'Residual'])
>>> m.predict(pd.DataFrame({"g": ["s0", "new"], "x": [1.0, 1.0]})).columns.tolist()
['fit', 'se', 'lower', 'upper']
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from streamlme.data import DataFileError, frame_levels, frame_stats, group_ids
from streamlme.estimate import DataError, NumericalError
from streamlme.estimate import fit as fit_stats
from streamlme.estimate.result import FitResult
from streamlme.formula import parse
from streamlme.spec import INTERCEPT, ModelSpec, SpecError
from streamlme.stats import GroupStats

Array = NDArray[np.float64]


def lmer(
    formula: str | ModelSpec,
    data: Any,
    *,
    REML: bool = True,
    method: str | None = None,
    levels: Mapping[str, Sequence[str]] | None = None,
    tol: float = 1e-10,
    max_iter: int = 500,
    ranef: bool = True,
) -> LMMResult:
    """Fit a linear mixed model to the rows of a data frame, as lme4's ``lmer`` does.

    ``data`` is a pandas frame or any frame narwhals accepts (polars, pyarrow, ...). Text and
    categorical columns named in the formula are coded as lme4 codes them, their levels taken
    from the data (a pandas Categorical keeps its order; text is sorted) unless ``levels``
    declares them. ``method`` ("REML", "ML" or "EM") overrides ``REML``.
    """
    frame = _pandas(data)
    if isinstance(formula, ModelSpec):
        spec = formula
    elif isinstance(formula, str):
        spec = parse(formula, levels=levels, levels_of=frame_levels(frame))
    else:
        raise SpecError(f"formula: expected an lme4 formula string or a ModelSpec, got "
                        f"{type(formula).__name__}")
    chosen = (method or ("REML" if REML else "ML")).upper()
    try:
        stats = frame_stats(frame, spec)
    except DataFileError as exc:
        raise SpecError(str(exc)) from None
    try:
        res = fit_stats(stats, spec, chosen, tol=tol, max_iter=max_iter, ranef=ranef)
    except NumericalError as exc:
        raise DataError(f"the fit failed numerically ({exc}); look for a column that nearly "
                        "copies another or the response") from exc
    return LMMResult(spec, res, stats)


def _pandas(data: Any) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, GroupStats):
        raise SpecError("data: lmer takes rows (a data frame); to fit statistics you already "
                        "hold, call streamlme.estimate.fit(stats, spec)")
    if isinstance(data, (str, bytes)):
        raise SpecError("data: expected a data frame, got a string; read the file first "
                        "(pandas.read_csv) or run `streamlme fit FILE FORMULA`")
    import narwhals as nw

    try:
        return nw.from_native(data, eager_only=True).to_pandas()
    except TypeError:
        raise SpecError(f"data: expected a data frame (pandas, polars, pyarrow, ...), got "
                        f"{type(data).__name__}") from None


class LMMResult:
    """A fitted model: lme4's accessors over a `FitResult` and the model's `ModelSpec`.

    ``fit`` is the FitResult (every number ``streamlme fit --json`` prints), ``spec`` the model,
    ``stats`` the per-cell statistics it was fitted from (merge more into them and refit with
    ``streamlme.estimate.fit(stats, spec, start=result.fit)`` to update it).
    """

    def __init__(self, spec: ModelSpec, fit: FitResult, stats: GroupStats) -> None:
        self.spec, self.fit, self.stats = spec, fit, stats

    def __repr__(self) -> str:
        crit = "REML criterion" if self.fit.method == "REML" else "deviance"
        levels = "; ".join(f"{t.group}: {t.n_levels} levels" for t in self.fit.terms)
        return (f"<LMMResult {self.fit.method}: {self.spec.formula}; {self.fit.n_obs:g} obs; "
                f"{levels}; {crit} {self.fit.criterion:.2f}>")

    def summary(self) -> str:
        """lme4's ``summary(fit)`` layout, with the Formula line."""
        head, _, rest = self.fit.summary().partition("\n")
        return f"{head}\nFormula: {self.spec.formula}\n{rest}"

    def to_json(self, ranef: bool = True) -> str:
        """The ``streamlme fit --json`` object."""
        return json.dumps(self.fit.to_dict(ranef=ranef), allow_nan=False)

    # -- lme4's accessors -----------------------------------------------------------------

    def fixef(self) -> pd.DataFrame:
        """Fixed effects: Estimate, Std. Error and t value, one row per coefficient."""
        b, se = self.fit.beta, self.fit.beta_se
        return pd.DataFrame({"Estimate": b, "Std. Error": se, "t value": b / se},
                            index=pd.Index(self.fit.fixed, name="term"))

    def ranef(self, condVar: bool = True) -> pd.DataFrame:
        """Conditional modes of every level of every term, in the layout of lme4's
        ``as.data.frame(ranef(fit, condVar = TRUE))``: grpvar, term, grp, condval, condsd."""
        rows: list[tuple[str, str, str, float, float]] = []
        for t in self.fit.terms:
            if t.ranef is None or t.ranef_var is None:
                raise SpecError("this fit was made with ranef=False; refit with ranef=True")
            sd = np.sqrt(np.maximum(np.diagonal(t.ranef_var, axis1=1, axis2=2), 0.0))
            for i, name in enumerate(t.random):
                rows += [(t.group, name, lv, float(t.ranef[j, i]), float(sd[j, i]))
                         for j, lv in enumerate(t.levels)]
        out = pd.DataFrame(rows, columns=["grpvar", "term", "grp", "condval", "condsd"])
        return out if condVar else out.drop(columns="condsd")

    def VarCorr(self) -> pd.DataFrame:
        """Variance components as lme4's ``as.data.frame(VarCorr(fit))``: grp, var1, var2,
        vcov, sdcor (a correlation where var2 is given)."""
        rows: list[tuple[str, str | None, str | None, float, float]] = []
        for t in self.fit.terms:
            G = np.asarray(t.G)
            sd = np.sqrt(np.maximum(np.diag(G), 0.0))
            rows += [(t.group, name, None, float(G[i, i]), float(sd[i]))
                     for i, name in enumerate(t.random)]
            if t.covariance == "unstructured":
                for j in range(len(t.random)):
                    for i in range(j + 1, len(t.random)):
                        corr = G[i, j] / (sd[i] * sd[j]) if sd[i] * sd[j] > 0 else math.nan
                        rows.append((t.group, t.random[j], t.random[i], float(G[i, j]), corr))
        rows.append(("Residual", None, None, float(self.fit.sigma2), math.sqrt(self.fit.sigma2)))
        return pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])

    def predict(self, newdata: Any, *, allow_new_levels: bool = True,
                level: float = 0.95) -> pd.DataFrame:
        """Predictions x'beta + sum_k z_k'b_k for new rows, with intervals for a new observation.

        The standard error adds sigma^2, x'Cov(beta)x and each term's z_k'Var(b_k)z_k (the
        terms' conditional errors taken as independent). A level the fit never saw has effect
        0 and its term's prior covariance, unless ``allow_new_levels`` is False (then an error
        names it).
        """
        from scipy.stats import norm

        frame = _pandas(newdata)
        spec = self.spec
        needed = [c for c in (*spec.grouping_columns, *spec.categorical_inputs,
                              *spec.numeric_inputs[:-1]) if c not in frame.columns]
        if needed:
            raise SpecError(f"newdata lacks column(s) {', '.join(map(repr, needed))}")
        numeric = {c: pd.to_numeric(frame[c], errors="raise").to_numpy(dtype=float)
                   for c in spec.numeric_inputs[:-1]}
        numeric[spec.response] = np.zeros(len(frame))
        codes = {}
        for c in spec.categorical_inputs:
            codes[c] = spec.level_codes(c, frame[c].astype(str).to_numpy())
            if (codes[c] < 0).any():
                bad = frame[c].astype(str).to_numpy()[codes[c] < 0][0]
                raise SpecError(f"newdata column {c!r} holds {bad!r}, not one of its levels "
                                f"{', '.join(spec.levels[c])}")
        W = spec.design_matrix(numeric, codes)
        col = {name: W[:, k] for k, name in enumerate(spec.columns)}
        ones = np.ones(len(frame))
        X = np.column_stack([ones if f == INTERCEPT else col[f] for f in spec.fixed])
        mu = X @ self.fit.beta
        var = np.full(len(frame), self.fit.sigma2) + np.einsum(
            "ia,ab,ib->i", X, self.fit.beta_cov, X)
        try:
            cells = [tuple(group_ids(frame, c)) for c in spec.grouping_columns]
        except DataFileError as exc:
            raise SpecError(f"newdata {exc}") from None
        rows = list(zip(*cells))
        for term, tf in zip(spec.terms, self.fit.terms):
            if tf.ranef is None or tf.ranef_var is None:
                raise SpecError("this fit was made with ranef=False; refit with ranef=True")
            Z = np.column_stack([ones if r == INTERCEPT else col[r] for r in term.random])
            where = {lv: j for j, lv in enumerate(tf.levels)}
            names = spec.term_levels(term, rows)
            idx = np.array([where.get(lv, -1) for lv in names], dtype=np.intp)
            if not allow_new_levels and (idx < 0).any():
                raise SpecError(f"newdata has level {names[int(np.flatnonzero(idx < 0)[0])]!r} "
                                f"of {term.group!r}, which the fit never saw "
                                "(allow_new_levels=True predicts it at the population mean)")
            known = idx >= 0
            b = np.where(known[:, None], tf.ranef[np.maximum(idx, 0)], 0.0)
            V = np.where(known[:, None, None], tf.ranef_var[np.maximum(idx, 0)],
                         np.asarray(tf.G)[None])
            mu = mu + np.einsum("iq,iq->i", Z, b)
            var = var + np.einsum("ia,iab,ib->i", Z, V, Z)
        se = np.sqrt(var)
        k = float(norm.ppf(0.5 + level / 2.0))
        return pd.DataFrame({"fit": mu, "se": se, "lower": mu - k * se, "upper": mu + k * se},
                            index=frame.index)
