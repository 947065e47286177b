"""Wiring: from a `Config` to a running consumer or a finished publish (what the CLI calls).

- `run_consume(config, ...)`: Kafka when ``[kafka]`` is configured and no input file is given,
  else JSON lines from a file or stdin (embedded mode) — through the same decode, fold and merge.
- `run_publish(config, path)`: rows of a CSV / JSON-lines file to the configured topic, keyed by
  the model's first grouping column.
"""

from __future__ import annotations

import logging
import os
import time

from streamlme.config import Config, ConfigError
from streamlme.events import EventDecoder, RejectionLog
from streamlme.store.base import StateStore
from streamlme.store.connect import close_store, open_store
from streamlme.stream.consumer import Backoff, ConsumeReport, Ingestor, transient_errors
from streamlme.stream.dlq import (
    DeadLetters,
    FileDeadLetters,
    KafkaDeadLetters,
    LoggedDeadLetters,
)
from streamlme.stream.publish import publish_config
from streamlme.stream.source import JsonLinesSource, KafkaSource, Source

log = logging.getLogger(__name__)

#: Message size limit of embedded mode (Kafka mode takes kafka.max_message_bytes).
EMBEDDED_MAX_MESSAGE_BYTES = 1 << 20
#: Micro-batch limits of embedded mode.
EMBEDDED_BATCH_EVENTS = 50_000
EMBEDDED_BATCH_SECONDS = 1.0


def make_source(config: Config, input_path: str | None,
                dead_letters: str | None = None) -> tuple[Source, DeadLetters]:
    """The configured Kafka topic, or the JSON-lines input (``"-"`` is stdin); a JSON-lines
    input's refused lines go to the ``dead_letters`` file if given, else are only counted."""
    if input_path is not None:
        sink = FileDeadLetters(dead_letters) if dead_letters else LoggedDeadLetters()
        return JsonLinesSource(input_path), sink
    if config.kafka is None:
        raise ConfigError([
            f"{config.source}: kafka: not configured, so consume reads JSON lines; "
            "give --input FILE (or --input - for stdin), or add a [kafka] section"
        ])
    k = config.kafka
    return (
        KafkaSource(k.topic, k.consumer_kwargs()),
        KafkaDeadLetters(k.dead_letter_topic, k.producer_kwargs(),
                         max_message_bytes=k.max_message_bytes),
    )


def make_ingestor(config: Config, store: StateStore, input_path: str | None = None,
                  dead_letters: str | None = None, rebuild: bool = False) -> Ingestor:
    """The configured loop; ``rebuild`` replays the topic into fresh statistics."""
    source, dead_letter_sink = make_source(config, input_path, dead_letters)
    k = config.kafka if input_path is None else None
    decoder = EventDecoder(
        config.spec, k.max_message_bytes if k is not None else EMBEDDED_MAX_MESSAGE_BYTES,
        max_future=config.model.max_future,
    )
    rejections = RejectionLog()
    return Ingestor(
        source, store, decoder, dead_letter_sink,
        batch_max_events=k.batch_max_events if k is not None else EMBEDDED_BATCH_EVENTS,
        batch_max_seconds=k.batch_max_seconds if k is not None else EMBEDDED_BATCH_SECONDS,
        half_life=config.model.half_life,
        on_rejection=rejections.record,
        on_gap=k.on_gap if k is not None else "stop",
        rebuild=rebuild,
        config_hint=str(config.source),
    )


def run_consume(
    config: Config,
    max_events: int | None = None,
    until_idle: float | None = None,
    source: str | None = None,
    dead_letters: str | None = None,
    rebuild: bool = False,
) -> ConsumeReport:
    """Consume until SIGTERM/SIGINT, ``max_events`` read, ``until_idle`` seconds without events,
    or (for a file) its end; ``rebuild`` first clears the statistics and replays the topic
    (raises `StateLostError` when it cannot). ``source`` is a JSON-lines file or ``"-"`` for
    stdin, whose refused lines go to the ``dead_letters`` JSON-lines file if given; None reads
    the configured Kafka topic (refused events go to its dead-letter topic)."""
    if dead_letters is not None and source is None:
        raise ConfigError([f"{config.source}: consume from Kafka sends refused events to "
                           "kafka.dead_letter_topic; --dead-letters is for --input FILE"])
    # a long-running consumer (a service) waits for Redis and Kafka to come up; a bounded run
    # fails at once, with the CLI's one-line message
    waits = max_events is None and until_idle is None
    store = _wait_for_store(config) if waits else open_store(config)
    try:
        ingestor = make_ingestor(config, store, source, dead_letters, rebuild)
        ingestor.wait_for_source = waits and source is None
        ingestor.install_signal_handlers()
        return ingestor.run(max_events=max_events, until_idle=until_idle)
    finally:
        close_store(config, store)


def _wait_for_store(config: Config) -> StateStore:
    """`open_store`, retried with capped backoff while Redis does not answer (logged)."""
    where = config.redis.safe_url if config.redis is not None else "the embedded store"
    for delay in Backoff(first=0.5, cap=10.0).delays():
        try:
            return open_store(config)
        except transient_errors() as exc:
            log.warning("waiting for Redis at %s (%s: %s); retrying in %.1fs", where,
                        type(exc).__name__, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def run_publish(config: Config, path: str | os.PathLike[str], progress: bool = True) -> int:
    """Send a CSV / JSON-lines file's rows to the configured topic, each checked first as the
    consumer will decode it (`streamlme.stream.publish.publish_config`); returns how many."""
    return publish_config(config, path, progress)
