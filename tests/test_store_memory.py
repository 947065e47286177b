"""MemoryStore beyond the shared contract: snapshots and concurrent readers."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from test_store_contract import WEIRD_IDS, assert_stats_close, random_rows

from streamlme.stats import GroupStats
from streamlme.store import MemoryStore, OffsetRange, StoreError


def filled_store(**kw: object) -> MemoryStore:
    store = MemoryStore(**kw)  # type: ignore[arg-type]
    labels, W = random_rows(20, 500, 3, WEIRD_IDS)
    store.merge(GroupStats.from_rows(labels, W),
                offsets={("events", 0): OffsetRange(0, 300), ("other", 2): OffsetRange(5, 205)})
    token = store.acquire_lease("filler", 60.0)
    store.put_model(b"first", fence=token)
    store.put_model(b"\x00binary\xff", fence=token)
    store.set_current(1)
    return store


def test_snapshot_round_trip(tmp_path):
    store = filled_store(columns=["a", "b", "y"])
    path = store.snapshot(tmp_path / "state" / "store.npz")
    loaded = MemoryStore.load(path)
    everything = store.get_many(WEIRD_IDS)
    assert_stats_close(loaded.get_many(WEIRD_IDS), everything, rtol=0)
    assert loaded.offsets("events") == {0: 300} and loaded.offsets("other") == {2: 205}
    assert loaded.model_versions() == [1, 2]
    assert loaded.get_model() == b"first" and loaded.get_model(2) == b"\x00binary\xff"
    assert loaded.columns == ("a", "b", "y") and loaded.d == 3
    assert loaded.put_model(b"next") == 3
    with pytest.raises(Exception, match="not the lease"):  # leases do not survive a restart
        loaded.put_model(b"deposed", fence=1)
    assert loaded.acquire_lease("next", 60.0) == 2  # tokens continue past the restored one
    # offsets keep refusing replays after a restart
    labels, W = random_rows(21, 10, 3, ["x"])
    assert not loaded.merge(GroupStats.from_rows(labels, W),
                            offsets={("events", 0): OffsetRange(0, 300)}).applied


def test_snapshot_of_an_empty_store(tmp_path):
    path = MemoryStore().snapshot(tmp_path / "empty.npz")
    loaded = MemoryStore(snapshot=path)
    assert loaded.n_groups() == 0 and loaded.get_model() is None and loaded.d is None


def test_snapshot_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "store.npz"
    filled_store().snapshot(path)
    before = path.read_bytes()

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        MemoryStore().snapshot(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.npz"]


def test_missing_and_corrupt_snapshots(tmp_path):
    with pytest.raises(FileNotFoundError):
        MemoryStore.load(tmp_path / "absent.npz")
    assert MemoryStore(snapshot=tmp_path / "absent.npz").n_groups() == 0  # first start
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a snapshot")
    with pytest.raises(StoreError, match="not a readable MemoryStore snapshot"):
        MemoryStore.load(bad)


def test_snapshot_of_another_width_is_refused(tmp_path):
    path = filled_store().snapshot(tmp_path / "s.npz")
    with pytest.raises(StoreError, match="3 columns, not 2"):
        MemoryStore(snapshot=path, d=2)


def test_readers_see_whole_batches_while_a_writer_merges():
    store = MemoryStore()
    keys = [f"g{i}" for i in range(50)]
    ones = GroupStats.from_codes(np.arange(50), keys, np.ones((50, 2)))
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                n = [p.n for p in store.scan(chunk=50)]
                if n:  # one chunk holds all groups, read under the lock: one batch count
                    assert len(set(n[0].tolist())) == 1
                store.get("g3")
        except BaseException as e:
            errors.append(e)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for i in range(300):
        store.merge(ones, offsets={("events", 0): OffsetRange(i, i + 1)})
    stop.set()
    for t in readers:
        t.join()
    assert not errors
    assert store.get("g3").n.tolist() == [300.0]


def test_a_snapshot_restores_the_index_of_cells_by_level(tmp_path):
    store = MemoryStore()
    keys = ['["A","a"]', '["A","b"]', '["B","a"]']
    store.merge(GroupStats.from_rows(keys, np.ones((3, 2))))
    loaded = MemoryStore.load(store.snapshot(tmp_path / "s.npz"))
    assert loaded.cells_of(0, "A") == ['["A","a"]', '["A","b"]']
    assert loaded.cells_of(1, "a") == ['["A","a"]', '["B","a"]']
