"""Shared by the unit tests: a real three-node Redis Cluster on loopback ports, started
once per session when a collected test needs it (the store contract and the Redis store
tests list it among their backends) and torn down at the end; and the cleanup of the keys
the session's Redis stores left on the shared server."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis_servers import LocalCluster, delete_session_keys, unit_cluster

NEEDS_CLUSTER = {"test_store_contract.py", "test_redis_store.py"}


@pytest.fixture(scope="session", autouse=True)
def redis_cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster | None]:
    if not any(Path(str(item.path)).name in NEEDS_CLUSTER for item in request.session.items):
        yield None
        return
    cluster = unit_cluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session", autouse=True)
def _delete_shared_redis_keys() -> Iterator[None]:
    """Whatever the Redis stores of this session left on the shared server goes."""
    yield
    delete_session_keys()
