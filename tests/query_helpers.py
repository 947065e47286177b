"""Shared by the query tests (client, API, schemathesis): data, seeding, configs, dense BLUPs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamlme import GroupStats, ModelSpec
from streamlme.estimate import fit
from streamlme.model import ModelRecord
from streamlme.spec import INTERCEPT

#: Fixed 1 + x + z, random 1 + x: a fixed covariate outside the random part too.
SPEC = ModelSpec("y", ["1", "x", "z"], ["1", "x"], "g")
#: Ids that need encoding in keys and in URL paths.
ODD_GROUPS = ["ward 3/{icu}:é", "a/b", "100%", "?x=1#frag", "  spaced  ", "line\nbreak", "A17"]


def make_rows(seed: int, n_groups: int = 40, n_rows: int = 1200, spec: ModelSpec = SPEC,
              groups: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows (group ids, W = covariates then response) from a model with real group effects."""
    rng = np.random.default_rng(seed)
    names = groups if groups is not None else [f"g{i}" for i in range(n_groups)]
    g = rng.integers(0, len(names), n_rows)
    covs = rng.normal(size=(n_rows, len(spec.covariates)))
    cols = list(spec.covariates)

    def design(terms: tuple[str, ...]) -> np.ndarray:
        return np.column_stack([np.ones(n_rows) if t == INTERCEPT else covs[:, cols.index(t)]
                                for t in terms])

    X, Z = design(spec.fixed), design(spec.random)
    beta = np.linspace(2.0, 0.5, X.shape[1])
    b = rng.normal(scale=[1.0] + [0.3] * (Z.shape[1] - 1), size=(len(names), Z.shape[1]))
    y = 50.0 + X @ beta + np.einsum("nq,nq->n", Z, b[g]) + rng.normal(scale=0.8, size=n_rows)
    return np.array(names, dtype=object)[g], np.column_stack([covs, y])


def fit_record(stats: GroupStats, spec: ModelSpec = SPEC) -> ModelRecord:
    return ModelRecord.from_fit(fit(stats, spec), spec)


def seed_store(store, groups: np.ndarray, W: np.ndarray, spec: ModelSpec = SPEC
               ) -> tuple[GroupStats, ModelRecord]:
    """Merge the rows into ``store``, fit them, store the model; returns (stats, record)."""
    stats = GroupStats.from_rows(groups, W)
    store.merge(stats)
    rec = fit_record(stats, spec)
    rec.version = store.put_model(rec.to_json())
    return stats, rec


def write_config(path: Path, redis_url: str, namespace: str, spec: ModelSpec = SPEC,
                 token: str | None = None, port: int = 8000) -> Path:
    lines = [
        "[model]",
        f'response = "{spec.response}"',
        f"fixed = {list(spec.fixed)!r}".replace("'", '"'),
        f"random = {list(spec.random)!r}".replace("'", '"'),
        f'group = "{spec.group}"',
        "[redis]",
        f'url = "{redis_url}"',
        f'namespace = "{namespace}"',
        "[api]",
        f"port = {port}",
    ]
    if token is not None:
        lines.append(f'token = "{token}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def dense_blup(W: np.ndarray, spec: ModelSpec, rec: ModelRecord) -> tuple[np.ndarray, np.ndarray]:
    """(b, Var(b - b_hat)) of one group from its raw rows, by dense matrices.

    b = G Z'V^-1 (y - X beta) and G - G Z'V^-1 Z G with V = Z G Z' + sigma^2 I.
    """
    cols = list(spec.columns)

    def design(terms: tuple[str, ...]) -> np.ndarray:
        return np.column_stack([np.ones(len(W)) if t == INTERCEPT else W[:, cols.index(t)]
                                for t in terms])

    X, Z, y = design(spec.fixed), design(spec.random), W[:, -1]
    G, s2 = rec.G, rec.sigma2
    V = Z @ G @ Z.T + s2 * np.eye(len(W))
    b = G @ Z.T @ np.linalg.solve(V, y - X @ rec.beta)
    cov = G - G @ Z.T @ np.linalg.solve(V, Z @ G)
    return b, cov


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference relative to the larger magnitude in ``b`` (0 for equal arrays)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))
