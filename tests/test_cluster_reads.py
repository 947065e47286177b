"""Everything that reads a model runs against a real Redis Cluster (3 masters, 3 replicas): the
Client, the HTTP API and its status, the refresh and the CLI, configured by a
``redis+cluster://`` URL, and answer as they do against a standalone Redis."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from click.testing import CliRunner
from fastapi.testclient import TestClient
from query_helpers import ODD_GROUPS, SPEC, make_rows, seed_store, write_config

from streamlme.api import create_app
from streamlme.cli import main
from streamlme.client import Client
from streamlme.config import load_config
from streamlme.model import ModelRecord
from streamlme.refresh import RefreshSettings, refresh_once
from streamlme.stats import GroupStats
from streamlme.status import StatusPublisher, read_status
from streamlme.store import MemoryStore, RedisStore, open_store
from streamlme.stream.consumer import ConsumeReport


def test_client_api_and_cli_on_a_cluster_answer_as_in_memory(redis_cluster, cluster_namespace,
                                                              tmp_path):
    cfg = write_config(tmp_path / "c.toml", redis_cluster.url, cluster_namespace)
    config = load_config(cfg, env={})
    assert config.redis.cluster
    store = open_store(config)
    assert isinstance(store, RedisStore) and store.is_cluster
    groups, W = make_rows(31, groups=[*ODD_GROUPS, *(f"g{i}" for i in range(40))])
    _, record = seed_store(store, groups, W)
    # the cells really are spread over the masters
    slots = {redis_cluster.master_for_key(store.keys.shard(s).stats) for s in range(store.n_shards)}
    assert len(slots) == 3

    memory = MemoryStore(columns=SPEC.columns)
    memory.merge(GroupStats.from_rows(groups, W))
    memory.put_model(record.to_json())
    asked = [*ODD_GROUPS, "never-seen"]
    expected = [e.to_dict() for e in Client(memory).effects(asked)]
    with Client(config) as client:
        got = [e.to_dict() for e in client.effects(asked)]
    for a, b in zip(expected, got, strict=True):
        a.pop("model_version"), b.pop("model_version")
        assert a == b

    StatusPublisher(store, "c1").publish(ConsumeReport(events_read=5, events_applied=5), lag=0)
    http = TestClient(create_app(config))
    assert http.get("/readyz").json()["status"] == "ready"
    assert http.get("/v1/groups/g3/effect").json()["known"] is True
    assert [c["consumer"] for c in http.get("/v1/status").json()["consumers"]] == ["c1"]
    assert read_status(store).events_total == 5

    runner = CliRunner()
    shown = runner.invoke(main, ["effect", "g3", "--config", str(cfg), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output.splitlines()[0])["group"] == "g3"
    assert runner.invoke(main, ["model", "--config", str(cfg)]).exit_code == 0


def test_a_refresh_on_a_cluster_equals_one_on_standalone_redis(redis_cluster, cluster_namespace,
                                                               redis_url, namespace):
    groups, W = make_rows(32, n_groups=120, n_rows=3000)
    stats = GroupStats.from_rows(groups, W)
    cluster = RedisStore(redis_cluster.client(), cluster_namespace, columns=SPEC.columns)
    standalone = RedisStore(redis_url, namespace, columns=SPEC.columns)
    outcomes = []
    for store in (cluster, standalone):
        store.merge(stats)
        outcomes.append(refresh_once(store, SPEC, RefreshSettings()))
    assert [o.status for o in outcomes] == ["written", "written"]
    a, b = (ModelRecord.from_json(s.get_model()).fit for s in (cluster, standalone))
    # the same statistics, read in another order (hash order within a shard): rounding only
    for key in ("beta", "G", "sigma2", "criterion"):
        np.testing.assert_allclose(np.array(pd_values(a[key]), float),
                                   np.array(pd_values(b[key]), float), rtol=1e-9)
    standalone.clear()


def pd_values(x: Any) -> Any:
    """A record's entry as numbers: dicts (named coefficients) by their values."""
    return list(x.values()) if isinstance(x, dict) else x
