"""Shared fixtures. Services (Redis, Kafka) live in their own plugin modules beside this file."""

pytest_plugins = ["fixtures_redis", "fixtures_kafka", "fixtures_dask", "fixtures_cluster"]
