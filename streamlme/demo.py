"""The demo: hospital length of stay, streamed through the same code as production.

200 hospitals of very different sizes; each patient has an age and a severity score; each hospital
has its own offset and its own age slope. The demo writes the events as JSON lines, feeds them in
chunks through the consumer's ingest loop (decode, fold, merge with offsets) into the embedded
store — or, with a configuration, publishes them to Kafka and consumes them into Redis — and runs
the refresh job after each chunk, warm-started. It ends with the variance components next to the
truth, the hospitals with the largest offsets, how much each was shrunk, the prediction error on
held-back patients against two baselines (ignoring hospitals; one dummy per hospital, plain least
squares), and the shrinkage, caterpillar and trace plots in a folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from streamlme.spec import ModelSpec

SPEC = ModelSpec(response="los", fixed=["1", "age", "severity"], random=["1", "age"],
                 group="hospital")
#: True model: los = 4 + 0.03 age + 0.8 severity + b0 + b1 (age - 60) + e
TRUE_BETA = np.array([4.0, 0.03, 0.8])
TRUE_G_CENTRED = np.array([[1.0, 0.004], [0.004, 0.0004]])  # sd 1 day at 60, 0.02 days/year
TRUE_SIGMA2 = 2.25
AGE_REF = 60.0


@dataclass
class Scenario:
    hospital: np.ndarray
    age: np.ndarray
    severity: np.ndarray
    los: np.ndarray
    b: np.ndarray  # true (offset at age 60, age slope) per hospital

    @property
    def W(self) -> np.ndarray:
        return np.column_stack([self.age, self.severity, self.los])

    def take(self, idx: np.ndarray) -> Scenario:
        return Scenario(self.hospital[idx], self.age[idx], self.severity[idx], self.los[idx],
                        self.b)

    def write_jsonl(self, path: Path) -> Path:
        with open(path, "w") as fh:
            for h, a, s, y in zip(self.hospital.tolist(), self.age.tolist(),
                                  self.severity.tolist(), self.los.tolist()):
                fh.write(json.dumps({"hospital": hospital_id(h), "age": a, "severity": s,
                                     "los": y}) + "\n")
        return path


def hospital_id(h: int) -> str:
    return f"H{h:03d}"


def simulate(n_groups: int, n_events: int, seed: int) -> Scenario:
    """Patients of hospitals whose sizes span three orders of magnitude."""
    rng = np.random.default_rng(seed)
    size = rng.lognormal(mean=0.0, sigma=1.5, size=n_groups)
    hospital = rng.choice(n_groups, size=n_events, p=size / size.sum())
    age = rng.normal(AGE_REF, 15.0, n_events).clip(18, 100)
    severity = rng.gamma(2.0, 1.0, n_events)
    b = rng.multivariate_normal(np.zeros(2), TRUE_G_CENTRED, size=n_groups)
    los = (TRUE_BETA[0] + TRUE_BETA[1] * age + TRUE_BETA[2] * severity
           + b[hospital, 0] + b[hospital, 1] * (age - AGE_REF)
           + rng.normal(0.0, np.sqrt(TRUE_SIGMA2), n_events))
    return Scenario(hospital, age, severity, los, b)


def _demo_config(out: Path) -> Path:
    """The embedded configuration the demo runs with (written so a user can reuse it)."""
    path = out / "streamlme.toml"
    path.write_text(
        "# Written by `streamlme demo`: the embedded store, no servers.\n"
        "[model]\n"
        f'response = "{SPEC.response}"\n'
        f"fixed = {json.dumps(list(SPEC.fixed))}\n"
        f"random = {json.dumps(list(SPEC.random))}\n"
        f'group = "{SPEC.group}"\n\n'
        "[store]\n"
        'snapshot = "state.npz"\n'
    )
    return path


def run_demo(n_groups: int = 200, n_events: int = 100_000, seed: int = 1,
             out: str | os.PathLike[str] = "streamlme-demo", config_path: str | None = None,
             chunks: int = 5, echo: bool = True) -> dict[str, Any]:
    """Stream the scenario through the ingest loop and the refresh job; return what it found."""
    from tqdm import tqdm

    from streamlme.config import load_config
    from streamlme.refresh import RefreshSettings, current_model, read_stats, refresh_once
    from streamlme.store.connect import close_store, open_store
    from streamlme.stream.app import make_ingestor, run_publish

    say = click.echo if echo else (lambda *_a, **_k: None)
    logging.getLogger("streamlme").setLevel(logging.WARNING)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sc = simulate(n_groups, n_events, seed)
    holdout = np.random.default_rng(seed + 1).random(n_events) < 0.1
    train, test = sc.take(np.flatnonzero(~holdout)), sc.take(np.flatnonzero(holdout))
    events = train.write_jsonl(out_dir / "events.jsonl")

    embedded = config_path is None
    config = load_config(_demo_config(out_dir) if embedded else config_path)
    if config.spec.columns != SPEC.columns or config.spec.group != SPEC.group:
        raise click.ClickException(
            f"the demo streams {SPEC.formula}; the configuration's model is {config.spec.formula}")
    if embedded:
        (out_dir / "state.npz").unlink(missing_ok=True)
    store = open_store(config)
    if not embedded:
        store.clear()
        say(f"publishing {len(train.los):,} events to {config.kafka.topic} ...")
        run_publish(config, events, progress=echo)
    settings = RefreshSettings.from_config(config)
    chunk = -(-len(train.los) // chunks)
    say(f"streaming {len(train.los):,} patients of {n_groups} hospitals "
        f"({'embedded store' if embedded else 'Kafka -> Redis'}), refreshing every {chunk:,}")
    t0 = time.perf_counter()
    try:
        with tqdm(total=len(train.los), unit="ev", disable=not echo, leave=False) as bar:
            line = bar.write if echo else say  # tqdm.write prints even when the bar is off
            done = 0
            while done < len(train.los):
                ingestor = make_ingestor(config, store, str(events) if embedded else None)
                report = ingestor.run(max_events=min(chunk, len(train.los) - done),
                                      until_idle=None if embedded else 15.0)
                if not report.events_read:
                    raise click.ClickException("the consumer read no events; is the topic empty?")
                done += report.events_read
                bar.update(report.events_read)
                outcome = refresh_once(store, config.spec, settings)
                line(f"  {done:>8,} events  {outcome.n_groups:>4} hospitals  "
                          f"v{outcome.version}  REML {outcome.criterion:12.2f}  "
                          f"{outcome.n_evals:>3} evaluations  {outcome.fit_seconds * 1e3:6.1f} ms"
                          if outcome.ok else f"  refresh {outcome.status}: {outcome.message}")
        seconds = time.perf_counter() - t0
        model = current_model(store)
        stats = read_stats(store, len(SPEC.columns))
        if model is None:
            raise click.ClickException("no refresh succeeded; nothing to show")
        plots = _plots(store, out_dir)
    finally:
        close_store(config, store)

    from streamlme.plots import shrinkage_data

    eff = model.effects(stats)
    true_G = _user_basis(TRUE_G_CENTRED)
    report_: dict[str, Any] = {
        "events": len(train.los), "hospitals": len(stats), "seconds": seconds,
        "model_version": model.version,
        "beta": dict(zip(SPEC.fixed_names, model.beta.tolist())),
        "true_beta": dict(zip(SPEC.fixed_names, TRUE_BETA.tolist())),
        "sigma2": model.sigma2, "true_sigma2": TRUE_SIGMA2,
        "G": model.G.tolist(), "true_G": true_G.tolist(),
        "holdout_rmse": _holdout(model, eff, train, test, n_groups),
        "out": str(out_dir), "plots": plots,
    }
    say(f"\n{len(train.los):,} events in {seconds:.1f} s; model v{model.version}\n")
    say("Variance components and fixed effects (estimate vs truth):")
    say(f"  residual sd                 {np.sqrt(model.sigma2):8.3f}   {np.sqrt(TRUE_SIGMA2):8.3f}")
    at_ref = np.array([1.0, AGE_REF])
    sd_ref = float(np.sqrt(at_ref @ model.G @ at_ref))
    say(f"  hospital sd at age {AGE_REF:g}       {sd_ref:8.3f}   "
        f"{np.sqrt(TRUE_G_CENTRED[0, 0]):8.3f}")
    say(f"  hospital sd of age slope    {np.sqrt(model.G[1, 1]):8.4f}   "
        f"{np.sqrt(true_G[1, 1]):8.4f}")
    for name, b, t in zip(SPEC.fixed_names, model.beta, TRUE_BETA):
        say(f"  {name:<27} {b:8.3f}   {t:8.3f}")
    say(f"\nHospitals with the largest offsets at age {AGE_REF:g} "
        "(BLUP, 95% interval, patients, weight of its own data vs the prior):")
    offset = eff.b @ at_ref
    var = np.einsum("i,gij,j->g", at_ref, eff.cov, at_ref)
    prior = float(at_ref @ model.G @ at_ref)
    for i in np.argsort(-np.abs(offset))[:10]:
        half = 1.96 * np.sqrt(var[i])
        say(f"  {eff.keys[i]}  {offset[i]:+6.2f}  [{offset[i] - half:+6.2f}, {offset[i] + half:+6.2f}]"
            f"  n={int(eff.n[i]):>6}  {1 - var[i] / prior:4.0%}")
    say("\nThe smallest hospitals, pulled towards the average (offset at their own patients' mean "
        "age: own data alone -> mixed model):")
    shrunk = shrinkage_data(stats, SPEC, model)
    for i in np.argsort(shrunk.n, kind="stable")[:6]:
        say(f"  {shrunk.keys[i]}  n={int(shrunk.n[i]):>3}  {shrunk.raw[i]:+6.2f} -> "
            f"{shrunk.blup[i]:+6.2f}   ({shrunk.reliability[i]:4.0%} from its own data)")
    say("\nHeld-back patients, RMSE of predicted length of stay:")
    for name, value in report_["holdout_rmse"].items():
        say(f"  {name:<28} {value:.4f}")
    say(f"\nPlots and events in {out_dir}/: {', '.join(Path(p).name for p in plots)}")
    return report_


def _plots(store: Any, out_dir: Path) -> list[str]:
    from streamlme.plots import save, store_figure

    written = []
    for kind in ("shrinkage", "caterpillar", "trace"):
        fig = store_figure(kind, store, term="age" if kind == "caterpillar" else 0, top=40)
        written.append(str(save(fig, out_dir / f"{kind}.png")))
    return written


def _user_basis(G_centred: np.ndarray) -> np.ndarray:
    """The truth's covariance for (intercept at age 0, slope): b0 = c0 - 60 c1."""
    T = np.array([[1.0, -AGE_REF], [0.0, 1.0]])
    return T @ G_centred @ T.T


def _holdout(model: Any, eff: Any, train: Scenario, test: Scenario,
             n_groups: int) -> dict[str, float]:
    X_test = np.column_stack([np.ones(len(test.los)), test.age, test.severity])
    index = {k: i for i, k in enumerate(eff.keys)}
    rows = np.array([index.get(hospital_id(h), -1) for h in test.hospital])
    b = np.where(rows[:, None] >= 0, eff.b[np.maximum(rows, 0)], 0.0)
    mixed = X_test @ model.beta + b[:, 0] + b[:, 1] * test.age
    X_train = np.column_stack([np.ones(len(train.los)), train.age, train.severity])
    pooled = X_test @ np.linalg.lstsq(X_train, train.los, rcond=None)[0]
    D_train = np.column_stack([np.eye(n_groups)[train.hospital], train.age, train.severity])
    coef = np.linalg.lstsq(D_train, train.los, rcond=None)[0]
    seen = np.bincount(train.hospital, minlength=n_groups) > 0
    own = coef[test.hospital] + test.age * coef[n_groups] + test.severity * coef[n_groups + 1]
    dummies = np.where(seen[test.hospital], own, pooled)
    return {name: float(np.sqrt(np.mean((pred - test.los) ** 2)))
            for name, pred in (("mixed model (streamlme)", mixed), ("ignoring hospitals", pooled),
                               ("one dummy per hospital", dummies))}
