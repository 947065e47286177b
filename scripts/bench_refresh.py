#!/usr/bin/env python
"""Refresh benchmark: statistics build, cold REML fit and warm refit, against mixedlm-rs and statsmodels.

For each size G (groups) it generates one data set — p = 5 fixed effects (intercept + x1..x4),
q = 2 correlated random terms (intercept + x1), about 10 events per group with unequal group sizes
— and, single-threaded, times

  build_s       GroupStats.from_codes over the raw rows
  cold_fit_s    fit(stats, spec, "REML") from the statistics (no BLUPs: those are computed on
                demand at query time)
  warm_fit_s    after 1% more events are merged into the statistics (merge_s, timed apart: a
                consumer does it as events arrive), fit(..., start=previous fit)
  mixedlm_rs_s  mixedlm_rs.MixedLM(y, X, groups=g, exog_re=X[:, :2]).fit(reml=True) on the same
                raw rows, in this process
  statsmodels_s statsmodels MixedLM, same call, in a subprocess killed after --statsmodels-timeout
                seconds; sizes after one that took longer than --statsmodels-skip-after are skipped

and checks that the three agree. One JSON object per size goes to stdout, one line each. Times
are medians over --repeats runs (fewer for large G); numba's kernels are compiled (or loaded from
its cache) before anything is timed, and that warm-up time is reported as kernel_warmup_s.

    python scripts/bench_refresh.py                 # G = 1e3, 1e4, 1e5, 1e6
    python scripts/bench_refresh.py --quick         # small smoke run
    python scripts/bench_refresh.py --sizes 1e4,1e5 --no-statsmodels
"""

from __future__ import annotations

import os

# Pin every thread pool before numpy, numba or the Rust extension start theirs: on 2-core
# machines default threading made small factorisations 10-50x slower.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "RAYON_NUM_THREADS", "NUMBA_NUM_THREADS")
for _var in THREAD_VARS:
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

P_FIXED, Q_RANDOM, EVENTS_PER_GROUP = 5, 2, 10
BETA = np.array([1.0, 0.5, -0.3, 0.2, 0.1])
G_COV = np.array([[1.0, 0.3], [0.3, 0.5]])
#: max relative difference to mixedlm-rs (beta, G, sigma2) for the sizes to "agree"
TOL_MIXEDLM_RS = 1e-4
#: statsmodels stops 1e-4..1e-3 short of the optimum on variance components
TOL_STATSMODELS = 1e-2


def generate(G: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """codes (N,), X (N, 5) with an intercept column, y (N,), and the groups' effects b (G, 2).

    Unequal groups of mean size 10: 1 + negative binomial, sd about 6.7, sizes 1 to about 60.
    """
    rng = np.random.default_rng(seed)
    sizes = 1 + rng.negative_binomial(2, 2 / (2 + EVENTS_PER_GROUP - 1), size=G)
    codes = np.repeat(np.arange(G), sizes)
    b = rng.multivariate_normal(np.zeros(2), G_COV, size=G)
    return (codes, *_rows(rng, codes, b), b)


def _rows(rng: np.random.Generator, codes: np.ndarray, b: np.ndarray):
    N = len(codes)
    X = np.column_stack([np.ones(N), rng.normal(size=(N, P_FIXED - 1))])
    y = X @ BETA + b[codes, 0] + b[codes, 1] * X[:, 1] + rng.normal(size=N)
    return X, y


def median_time(f: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def rel_diff(a: Any, b: Any) -> float:
    """max |a - b| / max |b| (elementwise over the array)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "threads_pinned": 1}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_size(G: int, args: argparse.Namespace, sm_state: dict[str, Any]) -> dict[str, Any]:
    from streamlme.estimate import fit
    from streamlme.spec import ModelSpec
    from streamlme.stats import GroupStats, packed_size

    spec = ModelSpec(response="y", fixed=["1", "x1", "x2", "x3", "x4"], random=["1", "x1"],
                     group="g")
    repeats = args.repeats if G <= 100_000 else 1
    codes, X, y, b = generate(G, seed=G)
    keys = [f"g{i}" for i in range(G)]
    W = np.column_stack([X[:, 1:], y])

    # (a) statistics from the raw rows
    build_s, stats = median_time(lambda: GroupStats.from_codes(codes, keys, W), repeats)

    # (b) cold REML fit
    cold_fit_s, cold = median_time(lambda: fit(stats, spec, "REML", ranef=False), repeats)

    # (c) 1% more events in random groups (same group effects), merged; then a warm refit
    rng = np.random.default_rng(G + 1)
    new_codes = np.sort(rng.integers(0, G, size=max(len(codes) // 100, 1)))
    Xn, yn = _rows(rng, new_codes, b)
    touched, inv = np.unique(new_codes, return_inverse=True)
    delta = GroupStats.from_codes(inv, [keys[i] for i in touched], np.column_stack([Xn[:, 1:], yn]))
    merge_s, merged = median_time(lambda: stats.copy().merge(delta), repeats)
    warm_fit_s, warm = median_time(
        lambda: fit(merged, spec, "REML", ranef=False, start=cold), repeats
    )
    rss = peak_rss_mb()

    row: dict[str, Any] = {
        "groups": G, "events": len(codes), "new_events": len(new_codes),
        "build_s": build_s, "cold_fit_s": cold_fit_s, "merge_s": merge_s, "warm_fit_s": warm_fit_s,
        "n_evals_cold": cold.optsummary.n_evals, "n_evals_warm": warm.optsummary.n_evals,
        "converged": bool(cold.converged and warm.converged),
        "peak_rss_mb": round(rss, 1),
        "bytes_per_group": len(stats.to_bytes_one(0)), "d": stats.d,
        "bytes_per_group_d7": packed_size(7),
        "repeats": repeats,
    }

    # the peers, on the same raw rows (without the 1% extra)
    row.update(mixedlm_rs_compare(y, X, codes, cold, repeats if G <= 10_000 else 1, args))
    row["speedup_vs_mixedlm_rs"] = (row["mixedlm_rs_s"] / cold_fit_s
                                    if row["mixedlm_rs_s"] is not None else None)
    row.update(statsmodels_compare(y, X, codes, cold, args, sm_state))
    row["speedup_vs_statsmodels"] = (row["statsmodels_s"] / (build_s + cold_fit_s)
                                     if row["statsmodels_s"] is not None else None)
    return row


def mixedlm_rs_compare(y, X, codes, ours, repeats: int, args) -> dict[str, Any]:
    if args.no_mixedlm_rs:
        return {"mixedlm_rs_s": None, "mixedlm_rs_note": "skipped (--no-mixedlm-rs)"}
    import mixedlm_rs

    def run():
        return mixedlm_rs.MixedLM(y, X, groups=codes, exog_re=X[:, :2]).fit(reml=True)

    seconds, res = median_time(run, repeats)
    out = {"mixedlm_rs_s": seconds}
    out.update(_agreement("mixedlm_rs", ours, res.fe_params, res.cov_re, res.scale, res.llf,
                          TOL_MIXEDLM_RS))
    return out


def statsmodels_compare(y, X, codes, ours, args, state: dict[str, Any]) -> dict[str, Any]:
    if args.no_statsmodels:
        return {"statsmodels_s": None, "statsmodels_note": "skipped (--no-statsmodels)"}
    if state.get("skip"):
        return {"statsmodels_s": None, "statsmodels_note": state["skip"]}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.npz"
        np.savez(data, y=y, X=X, codes=codes)
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--statsmodels-worker", str(data)],
                capture_output=True, text=True, timeout=args.statsmodels_timeout, check=True,
            )
        except subprocess.TimeoutExpired:
            state["skip"] = (f"skipped: a smaller size did not finish within "
                             f"{args.statsmodels_timeout:g} s")
            return {"statsmodels_s": None,
                    "statsmodels_note": f"did not finish within {args.statsmodels_timeout:g} s"}
        except subprocess.CalledProcessError as exc:
            return {"statsmodels_s": None,
                    "statsmodels_note": f"failed: {exc.stderr.strip().splitlines()[-1:]}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if res["seconds"] > args.statsmodels_skip_after:
        state["skip"] = (f"skipped: a smaller size took {res['seconds']:.0f} s "
                         f"(> {args.statsmodels_skip_after:g} s), this one would take ~10x")
    out = {"statsmodels_s": res["seconds"]}
    out.update(_agreement("statsmodels", ours, res["beta"], res["G"], res["sigma2"], res["llf"],
                          TOL_STATSMODELS))
    return out


def _agreement(name: str, ours, beta, G, sigma2, llf, tol: float) -> dict[str, Any]:
    d = {
        f"{name}_beta_rel": rel_diff(ours.beta, beta),
        f"{name}_G_rel": rel_diff(ours.G, G),
        f"{name}_sigma2_rel": rel_diff(ours.sigma2, sigma2),
        # lme4's REML criterion is -2 x the restricted log-likelihood statsmodels reports
        f"{name}_criterion_rel": rel_diff(ours.criterion, -2.0 * float(llf)),
        # > 0: our criterion is lower (better) than theirs
        f"{name}_criterion_gain": float(-2.0 * float(llf) - ours.criterion),
    }
    d[f"agree_{name}"] = max(d[f"{name}_beta_rel"], d[f"{name}_G_rel"],
                             d[f"{name}_sigma2_rel"]) < tol
    return d


def statsmodels_worker(path: str) -> None:
    """Subprocess body: fit statsmodels MixedLM on saved rows, print one JSON line."""
    import statsmodels.api as sm

    data = np.load(path)
    y, X, codes = data["y"], data["X"], data["codes"]
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        res = sm.MixedLM(y, X, groups=codes, exog_re=X[:, :2]).fit(reml=True)
        seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "beta": np.asarray(res.fe_params).tolist(),
                      "G": np.asarray(res.cov_re).tolist(), "sigma2": float(res.scale),
                      "llf": float(res.llf)}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e3,1e4,1e5,1e6",
                    help="comma-separated numbers of groups (default 1e3,1e4,1e5,1e6)")
    ap.add_argument("--quick", action="store_true", help="smoke run: G = 200, 2000, one repeat")
    ap.add_argument("--repeats", type=int, default=5,
                    help="repeats for G <= 1e5 (medians reported); larger sizes run once")
    ap.add_argument("--statsmodels-timeout", type=float, default=120.0)
    ap.add_argument("--statsmodels-skip-after", type=float, default=30.0,
                    help="skip statsmodels for larger sizes once a size took longer than this")
    ap.add_argument("--no-statsmodels", action="store_true")
    ap.add_argument("--no-mixedlm-rs", action="store_true")
    ap.add_argument("--statsmodels-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.statsmodels_worker:
        statsmodels_worker(args.statsmodels_worker)
        return
    sizes = [200, 2000] if args.quick else [int(float(s)) for s in args.sizes.split(",")]
    if args.quick:
        args.repeats = 1

    from streamlme.estimate import kernels

    with threadpool_limits(1):
        warmup_s = kernels.warm_up()
        info = {"machine": machine(), "kernel_backend": kernels.backend(),
                "kernel_warmup_s": round(warmup_s, 3),
                "timing": "medians; kernels warmed up before any timed section; "
                          "cold/warm fit exclude BLUPs (ranef=False); warm_fit_s excludes merge_s",
                "thread_env": {v: os.environ[v] for v in THREAD_VARS}}
        sm_state: dict[str, Any] = {}
        for G in sizes:
            row = run_size(G, args, sm_state)
            row.update(info)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
