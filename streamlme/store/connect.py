"""Building stores from configuration: `open_store`, `redis_client` and `StoreAddress`.

``[redis]`` selects Redis: a standalone server by ``url``, or a Redis Cluster by a
``redis+cluster://host:port,host:port`` URL or ``cluster = true`` with ``nodes``. Without
``[redis]`` the store is the in-process `MemoryStore` (loaded from ``[store] snapshot`` if that
file exists). Connections time out rather than hang, and redirections of a Cluster in motion
are retried (`streamlme.store.redis.RedisStore`).

>>> StoreAddress("redis+cluster://10.0.0.1:6379,10.0.0.2:6379", "los").nodes
(('10.0.0.1', 6379), ('10.0.0.2', 6379))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from streamlme.store.base import StateStore
from streamlme.store.redis import Client, RedisStore

if TYPE_CHECKING:
    from streamlme.config import Config

log = logging.getLogger(__name__)

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class StoreAddress:
    """Where a namespace lives, small and picklable: what a Dask worker needs to connect.

    ``url`` is a ``redis://`` / ``rediss://`` / ``unix://`` URL, or a ``redis+cluster://`` one
    naming startup nodes; ``nodes`` overrides the URL's nodes of a Cluster.
    """

    url: str
    namespace: str
    cluster: bool = False
    nodes: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    timeout: float = 30.0

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme in CLUSTER_SCHEMES:
            object.__setattr__(self, "cluster", True)
            if not self.nodes:
                netloc = urlsplit(self.url).netloc.rpartition("@")[2]
                object.__setattr__(self, "nodes", tuple(_node(n) for n in netloc.split(",") if n))

    @classmethod
    def of(cls, store: RedisStore) -> StoreAddress:
        """The address of an open store's connection."""
        client = store.client
        if isinstance(client, RedisCluster):
            kw = client.nodes_manager.connection_kwargs
            nodes = tuple((n.host, int(n.port)) for n in client.get_primaries())
            scheme = "rediss+cluster" if kw.get("ssl") else "redis+cluster"
            return cls(_url(scheme, kw, nodes[0]), store.namespace, True, nodes)
        kw = client.get_connection_kwargs()
        if "path" in kw:
            return cls(f"unix://{kw['path']}?db={kw.get('db', 0)}", store.namespace)
        scheme = "rediss" if kw.get("ssl") or "ssl_cert_reqs" in kw else "redis"
        url = _url(scheme, kw, (kw.get("host", "127.0.0.1"), int(kw.get("port", 6379))))
        return cls(f"{url}/{kw.get('db', 0)}", store.namespace)

    def client(self) -> Client:
        return redis_client(self.url, cluster=self.cluster, nodes=self.nodes,
                            timeout=self.timeout)

    def open(self, **kwargs: Any) -> RedisStore:
        """A `RedisStore` of this namespace over a new connection."""
        return RedisStore(self.client(), self.namespace, **kwargs)


def redis_client(url: str, *, cluster: bool = False,
                 nodes: tuple[tuple[str, int], ...] | list[tuple[str, int]] = (),
                 timeout: float = 30.0) -> Client:
    """A standalone client for ``url``, or a Cluster client for its (or ``nodes``') startup
    nodes, with the URL's password and TLS; commands time out after ``timeout`` seconds."""
    parts = urlsplit(url)
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": 5}
    if not (cluster or parts.scheme in CLUSTER_SCHEMES):
        return redis.Redis.from_url(url, health_check_interval=30, **common)
    startup = list(nodes) or [_node(n) for n in parts.netloc.rpartition("@")[2].split(",") if n]
    if not startup:
        raise ValueError(f"{url!r}: a Redis Cluster needs at least one startup node host:port")
    if parts.password is not None:
        common["password"] = unquote(parts.password)
    if parts.username:
        common["username"] = unquote(parts.username)
    if parts.scheme.startswith("rediss"):
        common["ssl"] = True
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in startup],
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 6), **common)


def open_store(config: Config) -> StateStore:
    """The store the configuration names (see the module docstring)."""
    spec = config.spec
    if config.redis is not None:
        r = config.redis
        client = redis_client(r.url, cluster=r.cluster, nodes=r.startup_nodes if r.cluster else ())
        return RedisStore(client, r.namespace, d=len(spec.columns), columns=spec.columns,
                          shards=r.shards)
    from streamlme.store.memory import MemoryStore

    return MemoryStore(config.store.snapshot, d=len(spec.columns), columns=spec.columns)


def close_store(config: Config, store: StateStore) -> None:
    """Write the MemoryStore's snapshot, if one is configured; close connections."""
    from streamlme.store.memory import MemoryStore

    snapshot = config.store.snapshot
    if isinstance(store, MemoryStore) and snapshot:
        store.snapshot(snapshot)
        log.info("snapshot written to %s", snapshot)
    if isinstance(store, RedisStore):
        store.client.close()


def _node(name: str) -> tuple[str, int]:
    host, _, port = name.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else (name, 6379)


def _url(scheme: str, kw: dict[str, Any], node: tuple[str, int]) -> str:
    auth = ""
    if kw.get("password"):
        from urllib.parse import quote

        auth = f"{quote(kw.get('username') or '', safe='')}:{quote(kw['password'], safe='')}@"
    return f"{scheme}://{auth}{node[0]}:{node[1]}"
