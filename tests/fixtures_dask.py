"""Dask for the tests: a real scheduler and worker processes, never a mock (pytest plugin,
loaded by conftest.py).

- ``dask_address`` (session): ``STREAMLME_DASK`` (a scheduler address, ``tcp://host:8786``) if
  set, else the address of one ``distributed.LocalCluster(n_workers=2, threads_per_worker=1,
  processes=True)`` for the whole session (about a second to start here).
- ``dask_client`` (session): a `distributed.Client` of that scheduler.
- ``local_dask_cluster`` (function): a factory of private LocalClusters (worker processes a test
  may kill); all of them are closed when the test ends.

Without the ``dask[distributed]`` extra the tests that need Dask are skipped, except under
``CI=true``, where they fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("dask[distributed] is not installed (pip install -e '.[test]')")
        pytest.skip("dask[distributed] is not installed (pip install -e '.[dask]')")
    return distributed


def start_local_cluster(n_workers: int = 2, threads_per_worker: int = 1) -> Any:
    """A LocalCluster of worker processes, without a dashboard; BLAS pinned to one thread."""
    distributed = _distributed()
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return distributed.LocalCluster(
        n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
        dashboard_address=None, env=env, silence_logs=40)


@pytest.fixture(scope="session")
def dask_address() -> Iterator[str]:
    """Address of the Dask scheduler the session shares (see the module docstring)."""
    env = os.environ.get("STREAMLME_DASK")
    if env:
        yield env
        return
    cluster = start_local_cluster()
    try:
        yield cluster.scheduler_address
    finally:
        from streamlme.refresh_dask import close_clients

        close_clients()
        cluster.close()


@pytest.fixture(scope="session")
def dask_client(dask_address: str) -> Iterator[Any]:
    distributed = _distributed()
    client = distributed.Client(dask_address, set_as_default=False)
    try:
        yield client
    finally:
        client.close()


class LocalClusterFactory:
    """Starts private LocalClusters; all are closed when the test ends."""

    def __init__(self) -> None:
        self.clusters: list[Any] = []

    def __call__(self, n_workers: int = 2, threads_per_worker: int = 1) -> Any:
        cluster = start_local_cluster(n_workers, threads_per_worker)
        self.clusters.append(cluster)
        return cluster

    def close_all(self) -> None:
        for cluster in self.clusters:
            cluster.close()


@pytest.fixture
def local_dask_cluster() -> Iterator[LocalClusterFactory]:
    factory = LocalClusterFactory()
    try:
        yield factory
    finally:
        factory.close_all()
