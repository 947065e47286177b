"""Group effects on demand: the Python client the CLI and the HTTP API are built on.

`Client` reads a group's *current* running statistics and the current model version and returns
the group's BLUP (design.md section 4), so an effect moves with every event between refreshes.
Against Redis, `Client.effect` is one round trip: the group's record (an HMGET of its shard) and
the current model's key are read in one pipeline (one per node on a Cluster). The decoded
model is cached by its `ModelKey`, the namespace's epoch and the version, and fetched again only
when that key changes: a Redis that came back empty restarts the version counter at 1, but its
namespace gets a new epoch, so the model of the lost state is never served again.

A cell whose statistics are not finite (an overflowing event that reached the store) cannot give
an effect: its query raises `BadStatisticsError`, and in `Client.effects` with
``errors="report"`` only that group's item is a `GroupError`. While the namespace is flagged
(rebuilding, or state lost; `streamlme.store.health`) queries raise `NamespaceNotReady`; the
flag is read at most every `HEALTH_TTL` seconds.

Every effect is computed by the one BLUP core, `streamlme.blup`: a one-term model through its
`ScalarKernel` (the core's maps compiled to plain Python floats and positions in a stored record;
q, the number of random terms, is 1 to 3, and numpy's per-call overhead would cost more than the
arithmetic), any other model through `TermsModel`. Every interface (Client, CLI, HTTP) goes
through the Client, so they print the same numbers.

A model with several random-effect terms is asked by term: ``Client.effect(level,
term="doctor")``. The Client finds the level's cells through the store's index of cells by level
(`RedisStore.cells_of`), reads their current statistics and solves the level's block (see
`streamlme.blup` for what the effect is for nested and crossed terms).

>>> from streamlme.store import MemoryStore
>>> Client(MemoryStore()).effect("A17")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
streamlme.client.ModelNotReady: no model has been estimated yet; run `streamlme refresh ...
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from redis.cluster import RedisCluster

from streamlme.blup import TermsModel
from streamlme.blup import predict as _predict
from streamlme.config import Config, load_config
from streamlme.model import ModelRecord
from streamlme.spec import INTERCEPT, SpecError, term_name
from streamlme.stats import FORMAT_VERSION, HEADER, MAGIC, GroupStats, StatsError, packed_size
from streamlme.store.base import StateStore
from streamlme.store.connect import open_store, redis_client
from streamlme.store.errors import StoreError
from streamlme.store.health import Health, ModelKey, iso_time
from streamlme.store.keys import encode_group
from streamlme.store.redis import RedisStore

#: Most groups one `Client.effects` call (and one HTTP request) may ask for.
MAX_GROUPS = 10_000
#: Seconds a query trusts the namespace's last read health (flag) before reading it again.
HEALTH_TTL = 1.0
_URL_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


class ModelNotReady(LookupError):  # noqa: N818 - the name users catch
    """No model version exists yet, so no effect can be computed."""

    def __init__(self) -> None:
        super().__init__(
            "no model has been estimated yet; run `streamlme refresh --config FILE --once` "
            "after some events have arrived"
        )


class NamespaceNotReady(LookupError):  # noqa: N818 - the name users catch
    """The namespace is flagged (rebuilding, or state lost): its statistics are not served.

    The CLI exits with `exit_code`, as for the `StateLostError` that flagged it.
    """

    exit_code = 3

    def __init__(self, health: Health) -> None:
        self.health = health
        since = iso_time(health.since)
        super().__init__(
            f"the namespace is flagged {health.flag!r}" + (f" since {since}" if since else "")
            + (f": {health.reason}" if health.reason else "")
            + "; effects are not served from its statistics until that clears")


class BadStatisticsError(StatsError):
    """A cell's stored statistics are not finite (inf or NaN) or give no finite effect."""

    def __init__(self, group: str) -> None:
        self.group = group
        super().__init__(
            f"group {group!r} has statistics that are not finite (an event whose values "
            "overflowed reached the store), so it has no effect; rebuild the namespace "
            "(`streamlme consume --rebuild`, docs/operations.md) to drop it")


@dataclass(frozen=True)
class GroupError:
    """A group of a many-groups query that could not be answered, in its place in the list."""

    group: str
    error: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "error": self.error, "message": self.message}


def closest(name: str, known: Sequence[str]) -> str | None:
    """The name of ``known`` closest to ``name`` (difflib's ratio of at least 0.6, ignoring
    case), or None: what a "did you mean" names."""
    by_lower = {k.lower(): k for k in reversed(list(known))}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[close[0]] if close else None


def _effect_line(group: str, n: float, effect: dict[str, float], cov: list[list[float]],
                 shrinkage: float, model_version: int, known: bool) -> dict[str, Any]:
    """The fields every effect line has, a group's or a term's level's."""
    return {
        "group": group,
        "n": int(n) if n.is_integer() else n,
        "effect": dict(effect),
        "cov": [list(row) for row in cov],
        "shrinkage": shrinkage,
        "model_version": model_version,
        "known": known,
    }


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
        return _effect_line(self.group, self.n, self.effect, self.cov, self.shrinkage,
                            self.model_version, self.known)

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


class TermRequired(ValueError):  # noqa: N818 - the name users catch
    """A group query on a model whose levels need a term named (several terms or factors)."""

    def __init__(self, terms: Sequence[str]) -> None:
        self.terms = list(terms)
        super().__init__(
            "the model has several random-effect terms or grouping columns; name the term: "
            f"one of {', '.join(map(repr, self.terms))} (Client.effect(level, term=...), "
            "`streamlme effect LEVEL --term T`, GET /v1/terms/{term}/levels/{level}/effect)")


class UnknownTermError(LookupError):
    """A query names a factor that no random-effect term of the model is on."""

    def __init__(self, term: str, terms: Sequence[str]) -> None:
        self.term, self.terms = term, list(terms)
        super().__init__(f"no random-effect term on {term!r}; the model's terms are on "
                         f"{', '.join(map(repr, self.terms))}")


@dataclass(frozen=True)
class TermEffect:
    """One level's effect for a named term (every term on that factor), under one model version.

    ``term`` is the factor as the formula writes it (``plate``, ``hospital:doctor``), ``level``
    its level (an interaction's parts joined with ``:``); ``effect``, ``cov``, ``shrinkage``,
    ``n`` and ``known`` mean what they mean in `GroupEffect`. ``cells`` counts the cells that
    carry the level; ``solution`` is ``"exact"`` (one term, nested terms, terms on one factor:
    the exact BLUP from current statistics) or ``"gauss_seidel"`` (crossed terms: updated from
    the level's own statistics given the other factors' effects of the last refresh); see
    `streamlme.blup`.
    """

    term: str
    level: str
    n: float
    effect: dict[str, float]
    cov: list[list[float]]
    shrinkage: float
    model_version: int
    known: bool
    cells: int
    solution: str

    def to_dict(self) -> dict[str, Any]:
        """The `streamlme effect --term T --json` line: the fields of a group's line (``group``
        holds the level) plus term, level, cells and solution."""
        return {
            "term": self.term,
            "level": self.level,
            **_effect_line(self.level, self.n, self.effect, self.cov, self.shrinkage,
                           self.model_version, self.known),
            "cells": self.cells,
            "solution": self.solution,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, ensure_ascii=False)


class _Kernel:
    """One model version compiled for queries: the record, its layout and the BLUP core.

    A one-term model on one grouping column computes through `streamlme.blup.ScalarKernel`
    (the core's `Kernel` on plain floats, reading positions of a decoded record); every other
    model through `streamlme.blup.TermsModel`, built from the same maps.

    A decoded record is (n, t, m, upper triangle of C) followed by two constants, 0.0 and 1.0
    (see `ScalarKernel`).
    """

    def __init__(self, record: ModelRecord, key: ModelKey) -> None:
        spec = record.spec
        d = len(spec.columns)
        self.record = record
        self.spec = spec
        self.key = key
        self.version = record.version
        self.d = d
        self.header = HEADER.pack(MAGIC, FORMAT_VERSION, d)
        self.size = packed_size(d)
        self.body = struct.Struct(f"<{2 + d + d * (d + 1) // 2}d")
        #: a one-term model keyed by its own levels: the latency path
        self.simple = len(spec.terms) == 1 and len(spec.grouping_columns) == 1
        self.terms = [t.group for t in spec.terms]
        if self.simple:
            self.names = [term_name(t) for t in spec.random]
            self.G = [[float(v) for v in row] for row in record.G]
            self.core = record.kernel().scalar()
        self._terms_model: TermsModel | None = None

    @property
    def terms_model(self) -> TermsModel:
        if self._terms_model is None:
            self._terms_model = self.record.terms_model()
        return self._terms_model

    def decode(self, group: str, value: bytes) -> tuple[float, ...]:
        if len(value) != self.size or value[: HEADER.size] != self.header:
            raise StatsError(
                f"stored statistics are not {self.size}-byte records of {self.d} columns as "
                f"model version {self.version} expects; is the namespace shared with another model?"
            )
        v = self.body.unpack_from(value, HEADER.size)
        if not (v[0] >= 0.0 and math.isfinite(v[0]) and math.isfinite(sum(v[2:]))):
            raise BadStatisticsError(group)
        return (*v, 0.0, 1.0)

    def stats(self, keys: Sequence[str], values: Sequence[bytes | None]) -> GroupStats:
        """The cells among ``keys`` that have a record, checked as `decode` checks one."""
        found = [(k, v) for k, v in zip(keys, values) if v is not None]
        for k, v in found:
            self.decode(k, v)
        if not found:
            return GroupStats.empty(self.d)
        return GroupStats.from_bytes([k for k, _ in found], [v for _, v in found])

    def effect(self, group: str, value: bytes | None) -> GroupEffect:
        if not self.simple:
            raise TermRequired(self.terms)
        if value is None:
            return GroupEffect(group, 0.0, dict.fromkeys(self.names, 0.0),
                               [list(row) for row in self.G], 0.0, self.version, False)
        v = self.decode(group, value)
        b, cov, shrink = self.core.effect(v)
        # finite statistics can still overflow in the solve (values near 1e200)
        if not math.isfinite(sum(b) + sum(map(sum, cov)) + shrink):
            raise BadStatisticsError(group)
        return GroupEffect(group, v[0], dict(zip(self.names, b)), cov, shrink, self.version, True)

    def effect_or_error(self, group: str, value: bytes | None) -> GroupEffect | GroupError:
        """`effect`, or the group's `GroupError` when its statistics are not finite."""
        try:
            return self.effect(group, value)
        except BadStatisticsError as exc:
            return GroupError(group, "bad_statistics", str(exc))

    def term_effect(self, term: str, level: str, stats: GroupStats) -> TermEffect:
        if self.simple:
            value = stats.to_bytes_one(stats.index(level)) if level in stats else None
            e = self.effect(level, value)
            return TermEffect(self.terms[0], level, e.n, e.effect, e.cov, e.shrinkage,
                              self.version, e.known, int(e.known), "exact")
        eff = self.terms_model.level_effect(term, level, stats)
        if not (np.isfinite(eff.b).all() and np.isfinite(eff.cov).all()
                and math.isfinite(eff.shrinkage)):
            raise BadStatisticsError(level)
        return TermEffect(eff.factor, eff.level, eff.n, dict(zip(eff.names, map(float, eff.b))),
                          eff.cov.tolist(), eff.shrinkage, self.version, eff.known, eff.cells,
                          eff.solution)

    def resolve(self, term: str) -> str:
        """The factor ``term`` names, as the formula writes it; UnknownTermError if none."""
        try:
            return self.spec.term(term).group
        except SpecError:
            raise UnknownTermError(term, self.terms) from None


def _split_candidates(level: str, parts: int, j: int, limit: int = 64) -> list[str]:
    """Part ``j`` of every way to read ``level`` as ``parts`` pieces joined by ``:``."""
    if parts == 1:
        return [level]
    colons = [i for i, ch in enumerate(level) if ch == ":"]
    out: list[str] = []
    for cut in itertools.combinations(colons, parts - 1):
        bounds = [-1, *cut, len(level)]
        piece = level[bounds[j] + 1: bounds[j + 1]]
        if piece not in out:
            out.append(piece)
        if len(out) >= limit:
            break
    return out


class ModelVersionNotFoundError(LookupError):
    """An asked model version is not stored (never written, or trimmed from history)."""


class _Source:
    """Cell records and the current `ModelKey` from any `StateStore`: one pipelined round
    trip against Redis, no round trip against an in-process store."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._health_at = -math.inf
        self._flagged: Health | None = None

    def one(self, group: str) -> tuple[bytes | None, ModelKey | None]:
        values, key = self.many([group])
        return values[0], key

    def many(self, groups: Sequence[str]) -> tuple[list[bytes | None], ModelKey | None]:
        self.check_health()
        return self.store.values_and_model_key(groups)

    def check_health(self) -> None:
        """NamespaceNotReady while the namespace is flagged; its health is read again at most
        every `HEALTH_TTL` seconds (a round trip per second, not per query)."""
        now = time.monotonic()
        if now - self._health_at >= HEALTH_TTL:
            health = self.store.health()
            self._flagged = None if health.ready else health
            self._health_at = now
        if self._flagged is not None:
            raise NamespaceNotReady(self._flagged)

    def cells(self, position: int, level: str) -> list[str]:
        encode_group(level)  # the same id checks for every store
        return list(self.store.cells_of(position, level))

    def ping(self) -> bool:
        return self.store.ping()

    def close(self) -> None:
        client = getattr(self.store, "client", None)
        if client is not None:
            client.close()


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
        if is_url or isinstance(target, (redis.Redis, RedisCluster)):
            if not namespace:
                raise ValueError("a Redis URL or client needs namespace=..., the [redis] "
                                 "namespace of the model's configuration")
            client = (redis_client(target, timeout=timeout) if is_url  # type: ignore[arg-type]
                      else target)
            self._source = _Source(RedisStore(client, namespace,  # type: ignore[arg-type]
                                              retry_seconds=timeout))
        elif isinstance(target, Config):
            if target.redis is not None:
                r = target.redis
                client = redis_client(r.url, cluster=r.cluster,
                                      nodes=r.startup_nodes if r.cluster else (), timeout=timeout)
                self._source = _Source(RedisStore(client, r.namespace, retry_seconds=timeout))
            else:
                self._source = _Source(open_store(target))
        else:
            self._source = _Source(target)
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

    def effect(self, group: str, term: str | None = None) -> GroupEffect | TermEffect:
        """One group's current effect: one round trip (two when the model version changed).

        With ``term`` (a grouping factor of the model's formula, e.g. ``"doctor"`` or
        ``"hospital:doctor"``), the effect of level ``group`` of every term on that factor, as a
        `TermEffect` (see `streamlme.blup` for what it is for nested and crossed terms). A model
        with several terms, or a term on several grouping columns, needs ``term``
        (`TermRequired` otherwise); an unknown term raises `UnknownTermError`. A model keyed by
        one grouping column answers a term query in one round trip; otherwise it takes two
        (the level's cells from the store's index, then their statistics).
        """
        if term is not None:
            return self.term_effect(term, group)
        value, key = self._source.one(group)
        return self._kernel_for(key).effect(group, value)

    def effects(self, groups: Sequence[str], term: str | None = None, *,
                errors: str = "raise") -> list[Any]:
        """Effects of ``groups`` in the order asked, fetched in one round trip (with ``term``,
        one query per level).

        A group whose statistics are not finite raises `BadStatisticsError`; with
        ``errors="report"`` its place holds a `GroupError` instead and the others are answered.
        """
        if errors not in ("raise", "report"):
            raise ValueError(f"errors must be 'raise' or 'report', got {errors!r}")
        groups = list(groups)
        if not groups:
            return []
        if term is not None:
            return [self._term_effect_or_error(term, g, errors) for g in groups]
        values, key = self._source.many(groups)
        kernel = self._kernel_for(key)
        one = kernel.effect if errors == "raise" else kernel.effect_or_error
        return [one(g, v) for g, v in zip(groups, values)]

    def _term_effect_or_error(self, term: str, level: str, errors: str
                              ) -> TermEffect | GroupError:
        try:
            return self.term_effect(term, level)
        except BadStatisticsError as exc:
            if errors == "raise":
                raise
            return GroupError(level, "bad_statistics", str(exc))

    def term_effect(self, term: str, level: str | Sequence[str]) -> TermEffect:
        """The current effect of ``level`` of the factor ``term`` (a string, or for an
        interaction factor also the tuple of its parts)."""
        plan = self._kernel if self._kernel is not None else self._kernel_for(
            self._source.store.model_key())
        for _ in range(3):
            factor = plan.resolve(term)
            spec = plan.spec
            name = plan.terms_model.level_name(factor, level) if not isinstance(
                level, str) else level
            if len(spec.grouping_columns) == 1:
                # cells are keyed by the level itself
                value, key = self._source.one(name)
                keys, values = [name], [value]
            else:
                keys = self._cells_of(plan, factor, level)
                values, key = self._source.many(keys)
            kernel = self._kernel_for(key)
            if kernel.spec == spec:
                return kernel.term_effect(factor, name, kernel.stats(keys, values))
            plan = kernel  # the model changed shape between the two reads: plan again
        raise StoreError("the model kept changing while a level's cells were read; retry")

    def _cells_of(self, plan: _Kernel, factor: str, level: str | Sequence[str]) -> list[str]:
        """Keys of every cell of the block of ``level`` (and maybe more), from the index."""
        spec = plan.spec
        tm = plan.terms_model
        first = tm.block_columns(factor)[0]
        position = spec.grouping_columns.index(first)
        parts = spec.term(factor).factors
        j = parts.index(first)
        candidates = (_split_candidates(level, len(parts), j) if isinstance(level, str)
                      else [str(level[j])])
        keys: list[str] = []
        for value in candidates:
            keys += [k for k in self._source.cells(position, value) if k not in keys]
        return keys

    def predict(self, group: str, row: Mapping[str, float], level: float = 0.95) -> Prediction:
        """Predict y for a new ``row`` (covariate name -> value) of ``group``.

        Raises ValueError if the row lacks a covariate of the model or a value is not a finite
        number, or if ``level`` is not between 0 and 1.
        """
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be between 0 and 1, got {level!r}")
        value, key = self._source.one(group)
        kernel = self._kernel_for(key)
        eff = kernel.effect(group, value)
        spec = kernel.record.spec
        missing = [c for c in spec.covariates if c not in row]
        if missing:
            hints = [f"; {k!r} is not a covariate: did you mean {near!r}?" for k in row
                     if k not in spec.covariates and (near := closest(k, missing))]
            raise ValueError(f"row lacks {missing}; the model needs {list(spec.covariates)}"
                             + "".join(hints[:1]))
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
            return self._kernel_for(self._source.store.model_key()).record
        raw = self._source.store.get_model(version)
        if raw is None:
            raise ModelVersionNotFoundError(
                f"model version {version} is not stored; stored versions: {self.model_versions()}")
        return ModelRecord.from_json(raw, version=version)

    def current_version(self) -> int | None:
        return self._source.store.current_model_version()

    def model_versions(self) -> list[int]:
        """Stored model versions, oldest first."""
        return self._source.store.model_versions()

    def ping(self) -> bool:
        """True when the store answers (raises the store's connection error otherwise)."""
        return self._source.ping()

    def check_ready(self) -> None:
        """Raise `NamespaceNotReady` while the namespace is flagged (what every effect query
        checks, from a health read at most `HEALTH_TTL` seconds old)."""
        self._source.check_health()

    def model_key(self) -> ModelKey | None:
        """The current model's (epoch, version); None before any model."""
        return self._source.store.model_key()

    def _kernel_for(self, key: ModelKey | None) -> _Kernel:
        """The compiled model of ``key``, cached by the whole key: a version alone repeats
        after a reset (the counter restarts at 1), an epoch does not."""
        if key is None:
            raise ModelNotReady()
        kernel = self._kernel
        if kernel is not None and kernel.key == key:
            return kernel
        with self._lock:
            kernel = self._kernel
            if kernel is None or kernel.key != key:
                raw = self._source.store.get_model(key.version)
                if raw is None:
                    raise StoreError(
                        f"model version {key.version} is current but not stored; run "
                        "`streamlme model --rollback V` with a stored version or refresh again")
                kernel = _Kernel(ModelRecord.from_json(raw, version=key.version), key)
                self._kernel = kernel
        return kernel


def effect_lines(config_path: str | os.PathLike[str], groups: Sequence[str],
                 as_json: bool = True, term: str | None = None) -> list[str]:
    """What `streamlme effect GROUP... --config FILE [--term T] [--json]` prints, one line per
    group (level) asked."""
    with Client(config_path) as client:
        effects = client.effects(groups, term=term)
    if as_json:
        return [e.to_json() for e in effects]
    return [_text_line(e) for e in effects]


def _text_line(e: GroupEffect | TermEffect) -> str:
    terms = "  ".join(f"{name} {b:+.6g} (se {math.sqrt(max(e.cov[i][i], 0.0)):.3g})"
                      for i, (name, b) in enumerate(e.effect.items()))
    seen = f"n={e.n:g}, shrinkage {e.shrinkage:.3f}" if e.known else "never seen: prior"
    if isinstance(e, TermEffect):
        cells = f", {e.cells} cell{'s' if e.cells != 1 else ''}" if e.known else ""
        return (f"{e.term} {e.level}: {terms}  [{seen}{cells}; {e.solution}; "
                f"model v{e.model_version}]")
    return f"{e.group}: {terms}  [{seen}; model v{e.model_version}]"
