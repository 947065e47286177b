"""A namespace's identity and health: what readers must know before they trust its statistics.

A namespace records, in ``{ns}:meta``:

- ``epoch``: a random id drawn when the namespace is created. A Redis that comes back empty
  (a restart without persistence, a FLUSHDB, a failover to an empty replica) recreates the
  namespace with a new epoch, so a model version or cached answer keyed by (epoch, version) is
  never mistaken for one of the state that was lost.
- a ``flag``, when its statistics must not be served or fitted: ``"rebuilding"`` while
  ``consume --rebuild`` replays the topic into fresh state, ``"lost"`` when a consumer found
  state missing (the consumer exits with status 3, `StateLostError`). ``reason`` says what was
  found and what to do; ``since`` when.
- the offset **gaps** a consumer accepted under ``[kafka] on_gap = "record"``: ranges of a
  partition that retention deleted before the store saw them. A model fitted from the namespace
  does not cover them.

>>> h = Health(epoch="e1", created_at=0.0, flag="rebuilding", reason="replaying", since=60.0,
...            gaps=(Gap("events", 0, 100, 250, 30.0),))
>>> h.ready, h.gaps[0].events
(False, 150)
>>> h.to_dict()["since"], h.to_dict()["gaps"][0]["to"]
('1970-01-01T00:01:00Z', 250)
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, NamedTuple

from streamlme.store.errors import StoreError

Flag = Literal["rebuilding", "lost"]
FLAGS: tuple[str, ...] = ("rebuilding", "lost")


class StateLostError(StoreError):
    """Statistics the namespace should hold are gone, or an offset gap was refused.

    Nothing was folded. The CLI prints the message and exits with `exit_code`.
    """

    exit_code = 3


class ModelKey(NamedTuple):
    """What identifies a model version across resets: the namespace's epoch and the version."""

    epoch: str | None
    version: int


def new_epoch() -> str:
    """A fresh namespace epoch: 16 random hex digits."""
    return secrets.token_hex(8)


def iso_time(seconds: float | None) -> str | None:
    """``seconds`` since the epoch as ISO 8601 UTC (``...Z``), None for None."""
    if seconds is None:
        return None
    text = datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")
    return text.replace("+00:00", "Z")


@dataclass(frozen=True)
class Gap:
    """Offsets ``start`` up to (not including) ``end`` of a partition that the statistics lack."""

    topic: str
    partition: int
    start: int
    end: int
    recorded_at: float

    @property
    def events(self) -> int:
        """Offsets in the gap (an upper bound of the events lost: markers take offsets too)."""
        return self.end - self.start

    @property
    def field(self) -> str:
        """The gap's field in the namespace's gaps hash: ``topic:partition:start``."""
        return f"{self.topic}:{self.partition}:{self.start}"

    def to_json(self) -> str:
        return json.dumps({"topic": self.topic, "partition": self.partition, "from": self.start,
                           "to": self.end, "recorded_at": self.recorded_at})

    @classmethod
    def from_json(cls, text: str | bytes) -> Gap:
        g = json.loads(text)
        return cls(g["topic"], int(g["partition"]), int(g["from"]), int(g["to"]),
                   float(g["recorded_at"]))

    def to_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "from": self.start,
                "to": self.end, "events": self.events,
                "recorded_at": iso_time(self.recorded_at)}


@dataclass(frozen=True)
class Health:
    """What a reader needs to know of a namespace (`StateStore.health`)."""

    epoch: str | None
    created_at: float | None
    flag: str | None = None
    reason: str = ""
    since: float | None = None
    gaps: tuple[Gap, ...] = ()

    @property
    def ready(self) -> bool:
        """True unless the namespace is flagged: its statistics may be served and fitted."""
        return self.flag is None

    @property
    def complete(self) -> bool:
        """True when no offset gap was accepted: a model fitted now covers every event."""
        return not self.gaps

    def to_dict(self) -> dict[str, Any]:
        """JSON form, times in ISO 8601 (what ``/v1/status`` and ``model --json`` show)."""
        return {"epoch": self.epoch, "created_at": iso_time(self.created_at),
                "flag": self.flag, "reason": self.reason or None, "since": iso_time(self.since),
                "gaps": [g.to_dict() for g in self.gaps]}


def check_flag(flag: str) -> str:
    if flag not in FLAGS:
        raise StoreError(f"unknown namespace flag {flag!r}; expected one of {', '.join(FLAGS)}")
    return flag
