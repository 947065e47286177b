"""The demo: hospital length of stay, streamed through the same code as production.

200 hospitals of very different sizes; each patient has an age and a severity score; each hospital
has its own offset and its own age slope. The demo writes the events as JSON lines, feeds them in
chunks through the consumer's ingest loop (decode, fold, merge with offsets) into the embedded
store — or, with a configuration, publishes them to Kafka and consumes them into Redis — and runs
the refresh job after each chunk, warm-started. It ends with the variance components and fixed
effects, each with its standard error and 95% interval, beside the population value the simulation
drew from and this sample's own value (`estimates`), the hospitals with the largest offsets beside
their true offsets, how much each was shrunk, the prediction error on held-back patients against
two baselines (ignoring hospitals; one dummy per hospital, plain least squares), and the
shrinkage, caterpillar and trace plots in a folder.

Why two truths: the estimate of the intercept aims at 4 plus the average of *these* 200 hospitals'
offsets, which is not 0. An estimate 3.65 against 4.00 with a standard error of 0.11 and a sample
value of 3.70 is the sample, not the method, being off; the interval is what covers 4.00 in 95 of
100 simulations.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
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

    eff = model.effects(stats)
    table = estimates(train, model, n_groups)
    shift = sample_shift(train, n_groups)
    report_: dict[str, Any] = {
        "events": len(train.los), "hospitals": len(stats), "seconds": seconds,
        "model_version": model.version,
        "beta": dict(zip(SPEC.fixed_names, model.beta.tolist())),
        "true_beta": dict(zip(SPEC.fixed_names, TRUE_BETA.tolist())),
        "sigma2": model.sigma2, "true_sigma2": TRUE_SIGMA2,
        "G": model.G.tolist(), "true_G": _user_basis(TRUE_G_CENTRED).tolist(),
        "estimates": [e.to_dict() for e in table],
        "largest_offsets": _largest_offsets(eff, model, sc, shift),
        "holdout_rmse": _holdout(model, eff, train, test, n_groups),
        "out": str(out_dir), "plots": plots,
    }
    say(f"\n{len(train.los):,} events in {seconds:.1f} s; model v{model.version}\n")
    _say_estimates(say, table, len(stats))
    _say_offsets(say, report_["largest_offsets"])
    _say_smallest(say, stats, model, sc, shift)
    say("\nHeld-back patients, RMSE of predicted length of stay:")
    for name, value in report_["holdout_rmse"].items():
        say(f"  {name:<28} {value:.4f}")
    say(f"\nPlots and events in {out_dir}/: {', '.join(Path(p).name for p in plots)}")
    return report_


# ---- what the demo prints --------------------------------------------------------------------

def _number(x: float, digits: int) -> str:
    return f"{x:9.{digits}f}" if np.isfinite(x) else f"{'n/a':>9}"


def _say_estimates(say: Any, table: list[Estimate], hospitals: int) -> None:
    say("Variance components and fixed effects: estimate, standard error and 95% interval, beside\n"
        "the population value the simulation drew from and this sample's own value (what the "
        f"{hospitals}\nhospitals' and patients' simulated effects make it):")
    say(f"  {'':<26} {'estimate':>9} {'s.e.':>9}   {'95% interval':^22}  {'population':>10}"
        f" {'this sample':>11}")
    for e in table:
        d = 4 if abs(e.truth) < 0.1 else 3
        say(f"  {e.name:<26} {_number(e.estimate, d)} {_number(e.se, d)}   "
            f"[{_number(e.lower, d)}, {_number(e.upper, d)}]  {e.truth:10.{d}f} {e.sample:11.{d}f}")
    far = max((e for e in table if e.se > 0), key=lambda e: abs(e.estimate - e.truth) / e.se)
    to_truth, to_sample = (abs(far.estimate - v) / far.se for v in (far.truth, far.sample))
    d = 4 if abs(far.truth) < 0.1 else 3
    inside = "inside" if far.covers(far.truth) else "outside (as 1 in 20 truths is)"
    why = (": what these hospitals are, not an error of the fit" if to_sample < min(1.0, to_truth)
           else "")
    say(f"  {far.name} {far.estimate:.{d}f} is {to_truth:.1f} s.e. from the population's "
        f"{far.truth:.{d}f}, {inside} its interval,\n  and {to_sample:.1f} s.e. from this "
        f"sample's {far.sample:.{d}f}{why}.")


def _say_offsets(say: Any, rows: list[dict[str, Any]]) -> None:
    say(f"\nHospitals with the largest offsets at age {AGE_REF:g}: BLUP, 95% interval, its true "
        "(simulated) offset from\nthe population's mean and from these hospitals' mean (what the "
        "BLUP estimates), patients,\nweight of its own data vs the prior:")
    say(f"  {'':4}  {'BLUP':>6}  {'95% interval':^16}  {'population':>10} {'sample':>6}")
    for r in rows:
        say(f"  {r['hospital']}  {r['blup']:+6.2f}  [{r['lower']:+6.2f}, {r['upper']:+6.2f}]"
            f"  {r['truth']:+10.2f} {r['truth_in_sample']:+6.2f}  n={r['n']:>6}  "
            f"{r['weight']:4.0%}")


def _say_smallest(say: Any, stats: Any, model: Any, sc: Scenario, shift: np.ndarray) -> None:
    from streamlme.plots import shrinkage_data

    say("\nThe smallest hospitals, pulled towards the average (offset at their own patients' mean "
        "age:\nown data alone -> mixed model, and the true offset from these hospitals' mean):")
    shrunk = shrinkage_data(stats, SPEC, model)
    mean_age = stats.mean[:, SPEC.columns.index("age")]
    for i in np.argsort(shrunk.n, kind="stable")[:6]:
        z = np.array([1.0, mean_age[i] - AGE_REF])
        truth = float((sc.b[_hospital_index(shrunk.keys[i])] - shift[:2]) @ z)
        say(f"  {shrunk.keys[i]}  n={int(shrunk.n[i]):>3}  {shrunk.raw[i]:+6.2f} -> "
            f"{shrunk.blup[i]:+6.2f}   true {truth:+6.2f}   "
            f"({shrunk.reliability[i]:4.0%} from its own data)")


def _hospital_index(key: str) -> int:
    return int(key[1:])


def _largest_offsets(eff: Any, model: Any, sc: Scenario, shift: np.ndarray,
                     top: int = 10) -> list[dict[str, Any]]:
    """The ``top`` hospitals by |BLUP offset at age 60|, with interval and true offset (from
    the population's mean, and from these hospitals' mean: less `sample_shift`)."""
    at_ref = np.array([1.0, AGE_REF])
    offset = eff.b @ at_ref
    var = np.einsum("i,gij,j->g", at_ref, eff.cov, at_ref)
    prior = float(at_ref @ model.G @ at_ref)
    rows = []
    for i in np.argsort(-np.abs(offset))[:top]:
        half = 1.96 * float(np.sqrt(var[i]))
        rows.append({"hospital": eff.keys[i], "blup": float(offset[i]),
                     "lower": float(offset[i]) - half, "upper": float(offset[i]) + half,
                     "truth": float(sc.b[_hospital_index(eff.keys[i]), 0]),
                     "truth_in_sample": float(sc.b[_hospital_index(eff.keys[i]), 0] - shift[0]),
                     "n": int(eff.n[i]), "weight": 1.0 - float(var[i]) / prior})
    return rows


# ---- uncertainty: standard errors, intervals, the sample's own values -----------------------

#: Normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """One quantity: the fit's estimate, its standard error and 95% interval, the population
    value the simulation drew from, and this sample's own value.

    For a fixed effect the sample's value is the population value plus the simulated hospital
    effects as generalised least squares at the true variances weights them (what the estimate
    aims at given these hospitals); for a standard deviation or correlation, that of the
    simulated effects (or residuals) themselves."""

    name: str
    estimate: float
    se: float
    lower: float
    upper: float
    truth: float
    sample: float

    def covers(self, value: float) -> bool:
        """Whether the 95% interval holds ``value``."""
        return bool(self.lower <= value <= self.upper)

    def to_dict(self) -> dict[str, Any]:
        return {k: (v if not isinstance(v, float) or np.isfinite(v) else None)
                for k, v in asdict(self).items()}


def estimates(train: Scenario, model: Any, n_groups: int) -> list[Estimate]:
    """Residual sd, hospital sd at age 60, sd of the age slope, their correlation and the fixed
    effects, with Wald intervals: the fixed effects' from the fit's covariance of beta, the
    variance components' from the REML information on the log-sd (atanh-correlation) scale."""
    cross = _Cross.of(train, n_groups)
    t60 = np.array([[1.0, AGE_REF], [0.0, 1.0]])
    with np.errstate(divide="ignore", invalid="ignore"):  # a boundary fit: infinite phi
        phi = _phi(t60 @ model.G @ t60.T, model.sigma2)
    cov = _wald_cov(cross, phi)
    se_phi = np.sqrt(np.diag(cov)) if cov is not None else np.full(4, np.nan)
    true_phi = _phi(TRUE_G_CENTRED, TRUE_SIGMA2)
    e = train.los - _mean_part(train)
    b = train.b[np.unique(train.hospital)]
    sample_phi = np.array([0.5 * np.log(np.mean(e * e)),
                           np.log(np.std(b[:, 0], ddof=1)), np.log(np.std(b[:, 1], ddof=1)),
                           np.arctanh(np.corrcoef(b[:, 0], b[:, 1])[0, 1])])
    names = ["residual sd", f"hospital sd at age {AGE_REF:g}", "hospital sd of age slope",
             "hospital correlation"]
    out = []
    for k, name in enumerate(names):
        back = np.tanh if k == 3 else np.exp
        slope = 1.0 - np.tanh(phi[k]) ** 2 if k == 3 else np.exp(phi[k])  # d back / d phi
        out.append(Estimate(name, float(back(phi[k])), float(slope * se_phi[k]),
                            float(back(phi[k] - Z95 * se_phi[k])),
                            float(back(phi[k] + Z95 * se_phi[k])),
                            float(back(true_phi[k])), float(back(sample_phi[k]))))
    se_beta = np.sqrt(np.diag(model.beta_cov))
    sample_beta = TRUE_BETA + np.linalg.solve(_T_FIXED, _shift(cross, train))
    for name, est, se, truth, own in zip(SPEC.fixed_names, model.beta, se_beta, TRUE_BETA,
                                         sample_beta):
        out.append(Estimate(name, float(est), float(se), float(est - Z95 * se),
                            float(est + Z95 * se), float(truth), float(own)))
    return out


#: x in the centred basis (1, age - 60, severity) from the user's (1, age, severity): b_c = T b
_T_FIXED = np.array([[1.0, AGE_REF, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class _Cross:
    """Per hospital seen, n and the cross-products of w = (1, age - 60, severity, los): the
    first two columns are z, the first three x."""

    n: np.ndarray
    C: np.ndarray
    hospitals: np.ndarray

    @classmethod
    def of(cls, sc: Scenario, n_groups: int) -> _Cross:
        w = np.column_stack([np.ones(len(sc.los)), sc.age - AGE_REF, sc.severity, sc.los])
        outer = (w[:, :, None] * w[:, None, :]).reshape(len(w), -1)
        C = np.stack([np.bincount(sc.hospital, weights=outer[:, k], minlength=n_groups)
                      for k in range(outer.shape[1])], axis=1).reshape(n_groups, 4, 4)
        n = np.bincount(sc.hospital, minlength=n_groups).astype(float)
        seen = np.flatnonzero(n > 0)
        return cls(n[seen], C[seen], seen)

    def gls(self, G60: np.ndarray, sigma2: float) -> tuple[np.ndarray, ...]:
        """Per hospital x'V^-1x, x'V^-1y, y'V^-1y, x'V^-1z and log|V| (V = z G z' + sigma2 I,
        through Woodbury: nothing of size n_j x n_j)."""
        C = self.C
        ZZ, XZ, XX = C[:, :2, :2], C[:, :3, :2], C[:, :3, :3]
        Zy, Xy, yy = C[:, :2, 3], C[:, :3, 3], C[:, 3, 3]
        M = sigma2 * np.linalg.inv(G60) + ZZ
        Minv = np.linalg.inv(M)
        XZM = XZ @ Minv
        XVX = (XX - XZM @ XZ.transpose(0, 2, 1)) / sigma2
        XVy = (Xy - np.einsum("gij,gj->gi", XZM, Zy)) / sigma2
        yVy = (yy - np.einsum("gi,gij,gj->g", Zy, Minv, Zy)) / sigma2
        XVZ = (XZ - XZM @ ZZ) / sigma2
        logdet = ((self.n - 2) * np.log(sigma2) + np.linalg.slogdet(G60)[1]
                  + np.linalg.slogdet(M)[1])
        return XVX, XVy, yVy, XVZ, logdet

    def reml(self, phi: np.ndarray) -> float:
        """-2 REML log-likelihood at phi = (log sigma, log sd at 60, log sd slope,
        atanh correlation), up to a constant."""
        G60, sigma2 = _from_phi(phi)
        XVX, XVy, yVy, _, logdet = self.gls(G60, sigma2)
        A, c = XVX.sum(axis=0), XVy.sum(axis=0)
        return float(logdet.sum() + np.linalg.slogdet(A)[1] + yVy.sum() - c @ np.linalg.solve(A, c))


def _phi(G60: np.ndarray, sigma2: float) -> np.ndarray:
    sd = np.sqrt(np.diag(G60))
    return np.array([0.5 * np.log(sigma2), np.log(sd[0]), np.log(sd[1]),
                     np.arctanh(G60[0, 1] / (sd[0] * sd[1]))])


def _from_phi(phi: np.ndarray) -> tuple[np.ndarray, float]:
    s0, s1, r = np.exp(phi[1]), np.exp(phi[2]), np.tanh(phi[3])
    return np.array([[s0 * s0, r * s0 * s1], [r * s0 * s1, s1 * s1]]), float(np.exp(2 * phi[0]))


def _wald_cov(cross: _Cross, phi: np.ndarray, h: float = 1e-3) -> np.ndarray | None:
    """2 H^-1, H the central-difference Hessian of -2 REML log-likelihood in phi; None when H
    is not positive definite (an estimate on the boundary, e.g. a zero variance)."""
    if not np.isfinite(phi).all():
        return None
    try:
        H = _hessian(cross.reml, phi, h)
    except np.linalg.LinAlgError:  # a step reached a singular G
        return None
    if not np.isfinite(H).all() or np.linalg.eigvalsh(H).min() <= 0:
        return None
    return 2.0 * np.linalg.inv(H)


def _hessian(f: Any, x: np.ndarray, h: float) -> np.ndarray:
    """Central-difference Hessian of ``f`` at ``x`` with step ``h``."""
    k = len(x)
    f0 = f(x)
    steps = np.eye(k) * h
    H = np.empty((k, k))
    for i in range(k):
        for j in range(i, k):
            if i == j:
                H[i, i] = (f(x + steps[i]) - 2 * f0 + f(x - steps[i])) / h**2
            else:
                H[i, j] = H[j, i] = (f(x + steps[i] + steps[j]) - f(x + steps[i] - steps[j])
                                     - f(x - steps[i] + steps[j])
                                     + f(x - steps[i] - steps[j])) / (4 * h * h)
    return H


def _mean_part(sc: Scenario) -> np.ndarray:
    """The simulated expected length of stay: fixed part and each hospital's effect."""
    b = sc.b[sc.hospital]
    return (TRUE_BETA[0] + TRUE_BETA[1] * sc.age + TRUE_BETA[2] * sc.severity
            + b[:, 0] + b[:, 1] * (sc.age - AGE_REF))


def sample_shift(train: Scenario, n_groups: int) -> np.ndarray:
    """How far these hospitals' simulated effects move the fixed effects from the population's,
    in the centred basis (1, age - 60, severity): E[beta-hat | the effects] - beta at the true
    variances. Its first two entries are the sample's mean offset at 60 and mean age slope (as
    the fit weights hospitals): a BLUP estimates a hospital's effect less these."""
    return _shift(_Cross.of(train, n_groups), train)


def _shift(cross: _Cross, sc: Scenario) -> np.ndarray:
    XVX, _, _, XVZ, _ = cross.gls(TRUE_G_CENTRED, TRUE_SIGMA2)
    return np.linalg.solve(XVX.sum(axis=0), np.einsum("gij,gj->i", XVZ, sc.b[cross.hospitals]))


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
