"""`streamlme model --rollback V` pins V; refreshers write no new current version until
`model --unpin`. The pin on both stores, against a running refresh loop with events arriving, and
through the command line, on a real Redis.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from stream_helpers import write_config

from streamlme import GroupStats, ModelSpec
from streamlme.cli import main
from streamlme.config import load_config
from streamlme.refresh import refresh_once, run_refresh
from streamlme.store import MemoryStore, RedisStore, StoreError
from streamlme.store.base import ModelWriteRefusedError

SPEC = ModelSpec("y", ["1"], ["1"], "g")
RNG = np.random.default_rng(3)


def events(n: int, groups: int = 20) -> GroupStats:
    g = RNG.integers(0, groups, size=n)
    y = RNG.normal(size=groups)[g] + RNG.normal(size=n)
    return GroupStats.from_rows([f"g{i}" for i in g], y[:, None])


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return MemoryStore(columns=SPEC.columns)
    return RedisStore(request.getfixturevalue("redis_url"), request.getfixturevalue("namespace"),
                      columns=SPEC.columns)


def test_a_pin_refuses_checked_writes_atomically_until_unpinned(store):
    store.merge(events(200))
    epoch = store.epoch()
    v1 = store.put_model_checked(b"one", epoch)
    store.put_model_checked(b"two", epoch)
    assert store.pinned_model() is None and store.model_pin() is None
    store.pin_model(v1)
    assert store.pinned_model() == v1 and store.current_model_version() == v1
    assert store.model_pin()[1] == pytest.approx(time.time(), abs=60)
    with pytest.raises(ModelWriteRefusedError) as refused:
        store.put_model_checked(b"three", epoch)
    assert refused.value.reason == "pinned" and f"version {v1} is pinned" in str(refused.value)
    assert store.model_versions() == [1, 2] and store.current_model_version() == v1
    with pytest.raises(StoreError, match="not stored"):
        store.pin_model(9)
    assert store.pinned_model() == v1
    assert store.unpin_model() == v1 and store.unpin_model() is None
    assert store.put_model_checked(b"three", epoch) == 3 and store.current_model_version() == 3


def test_a_flag_or_another_epoch_refuses_checked_writes(store):
    store.merge(events(50))
    epoch = store.epoch()
    with pytest.raises(ModelWriteRefusedError) as refused:
        store.put_model_checked(b"x", "an-older-epoch")
    assert refused.value.reason == "epoch"
    store.set_flag("rebuilding", "replaying")
    with pytest.raises(ModelWriteRefusedError) as refused:
        store.put_model_checked(b"x", epoch)
    assert refused.value.reason == "flagged"
    assert store.model_versions() == []
    store.clear_flag()
    assert store.put_model_checked(b"x", epoch) == 1


def test_a_pin_goes_with_its_namespace(store):
    store.merge(events(50))
    store.pin_model(store.put_model(b"x"))
    store.clear()  # a namespace that comes back empty is not pinned to a version it lacks
    assert store.pinned_model() is None


def test_the_pin_survives_a_running_refresh_loop_until_unpinned(tmp_path, redis_url, namespace,
                                                                caplog):
    caplog.set_level(logging.DEBUG, logger="streamlme.refresh")
    path = write_config(tmp_path / "streamlme.toml", SPEC,
                        redis={"url": redis_url, "namespace": namespace})
    store = RedisStore(redis_url, namespace, columns=SPEC.columns)
    store.merge(events(300))
    assert refresh_once(store, SPEC).ok
    store.merge(events(100))
    assert refresh_once(store, SPEC).ok
    store.pin_model(1)
    stop = threading.Event()
    loop = threading.Thread(target=run_refresh, args=(load_config(path),),
                            kwargs={"every": 0.05, "stop": stop})
    loop.start()

    def pinned_lines(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno == level and "refresh pinned" in r.getMessage()]

    try:
        for _ in range(5):  # events keep arriving while pinned
            store.merge(events(50))
            time.sleep(0.1)
        wait_until(lambda: len(pinned_lines(logging.DEBUG)) >= 3)
        assert store.current_model_version() == 1 and store.model_versions() == [1, 2]
        said = pinned_lines(logging.WARNING)
        assert len(said) == 1, said  # once per run
        assert "version 1 is pinned by `model --rollback`; run `streamlme model --unpin` " \
               "to resume" in said[0]
        assert store.unpin_model() == 1
        wait_until(lambda: store.current_model_version() == 3)
        assert json.loads(store.get_model())["n_obs"] == 650  # every event, once unpinned
    finally:
        stop.set()
        loop.join(timeout=10)
    assert store.model_versions() == [1, 2, 3]


def test_the_model_command_pins_shows_the_pin_and_unpins(tmp_path, redis_url, namespace):
    path = write_config(tmp_path / "streamlme.toml", SPEC,
                        redis={"url": redis_url, "namespace": namespace})
    store = RedisStore(redis_url, namespace, columns=SPEC.columns)
    store.merge(events(300))
    assert refresh_once(store, SPEC).ok
    store.merge(events(100))
    assert refresh_once(store, SPEC).ok
    runner = CliRunner()

    def model(*args: str):
        return runner.invoke(main, ["model", "--config", str(path), *args])

    done = model("--rollback", "1")
    assert done.exit_code == 0, done.output
    assert "pinned: version 1 since" in done.output and "streamlme model --unpin" in done.output
    doc = json.loads(model("--json").output)
    assert doc["version"] == 1 and doc["pinned"] is True and doc["pinned_version"] == 1
    assert doc["pinned_at"].endswith("Z")
    history = model("--history").output
    assert "*      1" in history and "pinned" in history.splitlines()[1]
    assert model("--refresh-ignored").exit_code == 2  # an unknown option is a usage error
    assert model("--rollback", "1", "--unpin").exit_code == 2

    assert runner.invoke(main, ["refresh", "--config", str(path), "--once"]).exit_code == 0
    assert store.model_versions() == [1, 2] and store.current_model_version() == 1

    done = model("--unpin")
    assert done.exit_code == 0 and done.output.startswith("version 1 unpinned")
    assert json.loads(model("--json").output)["pinned_version"] is None
    store.merge(events(10))
    assert runner.invoke(main, ["refresh", "--config", str(path), "--once"]).exit_code == 0
    assert store.current_model_version() == 3


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
