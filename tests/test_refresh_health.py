"""Refresh against a namespace's health, on a real Redis: a flag stops new models (logged once
per flagged period), a correction that keeps sizes and totals is refitted (statsmodels says what
the corrected rows give), records carry the epoch and the offset gaps, a cell with non-finite
statistics is left out and named, and a looping refresher waits for Redis to come up.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from net_helpers import free_port
from stream_helpers import write_config

from streamlme import GroupStats, ModelSpec
from streamlme.config import load_config
from streamlme.estimate import fit
from streamlme.model import ModelRecord
from streamlme.refresh import (
    RedisUnavailableError,
    current_model,
    model_command,
    read_stats,
    refresh_once,
    run_refresh,
)
from streamlme.stats import pack
from streamlme.store import Gap, RedisStore
from streamlme.store.keys import encode_group

SPEC = ModelSpec("y", ["1"], ["1"], "g")
RNG = np.random.default_rng(7)
GROUPS = np.repeat(np.arange(30), 6)
Y = 10.0 + 3.0 * RNG.normal(size=30)[GROUPS] + RNG.normal(size=len(GROUPS))


def names(groups: np.ndarray) -> list[str]:
    return [f"g{int(g):02d}" for g in groups]


def rows_stats(groups: np.ndarray, y: np.ndarray) -> GroupStats:
    return GroupStats.from_rows(names(groups), np.asarray(y, dtype=float)[:, None])


@pytest.fixture
def store(redis_url, namespace):
    s = RedisStore(redis_url, namespace, columns=SPEC.columns)
    s.merge(rows_stats(GROUPS, Y))
    return s


@pytest.fixture
def config(tmp_path, redis_url, namespace):
    path = write_config(tmp_path / "streamlme.toml", SPEC,
                        redis={"url": redis_url, "namespace": namespace})
    return load_config(path)


def statsmodels_fit(groups: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(G, sigma^2) of y ~ 1 + (1 | g) by REML in statsmodels, on the rows themselves."""
    df = pd.DataFrame({"y": y, "g": names(groups)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = smf.mixedlm("y ~ 1", df, groups=df["g"]).fit(reml=True, method=["lbfgs"])
    return float(res.cov_re.iloc[0, 0]), float(res.scale)


# -- the flag -------------------------------------------------------------------------------


def test_a_flagged_namespace_gets_no_new_model_and_the_good_one_stays(store):
    assert refresh_once(store, SPEC).ok
    good = store.get_model()
    store.set_flag("rebuilding", "consume --rebuild is replaying the topic")
    store.merge(rows_stats(GROUPS[:6], Y[:6] + 5.0))  # new events while flagged
    out = refresh_once(store, SPEC)
    assert out.status == "flagged" and not out.current
    assert "'rebuilding'" in out.message and "replaying the topic" in out.message
    assert store.model_versions() == [1] and store.get_model() == good
    store.clear_flag()
    again = refresh_once(store, SPEC)
    assert again.ok and again.version == 2 and again.n_obs == len(Y) + 6


def test_the_loop_logs_a_flag_once_per_flagged_period_and_resumes(store, config, caplog):
    caplog.set_level(logging.DEBUG, logger="streamlme.refresh")
    store.set_flag("lost", "statistics without offsets in shard 3")
    stop = threading.Event()
    loop = threading.Thread(target=run_refresh, args=(config,), kwargs={"every": 0.05,
                                                                      "stop": stop})
    loop.start()

    def flagged_lines(level: int) -> list[logging.LogRecord]:
        return [r for r in caplog.records
                if r.levelno == level and "refresh flagged" in r.getMessage()]

    try:
        wait_until(lambda: len(flagged_lines(logging.DEBUG)) >= 3)  # ticks went by, quietly
        assert len(flagged_lines(logging.WARNING)) == 1
        assert "shard 3" in flagged_lines(logging.WARNING)[0].getMessage()
        assert store.model_versions() == []
        store.clear_flag()
        wait_until(lambda: store.current_model_version() == 1)
        store.set_flag("rebuilding", "second period")  # a new period is said again, once
        wait_until(lambda: len(flagged_lines(logging.WARNING)) == 2)
        time.sleep(0.3)
        assert len(flagged_lines(logging.WARNING)) == 2
        assert "second period" in flagged_lines(logging.WARNING)[1].getMessage()
    finally:
        stop.set()
        loop.join(timeout=10)
    assert store.model_versions() == [1]
    assert run_refresh(config, once=True) == 1  # --once: no model written, exit 1


# -- "unchanged" cannot go stale ------------------------------------------------------------


def test_a_correction_keeping_sizes_and_totals_is_refitted(store):
    first = refresh_once(store, SPEC)
    assert first.ok
    assert refresh_once(store, SPEC).status == "unchanged"
    # correct two rows in each of 20 groups: both become their mean, so every group keeps its
    # size and total and only its spread changes
    y = Y.copy()
    rows = []
    for g in range(20):
        i, j = np.flatnonzero(g == GROUPS)[:2]
        y[i] = y[j] = (Y[i] + Y[j]) / 2
        rows += [i, j]
    assert store.merge(rows_stats(GROUPS[rows], y[rows]), rows_stats(GROUPS[rows], Y[rows])
                       ).applied
    corrected = refresh_once(store, SPEC)
    assert corrected.ok and corrected.version == 2 and corrected.n_obs == len(Y)
    G, sigma2 = statsmodels_fit(GROUPS, y)
    record = current_model(store)
    np.testing.assert_allclose(record.G[0, 0], G, rtol=1e-4)
    np.testing.assert_allclose(record.sigma2, sigma2, rtol=1e-4)
    stale = record_of(store, 1)
    assert abs(stale.sigma2 - record.sigma2) > 0.05 * record.sigma2  # the old model was wrong
    assert record.fit["stats_versions"] != stale.fit["stats_versions"]


def test_a_rebuild_that_repeats_the_counters_is_still_refitted(store):
    """After clear_statistics the shards' counters restart: the same counts of merges then give
    the same counters, and the digest of the bytes tells the statistics apart."""
    assert refresh_once(store, SPEC).ok
    versions = store.shard_versions()
    store.clear_statistics()
    store.merge(rows_stats(GROUPS, Y[::-1]))
    assert store.shard_versions() == versions
    out = refresh_once(store, SPEC)
    assert out.ok and out.version == 2
    G, _ = statsmodels_fit(GROUPS, Y[::-1])
    np.testing.assert_allclose(current_model(store).G[0, 0], G, rtol=1e-4)


# -- what a record says it covers -----------------------------------------------------------


def test_a_record_carries_the_epoch_and_the_gaps_and_model_says_so(store, config):
    store.record_gap(Gap("events", 2, 100, 250, time.time()))
    assert refresh_once(store, SPEC).ok
    record = current_model(store)
    assert record.epoch == store.epoch() and record.epoch is not None
    assert [(g["topic"], g["partition"], g["from"], g["to"]) for g in record.gaps] == \
        [("events", 2, 100, 250)]
    assert any("does not cover" in w for w in record.fit["warnings"])

    status, text = model_command(config, as_json=True)
    doc = json.loads(text)
    assert status == 0 and doc["complete"] is False and doc["epoch"] == store.epoch()
    assert doc["gaps"][0]["events"] == 150 and doc["gaps"][0]["recorded_at"].endswith("Z")
    assert doc["namespace"]["epoch"] == store.epoch() and doc["namespace"]["flag"] is None
    assert isinstance(doc["created_at"], float) and doc["created_at_iso"].endswith("Z")
    assert doc["pinned"] is False and doc["pinned_version"] is None
    status, text = model_command(config)
    assert "does not cover offsets 100-249 of events[2] (150 offsets" in text
    history = model_command(config, history=True, as_json=True)[1]
    assert json.loads(history)["complete"] is False


def test_model_prints_the_lme4_layout(store, config):
    assert refresh_once(store, SPEC).ok
    record = current_model(store)
    status, text = model_command(config)
    assert status == 0
    # the layout fit prints: one summary, from the stored fit
    assert text.endswith(record.fit_result().summary())
    assert "Random effects:" in text and "Std.Dev." in text and "Residual" in text
    sd = f"{np.sqrt(record.G[0, 0]):.4g}"
    assert any(line.split()[:1] == ["g"] and line.split()[-1] == sd
               for line in text.splitlines()), text
    assert "Fixed effects:" in text and "(Intercept)" in text


# -- one bad cell ---------------------------------------------------------------------------


def test_cells_with_non_finite_statistics_are_left_out_and_named(store, redis_url):
    d = len(SPEC.columns)
    bad = {"poison-inf": pack(3.0, 0.0, np.array([np.inf]), np.zeros((d, d))),
           "poison-nan": pack(2.0, 0.0, np.array([1.0]), np.full((d, d), np.nan))}
    for key, value in bad.items():  # written as a broken merge would leave them
        shard = store.keys.shard(store.shard_of(key)).stats
        store.client.hset(shard, encode_group(key), value)
    assert len(read_stats(store, d)) == 32
    out = refresh_once(store, SPEC)
    assert out.ok and out.excluded == 2, out.message
    record = current_model(store)
    assert sorted(record.excluded) == sorted(bad) and record.n_excluded == 2
    assert any("2 cell(s) left out" in w and "poison-inf" in w for w in record.fit["warnings"])
    assert record.fit["n_groups"] == 30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = fit(rows_stats(GROUPS, Y), SPEC, ranef=False)  # the batch fit of the good rows
    np.testing.assert_allclose(record.G, want.G, rtol=1e-6)
    np.testing.assert_allclose(record.beta, want.beta, rtol=1e-8)
    G, _ = statsmodels_fit(GROUPS, Y)
    np.testing.assert_allclose(record.G[0, 0], G, rtol=1e-4)


# -- waiting for Redis ----------------------------------------------------------------------


def test_refresh_once_fails_fast_and_says_where(tmp_path):
    port = free_port()  # nothing listens there
    path = write_config(tmp_path / "down.toml", SPEC,
                        redis={"url": f"redis://:hunter2@127.0.0.1:{port}/0", "namespace": "x"})
    t0 = time.monotonic()
    with pytest.raises(RedisUnavailableError) as err:
        run_refresh(load_config(path), once=True)
    message = str(err.value)
    assert time.monotonic() - t0 < 5
    assert f"127.0.0.1:{port}" in message and "hunter2" not in message
    assert "does not answer" in message and "\n" not in message
    with pytest.raises(RedisUnavailableError):
        model_command(load_config(path))


def test_the_refresh_loop_waits_for_redis_and_carries_on(tmp_path, redis_server_factory, caplog,
                                                         monkeypatch):
    caplog.set_level(logging.INFO, logger="streamlme.refresh")
    monkeypatch.setattr("streamlme.refresh.WAIT_CAP", 0.5)  # the test need not wait 5 s
    server = redis_server_factory()
    server.stop()  # its port and directory stay: it is started again below
    path = write_config(tmp_path / "later.toml", SPEC,
                        redis={"url": server.url, "namespace": "later"})
    config = load_config(path)
    stop, codes = threading.Event(), []
    loop = threading.Thread(target=lambda: codes.append(run_refresh(config, every=0.1,
                                                                    stop=stop)))
    loop.start()
    try:
        wait_until(lambda: any(f"waiting for Redis at {server.url}" in r.getMessage()
                               for r in caplog.records))
        time.sleep(0.5)  # a few more attempts, not said again
        assert sum("waiting for Redis" in r.getMessage() for r in caplog.records) == 1
        server.start()
        store = RedisStore(server.url, "later", columns=SPEC.columns)
        store.merge(rows_stats(GROUPS, Y))
        wait_until(lambda: store.current_model_version() == 1)
        assert any("answers after" in r.getMessage() for r in caplog.records)
    finally:
        stop.set()
        loop.join(timeout=15)
    assert codes == [0]


def record_of(store, version: int) -> ModelRecord:
    return ModelRecord.from_json(store.get_model(version), version=version)


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
