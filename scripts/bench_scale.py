#!/usr/bin/env python
"""Scale benchmark: standalone Redis against a 3-master Redis Cluster, and the local refresh
against Dask, in one run. Prints one JSON object per line, each naming the machine.

    python scripts/bench_scale.py                          # 1M events, 1e6 groups
    python scripts/bench_scale.py --events 200000 --groups 200000   # a quicker run

Redis: a ``redis-server`` this script starts on a free port (never the shared 6379) for the
standalone cases, and for the cluster cases ``STREAMLME_TEST_REDIS_CLUSTER`` (comma-separated
host:port startup nodes) if set, else six local ``redis-server --cluster-enabled yes`` processes
joined as 3 masters + 3 replicas, started as the tests start them (`tests/fixtures_cluster.py`).
Every key written is deleted afterwards and every process started is stopped.

Lines (``case``):

``ingest``         --events JSON events (--ingest-groups groups, --covariates covariates, the
                   events of scripts/bench_ingest.py) through the real consumer path —
                   `streamlme.stream.app.make_ingestor` on a JSON-lines file (one pseudo
                   partition; Kafka is not involved) with the store `open_store` builds:
                   decode, fold, one merge script call per shard, pipelined (per node on the
                   Cluster). Into the standalone server and into the Cluster, alternately
                   (--repeats each), medians. Target: cluster >= 0.8 x standalone.
``memory``         bytes per group of the --groups groups written into the Cluster: the sum over
                   masters of INFO memory used_memory after minus before, over the groups (and
                   with the replicas' copies, and on the standalone server for comparison).
``read``           `streamlme.refresh.read_stats` (the refresh's read: one HGETALL per shard,
                   pipelined, binary records, in chunks) of 1e5 and --groups groups from the
                   standalone server and of --groups groups from the Cluster; groups/s per
                   reading process, median of --read-repeats. Target: 1,000,000 groups/s.
``refresh``        a refresh of the --groups groups held in the Cluster, read and fit timed
                   apart: engine "local" (read_stats and the fingerprint, then estimate.fit, as
                   the local engine does) and engine "dask" (`DaskRefresh.load`, `.fit`) on a
                   `distributed.LocalCluster` of --workers worker processes, 1 thread each.
``dask_overhead``  `streamlme.refresh_dask.measure_overhead` after that fit: the wall time of a
                   deviance-and-gradient evaluation (two maps), the workers' computation in it,
                   and the rest. Target: the Dask overhead per evaluation under 20 ms.

The refresh data is bench_refresh.py's model (p = 5 fixed effects, q = 2 correlated random
terms, ~10 events per group, d = 5 statistics columns), generated 100k groups at a time.
BLAS/OpenMP/numba threads are pinned to 1 here and in the Dask workers.
"""

from __future__ import annotations

import os

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "RAYON_NUM_THREADS", "NUMBA_NUM_THREADS")
for _var in THREAD_VARS:
    os.environ[_var] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
# the benchmarks' helpers, and the tests' Redis / Cluster / Dask starters (reused, not copied)
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import numpy as np  # noqa: E402
from bench_ingest import events as ingest_events  # noqa: E402
from bench_refresh import generate, median_time, rel_diff  # noqa: E402
from bench_refresh import machine as refresh_machine  # noqa: E402
from fixtures_cluster import ENV as CLUSTER_ENV  # noqa: E402
from fixtures_cluster import (  # noqa: E402
    LocalRedisCluster,
    RedisClusterHandle,
    delete_cluster_namespace,
)
from fixtures_dask import start_local_cluster  # noqa: E402
from fixtures_redis import RedisServer  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from streamlme.config import load_config  # noqa: E402
from streamlme.estimate import fit, kernels  # noqa: E402
from streamlme.refresh import read_stats, stats_fingerprint  # noqa: E402
from streamlme.spec import ModelSpec  # noqa: E402
from streamlme.stats import GroupStats, packed_size  # noqa: E402
from streamlme.store import RedisStore  # noqa: E402
from streamlme.store.connect import close_store, open_store, redis_client  # noqa: E402
from streamlme.stream.app import make_ingestor  # noqa: E402

INGEST_TARGET = 0.8
READ_TARGET_GPS = 1_000_000
OVERHEAD_TARGET_MS = 20.0
CHUNK_GROUPS = 100_000
REFRESH_SPEC = ModelSpec(response="y", fixed=["1", "x1", "x2", "x3", "x4"], random=["1", "x1"],
                         group="g")


# -- the machine --------------------------------------------------------------------------------


def machine(redis_version: str | None) -> dict[str, Any]:
    """bench_refresh's machine, with the versions that matter here and the revision."""
    import dask
    import distributed
    import hiredis
    import redis
    import scipy
    from redis.utils import HIREDIS_AVAILABLE

    rev = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=HERE, check=True).stdout.strip()
    return {**refresh_machine(), "numpy": np.__version__, "scipy": scipy.__version__,
            "redis_py": redis.__version__, "hiredis": hiredis.__version__,
            "hiredis_parser": bool(HIREDIS_AVAILABLE), "dask": dask.__version__,
            "distributed": distributed.__version__, "redis_server": redis_version,
            "streamlme_rev": rev, "kernel_backend": kernels.backend()}


def emit(line: dict[str, Any], info: dict[str, Any]) -> None:
    # other work on the machine shows in the load average beside each figure
    print(json.dumps({**line, "loadavg_1m": round(os.getloadavg()[0], 2), "machine": info}),
          flush=True)


# -- servers ------------------------------------------------------------------------------------


def server_cpu(pids: list[int]) -> float:
    """User + system CPU seconds the processes ``pids`` used so far (0 for unknown ones)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def used_memory(handle: RedisClusterHandle, names: list[str]) -> list[int]:
    out = []
    for name in names:
        node = handle.node(name, timeout=10.0)
        try:
            out.append(int(node.info("memory")["used_memory"]))
        finally:
            node.close()
    return out


def hgetall_stats(handle: RedisClusterHandle, names: list[str]) -> tuple[int, int]:
    """(calls, microseconds) of HGETALL so far, summed over ``names`` (INFO commandstats)."""
    calls = usec = 0
    for name in names:
        node = handle.node(name, timeout=10.0)
        try:
            got = node.info("commandstats").get("cmdstat_hgetall", {})
        finally:
            node.close()
        calls += int(got.get("calls", 0))
        usec += int(got.get("usec", 0))
    return calls, usec


def worker_rss(client: Any) -> list[int]:
    """Each Dask worker's resident memory (bytes), as the workers measure it now."""
    import psutil

    return [int(v) for v in client.run(lambda: psutil.Process().memory_info().rss).values()]


def wait_replicated(handle: RedisClusterHandle, timeout: float = 30.0) -> None:
    """Until every replica's offset has caught up with its master's (best effort)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lagging = False
        for name in handle.masters():
            node = handle.node(name, timeout=5.0)
            try:
                info = node.info("replication")
            finally:
                node.close()
            offset = int(info.get("master_repl_offset", 0))
            for k, v in info.items():
                if k.startswith("slave") and isinstance(v, dict) and int(v["offset"]) < offset:
                    lagging = True
        if not lagging:
            return
        time.sleep(0.1)


# -- data -----------------------------------------------------------------------------------------


def refresh_chunks(groups: int, seed: int = 11) -> Iterator[GroupStats]:
    """bench_refresh's data, CHUNK_GROUPS groups at a time (keys g0, g1, ...)."""
    for k, lo in enumerate(range(0, groups, CHUNK_GROUPS)):
        m = min(CHUNK_GROUPS, groups - lo)
        codes, X, y, _ = generate(m, seed=seed + k)
        yield GroupStats.from_codes(codes, [f"g{lo + i}" for i in range(m)],
                                    np.column_stack([X[:, 1:], y]))


def write_events(path: Path, n: int, groups: int, covariates: int) -> None:
    with open(path, "wb") as fh:
        for _, value in ingest_events(n, groups, covariates):
            fh.write(value + b"\n")


def config_file(path: Path, url: str, namespace: str, covariates: int, shards: int) -> Any:
    covs = ", ".join(f'"x{i + 1}"' for i in range(covariates))
    path.write_text(
        f'[model]\nresponse = "y"\nfixed = ["1", {covs}]\nrandom = ["1", "x1"]\ngroup = "g"\n'
        f'[redis]\nurl = "{url}"\nnamespace = "{namespace}"\nshards = {shards}\n')
    return load_config(path)


# -- (a) ingest -----------------------------------------------------------------------------------


def ingest_once(url: str, tmp: Path, events_path: Path, args: argparse.Namespace,
                pids: list[int]) -> dict[str, Any]:
    """One consumer run of the whole file into a fresh namespace; cleared afterwards."""
    namespace = f"bench-scale-{uuid.uuid4().hex[:8]}"
    config = config_file(tmp / f"{namespace}.toml", url, namespace, args.covariates, args.shards)
    store = open_store(config)
    try:
        ingestor = make_ingestor(config, store, str(events_path))
        gc.collect()
        cpu0, redis0, t0 = time.process_time(), server_cpu(pids), time.perf_counter()
        report = ingestor.run()
        seconds = time.perf_counter() - t0
        cpu, redis_cpu = time.process_time() - cpu0, server_cpu(pids) - redis0
        if report.events_applied != args.events or store.n_groups() != args.ingest_groups:
            raise RuntimeError(f"ingest applied {report.events_applied} of {args.events} events "
                               f"into {store.n_groups()} groups: {report.to_dict()}")
        return {"eps": args.events / seconds, "seconds": seconds, "batches": report.batches,
                "consumer_cpu_s": cpu, "redis_cpu_s": redis_cpu if pids else None,
                "retries": getattr(store, "retries", 0)}
    finally:
        store.clear()
        close_store(config, store)


def case_ingest(standalone_url: str, cluster: RedisClusterHandle, tmp: Path,
                args: argparse.Namespace, pids: dict[str, list[int]], info: dict) -> None:
    events_path = tmp / "events.jsonl"
    t0 = time.perf_counter()
    write_events(events_path, args.events, args.ingest_groups, args.covariates)
    generate_s = time.perf_counter() - t0
    runs: dict[str, list[dict[str, Any]]] = {"standalone": [], "cluster": []}
    for _ in range(args.repeats):  # alternately, so both see the same machine
        runs["standalone"].append(ingest_once(standalone_url, tmp, events_path, args,
                                              pids["standalone"]))
        runs["cluster"].append(ingest_once(cluster.url, tmp, events_path, args, pids["cluster"]))
    events_path.unlink()

    def med(kind: str, key: str) -> float | None:
        values = [r[key] for r in runs[kind] if r[key] is not None]
        return float(np.median(values)) if values else None

    s_eps, c_eps = med("standalone", "eps"), med("cluster", "eps")
    ratio = c_eps / s_eps
    line: dict[str, Any] = {
        "case": "ingest", "standalone_eps": round(s_eps), "cluster_eps": round(c_eps),
        "ratio": round(ratio, 3), "target": INGEST_TARGET, "met": ratio >= INGEST_TARGET,
        "events": args.events, "groups": args.ingest_groups, "covariates": args.covariates,
        "shards": args.shards, "repeats": args.repeats,
        "source": "JsonLinesSource via stream.app.make_ingestor (one pseudo partition, batches "
                  "of 50,000 events; no Kafka)",
        "consumers": 1, "masters": len(cluster.masters()), "replicas": len(cluster.replicas()),
        "batches": runs["cluster"][0]["batches"],
        "standalone_consumer_cpu_s": med("standalone", "consumer_cpu_s"),
        "cluster_consumer_cpu_s": med("cluster", "consumer_cpu_s"),
        "standalone_redis_cpu_s": med("standalone", "redis_cpu_s"),
        "cluster_redis_cpu_s": med("cluster", "redis_cpu_s"),
        "cluster_retries": sum(r["retries"] for r in runs["cluster"]),
        "runs": {k: [round(r["eps"]) for r in v] for k, v in runs.items()},
        "events_file_s": round(generate_s, 2),
    }
    if not line["met"]:
        busy = line["cluster_redis_cpu_s"]
        line["reason"] = (
            f"the cluster run took {runs['cluster'][0]['seconds']:.1f} s against "
            f"{runs['standalone'][0]['seconds']:.1f} s: the consumer spent "
            f"{line['cluster_consumer_cpu_s']:.1f} s of CPU (standalone "
            f"{line['standalone_consumer_cpu_s']:.1f} s: a merge is sent per node and the "
            "cluster client routes each shard call)"
            + (f", and the cluster's redis-server processes {busy:.1f} s (standalone "
               f"{line['standalone_redis_cpu_s']:.1f} s: the replicas replay every merge), on "
               f"{info['nproc']} cores shared by all of them" if busy is not None else ""))
    emit(line, info)


# -- (b, c) the 1e6-group namespace -----------------------------------------------------------------


def load_groups(cluster_store: RedisStore, standalone: list[tuple[RedisStore, int]],
                groups: int) -> tuple[float, float]:
    """Write ``groups`` groups into the Cluster store and into each standalone store (its first
    ``n`` groups). Returns (seconds writing the Cluster, events)."""
    cluster_s, events = 0.0, 0.0
    done = 0
    for stats in refresh_chunks(groups):
        t0 = time.perf_counter()
        cluster_store.merge(stats)
        cluster_s += time.perf_counter() - t0
        events += float(stats.n.sum())
        for store, n in standalone:
            if done < n:
                store.merge(stats if done + len(stats) <= n
                            else stats.select(stats.keys[: n - done]))
        done += len(stats)
    return cluster_s, events


def read_line(store: RedisStore, where: str, repeats: int, d: int, info: dict) -> GroupStats:
    gc.collect()
    seconds, stats = median_time(lambda: read_stats(store, d), repeats)
    gps = len(stats) / seconds
    line = {"case": "read", "where": where, "groups": len(stats), "read_s": round(seconds, 3),
            "groups_per_s": round(gps), "target_groups_per_s": READ_TARGET_GPS,
            "met": gps >= READ_TARGET_GPS, "repeats": repeats, "shards": store.n_shards,
            "how": "streamlme.refresh.read_stats: one HGETALL per shard, pipelined (per node "
                   "on a Cluster), binary records, chunks of 10,000"}
    if not line["met"]:
        line["reason"] = ("one process parses every reply (hiredis) and builds a GroupStats per "
                          "shard and then one for all, while the servers serialise the replies "
                          "on the same cores")
    emit(line, info)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000, help="ingest events (1M)")
    ap.add_argument("--ingest-groups", type=int, default=10_000)
    ap.add_argument("--covariates", type=int, default=5)
    ap.add_argument("--groups", type=int, default=1_000_000, help="refresh groups (1e6)")
    ap.add_argument("--shards", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="Dask worker processes")
    ap.add_argument("--repeats", type=int, default=3, help="ingest runs of each kind")
    ap.add_argument("--read-repeats", type=int, default=3)
    ap.add_argument("--evaluations", type=int, default=30, help="for dask_overhead")
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--skip-refresh", action="store_true")
    args = ap.parse_args()
    # SIGTERM ends the run through the finally clauses (processes stopped, keys deleted)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    warnings.simplefilter("ignore")

    with contextlib.ExitStack() as stack, threadpool_limits(limits=1):
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scale-")))
        server = RedisServer(tmp / "standalone").start()
        stack.callback(server.stop)
        env = os.environ.get(CLUSTER_ENV, "").strip()
        if env:
            cluster: RedisClusterHandle = RedisClusterHandle(
                [n.strip() for n in env.split(",") if n.strip()])
            cluster_pids: list[int] = []
        else:
            local = LocalRedisCluster(tmp / "cluster").start()
            stack.callback(local.stop)
            cluster = local
            cluster_pids = [p.pid for p in local.processes.values()]
        plain = redis_client(server.url)
        stack.callback(plain.close)
        info = machine(plain.info("server").get("redis_version"))
        info["cluster"] = CLUSTER_ENV if env else "local: 3 masters + 3 replicas"
        pids = {"standalone": [server.process.pid] if server.process else [],
                "cluster": cluster_pids}
        kernels.warm_up()

        if not args.skip_ingest:
            case_ingest(server.url, cluster, tmp, args, pids, info)
        if args.skip_refresh:
            return

        # -- the --groups groups, in the Cluster and (for the read lines) standalone --------
        spec, d = REFRESH_SPEC, len(REFRESH_SPEC.columns)
        ns = f"bench-scale-{uuid.uuid4().hex[:8]}"
        cluster_client = cluster.client(socket_timeout=60.0)
        stack.callback(cluster_client.close)
        cstore = RedisStore(cluster_client, ns, columns=spec.columns, shards=args.shards)
        stack.callback(delete_cluster_namespace, cluster, ns)
        stack.callback(cstore.clear)
        small_n = min(100_000, args.groups)
        sizes = sorted({small_n, args.groups})
        sstores = [(RedisStore(redis_client(server.url, timeout=60.0), f"{ns}-{n}",
                               columns=spec.columns, shards=args.shards), n) for n in sizes]
        for s, _ in sstores:
            stack.callback(s.client.close)
            stack.callback(s.clear)
        masters = cluster.masters()
        replicas = cluster.replicas()
        mem0 = used_memory(cluster, masters)
        rmem0 = used_memory(cluster, replicas)
        smem0 = int(plain.info("memory")["used_memory"])
        cpu0 = server_cpu(pids["cluster"])
        write_s, events = load_groups(cstore, [(s, n) for s, n in sstores if n == args.groups],
                                      args.groups)
        smem1 = int(plain.info("memory")["used_memory"])
        write_cpu = server_cpu(pids["cluster"]) - cpu0  # the standalone writes are not in it
        for s, n in sstores:  # the small namespace after the memory reading
            if n != args.groups:
                for part in refresh_chunks(n):
                    s.merge(part)
        wait_replicated(cluster)
        mem1 = used_memory(cluster, masters)
        rmem1 = used_memory(cluster, replicas)
        sizes_c = cstore.shard_sizes()
        delta = [b - a for a, b in zip(mem0, mem1, strict=True)]
        emit({"case": "memory", "groups": args.groups, "d": d,
              "bytes_per_group": round(sum(delta) / args.groups, 1),
              "bytes_per_group_with_replicas": round(
                  (sum(delta) + sum(b - a for a, b in zip(rmem0, rmem1, strict=True)))
                  / args.groups, 1) if replicas else None,
              "standalone_bytes_per_group": round((smem1 - smem0) / args.groups, 1),
              "record_bytes": packed_size(d), "key_bytes_mean": round(
                  float(np.mean([len(f"g{i}") for i in range(0, args.groups, 997)])), 1),
              "per_master_bytes": delta, "masters": len(masters), "shards": args.shards,
              "cells_per_shard_max": max(sizes_c), "cells_per_shard_mean": float(np.mean(sizes_c)),
              "events": events, "write_s": round(write_s, 2),
              "write_groups_per_s": round(args.groups / write_s),
              "write_cluster_redis_cpu_s": round(write_cpu, 2) if pids["cluster"] else None,
              "how": "INFO memory used_memory after minus before the groups were merged, summed "
                     "over the masters, over the groups"}, info)

        # -- the read path ------------------------------------------------------------------
        for s, _ in sstores:
            read_line(s, "standalone", args.read_repeats, d, info)
        calls0, usec0 = hgetall_stats(cluster, masters)
        read_line(cstore, "cluster", args.read_repeats, d, info)
        calls1, usec1 = hgetall_stats(cluster, masters)
        server_us_per_cell = (usec1 - usec0) / (args.read_repeats * args.groups)

        # -- (b) refresh, engine local --------------------------------------------------------
        gc.collect()
        t0 = time.perf_counter()
        stats = read_stats(cstore, d)
        fingerprint = stats_fingerprint(stats)
        read_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        local = fit(stats, spec, "REML", ranef=False)
        fit_s = time.perf_counter() - t1
        n_cells = len(stats)
        del stats
        gc.collect()
        emit({"case": "refresh", "engine": "local", "groups": n_cells, "read_s": round(read_s, 3),
              "fit_s": round(fit_s, 3), "total_s": round(read_s + fit_s, 3),
              "converged": bool(local.converged), "n_evals": local.optsummary.n_evals,
              "where": "cluster", "shards": args.shards,
              "server_hgetall_us_per_cell": round(server_us_per_cell, 3),
              "server_hgetall_us_per_shard": round((usec1 - usec0) / max(calls1 - calls0, 1), 1),
              "how": "read_stats + stats_fingerprint, then estimate.fit(REML, ranef=False): "
                     "what the local engine runs"}, info)

        # -- (b, d) refresh, engine dask ------------------------------------------------------
        from streamlme.refresh_dask import (
            DaskRefresh,
            client_for,
            close_clients,
            measure_overhead,
            warm_workers,
        )

        t0 = time.perf_counter()
        dcluster = start_local_cluster(n_workers=args.workers, threads_per_worker=1)
        stack.callback(dcluster.close)
        stack.callback(close_clients)
        start_s = time.perf_counter() - t0
        client = client_for(dcluster.scheduler_address)
        warm_workers(client, dcluster.scheduler_address)
        engine = DaskRefresh(client, cstore, spec)
        rss0 = worker_rss(client)
        try:
            loaded = engine.load()
            t1 = time.perf_counter()
            dfit = engine.fit("REML")
            fit_s = time.perf_counter() - t1
            rss1 = worker_rss(client)  # the shards and their blocks held by the workers
            over = measure_overhead(engine, evaluations=args.evaluations)
        finally:
            engine.close()
        res = dfit.result
        agree = max(rel_diff(res.beta, local.beta), rel_diff(res.G, local.G),
                    rel_diff(res.sigma2, local.sigma2))
        emit({"case": "refresh", "engine": "dask", "groups": loaded.rows,
              "read_s": round(loaded.seconds, 3), "fit_s": round(fit_s, 3),
              "total_s": round(loaded.seconds + fit_s, 3), "workers": args.workers,
              "threads_per_worker": 1, "converged": bool(res.converged), "maps": dfit.maps,
              "map_s": round(dfit.map_seconds, 3), "worker_compute_s": round(dfit.worker_seconds, 3),
              "max_rel_diff_vs_local": agree, "fingerprint_equal": loaded.fingerprint == fingerprint,
              "local_cluster_start_s": round(start_s, 2), "where": "cluster",
              "worker_rss_mb": [round(r / 2**20) for r in rss1],
              "worker_bytes_per_group": round((sum(rss1) - sum(rss0)) / loaded.rows, 1),
              "how": "DaskRefresh.load (workers read their shards from the Cluster), .fit(REML)"},
             info)
        line = {"case": "dask_overhead", "per_eval_ms": round(over.per_eval_ms, 2),
              "per_map_ms": round(over.per_map_ms, 2), "compute_ms": round(over.compute_ms, 2),
              "overhead_ms": round(over.overhead_ms, 2), "target_ms": OVERHEAD_TARGET_MS,
              "met": over.overhead_ms < OVERHEAD_TARGET_MS,
              "judged_on": "overhead_ms: an evaluation's wall time (a deviance and a gradient "
                           "map) minus the workers' computation in it",
              "evaluations": args.evaluations, "workers": over.workers, "threads": over.threads,
              "shards": over.shards, "groups": loaded.rows}
        if not line["met"]:
            line["reason"] = (
                f"an evaluation is two Dask rounds (the deviance map, then the gradient map), "
                f"{over.overhead_ms / 2:.1f} ms beside the computation each: scheduling, "
                f"transfer and the gather of a map, on {info['nproc']} cores shared by the "
                f"driver, {over.workers} workers, the scheduler and the Redis processes")
        emit(line, info)


if __name__ == "__main__":
    main()
