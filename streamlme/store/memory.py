"""MemoryStore: the embedded `StateStore`, in-process, with atomic snapshots to a file.

It keeps one `GroupStats` and a dict of offsets behind a lock (the API server may read while
the consumer writes) and gives the same guarantees as `RedisStore`: a batch applies only if
every partition continues where its recorded offset ends, additions are merged before
retractions, and retractions that would overdraw a group are refused per group.

>>> import numpy as np
>>> from streamlme.store.base import OffsetRange
>>> store = MemoryStore()
>>> batch = GroupStats.from_rows(["a", "b", "a"], np.array([[1.0, 2.0], [3.0, 1.0], [2.0, 4.0]]))
>>> store.merge(batch, offsets={("events", 0): OffsetRange(0, 3)}).applied
True
>>> replay = store.merge(batch, offsets={("events", 0): OffsetRange(0, 3)})  # changes nothing
>>> replay.applied, replay.conflicts
(False, {('events', 0): 3})
>>> store.get("a").n.tolist(), store.offsets("events")
([2.0], {0: 3})

Cells of a model with several grouping columns are keyed by the JSON array of their levels
(`streamlme.spec.ModelSpec.cell_key`); the store indexes such keys by (column position, level)
as they first arrive, so `cells_of` answers which cells carry a level (see `streamlme.store.base`):

>>> cells = GroupStats.from_rows(['["A","a"]', '["A","b"]', '["B","a"]'], np.ones((3, 2)))
>>> _ = store.merge(cells)
>>> store.cells_of(0, "A"), store.cells_of(1, "a")
(['["A","a"]', '["A","b"]'], ['["A","a"]', '["B","a"]'])

`snapshot` writes every group, offset and model version to one ``.npz`` file (a temporary file
renamed over the old one, so a crash mid-write leaves the previous snapshot intact), and
``MemoryStore(snapshot=path)`` starts from it.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from streamlme.stats import GroupStats, unpack_many
from streamlme.store.base import (
    MergeResult,
    ModelWriteRefusedError,
    OffsetRange,
    ShardBatch,
    Step,
    TopicPartition,
    cell_levels,
)
from streamlme.store.errors import StaleFenceError, StoreError
from streamlme.store.health import Gap, Health, ModelKey, check_flag, new_epoch
from streamlme.store.policy import MODEL_HISTORY, OVERDRAW_RTOL

#: Version of the snapshot file layout (not of the statistics records inside it).
SNAPSHOT_VERSION = 1


class MemoryStore:
    """The `StateStore` in this process.

    Parameters
    ----------
    snapshot
        A file written by `snapshot` to start from; a missing file starts empty.
    d
        Number of statistics columns, if known (else set by the first merge).
    columns
        Column names, recorded and checked like `RedisStore` does.
    model_history
        How many model versions to keep.
    """

    def __init__(
        self,
        snapshot: str | os.PathLike[str] | None = None,
        d: int | None = None,
        columns: Sequence[str] | None = None,
        model_history: int = MODEL_HISTORY,
    ) -> None:
        if model_history < 1:
            raise StoreError(f"model_history must be at least 1, got {model_history}")
        self._lock = threading.RLock()
        self.columns = tuple(columns) if columns is not None else None
        if self.columns is not None and d is not None and len(self.columns) != d:
            raise StoreError(f"{len(self.columns)} columns given for statistics of width d={d}")
        self._d = d if d is not None else (len(self.columns) if self.columns else None)
        self.model_history = model_history
        self._stats: GroupStats | None = None
        # (grouping column position, level) -> keys of the cells carrying it, in arrival order
        self._cells: dict[tuple[int, str], list[str]] = {}
        self._offsets: dict[TopicPartition, int] = {}
        self._models: dict[int, bytes] = {}
        self._model_seq = 0
        self._model_current: int | None = None
        self._fence: int | None = None
        # the pinned model: (epoch, version, since); a cleared namespace's new epoch lapses it
        self._pin: tuple[str, int, float] | None = None
        # the refresh leader's lease: (owner, token, monotonic expiry); never snapshotted, as
        # a lease belongs to a running process
        self._lease: tuple[str, int, float] | None = None
        self._lease_seq = 0
        self._version = 0  # bumped by every merge that changes the statistics
        # identity and health (streamlme.store.health), snapshotted with the state
        self._epoch = new_epoch()
        self._created_at = time.time()
        self._flag: tuple[str, str, float] | None = None
        self._gaps: dict[str, Gap] = {}
        # dead letters of refused retraction steps, kept until the consumer sent them
        self._dead: dict[str, bytes] = {}
        # consumer status: records (with their expiry) and all-time totals, never snapshotted
        self._status: dict[str, tuple[float, dict[str, str]]] = {}
        self._totals: dict[str, int] = {}
        if snapshot is not None and Path(snapshot).exists():
            self._restore(Path(snapshot))

    @classmethod
    def load(cls, path: str | os.PathLike[str], **kwargs: object) -> MemoryStore:
        """A store holding what the snapshot at ``path`` holds (FileNotFoundError if none)."""
        if not Path(path).exists():
            raise FileNotFoundError(f"no MemoryStore snapshot at {path}")
        return cls(snapshot=path, **kwargs)  # type: ignore[arg-type]

    @property
    def d(self) -> int | None:
        return self._d

    def __repr__(self) -> str:
        return f"MemoryStore(d={self._d}, groups={self.n_groups()})"

    # -- shards: one, as everything is in this process and a lock makes a merge atomic -----

    n_shards = 1

    def shard_of(self, key: str) -> int:
        return 0

    def merge_shards(self, parts: Mapping[int, ShardBatch], half_life: float | None = None
                     ) -> dict[int, MergeResult]:
        """`merge` of shard 0's part (the only shard)."""
        if set(parts) - {0}:
            raise StoreError(f"MemoryStore has one shard, 0; got parts for {sorted(parts)}")
        if not parts:
            return {}
        return {0: self._merge(parts[0], half_life)}

    def shard_offsets(self, topic: str) -> dict[int, dict[int, int]]:
        recorded = self.offsets(topic)
        return {0: recorded} if recorded else {}

    def read_shard(self, shard: int) -> GroupStats:
        if shard != 0:
            raise StoreError(f"MemoryStore has one shard, 0; not {shard}")
        with self._lock:
            return self._stats.copy() if self._stats is not None \
                else GroupStats.empty(self._d or 0)

    def shard_versions(self) -> list[int]:
        with self._lock:
            return [self._version]

    # -- merge ------------------------------------------------------------------------------

    def merge(
        self,
        adds: GroupStats,
        retracts: GroupStats | None = None,
        offsets: Mapping[TopicPartition, OffsetRange] | None = None,
        half_life: float | None = None,
    ) -> MergeResult:
        """Fold ``adds`` in, then take ``retracts`` out, and record ``offsets``; all or nothing.

        A partition without a record may start anywhere (this call records starts)."""
        return self._merge(ShardBatch(adds, retracts, dict(offsets or {}), starts=True),
                           half_life)

    def _merge(self, part: ShardBatch, half_life: float | None) -> MergeResult:
        """One shard's part, exactly as merge.lua applies it (see the script's header)."""
        retracts = part.retracts if part.retracts is not None and len(part.retracts) else None
        offsets = dict(part.offsets)
        for (topic, partition), rng in offsets.items():
            if rng.end < rng.start:
                raise StoreError(f"offset range of {topic}:{partition} ends before it starts")
        if half_life is not None and not (half_life > 0 and half_life != float("inf")):
            raise StoreError(f"half_life must be a positive finite number, got {half_life}")
        with self._lock:
            width = self._check_width(part.adds, retracts, part.steps)
            conflicts = {
                tp: self._offsets[tp]
                for tp, rng in offsets.items()
                if tp in self._offsets and self._offsets[tp] != rng.start
            }
            if conflicts:
                return MergeResult(applied=False, conflicts=conflicts)
            missing = [tp for tp in offsets if tp not in self._offsets]
            if missing and not part.starts:
                return MergeResult(applied=False, missing=missing)
            work, order = _Work(self._stats, part), []
            if len(part.adds):
                work.add(part.adds, half_life)
                order += part.adds.keys
            overdrawn = [k for k in (retracts.keys if retracts is not None else ())
                         if not work.retract(retracts.select([k]), order)]
            refused: list[int] = []
            dead: dict[str, bytes] = {}
            for i, step in enumerate(part.steps):
                if not step.retract:
                    work.add(step.stats, half_life)
                    order.append(step.key)
                elif not work.retract(step.stats, order):
                    refused.append(i)
                    if step.dead:
                        dead[step.dead_field] = step.dead
            bad = work.first_nonfinite(order)
            if bad is not None:
                return MergeResult(applied=False, nonfinite=bad)
            if width is not None:
                self._d = width
                self._version += 1
            self._commit(work)
            self._dead.update(dead)
            for tp, rng in offsets.items():
                self._offsets[tp] = rng.end
            return MergeResult(applied=True, overdrawn=overdrawn, refused_steps=refused)

    def _commit(self, work: _Work) -> None:
        """Write the worked rows back (new cells appended, and indexed)."""
        stats = work.stats
        if stats is None or not len(stats):
            return
        if self._stats is None:
            self._stats = stats
            self._index_cells(stats.keys)
            return
        new = [k for k in stats.keys if k not in self._stats]
        if new:
            d = stats.d
            self._stats.merge(GroupStats(new, np.zeros(len(new)), np.zeros((len(new), d)),
                                         np.zeros((len(new), d, d)), np.full(len(new), np.nan)))
            self._index_cells(new)
        idx = np.array([self._stats.index(k) for k in stats.keys], dtype=np.intp)
        self._stats.n[idx], self._stats.mean[idx] = stats.n, stats.mean
        self._stats.C[idx], self._stats.t[idx] = stats.C, stats.t

    def _check_width(self, adds: GroupStats, retracts: GroupStats | None,
                     steps: Sequence[Step] = ()) -> int | None:
        widths = {s.d for s in (adds, retracts) if s is not None and len(s)}
        widths |= {step.stats.d for step in steps}
        if len(widths) > 1:
            raise StoreError(f"adds and retracts differ in width: {sorted(widths)}")
        width = widths.pop() if widths else None
        if width is not None and self._d is not None and width != self._d:
            raise StoreError(f"batch has {width} columns; this store holds {self._d}")
        return width

    def _index_cells(self, keys: Sequence[str]) -> None:
        for key in keys:
            for position, level in enumerate(cell_levels(key)):
                self._cells.setdefault((position, level), []).append(key)

    # -- dead letters the merge kept (refused retraction steps) ------------------------------

    def dead_letters(self) -> dict[int, dict[str, bytes]]:
        with self._lock:
            return {0: dict(self._dead)} if self._dead else {}

    def delete_dead_letters(self, shard: int, fields: Sequence[str]) -> None:
        with self._lock:
            for f in fields:
                self._dead.pop(f, None)

    # -- reads ------------------------------------------------------------------------------

    def offsets(self, topic: str) -> dict[int, int]:
        with self._lock:
            return {p: off for (t, p), off in self._offsets.items() if t == topic}

    def get(self, group: str) -> GroupStats | None:
        with self._lock:
            if self._stats is None or group not in self._stats:
                return None
            return self._stats.select([group])

    def get_many(self, groups: Sequence[str]) -> GroupStats:
        with self._lock:
            if self._stats is None:
                return GroupStats.empty(self._d or 0)
            return self._stats.select([g for g in dict.fromkeys(groups) if g in self._stats])

    def ping(self) -> bool:
        return True

    def scan(self, chunk: int = 10_000) -> Iterator[GroupStats]:
        """Every group once, ``chunk`` at a time, in the order they were first seen.

        Groups only ever get appended, so groups added while a scan runs may or may not be
        seen, and none is seen twice.
        """
        if chunk < 1:
            raise StoreError(f"chunk must be at least 1, got {chunk}")
        start = 0
        while True:
            with self._lock:
                if self._stats is None or start >= len(self._stats):
                    return
                part = self._stats.select(self._stats.keys[start : start + chunk])
            start += len(part)
            yield part

    def cells_of(self, position: int, level: str) -> list[str]:
        """Keys of the cells whose grouping column ``position`` holds ``level`` (cells keyed by
        a JSON array of levels; see `streamlme.store.base`), in the order they arrived."""
        with self._lock:
            return list(self._cells.get((int(position), level), ()))

    def n_groups(self) -> int:
        with self._lock:
            return 0 if self._stats is None else len(self._stats)

    def clear(self) -> None:
        with self._lock:
            self._stats = None
            self._cells.clear()
            self._offsets.clear()
            self._status.clear()
            self._totals.clear()
            self._models.clear()
            self._model_seq = 0
            self._model_current = None
            self._fence = None
            self._lease, self._lease_seq = None, 0
            self._d = None if self.columns is None else len(self.columns)
            self._epoch, self._created_at = new_epoch(), time.time()
            self._flag = None
            self._gaps.clear()

    # -- identity and health (see streamlme.store.health) -----------------------------------

    def epoch(self) -> str | None:
        return self._epoch

    def health(self) -> Health:
        with self._lock:
            flag, reason, since = self._flag or (None, "", None)
            gaps = sorted(self._gaps.values(), key=lambda g: (g.topic, g.partition, g.start))
            return Health(self._epoch, self._created_at, flag, reason, since, tuple(gaps))

    def set_flag(self, flag: str, reason: str) -> None:
        with self._lock:
            self._flag = (check_flag(flag), reason, time.time())

    def clear_flag(self) -> None:
        with self._lock:
            self._flag = None

    def record_gap(self, gap: Gap) -> None:
        with self._lock:
            self._gaps[gap.field] = gap

    def shard_presence(self) -> list[tuple[bool, bool]]:
        with self._lock:
            return [(self._stats is not None and len(self._stats) > 0, bool(self._offsets))]

    def clear_statistics(self) -> None:
        """Drop statistics, index, offsets and gaps; keep epoch, flag and models."""
        with self._lock:
            self._stats = None
            self._cells.clear()
            self._offsets.clear()
            self._gaps.clear()
            self._version += 1
            self._d = None if self.columns is None else len(self.columns)

    def model_key(self) -> ModelKey | None:
        with self._lock:
            current = self._model_current
            return None if current is None else ModelKey(self._epoch, current)

    def values_and_model_key(self, groups: Sequence[str]
                             ) -> tuple[list[bytes | None], ModelKey | None]:
        """The byte records of ``groups`` (None where unseen) and the current `ModelKey`."""
        with self._lock:
            stats = self._stats
            values = [stats.to_bytes_one(stats.index(g)) if stats is not None and g in stats
                      else None for g in groups]
            return values, self.model_key()

    # -- consumer status (see streamlme.status) ----------------------------------------------

    def write_status(self, consumer: str, record: Mapping[str, str | int | float], ttl: float,
                     totals: Mapping[str, int]) -> None:
        with self._lock:
            now = float(record.get("updated_at", time.time()))
            self._status[consumer] = (now + ttl, {k: str(v) for k, v in record.items()})
            for name, n in totals.items():
                self._totals[name] = self._totals.get(name, 0) + int(n)

    def read_status(self, since: float) -> tuple[dict[str, dict[str, str]], dict[str, int]]:
        with self._lock:
            now = time.time()
            live = {c: dict(r) for c, (expires, r) in self._status.items()
                    if expires >= now and float(r.get("updated_at", 0.0)) >= since}
            return live, dict(self._totals)

    # -- models -----------------------------------------------------------------------------

    def put_model(self, record: bytes | str, fence: int | None = None,
                  keep: int | None = None) -> int:
        """Store a model record as a new version and make it current (see RedisStore)."""
        data = record.encode("utf-8") if isinstance(record, str) else bytes(record)
        keep = self.model_history if keep is None else keep
        if keep < 1:
            raise StoreError(f"keep must be at least 1, got {keep}")
        with self._lock:
            if fence is not None:
                held = self._live_lease()
                if held is None or held[1] != fence:
                    why = (f"the lease is held with token {held[1]}" if held is not None
                           else "the lease expired or was released")
                    raise StaleFenceError(f"token {fence} is not the lease: {why}")
                if self._fence is not None and self._fence > fence:
                    raise StaleFenceError(f"token {fence} is older than {self._fence}")
                self._fence = int(fence)
            self._model_seq += 1
            version = self._model_seq
            self._models[version] = data
            self._model_current = version
            for old in sorted(self._models)[: max(0, len(self._models) - keep)]:
                del self._models[old]
            return version

    def get_model(self, version: int | None = None) -> bytes | None:
        with self._lock:
            version = self._model_current if version is None else version
            return None if version is None else self._models.get(int(version))

    def model_versions(self) -> list[int]:
        with self._lock:
            return sorted(self._models)

    def current_model_version(self) -> int | None:
        with self._lock:
            return self._model_current

    def set_current(self, version: int) -> None:
        with self._lock:
            if int(version) not in self._models:
                raise StoreError(f"model version {version} is not stored")
            self._model_current = int(version)

    # -- pinned model (`streamlme model --rollback V` / `--unpin`) ---------------------------

    def pin_model(self, version: int) -> None:
        """Make stored ``version`` current and pin it (see `RedisStore.pin_model`)."""
        with self._lock:
            self.set_current(version)
            self._pin = (self._epoch, int(version), time.time())

    def unpin_model(self) -> int | None:
        with self._lock:
            version = self.pinned_model()
            self._pin = None
            return version

    def pinned_model(self) -> int | None:
        return None if (pin := self.model_pin()) is None else pin[0]

    def model_pin(self) -> tuple[int, float] | None:
        with self._lock:
            if self._pin is None or self._pin[0] != self._epoch:
                return None
            return self._pin[1], self._pin[2]

    def put_model_checked(self, record: bytes | str, epoch: str | None,
                          fence: int | None = None, keep: int | None = None) -> int:
        """`put_model` unless pinned, flagged or of another epoch (`ModelWriteRefusedError`)."""
        with self._lock:
            if (pinned := self.pinned_model()) is not None:
                raise ModelWriteRefusedError("pinned", f"version {pinned} is pinned")
            if self._flag is not None:
                raise ModelWriteRefusedError("flagged", f"the namespace is flagged {self._flag[0]}")
            if epoch != self._epoch:
                raise ModelWriteRefusedError("epoch", f"the namespace epoch is {self._epoch}, not "
                                                 f"{epoch} (it was reset)")
            return self.put_model(record, fence=fence, keep=keep)

    # -- the refresh leader's lease (see streamlme.lease) -------------------------------------

    def _live_lease(self) -> tuple[str, int, float] | None:
        if self._lease is not None and self._lease[2] <= time.monotonic():
            self._lease = None
        return self._lease

    def acquire_lease(self, owner: str, ttl: float) -> int | None:
        """Take the lease for ``ttl`` seconds if it is free (or already ``owner``'s): its token."""
        expires = time.monotonic() + _positive_ttl(ttl)
        with self._lock:
            held = self._live_lease()
            if held is not None:
                if held[0] != owner:
                    return None
                token = held[1]
            else:
                # never below a token a put has shown (e.g. one restored from a snapshot)
                token = self._lease_seq = max(self._lease_seq, self._fence or 0) + 1
            self._lease = (owner, token, expires)
            return token

    def renew_lease(self, owner: str, token: int, ttl: float) -> bool:
        expires = time.monotonic() + _positive_ttl(ttl)
        with self._lock:
            held = self._live_lease()
            if held is None or held[:2] != (owner, token):
                return False
            self._lease = (owner, token, expires)
            return True

    def release_lease(self, owner: str, token: int) -> bool:
        with self._lock:
            held = self._live_lease()
            if held is None or held[:2] != (owner, token):
                return False
            self._lease = None
            return True

    def lease_holder(self) -> tuple[str, int, float] | None:
        with self._lock:
            held = self._live_lease()
            return None if held is None else (held[0], held[1], held[2] - time.monotonic())

    # -- snapshots --------------------------------------------------------------------------

    def snapshot(self, path: str | os.PathLike[str]) -> Path:
        """Write everything to ``path`` atomically (temporary file, fsync, rename)."""
        path = Path(path)
        with self._lock:
            arrays = self._arrays()
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buffer.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    save = snapshot  # the name streamlme.stream.app uses

    def _arrays(self) -> dict[str, np.ndarray]:
        stats = self._stats
        keys = stats.keys if stats is not None else []
        records = b"".join(stats.to_bytes()) if stats is not None and len(stats) else b""
        topics = [t for t, _ in self._offsets]
        versions = sorted(self._models)
        header = {
            "version": SNAPSHOT_VERSION,
            "d": self._d,
            "columns": list(self.columns) if self.columns is not None else None,
            "model_seq": self._model_seq,
            "model_current": self._model_current,
            "fence": self._fence,
            "epoch": self._epoch,
            "created_at": self._created_at,
            "flag": list(self._flag) if self._flag else None,
            "gaps": [g.to_json() for g in self._gaps.values()],
        }
        return {
            "header": _blob(json.dumps(header).encode()),
            **_strings("keys", keys),
            "records": _blob(records),
            "record_count": np.array([len(keys)], dtype=np.int64),
            **_strings("topics", topics),
            "partitions": np.array([p for _, p in self._offsets], dtype=np.int64),
            "offsets": np.array(list(self._offsets.values()), dtype=np.int64),
            "model_versions": np.array(versions, dtype=np.int64),
            **_strings("models", [self._models[v] for v in versions]),
        }

    def _restore(self, path: Path) -> None:
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(z["header"].tobytes())
                if header.get("version") != SNAPSHOT_VERSION:
                    raise StoreError(
                        f"{path} is snapshot version {header.get('version')}; this build reads "
                        f"{SNAPSHOT_VERSION}"
                    )
                keys = [k.decode("utf-8") for k in _unstrings(z, "keys")]
                records = z["records"].tobytes()
                topics = [t.decode("utf-8") for t in _unstrings(z, "topics")]
                partitions, offsets = z["partitions"].tolist(), z["offsets"].tolist()
                versions = z["model_versions"].tolist()
                models = _unstrings(z, "models")
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise StoreError(f"{path} is not a readable MemoryStore snapshot ({e}); restore it "
                             "from a backup or move it away to start empty") from e
        snap_cols = header.get("columns")
        if self.columns is not None and snap_cols is not None and list(self.columns) != snap_cols:
            raise StoreError(f"{path} holds columns {snap_cols}, not {list(self.columns)}")
        d = header.get("d")
        if self._d is not None and d is not None and d != self._d:
            raise StoreError(f"{path} holds statistics of {d} columns, not {self._d}")
        if keys:
            size = len(records) // len(keys)
            n, t, m, C = unpack_many([records[i * size : (i + 1) * size]
                                      for i in range(len(keys))])
            self._stats = GroupStats(keys, n, m, C, t)
            self._index_cells(keys)
        self._d = d if d is not None else self._d
        if self.columns is None and snap_cols is not None:
            self.columns = tuple(snap_cols)
        self._offsets = dict(zip(zip(topics, partitions, strict=True), offsets, strict=True))
        self._models = dict(zip(versions, models, strict=True))
        self._model_seq = header.get("model_seq", 0)
        self._model_current = header.get("model_current")
        self._fence = header.get("fence")
        self._epoch = header.get("epoch") or self._epoch
        self._created_at = header.get("created_at") or self._created_at
        flag = header.get("flag")
        self._flag = (str(flag[0]), str(flag[1]), float(flag[2])) if flag else None
        self._gaps = {g.field: g for g in map(Gap.from_json, header.get("gaps") or ())}


class _Work:
    """Copies of the rows a merge touches, so that a refused merge (a non-finite result)
    changes nothing; retractions computed as merge.lua computes them, operation for operation."""

    def __init__(self, stats: GroupStats | None, part: ShardBatch) -> None:
        keys = dict.fromkeys([*part.adds.keys,
                              *(part.retracts.keys if part.retracts is not None else ()),
                              *(step.key for step in part.steps)])
        have = [k for k in keys if stats is not None and k in stats]
        self.stats: GroupStats | None = stats.select(have) if have else None

    def add(self, adds: GroupStats, half_life: float | None) -> None:
        if self.stats is None:
            # exactly what merging into zeros gives: m_b * (n_b / n_b) is m_b
            self.stats = adds.copy()
        else:
            with np.errstate(over="ignore", invalid="ignore"):  # refused after, if not finite
                self.stats.merge(adds, half_life=half_life)

    def retract(self, b: GroupStats, order: list[str]) -> bool:
        """Take the one group of ``b`` out; False (nothing changed) if that overdraws it."""
        key, stats = b.keys[0], self.stats
        if stats is None or key not in stats:
            return False
        i = stats.index(key)
        out = _retract_one(stats, i, b)
        if out is None:
            return False
        stats.n[i], stats.mean[i], stats.C[i] = out
        order.append(key)
        return True

    def first_nonfinite(self, order: Sequence[str]) -> str | None:
        stats = self.stats
        for key in dict.fromkeys(order):
            i = stats.index(key)
            if not (np.isfinite(stats.n[i]) and np.isfinite(stats.mean[i]).all()
                    and np.isfinite(stats.C[i]).all()):
                return key
        return None


def _retract_one(stats: GroupStats, i: int, b: GroupStats
                 ) -> tuple[float, np.ndarray, np.ndarray] | None:
    """merge.lua's ``retract`` of b's one group from row i, in Python floats (the same IEEE
    operations in the same order, so the same bits), or None when refused as overdrawn."""
    d = stats.d
    n, n_b = float(stats.n[i]), float(b.n[0])
    if n - n_b < -OVERDRAW_RTOL * n:
        return None
    if n - n_b <= 1e-12 * max(n, 1.0):
        return 0.0, np.zeros(d), np.zeros((d, d))
    m, mb = stats.mean[i].tolist(), b.mean[0].tolist()
    C, Cb = stats.C[i], b.C[0]
    n_a = n - n_b
    r = n_b / n_a
    m_a = [m[j] + r * (m[j] - mb[j]) for j in range(d)]
    delta = [mb[j] - m_a[j] for j in range(d)]
    w = n_a * n_b / n
    out = np.zeros((d, d))
    for row in range(d):
        wd = w * delta[row]
        for col in range(row, d):
            value = float(C[row, col]) + -float(Cb[row, col]) + -(wd * delta[col])
            out[row, col] = out[col, row] = value
    for j in range(d):
        wd = w * delta[j]
        scale = float(C[j, j]) + float(Cb[j, j]) + abs(wd) * (abs(delta[j]) + abs(m[j])
                                                              + abs(mb[j]))
        if out[j, j] < -OVERDRAW_RTOL * scale:
            return None
    return n_a, np.array(m_a), out


def _positive_ttl(seconds: float) -> float:
    if not seconds > 0:
        raise StoreError(f"a lease needs a positive ttl, got {seconds}")
    return float(seconds)


def _blob(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def _strings(name: str, items: Sequence[str | bytes]) -> dict[str, np.ndarray]:
    """Variable-length strings as one byte blob plus lengths (no pickling, no fixed width)."""
    raw = [s.encode("utf-8") if isinstance(s, str) else s for s in items]
    return {
        f"{name}_blob": _blob(b"".join(raw)),
        f"{name}_len": np.array([len(s) for s in raw], dtype=np.int64),
    }


def _unstrings(z: Mapping[str, np.ndarray], name: str) -> list[bytes]:
    blob = z[f"{name}_blob"].tobytes()
    ends = np.cumsum(z[f"{name}_len"]).tolist()
    return [blob[a:b] for a, b in zip([0, *ends][:-1], ends, strict=True)]
