"""Plots: the numbers behind each figure are right, figures render, the CLI entry reads a store."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from streamlme import plots
from streamlme.blup import group_effects
from streamlme.config import load_config
from streamlme.demo import SPEC, simulate
from streamlme.estimate import fit
from streamlme.model import ModelRecord
from streamlme.refresh import RefreshSettings, refresh_once
from streamlme.spec import ModelSpec
from streamlme.stats import GroupStats
from streamlme.store.memory import MemoryStore

INTERCEPT_ONLY = ModelSpec("los", ["1", "age", "severity"], ["1"], "hospital")
SLOPE_ONLY = ModelSpec("los", ["1", "age", "severity"], ["age"], "hospital")


@dataclass
class Fitted:
    rows: pd.DataFrame
    stats: GroupStats


@pytest.fixture(scope="module")
def data() -> Fitted:
    sc = simulate(n_groups=60, n_events=6000, seed=7)
    rows = pd.DataFrame({"hospital": [f"H{h:02d}" for h in sc.hospital], "age": sc.age,
                         "severity": sc.severity, "los": sc.los})
    stats = GroupStats.from_rows(rows["hospital"].to_numpy(), rows[list(SPEC.columns)].to_numpy())
    return Fitted(rows, stats)


def record(stats: GroupStats, spec: ModelSpec, version: int = 1, created_at: float = 1.7e9
           ) -> ModelRecord:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a singular fit is still a model to plot
        rec = ModelRecord.from_fit(fit(stats, spec), spec, created_at=created_at)
    rec.version = version
    return rec


def mean_residuals(rows: pd.DataFrame, beta: np.ndarray, keys: list[str]) -> np.ndarray:
    """ȳ_j − x̄_j'β straight from the rows, for spec fixed = 1 + age + severity."""
    resid = rows["los"] - (beta[0] + beta[1] * rows["age"] + beta[2] * rows["severity"])
    return resid.groupby(rows["hospital"]).mean().loc[keys].to_numpy()


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > min_bytes
    height, width = imread(path).shape[:2]
    assert 300 < width < 4000 and 300 < height < 4000


# -- shrinkage ------------------------------------------------------------------------------


def test_shrinkage_random_intercept_plots_blups_against_mean_residuals(data, tmp_path):
    rec = record(data.stats, INTERCEPT_ONLY)
    d = plots.shrinkage_data(data.stats, INTERCEPT_ONLY, rec)
    eff = group_effects(data.stats, INTERCEPT_ONLY, rec.beta, rec.G, rec.sigma2)
    np.testing.assert_allclose(d.blup, eff.b[:, 0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d.reliability, eff.shrinkage, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d.raw, mean_residuals(data.rows, rec.beta, d.keys), atol=1e-9)
    # shrinkage pulls every group towards 0, small groups most
    assert (np.abs(d.blup) <= np.abs(d.raw) + 1e-12).all()
    small, big = d.n < np.quantile(d.n, 0.2), d.n > np.quantile(d.n, 0.8)
    assert np.mean(d.blup[small] / d.raw[small]) < np.mean(d.blup[big] / d.raw[big])

    fig = plots.shrinkage_plot(data.stats, INTERCEPT_ONLY, rec)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.collections[0].get_offsets(), np.column_stack([d.raw, d.blup]))
    sizes = ax.collections[0].get_sizes()
    assert np.all(np.diff(sizes[np.argsort(d.n)]) >= 0), "point size must grow with n"
    assert "no pooling" in ax.get_xlabel() and "BLUP" in ax.get_ylabel()
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {
        "identity: no pooling (own estimate)", "0: complete pooling (fixed part only)"}
    assert_png(plots.save(fig, tmp_path / "shrinkage.png"))


def test_shrinkage_random_slope_plots_the_offset_at_the_group_mean(data):
    rec = record(data.stats, SPEC)
    d = plots.shrinkage_data(data.stats, SPEC, rec)
    eff = group_effects(data.stats, SPEC, rec.beta, rec.G, rec.sigma2)
    mean_age = data.rows.groupby("hospital")["age"].mean().loc[d.keys].to_numpy()
    np.testing.assert_allclose(d.blup, eff.b[:, 0] + mean_age * eff.b[:, 1], atol=1e-9)
    np.testing.assert_allclose(d.raw, mean_residuals(data.rows, rec.beta, d.keys), atol=1e-9)
    assert not np.allclose(d.blup, eff.b[:, 0]), "with a slope, b_0 alone is the offset at age 0"
    assert ((d.reliability >= 0) & (d.reliability <= 1)).all()


def test_shrinkage_without_random_intercept_uses_each_groups_own_least_squares(data):
    rec = record(data.stats, SLOPE_ONLY)
    d = plots.shrinkage_data(data.stats, SLOPE_ONLY, rec)
    beta = rec.beta
    expected = []
    for key in d.keys:
        g = data.rows[data.rows["hospital"] == key]
        r = (g["los"] - beta[0] - beta[1] * g["age"] - beta[2] * g["severity"]).to_numpy()
        age = g["age"].to_numpy()
        slope = np.linalg.lstsq(age[:, None], r, rcond=None)[0][0]
        expected.append(age.mean() * slope)
    np.testing.assert_allclose(d.raw, expected, rtol=1e-8, atol=1e-10)


def test_shrinkage_subsamples_many_groups_and_says_so(data):
    rec = record(data.stats, INTERCEPT_ONLY)
    fig = plots.shrinkage_plot(data.stats, INTERCEPT_ONLY, rec, max_points=25)
    assert len(fig.axes[0].collections[0].get_offsets()) == 25
    assert "25 drawn at random" in fig.axes[0].get_title()


# -- caterpillar ----------------------------------------------------------------------------


def test_caterpillar_sorted_with_95_percent_intervals(data, tmp_path):
    rec = record(data.stats, SPEC)
    eff = group_effects(data.stats, SPEC, rec.beta, rec.G, rec.sigma2)
    d = plots.caterpillar_data(data.stats, SPEC, rec, term="age")
    assert d.term == "age" and not d.subset and len(d.keys) == len(data.stats)
    assert np.all(np.diff(d.effect) >= 0)
    rows = [eff.keys.index(k) for k in d.keys]
    np.testing.assert_allclose(d.effect, eff.b[rows, 1])
    half = 1.96 * np.sqrt(eff.cov[rows, 1, 1])
    np.testing.assert_allclose(d.high - d.effect, half, rtol=1e-4)
    np.testing.assert_allclose(d.effect - d.low, half, rtol=1e-4)

    fig = plots.caterpillar_plot(data.stats, SPEC, rec, term="age")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.collections[-1].get_offsets()[:, 0], d.effect)
    assert ax.get_title().startswith(f"age: all {len(data.stats)} groups")
    assert_png(plots.save(fig, tmp_path / "caterpillar.png"))


def test_caterpillar_top_keeps_the_largest_effects_and_says_so(data):
    rec = record(data.stats, SPEC)
    eff = group_effects(data.stats, SPEC, rec.beta, rec.G, rec.sigma2)
    d = plots.caterpillar_data(data.stats, SPEC, rec, term=0, top=12)
    largest = {eff.keys[i] for i in np.argsort(-np.abs(eff.b[:, 0]))[:12]}
    assert set(d.keys) == largest and d.subset and d.n_groups == len(data.stats)
    assert np.all(np.diff(d.effect) >= 0)
    fig = plots.caterpillar_plot(data.stats, SPEC, rec, term="(Intercept)", top=12)
    ax = fig.axes[0]
    assert "the 12 largest |effect| of 60 groups" in ax.get_title()
    assert [t.get_text() for t in ax.get_yticklabels()] == d.keys
    assert "at age = 0" in ax.get_xlabel()


def test_caterpillar_bad_term_and_top_say_what_to_choose(data):
    rec = record(data.stats, SPEC)
    with pytest.raises(plots.PlotError, match=r"choose one of \['\(Intercept\)', 'age'\]"):
        plots.caterpillar_plot(data.stats, SPEC, rec, term="severity")
    with pytest.raises(plots.PlotError, match="out of range"):
        plots.caterpillar_plot(data.stats, SPEC, rec, term=2)
    with pytest.raises(plots.PlotError, match="top must be at least 1"):
        plots.caterpillar_plot(data.stats, SPEC, rec, top=0)


def test_plots_refuse_statistics_of_another_model(data):
    rec = record(data.stats, SPEC)
    narrow = GroupStats.from_rows(["a", "b"], np.ones((2, 2)))
    with pytest.raises(plots.PlotError, match="another model"):
        plots.shrinkage_plot(narrow, SPEC, rec)
    with pytest.raises(plots.PlotError, match="no groups"):
        plots.caterpillar_plot(GroupStats.empty(3), SPEC, rec)


# -- trace ----------------------------------------------------------------------------------


def test_trace_follows_versions(data, tmp_path):
    recs = []
    for v, n in enumerate((1500, 3000, 6000), start=1):
        part = data.rows.iloc[:n]
        stats = GroupStats.from_rows(part["hospital"].to_numpy(),
                                     part[list(SPEC.columns)].to_numpy())
        recs.append(record(stats, SPEC, version=v, created_at=1.7e9 + 60 * v))
    fig = plots.trace_plot(recs[::-1])  # any order in, versions in order out
    variances = fig.axes[0]
    sigma_line = variances.get_lines()[0]
    np.testing.assert_array_equal(sigma_line.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(sigma_line.get_ydata(), [r.sigma2 for r in recs])
    np.testing.assert_allclose(variances.get_lines()[2].get_ydata(), [r.G[1, 1] for r in recs])
    corr = fig.axes[1].get_lines()[0].get_ydata()
    np.testing.assert_allclose(corr, [r.G[0, 1] / np.sqrt(r.G[0, 0] * r.G[1, 1]) for r in recs])
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["variance components", "random-effect correlations",
                      "β: (Intercept)", "β: age", "β: severity"]
    np.testing.assert_allclose(fig.axes[3].get_lines()[0].get_ydata(), [r.beta[1] for r in recs])
    assert "versions 1 to 3" in fig.get_suptitle()
    assert_png(plots.save(fig, tmp_path / "trace.png"))
    assert_png(plots.save(plots.trace_plot(recs, x="time"), tmp_path / "trace_time.png"))


def test_trace_of_one_version_draws_points(data, tmp_path):
    rec = record(data.stats, INTERCEPT_ONLY, version=4)
    fig = plots.trace_plot([rec])
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["variance components", "β: (Intercept)", "β: age", "β: severity"]
    assert fig.axes[1].get_xlim() == (3.0, 5.0)
    assert fig.axes[0].get_lines()[0].get_marker() == "o"
    assert "version 4," in fig.get_suptitle()
    assert_png(plots.save(fig, tmp_path / "one.png"))


def test_trace_refuses_nothing_and_mixed_models(data):
    with pytest.raises(plots.PlotError, match="no model versions"):
        plots.trace_plot([])
    a, b = record(data.stats, SPEC, 1), record(data.stats, INTERCEPT_ONLY, 2)
    with pytest.raises(plots.PlotError, match=r"model versions \[2\] have other terms"):
        plots.trace_plot([a, b])
    with pytest.raises(plots.PlotError, match="x must be"):
        plots.trace_plot([a], x="date")


# -- the command line entry -----------------------------------------------------------------


def write_config(path: Path, spec: ModelSpec, snapshot: str | None) -> Path:
    lines = ["[model]", f'response = "{spec.response}"',
             "fixed = [" + ", ".join(f'"{t}"' for t in spec.fixed) + "]",
             "random = [" + ", ".join(f'"{t}"' for t in spec.random) + "]",
             f'group = "{spec.group}"']
    if snapshot:
        lines += ["[store]", f'snapshot = "{snapshot}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plot_command_end_to_end_from_a_snapshot(data, tmp_path):
    snap = tmp_path / "state.npz"
    config = write_config(tmp_path / "streamlme.toml", SPEC, str(snap))
    store = MemoryStore(d=len(SPEC.columns), columns=SPEC.columns)
    store.merge(data.stats)
    store.snapshot(snap)
    with pytest.raises(plots.PlotError, match="no model yet"):
        plots.plot_command("shrinkage", config, tmp_path / "none.png")
    for _ in range(2):  # the refresh job writes the versions, as in production
        cfg = load_config(config)
        assert refresh_once(cfg, settings=RefreshSettings.from_config(cfg, skip_unchanged=False)).ok
    for kind in plots.KINDS:
        out = plots.plot_command(kind, config, tmp_path / "out" / f"{kind}.png")
        assert out == tmp_path / "out" / f"{kind}.png"
        assert_png(out)
    fig = plots.store_figure("shrinkage", MemoryStore(snapshot=snap))
    assert fig.axes[0].get_title().startswith("Shrinkage of 60 groups\nmodel v2, REML")
    fig = plots.store_figure("trace", MemoryStore(snapshot=snap))
    assert "versions 1 to 2" in fig.get_suptitle()


def test_plot_command_errors_say_what_to_do(tmp_path):
    config = write_config(tmp_path / "streamlme.toml", SPEC, None)
    with pytest.raises(plots.PlotError, match=r"set \[store\] snapshot"):
        plots.plot_command("trace", config, tmp_path / "x.png")
    with pytest.raises(plots.PlotError, match="choose one of shrinkage, caterpillar, trace"):
        plots.plot_command("histogram", config, tmp_path / "x.png")
    snap_config = write_config(tmp_path / "s.toml", SPEC, str(tmp_path / "empty.npz"))
    with pytest.raises(plots.PlotError, match="no model versions"):
        plots.plot_command("trace", snap_config, tmp_path / "x.png")


def test_store_figure_reads_redis(data, redis_url, namespace, tmp_path):
    import redis

    from streamlme.store.redis import RedisStore

    client = redis.Redis.from_url(redis_url)
    try:
        store = RedisStore(client, namespace, d=len(SPEC.columns), columns=SPEC.columns)
        store.merge(data.stats)
        with pytest.raises(plots.PlotError, match="no model yet"):
            plots.store_figure("caterpillar", store)
        store.put_model(record(data.stats, SPEC).to_json())
        fig = plots.store_figure("caterpillar", store, top=10)
        assert "the 10 largest |effect| of 60 groups" in fig.axes[0].get_title()
        assert_png(plots.save(fig, tmp_path / "redis.png"))
    finally:
        client.close()
