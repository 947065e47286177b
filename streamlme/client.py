"""Group effects on demand: the Python client the CLI and the HTTP API are built on.

`Client` reads a group's *current* running statistics and the current model version and returns
the group's BLUP (design.md section 4), so an effect moves with every event between refreshes.
Against Redis, `Client.effect` is one round trip: a single MGET fetches the group's record and
the current model version together (every key of a namespace shares one hash tag, so this also
holds on Redis Cluster). The decoded model is cached by version and fetched again only when the
version changes.

One small pure-Python kernel computes every effect (q, the number of random terms, is 1 to 3;
numpy's per-call overhead would cost more than the arithmetic). It is the same algebra as
`streamlme.blup.group_effects`, term for term, and agrees with it to rounding; every interface
(Client, CLI, HTTP) goes through it, so they print the same numbers.

>>> from streamlme.store import MemoryStore
>>> Client(MemoryStore()).effect("A17")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
streamlme.client.ModelNotReady: no model has been estimated yet; run `streamlme refresh ...
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from streamlme.blup import predict as _predict
from streamlme.config import Config, load_config
from streamlme.estimate.linalg import psd_factor
from streamlme.model import ModelRecord
from streamlme.spec import INTERCEPT, term_name
from streamlme.stats import FORMAT_VERSION, HEADER, MAGIC, GroupStats, StatsError, packed_size
from streamlme.store.base import StateStore
from streamlme.store.errors import StoreError
from streamlme.store.keys import encode_group
from streamlme.store.redis import RedisStore

#: Most groups one `Client.effects` call (and one HTTP request) may ask for.
MAX_GROUPS = 10_000
_URL_SCHEMES = ("redis://", "rediss://", "unix://")


class ModelNotReady(LookupError):  # noqa: N818 - the name users catch
    """No model version exists yet, so no effect can be computed."""

    def __init__(self) -> None:
        super().__init__(
            "no model has been estimated yet; run `streamlme refresh --config FILE --once` "
            "after some events have arrived"
        )


@dataclass(frozen=True)
class GroupEffect:
    """One group's random effects under one model version.

    ``effect`` maps each random term's name to the conditional mode, ``cov`` is the conditional
    covariance Var(b_j - b) in the same order, ``shrinkage`` the reliability of the first term
    (1: the group's data decide, 0: the prior does), ``n`` the weight mass seen. A group never
    seen has zeros, the prior covariance G and ``known`` False.
    """

    group: str
    n: float
    effect: dict[str, float]
    cov: list[list[float]]
    shrinkage: float
    model_version: int
    known: bool

    def to_dict(self) -> dict[str, Any]:
        """The `streamlme effect --json` line (a public contract: add fields, never rename)."""
        n = self.n
        return {
            "group": self.group,
            "n": int(n) if n.is_integer() else n,
            "effect": dict(self.effect),
            "cov": [list(row) for row in self.cov],
            "shrinkage": self.shrinkage,
            "model_version": self.model_version,
            "known": self.known,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, ensure_ascii=False)


@dataclass(frozen=True)
class Prediction:
    """A prediction for one new row of a group: x'beta + z'b_j with an interval for a new y.

    ``se`` is the standard error of a new observation (residual, group and, from the model's
    covariance of beta, fixed-effect uncertainty); ``[lower, upper]`` the ``level`` interval.
    """

    group: str
    prediction: float
    fixed: float
    random: float
    se: float
    lower: float
    upper: float
    level: float
    model_version: int
    known: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group, "prediction": self.prediction, "fixed": self.fixed,
            "random": self.random, "se": self.se, "lower": self.lower, "upper": self.upper,
            "level": self.level, "model_version": self.model_version, "known": self.known,
        }


class _Kernel:
    """One model version compiled to plain Python floats and positions in a decoded record.

    Mirrors `streamlme.blup.group_effects` for a single group: with the group's (n, m, C),
    zbar = B m + e - z_centre, rbar = a'm + c, Z'r = n zbar rbar + B C a,
    Z'Z = n zbar zbar' + B C B', P = Lam' Z'Z Lam + I = L L' with Lam Lam' = G_centred / sigma^2,
    W = L^-1 Lam', Var_c = sigma^2 W'W, b_c = W'W Z'r; then b = T b_c, Var = T Var_c T' where T
    moves the centre back into the intercept (only the intercept's row differs from I).

    A decoded record is (n, t, m, upper triangle of C) followed by two constants, 0.0 and 1.0,
    so an intercept term (z = 1, no co-moments) reads its entries from the same kind of
    positions as a covariate does and the arithmetic below never branches on term types.
    """

    def __init__(self, record: ModelRecord) -> None:
        spec = record.spec
        cols = spec.columns
        d = len(cols)
        self.record = record
        self.version = record.version
        self.names = [term_name(t) for t in spec.random]
        self.q = q = len(spec.random)
        self.d = d
        self.header = HEADER.pack(MAGIC, FORMAT_VERSION, d)
        self.size = packed_size(d)
        self.body = struct.Struct(f"<{2 + d + d * (d + 1) // 2}d")
        zero, one = self.body.size // 8, self.body.size // 8 + 1
        tri = _triangle_positions(d)
        beta = record.beta
        # r = a'w + c: the response minus the fixed covariates times beta.
        a: dict[int, float] = {d - 1: 1.0}
        c = 0.0
        for k, t in enumerate(spec.fixed):
            if t == INTERCEPT:
                c -= float(beta[k])
            else:
                col = cols.index(t)
                a[col] = a.get(col, 0.0) - float(beta[k])
        rcols = [None if t == INTERCEPT else cols.index(t) for t in spec.random]
        self.c = c
        self.pm = [(2 + k, coef) for k, coef in sorted(a.items())]            # rbar = c + a'm
        self.pz = [one if r is None else 2 + r for r in rcols]                 # zbar_i
        self.pa = [[] if r is None else [(tri[r][k], coef) for k, coef in sorted(a.items())]
                   for r in rcols]                                             # (B C a)_i
        self.pc = [[zero if ri is None or rj is None else tri[ri][rj] for rj in rcols]
                   for ri in rcols]                                            # (B C B')_ij
        G, G_c = record.G, record.G_centred
        self.sigma2 = record.sigma2
        self.G = [[float(v) for v in row] for row in G]
        self.G00 = float(G_c[0, 0])
        self.lam = [[float(v) for v in row] for row in psd_factor(G_c / self.sigma2)]
        self.zc = [float(v) for v in record.z_centre]
        self.i0 = spec.random.index(INTERCEPT) if INTERCEPT in spec.random else None
        self.centred = self.i0 is not None and any(self.zc)
        self.solve = {1: self._solve1, 2: self._solve2}.get(q, self._solve_any)

    def decode(self, value: bytes) -> tuple[float, ...]:
        if len(value) != self.size or value[: HEADER.size] != self.header:
            raise StatsError(
                f"stored statistics are not {self.size}-byte records of {self.d} columns as "
                f"model version {self.version} expects; is the namespace shared with another model?"
            )
        v = self.body.unpack_from(value, HEADER.size)
        if not (v[0] >= 0.0 and math.isfinite(v[0]) and math.isfinite(sum(v[2:]))):
            raise StatsError("stored statistics hold a negative mass or non-finite values")
        return (*v, 0.0, 1.0)

    def effect(self, group: str, value: bytes | None) -> GroupEffect:
        if value is None:
            return GroupEffect(group, 0.0, dict.fromkeys(self.names, 0.0),
                               [list(row) for row in self.G], 0.0, self.version, False)
        v = self.decode(value)
        n = v[0]
        rbar = self.c
        for p, coef in self.pm:
            rbar += coef * v[p]
        zbar = [v[p] - zc for p, zc in zip(self.pz, self.zc)]
        Ztr = []
        for z, pa in zip(zbar, self.pa):
            s = n * z * rbar
            for p, coef in pa:
                s += coef * v[p]
            Ztr.append(s)
        b, WtW = self.solve(n, zbar, v, Ztr)
        sigma2 = self.sigma2
        cov = [[sigma2 * x for x in row] for row in WtW]
        shrink = 1.0 - cov[0][0] / self.G00 if self.G00 > 0 else 0.0
        if self.centred:
            b, cov = self._uncentre(b, cov)
        return GroupEffect(group, n, dict(zip(self.names, b)), cov, shrink, self.version, True)

    def _uncentre(self, b: list[float], cov: list[list[float]]
                  ) -> tuple[list[float], list[list[float]]]:
        """b = T b_c, Var = T Var_c T': the intercept row of T is e_i0 - z_centre."""
        i0, zc, q = self.i0, self.zc, self.q
        b = list(b)
        b[i0] -= sum(z * x for z, x in zip(zc, b))
        row = [cov[i0][j] - sum(zc[k] * cov[k][j] for k in range(q)) for j in range(q)]
        cov = [list(r) for r in cov]
        cov[i0] = row
        for i in range(q):
            cov[i][i0] = row[i]
        cov[i0][i0] = row[i0] - sum(zc[k] * row[k] for k in range(q))
        return b, cov

    # (b, W'W) from Z'r; Z'Z is formed inside: q = 1 and 2 written out, any q by loops.

    def _solve1(self, n: float, zbar: list[float], v: tuple[float, ...], Ztr: list[float]
                ) -> tuple[list[float], list[list[float]]]:
        l00 = self.lam[0][0]
        a00 = n * zbar[0] * zbar[0] + v[self.pc[0][0]]
        w = l00 / math.sqrt(l00 * (a00 * l00) + 1.0)
        ww = w * w
        return [ww * Ztr[0]], [[ww]]

    def _solve2(self, n: float, zbar: list[float], v: tuple[float, ...], Ztr: list[float]
                ) -> tuple[list[float], list[list[float]]]:
        (l00, _), (l10, l11) = self.lam
        z0, z1 = zbar
        pc = self.pc
        a00 = n * z0 * z0 + v[pc[0][0]]
        a01 = n * z1 * z0 + v[pc[1][0]]
        a11 = n * z1 * z1 + v[pc[1][1]]
        p00 = l00 * (a00 * l00 + a01 * l10) + l10 * (a01 * l00 + a11 * l10) + 1.0
        p01 = l00 * (a01 * l11) + l10 * (a11 * l11)
        p11 = l11 * (a11 * l11) + 1.0
        c00 = math.sqrt(p00)
        c10 = p01 / c00
        c11 = math.sqrt(p11 - c10 * c10)
        w00, w01 = l00 / c00, l10 / c00
        w10, w11 = -c10 * w00 / c11, (l11 - c10 * w01) / c11
        s00 = w00 * w00 + w10 * w10
        s01 = w00 * w01 + w10 * w11
        s11 = w01 * w01 + w11 * w11
        t0, t1 = Ztr
        return [s00 * t0 + s01 * t1, s01 * t0 + s11 * t1], [[s00, s01], [s01, s11]]

    def _solve_any(self, n: float, zbar: list[float], v: tuple[float, ...], Ztr: list[float]
                   ) -> tuple[list[float], list[list[float]]]:
        q, lam, pc = self.q, self.lam, self.pc
        A = [[n * zbar[i] * zbar[j] + v[pc[i][j]] for j in range(q)] for i in range(q)]
        T = [[sum(A[i][k] * lam[k][j] for k in range(q)) for j in range(q)] for i in range(q)]
        P = [[sum(lam[k][i] * T[k][j] for k in range(q)) + (i == j) for j in range(q)]
             for i in range(q)]
        L = [[0.0] * q for _ in range(q)]
        for k in range(q):
            L[k][k] = math.sqrt(P[k][k] - sum(L[k][j] * L[k][j] for j in range(k)))
            for i in range(k + 1, q):
                L[i][k] = (P[i][k] - sum(L[i][j] * L[k][j] for j in range(k))) / L[k][k]
        W = [[0.0] * q for _ in range(q)]  # L^-1 Lam' by forward substitution
        for col in range(q):
            for i in range(q):
                W[i][col] = (lam[col][i] - sum(L[i][j] * W[j][col] for j in range(i))) / L[i][i]
        WtW = [[sum(W[k][i] * W[k][j] for k in range(q)) for j in range(q)] for i in range(q)]
        return [sum(WtW[i][j] * Ztr[j] for j in range(q)) for i in range(q)], WtW


def _triangle_positions(d: int) -> list[list[int]]:
    """pos[i][j]: where C[i, j] sits in a decoded record (n, t, m, upper triangle of C)."""
    pos = [[0] * d for _ in range(d)]
    k = 2 + d
    for i in range(d):
        for j in range(i, d):
            pos[i][j] = pos[j][i] = k
            k += 1
    return pos


class ModelVersionNotFoundError(LookupError):
    """An asked model version is not stored (never written, or trimmed from history)."""


class _RedisSource:
    """Group records and the current version in one MGET; models through `RedisStore`."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.store = RedisStore(client, namespace)
        self.redis = client
        self.prefix = self.store.keys.group_prefix
        self.current_key = self.store.keys.model_current

    def one(self, group: str) -> tuple[bytes | None, int | None]:
        value, version = self.redis.mget([self.prefix + encode_group(group), self.current_key])
        return value, None if version is None else int(version)

    def many(self, groups: Sequence[str]) -> tuple[list[bytes | None], int | None]:
        keys = [self.prefix + encode_group(g) for g in groups]
        keys.append(self.current_key)
        values = self.redis.mget(keys)
        version = values.pop()
        return values, None if version is None else int(version)

    def ping(self) -> bool:
        return bool(self.redis.ping())

    def close(self) -> None:
        self.redis.close()


class _StoreSource:
    """Any other `StateStore` (the in-process MemoryStore): same records, no round trips."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def one(self, group: str) -> tuple[bytes | None, int | None]:
        values, version = self.many([group])
        return values[0], version

    def many(self, groups: Sequence[str]) -> tuple[list[bytes | None], int | None]:
        for g in groups:
            encode_group(g)  # the same id checks as against Redis
        version = self.store.current_model_version()  # type: ignore[attr-defined]
        stats: GroupStats = self.store.get_many(groups)
        return [stats.to_bytes_one(stats.index(g)) if g in stats else None for g in groups], version

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _connect(url: str, timeout: float) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                health_check_interval=30)


class Client:
    """Group effects, predictions and models from the store a configuration names.

    Parameters
    ----------
    target
        A configuration file path, a `Config`, a Redis URL (``redis://``, ``rediss://``,
        ``unix://``; give ``namespace`` too), a redis-py client (with ``namespace``) or a state
        store object.
    namespace
        The ``[redis] namespace`` of the model, when ``target`` is a URL or a redis-py client.
    timeout
        Seconds to wait for Redis (connect and each reply) before raising.

    Thread-safe: one Client may serve many threads (redis-py pools its connections).
    """

    def __init__(self, target: str | os.PathLike[str] | Config | redis.Redis | StateStore,
                 namespace: str | None = None, *, timeout: float = 5.0) -> None:
        is_url = isinstance(target, str) and target.startswith(_URL_SCHEMES)
        if isinstance(target, (str, os.PathLike)) and not is_url:
            target = load_config(Path(target))
        if is_url or isinstance(target, redis.Redis):
            if not namespace:
                raise ValueError("a Redis URL or client needs namespace=..., the [redis] "
                                 "namespace of the model's configuration")
            client = _connect(target, timeout) if is_url else target  # type: ignore[arg-type]
            self._source: _RedisSource | _StoreSource = _RedisSource(client, namespace)
        elif isinstance(target, Config):
            if target.redis is not None:
                self._source = _RedisSource(_connect(target.redis.url, timeout),
                                            target.redis.namespace)
            else:
                from streamlme.stream.app import make_store

                self._source = _StoreSource(make_store(target))
        elif isinstance(target, RedisStore):
            self._source = _RedisSource(target.client, target.namespace)
        else:
            self._source = _StoreSource(target)
        self._kernel: _Kernel | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._source.close()

    @property
    def store(self) -> StateStore:
        """The underlying state store (for model history and administration)."""
        return self._source.store

    # -- effects ------------------------------------------------------------------------------

    def effect(self, group: str) -> GroupEffect:
        """One group's current effect: one round trip (two when the model version changed)."""
        value, version = self._source.one(group)
        return self._kernel_for(version).effect(group, value)

    def effects(self, groups: Sequence[str]) -> list[GroupEffect]:
        """Effects of ``groups`` in the order asked, fetched in one round trip."""
        groups = list(groups)
        if not groups:
            return []
        values, version = self._source.many(groups)
        kernel = self._kernel_for(version)
        return [kernel.effect(g, v) for g, v in zip(groups, values)]

    def predict(self, group: str, row: Mapping[str, float], level: float = 0.95) -> Prediction:
        """Predict y for a new ``row`` (covariate name -> value) of ``group``.

        Raises ValueError if the row lacks a covariate of the model or a value is not a finite
        number, or if ``level`` is not between 0 and 1.
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be between 0 and 1, got {level!r}")
        eff = self.effect(group)
        kernel = self._kernel_for(eff.model_version)
        spec = kernel.record.spec
        missing = [c for c in spec.covariates if c not in row]
        if missing:
            raise ValueError(f"row lacks {missing}; the model needs {list(spec.covariates)}")
        values = {}
        for c in spec.covariates:
            try:
                values[c] = float(row[c])
            except (TypeError, ValueError):
                raise ValueError(f"row[{c!r}] = {row[c]!r} is not a number") from None
            if not math.isfinite(values[c]):
                raise ValueError(f"row[{c!r}] = {row[c]!r} is not finite")
        rec = kernel.record
        b = np.array([eff.effect[name] for name in kernel.names])
        x = [1.0 if t == INTERCEPT else values[t] for t in spec.fixed]
        with np.errstate(over="ignore", invalid="ignore"):
            mu, se, lo, hi = _predict(spec, rec.beta, rec.beta_cov, rec.sigma2, b,
                                      np.array(eff.cov), values, level)
            fixed = float(np.dot(x, rec.beta))
        if not all(map(math.isfinite, (mu, se, lo, hi, fixed))):
            raise ValueError(f"row {values} is too far out of range: the prediction overflows")
        return Prediction(group, mu, fixed, mu - fixed, se, lo, hi, level, eff.model_version,
                          eff.known)

    # -- models -------------------------------------------------------------------------------

    def model(self, version: int | None = None) -> ModelRecord:
        """The current model record, or the stored ``version``."""
        if version is None:
            return self._kernel_for(self.current_version()).record
        raw = self._source.store.get_model(version)  # type: ignore[attr-defined]
        if raw is None:
            raise ModelVersionNotFoundError(
                f"model version {version} is not stored; stored versions: {self.model_versions()}")
        return ModelRecord.from_json(raw, version=version)

    def current_version(self) -> int | None:
        return self._source.store.current_model_version()  # type: ignore[attr-defined]

    def model_versions(self) -> list[int]:
        """Stored model versions, oldest first."""
        return self._source.store.model_versions()  # type: ignore[attr-defined]

    def ping(self) -> bool:
        """True when the store answers (raises the store's connection error otherwise)."""
        return self._source.ping()

    def _kernel_for(self, version: int | None) -> _Kernel:
        if version is None:
            raise ModelNotReady()
        kernel = self._kernel
        if kernel is not None and kernel.version == version:
            return kernel
        with self._lock:
            kernel = self._kernel
            if kernel is None or kernel.version != version:
                store = self._source.store
                raw = store.get_model(version)  # type: ignore[attr-defined]
                if raw is None:
                    raise StoreError(
                        f"model version {version} is current but not stored; run "
                        "`streamlme model --rollback V` with a stored version or refresh again")
                kernel = _Kernel(ModelRecord.from_json(raw, version=version))
                self._kernel = kernel
        return kernel


def effect_lines(config_path: str | os.PathLike[str], groups: Sequence[str],
                 as_json: bool = True) -> list[str]:
    """What `streamlme effect GROUP... --config FILE [--json]` prints, one line per group asked."""
    with Client(config_path) as client:
        effects = client.effects(groups)
    if as_json:
        return [e.to_json() for e in effects]
    return [_text_line(e) for e in effects]


def _text_line(e: GroupEffect) -> str:
    terms = "  ".join(f"{name} {b:+.6g} (se {math.sqrt(max(e.cov[i][i], 0.0)):.3g})"
                      for i, (name, b) in enumerate(e.effect.items()))
    seen = f"n={e.n:g}, shrinkage {e.shrinkage:.3f}" if e.known else "never seen: prior"
    return f"{e.group}: {terms}  [{seen}; model v{e.model_version}]"
