"""The block decomposition of the one-term fit (streamlme.estimate.blocks) and the Dask engine
of the refresh (streamlme.refresh_dask), on real Dask worker processes and a real Redis.

The reference is the local `fit` of the same statistics: the blocks only add the groups' sums in
another order. At a given theta the deviance, beta and sigma^2 agree to 1e-10 relative (1e-12
and better where y has no large offset), and the fitted criterion always agrees to 1e-10.

The estimates agree to 1e-10 wherever the local fit itself is reproducible to that level. It is
not always: L-BFGS-B stops where the deviance is flat to its rounding (``RELATIVE REDUCTION OF F
<= FACTR*EPSMCH``) or where the scaled gradient is below 1e-10, and rounding of the sums moves
that point. The local fit of the same groups merely read in another order moves by up to a few
1e-9 in some designs (a diagonal covariance under REML, y ~ 1e6), and over random splits into
blocks the estimates moved by up to 9e-9 (in about 1 split of 20). A tighter ``tol`` does not
help (the deviance's rounding is the floor); a Newton polish on the analytic gradient at the
end of the one-term fit would. So: fixed designs are held to 1e-10, or to ten times the local
fit's own spread over reorderings where that is larger (`tolerance`); random splits (the
property) to `STOP` for estimates and 1e-10 for the criterion.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lmm_data import simulate
from stream_helpers import write_config

from streamlme import GroupStats, ModelSpec
from streamlme.estimate import DataError, fit
from streamlme.estimate.blocks import (
    BlocksUnsupportedError,
    Evaluator,
    build_block,
    check_spec,
    combine,
    fit_split,
    frame,
    list_map,
    summarise,
)
from streamlme.estimate.crossprod import cross_products
from streamlme.estimate.pls import evaluate, gradient
from streamlme.estimate.theta import Parametrisation
from streamlme.model import ModelRecord
from streamlme.refresh import (
    RefreshSettings,
    current_model,
    refresh_once,
    stats_digest,
    stats_fingerprint,
)
from streamlme.refresh_dask import (
    DaskEngineError,
    DaskRefresh,
    ShardMovedError,
    dask_fit,
    measure_overhead,
    warm_workers,
)
from streamlme.store import MemoryStore, RedisStore

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-10
#: How far the one-term optimiser's stopping point moves with rounding (see the module doc).
STOP = 1e-7


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular-fit warnings of boundary cases
        yield


def named(stats: GroupStats) -> GroupStats:
    """The same statistics under string group ids."""
    return GroupStats([f"g{int(k):04d}" for k in stats.keys], stats.n, stats.mean, stats.C,
                      stats.t)


def split(stats: GroupStats, labels: np.ndarray, k: int) -> list[GroupStats]:
    """The groups cut into k blocks by ``labels`` (some blocks may be empty)."""
    return [stats.select([key for key, b in zip(stats.keys, labels) if b == j]) for j in range(k)]


def tolerance(stats: GroupStats, spec: ModelSpec, method: str | None = None,
              want=None) -> float:
    """1e-10, or ten times how far the local fit moves when its groups come in another order
    (three orders), whichever is larger."""
    want = want or fit(stats, spec, method, ranef=False)
    spread = 0.0
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(stats))
        other = fit(stats.select([stats.keys[i] for i in order]), spec, method, ranef=False)
        for name in ("beta", "sigma2", "G", "theta"):
            w = np.asarray(getattr(want, name), dtype=float)
            d = np.abs(np.asarray(getattr(other, name), dtype=float) - w)
            spread = max(spread, float(np.max(d / np.maximum(np.abs(w), np.abs(w).max()
                                                             * 1e-3 + 1e-300))))
    return max(RTOL, 10 * spread)


def assert_same_fit(got, want, rtol: float = RTOL) -> None:
    """Every estimate of two fits equal to ``rtol`` relative (theta and G on the scale of the
    largest element, where a component on its boundary is 0 in both)."""
    assert got.method == want.method and got.converged == want.converged
    assert got.n_groups == want.n_groups and got.n_obs == want.n_obs
    assert got.fixed == want.fixed and got.random == want.random
    np.testing.assert_allclose(got.criterion, want.criterion, rtol=rtol)
    np.testing.assert_allclose(got.sigma2, want.sigma2, rtol=rtol)
    np.testing.assert_allclose(got.beta, want.beta, rtol=rtol)
    np.testing.assert_allclose(got.beta_cov, want.beta_cov, rtol=rtol,
                               atol=rtol * np.abs(want.beta_cov).max())
    for name in ("G", "theta", "G_centred"):
        w = np.asarray(getattr(want, name))
        np.testing.assert_allclose(getattr(got, name), w, rtol=rtol,
                                   atol=rtol * max(np.abs(w).max(), 1e-300), err_msg=name)
    assert got.singular == want.singular
    np.testing.assert_allclose(got.optsummary.theta_start, want.optsummary.theta_start,
                               rtol=rtol, atol=rtol)
    assert got.optsummary.optimizer == want.optsummary.optimizer


# -- the mathematics: blocks in this process -----------------------------------------------------

CASES = {
    "intercept": dict(slope=False),
    "slope": dict(slope=True),
    "diagonal": dict(slope=True, covariance="diagonal"),
    "offsets": dict(slope=True, y_offset=1e6, x_mean=30.0, x_sd=5.0),
}


def case_data(name: str, groups: int = 150, seed: int = 4):
    sizes = np.random.default_rng(seed).integers(1, 12, groups)
    return simulate(sizes, seed=seed, n_extra=2, **CASES[name])


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("case", list(CASES))
def test_block_fit_equals_the_local_fit(case: str, method: str) -> None:
    data = case_data(case)
    stats = data.stats()
    want = fit(stats, data.spec, method, ranef=False)
    labels = np.random.default_rng(1).integers(0, 6, len(stats))
    got = fit_split(split(stats, labels, 6), data.spec, method)
    np.testing.assert_allclose(got.criterion, want.criterion, rtol=RTOL)
    assert_same_fit(got, want, tolerance(stats, data.spec, method, want))
    assert got.terms[0].group == want.terms[0].group and got.ranef is None


def test_one_block_walks_the_local_optimiser_path_exactly() -> None:
    """A single block adds nothing in another order: the fit is the local one, digit for digit
    (so the driver's optimiser path, start and boundary step are fit's)."""
    data = case_data("slope")
    stats = data.stats()
    want = fit(stats, data.spec, ranef=False)
    got = fit_split([stats], data.spec)
    assert got.criterion == want.criterion
    assert got.optsummary.n_evals == want.optsummary.n_evals
    np.testing.assert_array_equal(got.beta, want.beta)
    np.testing.assert_array_equal(got.theta, want.theta)
    assert got.optsummary.iterations == want.optsummary.iterations


def test_boundary_fit_and_warm_start_equal_the_local_fit() -> None:
    """No group variation (the variance component goes to its bound: the re-run from inside the
    region), and a warm start from a previous fit."""
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(60), 5)
    x = rng.normal(size=len(g))
    stats = GroupStats.from_rows(g, np.column_stack([x, 1.0 + 0.5 * x + rng.normal(size=len(g))]))
    spec = ModelSpec("y", ["1", "x"], ["1"], "g")
    want = fit(stats, spec, ranef=False)
    assert want.singular
    parts = split(stats, np.arange(len(stats)) % 3, 3)
    assert_same_fit(fit_split(parts, spec), want)
    data = case_data("slope")
    first = fit(data.stats(), data.spec, ranef=False)
    more = data.stats()
    more.merge(GroupStats.from_rows([0, 1], np.ones((2, data.W.shape[1]))))
    want = fit(more, data.spec, start=first, ranef=False)
    got = fit_split(split(more, np.arange(len(more)) % 4, 4), data.spec, start=first.to_dict())
    assert got.optsummary.warm_start
    assert_same_fit(got, want)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 9),
       case=st.sampled_from(["intercept", "slope", "diagonal"]),
       method=st.sampled_from(["REML", "ML"]))
def test_any_split_into_blocks_gives_the_local_fit(seed: int, k: int, case: str,
                                                    method: str) -> None:
    """Random splits (empty blocks, blocks of one group, groups of no mass included): the
    criterion to 1e-10, the estimates to the optimiser's stopping precision."""
    data = case_data(case, groups=60, seed=seed % 7)
    stats = data.stats()
    rng = np.random.default_rng(seed)
    if seed % 3 == 0:  # a group whose mass was all retracted reads as n = 0
        stats.retract(stats.select([stats.keys[0]]))
    want = fit(stats, data.spec, method, ranef=False)
    labels = rng.integers(0, k, len(stats))
    parts = split(stats, labels, k)
    rng.shuffle(parts)
    got = fit_split(parts, data.spec, method)
    np.testing.assert_allclose(got.criterion, want.criterion, rtol=RTOL)
    assert_same_fit(got, want, STOP)


@pytest.mark.parametrize("case", list(CASES))
def test_at_one_theta_the_blocks_give_the_local_deviance_and_gradient(case: str) -> None:
    data = case_data(case)
    stats = data.stats()
    cp = cross_products(stats, data.spec)
    parts = split(stats, np.random.default_rng(2).integers(0, 5, len(stats)), 5)
    fr = frame(data.spec, combine([summarise(s, data.spec) for s in parts]))
    built = [build_block(s, fr, i) for i, s in enumerate(parts)]
    par = Parametrisation(cp.q, data.spec.covariance, cp.T_Z, cp.z_scale)
    for reml in (True, False):
        ev = Evaluator(fr, par, list_map(built), reml)
        for theta in (par.start(), 0.3 * par.start() + 0.1, 2.0 * par.start()):
            want = evaluate(cp, par.lam(theta), reml, factors=False)
            got = ev.state(theta)
            np.testing.assert_allclose(got.deviance, want.deviance, rtol=RTOL)
            np.testing.assert_allclose(got.beta, want.beta, rtol=RTOL)
            np.testing.assert_allclose(got.sigma2, want.sigma2, rtol=RTOL)
            np.testing.assert_allclose(ev.gradient(got), par.grad(gradient(cp, want)),
                                       rtol=1e-9, atol=1e-9 * abs(want.deviance) * 1e-3)


@pytest.mark.parametrize("case", ["slope", "offsets"])
def test_the_frame_and_blocks_are_the_local_cross_products(case: str) -> None:
    data = case_data(case)
    stats = data.stats()
    cp = cross_products(stats, data.spec)
    parts = split(stats, np.arange(len(stats)) // 40, 4)  # in order: blocks concatenate to cp's
    fr = frame(data.spec, combine([summarise(s, data.spec) for s in parts]))
    for name in ("XyXy", "T_X", "T_Z", "z_scale", "z_centre"):
        np.testing.assert_allclose(getattr(fr, name), getattr(cp, name), rtol=1e-10,
                                   atol=1e-13, err_msg=name)
    assert fr.N == cp.N and fr.n_groups == cp.n_groups and fr.intercept_fixed == cp.intercept_fixed
    np.testing.assert_allclose(fr.r_y, cp.r_y, rtol=1e-14)
    built = [build_block(s, fr, i) for i, s in enumerate(parts)]
    # about a reference point that differs by rounding: what moves is n (m - r), the rounding
    # of r times the group's mass
    atol = 1e-14 * max(1.0, float(np.abs(fr.r).max())) * float(stats.n.max())
    np.testing.assert_allclose(np.concatenate([b.ZtZ for b in built]), cp.ZtZ, rtol=1e-11,
                               atol=atol)
    np.testing.assert_allclose(np.concatenate([b.ZtXy for b in built]), cp.ZtXy, rtol=1e-11,
                               atol=atol)


def test_refusals_name_the_limitation() -> None:
    spec = ModelSpec.from_formula("y ~ x + (1|a) + (1|b)")
    with pytest.raises(BlocksUnsupportedError, match="one random-effect term; this model has 2"):
        check_spec(spec)
    one = ModelSpec("y", ["1"], ["1"], "g")
    with pytest.raises(BlocksUnsupportedError, match="EM"):
        check_spec(one, "EM")
    lone = GroupStats.from_rows(["a", "a"], np.array([[1.0], [2.0]]))
    with pytest.raises(DataError, match="1 group\\(s\\) with data"):
        fit_split([lone, GroupStats.empty(1)], one)
    with pytest.raises(DataError, match="columns but the model needs"):
        fit_split([GroupStats.from_rows(["a"], np.ones((1, 2)))], one)


def test_the_fingerprint_ignores_order_and_split_but_not_an_event() -> None:
    stats = named(case_data("slope").stats())
    keys = list(stats.keys)
    np.random.default_rng(0).shuffle(keys)
    shuffled = stats.select(keys)
    assert stats_fingerprint(shuffled) == stats_fingerprint(stats)
    parts = [stats_digest(s) for s in split(shuffled, np.arange(len(keys)) % 5, 5)]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    assert total == stats_digest(stats) and stats_fingerprint(total) == stats_fingerprint(stats)
    one = stats.copy().merge(GroupStats.from_rows([keys[0]], np.ones((1, stats.d))))
    assert stats_fingerprint(one) != stats_fingerprint(stats)
    assert len(stats_fingerprint(stats)) == 32


# -- the Dask engine -------------------------------------------------------------------------------


def redis_store(redis_url: str, namespace: str, stats: GroupStats, spec: ModelSpec,
                shards: int = 16) -> RedisStore:
    store = RedisStore(redis_url, namespace, columns=spec.columns, shards=shards)
    assert store.merge(named(stats)).applied
    return store


def dask_settings(address: str, **kw) -> RefreshSettings:
    return RefreshSettings(engine="dask", dask_scheduler=address, **kw)


@pytest.mark.parametrize("case", ["intercept", "slope", "diagonal"])
def test_dask_fit_equals_the_local_fit(case, redis_url, namespace, dask_client) -> None:
    data = case_data(case, groups=400)
    store = redis_store(redis_url, namespace, data.stats(), data.spec)
    for method in ("REML", "ML"):
        loaded, got = dask_fit(dask_client, store, data.spec, method)
        want = fit(data.stats(), data.spec, method, ranef=False)
        assert_same_fit(got.result, want, tolerance(data.stats(), data.spec, method, want))
        assert loaded.rows == len(data.stats()) and loaded.mass == want.n_obs
        assert loaded.fingerprint == stats_fingerprint(named(data.stats()))
        assert got.maps == 2 * got.result.optsummary.n_evals
    # every shard and block was released from the workers' memory
    deadline = time.monotonic() + 10
    while any(str(k).startswith("streamlme-shard") for k in dask_client.who_has()):
        assert time.monotonic() < deadline, "shards left in the workers' memory"
        time.sleep(0.1)


def test_the_dask_refresh_equals_the_local_refresh(redis_url, namespace, dask_address) -> None:
    data = case_data("offsets", groups=300)
    store = redis_store(redis_url, namespace, data.stats(), data.spec)
    local = refresh_once(store, data.spec, RefreshSettings(skip_unchanged=False, warm_start=False))
    on_dask = refresh_once(store, data.spec, dask_settings(dask_address, skip_unchanged=False,
                                                           warm_start=False))
    assert local.ok and on_dask.ok, (local.message, on_dask.message)
    a = ModelRecord.from_json(store.get_model(local.version)).fit
    b = ModelRecord.from_json(store.get_model(on_dask.version)).fit
    assert a["stats_fingerprint"] == b["stats_fingerprint"]
    assert a.keys() == b.keys()
    rtol = tolerance(data.stats(), data.spec)
    for key, tol in (("criterion", RTOL), ("loglik", RTOL), ("aic", RTOL), ("bic", RTOL),
                     ("sigma2", rtol)):
        np.testing.assert_allclose(b[key], a[key], rtol=tol, err_msg=key)
    for key in ("beta", "beta_se"):
        np.testing.assert_allclose([b[key][n] for n in a["fixed"]],
                                   [a[key][n] for n in a["fixed"]], rtol=rtol, err_msg=key)
    np.testing.assert_allclose(b["G"], a["G"], rtol=rtol, atol=rtol * np.abs(a["G"]).max())
    assert (on_dask.n_groups, on_dask.n_cells, on_dask.n_obs) == \
        (local.n_groups, local.n_cells, local.n_obs)
    assert on_dask.read_seconds > 0 and on_dask.fit_seconds > 0


def test_the_dask_fit_reads_a_redis_cluster(redis_cluster, cluster_namespace, dask_client
                                            ) -> None:
    """Workers connect to the Cluster through the store's address (startup nodes), and read
    the shards spread over its three masters."""
    data = case_data("slope", groups=300)
    store = RedisStore(redis_cluster.client(), cluster_namespace, columns=data.spec.columns,
                       shards=32)
    try:
        assert store.merge(named(data.stats())).applied
        loaded, got = dask_fit(dask_client, store, data.spec)
    finally:
        store.client.close()
    want = fit(data.stats(), data.spec, ranef=False)
    assert loaded.fingerprint == stats_fingerprint(named(data.stats()))
    assert_same_fit(got.result, want, tolerance(data.stats(), data.spec, None, want))


def test_both_engines_agree_that_nothing_changed(redis_url, namespace, dask_address) -> None:
    """The skip check compares the fingerprint of the current model's record: a model written
    by one engine is 'unchanged' to the other, until an event arrives."""
    data = case_data("slope", groups=200)
    store = redis_store(redis_url, namespace, data.stats(), data.spec)
    assert refresh_once(store, data.spec, RefreshSettings()).ok
    assert refresh_once(store, data.spec, dask_settings(dask_address)).status == "unchanged"
    store.merge(GroupStats.from_rows(["g0001"], np.ones((1, len(data.spec.columns)))))
    written = refresh_once(store, data.spec, dask_settings(dask_address))
    assert written.ok
    assert refresh_once(store, data.spec, RefreshSettings()).status == "unchanged"
    assert current_model(store).version == written.version


def test_the_dask_engine_follows_the_flag_the_counters_and_leaves_bad_cells_out(
        redis_url, namespace, dask_address) -> None:
    """The rules of the local refresh hold on Dask: no model while flagged; a correction that
    keeps sizes and totals is refitted; a cell with non-finite statistics, read by a worker,
    is left out and named, with the fit equal to the local one."""
    from streamlme.stats import pack
    from streamlme.store.keys import encode_group

    data = case_data("slope", groups=200)
    store = redis_store(redis_url, namespace, data.stats(), data.spec)
    d = len(data.spec.columns)
    key = "poison"
    store.client.hset(store.keys.shard(store.shard_of(key)).stats, encode_group(key),
                      pack(2.0, 0.0, np.full(d, np.inf), np.zeros((d, d))))
    store.set_flag("rebuilding", "replaying the topic")
    flagged = refresh_once(store, data.spec, dask_settings(dask_address))
    assert flagged.status == "flagged" and "replaying the topic" in flagged.message
    assert store.model_versions() == []
    store.clear_flag()

    on_dask = refresh_once(store, data.spec, dask_settings(dask_address))
    assert on_dask.ok and on_dask.excluded == 1, on_dask.message
    record = ModelRecord.from_json(store.get_model(on_dask.version))
    assert record.excluded == [key] and any(key in w for w in record.fit["warnings"])
    want = fit(data.stats(), data.spec, ranef=False)
    assert_same_fit(record.fit_result(), want, tolerance(data.stats(), data.spec, None, want))
    assert refresh_once(store, data.spec, dask_settings(dask_address)).status == "unchanged"

    # a correction keeping the group's size and totals: two of its rows swap their y
    W = np.array([[0.0] * (d - 1) + [1.0], [1.0] * (d - 1) + [3.0]])
    V = np.array([[0.0] * (d - 1) + [3.0], [1.0] * (d - 1) + [1.0]])
    added = GroupStats.from_rows(["g0001", "g0001"], W)
    assert store.merge(added).applied
    assert refresh_once(store, data.spec, dask_settings(dask_address)).ok
    corrected = GroupStats.from_rows(["g0001", "g0001"], V)
    assert store.merge(corrected, added).applied
    out = refresh_once(store, data.spec, dask_settings(dask_address))
    assert out.ok and out.version == 3, out.message


class KillingRefresh(DaskRefresh):
    """Kills (SIGKILL) the process of a worker holding blocks before map number ``at``."""

    def __init__(self, *args, at: int = 5, **kw) -> None:
        super().__init__(*args, **kw)
        self.at, self.calls, self.killed = at, 0, None

    def map_blocks(self, fn):
        self.calls += 1
        if self.calls == self.at:
            holder = self.client.who_has(self.bundles)[self.bundles[0].key][0]
            pids = self.client.run(os.getpid, workers=[holder])
            self.killed = pids[holder]
            os.kill(self.killed, signal.SIGKILL)
        return super().map_blocks(fn)


def test_a_worker_killed_mid_fit_changes_nothing(redis_url, namespace, local_dask_cluster
                                                 ) -> None:
    import distributed

    data = case_data("slope", groups=400)
    store = redis_store(redis_url, namespace, data.stats(), data.spec)
    want = fit(data.stats(), data.spec, ranef=False)
    rtol = tolerance(data.stats(), data.spec, None, want)
    cluster = local_dask_cluster()
    with distributed.Client(cluster, set_as_default=False) as client:
        warm_workers(client)
        engine = KillingRefresh(client, store, data.spec, at=5)
        try:
            engine.load()
            got = engine.fit()
        finally:
            engine.close()
        assert engine.killed is not None and engine.calls > 5
        with pytest.raises(ProcessLookupError):
            os.kill(engine.killed, 0)
    assert_same_fit(got.result, want, rtol)


class MovingRefresh(KillingRefresh):
    """Moves every shard on (one more event in every group) before it kills a worker."""

    def map_blocks(self, fn):
        if self.calls + 1 == self.at:
            assert self.store.merge(self.more).applied
        return super().map_blocks(fn)


def test_a_shard_that_moved_before_its_recompute_is_refused(redis_url, namespace,
                                                            local_dask_cluster) -> None:
    """A lost worker's shards are read again from Redis; if a merge changed them meanwhile the
    fit stops with ShardMovedError rather than mixing two snapshots."""
    import distributed

    data = case_data("intercept", groups=200)
    store = redis_store(redis_url, namespace, data.stats(), data.spec)
    stats = named(data.stats())
    with distributed.Client(local_dask_cluster(), set_as_default=False) as client:
        engine = MovingRefresh(client, store, data.spec, at=3)
        engine.more = GroupStats.from_rows(stats.keys, np.ones((len(stats), stats.d)))
        try:
            engine.load()
            with pytest.raises(ShardMovedError, match="was recomputed at version"):
                engine.fit()
        finally:
            engine.close()
    assert engine.killed is not None


def test_overhead_is_measured(redis_url, namespace, dask_client) -> None:
    data = case_data("intercept", groups=100)
    store = redis_store(redis_url, namespace, data.stats(), data.spec)
    engine = DaskRefresh(dask_client, store, data.spec)
    try:
        engine.load()
        engine.fit()
        over = measure_overhead(engine, evaluations=5)
    finally:
        engine.close()
    assert over.workers >= 1 and over.shards == 16 and over.maps == 2 * 8
    assert 0 < over.compute_ms < over.per_map_ms and over.overhead_ms > 0


def test_the_dask_engine_refuses_what_workers_cannot_do(redis_url, namespace, dask_address,
                                                        dask_client) -> None:
    spec = ModelSpec("y", ["1"], ["1"], "g")
    memory = MemoryStore(columns=spec.columns)
    memory.merge(GroupStats.from_rows(["a", "b", "a"], np.array([[1.0], [2.0], [4.0]])))
    out = refresh_once(memory, spec, dask_settings(dask_address))
    assert out.status == "error" and "MemoryStore" in out.message and "[redis]" in out.message
    with pytest.raises(DaskEngineError, match="lives in this process"):
        DaskRefresh(dask_client, memory, spec)
    several = ModelSpec.from_formula("y ~ 1 + (1|a) + (1|b)")
    store = RedisStore(redis_url, namespace, columns=several.columns)
    out = refresh_once(store, several, dask_settings(dask_address))
    assert out.status == "fit_failed" and "one random-effect term" in out.message
    assert "engine = \"local\"" in out.message and out.n_cells == 0
    out = refresh_once(store, spec, RefreshSettings(engine="dask"))
    assert out.status == "error" and "--dask" in out.message


def test_cli_refresh_on_dask(tmp_path, redis_url, namespace, dask_address) -> None:
    data = case_data("slope", groups=200)
    store = redis_store(redis_url, namespace, data.stats(), data.spec)
    config = write_config(tmp_path / "c.toml", data.spec,
                          redis={"url": redis_url, "namespace": namespace})
    cmd = [sys.executable, "-m", "streamlme.cli", "refresh", "--config", str(config), "--once"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, "--dask", dask_address], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    record = current_model(store)
    assert record is not None and "Dask fit" in done.stderr
    want = fit(data.stats(), data.spec, ranef=False)
    np.testing.assert_allclose(record.fit["criterion"], want.criterion, rtol=RTOL)
    # the configured engine, and a scheduler nobody runs: a clear error, exit status 1
    config.write_text(config.read_text() + '[refresh]\nengine = "dask"\n'
                      'dask_scheduler = "tcp://127.0.0.1:9"\n')
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 1 and "no Dask scheduler answers at tcp://127.0.0.1:9" in done.stderr
