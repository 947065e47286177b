"""Refresh: model versions from stored statistics, history, rollback, the leader lease, fencing.

Runs on both stores: the MemoryStore and a real Redis (tests/fixtures_redis.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from lmm_data import simulate
from prometheus_client import REGISTRY
from stream_helpers import write_config

from streamlme import GroupStats, ModelSpec
from streamlme.config import load_config
from streamlme.estimate import fit
from streamlme.lease import Lease
from streamlme.model import ModelRecord
from streamlme.refresh import (
    RefreshSettings,
    current_model,
    model_command,
    model_history,
    read_stats,
    refresh_once,
    rollback,
    run_refresh,
)
from streamlme.store import MemoryStore, RedisStore, StaleFenceError, StoreError

REPO = Path(__file__).resolve().parents[1]
DATA = simulate(np.full(120, 8), slope=True, seed=11)
SPEC = DATA.spec
# fields of a record that differ between two identical fits (timings), or that are not the fit's
# ("version": ModelRecord.from_json(data, version=V) leaves the stored one in .fit)
VOLATILE = {"optsummary", "version"}


def labelled(groups: np.ndarray) -> list[str]:
    return [f"g{int(c):03d}" for c in groups]


def batch(lo: int, hi: int) -> GroupStats:
    """Rows lo..hi of the simulated data, as per-group statistics."""
    return GroupStats.from_rows(labelled(DATA.groups[lo:hi]), DATA.W[lo:hi])


@pytest.fixture(params=["memory", "redis"])
def make_store(request):
    """Stores of the parametrised kind; Redis ones share one namespace (fresh per test)."""

    def make(**kw):
        if request.param == "memory":
            return MemoryStore(columns=SPEC.columns, **kw)
        url = request.getfixturevalue("redis_url")
        return RedisStore(url, request.getfixturevalue("namespace"), columns=SPEC.columns, **kw)

    return make


def outcome_count(outcome: str) -> float:
    value = REGISTRY.get_sample_value("streamlme_refresh_outcomes_total", {"outcome": outcome})
    return value or 0.0


def reference_fit(stats: GroupStats, start=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit(stats, SPEC, start=start, ranef=False, **kw)


def same_fit(record: ModelRecord, expected) -> None:
    want = expected.to_dict(ranef=False)
    # what the refresh adds to a fit's fields: what the statistics were when it read them
    assert len(record.fit["stats_fingerprint"]) == 32 and len(record.fit["stats_versions"]) == 32
    added = {"stats_fingerprint", "stats_versions"}
    got = {k: v for k, v in record.fit.items() if k not in VOLATILE | added}
    assert got == {k: v for k, v in want.items() if k not in VOLATILE}
    assert record.fit["optsummary"]["n_evals"] == want["optsummary"]["n_evals"]


# -- what a refresh writes ------------------------------------------------------------------


def test_refresh_equals_fit_and_warm_start_is_cheaper(make_store):
    store = make_store()
    store.merge(batch(0, 700))
    settings = RefreshSettings(tol=1e-9, max_iter=200)
    first = refresh_once(store, SPEC, settings)
    assert first.ok and first.version == 1 and first.start_version is None
    assert first.n_groups == len(read_stats(store, 3)) and first.n_obs == 700
    record = current_model(store)
    stats = read_stats(store, len(SPEC.columns))
    same_fit(record, reference_fit(stats, tol=1e-9, max_iter=200))
    assert record.version == 1 and record.spec == SPEC and record.events_seen == 700

    store.merge(batch(700, len(DATA.y)))  # more events, some new groups
    second = refresh_once(store, SPEC, settings)
    assert second.ok and second.version == 2 and second.start_version == 1
    stats = read_stats(store, len(SPEC.columns))
    same_fit(current_model(store), reference_fit(stats, start=record.fit, tol=1e-9, max_iter=200))
    cold = reference_fit(stats, tol=1e-9, max_iter=200)
    assert second.n_evals < cold.optsummary.n_evals
    np.testing.assert_allclose(second.criterion, cold.criterion, rtol=1e-8)


def test_refreshes_without_new_events_write_nothing_until_events_arrive(make_store):
    store = make_store()
    store.merge(batch(0, len(DATA.y) - 50))
    first = refresh_once(store, SPEC)
    assert first.ok and first.version == 1
    for _ in range(3):
        idle = refresh_once(store, SPEC)
        assert idle.status == "unchanged" and idle.current and not idle.ok
        assert idle.version == 1 and store.model_versions() == [1]
    store.merge(batch(len(DATA.y) - 50, len(DATA.y)))
    fresh = refresh_once(store, SPEC)
    assert fresh.ok and fresh.version == 2 and fresh.start_version == 1
    # a changed method is a different model, even on the same statistics
    assert refresh_once(store, SPEC, RefreshSettings(method="ML")).ok


def test_forced_refreshes_at_the_optimum_keep_writing_the_same_model(make_store):
    # warm starts at the optimum, every tick, when asked to write even without new events
    store = make_store()
    store.merge(batch(0, len(DATA.y)))
    first = refresh_once(store, SPEC)
    for version in range(2, 6):
        again = refresh_once(store, SPEC, RefreshSettings(skip_unchanged=False))
        assert again.ok, again.message
        assert again.version == version and again.start_version == version - 1
        np.testing.assert_allclose(again.criterion, first.criterion, rtol=1e-10)


def test_read_stats_in_small_chunks_is_identical(make_store):
    store = make_store()
    store.merge(batch(0, len(DATA.y)))
    whole = read_stats(store, 3, chunk=100_000)
    expected = DATA.stats()  # integer labels; the same groups under other names
    assert len(whole) == len(expected) and whole.n.sum() == expected.n.sum()
    outcomes = []
    for chunk in (1, 7, 64):
        part = read_stats(store, 3, chunk=chunk)
        assert part.keys == whole.keys
        for name in ("n", "mean", "C"):
            np.testing.assert_array_equal(getattr(part, name), getattr(whole, name))
        outcomes.append(refresh_once(store, SPEC, RefreshSettings(
            chunk=chunk, warm_start=False, skip_unchanged=False)))
    records = [ModelRecord.from_json(store.get_model(o.version)) for o in outcomes]
    for rec in records[1:]:
        assert {k: v for k, v in rec.fit.items() if k not in VOLATILE} == \
            {k: v for k, v in records[0].fit.items() if k not in VOLATILE}


def test_history_is_trimmed_and_rollback_pins_an_old_version(make_store):
    store = make_store()
    store.merge(batch(0, 400))
    settings = RefreshSettings(history=3)
    for hi in (500, 600, 700, 800, 900):
        store.merge(batch(hi - 100, hi))
        assert refresh_once(store, SPEC, settings).ok
    assert store.model_versions() == [3, 4, 5] and store.current_model_version() == 5
    rows = model_history(store)
    assert [r["version"] for r in rows] == [3, 4, 5]
    assert [r["current"] for r in rows] == [False, False, True]
    assert [r["n_obs"] for r in rows] == [700, 800, 900]
    assert all(r["converged"] and r["method"] == "REML" and r["n_groups"] > 0 for r in rows)
    assert rows[0]["created_at"] <= rows[1]["created_at"] <= rows[2]["created_at"]

    old = rollback(store, 3)
    assert store.current_model_version() == 3 and current_model(store).fit == old.fit
    assert current_model(store).fit["n_obs"] == 700
    with pytest.raises(StoreError, match="version 1 is not stored; stored versions: 3, 4, 5"):
        rollback(store, 1)
    assert store.current_model_version() == 3 and store.pinned_model() == 3
    # pinned: new events arrive, the refresh writes nothing and says how to resume
    store.merge(batch(900, 1000))
    held = refresh_once(store, SPEC, settings)
    assert held.status == "pinned" and held.pinned == 3 and "model --unpin" in held.message
    assert store.model_versions() == [3, 4, 5] and store.current_model_version() == 3
    # unpinned, the next refresh warm-starts from the rolled-back model and supersedes it
    assert store.unpin_model() == 3 and store.pinned_model() is None
    after = refresh_once(store, SPEC, settings)
    assert after.ok and after.start_version == 3 and after.version == 6
    assert store.model_versions() == [4, 5, 6]


# -- fits that must not replace the model ---------------------------------------------------


def test_a_fit_that_does_not_converge_keeps_the_old_model(make_store):
    store = make_store()
    store.merge(batch(0, 500))
    assert refresh_once(store, SPEC).ok
    good = store.get_model()
    store.merge(batch(500, len(DATA.y)))
    before = outcome_count("not_converged")
    out = refresh_once(store, SPEC, RefreshSettings(max_iter=1, warm_start=False))
    assert out.status == "not_converged" and not out.ok and out.converged is False
    assert out.version is None and out.current_version == 1
    assert outcome_count("not_converged") == before + 1
    assert store.model_versions() == [1] and store.get_model() == good


def test_a_fit_that_raises_keeps_the_old_model(make_store):
    store = make_store()
    store.merge(batch(0, 500))
    assert refresh_once(store, SPEC).ok
    good = store.get_model()
    # Redis: a second namespace, "<namespace>-one", deleted with the test's own
    one_group = (make_store() if isinstance(store, MemoryStore)
                 else RedisStore(store.client, store.namespace + "-one", columns=SPEC.columns))
    rows = DATA.groups == 0
    one_group.merge(GroupStats.from_rows(labelled(DATA.groups[rows]), DATA.W[rows]))
    before = outcome_count("fit_failed")
    out = refresh_once(one_group, SPEC)
    assert out.status == "fit_failed" and "at least 2 groups" in out.message
    assert outcome_count("fit_failed") == before + 1
    assert one_group.model_versions() == [] and one_group.get_model() is None
    # statistics the (mis)configured model cannot use at all: the model stays as it was
    narrower = ModelSpec("y", ["1", "x"], ["1"], "g")
    out = refresh_once(store, narrower)
    assert out.status == "fit_failed" and "statistics have 3 columns" in out.message
    assert store.get_model() == good
    assert store.model_versions() == [1]


# -- the lease and fencing ------------------------------------------------------------------


def test_lease_is_exclusive_and_tokens_grow(make_store):
    store = make_store()
    a, b = Lease(store, ttl=0.4), Lease(store, ttl=5)
    assert a.try_acquire() and not b.try_acquire()
    assert a.try_acquire() and a.token == 1  # re-acquiring one's own lease keeps the token
    assert store.lease_holder()[:2] == (a.owner, 1)
    assert b.acquire(timeout=0.1) is None
    assert b.acquire(timeout=2) == 2  # a never renewed: b gets it once a's ttl ran out
    assert not a.renew() and a.lost.is_set() and not a.held
    assert b.renew() and b.held
    with pytest.raises(StaleFenceError, match=r"token 1 is not the lease: .* held with token 2"):
        store.put_model(b"from a", fence=1)
    assert store.put_model(b"from b", fence=2) == 1
    b.release()
    assert store.lease_holder() is None and b.token is None
    with pytest.raises(StaleFenceError):
        store.put_model(b"from b, after letting go", fence=2)
    assert store.model_versions() == [1]


def test_an_expired_lease_cannot_write_even_if_nobody_took_it(make_store):
    store = make_store()
    store.merge(batch(0, 500))
    assert refresh_once(store, SPEC).ok
    good = store.get_model()
    lease = Lease(store, ttl=0.2)
    assert lease.try_acquire()  # no keep_alive: it lapses
    time.sleep(0.35)
    assert store.lease_holder() is None
    with pytest.raises(StaleFenceError, match="expired"):
        store.put_model(b"late", fence=lease.token)
    out = refresh_once(store, SPEC, RefreshSettings(skip_unchanged=False), lease=lease)
    assert out.status == "fenced" and "expired" in out.message and not out.ok
    assert store.model_versions() == [1] and store.get_model() == good
    assert store.current_model_version() == 1


def test_keep_alive_renews_the_lease(make_store):
    store = make_store()
    store.merge(batch(0, 500))
    lease = Lease(store, ttl=0.3)
    lease.acquire()
    lease.keep_alive()
    time.sleep(0.9)  # three ttls
    assert lease.held and store.lease_holder()[1] == lease.token
    assert refresh_once(store, SPEC, lease=lease).ok
    lease.release()
    assert store.lease_holder() is None


def test_a_second_refresher_waits_for_the_lease(make_store):
    store = make_store()
    store.merge(batch(0, 600))
    # on Redis, the second refresher talks through its own connection, as another process would
    other = store if isinstance(store, MemoryStore) else make_store()
    leader = Lease(store, ttl=5)
    leader.acquire()
    leader.keep_alive()
    results = {}
    waiter = threading.Thread(target=lambda: results.setdefault(
        "second", refresh_once(other, SPEC, RefreshSettings(skip_unchanged=False), wait=10)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and store.model_versions() == []  # blocked, wrote nothing
    first = refresh_once(store, SPEC, lease=leader)
    assert first.ok and first.version == 1
    time.sleep(0.3)
    assert waiter.is_alive()  # still held: the leader has not let go
    leader.release()
    waiter.join(timeout=10)
    second = results["second"]
    assert second.ok and second.version == 2 and second.token > first.token
    assert second.start_version == 1  # warm-started from the leader's model
    assert store.lease_holder() is None
    busy = Lease(store, ttl=5)
    busy.acquire()
    try:
        out = refresh_once(other, SPEC, wait=0.3)
        assert out.status == "no_lease" and store.model_versions() == [1, 2]
    finally:
        busy.release()


# -- the commands ---------------------------------------------------------------------------


@pytest.fixture
def redis_config(tmp_path, redis_url, namespace):
    path = write_config(tmp_path / "streamlme.toml", SPEC,
                        redis={"url": redis_url, "namespace": namespace})
    with path.open("a") as f:
        # every tick writes, so the loop tests can watch versions go by without feeding events
        f.write('[refresh]\nevery = "0.2s"\nhistory = 4\nskip_unchanged = false\n')
    return path


def test_refresh_once_and_model_command(redis_config, redis_url, namespace):
    config = load_config(redis_config)
    store = RedisStore(redis_url, namespace, columns=SPEC.columns)
    assert model_command(config) == (1, "no model yet: run `streamlme refresh --config FILE "
                                        "--once`")
    store.merge(batch(0, 500))
    assert run_refresh(config, once=True) == 0
    status, text = model_command(config, as_json=True)
    doc = json.loads(text)
    assert status == 0 and doc["version"] == 1 and doc["created_at"] > 0
    for key in ("beta", "beta_se", "fixed", "random", "G", "sigma2", "criterion", "loglik",
                "n_obs", "n_groups", "method", "converged"):
        assert key in doc, key
    assert doc["n_obs"] == 500 and doc["fixed"] == ["(Intercept)", "x", "v0"]
    assert "REML criterion" in model_command(config)[1]

    assert run_refresh(config, once=True) == 0
    status, text = model_command(config, as_json=True, history=True)
    rows = [json.loads(line) for line in text.splitlines()]
    assert status == 0 and [r["version"] for r in rows] == [1, 2]
    status, text = model_command(config, as_json=True, rollback_to=1)
    assert status == 0 and json.loads(text)["version"] == 1
    assert store.current_model_version() == 1
    status, text = model_command(config, rollback_to=9)
    assert status == 1 and "not stored" in text and store.current_model_version() == 1
    assert "*      1" in model_command(config, history=True)[1]
    status, text = model_command(config, unpin=True)
    assert status == 0 and text.startswith("version 1 unpinned")

    bad = load_config(redis_config, env={"STREAMLME_REFRESH_MAX_ITER": "1"})
    store.merge(batch(500, len(DATA.y)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = run_refresh(bad, once=True,
                             settings=RefreshSettings.from_config(bad, warm_start=False))
    assert status == 1 and store.model_versions() == [1, 2]
    assert store.current_model_version() == 1


def test_leader_loop_fails_over_to_the_standby(redis_config, redis_url, namespace):
    config = load_config(redis_config)
    store = RedisStore(redis_url, namespace, columns=SPEC.columns)
    store.merge(batch(0, len(DATA.y)))
    settings = RefreshSettings.from_config(config, lease_ttl=2.0)
    stops = [threading.Event(), threading.Event()]
    codes: dict[int, int] = {}

    def run(i: int) -> None:
        codes[i] = run_refresh(config, every=0.1, settings=settings, stop=stops[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
        time.sleep(0.3)
    try:
        wait_until(lambda: (store.current_model_version() or 0) >= 3)
        holder = store.lease_holder()
        seen = store.current_model_version()
        wait_until(lambda: store.current_model_version() >= seen + 3)
        assert store.lease_holder()[:2] == holder[:2]  # one leader throughout
        assert len(store.model_versions()) == 4  # history = 4
        stops[0].set()  # the leader stops and releases; the standby takes over
        threads[0].join(timeout=10)
        wait_until(lambda: (store.lease_holder() or ("", 0))[1] > holder[1])
        seen = store.current_model_version()
        wait_until(lambda: store.current_model_version() >= seen + 2)
    finally:
        for stop in stops:
            stop.set()
        for t in threads:
            t.join(timeout=10)
    assert codes == {0: 0, 1: 0} and store.lease_holder() is None


def test_a_one_shot_refresh_gives_up_after_waiting(redis_config, redis_url, namespace):
    config = load_config(redis_config)
    store = RedisStore(redis_url, namespace, columns=SPEC.columns)
    store.merge(batch(0, 500))
    with Lease(store, ttl=5):
        before = outcome_count("no_lease")
        assert run_refresh(config, once=True, wait=0.3) == 1
        assert outcome_count("no_lease") == before + 1
    assert store.model_versions() == []
    assert run_refresh(config, once=True, wait=0.3) == 0


def test_the_leader_loop_survives_a_redis_restart(tmp_path, redis_server_factory):
    server = redis_server_factory()
    path = write_config(tmp_path / "private.toml", SPEC,
                        redis={"url": server.url, "namespace": "restart"})
    with path.open("a") as f:
        f.write('[refresh]\nevery = "0.1s"\nskip_unchanged = false\n')
    config = load_config(path)
    store = RedisStore(server.url, "restart", columns=SPEC.columns)
    store.merge(batch(0, 500))
    stop, codes = threading.Event(), []
    loop = threading.Thread(target=lambda: codes.append(run_refresh(
        config, settings=RefreshSettings.from_config(config, lease_ttl=1.0), stop=stop)))
    loop.start()
    try:
        wait_until(lambda: (store.current_model_version() or 0) >= 2)
        server.stop(kill=True)  # no persistence: statistics, models and lease are gone
        time.sleep(0.5)
        server.start()
        store = RedisStore(server.url, "restart", columns=SPEC.columns)
        store.merge(batch(0, 500))
        wait_until(lambda: (store.current_model_version() or 0) >= 2)
        assert store.lease_holder() is not None
    finally:
        stop.set()
        loop.join(timeout=15)
    assert codes == [0] and store.lease_holder() is None


def test_sigterm_stops_the_refresh_loop_and_frees_the_lease(redis_config, redis_url, namespace):
    store = RedisStore(redis_url, namespace, columns=SPEC.columns)
    store.merge(batch(0, 500))
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO);"
            "from streamlme.config import load_config; from streamlme.refresh import run_refresh;"
            f"sys.exit(run_refresh(load_config({str(redis_config)!r}), every=0.2))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: (store.current_model_version() or 0) >= 2, timeout=30)
        assert store.lease_holder() is not None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert store.lease_holder() is None
    assert b"refresh wrote model v1" in err and b"signal 15" in err


def wait_until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
