"""Configuration: one TOML file plus ``STREAMLME_<SECTION>_<KEY>`` environment overrides.

::

    [model]                      # required: the ModelSpec, plus optional forgetting
    response = "los"
    fixed = ["1", "age", "severity"]
    random = ["1", "age"]
    group = "hospital"
    covariance = "unstructured"  # or "diagonal"
    method = "REML"              # or "ML", "EM"
    half_life = "7d"             # optional exponential forgetting

    [kafka]                      # optional: without it, events are JSON lines from a file/stdin
    bootstrap_servers = "127.0.0.1:9092"
    topic = "events"
    group_id = "streamlme"
    dead_letter_topic = "events.dlq"   # default: "<topic>.dlq"
    security_protocol = "SASL_SSL"     # SASL/TLS keys are kafka-python's own names
    sasl_mechanism = "SCRAM-SHA-512"
    [kafka.client]               # any other kafka-python client setting, checked by name
    request_timeout_ms = 30000

    [redis]                      # optional: without it, the in-process MemoryStore
    url = "rediss://:secret@redis.example:6380/0"
    namespace = "hospital_los"
    shards = 256                 # of a new namespace: its state spreads over this many slots
    # url = "redis+cluster://node1:6379,node2:6379"   # a Redis Cluster (or cluster = true
    #                                                # with nodes = ["node1:6379", ...])

    [refresh]
    every = "60s"
    engine = "local"             # or "dask", with dask_scheduler = "tcp://scheduler:8786"

The response/fixed/random/group/covariance keys are the one-term shorthand. Any lme4 formula
can be given instead (not both), with the levels of its categorical covariates declared, as a
stream cannot learn them from the data (first level the reference; a column named in a term
without declared levels is numeric)::

    [model]
    formula = "los ~ 1 + age + sex + (1 | hospital) + (1 | hospital:ward)"
    method = "REML"
    [model.levels]
    sex = ["F", "M"]             # or in the formula: C(sex, levels=["F", "M"])

Every key is checked: unknown keys are errors (with a "did you mean" hint), and each message
names the file, the key path and what was expected. Relative file paths in the file
(``ssl_cafile``, ``store.snapshot``, ...) are taken relative to the file's own folder.

Environment variables override the file: ``STREAMLME_REDIS_URL``, ``STREAMLME_KAFKA_TOPIC``,
``STREAMLME_MODEL_FIXED=1,age`` (lists are comma separated), ``STREAMLME_MODEL_FORMULA``,
``STREAMLME_KAFKA_CLIENT_<KEY>`` for ``[kafka.client]`` (``[model.levels]`` only in the file).
Empty values are ignored.

>>> parse_duration("5m"), parse_duration("1h30m"), parse_duration(90)
(300.0, 5400.0, 90.0)
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec
import msgspec.inspect as mi

from streamlme.events import RESERVED_FIELDS
from streamlme.formula import FormulaError
from streamlme.spec import ModelSpec, SpecError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport, same API
    import tomli as tomllib  # type: ignore[no-redef]

ENV_PREFIX = "STREAMLME_"


class ConfigError(ValueError):
    """A configuration that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


# --- durations ------------------------------------------------------------------------------

_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d|w)")


def parse_duration(value: str | int | float) -> float:
    """Seconds in a duration: a number of seconds or a string such as "250ms", "60s", "1h30m".

    >>> parse_duration("7d") == 7 * 86400
    True
    >>> parse_duration("60x")
    Traceback (most recent call last):
    ...
    ValueError: '60x' is not a duration; use e.g. '60s', '5m', '1h'
    """
    bad = ValueError(f"{value!r} is not a duration; use e.g. '60s', '5m', '1h'")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or _DURATION.sub("", text).strip():
                raise bad from None
            seconds = sum(float(num) * _UNITS[unit] for num, unit in parts)
    else:
        raise bad
    if not math.isfinite(seconds) or seconds < 0:
        raise bad
    return seconds


class Duration(float):
    """Seconds, written in the file as a number or a duration string; always > 0."""


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Duration:
        seconds = parse_duration(obj)
        if seconds <= 0:
            raise ValueError(f"{obj!r} must be longer than zero")
        return Duration(seconds)
    raise NotImplementedError(f"no conversion to {type_!r}")


Positive = Annotated[int, msgspec.Meta(ge=1)]
Name = Annotated[str, msgspec.Meta(min_length=1)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# --- sections -------------------------------------------------------------------------------


#: The one-term shorthand's keys; ``formula`` replaces all of them.
_SHORTHAND = ("response", "fixed", "random", "group", "covariance")


class ModelConfig(_Section):
    response: str | None = None
    fixed: list[str] | None = None
    random: list[str] | None = None
    group: str | None = None
    covariance: str | None = None  # None: "unstructured"
    method: str = "REML"
    half_life: Duration | None = None
    # An event time further than this into the future (by this machine's clock) is bad_ts: one
    # such event would otherwise age every other row of its group to nothing under half_life.
    max_future: Duration = Duration(3600.0)
    formula: str | None = None
    levels: dict[str, list[str | int]] = msgspec.field(default_factory=dict)

    @property
    def spec(self) -> ModelSpec:
        """The model the section describes (SpecError if it describes none)."""
        return _spec(self.formula, tuple((k, tuple(map(str, v))) for k, v in self.levels.items()),
                     self.response, None if self.fixed is None else tuple(self.fixed),
                     None if self.random is None else tuple(self.random), self.group,
                     self.covariance or "unstructured", self.method)


@functools.lru_cache(maxsize=32)
def _spec(formula: str | None, levels: tuple[tuple[str, tuple[str, ...]], ...],
          response: str | None, fixed: tuple[str, ...] | None, random: tuple[str, ...] | None,
          group: str | None, covariance: str, method: str) -> ModelSpec:
    if formula is None:
        spec = ModelSpec(response, fixed, random, group, covariance, method)  # type: ignore[arg-type]
        if not levels:
            return spec
        formula = spec.formula  # the shorthand's columns may name categorical covariates too
    return ModelSpec.from_formula(formula, levels=dict(levels), method=method)


#: Client settings that streamlme sets itself, or that are Python objects, not TOML values.
_CLIENT_MANAGED = {
    "bootstrap_servers": "set kafka.bootstrap_servers instead",
    "group_id": "set kafka.group_id instead",
    "enable_auto_commit": "streamlme commits offsets itself, after the store applied a batch",
    "key_deserializer": "streamlme decodes messages itself",
    "value_deserializer": "streamlme decodes messages itself",
    "key_serializer": "streamlme encodes messages itself",
    "value_serializer": "streamlme encodes messages itself",
}
_CLIENT_OBJECTS = {
    "default_offset_commit_callback",
    "kafka_client",
    "metric_reporters",
    "partitioner",
    "sasl_oauth_token_provider",
    "selector",
    "socket_options",
    "ssl_context",
}


#: How long a client waits for a broker before it gives up, unless ``[kafka.client]`` says:
#: the first metadata answer (3.x), the version probe (2.x), a producer's wait for metadata.
_CLIENT_TIMEOUTS: dict[str, int] = {
    "bootstrap_timeout_ms": 10_000,
    "api_version_auto_timeout_ms": 10_000,
    "max_block_ms": 10_000,
}


class KafkaConfig(_Section):
    bootstrap_servers: Annotated[list[Name], msgspec.Meta(min_length=1)]
    topic: Name
    group_id: Name = "streamlme"
    dead_letter_topic: str = ""
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    max_poll_records: Positive = 5000
    max_message_bytes: Positive = 1 << 20
    batch_max_events: Positive = 50_000
    batch_max_seconds: Duration = Duration(1.0)
    # An offset gap (retention deleted events the store never saw): "stop" refuses and exits 3,
    # "record" applies what is left and records the gap in the namespace for readers to show.
    on_gap: Literal["stop", "record"] = "stop"
    client_id: str | None = None
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: (
        Literal["PLAIN", "GSSAPI", "OAUTHBEARER", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None
    ) = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None
    sasl_kerberos_service_name: str | None = None
    sasl_kerberos_domain_name: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = None
    ssl_crlfile: str | None = None
    ssl_ciphers: str | None = None
    ssl_check_hostname: bool = True
    client: dict[str, Any] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.dead_letter_topic:
            self.dead_letter_topic = f"{self.topic}.dlq"

    def _common(self) -> dict[str, Any]:
        names = [
            f for f in self.__struct_fields__ if f == "client_id" or f.startswith(("sasl_", "ssl_"))
        ]
        out: dict[str, Any] = {"bootstrap_servers": list(self.bootstrap_servers)}
        out["security_protocol"] = self.security_protocol
        out.update({f: getattr(self, f) for f in names if getattr(self, f) is not None})
        return out

    def _with_client(self, base: dict[str, Any], accepted: set[str]) -> dict[str, Any]:
        # A broker that is down must be reported within seconds, not kafka-python's 30-60 s;
        # only the settings this kafka-python knows (2.x and 3.x name them differently).
        base |= {k: v for k, v in _CLIENT_TIMEOUTS.items() if k in accepted}
        for key, value in self.client.items():
            if key in accepted:
                base[key] = tuple(value) if isinstance(value, list) else value
        return base

    @property
    def connect_timeout(self) -> float:
        """Seconds a client waits for the first broker to answer (for messages)."""
        return float(self.client.get("bootstrap_timeout_ms",
                                     _CLIENT_TIMEOUTS["bootstrap_timeout_ms"])) / 1000.0

    def consumer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``kafka.KafkaConsumer`` (auto commit off: streamlme commits)."""
        from kafka import KafkaConsumer

        base = self._common() | {
            "group_id": self.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": self.auto_offset_reset,
            "max_poll_records": self.max_poll_records,
        }
        return self._with_client(base, set(KafkaConsumer.DEFAULT_CONFIG))

    def producer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``kafka.KafkaProducer``."""
        from kafka import KafkaProducer

        return self._with_client(self._common(), set(KafkaProducer.DEFAULT_CONFIG))

    def admin_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``kafka.KafkaAdminClient``."""
        from kafka import KafkaAdminClient

        return self._with_client(self._common(), set(KafkaAdminClient.DEFAULT_CONFIG))


_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


#: URL schemes of a Redis Cluster: ``redis+cluster://host:port,host:port`` (``rediss+`` for TLS).
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


class RedisConfig(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "streamlme"
    # A Redis Cluster: set by a redis+cluster:// URL or by cluster = true with startup nodes.
    cluster: bool = False
    nodes: list[str] = msgspec.field(default_factory=list)
    # Shards of a new namespace (fixed when it is created; an existing one keeps its own).
    shards: Annotated[int, msgspec.Meta(ge=1, le=16384)] = 256

    def __post_init__(self) -> None:
        if not _NAMESPACE.match(self.namespace):
            raise ValueError(
                f"namespace: {self.namespace!r}: use 1-100 letters, digits, '_', '-' or '.'"
            )
        scheme = urlsplit(self.url).scheme
        if scheme in CLUSTER_SCHEMES:
            self.cluster = True
        elif scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"url: {_redact(self.url)!r}: expected redis://, rediss:// (TLS), unix:// or "
                "redis+cluster://host:port,host:port (a Redis Cluster)"
            )
        for node in self.nodes:
            host, _, port = node.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"nodes: {node!r}: expected host:port")
        if self.cluster and scheme == "unix":
            raise ValueError("cluster: a Redis Cluster is reached over TCP, not a unix:// socket")

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of the Cluster's startup nodes: ``nodes``, else those of the URL."""
        if self.nodes:
            names = self.nodes
        else:
            netloc = urlsplit(self.url).netloc.rpartition("@")[2]
            names = [n for n in netloc.split(",") if n]
        out = []
        for name in names:
            host, _, port = name.rpartition(":")
            out.append((host or name, int(port) if port.isdigit() else 6379))
        return out

    @property
    def safe_url(self) -> str:
        """The URL with any password replaced by ``***``, for logs and messages."""
        return _redact(self.url)


class RefreshConfig(_Section):
    every: Duration = Duration(60.0)
    history: Positive = 50
    lease_ttl: Duration = Duration(30.0)  # a leader silent this long loses the lease
    skip_unchanged: bool = True  # no new version when no event arrived since the current one
    tolerance: Annotated[float, msgspec.Meta(gt=0)] | None = None  # None: the estimator's own
    max_iter: Positive | None = None
    engine: Literal["local", "dask"] = "local"  # where the deviance's per-shard sums run
    dask_scheduler: str | None = None  # "tcp://host:8786"; engine "dask" needs it

    def __post_init__(self) -> None:
        if self.lease_ttl < 1.0:
            raise ValueError(
                f"lease_ttl: {self.lease_ttl:g}s is under one second; a lease that short is lost "
                "during any refresh that takes longer (use e.g. \"30s\")"
            )
        if self.engine == "dask" and not self.dask_scheduler:
            raise ValueError('engine: "dask" needs dask_scheduler = "tcp://host:8786"')


class ApiConfig(_Section):
    host: Name = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    token: str | None = None
    # Largest request body, in bytes; a longer one is answered 413 before it is read.
    max_request_bytes: Positive = 1 << 20

    def __post_init__(self) -> None:
        if self.token is not None and not self.token.strip():
            raise ValueError(
                "token: an empty token would turn authentication off; remove the key to serve "
                "without one, or set a secret"
            )


class StoreConfig(_Section):
    snapshot: str | None = None


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole configuration; ``kafka``/``redis`` are None in embedded mode."""

    model: ModelConfig
    kafka: KafkaConfig | None = None
    redis: RedisConfig | None = None
    refresh: RefreshConfig = msgspec.field(default_factory=RefreshConfig)
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    source: str = "<environment>"

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    def summary(self) -> str:
        """One line per part, for ``streamlme config check``."""
        spec = self.spec
        lines = [f"model: {spec.formula} ({spec.method})"]
        if self.model.half_life:
            lines[0] += f", half-life {self.model.half_life:g}s"
        if len(spec.grouping_columns) > 1:
            lines.append(f"  cells: the levels of {', '.join(spec.grouping_columns)}; every "
                         "event carries each of them")
        for column, levels in spec.levels.items():
            lines.append(f"  categorical {column}: {', '.join(levels)} ({levels[0]} the "
                         "reference); other values are dead-lettered as unknown_level")
        if self.kafka:
            k = self.kafka
            lines.append(
                f"kafka: topic {k.topic!r} at {','.join(k.bootstrap_servers)},"
                f" group {k.group_id!r}, dead letters to {k.dead_letter_topic!r},"
                f" {k.security_protocol}"
            )
        else:
            lines.append("kafka: none (embedded: JSON lines from a file or stdin)")
        if self.redis:
            r = self.redis
            where = (f"Redis Cluster via {', '.join(f'{h}:{p}' for h, p in r.startup_nodes)}"
                     if r.cluster else r.safe_url)
            lines.append(f"redis: {where} namespace {r.namespace!r} ({r.shards} shards if new)")
        else:
            snap = f", snapshot {self.store.snapshot}" if self.store.snapshot else ""
            lines.append(f"redis: none (in-process MemoryStore{snap})")
        engine = (f", on Dask at {self.refresh.dask_scheduler}"
                  if self.refresh.engine == "dask" else "")
        lines.append(f"refresh: every {self.refresh.every:g}s, history {self.refresh.history}"
                     f"{engine}")
        lines.append(
            f"api: {self.api.host}:{self.api.port}{' (bearer token)' if self.api.token else ''}"
        )
        return "\n".join(lines)


_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "kafka": KafkaConfig,
    "redis": RedisConfig,
    "refresh": RefreshConfig,
    "api": ApiConfig,
    "store": StoreConfig,
}


# --- loading --------------------------------------------------------------------------------


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read, override from ``env`` (default: ``os.environ``) and validate a configuration.

    ``path`` None means environment only. Raises ConfigError listing every problem found.
    """
    env = os.environ if env is None else env
    source = str(path) if path is not None else "<environment>"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{source}: not valid TOML: {exc}"]) from None
    errors: list[str] = []
    _apply_env(data, env, errors)
    base = Path(path).resolve().parent if path is not None else Path.cwd()

    def fail(key: str, message: str) -> None:
        errors.append(f"{source}: {key}: {message}")

    for name in sorted(set(data) - set(_SECTIONS)):
        fail(name, f"unknown section{_hint(name, _SECTIONS)}; sections are {', '.join(_SECTIONS)}")
    if "model" not in data:
        fail("model", "missing; give a formula, or at least response, fixed, random and group")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name not in data:
            continue
        raw = data[name]
        if not isinstance(raw, dict):
            fail(name, f"expected a table [{name}], got {_kind(raw)}")
            continue
        unknown = sorted(set(raw) - set(cls.__struct_fields__))
        for key in unknown:
            fields = ", ".join(cls.__struct_fields__)
            fail(
                f"{name}.{key}", f"unknown key{_hint(key, cls.__struct_fields__)}; known: {fields}"
            )
        if unknown:
            continue
        if name == "kafka":
            raw = _normalise_kafka(raw)
        if name == "model" and not _check_levels_table(raw, fail):
            continue
        converted = _convert_section(name, raw, cls, fail)
        if converted is not None:
            sections[name] = converted
    if "model" in sections:
        _check_model(sections["model"], fail)
    if "kafka" in sections:
        _check_kafka(sections["kafka"], base, fail)
    if "store" in sections:
        _check_store(sections["store"], base, fail)
    if errors:
        raise ConfigError(errors)
    return Config(**sections, source=source)


def _convert_section(name: str, raw: dict[str, Any], cls: type[_Section], fail: Any) -> Any:
    """The section as ``cls``, or None after naming every bad or missing key with ``fail``.

    Each key is converted on its own first, because msgspec stops at the first problem of a
    struct and `config check` is to report them all in one run."""
    bad = False
    for field in msgspec.structs.fields(cls):
        if field.name not in raw:
            if field.required:
                fail(f"{name}.{field.name}", "missing")
                bad = True
            continue
        try:
            msgspec.convert(raw[field.name], field.type, dec_hook=_dec_hook)
        except msgspec.ValidationError as exc:
            key, message = _explain(_at_field(str(exc), field.name), raw, cls)
            fail(f"{name}{key}", message)
            bad = True
    if bad:
        return None
    try:  # the keys are fine one by one: what is left are the checks across keys
        return msgspec.convert(raw, cls, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        key, message = _explain(str(exc), raw, cls)
        fail(f"{name}{key}", message)
        return None


def _at_field(message: str, field: str) -> str:
    """A message about one key's value, its location (``$`` or ``$[1]``) put under the key."""
    match = _AT.match(message)
    assert match is not None  # the pattern matches any text
    return f"{match['msg']} - at `$.{field}{match['path'] or ''}`"


def check_config_file(path: str | Path, env: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """Validate a file as `load_config` does: ``(True, "ok: ...summary")`` or ``(False, errors)``.

    The CLI prints the message and exits 0 or 2 (``streamlme config check FILE``).
    """
    try:
        config = load_config(path, env)
    except ConfigError as exc:
        return False, str(exc)
    return True, f"ok: {path}\n{config.summary()}"


def _check_model(model: ModelConfig, fail: Any) -> None:
    given = [k for k in _SHORTHAND if getattr(model, k) is not None]
    if model.formula is not None and given:
        fail("model", f"give formula or the one-term shorthand ({', '.join(_SHORTHAND)}), not "
             f"both; this section has formula and {', '.join(given)}")
        return
    if model.formula is None:
        if not given:
            fail("model", 'give formula = "y ~ x + (1 | g)", or response, fixed, random and group')
            return
        missing = [k for k in _SHORTHAND[:4] if getattr(model, k) is None]
        for key in missing:
            fail(f"model.{key}", "missing")
        if missing:
            return
    bad_levels = False
    for column, levels in model.levels.items():
        names = [str(v) for v in levels]
        if not names or len(set(names)) != len(names):
            fail(f"model.levels.{column}", f"give distinct level names, got {names}")
            bad_levels = True
    if bad_levels:
        return
    try:
        spec = model.spec
    except SpecError as exc:
        key, sep, message = str(exc).partition(": ")
        if model.formula is not None and not (sep and key == "method"):
            fail("model.formula", _formula_problem(exc))
        else:
            fail(f"model.{key}" if sep else "model", message if sep else str(exc))
        return
    used = set(spec.categorical_inputs)
    for column, levels in model.levels.items():
        if column not in used:
            fail(f"model.levels.{column}", f"{column!r} is not a categorical covariate of "
                 f"{spec.formula!r}; levels are declared for the covariates a term names")
        elif spec.levels[column] != tuple(map(str, levels)):
            fail(f"model.levels.{column}", f"the formula declares the levels "
                 f"{', '.join(spec.levels[column])}; declare them in one place")
    for column in dict.fromkeys((*spec.columns, *spec.input_columns)):
        if column in RESERVED_FIELDS:
            fail(
                "model",
                f"column {column!r} clashes with the event field {column!r} "
                f"({', '.join(RESERVED_FIELDS)} are reserved); rename the column",
            )


def _formula_problem(exc: SpecError) -> str:
    """A formula's error; a categorical without levels is told where to declare them."""
    found = re.search(r"expected the levels of categorical '(.+?)'", str(exc))
    if not isinstance(exc, FormulaError) or found is None:
        return str(exc)
    column = found[1]
    return (f"at character {exc.at}: categorical {column!r} has no declared levels, and a stream "
            f"cannot learn them from the data; declare them in [model.levels] "
            f'({column} = ["a", "b"], first level the reference) or write '
            f'C({column}, levels=["a", "b"])\n  {exc.formula}\n  {" " * exc.at}^')


def _check_levels_table(raw: dict[str, Any], fail: Any) -> bool:
    """``[model.levels]``: a table of lists of level names (strings or integers)."""
    levels = raw.get("levels", {})
    if not isinstance(levels, dict):
        fail("model.levels", f"expected a table [model.levels] of column = [levels], got "
             f"{_kind(levels)}")
        return False
    ok = True
    for column, values in levels.items():
        if not (isinstance(values, list) and all(
                isinstance(v, (str, int)) and not isinstance(v, bool) for v in values)):
            fail(f"model.levels.{column}", 'expected a list of level names such as ["F", "M"], '
                 f"got {values!r}")
            ok = False
    return ok


def _check_kafka(kafka: KafkaConfig, base: Path, fail: Any) -> None:
    """Resolve TLS files relative to the config file, check they exist, SASL and client keys."""
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile"):
        value = getattr(kafka, key)
        if value is None:
            continue
        resolved = base / Path(value).expanduser()
        if not resolved.is_file():
            fail(f"kafka.{key}", f"{resolved} is not a readable file")
        setattr(kafka, key, str(resolved))
    _check_client(kafka, fail)
    _check_sasl(kafka, fail)


def _check_store(store: StoreConfig, base: Path, fail: Any) -> None:
    if store.snapshot:
        snapshot = base / Path(store.snapshot).expanduser()
        if not snapshot.parent.is_dir():
            fail("store.snapshot", f"folder {snapshot.parent} does not exist")
        store.snapshot = str(snapshot)


def _check_sasl(kafka: KafkaConfig, fail: Any) -> None:
    uses_sasl = kafka.security_protocol.startswith("SASL_")
    if uses_sasl and kafka.sasl_mechanism is None:
        fail("kafka.sasl_mechanism", f"required with security_protocol {kafka.security_protocol}")
    if not uses_sasl and kafka.sasl_mechanism is not None:
        fail(
            "kafka.security_protocol",
            f"sasl_mechanism {kafka.sasl_mechanism} needs SASL_SSL or SASL_PLAINTEXT",
        )
    if kafka.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        for key in ("sasl_plain_username", "sasl_plain_password"):
            if getattr(kafka, key) is None:
                fail(f"kafka.{key}", f"required with sasl_mechanism {kafka.sasl_mechanism}")


def _check_client(kafka: KafkaConfig, fail: Any) -> None:
    try:
        from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
    except ImportError:
        fail("kafka", "kafka-python is not installed; pip install kafka-python")
        return
    accepted = (
        set(KafkaConsumer.DEFAULT_CONFIG)
        | set(KafkaProducer.DEFAULT_CONFIG)
        | set(KafkaAdminClient.DEFAULT_CONFIG)
    ) - _CLIENT_OBJECTS
    for key, value in kafka.client.items():
        path = f"kafka.client.{key}"
        if key in _CLIENT_MANAGED:
            fail(path, f"not settable: {_CLIENT_MANAGED[key]}")
        elif key in kafka.__struct_fields__:
            fail(path, f"set it as kafka.{key}")
        elif key not in accepted:
            fail(path, f"not a kafka-python client setting{_hint(key, accepted)}")
        elif not _scalar_or_list(value):
            fail(path, f"expected a string, number, boolean or list of them, got {_kind(value)}")


def _scalar_or_list(value: Any) -> bool:
    if isinstance(value, list):
        return all(isinstance(v, (str, int, float, bool)) for v in value)
    return isinstance(value, (str, int, float, bool))


def _normalise_kafka(raw: dict[str, Any]) -> dict[str, Any]:
    """Accept bootstrap_servers as one comma-separated string, as kafka-python does."""
    servers = raw.get("bootstrap_servers")
    if isinstance(servers, str):
        raw = raw | {"bootstrap_servers": [s.strip() for s in servers.split(",") if s.strip()]}
    return raw


# --- environment overrides ------------------------------------------------------------------


def _apply_env(data: dict[str, Any], env: Mapping[str, str], errors: list[str]) -> None:
    for var in sorted(env):
        value = env[var]
        if not var.startswith(ENV_PREFIX) or value == "":
            continue
        section, _, key = var[len(ENV_PREFIX) :].lower().partition("_")
        cls = _SECTIONS.get(section)
        if cls is None or not key:
            close = difflib.get_close_matches(section, list(_SECTIONS), n=1, cutoff=0.75)
            if close and key:  # STREAMLME_REDSI_URL: a typo, not some other tool's variable
                errors.append(f"environment {var}: no section [{section}] (did you mean "
                              f"STREAMLME_{close[0].upper()}_{key.upper()}?); sections are "
                              f"{', '.join(_SECTIONS)}")
            continue  # other STREAMLME_* variables (e.g. STREAMLME_KAFKA for tests) are not ours
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            continue  # reported as a malformed section later
        info = {f.name: f.type for f in mi.type_info(cls).fields}
        if section == "model" and (key == "levels" or key.startswith("levels_")):
            errors.append(f"environment {var}: model.levels: declare levels in the file's "
                          "[model.levels] table (column names are case-sensitive)")
        elif key in info and key != "client":
            try:
                table[key] = _env_value(value, info[key])
            except ValueError as exc:
                errors.append(f"environment {var}: {section}.{key}: {exc}")
        elif section == "kafka" and key.startswith("client_"):
            table.setdefault("client", {})[key[len("client_") :]] = _literal(value)
        else:
            errors.append(
                f"environment {var}: {section}.{key} is not a known key"
                f"{_hint(key, info)}; known: {', '.join(info)}"
            )


def _env_value(text: str, type_: mi.Type) -> Any:
    if isinstance(type_, mi.UnionType):
        options = [t for t in type_.types if not isinstance(t, mi.NoneType)]
        type_ = options[0] if len(options) == 1 else mi.StrType()
    if isinstance(type_, mi.ListType):
        return [part.strip() for part in text.split(",") if part.strip()]
    if isinstance(type_, mi.BoolType):
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a boolean; use true or false")
    if isinstance(type_, mi.IntType):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
    if isinstance(type_, mi.FloatType):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    return text


def _literal(text: str) -> Any:
    """A ``[kafka.client]`` value from the environment: int, float, boolean or string."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.strip().lower(), text)


# --- messages -------------------------------------------------------------------------------

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_KINDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "list": "a list",
    "dict": "a table",
    "NoneType": "nothing",
}


def _explain(message: str, raw: Any, cls: type[_Section]) -> tuple[str, str]:
    """msgspec's "Expected `int`, got `str` - at `$.history`" as (".history", friendly text)."""
    match = _AT.match(message)
    assert match is not None  # the pattern matches any text
    path, text = match["path"] or "", match["msg"]
    missing = re.match(r"Object missing required field `(.+)`", text)
    if missing:
        return f"{path}.{missing[1]}", "missing"
    field, sep, detail = text.partition(": ")
    if not path and sep and field in cls.__struct_fields__:
        return f".{field}", detail  # raised by a __post_init__ as "field: detail"
    text = f"{text[0].lower()}{text[1:]}" if text else text
    text = text.replace(" | null`", "`")  # TOML has no null: an optional key is just left out
    if text.startswith("invalid enum value"):
        choices = _literal_choices(cls, path.lstrip("."))
        text = text.replace("invalid enum value", "invalid value")
        if choices:
            text += f"; expected one of {', '.join(map(repr, choices))}"
    elif text.startswith("expected"):
        value = _lookup(raw, path)
        if value is not _MISSING:
            text = f"{text}" + (f" ({value!r})" if ", got" in text else f", got {value!r}")
    return path, text


def _literal_choices(cls: type[_Section], key: str) -> list[Any]:
    for field in mi.type_info(cls).fields:
        if field.name == key:
            types = getattr(field.type, "types", (field.type,))
            return [v for t in types if isinstance(t, mi.LiteralType) for v in t.values]
    return []


_MISSING = object()


def _lookup(raw: Any, path: str) -> Any:
    for part in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        key, index = part
        try:
            raw = raw[key] if key else raw[int(index)]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return raw


def _hint(key: str, choices: Any) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind(value: Any) -> str:
    return _KINDS.get(type(value).__name__, type(value).__name__)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


# --- a starter file -------------------------------------------------------------------------


def starter_config(kafka: str | None = None, redis: str | None = None) -> str:
    """A commented configuration that `load_config` accepts: the demo's hospital model, plus a
    ``[kafka]`` section for the broker at ``kafka`` and a ``[redis]`` one for the ``redis`` URL
    when given (without them: JSON lines into the in-process store, snapshotted to a file)."""
    parts = [_STARTER_MODEL]
    parts.append(_STARTER_KAFKA.format(bootstrap=kafka) if kafka else _STARTER_NO_KAFKA)
    parts.append(_STARTER_REDIS.format(url=redis) if redis else _STARTER_NO_REDIS)
    parts.append(_STARTER_REST)
    return "\n".join(parts)


_STARTER_MODEL = '''\
# streamlme configuration (written by `streamlme config init`; check it with
# `streamlme config check FILE --connect`). STREAMLME_<SECTION>_<KEY> environment variables
# override any key, e.g. STREAMLME_REDIS_URL.

[model]
# The demo's model: a patient's length of stay by age and severity, with each hospital's own
# offset and age slope. Any lme4 formula works instead of the four keys below, e.g.
# formula = "los ~ age + severity + (1 + age | hospital)"
response = "los"
fixed = ["1", "age", "severity"]
random = ["1", "age"]
group = "hospital"
method = "REML"                    # or "ML", "EM"
# half_life = "7d"                 # exponential forgetting (events then need "ts")
'''

_STARTER_KAFKA = '''\
[kafka]
bootstrap_servers = "{bootstrap}"
topic = "events"
group_id = "streamlme"
# dead_letter_topic = "events.dlq" # refused events go here, with the reason

[kafka.client]
# any kafka-python setting; these make a consumer join its group in seconds
session_timeout_ms = 6000
heartbeat_interval_ms = 1000
'''

_STARTER_NO_KAFKA = '''\
# No [kafka] section: `streamlme consume --input FILE` reads JSON lines instead.
# [kafka]
# bootstrap_servers = "127.0.0.1:9092"
# topic = "events"
'''

_STARTER_REDIS = '''\
[redis]
url = "{url}"
namespace = "hospital_los"        # one model per namespace
'''

_STARTER_NO_REDIS = '''\
# No [redis] section: the in-process store, kept in this snapshot between commands.
[store]
snapshot = "state.npz"
'''

_STARTER_REST = '''\
[refresh]
every = "60s"                      # `streamlme refresh` without --once re-estimates this often
history = 50                       # model versions kept

[api]
host = "127.0.0.1"
port = 8000                        # `streamlme serve`
# token = "..."                    # bearer token for the HTTP API (or STREAMLME_API_TOKEN)
'''
