"""Fixtures for the end-to-end tests (see harness.py): the session and its sink, the
scenario clusters shared by a session, and clusters made for one test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import kombu.pools
import pytest
import redis
from harness import BROKERS, SINK_URL, Cluster, LocalRedis, Session, Steps, client_forwarder
from kombu import Connection

import baton_celery

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def _reachable(url: str) -> None:
    """Fail (never skip) when a server the suite needs is not running."""
    try:
        with Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        pytest.fail(f"broker {url} is not reachable ({exc!r}): start it first", pytrace=False)


@pytest.fixture(scope="session")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    db = redis.Redis.from_url(SINK_URL, socket_timeout=120)
    try:
        db.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis sink {SINK_URL} is not reachable ({exc!r})", pytrace=False)
    session = Session(db, tmp_path_factory.mktemp("baton-it"))
    forwarder = client_forwarder(session)
    baton_celery.subscribe_all(forwarder)
    try:
        yield session
    finally:
        baton_celery.unsubscribe_all(forwarder)
        session.delete_keys()  # the sink's and the Redis stores'
        if "redis" in session.brokers_used:
            # Every key kombu made for this session carries its global_keyprefix.
            with redis.Redis.from_url(BROKERS["redis"]) as broker_db:
                for key in broker_db.scan_iter(match=f"{session.broker_prefix}*", count=1000):
                    broker_db.delete(key)
        # The client apps' broker connections live in kombu's process-wide pools, shared
        # by every app with the same broker URL: close them once, at the very end.
        kombu.pools.reset()
        db.close()


@contextlib.contextmanager
def running(
    session: Session, kind: str, broker: str, workers: int = 1, **flags: Any
) -> Iterator[Cluster]:
    """A cluster (see ``Session.cluster``) with its workers, stopped and deleted after."""
    cluster = session.cluster(kind, broker, **flags)
    _reachable(cluster.broker)
    try:
        for _ in range(workers):
            cluster.start_worker(concurrency=2)
        yield cluster
    finally:
        cluster.stop()
        cluster.delete_broker_objects()
        baton_celery.uninstall(cluster.app)
        cluster.app.close()


@pytest.fixture(scope="session", params=sorted(BROKERS))
def cluster(request: pytest.FixtureRequest, session: Session) -> Iterator[Cluster]:
    """One prefork worker (-c 2) per broker, shared by the scenario tests of a session:
    each test works in its own workflows and its own sink keys (see ``steps``)."""
    with running(session, f"core-{request.param}", request.param) as cluster:
        yield cluster


@pytest.fixture
def steps(cluster: Cluster) -> Iterator[Steps]:
    """The ``step`` task for one test, with its own sink keys; blocked steps are released
    at teardown so a failing test does not leave a pool process stuck."""
    helper = Steps(cluster)
    try:
        yield helper
    finally:
        helper.release_all()
        dead = [w.node for w in cluster.workers if w.process.poll() is not None]
        assert not dead, f"worker(s) died during the test: {dead}\n{cluster.diagnose()}"


@pytest.fixture
def make_cluster(session: Session) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(kind, broker, workers=1, **flags)``: a cluster of this test's own
    (``workers=0``: only its app and names), stopped and deleted at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda *args, **kwargs: stack.enter_context(running(session, *args, **kwargs))


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    """A redis-server of the test's own, which it may stop and start again. Request it
    before ``make_cluster``: it is then removed after the test's clusters."""
    server = LocalRedis(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.remove()
