"""Shared pieces of the stream tests: synthetic events, config files, subprocess consumers.

The data generation is factored out so that a test can build the very same rows as a CSV (for a
batch ``streamlme fit``), as Kafka messages, and as one-pass `GroupStats` to compare against.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
from kafka import KafkaConsumer, TopicPartition

from streamlme.spec import ModelSpec
from streamlme.stats import GroupStats

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Events:
    """Rows of a random-intercept-and-slope model: group ids and W = (covariates..., y)."""

    spec: ModelSpec
    groups: list[str]
    W: np.ndarray

    def __len__(self) -> int:
        return len(self.groups)

    def batch_stats(self) -> GroupStats:
        """The statistics built in one pass over all rows."""
        return GroupStats.from_rows(self.groups, self.W)

    def messages(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, JSON value) per row, in row order."""
        names = [self.spec.group, *self.spec.columns]
        encode = msgspec.json.encode
        for g, row in zip(self.groups, self.W.tolist(), strict=True):
            yield g.encode(), encode(dict(zip(names, [g, *row], strict=True)))

    def write_jsonl(self, path: Path) -> Path:
        with open(path, "wb") as fh:
            for _, value in self.messages():
                fh.write(value + b"\n")
        return path

    def write_csv(self, path: Path) -> Path:
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow([self.spec.group, *self.spec.columns])
            for g, row in zip(self.groups, self.W.tolist(), strict=True):
                writer.writerow([g, *map(repr, row)])
        return path


def make_events(n_events: int, n_groups: int, n_cov: int = 2, seed: int = 0) -> Events:
    """Events of ``y = 1000 + x beta + b0_g + b1_g x1 + e`` over ``n_groups`` groups.

    The large intercept makes naive raw sums lose digits, so an exact match means something.
    """
    rng = np.random.default_rng(seed)
    covs = [f"x{i + 1}" for i in range(n_cov)]
    spec = ModelSpec(response="y", fixed=["1", *covs], random=["1", covs[0]], group="g")
    codes = rng.integers(0, n_groups, n_events)
    X = rng.normal(size=(n_events, n_cov)) * 2.0 + 1.0
    b0 = rng.normal(0, 3.0, n_groups)
    b1 = rng.normal(0, 0.5, n_groups)
    beta = np.linspace(0.5, 2.0, n_cov)
    y = 1000.0 + X @ beta + b0[codes] + b1[codes] * X[:, 0] + rng.normal(0, 1.0, n_events)
    groups = [f"grp-{c}" for c in codes]
    return Events(spec, groups, np.column_stack([X, y]))


def write_config(
    path: Path,
    spec: ModelSpec,
    *,
    kafka: dict[str, object] | None = None,
    redis: dict[str, object] | None = None,
    client: dict[str, object] | None = None,
    snapshot: str | None = None,
) -> Path:
    """A TOML config file for the given sections."""

    def table(name: str, values: dict[str, object]) -> list[str]:
        lines = [f"[{name}]"]
        for key, value in values.items():
            if not isinstance(value, dict):
                bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
                lines.append(f"{key if bare else _toml(key)} = {_toml(value)}")
        for key, value in values.items():
            if isinstance(value, dict):  # a sub-table, e.g. [model.levels]
                lines += table(f"{name}.{key}", value)
        return lines

    lines = table("model", {k: v for k, v in spec.to_dict().items()})
    if kafka:
        lines += table("kafka", kafka)
    if client:
        lines += table("kafka.client", client)
    if redis:
        lines += table("redis", redis)
    if snapshot:
        lines += table("store", {"snapshot": snapshot})
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def start_consumer(config: Path, *args: str, log_path: Path | None = None) -> subprocess.Popen:
    """``streamlme consume --config FILE ...`` as a child process."""
    err = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "streamlme.cli", "consume", "--config", str(config), *args],
        stdout=subprocess.PIPE, stderr=err, env=env,
    )


def assert_stats_equal(actual: GroupStats, expected: GroupStats, rtol: float = 1e-10) -> None:
    """Same groups, and n, mean, C equal to ``rtol`` (relative to each quantity's scale)."""
    assert sorted(actual.keys) == sorted(expected.keys), (
        f"{len(actual)} groups stored, {len(expected)} expected; "
        f"missing {sorted(set(expected.keys) - set(actual.keys))[:5]}, "
        f"extra {sorted(set(actual.keys) - set(expected.keys))[:5]}"
    )
    a = actual.select(expected.keys)
    np.testing.assert_allclose(a.n, expected.n, rtol=rtol, atol=0)
    np.testing.assert_allclose(a.mean, expected.mean, rtol=rtol,
                               atol=rtol * np.abs(expected.mean).max())
    scale = np.abs(expected.C).max(axis=(1, 2), keepdims=True)
    scale[scale == 0] = 1.0  # a one-event cell has no co-moments: compare them as they are
    np.testing.assert_allclose(a.C / scale, expected.C / scale, rtol=0, atol=rtol)


def read_all(store) -> GroupStats:
    """Every group of a store as one GroupStats."""
    parts = list(store.scan())
    if not parts:
        return GroupStats.empty(0)
    return GroupStats(
        [k for p in parts for k in p.keys],
        np.concatenate([p.n for p in parts]),
        np.concatenate([p.mean for p in parts]),
        np.concatenate([p.C for p in parts]),
        np.concatenate([p.t for p in parts]),
    )


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 30.0) -> list:
    """The first ``count`` messages of every partition of ``topic`` (no consumer group)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    try:
        deadline = time.monotonic() + timeout
        parts = None
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            time.sleep(0.1) if not parts else None
        assert parts, f"topic {topic} does not exist"
        consumer.assign([TopicPartition(topic, p) for p in parts])
        out: list = []
        while len(out) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(records)
        return out
    finally:
        consumer.close()
