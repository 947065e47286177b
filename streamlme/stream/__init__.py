"""The streaming updater: events from Kafka (or JSON lines) into per-group statistics.

Modules: `source` (Kafka consumer group, JSON-lines file), `batch` (fold a decoded batch into
per-group deltas), `consumer` (the exactly-once ingest loop), `dlq` (dead letters), `publish`
(send a file's rows to the topic) and `app` (from a Config to a run; what the CLI calls).
"""
