"""Plots of a live model: shrinkage, caterpillar, and the trace of model versions (matplotlib).

Each ``*_plot`` function turns data into a `matplotlib.figure.Figure` built without pyplot, so it
creates no global figure state (safe in a server or a thread) and needs no display; `save` writes
it. The numbers behind the shrinkage and caterpillar plots come from `shrinkage_data` and
`caterpillar_data`, so they can be checked or reused without drawing. `plot_command` is what
``streamlme plot KIND --config FILE -o out.png`` runs: it reads the current model and the group
statistics from the configured store.

>>> import numpy as np
>>> from streamlme import GroupStats, ModelSpec
>>> from streamlme.estimate import fit
>>> from streamlme.model import ModelRecord
>>> spec = ModelSpec("y", ["1"], ["1"], "g")
>>> rng = np.random.default_rng(0)
>>> g = np.repeat(np.arange(8), 5)
>>> stats = GroupStats.from_rows(g, (rng.normal(size=8)[g] + rng.normal(size=40))[:, None])
>>> model = ModelRecord.from_fit(fit(stats, spec), spec)
>>> fig = shrinkage_plot(stats, spec, model)
>>> fig.axes[0].get_title().splitlines()[0]
'Shrinkage of 8 groups'
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from numpy.typing import NDArray

from streamlme.model import ModelRecord
from streamlme.spec import INTERCEPT, ModelSpec, term_name
from streamlme.stats import GroupStats

Array = NDArray[np.float64]

KINDS = ("shrinkage", "caterpillar", "trace")
#: Two-sided 95% normal quantile, Phi^-1(0.975).
Z_95 = 1.959963984540054
#: Groups a caterpillar plot shows when ``top`` is not given (those with the largest |effect|).
CATERPILLAR_MAX = 200
#: A caterpillar plot names its groups on the axis up to this many.
CATERPILLAR_LABELS = 40
#: Points a shrinkage plot draws at most (a fixed-seed random subsample beyond that).
SHRINKAGE_MAX_POINTS = 20_000

_BLUE, _ORANGE, _GREY = "#1f5f99", "#d95f02", "#8c8c8c"


class PlotError(ValueError):
    """Nothing to plot, or data that does not fit the model; the message says what to do."""


# -- shrinkage ----------------------------------------------------------------------------


@dataclass
class ShrinkageData:
    """Per group: its own (no-pooling) estimate, the mixed model's, and its size.

    ``raw`` is the group's own least-squares estimate of its offset at its mean covariate: with a
    random intercept that is exactly its mean residual ȳ_j − x̄_j′β, because a least-squares fit
    with an intercept passes through the group's means (so it exists even where a slope is not
    identifiable). ``blup`` is the mixed model's estimate of the same quantity, z̄_j′b_j; for a
    random-intercept model that is the BLUP b_j itself. ``reliability`` is that of the plotted
    quantity, 1 − Var(z̄_j′(b_j − b)) / z̄_j′G z̄_j (1: the group's own data decide, 0: the prior
    does); for a random intercept it is `blup.Effects`'s ``shrinkage``.
    """

    keys: list[str]
    raw: Array
    blup: Array
    n: Array
    reliability: Array


def shrinkage_data(stats: GroupStats, spec: ModelSpec, model: ModelRecord) -> ShrinkageData:
    """The numbers `shrinkage_plot` draws (see `ShrinkageData`)."""
    _check_stats(stats, spec)
    eff = model.effects(stats)
    cols = spec.columns
    zbar = np.column_stack([np.ones(len(stats)) if t == INTERCEPT else stats.mean[:, cols.index(t)]
                            for t in spec.random])
    xbar = np.column_stack([np.ones(len(stats)) if t == INTERCEPT else stats.mean[:, cols.index(t)]
                            for t in spec.fixed])
    rbar = stats.mean[:, -1] - xbar @ model.beta
    if INTERCEPT in spec.random:
        raw = rbar
    else:
        # no intercept to pass through the means: fit the group's residuals on z by least squares
        # (pseudo-inverse where a group cannot identify every slope) and read it at z̄
        iz = [cols.index(t) for t in spec.random]
        a = np.zeros(len(cols))
        a[-1] = 1.0
        for k, t in enumerate(spec.fixed):
            if t != INTERCEPT:
                a[cols.index(t)] -= model.beta[k]
        Czz = stats.C[:, iz][:, :, iz]
        Czr = stats.C[:, iz, :] @ a
        n = stats.n
        ZtZ = n[:, None, None] * zbar[:, :, None] * zbar[:, None, :] + Czz
        Ztr = n[:, None] * zbar * rbar[:, None] + Czr
        own = np.einsum("gab,gb->ga", np.linalg.pinv(ZtZ), Ztr)
        raw = np.einsum("ga,ga->g", zbar, own)
    blup = np.einsum("ga,ga->g", zbar, eff.b)
    prior = np.einsum("ga,ab,gb->g", zbar, model.G, zbar)
    cond = np.einsum("ga,gab,gb->g", zbar, eff.cov, zbar)
    reliability = np.where(prior > 0, 1.0 - cond / np.where(prior > 0, prior, 1.0), 0.0)
    return ShrinkageData(list(stats.keys), raw, blup, stats.n.copy(), reliability)


def shrinkage_plot(
    stats: GroupStats, spec: ModelSpec, model: ModelRecord, max_points: int = SHRINKAGE_MAX_POINTS
) -> Figure:
    """Each group's own estimate against the mixed model's: the picture that explains pooling.

    x is the group's raw mean residual ȳ_j − x̄_j′β (no pooling), y its BLUP (partial pooling;
    for random slopes, the group's estimated offset z̄_j′b_j at its own mean covariate, see
    `ShrinkageData`). Points on the identity line keep their own estimate; points on the
    horizontal line at 0 are pooled completely. Point area grows with the group's size n, colour
    shows its reliability. Beyond ``max_points`` groups a fixed-seed random subsample is drawn,
    and the title says so.
    """
    data = shrinkage_data(stats, spec, model)
    idx = np.arange(len(data.keys))
    if len(idx) > max_points:
        idx = np.sort(np.random.default_rng(0).choice(len(idx), max_points, replace=False))
    fig = Figure(figsize=(7.5, 6.0), layout="constrained")
    ax = fig.add_subplot()
    n_max = float(data.n.max())
    sc = ax.scatter(data.raw[idx], data.blup[idx], s=_area(data.n[idx], n_max),
                    c=data.reliability[idx], cmap="viridis", norm=Normalize(0.0, 1.0),
                    alpha=0.75, edgecolors="white", linewidths=0.4, zorder=3)
    lo = float(min(data.raw.min(), data.blup.min(), 0.0))
    hi = float(max(data.raw.max(), data.blup.max(), 0.0))
    pad = 0.05 * (hi - lo or 1.0)
    lims = (lo - pad, hi + pad)
    identity = ax.plot(lims, lims, color=_GREY, linestyle="--", linewidth=1.0, zorder=1,
                       label="identity: no pooling (own estimate)")[0]
    zero = ax.axhline(0.0, color=_ORANGE, linewidth=1.0, zorder=1,
                      label="0: complete pooling (fixed part only)")
    ax.set_xlim(lims)
    ax.set_ylim(lims)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(r"raw mean residual  $\bar y_j - \bar x_j'\beta$  (no pooling)")
    ylabel = (r"BLUP  $b_j$" if spec.random == (INTERCEPT,)
              else r"BLUP at the group's mean  $\bar z_j'b_j$")
    ax.set_ylabel(f"{ylabel}  (partial pooling)")
    shown = "" if len(idx) == len(data.keys) else f", {len(idx):,} drawn at random"
    ax.set_title(f"Shrinkage of {len(data.keys):,} groups{shown}\n{_model_line(spec, model)}",
                 fontsize=11)
    ax.grid(alpha=0.25)
    sizes = [Line2D([], [], marker="o", linestyle="", color=_GREY, alpha=0.6,
                    markersize=math.sqrt(float(_area(np.array([v]), n_max)[0])),
                    label=f"n = {v:,.0f}") for v in _size_levels(data.n)]
    ax.legend(handles=[identity, zero, *sizes], loc="upper left", fontsize=8, framealpha=0.9)
    fig.colorbar(sc, ax=ax, shrink=0.8, label="reliability (1 = own data decide, 0 = prior)")
    return fig


def _area(n: Array, n_max: float) -> Array:
    # area by sqrt(n): group sizes span orders of magnitude, and area by n hides small groups
    return 6.0 + 220.0 * np.sqrt(n / n_max)


def _size_levels(n: Array) -> list[float]:
    levels = sorted({float(v) for v in np.quantile(n, [0.0, 0.5, 1.0])})
    return [v for v in levels if v > 0]


# -- caterpillar --------------------------------------------------------------------------


@dataclass
class CaterpillarData:
    """The groups a caterpillar plot shows, sorted by effect (ascending), with 95% intervals.

    ``low``/``high`` are effect ∓ Z_95 · sd, sd from the conditional covariance
    Var(b_j − b) = σ² Λ P_j⁻¹ Λ′; ``n_groups`` counts all groups, shown or not.
    """

    term: str
    keys: list[str]
    effect: Array
    low: Array
    high: Array
    n: Array
    n_groups: int

    @property
    def subset(self) -> bool:
        return len(self.keys) < self.n_groups


def caterpillar_data(
    stats: GroupStats, spec: ModelSpec, model: ModelRecord, term: int | str = 0,
    top: int | None = None,
) -> CaterpillarData:
    """The numbers `caterpillar_plot` draws: the ``top`` largest |effect| (default: all groups,
    up to `CATERPILLAR_MAX`), sorted by effect."""
    _check_stats(stats, spec)
    k = _term_index(spec, term)
    if top is not None and top < 1:
        raise PlotError(f"top must be at least 1, got {top}")
    eff = model.effects(stats)
    b = eff.b[:, k]
    sd = np.sqrt(np.maximum(eff.cov[:, k, k], 0.0))
    keep = top if top is not None else CATERPILLAR_MAX
    idx = np.argsort(-np.abs(b), kind="stable")[:keep]
    idx = idx[np.argsort(b[idx], kind="stable")]
    return CaterpillarData(spec.random_names[k], [eff.keys[i] for i in idx], b[idx],
                           b[idx] - Z_95 * sd[idx], b[idx] + Z_95 * sd[idx], eff.n[idx],
                           len(eff.keys))


def caterpillar_plot(
    stats: GroupStats, spec: ModelSpec, model: ModelRecord, term: int | str = 0,
    top: int | None = None,
) -> Figure:
    """Each group's random effect with its 95% interval, sorted: which groups differ, and how sure.

    ``term`` is the random term's index or name (e.g. ``"age"``; ``"1"`` or ``"(Intercept)"``).
    With more than ``top`` groups (default `CATERPILLAR_MAX`) only the ``top`` largest |effect|
    are shown and the title says so. Intervals that exclude 0 are drawn in colour; group names
    label the axis when at most `CATERPILLAR_LABELS` are shown.
    """
    data = caterpillar_data(stats, spec, model, term, top)
    m = len(data.keys)
    labelled = m <= CATERPILLAR_LABELS
    fig = Figure(figsize=(7.5, max(3.0, 0.22 * m + 1.6) if labelled else 7.0),
                 layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(m)
    clear = (data.low > 0) | (data.high < 0)
    colours = np.where(clear, _BLUE, _GREY)
    ax.hlines(y, data.low, data.high, colors=colours, linewidth=1.6 if labelled else 0.8,
              zorder=2)
    ax.scatter(data.effect, y, c=colours, s=18 if labelled else 6, zorder=3)
    ax.axvline(0.0, color=_ORANGE, linewidth=1.0, zorder=1)
    if labelled:
        ax.set_yticks(y, data.keys, fontsize=8)
    else:
        ax.set_yticks([])
    ax.set_ylabel("group (sorted by effect)")
    ax.set_ylim(-1, m)
    others = [c for c in spec.random if c != INTERCEPT]
    at = (f" at {', '.join(f'{c} = 0' for c in others)}"
          if data.term == term_name(INTERCEPT) and others else "")
    ax.set_xlabel(f"random effect: {data.term}{at}   (BLUP and 95% interval)")
    shown = (f"the {m:,} largest |effect| of {data.n_groups:,} groups" if data.subset
             else f"all {m:,} groups")
    ax.set_title(f"{data.term}: {shown}\n{_model_line(spec, model)}", fontsize=11)
    ax.grid(axis="x", alpha=0.25)
    ax.legend(handles=[
        Line2D([], [], color=_BLUE, marker="o", markersize=4, label="interval excludes 0"),
        Line2D([], [], color=_GREY, marker="o", markersize=4, label="interval includes 0"),
    ], loc="lower right", fontsize=8)
    return fig


def _term_index(spec: ModelSpec, term: int | str) -> int:
    if isinstance(term, (int, np.integer)):
        if not 0 <= term < len(spec.random):
            raise PlotError(f"term {term} is out of range: the model has {len(spec.random)} "
                            f"random term(s) {spec.random_names}")
        return int(term)
    names = spec.random_names
    for i, (t, name) in enumerate(zip(spec.random, names)):
        if term in (t, name):
            return i
    raise PlotError(f"term {term!r} is not a random term of the model; choose one of {names}")


# -- trace --------------------------------------------------------------------------------


def trace_plot(records: Sequence[ModelRecord], x: str = "version") -> Figure:
    """Variance components, correlations and fixed effects across model versions.

    One panel holds σ² and the diagonal of G (log scale when all are positive), one the
    correlations of G (unstructured models with several random terms), then one panel per
    fixed effect with its ±1.96 se band. ``x`` is ``"version"`` or ``"time"`` (created_at, UTC).
    A single version is drawn as points.
    """
    if not records:
        raise PlotError("no model versions to plot: the store holds no model yet; "
                        "run a refresh first (streamlme refresh --config FILE --once)")
    if x not in ("version", "time"):
        raise PlotError(f"x must be 'version' or 'time', got {x!r}")
    recs = sorted(records, key=lambda r: (r.version, r.created_at))
    first = recs[0]
    fixed, random = list(first.fit["fixed"]), list(first.fit["random"])
    odd = [r.version for r in recs if list(r.fit["fixed"]) != fixed
           or list(r.fit["random"]) != random]
    if odd:
        raise PlotError(f"model versions {odd} have other terms than version {first.version} "
                        f"({fixed} | {random}); plot versions of one model")
    xs: list[Any] = ([r.version for r in recs] if x == "version"
                     else [datetime.fromtimestamp(r.created_at, tz=timezone.utc) for r in recs])
    sigma2 = np.array([r.sigma2 for r in recs])
    G = np.array([r.G for r in recs])
    beta = np.array([r.beta for r in recs])
    se = np.array([[r.fit.get("beta_se", {}).get(name, np.nan) for name in fixed] for r in recs])
    q = len(random)
    corr = q > 1 and first.fit.get("covariance", "unstructured") == "unstructured"
    panels = 1 + int(corr) + len(fixed)
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.1 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    style: dict[str, Any] = {"marker": "o", "markersize": 3.5, "linewidth": 1.4}

    ax = axes[0]
    ax.plot(xs, sigma2, label="σ² (residual)", color="black", **style)
    for i, name in enumerate(random):
        ax.plot(xs, G[:, i, i], label=f"G[{name}]", **style)
    if (sigma2 > 0).all() and (np.diagonal(G, axis1=1, axis2=2) > 0).all():
        ax.set_yscale("log")
    ax.set_title("variance components")
    ax.set_ylabel("variance")
    ax.legend(fontsize=8)
    used = 1
    if corr:
        ax = axes[used]
        sd = np.sqrt(np.maximum(np.diagonal(G, axis1=1, axis2=2), 0.0))
        for i in range(q):
            for j in range(i):
                with np.errstate(invalid="ignore", divide="ignore"):
                    rho = G[:, i, j] / (sd[:, i] * sd[:, j])
                ax.plot(xs, rho, label=f"corr({random[j]}, {random[i]})", **style)
        ax.axhline(0.0, color=_GREY, linewidth=0.8)
        ax.set_ylim(-1.05, 1.05)
        ax.set_title("random-effect correlations")
        ax.set_ylabel("correlation")
        ax.legend(fontsize=8)
        used += 1
    for k, name in enumerate(fixed):
        ax = axes[used + k]
        ax.plot(xs, beta[:, k], color=_BLUE, **style)
        if np.isfinite(se[:, k]).all() and len(recs) == 1:
            ax.errorbar(xs, beta[:, k], yerr=Z_95 * se[:, k], color=_BLUE, capsize=4,
                        linestyle="", label="95% interval")
            ax.legend(fontsize=8)
        elif np.isfinite(se[:, k]).all():
            ax.fill_between(xs, beta[:, k] - Z_95 * se[:, k], beta[:, k] + Z_95 * se[:, k],
                            color=_BLUE, alpha=0.18, linewidth=0, label="95% interval")
            ax.legend(fontsize=8)
        ax.set_title(f"β: {name}")
        ax.set_ylabel("estimate")
    for ax in axes[panels:]:
        ax.set_visible(False)
    for ax in axes[:panels]:
        ax.grid(alpha=0.25)
        if x == "version":
            ax.set_xlabel("model version")
            ax.xaxis.get_major_locator().set_params(integer=True)
            if len(recs) == 1:
                ax.set_xlim(xs[0] - 1, xs[0] + 1)
        else:
            # the date sits at the axis' right end; a label there would collide with it
            locator = AutoDateLocator(minticks=3, maxticks=6)
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    span = (f"version {recs[0].version}" if len(recs) == 1
            else f"versions {recs[0].version} to {recs[-1].version} ({len(recs)} kept)")
    when = "" if x == "version" else ", by creation time (UTC)"
    fig.suptitle(f"Model history: {span}{when}, {first.fit.get('method', '')} fit of "
                 f"{first.spec.formula}", fontsize=11)
    return fig


# -- files and the command line -----------------------------------------------------------


def save(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix: .png, .svg, .pdf); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def store_figure(kind: str, store: Any, *, term: int | str = 0, top: int | None = None,
                 x: str = "version") -> Figure:
    """The ``kind`` plot (one of `KINDS`) of what ``store`` holds now: its current model and
    every group's statistics (shrinkage, caterpillar), or every stored model version (trace)."""
    if kind not in KINDS:
        raise PlotError(f"unknown plot {kind!r}; choose one of {', '.join(KINDS)}")
    from streamlme.refresh import current_model, read_stats

    if kind == "trace":
        records = [ModelRecord.from_json(data, version=v) for v in store.model_versions()
                   if (data := store.get_model(v)) is not None]
        return trace_plot(records, x=x)
    model = current_model(store)
    if model is None:
        raise PlotError("the store holds no model yet; "
                        "run a refresh first (streamlme refresh --config FILE --once)")
    stats = read_stats(store, len(model.spec.columns))
    if not len(stats):
        raise PlotError("the store holds no group statistics; consume some events first")
    stats, left_out = finite_groups(stats, model)
    if not len(stats):
        raise PlotError(f"all {len(left_out)} groups have statistics that are not finite; "
                        "rebuild the namespace (streamlme consume --rebuild)")
    if kind == "shrinkage":
        fig = shrinkage_plot(stats, model.spec, model)
    else:
        fig = caterpillar_plot(stats, model.spec, model, term=term, top=top)
    if left_out:
        ax = fig.axes[0]
        shown = ", ".join(repr(k) for k in left_out[:3]) + (", ..." if len(left_out) > 3 else "")
        ax.set_title(f"{ax.get_title()}\n{len(left_out):,} group(s) left out, their statistics "
                     f"or effects not finite: {shown}", fontsize=11)
    return fig


def finite_groups(stats: GroupStats, model: ModelRecord) -> tuple[GroupStats, list[str]]:
    """``stats`` without the groups whose statistics, or whose effects under ``model``, are not
    finite (an overflowing event reached the store), and the keys of those left out."""
    from streamlme.store.shards import take

    with np.errstate(all="ignore"):
        ok = ((stats.n >= 0) & np.isfinite(stats.n) & np.isfinite(stats.mean).all(axis=1)
              & np.isfinite(stats.C).all(axis=(1, 2)))
        if ok.any() and stats.d == len(model.spec.columns):
            kept = take(stats, np.flatnonzero(ok))
            eff = model.effects(kept)
            good = np.isfinite(eff.b).all(axis=1) & np.isfinite(eff.cov).all(axis=(1, 2))
            ok[np.flatnonzero(ok)[~good]] = False
    if ok.all():
        return stats, []
    return take(stats, np.flatnonzero(ok)), [k for k, good in zip(stats.keys, ok) if not good]


def plot_command(kind: str, config_path: str | os.PathLike[str] | None,
                 out_path: str | os.PathLike[str], *, term: int | str = 0,
                 top: int | None = None) -> Path:
    """``streamlme plot KIND --config FILE -o OUT``: draw from the configured store, write OUT.

    Raises `PlotError` (nothing to plot) or `streamlme.config.ConfigError` with a message fit
    for the user; returns the path written.
    """
    from streamlme.config import load_config
    from streamlme.store.connect import open_store

    if kind not in KINDS:
        raise PlotError(f"unknown plot {kind!r}; choose one of {', '.join(KINDS)}")
    config = load_config(config_path)
    if config.redis is None and not config.store.snapshot:
        raise PlotError(f"{config.source}: embedded mode without store.snapshot keeps nothing "
                        "between commands, so there is nothing to plot; set [store] snapshot")
    store = open_store(config)
    try:
        fig = store_figure(kind, store, term=term, top=top)
    finally:
        client = getattr(store, "client", None)
        if client is not None:
            client.close()
    return save(fig, out_path)


def _check_stats(stats: GroupStats, spec: ModelSpec) -> None:
    if not len(stats):
        raise PlotError("no groups to plot")
    if stats.d != len(spec.columns):
        raise PlotError(f"the statistics have {stats.d} columns but the model needs "
                        f"{len(spec.columns)} ({', '.join(spec.columns)}): they belong to "
                        "another model")


def _model_line(spec: ModelSpec, model: ModelRecord) -> str:
    version = f"model v{model.version}, " if model.version else ""
    method = model.fit.get("method", "")
    return f"{version}{method} {spec.formula}".strip()
