#!/usr/bin/env python
"""Progressive validation of streamlme.river.MixedEffectsRegressor against river's linear models.

Each event is first predicted, then learnt (river's progressive validation, as in
`evaluate.progressive_val_score`; the loop is written out to split the errors by how many
events the event's group had before it). Two streams:

  demo    streamlme.demo.simulate: hospital length of stay, 200 hospitals of very different sizes,
          features age and severity, a random hospital offset and age slope (--events, --groups)
  dietox  weights of 72 slaughter pigs weighed weekly for 12 weeks (861 rows), streamed week by
          week: Weight ~ Time, group Pig. From Lauridsen, Højsgaard & Sørensen (1999), J. Anim.
          Sci. 77:906-916, distributed with the R package geepack (GPL); read from the copy
          statsmodels ships as test data (statsmodels/regression/tests/results/dietox.csv),
          nothing is copied into this repository

Models (numeric features: demo age, severity; dietox Time):

  mixed                 Select(group, numeric) | MixedEffectsRegressor(random = intercept and
                        a slope on the first numeric feature), REML, warm-started refreshes
  sgd_no_group          Select(numeric) | StandardScaler | LinearRegression()  (river's
                        defaults: SGD, lr 0.01, intercept_lr 0.01)
  sgd_one_hot           (Select(group) | OneHotEncoder) + (Select(numeric) | StandardScaler)
                        | LinearRegression()
  bayes_no_group        Select(numeric) + bias | BayesianLinearRegression()  (exact online
                        Bayesian least squares, river's defaults alpha = beta = 1: no learning
                        rate to tune, the fairest least-squares baseline river offers)
  bayes_one_hot         (Select(group) | OneHotEncoder) + Select(numeric) + bias
                        | BayesianLinearRegression(): one dummy per group, ridge-shrunk

Errors are reported overall and by the group's prior events: 0 (a new group), 1-9, < 10 (both),
10-99 and >= 100; and, to separate the cold start from the steady state, over the first 100
events (the mixed model has no fit before its first refresh there and predicts running means)
and for < 10 prior events after those. Prints ONE JSON object.

    python scripts/bench_river.py                   # demo 50k events, 200 hospitals, and dietox
    python scripts/bench_river.py --events 5000     # quicker
"""

from __future__ import annotations

import os

# One thread each: on small shared machines BLAS thread pools make the small solves slower.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import river  # noqa: E402
from river import base, compose, linear_model, preprocessing  # noqa: E402

from streamlme.demo import simulate  # noqa: E402
from streamlme.river import MixedEffectsRegressor  # noqa: E402

Stream = list[tuple[dict[str, Any], float]]

#: (name, lowest prior count, highest prior count) of the error breakdown
SEGMENTS = [("prior_0", 0, 0), ("prior_1_to_9", 1, 9), ("prior_lt_10", 0, 9),
            ("prior_10_to_99", 10, 99), ("prior_ge_100", 100, math.inf)]
#: events counted as the cold start
WARMUP = 100


def demo_stream(n_groups: int, n_events: int, seed: int) -> Stream:
    sc = simulate(n_groups, n_events, seed)
    return [({"hospital": f"H{h:03d}", "age": float(a), "severity": float(s)}, float(y))
            for h, a, s, y in zip(sc.hospital, sc.age, sc.severity, sc.los)]


def dietox_path() -> Path:
    import statsmodels

    path = Path(statsmodels.__file__).parent / "regression/tests/results/dietox.csv"
    if not path.exists():
        raise SystemExit(f"{path} not found: install statsmodels (pip install statsmodels), "
                         "which ships dietox.csv with its tests")
    return path


def dietox_stream() -> Stream:
    df = pd.read_csv(dietox_path()).sort_values(["Time", "Pig"], kind="stable")
    return [({"Pig": str(p), "Time": float(t)}, float(w))
            for p, t, w in zip(df["Pig"], df["Time"], df["Weight"])]


def _bias(x: dict[str, Any]) -> dict[str, float]:
    return {"bias": 1.0}


def models(group: str, numeric: list[str], refresh_every: int) -> dict[str, base.Regressor]:
    def one_hot() -> Any:
        return compose.Select(group) | preprocessing.OneHotEncoder()

    def scaled() -> Any:
        return compose.Select(*numeric) | preprocessing.StandardScaler()

    return {
        "mixed": compose.Select(group, *numeric) | MixedEffectsRegressor(
            group=group, random=["1", numeric[0]], refresh_every=refresh_every),
        "sgd_no_group": scaled() | linear_model.LinearRegression(),
        "sgd_one_hot": (one_hot() + scaled()) | linear_model.LinearRegression(),
        "bayes_no_group": (compose.Select(*numeric) + compose.FuncTransformer(_bias))
        | linear_model.BayesianLinearRegression(),
        "bayes_one_hot": (one_hot() + compose.Select(*numeric) + compose.FuncTransformer(_bias))
        | linear_model.BayesianLinearRegression(),
    }


def progressive(model: base.Regressor, stream: Stream, group: str) -> dict[str, Any]:
    prior: dict[Any, int] = {}
    pred, truth, seen = np.empty(len(stream)), np.empty(len(stream)), np.empty(len(stream))
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(stream):
        pred[i] = model.predict_one(x)
        model.learn_one(x, y)
        truth[i], seen[i] = y, prior.get(x[group], 0)
        prior[x[group]] = seen[i] + 1
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"seconds": round(seconds, 3),
                           "us_per_event": round(seconds / len(stream) * 1e6, 1),
                           "overall": errors(pred, truth)}
    for name, lo, hi in SEGMENTS:
        out[name] = errors(pred[(seen >= lo) & (seen <= hi)], truth[(seen >= lo) & (seen <= hi)])
    late = np.arange(len(stream)) >= WARMUP
    out[f"first_{WARMUP}_events"] = errors(pred[~late], truth[~late])
    out[f"prior_lt_10_after_{WARMUP}"] = errors(pred[late & (seen < 10)], truth[late & (seen < 10)])
    return out


def errors(pred: np.ndarray, truth: np.ndarray) -> dict[str, float | int | None]:
    if not len(pred):
        return {"n": 0, "mae": None, "rmse": None}
    err = pred - truth
    return {"n": len(err), "mae": round(float(np.abs(err).mean()), 4),
            "rmse": round(float(np.sqrt((err**2).mean())), 4)}


def mixed_summary(model: Any) -> dict[str, Any]:
    est: MixedEffectsRegressor = model["MixedEffectsRegressor"]
    res = est.fit_
    return {
        "refreshes": est.n_refreshes_, "last_error": est.last_error_, "groups": est.n_groups_,
        "beta": dict(zip(res.fixed, map(float, res.beta))) if res else None,
        "G": res.G.tolist() if res else None,
        "sigma2": float(res.sigma2) if res else None,
    }


def run(name: str, stream: Stream, group: str, numeric: list[str], refresh_every: int,
        source: str, only: Callable[[str], bool]) -> dict[str, Any]:
    ms = models(group, numeric, refresh_every)
    result: dict[str, Any] = {
        "source": source, "events": len(stream),
        "groups": len({x[group] for x, _ in stream}), "group": group, "numeric": numeric,
        "refresh_every": refresh_every, "models": {},
    }
    for label, model in ms.items():
        if not only(label):
            continue
        result["models"][label] = progressive(model, stream, group)
        if label == "mixed":
            result["mixed_model"] = mixed_summary(model)
    best = min(result["models"], key=lambda k: result["models"][k]["overall"]["rmse"])
    result["best_overall_rmse"] = best
    return result


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "river": river.__version__, "numpy": np.__version__, "pandas": pd.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=50_000, help="demo stream length")
    ap.add_argument("--groups", type=int, default=200, help="demo hospitals")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--refresh-every", type=int, default=1000, help="demo refresh interval")
    ap.add_argument("--dietox-refresh-every", type=int, default=100)
    ap.add_argument("--models", default="", help="comma-separated subset of the model names")
    args = ap.parse_args()
    wanted = {m for m in args.models.split(",") if m}

    def only(label: str) -> bool:
        return not wanted or label in wanted

    t0 = time.perf_counter()
    out = {
        "benchmark": "river progressive validation (predict, then learn, each event)",
        "datasets": {
            "demo": run("demo", demo_stream(args.groups, args.events, args.seed), "hospital",
                        ["age", "severity"], args.refresh_every,
                        f"streamlme.demo.simulate(n_groups={args.groups}, "
                        f"n_events={args.events}, seed={args.seed})", only),
            "dietox": run("dietox", dietox_stream(), "Pig", ["Time"],
                          args.dietox_refresh_every,
                          "dietox.csv (geepack, GPL; Lauridsen et al. 1999) from statsmodels' "
                          "test data, streamed by week", only),
        },
        "machine": machine(),
        "total_seconds": None,
    }
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
