"""Decoding and validating events: Kafka message values (JSON bytes) into numpy arrays.

One event is one JSON object holding the spec's grouping column and numeric columns, plus optional
``weight`` (a case weight > 0, default 1), ``ts`` (event time: seconds since the epoch or an
RFC 3339 string with a timezone; used for decay) and ``op`` (``"add"``, the default, or
``"retract"`` to take a row that was sent before back out). Other keys are ignored.

A model with several grouping columns, or with categorical covariates, needs every grouping column
(a string or an integer id, each checked as a group id is) and every categorical column (a string,
or an integer read as its text) in each event; a categorical value must be one of the levels the
spec declares. Such an event is folded into its **cell** (`ModelSpec.cell_key` of its levels),
and its row holds the spec's design columns (`ModelSpec.design_matrix`: numeric columns as they
are, a categorical as its indicator columns), so everything downstream sees cells and rows as it
sees groups and rows of a one-factor model.

The decoder validates with a msgspec Struct built for the spec, so type checks run in C; a
malformed message never raises, it becomes a `Rejection` whose reason starts with a stable code:

=================  ==============================================================
``invalid_json``   not JSON (or not UTF-8 in a field the model reads, or a NaN/Infinity token,
                   or empty, or nested deeper than Python's recursion limit allows)
``not_an_object``  valid JSON but not an object
``missing_column`` a model column (or a grouping column) is absent (with "did you mean" when a
                   key of the event is a close match)
``non_numeric``    a column holds a string, boolean, null, ... instead of a number
``not_finite``     a number too large for a float (1e400 overflows to infinity)
``overflow``       a finite value that could make a statistic overflow: a design column beyond
                   ±`MAX_VALUE` or a weight over `MAX_WEIGHT`
``bad_group``      group id empty, over 256 bytes, or neither string nor integer (with
                   several grouping columns: a level so, or a cell key over 256 bytes)
``unknown_level``  a categorical column holds a value that is not one of its declared levels
``bad_weight``     weight not a finite number > 0
``bad_ts``         ts neither a finite number nor an RFC 3339 time with a timezone, or more
                   than ``max_future`` seconds ahead of this machine's clock
``unknown_op``     op other than "add" or "retract"
``oversized``      the message is larger than ``max_message_bytes``
=================  ==============================================================

>>> from streamlme.spec import ModelSpec
>>> spec = ModelSpec(response="los", fixed=["1", "age"], random=["1"], group="hospital")
>>> batch = EventDecoder(spec).decode([
...     b'{"hospital": "A17", "age": 63, "los": 4.5}',
...     b'{"hospital": 17, "age": true, "los": 1}',
...     b'{"hospital": 17, "age": 50, "los": 2, "op": "retract", "weight": 2}',
... ])
>>> batch.groups, batch.W.tolist(), batch.weights.tolist(), batch.retract.tolist()
(['A17', '17'], [[63.0, 4.5], [50.0, 2.0]], [1.0, 2.0], [False, True])
>>> batch.rejections
[Rejection(index=1, reason='non_numeric: age (got bool)')]

Crossed factors and a categorical covariate: the groups are cell keys, the rows design rows.

>>> spec = ModelSpec.from_formula('los ~ 1 + C(sex, levels=["F", "M"]) + (1 | hospital) + (1 | ward)')
>>> batch = EventDecoder(spec).decode([
...     b'{"hospital": "A17", "ward": 3, "sex": "M", "los": 4.5}',
...     b'{"hospital": "A17", "ward": 3, "sex": "X", "los": 1}',
...     b'{"hospital": "A17", "sex": "F", "los": 2}',
... ])
>>> spec.columns, batch.groups, batch.W.tolist()
(('sexM', 'los'), ['["A17","3"]'], [[1.0, 4.5]])
>>> [r.reason for r in batch.rejections]
["unknown_level: sex holds 'X', not one of its declared levels 'F', 'M'", 'missing_column: ward']
"""

from __future__ import annotations

import difflib
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import chain
from operator import attrgetter
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import numpy as np

from streamlme.spec import ModelSpec

#: Keys with a meaning of their own in an event; no model column may use these names.
RESERVED_FIELDS = ("weight", "ts", "op")
MAX_GROUP_BYTES = 256

# Per-event limits under which no group's statistics can overflow. A group of up to
# N = 2**53 events (~9.0e15; more than a float can count one by one) with every design value
# |x| <= MAX_VALUE and every weight w <= MAX_WEIGHT keeps, whatever the order of the merges:
#   the mass n <= N * MAX_WEIGHT ~ 9e65, and n_a * n_b in the pairwise merge <= ~8e131;
#   |means| <= MAX_VALUE, so |x - m| <= 2 * MAX_VALUE;
#   each co-moment |C_ij| = |sum w (x_i - m_i)(x_j - m_j)| <= n * 4 * MAX_VALUE**2 ~ 3.6e266,
#   and so do the pairwise term w * delta_i * delta_j and the refresh's C + n (m - r)(m - r)'.
# That leaves a factor of ~1e40 below the largest float (1.8e308) for the estimator's products.
# Real data sit far inside: these limits only keep out values whose square is already absurd.
#: Largest magnitude of a design value (numeric column, or product of columns) an event may carry.
MAX_VALUE = 1e100
#: Largest case weight an event may carry.
MAX_WEIGHT = 1e50
#: Seconds an event time may lie ahead of this machine's clock (``[model] max_future``).
DEFAULT_MAX_FUTURE = 3600.0

_Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]


class Rejection(NamedTuple):
    """A message that was not decoded: its position in the input batch and why."""

    index: int
    reason: str

    @property
    def code(self) -> str:
        """The machine-readable part of the reason, e.g. ``"missing_column"``."""
        return self.reason.split(":", 1)[0]


@dataclass
class DecodedBatch:
    """The good events of a batch as arrays (in input order) and the rejected ones."""

    groups: list[str]
    W: np.ndarray
    weights: np.ndarray
    ts: np.ndarray
    retract: np.ndarray
    index: np.ndarray
    rejections: list[Rejection] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.groups)


_A = {"null": "null", "array": "an array", "object": "an object"}
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$\.(?P<key>[^`\[]*)`)?$", re.S)
_GOT = re.compile(r"got `(\w+)`")


class EventDecoder:
    """Decode batches of message values for one ModelSpec; never raises on bad input."""

    def __init__(self, spec: ModelSpec, max_message_bytes: int = 1 << 20,
                 max_future: float = DEFAULT_MAX_FUTURE) -> None:
        """A decoder for ``spec``'s events. Larger values than ``max_message_bytes`` are
        ``oversized``; event times more than ``max_future`` seconds ahead of this machine's
        clock (``math.inf``: no limit) are ``bad_ts``."""
        if not max_future > 0:
            raise ValueError(f"max_future must be a number of seconds > 0, got {max_future!r}")
        clash = [c for c in (*spec.columns, *spec.input_columns) if c in RESERVED_FIELDS]
        if clash:
            raise ValueError(
                f"column {clash[0]!r} clashes with the event field of that name "
                f"({', '.join(RESERVED_FIELDS)} are reserved); rename the column"
            )
        self.spec = spec
        self.max_message_bytes = max_message_bytes
        self.max_future = float(max_future)
        self._known_fields = frozenset((*spec.input_columns, *RESERVED_FIELDS))
        self._group_fields = frozenset(spec.grouping_columns)
        self._level_fields = frozenset(spec.categorical_inputs)
        self._to_arrays = self._arrays
        if not spec.is_simple:
            self._init_cells(spec)
            return
        # Positional attribute names keep arbitrary column names (spaces, keywords) legal.
        names = [f"c{i}" for i in range(len(spec.columns))]
        rename = dict(zip(names, spec.columns, strict=True))
        rename["group"] = spec.group
        struct = msgspec.defstruct(
            "Event",
            [
                *((n, float) for n in names),
                ("group", str | int),
                ("weight", float, 1.0),
                ("ts", float | _Timestamp | None, None),
                ("op", Literal["add", "retract"], "add"),
            ],
            rename=rename,
            gc=False,  # flat records: no reference cycles, cheaper to allocate
        )
        self._decode = msgspec.json.Decoder(struct).decode
        get_columns = attrgetter(*names)
        if len(names) == 1:
            self._columns: Callable[[Any], Any] = lambda e: (get_columns(e),)
        else:
            self._columns = get_columns
        # One getter per field: unzipping a tuple per event cost ~0.4 us/event, ten times these.
        self._get_group, self._get_weight = attrgetter("group"), attrgetter("weight")
        self._get_ts, self._get_op = attrgetter("ts"), attrgetter("op")

    def decode(self, values: Sequence[bytes | None]) -> DecodedBatch:
        """Decode a batch; malformed values become rejections (by position in ``values``)."""
        decode, limit = self._decode, self.max_message_bytes
        rejections: list[Rejection] = []
        events: list[Any] = []
        index: list[int] = []
        for i, value in enumerate(values):
            if value is None:
                rejections.append(Rejection(i, "invalid_json: no value (a tombstone)"))
                continue
            if len(value) > limit:
                rejections.append(Rejection(i, f"oversized: {len(value)} bytes > {limit}"))
                continue
            try:
                events.append(decode(value))
            except msgspec.ValidationError as exc:
                rejections.append(Rejection(i, self._reason(str(exc), value)))
                continue
            except (msgspec.DecodeError, ValueError, TypeError) as exc:
                # UnicodeDecodeError is a ValueError; TypeError: not a bytes-like object.
                rejections.append(Rejection(i, f"invalid_json: {exc}"))
                continue
            except RecursionError:
                # msgspec counts its depth against Python's recursion limit (~1000 levels, even
                # in an ignored key) and unwinds cleanly: the message is bad, not the decoder.
                rejections.append(Rejection(i, "invalid_json: nested too deeply (arrays or "
                                               "objects about 1000 levels deep)"))
                continue
            index.append(i)
        return self._to_arrays(events, index, rejections)

    def _arrays(
        self, events: list[Any], index: list[int], rejections: list[Rejection]
    ) -> DecodedBatch:
        n, d = len(events), len(self.spec.columns)
        W = np.fromiter(chain.from_iterable(map(self._columns, events)), dtype=np.float64,
                        count=n * d).reshape(n, d)
        groups = list(map(str, map(self._get_group, events)))  # str(s) is s: ids stay as sent
        weights, ts, retract = self._meta(events)
        bad: dict[int, str] = {}
        # Screen at C speed first: short non-empty ASCII ids (the usual case) are all fine.
        lengths = list(map(len, groups))
        if n and not (
            min(lengths) > 0
            and max(lengths) <= MAX_GROUP_BYTES // 4
            and all(map(str.isascii, groups))
        ):
            for j, g in enumerate(groups):
                reason = _group_problem(g)
                if reason:
                    bad[j] = reason
        _check_finite(bad, W, self.spec.columns)
        _check_overflow(bad, W, self.spec.columns)
        self._check_meta(bad, weights, ts)
        return self._batch(groups, W, weights, ts, retract, index, rejections, bad)

    # -- several grouping columns, categorical covariates -----------------------------------

    def _init_cells(self, spec: ModelSpec) -> None:
        """The decoder of a spec that is not `ModelSpec.is_simple`: events carry every grouping
        column and every categorical column; rows are cell keys and design rows."""
        self._groupings = spec.grouping_columns
        self._categoricals = spec.categorical_inputs
        self._numerics = spec.numeric_inputs
        fields = {
            **{f"g{i}": c for i, c in enumerate(self._groupings)},
            **{f"k{i}": c for i, c in enumerate(self._categoricals)},
            **{f"c{i}": c for i, c in enumerate(self._numerics)},
        }
        struct = msgspec.defstruct(
            "CellEvent",
            [
                *((n, str | int) for n in fields if n[0] in "gk"),
                *((n, float) for n in fields if n[0] == "c"),
                ("weight", float, 1.0),
                ("ts", float | _Timestamp | None, None),
                ("op", Literal["add", "retract"], "add"),
            ],
            rename=fields,
            gc=False,
        )
        self._decode = msgspec.json.Decoder(struct).decode
        names = [n for n in fields if n[0] == "c"]
        get_numbers = attrgetter(*names)
        if len(names) == 1:
            self._columns = lambda e: (get_numbers(e),)
        else:
            self._columns = get_numbers
        self._get_levels = [attrgetter(n) for n in fields if n[0] == "g"]
        self._get_categories = [attrgetter(n) for n in fields if n[0] == "k"]
        self._get_weight, self._get_ts, self._get_op = (
            attrgetter("weight"), attrgetter("ts"), attrgetter("op"))
        self._to_arrays = self._cell_arrays

    def _cell_arrays(
        self, events: list[Any], index: list[int], rejections: list[Rejection]
    ) -> DecodedBatch:
        spec, n, m = self.spec, len(events), len(self._numerics)
        numbers = np.fromiter(chain.from_iterable(map(self._columns, events)), dtype=np.float64,
                              count=n * m).reshape(n, m)
        weights, ts, retract = self._meta(events)
        bad: dict[int, str] = {}
        # grouping columns: each level checked as a group id is, then the cell key's length
        several = len(self._groupings) > 1
        levels = [list(map(str, map(get, events))) for get in self._get_levels]
        for column, values in zip(self._groupings, levels):
            if n and _plain(values, MAX_GROUP_BYTES // 4):
                continue
            for j, g in enumerate(values):
                problem = _level_problem(g)
                if problem:
                    bad.setdefault(j, f"bad_group: {column}: {problem}" if several
                                   else f"bad_group: {problem}")
        if several:
            memo: dict[tuple[str, ...], str] = {}
            key = spec.cell_key
            groups = [memo.get(c) or memo.setdefault(c, key(c)) for c in zip(*levels)]
            if n and not _plain(groups, MAX_GROUP_BYTES // 4):
                for j, g in enumerate(groups):
                    if j in bad:
                        continue
                    size = len(g.encode("utf-8"))
                    if size > MAX_GROUP_BYTES:
                        bad[j] = (f"bad_group: the levels of {', '.join(self._groupings)} make a "
                                  f"cell key of {size} UTF-8 bytes, over {MAX_GROUP_BYTES}")
        else:
            groups = levels[0] if levels else []
        # categorical columns: one of the declared levels
        codes: dict[str, np.ndarray] = {}
        for column, get in zip(self._categoricals, self._get_categories):
            values = list(map(str, map(get, events)))
            code = spec.level_codes(column, values)
            for j in np.flatnonzero(code < 0).tolist():
                bad.setdefault(j, f"unknown_level: {column} holds {values[j]!r}, not one of its "
                               f"declared levels {_levels_text(spec.levels[column])}")
            codes[column] = code
        _check_finite(bad, numbers, self._numerics)
        with np.errstate(over="ignore", invalid="ignore"):  # a product of columns may overflow
            W = spec.design_matrix(dict(zip(self._numerics, numbers.T)), codes)
        _check_overflow(bad, W, spec.columns)
        self._check_meta(bad, weights, ts)
        return self._batch(groups, W, weights, ts, retract, index, rejections, bad)

    def _meta(self, events: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(weights, ts, retract) of decoded events."""
        n = len(events)
        weights = np.fromiter(map(self._get_weight, events), dtype=np.float64, count=n)
        raw_ts = list(map(self._get_ts, events))
        ops = list(map(self._get_op, events))
        if raw_ts.count(None) == n:
            ts = np.full(n, np.nan)
        else:
            ts = np.array([_seconds(t) for t in raw_ts], dtype=np.float64)
        retract = (
            np.zeros(n, dtype=bool)
            if ops.count("add") == n
            else np.array([op == "retract" for op in ops], dtype=bool)
        )
        return weights, ts, retract

    def _check_meta(self, bad: dict[int, str], weights: np.ndarray, ts: np.ndarray) -> None:
        """Weights finite, > 0 and at most `MAX_WEIGHT`; times finite and not too far ahead."""
        for j in np.flatnonzero(~(np.isfinite(weights) & (weights > 0))).tolist():
            bad.setdefault(j, f"bad_weight: must be a finite number > 0, got {float(weights[j])!r}")
        for j in np.flatnonzero(weights > MAX_WEIGHT).tolist():
            bad.setdefault(j, f"overflow: weight is {float(weights[j]):.3g}, over "
                              f"{MAX_WEIGHT:.0e}, where a group's mass could overflow (rescale "
                              "the weights)")
        for j in np.flatnonzero(np.isinf(ts)).tolist():
            bad.setdefault(j, "bad_ts: not finite")
        now = time.time()
        for j in np.flatnonzero(ts > now + self.max_future).tolist():
            t = float(ts[j])
            bad.setdefault(j, f"bad_ts: {_iso(t)} is {t - now:.6g} s ahead of this machine's "
                              f"clock, more than max_future ({self.max_future:g} s)")

    @staticmethod
    def _batch(groups: list[str], W: np.ndarray, weights: np.ndarray, ts: np.ndarray,
               retract: np.ndarray, index: list[int], rejections: list[Rejection],
               bad: dict[int, str]) -> DecodedBatch:
        positions = np.asarray(index, dtype=np.int64)
        if bad:
            keep = np.ones(len(groups), dtype=bool)
            keep[list(bad)] = False
            rejections.extend(Rejection(int(positions[j]), r) for j, r in bad.items())
            rejections.sort()
            groups = [g for g, k in zip(groups, keep.tolist(), strict=True) if k]
            W, weights, ts, retract, positions = (
                a[keep] for a in (W, weights, ts, retract, positions)
            )
        return DecodedBatch(groups, W, weights, ts, retract, positions, rejections)

    def _reason(self, message: str, value: bytes) -> str:
        """msgspec's validation message (about ``value``) as a reason code with detail."""
        match = _AT.match(message)
        assert match is not None  # the pattern matches any text
        text, key = match["msg"], match["key"]
        got = _GOT.search(text)
        kind = got[1] if got else None
        if key is None:
            missing = re.match(r"Object missing required field `(.+)`", text)
            if missing:
                return f"missing_column: {missing[1]}{self._close_key(missing[1], value)}"
            if text.startswith("Expected `object`"):
                return f"not_an_object: got {kind}"
            return f"invalid_event: {text}"
        if key in self._group_fields:
            which = f"{key}: " if len(self._group_fields) > 1 else ""
            if kind:
                return f"bad_group: {which}expected a string or an integer, got {kind}"
            return f"bad_group: {which}{text}"
        if key in self._level_fields:
            value = _A.get(kind, f"a {kind}") if kind else text
            return (f"unknown_level: {key} holds {value}, not one of its "
                    f"declared levels {_levels_text(self.spec.levels[key])} (a level is a string "
                    "or an integer)")
        if key == "weight":
            return f"bad_weight: {text}"
        if key == "ts":
            return f"bad_ts: {text}"
        if key == "op":
            bad_op = re.search(r"Invalid enum value (.*)$", text)
            return f"unknown_op: {bad_op[1] if bad_op else f'got {kind}'}"
        if text.startswith("Number out of range"):
            return f"not_finite: {key}"
        return f"non_numeric: {key} (got {kind})" if kind else f"non_numeric: {key} ({text})"


    def _close_key(self, column: str, value: bytes) -> str:
        """" (did you mean 'x'?)" when a key of the event that the model does not read is
        close to the missing ``column``, else ""."""
        try:
            keys = msgspec.json.decode(value, type=dict[str, msgspec.Raw])
        except (msgspec.DecodeError, RecursionError):
            return ""
        return did_you_mean(column, [k for k in keys if k not in self._known_fields])


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the closest of ``choices`` to ``name`` (ignoring case),
    or "" when none is close.

    >>> did_you_mean("los", ["hospital", "LOS", "age"]), did_you_mean("los", ["sex"])
    (" (did you mean 'LOS'?)", '')
    """
    by_folded = {c.casefold(): c for c in choices}
    close = difflib.get_close_matches(name.casefold(), list(by_folded), n=1)
    return f" (did you mean {by_folded[close[0]]!r}?)" if close else ""


def _check_finite(bad: dict[int, str], numbers: np.ndarray, columns: Sequence[str]) -> None:
    """``not_finite`` for rows of ``numbers`` holding inf or NaN (a number too large to read)."""
    for j in np.flatnonzero(~np.isfinite(numbers).all(axis=1)).tolist():
        column = columns[int(np.flatnonzero(~np.isfinite(numbers[j]))[0])]
        bad.setdefault(j, f"not_finite: {column}")


def _check_overflow(bad: dict[int, str], W: np.ndarray, columns: Sequence[str]) -> None:
    """``overflow`` for design rows with a value beyond ±`MAX_VALUE` (or a product of columns
    that overflowed): one such event could make its group's co-moments infinite."""
    out = ~(np.abs(W) <= MAX_VALUE)
    for j in np.flatnonzero(out.any(axis=1)).tolist():
        k = int(np.flatnonzero(out[j])[0])
        bad.setdefault(j, f"overflow: {columns[k]} is {float(W[j, k]):.3g}, beyond "
                          f"±{MAX_VALUE:.0e}, where a group's co-moments could overflow "
                          "(rescale the column)")


def _iso(t: float) -> str:
    """``t`` (epoch seconds) as an ISO 8601 UTC time, or as a number past datetime's range."""
    try:
        return datetime.fromtimestamp(t, timezone.utc).isoformat()
    except (OverflowError, ValueError, OSError):
        return f"{t:.6g}"


def _seconds(ts: float | datetime | None) -> float:
    if ts is None:
        return math.nan
    if isinstance(ts, datetime):
        return ts.timestamp()
    return ts


def _group_problem(group: str) -> str | None:
    problem = _level_problem(group)
    return None if problem is None else f"bad_group: {problem}"


def _level_problem(group: str) -> str | None:
    if not group:
        return "empty"
    try:
        size = len(group.encode("utf-8"))
    except UnicodeEncodeError:
        return "not valid UTF-8 (a lone surrogate)"
    if size > MAX_GROUP_BYTES:
        return f"over {MAX_GROUP_BYTES} bytes ({size})"
    return None


def _plain(ids: list[str], longest: int) -> bool:
    """Every id non-empty, ASCII and at most ``longest`` characters: fine without a closer look
    (a C-speed screen for the usual case)."""
    lengths = list(map(len, ids))
    return min(lengths) > 0 and max(lengths) <= longest and all(map(str.isascii, ids))


def _levels_text(levels: Sequence[str], most: int = 20) -> str:
    shown = ", ".join(map(repr, levels[:most]))
    return shown if len(levels) <= most else f"{shown}, ... ({len(levels)} levels)"


class RejectionLog:
    """Counts rejections per reason code and logs each code at most once per ``interval``.

    >>> log = RejectionLog(interval=60.0)
    >>> log.record([Rejection(0, "bad_group: empty"), Rejection(3, "bad_group: empty")])
    >>> dict(log.counts), log.total
    ({'bad_group': 2}, 2)
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger or logging.getLogger("streamlme.events")
        self.interval = interval
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self._since_log: Counter[str] = Counter()
        self._last_log: dict[str, float] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, rejections: Iterable[Rejection], context: str = "") -> None:
        """Count ``rejections``; log a code's first one, then at most once per interval.

        ``context`` (e.g. "topic events partition 3") is added to the log line.
        """
        now = self.clock()
        for rejection in rejections:
            code = rejection.code
            self.counts[code] += 1
            self._since_log[code] += 1
            last = self._last_log.get(code)
            if last is None or now - last >= self.interval:
                self.logger.warning(
                    "rejected event%s: %s (%d %s since the last report, %d in all)",
                    f" ({context})" if context else "",
                    rejection.reason,
                    self._since_log[code],
                    code,
                    self.counts[code],
                )
                self._last_log[code] = now
                self._since_log[code] = 0
