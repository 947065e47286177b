"""Folding decoded batches into per-group deltas, and the embedded JSON-lines mode."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from prometheus_client import REGISTRY
from stream_helpers import REPO, assert_stats_equal, make_events, read_all, write_config

from streamlme.config import load_config
from streamlme.events import EventDecoder
from streamlme.stats import GroupStats
from streamlme.store.connect import open_store
from streamlme.stream.app import run_consume
from streamlme.stream.batch import code_groups, fold
from streamlme.stream.publish import csv_events, jsonl_events


def test_fold_equals_one_pass_statistics() -> None:
    ev = make_events(5_000, 300, n_cov=3, seed=1)
    delta = fold(ev.groups, ev.W)
    assert delta.retracts is None and delta.n_events == 5_000
    assert_stats_equal(delta.adds, ev.batch_stats(), rtol=1e-12)


def test_fold_splits_adds_and_retracts_with_weights() -> None:
    ev = make_events(2_000, 50, seed=2)
    rng = np.random.default_rng(3)
    retract = rng.random(len(ev)) < 0.2
    weights = rng.uniform(0.5, 2.0, len(ev))
    delta = fold(ev.groups, ev.W, weights=weights, retract=retract)
    groups = np.array(ev.groups)
    want_adds = GroupStats.from_rows(groups[~retract], ev.W[~retract], weights[~retract])
    want_retracts = GroupStats.from_rows(groups[retract], ev.W[retract], weights[retract])
    assert_stats_equal(delta.adds, want_adds, rtol=1e-12)
    assert delta.retracts is not None
    assert_stats_equal(delta.retracts, want_retracts, rtol=1e-12)
    assert delta.retract_rows.tolist() == np.flatnonzero(retract).tolist()
    assert delta.retract_groups == groups[retract].tolist()


def test_fold_with_decay_matches_from_rows() -> None:
    ev = make_events(1_000, 20, seed=4)
    ts = np.sort(np.random.default_rng(5).uniform(0, 1000, len(ev)))
    delta = fold(ev.groups, ev.W, ts=ts, half_life=100.0)
    want = GroupStats.from_rows(ev.groups, ev.W, ts=ts, half_life=100.0)
    assert_stats_equal(delta.adds, want, rtol=1e-12)
    np.testing.assert_array_equal(delta.adds.select(want.keys).t, want.t)


def test_code_groups_keeps_first_appearance_order() -> None:
    codes, keys = code_groups(["b", "a", "b", "c", "a"])
    assert keys == ["b", "a", "c"] and codes.tolist() == [0, 1, 0, 2, 1]


def test_decoded_batch_folds_like_raw_rows() -> None:
    ev = make_events(3_000, 100, seed=6)
    decoded = EventDecoder(ev.spec).decode([v for _, v in ev.messages()])
    assert not decoded.rejections
    delta = fold(decoded.groups, decoded.W, decoded.weights, decoded.ts, decoded.retract)
    assert_stats_equal(delta.adds, ev.batch_stats(), rtol=1e-12)


def test_publish_row_encoding_round_trips(tmp_path) -> None:
    ev = make_events(200, 10, seed=7)
    decoder = EventDecoder(ev.spec)
    with open(ev.write_csv(tmp_path / "e.csv"), newline="") as fh:
        from_csv = list(csv_events(fh, ev.spec.group))
    with open(ev.write_jsonl(tmp_path / "e.jsonl"), "rb") as fh:
        from_jsonl = list(jsonl_events(fh, ev.spec.group))
    for events in (from_csv, from_jsonl):
        assert [k for k, _ in events] == [g.encode() for g in ev.groups]
        decoded = decoder.decode([v for _, v in events])
        np.testing.assert_array_equal(decoded.W, ev.W)


def test_embedded_jsonl_into_memory_store_resumes(tmp_path) -> None:
    """consume --input FILE: the same decode/fold/merge path, into the MemoryStore; a second run
    on the same file (snapshot reloaded) resumes at the recorded line and adds nothing twice."""
    ev = make_events(20_000, 500, seed=8)
    path = ev.write_jsonl(tmp_path / "events.jsonl")
    with open(path, "ab") as fh:  # bad lines are counted, not applied, and never stop the run
        fh.write(b'{"g": "x", "x1": "oops"}\n\nnot json\n')
    config = load_config(write_config(tmp_path / "c.toml", ev.spec,
                                      snapshot=str(tmp_path / "snap.bin")))
    ingested, dead = _sample("streamlme_events_ingested_total"), _dead_lettered()
    report = run_consume(config, source=str(path))
    assert report.events_applied == 20_000
    assert report.rejected == {"non_numeric": 1, "invalid_json": 1}
    assert_stats_equal(read_all(open_store(config)), ev.batch_stats())
    # the process's Prometheus metrics (what `consume --metrics-port` serves) saw the same
    assert _sample("streamlme_events_ingested_total") - ingested == 20_000
    after = _dead_lettered()
    assert {r: after[r] - dead.get(r, 0) for r in after if after[r] != dead.get(r, 0)} == \
        {"non_numeric": 1, "invalid_json": 1}

    again = run_consume(config, source=str(path))
    assert again.events_read == 0 and again.events_applied == 0
    assert_stats_equal(read_all(open_store(config)), ev.batch_stats())


def test_embedded_stdin_through_the_module_entry(tmp_path) -> None:
    ev = make_events(2_000, 40, seed=9)
    path = ev.write_jsonl(tmp_path / "events.jsonl")
    snapshot = tmp_path / "snap.bin"
    cfg = write_config(tmp_path / "c.toml", ev.spec, snapshot=str(snapshot))
    with open(path, "rb") as stdin:
        out = subprocess.run(
            [sys.executable, "-m", "streamlme.cli", "consume", "--config", str(cfg),
             "--input", "-"],
            stdin=stdin, capture_output=True, cwd=REPO, timeout=120, check=True,
        )
    report = json.loads(out.stdout)
    assert report["events_applied"] == 2_000 and report["events_rejected"] == 0
    assert_stats_equal(read_all(open_store(load_config(cfg))), ev.batch_stats())


def test_consume_without_kafka_or_input_says_what_to_do(tmp_path) -> None:
    ev = make_events(10, 2)
    config = load_config(write_config(tmp_path / "c.toml", ev.spec))
    with pytest.raises(ValueError, match="--input"):
        run_consume(config)


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    value = REGISTRY.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def _dead_lettered() -> dict[str, float]:
    out = {}
    for metric in REGISTRY.collect():
        if metric.name == "streamlme_events_dead_lettered":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["reason"]] = sample.value
    return out
