"""The embedded demo: hospital length of stay, streamed through the engine with no servers.

200 hospitals of very different sizes; each patient has an age and a severity score; each hospital
has its own offset and its own age slope. Events arrive in micro-batches, fold into per-group
statistics, and the model is refreshed (warm-started) as they come. At the end the demo compares
the mixed model's predictions on held-back patients with two baselines: ignoring hospitals, and
one dummy per hospital (plain least squares).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click
import numpy as np

from streamlme.blup import group_effects
from streamlme.estimate import fit
from streamlme.spec import ModelSpec
from streamlme.stats import GroupStats

SPEC = ModelSpec(response="los", fixed=["1", "age", "severity"], random=["1", "age"],
                 group="hospital")
#: True model: los = 4 + 0.03 age + 0.8 severity + b0 + b1 (age - 60) + e
TRUE_BETA = np.array([4.0, 0.03, 0.8])
TRUE_G_CENTRED = np.array([[1.0, 0.004], [0.004, 0.0004]])  # sd 1 day, 0.02 days/year
TRUE_SIGMA2 = 2.25


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


def simulate(n_groups: int, n_events: int, seed: int) -> Scenario:
    """Patients of hospitals whose sizes span three orders of magnitude."""
    rng = np.random.default_rng(seed)
    size = rng.lognormal(mean=0.0, sigma=1.5, size=n_groups)
    hospital = rng.choice(n_groups, size=n_events, p=size / size.sum())
    age = rng.normal(60.0, 15.0, n_events).clip(18, 100)
    severity = rng.gamma(2.0, 1.0, n_events)
    b = rng.multivariate_normal(np.zeros(2), TRUE_G_CENTRED, size=n_groups)
    los = (TRUE_BETA[0] + TRUE_BETA[1] * age + TRUE_BETA[2] * severity
           + b[hospital, 0] + b[hospital, 1] * (age - 60.0)
           + rng.normal(0.0, np.sqrt(TRUE_SIGMA2), n_events))
    return Scenario(hospital, age, severity, los, b)


def run_demo(n_groups: int = 200, n_events: int = 100_000, seed: int = 1,
             batch: int = 5_000, refresh_every: int = 20_000, echo: bool = True) -> dict[str, Any]:
    """Stream the scenario, refreshing as it goes; return (and print) what it found."""
    say = click.echo if echo else (lambda *_a, **_k: None)
    sc = simulate(n_groups, n_events, seed)
    holdout = np.random.default_rng(seed + 1).random(n_events) < 0.1
    train, test = sc.take(np.flatnonzero(~holdout)), sc.take(np.flatnonzero(holdout))
    keys = [f"H{h:03d}" for h in range(n_groups)]
    stats = GroupStats.empty(len(SPEC.columns))
    model, since = None, 0
    for lo in range(0, len(train.los), batch):
        hi = min(lo + batch, len(train.los))
        stats += GroupStats.from_codes(train.hospital[lo:hi], keys, train.W[lo:hi])
        since += hi - lo
        if since >= refresh_every or hi == len(train.los):
            model = fit(stats, SPEC, start=model, ranef=False)
            since = 0
            say(f"  {hi:>8,} events  {len(stats):>4} hospitals  REML {model.criterion:12.2f}  "
                f"{model.optsummary.n_evals:>3} evaluations  {model.optsummary.seconds * 1e3:6.1f} ms")
    assert model is not None
    eff = group_effects(stats, SPEC, model.beta, model.G, model.sigma2)
    report = {
        "events": len(train.los), "hospitals": len(stats),
        "beta": dict(zip(SPEC.fixed_names, model.beta.tolist())),
        "true_beta": dict(zip(SPEC.fixed_names, TRUE_BETA.tolist())),
        "sigma2": model.sigma2, "true_sigma2": TRUE_SIGMA2,
        "G": model.G.tolist(), "true_G": _user_basis(TRUE_G_CENTRED).tolist(),
        "holdout_rmse": _holdout(model, eff, train, test, keys),
    }
    say("\nVariance components (estimate vs truth):")
    true_G = _user_basis(TRUE_G_CENTRED)
    say(f"  residual sd       {np.sqrt(model.sigma2):8.3f}  vs {np.sqrt(TRUE_SIGMA2):8.3f}")
    say(f"  hospital sd(age)  {np.sqrt(model.G[1, 1]):8.4f}  vs {np.sqrt(true_G[1, 1]):8.4f}")
    say("\nHospitals with the largest offsets at age 60 (BLUP, 95% interval, n, shrinkage):")
    offset = eff.b[:, 0] + 60.0 * eff.b[:, 1]
    var = eff.cov[:, 0, 0] + 120.0 * eff.cov[:, 0, 1] + 3600.0 * eff.cov[:, 1, 1]
    for i in np.argsort(-np.abs(offset))[:8]:
        half = 1.96 * np.sqrt(var[i])
        say(f"  {eff.keys[i]}  {offset[i]:+6.2f}  [{offset[i] - half:+6.2f}, {offset[i] + half:+6.2f}]"
            f"  n={int(eff.n[i]):>6}  shrinkage={eff.shrinkage[i]:.2f}")
    say("\nHeld-back patients, RMSE of predicted length of stay:")
    for name, value in report["holdout_rmse"].items():
        say(f"  {name:<28} {value:.4f}")
    return report


def _user_basis(G_centred: np.ndarray) -> np.ndarray:
    """The truth's covariance for (intercept at age 0, slope): b0 = c0 - 60 c1."""
    T = np.array([[1.0, -60.0], [0.0, 1.0]])
    return T @ G_centred @ T.T


def _holdout(model: Any, eff: Any, train: Scenario, test: Scenario,
             keys: list[str]) -> dict[str, float]:
    X_test = np.column_stack([np.ones(len(test.los)), test.age, test.severity])
    index = {k: i for i, k in enumerate(eff.keys)}
    rows = np.array([index.get(keys[h], -1) for h in test.hospital])
    b = np.where(rows[:, None] >= 0, eff.b[np.maximum(rows, 0)], 0.0)
    mixed = X_test @ model.beta + b[:, 0] + b[:, 1] * test.age
    X_train = np.column_stack([np.ones(len(train.los)), train.age, train.severity])
    pooled = X_test @ np.linalg.lstsq(X_train, train.los, rcond=None)[0]
    n_h = int(max(train.hospital.max(), test.hospital.max())) + 1
    D_train = np.column_stack([np.eye(n_h)[train.hospital], train.age, train.severity])
    coef = np.linalg.lstsq(D_train, train.los, rcond=None)[0]
    seen = np.bincount(train.hospital, minlength=n_h) > 0
    own = coef[test.hospital] + test.age * coef[n_h] + test.severity * coef[n_h + 1]
    dummies = np.where(seen[test.hospital], own, pooled)
    return {name: float(np.sqrt(np.mean((pred - test.los) ** 2)))
            for name, pred in (("mixed model (streamlme)", mixed), ("ignoring hospitals", pooled),
                               ("one dummy per hospital", dummies))}
