"""Shared by the unit tests: the ``redis`` marker, a real three-node Redis Cluster on
loopback ports, and the cleanup of the keys the session's Redis stores left on the shared
server.

Tests that need a Redis server get the ``redis`` marker here: every test of the Redis
store's file, the "redis" and "cluster" parameters of the others (e.g. the store
contract's backends), and the tests of ``ON_EVERY_BACKEND``. ``pytest tests/unit -m "not
redis"`` runs the rest with no Redis up. The cluster is started once per session when a
selected test runs on it, and torn down at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from redis_servers import LocalCluster, delete_session_keys, unit_cluster  # noqa: E402

REDIS_FILES = {"test_redis_store.py"}
#: Tests that run on every shared backend in one loop, the Redis Cluster's included.
ON_EVERY_BACKEND = {"test_store_contract.py::test_processes_see_each_others_state"}


def _is_unit(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def _param_id(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    return callspec.id.lower() if callspec is not None else ""


def _on_every_backend(item: pytest.Item) -> bool:
    return f"{Path(str(item.path)).name}::{item.name}" in ON_EVERY_BACKEND


def needs_cluster(item: pytest.Item) -> bool:
    return _is_unit(item) and ("cluster" in _param_id(item) or _on_every_backend(item))


def needs_redis(item: pytest.Item) -> bool:
    in_redis_file = Path(str(item.path)).name in REDIS_FILES
    return needs_cluster(item) or (_is_unit(item) and (in_redis_file or "redis" in _param_id(item)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if needs_redis(item):
            item.add_marker(pytest.mark.redis)


@pytest.fixture(scope="session", autouse=True)
def redis_cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster | None]:
    # session.items holds the selected tests only (after -m, -k and deselection).
    if not any(needs_cluster(item) for item in request.session.items):
        yield None
        return
    cluster = unit_cluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session", autouse=True)
def _delete_shared_redis_keys(request: pytest.FixtureRequest) -> Iterator[None]:
    """Whatever the Redis stores of this session left on the shared server goes (when a
    selected test used it)."""
    yield
    if any(needs_redis(item) for item in request.session.items):
        delete_session_keys()
