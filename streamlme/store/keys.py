"""Redis key names of one namespace, and the encoding that keeps group ids out of key syntax.

A namespace ``ns`` has two kinds of keys (see `streamlme.store.redis` for the whole layout):

- the namespace's own, under the hash tag ``{ns}``: its meta (shard count, layout), model
  records, the refresh lease and fence, consumer status;
- each shard's, under ``{ns:s<i>}``: the shard's statistics, its index of cells by level, its
  per-partition offsets and its meta. One script call may touch one shard's keys (one tag is one
  Redis Cluster slot).

Group ids are arbitrary strings; they are percent-encoded (every byte of their UTF-8 form outside
``[A-Za-z0-9_.~-]`` becomes ``%XX``), which is injective, leaves ordinary ids readable in
``redis-cli`` and can never produce ``{``, ``}`` or ``:``.

>>> encode_group("A17"), encode_group("ward 3/{icu}:é")
('A17', 'ward%203%2F%7Bicu%7D%3A%C3%A9')
>>> decode_group(encode_group("ward 3/{icu}:é"))
'ward 3/{icu}:é'
>>> Keys("hospital_los").shard(17).stats, Keys("hospital_los").meta
('{hospital_los:s17}:stats', '{hospital_los}:meta')
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote_from_bytes, unquote

#: Longest group id, in UTF-8 bytes (the event decoder dead-letters longer ones).
MAX_GROUP_BYTES = 256


class KeyNameError(ValueError):
    """A namespace or group id that cannot name a key."""


def encode_group(group: str) -> str:
    """Percent-encode a group id for use inside a key name."""
    raw = group.encode("utf-8")
    if len(raw) > MAX_GROUP_BYTES:
        raise KeyNameError(
            f"group id {group[:40]!r}... has {len(raw)} UTF-8 bytes, more than {MAX_GROUP_BYTES}"
        )
    return quote_from_bytes(raw, safe="")


def decode_group(encoded: str | bytes) -> str:
    """Inverse of `encode_group`."""
    if isinstance(encoded, bytes):
        encoded = encoded.decode("ascii")
    return unquote(encoded, errors="strict")


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` if it can be a hash tag; raise KeyNameError saying why not."""
    if not isinstance(namespace, str) or not namespace:
        raise KeyNameError(f"namespace must be a non-empty string, got {namespace!r}")
    bad = sorted({c for c in namespace if c in "{}" or not c.isprintable() or c.isspace()})
    if bad:
        raise KeyNameError(
            f"namespace {namespace!r} contains {bad}; use letters, digits and punctuation "
            "other than braces (it becomes the Redis Cluster hash tag {namespace})"
        )
    return namespace


@dataclass(frozen=True)
class ShardKeys:
    """The key names of one shard of a namespace: all under the tag ``{ns:s<i>}``."""

    tag: str

    @property
    def stats(self) -> str:
        """Hash: encoded cell id -> the cell's statistics (`streamlme.stats` byte record)."""
        return f"{self.tag}:stats"

    @property
    def levels(self) -> str:
        """Index of cells by level: members ``<position>:<encoded level>:<encoded cell id>``."""
        return f"{self.tag}:levels"

    @property
    def offsets(self) -> str:
        """Hash: ``<topic>:<partition>`` -> next offset to read, as this shard has applied."""
        return f"{self.tag}:offsets"

    @property
    def meta(self) -> str:
        """Hash: ``d``, ``format``, ``columns``, ``version`` (bumped by each merge)."""
        return f"{self.tag}:meta"

    @property
    def dead(self) -> str:
        """Hash: ``topic:partition:offset`` -> a dead-letter record a merge refused and kept,
        until the consumer has sent it (`streamlme.stream.consumer`)."""
        return f"{self.tag}:dead"

    @property
    def all(self) -> tuple[str, str, str, str]:
        """The keys a merge script touches, in its KEYS order."""
        return self.meta, self.stats, self.offsets, self.levels


@dataclass(frozen=True)
class Keys:
    """The key names of one namespace (see the module docstring of `streamlme.store.redis`)."""

    namespace: str

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)

    @property
    def tag(self) -> str:
        return "{" + self.namespace + "}"

    def shard(self, shard: int) -> ShardKeys:
        return ShardKeys("{" + f"{self.namespace}:s{int(shard)}" + "}")

    @staticmethod
    def level_range(position: int, level: str) -> tuple[str, str]:
        """ZRANGEBYLEX bounds of the index members of one level of grouping column
        ``position`` (an encoded level never holds ``:``, and ``;`` follows ``:``)."""
        head = f"{int(position)}:{encode_group(level)}"
        return f"[{head}:", f"({head};"

    @property
    def meta(self) -> str:
        """Hash: ``layout`` (2, sharded), ``shards``, ``created_at``, ``epoch``, and ``flag``,
        ``reason``, ``since`` while flagged (`streamlme.store.health`)."""
        return f"{self.tag}:meta"

    @property
    def gaps(self) -> str:
        """Hash: ``<topic>:<partition>:<from>`` -> an accepted offset gap (`store.health.Gap`)."""
        return f"{self.tag}:gaps"

    @property
    def models(self) -> str:
        return f"{self.tag}:models"

    @property
    def model_seq(self) -> str:
        return f"{self.tag}:model:seq"

    @property
    def model_current(self) -> str:
        return f"{self.tag}:model:current"

    @property
    def model_fence(self) -> str:
        return f"{self.tag}:model:fence"

    @property
    def lease(self) -> str:
        return f"{self.tag}:lease"

    @property
    def lease_seq(self) -> str:
        return f"{self.tag}:lease:seq"

    @property
    def consumers(self) -> str:
        """Zset: encoded consumer id -> time of its last status."""
        return f"{self.tag}:consumers"

    def consumer(self, consumer: str) -> str:
        """Hash: one consumer's status record (expires)."""
        return f"{self.tag}:consumers:{encode_group(consumer)}"

    @property
    def ingest(self) -> str:
        """Hash: all-time ingest totals of every consumer."""
        return f"{self.tag}:ingest"

    # The one-slot layout of streamlme 0.1 (every key under {ns}), read only to migrate it.
    @property
    def legacy_groups(self) -> str:
        return f"{self.tag}:groups"

    @property
    def legacy_group_prefix(self) -> str:
        return f"{self.tag}:g:"

    @property
    def legacy_offsets(self) -> str:
        return f"{self.tag}:offsets"

    @property
    def legacy_levels(self) -> str:
        return f"{self.tag}:levels"


def offset_field(topic: str, partition: int) -> str:
    """Field of the offsets hash: ``topic:partition`` (split at the last colon)."""
    return f"{topic}:{int(partition)}"


def parse_offset_field(field: str | bytes) -> tuple[str, int]:
    if isinstance(field, bytes):
        field = field.decode("utf-8")
    topic, _, partition = field.rpartition(":")
    return topic, int(partition)
