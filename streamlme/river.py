"""A linear mixed model as a river regressor: learnt one event at a time, refreshed every k events.

`MixedEffectsRegressor` keeps, per group, the running sufficient statistics (n, mean, C) of the
event's numeric features and its target, folded in by a single-row Welford step per event. Every
``refresh_every`` events it materialises a `GroupStats` and refits (beta, G, sigma^2) by REML,
warm-started from the previous fit. A prediction is x'beta plus the group's BLUP computed from the
group's *current* statistics, so a group's effect sharpens with each of its events even between
refreshes, while the expensive part (the variance components) moves only at refreshes.

Needs river (``pip install 'streamlme[river]'``).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

try:
    from river import base
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "streamlme.river needs the river package; install it with pip install 'streamlme[river]'"
    ) from exc

from streamlme.blup import Kernel
from streamlme.estimate import FitResult, fit
from streamlme.spec import COVARIANCES, INTERCEPT, METHODS, ModelSpec, SpecError
from streamlme.stats import GroupStats, decay_factor, merge_moments

Array = NDArray[np.float64]

log = logging.getLogger(__name__)

_RESPONSE, _GROUP = "__y__", "__group__"
#: a fixed-effect column keeping less than this share of its variance once the columns before it
#: are accounted for is collinear with them; it sits out the fit (coefficient 0)
_COLLINEAR = 1e-8


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating, np.bool_))


def _finite(v: Any) -> float:
    f = float(v)
    return f if math.isfinite(f) else 0.0


def _group_key(v: Any) -> Hashable:
    """Missing group ids (absent, None, NaN, pd.NA) all become None: one group of their own."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def _column(values: pd.Series) -> Array:
    """A feature column as floats; non-numbers and non-finite values count as missing (0)."""
    if pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype):
        out = values.to_numpy(dtype=float, na_value=np.nan, copy=True)
    else:
        out = np.array([float(v) if _is_number(v) else np.nan for v in values], dtype=float)
    out[~np.isfinite(out)] = 0.0
    return out


def _has_numbers(values: pd.Series) -> bool:
    if pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype):
        return True
    return any(_is_number(v) for v in values)


class _Model:
    """What a refresh leaves behind for prediction: the BLUP core's `Kernel` of the fit, on the
    estimator's own columns (features..., y)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def fixed_part(self, X: Array) -> Array:
        return self.kernel.fixed_part(X)

    def random_design(self, X: Array) -> Array:
        """The centred random design z - z_centre, the basis `blups` answers in."""
        return self.kernel.random_design(X)

    def blups(self, n: Array, m: Array, C: Array) -> Array:
        """Each group's conditional modes in the centred basis (`Kernel.modes`)."""
        return self.kernel.modes(n, m, C)


class MixedEffectsRegressor(base.MiniBatchRegressor):
    """Linear mixed-effects regression learnt online from per-group sufficient statistics.

    The model is ``y = x'beta + z'b_group + e`` with ``b_group ~ N(0, G)`` and
    ``e ~ N(0, sigma^2)``. The group is the value of ``x[group]``; the fixed part is an intercept
    plus every other numeric feature of ``x`` (or those named in ``fixed``); the random part is
    given by ``random``, where ``"1"`` is a random intercept and a feature name a random slope.

    Each event updates its group's running statistics in O(d^2); every ``refresh_every`` events
    the variance components and beta are refitted (REML by default, warm-started from the last
    fit). ``predict_one`` returns x'beta plus the group's best linear unbiased predictor (BLUP)
    from the group's current statistics: a group seen a few times is shrunk towards the
    population, a large group speaks for itself, an unseen group gets x'beta.

    Features. The feature set grows as features appear: a feature missing from an event counts
    as 0 for it (river's convention for sparse features), which is exact for the statistics
    already kept, so a feature appearing late joins at the next refresh. Non-numeric values
    other than the group are ignored (one-hot encode them upstream if they matter); NaN and
    infinite feature values count as missing; an event whose target is not finite is skipped.
    Events without the group key (or with None/NaN there) form one group of their own. Fixed
    features that are constant or collinear with earlier ones sit out the refresh (coefficient
    0) instead of failing it.

    Before the first successful refresh the prediction is the group's running mean of y (the
    running mean over all events for an unseen group, 0 before any event). A refresh that fails
    (e.g. fewer than two groups so far) is logged on the ``streamlme.river`` logger, recorded in
    ``last_error_`` and leaves the previous model in place: learning and prediction never raise
    because of it.

    Scaling features is not needed (the engine centres and scales internally). Stateful
    preprocessing upstream, such as `preprocessing.StandardScaler`, changes what a feature means
    while the statistics keep the rows it has already summarised; prefer stateless steps
    (`compose.Select`, `compose.FuncTransformer`) in front of this model, and keep the group key
    in the features it receives.

    A formula. ``formula="y ~ age + C(sex, levels=['F', 'M']) + (1 + age | hospital)"`` states
    the model as lme4 does (`streamlme.spec.ModelSpec.from_formula`; the response's name is only
    a label, the target is ``y``): the fixed and random parts are exactly the formula's design
    columns (nothing grows, nothing is left out), categorical covariates are coded as lme4 codes
    them against levels declared in the formula or in ``levels`` (an event with an undeclared
    or missing level raises ValueError naming it), and the group is the term's factor (a tuple
    of values for an interaction ``g:h``). The online estimator fits **one** random-effect term:
    a formula with several terms (crossed or nested) raises ValueError; fit those from
    statistics with `streamlme.lmer` or the streaming refresh, which are exact for them.

    Parameters
    ----------
    group
        Key of ``x`` holding the group id (any hashable value).
    random
        Random terms: ``"1"`` for a random intercept, feature names for random slopes.
    refresh_every
        Refit every this many events. The first refits come sooner, after ``first_refresh``
        events and then each time the event count doubles, so a young stream gets a model early.
    fixed
        Features of the fixed part besides the intercept; None means every numeric feature.
    covariance
        ``"unstructured"`` (lme4 ``(1 + x | g)``) or ``"diagonal"`` (``(1 + x || g)``).
    method
        ``"REML"``, ``"ML"`` or ``"EM"``.
    half_life
        Exponential forgetting: an event's weight halves after this many later events (None:
        no forgetting).
    first_refresh
        Events before the first refit.
    formula
        An lme4 formula with one random-effect term, instead of ``group``, ``random``,
        ``fixed`` and ``covariance`` (leave those at their defaults).
    levels
        With ``formula``: categorical columns and their levels, first level the reference.

    Attributes
    ----------
    fit_
        The latest successful `streamlme.estimate.FitResult` (None before the first): beta, G,
        sigma2, criterion, ... Its term names are the features' ``str()``.
    last_error_
        Why the latest refresh failed, or None if it succeeded.
    n_refreshes_
        Successful refreshes so far.

    Examples
    --------

    >>> from river import compose, evaluate, metrics
    >>> from streamlme.demo import simulate
    >>> from streamlme.river import MixedEffectsRegressor

    Patients of 100 hospitals; length of stay depends on age and severity, and each hospital has
    its own offset and age slope:

    >>> sc = simulate(n_groups=100, n_events=4000, seed=1)
    >>> stream = [({"hospital": f"H{h}", "age": a, "severity": s, "ward": "A"}, y)
    ...           for h, a, s, y in zip(sc.hospital, sc.age, sc.severity, sc.los)]

    >>> model = compose.Select("hospital", "age", "severity") | MixedEffectsRegressor(
    ...     group="hospital", random=["1", "age"], refresh_every=1000)
    >>> metric = evaluate.progressive_val_score(stream, model, metrics.MAE())
    >>> metric  # the noise alone costs 1.5 * sqrt(2 / pi) = 1.20
    MAE: 1.2...

    >>> fitted = model["MixedEffectsRegressor"].fit_
    >>> fitted.fixed
    ['(Intercept)', 'age', 'severity']
    >>> [round(float(b), 2) for b in fitted.beta]  # the truth is 4, 0.03, 0.8
    [3.78, 0.04, 0.78]
    >>> round(model.predict_one({"hospital": "H0", "age": 70.0, "severity": 2.0}), 2)
    6.88

    """

    def __init__(
        self,
        group: Hashable = "group",
        random: Sequence[str] = ("1",),
        refresh_every: int = 1000,
        fixed: Sequence[Hashable] | None = None,
        covariance: str = "unstructured",
        method: str = "REML",
        half_life: float | None = None,
        first_refresh: int = 100,
        formula: str | None = None,
        levels: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.group = group
        self.random = random
        self.refresh_every = refresh_every
        self.fixed = fixed
        self.covariance = covariance
        self.method = method
        self.half_life = half_life
        self.first_refresh = first_refresh
        self.formula = formula
        self.levels = levels
        self._check_params()
        self._spec = self._formula_spec()

        self._random = (random,) if isinstance(random, str) else tuple(random)
        self._fixed_set = None if fixed is None else {f for f in fixed if f != INTERCEPT}
        # random slopes have a column from the start: a slope never seen is all zeros (and the
        # refresh says so) rather than a missing column
        self._features: list[Hashable] = [t for t in self._random if t != INTERCEPT]
        if self._spec is not None:
            self._features = list(self._spec.covariates)  # the formula's design columns
            self._atoms = [[(c, None if lv is None else self._spec.levels[c].index(lv))
                            for c, lv in self._spec.atoms(name)]
                           for name in self._spec.covariates]
            self._factors = self._spec.terms[0].factors
        self._col: dict[Hashable, int] = ({} if self._spec is not None else
                                          {f: j for j, f in enumerate(self._features)})
        self._groups: dict[Hashable, int] = {}
        D = len(self._features) + 1
        # per-group statistics of w = (features..., y), rows 0.._G-1 in use, grown by doubling
        self._G = 0
        self._n = np.zeros(0)
        self._mean = np.zeros((0, D))
        self._C = np.zeros((0, D, D))
        self._t = np.zeros(0)  # event count each group's mass is valid at (forgetting)
        self._seen = 0
        self._y_n = 0
        self._y_mean = 0.0
        self._next_refresh = first_refresh
        self._model: _Model | None = None
        self.fit_: FitResult | None = None
        self.last_error_: str | None = None
        self.n_refreshes_ = 0

    def _formula_spec(self) -> ModelSpec | None:
        if self.formula is None:
            return None
        try:
            spec = ModelSpec.from_formula(self.formula, levels=self.levels,
                                          method=str(self.method))
        except SpecError as exc:
            raise ValueError(f"formula: {exc}") from None
        if len(spec.terms) > 1:
            raise ValueError(
                f"formula: {spec.formula!r} has {len(spec.terms)} random-effect terms "
                f"({', '.join(t.formula() for t in spec.terms)}); the online estimator fits one. "
                "Fit several-term models with streamlme.lmer or the streaming refresh")
        return spec

    def _check_params(self) -> None:
        if self.formula is not None:
            if not isinstance(self.formula, str):
                raise ValueError(f"formula: expected an lme4 formula string, got "
                                 f"{self.formula!r}")
            given = [name for name, default in (("group", "group"), ("fixed", None),
                                                ("covariance", "unstructured"))
                     if getattr(self, name) != default]
            if tuple([self.random] if isinstance(self.random, str) else self.random) != ("1",):
                given.append("random")
            if given:
                raise ValueError(f"formula: give the model as a formula or with "
                                 f"{', '.join(given)}, not both")
        elif self.levels is not None:
            raise ValueError("levels: declares the levels of a formula's categorical columns; "
                             "give formula too")
        terms = [self.random] if isinstance(self.random, str) else list(self.random)
        if not terms or not all(isinstance(t, str) and t for t in terms):
            raise ValueError(f'random: expected a list of terms such as ["1", "age"], got '
                             f"{self.random!r}")
        if len(set(terms)) != len(terms) or self.group in terms:
            raise ValueError(f"random: {self.random!r} repeats a term or names the group key")
        for name in ("refresh_every", "first_refresh"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive number of events, got {value!r}")
        if self.covariance not in COVARIANCES:
            raise ValueError(f"covariance: {self.covariance!r} is not one of "
                             f"{', '.join(COVARIANCES)}")
        if str(self.method).upper() not in METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.half_life is not None and not (
            isinstance(self.half_life, (int, float)) and self.half_life > 0
        ):
            raise ValueError(f"half_life: expected a positive number of events or None, "
                             f"got {self.half_life!r}")

    @classmethod
    def _unit_test_params(cls) -> Iterator[dict[str, Any]]:
        # river's checks stream TrumpApproval, which has no group column; gallup takes a dozen
        # values over its first rows, so it serves as one
        yield {"group": "gallup", "refresh_every": 40, "first_refresh": 20}
        yield {"group": "gallup", "random": ("1", "ipsos"), "refresh_every": 30,
               "first_refresh": 10, "half_life": 100.0}
        yield {"formula": "approval ~ ipsos + (1 | gallup)", "refresh_every": 40,
               "first_refresh": 20}

    # -- public state -------------------------------------------------------------------------

    @property
    def features_(self) -> list[Hashable]:
        """Numeric features kept so far, in column order."""
        return list(self._features)

    @property
    def n_groups_(self) -> int:
        return self._G

    # -- learning -----------------------------------------------------------------------------

    def learn_one(self, x: dict[Hashable, Any], y: float) -> None:
        y = float(y)
        if not math.isfinite(y):
            log.debug("skipping an event with non-finite target %r", y)
            return
        if self._spec is not None:
            w = np.array([*self._design_row(x), y])
            i = self._row(self._key(x))
        else:
            self._admit(k for k, v in x.items() if _is_number(v))
            w = np.zeros(len(self._features) + 1)
            for k, v in x.items():
                j = self._col.get(k)
                if j is not None and k != self.group and _is_number(v):
                    w[j] = _finite(v)
            w[-1] = y
            i = self._row(_group_key(x.get(self.group)))
        self._seen += 1
        n, m = self._n, self._mean[i]
        if self.half_life is not None:
            f = float(decay_factor(self._seen - self._t[i], self.half_life))
            n[i] *= f
            self._C[i] *= f
            self._t[i] = self._seen
        n1 = n[i] + 1.0
        delta = w - m
        m += delta / n1
        self._C[i] += np.outer(delta, w - m)
        n[i] = n1
        self._y_n += 1
        self._y_mean += (y - self._y_mean) / self._y_n
        if self._seen >= self._next_refresh:
            self.refresh()

    def learn_many(self, X: pd.DataFrame, y: pd.Series) -> None:
        """Learn a batch; the same state as `learn_one` row by row, refreshes included."""
        yv = np.asarray(y, dtype=float).ravel()
        if len(yv) != len(X):
            raise ValueError(f"learn_many: {len(X)} rows of X but {len(yv)} targets")
        self._admit(c for c in X.columns if _has_numbers(X[c]))
        W = np.column_stack([self._feature_matrix(X), yv])
        keys = self._group_column(X)
        ok = np.isfinite(yv)
        if not ok.all():
            W, keys = W[ok], [k for k, good in zip(keys, ok) if good]
        if not len(W):
            return
        codes, uniques = pd.factorize(pd.Series(keys, dtype=object), use_na_sentinel=False)
        rows = np.array([self._row(_group_key(k)) for k in uniques], dtype=np.intp)[codes]
        pos = 0
        while pos < len(W):
            # stop at each scheduled refresh so the batch refits exactly where learn_one would
            k = min(len(W) - pos, self._next_refresh - self._seen)
            self._fold(rows[pos:pos + k], W[pos:pos + k])
            pos += k
            if self._seen >= self._next_refresh:
                self.refresh()

    def _fold(self, rows: np.ndarray, W: Array) -> None:
        u, local = np.unique(rows, return_inverse=True)
        ts = self._seen + 1.0 + np.arange(len(W)) if self.half_life is not None else None
        part = GroupStats.from_codes(local, [str(j) for j in range(len(u))], W, ts=ts,
                                     half_life=self.half_life)
        if self.half_life is not None:
            f = decay_factor(part.t - self._t[u], self.half_life)
            self._n[u] *= f
            self._C[u] *= f[:, None, None]
            self._t[u] = part.t
        self._n[u], self._mean[u], self._C[u] = merge_moments(
            self._n[u], self._mean[u], self._C[u], part.n, part.mean, part.C)
        self._seen += len(W)
        self._y_n += len(W)
        self._y_mean += (W[:, -1].mean() - self._y_mean) * len(W) / self._y_n

    def _admit(self, keys: Iterable[Hashable]) -> None:
        """Give new numeric features a column (before y); their past values were 0."""
        if self._spec is not None:  # a formula fixes the columns
            return
        new = {k for k in keys if k != self.group and k not in self._col
               and (self._fixed_set is None or k in self._fixed_set)}
        if not new:
            return
        d_f = len(self._features)
        for k in sorted(new, key=repr):  # sorted: column order must not depend on dict order
            self._col[k] = len(self._features)
            self._features.append(k)
        at = [d_f] * len(new)
        self._mean = np.insert(self._mean, at, 0.0, axis=1)
        self._C = np.insert(np.insert(self._C, at, 0.0, axis=1), at, 0.0, axis=2)

    def _row(self, key: Hashable) -> int:
        i = self._groups.get(key)
        if i is not None:
            return i
        i = self._G
        if i == len(self._n):
            cap = max(16, 2 * i)
            grow = cap - i
            D = self._mean.shape[1]
            self._n = np.concatenate([self._n, np.zeros(grow)])
            self._mean = np.concatenate([self._mean, np.zeros((grow, D))])
            self._C = np.concatenate([self._C, np.zeros((grow, D, D))])
            self._t = np.concatenate([self._t, np.zeros(grow)])
        self._t[i] = self._seen
        self._groups[key] = i
        self._G += 1
        return i

    # -- refresh ------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Refit now (warm start); True on success. Learning calls this on schedule."""
        gap = min(self.refresh_every, max(self.first_refresh, self._seen))
        self._next_refresh = self._seen + gap
        try:
            self._model, self.fit_ = self._refit()
        except Exception as exc:  # broad on purpose: a failed refit must not stop the stream
            self.last_error_ = f"{type(exc).__name__}: {exc}"
            log.warning("refresh after %d events failed, keeping the previous model: %s",
                        self._seen, self.last_error_)
            return False
        self.last_error_ = None
        self.n_refreshes_ += 1
        return True

    def _refit(self) -> tuple[_Model, FitResult]:
        n, mean, C = self._state(np.arange(self._G))
        live = n > 0
        n, mean, C = n[live], mean[live], C[live]
        if self._spec is not None:
            return self._refit_formula(n, mean, C)
        names = self._names()
        index = {name: j for j, name in enumerate(names)}
        fixed_cols = self._fixed_columns(n, mean, C)
        random = [t if t == INTERCEPT else names[self._col[t]] for t in self._random]
        spec = ModelSpec(_RESPONSE, [INTERCEPT, *(names[j] for j in fixed_cols)], random,
                         _GROUP, self.covariance, str(self.method))
        cols = [index[c] for c in spec.covariates] + [len(names)]
        stats = GroupStats([str(i) for i in range(len(n))], n, mean[:, cols],
                           C[:, cols][:, :, cols], np.full(len(n), np.nan))
        res = self._fit(stats, spec)
        kernel = Kernel.for_spec(spec, res.beta, res.G, res.sigma2, z_centre=res.z_centre,
                                 G_centred=res.G_centred)
        return _Model(kernel.on_columns(cols, len(names) + 1)), res

    def _refit_formula(self, n: Array, mean: Array, C: Array) -> tuple[_Model, FitResult]:
        spec = self._spec
        assert spec is not None
        stats = GroupStats([str(i) for i in range(len(n))], n, mean, C, np.full(len(n), np.nan))
        res = self._fit(stats, spec)
        return _Model(Kernel.for_spec(spec, res.beta, res.G, res.sigma2, z_centre=res.z_centre,
                                      G_centred=res.G_centred)), res

    def _fit(self, stats: GroupStats, spec: ModelSpec) -> FitResult:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = fit(stats, spec, start=self.fit_, ranef=False)
        for w in caught:
            log.info("refresh after %d events: %s", self._seen, w.message)
        if not (res.sigma2 > 0 and np.isfinite(res.beta).all() and np.isfinite(res.G).all()):
            raise ValueError(f"the fit gave sigma2={res.sigma2}, beta={res.beta}, G={res.G}")
        return res

    def _names(self) -> list[str]:
        """Term names for the spec: the features' str() when those are usable, else x0, x1, ..."""
        raw = [str(f) for f in self._features]
        reserved = {INTERCEPT, "0", _RESPONSE, _GROUP}
        if len(set(raw)) == len(raw) and all(r and r == r.strip() and r not in reserved
                                             for r in raw):
            return raw
        return [f"x{j}" for j in range(len(raw))]

    def _fixed_columns(self, n: Array, mean: Array, C: Array) -> list[int]:
        """Feature columns for the fixed part: random slopes first, then the rest in order,
        leaving out constant ones and ones collinear with those already kept."""
        if not len(n):
            return []
        N = n.sum()
        M = (n[:, None] * mean).sum(axis=0) / N
        dev = mean - M
        Cp = C.sum(axis=0) + np.einsum("g,ga,gb->ab", n, dev, dev)
        slopes = [self._col[t] for t in self._random if t != INTERCEPT]
        wanted = slopes + [j for j in range(len(self._features)) if j not in slopes]
        kept: list[int] = []
        for j in wanted:
            if self._fixed_set is not None and self._features[j] not in self._fixed_set:
                continue
            v = Cp[j, j]
            if not math.sqrt(max(v, 0.0) / N) > 1e-6 * max(1.0, abs(M[j])):  # constant
                continue
            if kept:
                c = Cp[kept, j]
                if v - c @ np.linalg.solve(Cp[np.ix_(kept, kept)], c) <= _COLLINEAR * v:
                    continue
            kept.append(j)
        return kept

    def _state(self, idx: np.ndarray) -> tuple[Array, Array, Array]:
        """(n, mean, C) of group rows idx, aged to the current event when forgetting."""
        n, mean, C = self._n[idx], self._mean[idx], self._C[idx]
        if self.half_life is not None:
            f = decay_factor(self._seen - self._t[idx], self.half_life)
            n, C = n * f, C * f[:, None, None]
        return n, mean, C

    # -- prediction ---------------------------------------------------------------------------

    def predict_one(self, x: dict[Hashable, Any]) -> float:
        if self._spec is not None:
            i = self._groups.get(self._key(x), -1)
            row = np.array([self._design_row(x)])
        else:
            i = self._groups.get(_group_key(x.get(self.group)), -1)
            row = np.zeros((1, len(self._features)))
        if self._model is not None and self._spec is None:
            for k, v in x.items():
                j = self._col.get(k)
                if j is not None and k != self.group and _is_number(v):
                    row[0, j] = _finite(v)
        if self._model is None or i < 0:
            return float(self._predict(row, np.array([i], dtype=np.intp))[0])
        # one known group: skip the batch path's grouping, it costs more than the algebra
        b = self._model.blups(*self._state(np.array([i], dtype=np.intp)))
        return float(self._model.fixed_part(row)[0] + self._model.random_design(row)[0] @ b[0])

    def predict_many(self, X: pd.DataFrame) -> pd.Series:
        rows = np.array([self._groups.get(_group_key(k), -1) for k in self._group_column(X)],
                        dtype=np.intp)
        F = self._feature_matrix(X) if self._model is not None else None
        return pd.Series(self._predict(F, rows), index=X.index, dtype=float)

    def _predict(self, X: Array | None, rows: np.ndarray) -> Array:
        known = rows >= 0
        if self._model is None or X is None:
            out = np.full(len(rows), self._y_mean)
            if known.any():
                idx = rows[known]
                out[known] = np.where(self._n[idx] > 0, self._mean[idx, -1], self._y_mean)
            return out
        out = self._model.fixed_part(X)
        if known.any():
            u, inv = np.unique(rows[known], return_inverse=True)
            b = self._model.blups(*self._state(u))
            out[known] += (self._model.random_design(X[known]) * b[inv]).sum(axis=1)
        return out

    def _group_column(self, X: pd.DataFrame) -> list[Hashable]:
        if self._spec is not None:
            cols = [[_group_key(k) for k in X[c].tolist()] if c in X.columns else [None] * len(X)
                    for c in self._factors]
            return cols[0] if len(cols) == 1 else list(zip(*cols))
        if self.group not in X.columns:
            return [None] * len(X)
        return [_group_key(k) for k in X[self.group].tolist()]

    def _feature_matrix(self, X: pd.DataFrame) -> Array:
        if self._spec is not None:
            return self._design_matrix(X)
        F = np.zeros((len(X), len(self._features)))
        for j, f in enumerate(self._features):
            if f in X.columns and f != self.group:
                F[:, j] = _column(X[f])
        return F

    # -- a formula's design -------------------------------------------------------------------

    def _key(self, x: Mapping[Hashable, Any]) -> Hashable:
        """The group of an event under a formula: the term's factor (a tuple for ``g:h``)."""
        if len(self._factors) == 1:
            return _group_key(x.get(self._factors[0]))
        return tuple(_group_key(x.get(c)) for c in self._factors)

    def _code(self, column: str, value: Any) -> int:
        spec = self._spec
        assert spec is not None
        declared = spec.levels[column]
        if value is not None and str(value) in declared:
            return declared.index(str(value))
        raise ValueError(f"{column!r} = {value!r} is not one of its declared levels "
                         f"{list(declared)}; declare every level in the formula or in levels=")

    def _design_row(self, x: Mapping[Hashable, Any]) -> list[float]:
        """An event's design columns (all but the response), as the formula codes them:
        numeric columns as they are (missing or non-finite: 0), indicators of declared levels."""
        out = []
        for atoms in self._atoms:
            v = 1.0
            for column, code in atoms:
                raw = x.get(column)
                if code is None:
                    v *= _finite(raw) if _is_number(raw) else 0.0
                else:
                    v *= 1.0 if self._code(column, raw) == code else 0.0
            out.append(v)
        return out

    def _design_matrix(self, X: pd.DataFrame) -> Array:
        spec = self._spec
        assert spec is not None
        numeric = {c: (_column(X[c]) if c in X.columns else np.zeros(len(X)))
                   for c in spec.numeric_inputs[:-1]}
        numeric[spec.response] = np.zeros(len(X))
        codes = {}
        for c in spec.categorical_inputs:
            values = X[c].tolist() if c in X.columns else [None] * len(X)
            codes[c] = np.array([self._code(c, v) for v in values], dtype=np.intp)
        return spec.design_matrix(numeric, codes)[:, :-1]
