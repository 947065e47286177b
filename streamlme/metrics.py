"""Prometheus metrics shared by the consumer, the refresh job and the HTTP API.

Each process records into prometheus_client's default registry; `metrics_text` renders it for
``GET /metrics``. Processes that serve no HTTP (consumer, refresh) can expose theirs with
`start_metrics_server`. To see every process of one machine on one endpoint, set
``PROMETHEUS_MULTIPROC_DIR`` to an empty folder shared by all of them before they start:
`metrics_text` then merges the folder's files (prometheus_client's multiprocess mode).

==============================================  =========  ====================================
metric                                          type       labels
==============================================  =========  ====================================
``streamlme_events_ingested_total``             counter
``streamlme_events_dead_lettered_total``        counter    ``reason`` (the rejection code)
``streamlme_consumer_lag``                      gauge      ``topic``, ``partition``
``streamlme_refresh_duration_seconds``          histogram
``streamlme_refresh_outcomes_total``            counter    ``outcome`` (see `REFRESH_OUTCOMES`)
``streamlme_query_latency_seconds``             histogram  ``route``
``streamlme_model_version``                     gauge
``streamlme_model_age_seconds``                 gauge
==============================================  =========  ====================================

>>> EVENTS_INGESTED.inc(3)
>>> b"streamlme_events_ingested_total" in metrics_text()
True
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client import multiprocess as _multiprocess

#: Content type of `metrics_text`'s output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Values of the ``outcome`` label of `REFRESH_OUTCOMES_TOTAL` (`streamlme.refresh.OUTCOMES`).
REFRESH_OUTCOMES = ("written", "unchanged", "fit_failed", "not_converged", "fenced", "no_lease",
                    "error")

EVENTS_INGESTED = Counter(
    "streamlme_events_ingested", "Events folded into the per-group statistics.")
EVENTS_DEAD_LETTERED = Counter(
    "streamlme_events_dead_lettered", "Events sent to the dead-letter topic, by reason.",
    ["reason"])
CONSUMER_LAG = Gauge(
    "streamlme_consumer_lag", "Messages between the partition's end and the next offset to read.",
    ["topic", "partition"], multiprocess_mode="livemax")
REFRESH_DURATION = Histogram(
    "streamlme_refresh_duration_seconds", "Wall time of one refresh: read, fit and write.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
REFRESH_OUTCOMES_TOTAL = Counter(
    "streamlme_refresh_outcomes", "Refresh attempts by outcome.", ["outcome"])
QUERY_LATENCY = Histogram(
    "streamlme_query_latency_seconds", "Time to answer a query, by API route.", ["route"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
MODEL_VERSION = Gauge(
    "streamlme_model_version", "The current model version (0: none yet).",
    multiprocess_mode="livemax")
MODEL_AGE = Gauge(
    "streamlme_model_age_seconds", "Seconds since the current model version was estimated.",
    multiprocess_mode="livemin")


def metrics_text() -> bytes:
    """Every metric in Prometheus' text format (merged across processes in multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Serve `metrics_text` at http://host:port/metrics from a daemon thread of this process."""
    start_http_server(port, addr=host)
