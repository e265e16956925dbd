"""Fixtures for the end-to-end tests: real prefork ``celery worker`` subprocesses on real
brokers (Redis and RabbitMQ on 127.0.0.1), a SQLite store shared by the workers and the
test process, and a Redis "sink" (db 13) through which the tests watch the workers.

Every name a run creates is unique to it (queues, exchanges, the control exchange, Redis
broker keys through kombu's ``global_keyprefix``, sink keys under ``baton-it:<session>:``)
and is deleted at teardown. Nothing is flushed: other users of these servers are left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import kombu.pools
import pytest
import redis
from it_support import (
    AMQP_BROKER,
    REDIS_BROKER,
    SINK_URL,
    Cluster,
    Session,
    Steps,
    client_forwarder,
)

import baton_celery

HERE = Path(__file__).resolve().parent
BROKERS = {"redis": REDIS_BROKER, "amqp": AMQP_BROKER}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: end-to-end tests with real celery workers and real brokers"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def _reachable(url: str) -> None:
    """Fail (never skip) when a server the suite needs is not running."""
    from kombu import Connection

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
        session.delete_keys()
        _delete_broker_leftovers(session)
        # The client apps' broker connections live in kombu's process-wide pools, shared
        # by every app with the same broker URL: close them once, at the very end.
        kombu.pools.reset()


def _delete_broker_leftovers(session: Session) -> None:
    # Redis broker: every key kombu made for this session carries its global_keyprefix.
    broker_db = redis.Redis.from_url(REDIS_BROKER)
    for key in broker_db.scan_iter(match=f"{session.broker_prefix}*", count=1000):
        broker_db.delete(key)
    # RabbitMQ: the session's control (pidbox) exchanges.
    if "amqp" in session.brokers_used:
        from kombu import Connection

        with Connection(AMQP_BROKER, connect_timeout=5) as conn:
            channel = conn.default_channel
            for exchange in (f"{session.control}.pidbox", f"reply.{session.control}.pidbox"):
                channel.exchange_delete(exchange)


@pytest.fixture(scope="session", params=sorted(BROKERS))
def cluster(request: pytest.FixtureRequest, session: Session) -> Iterator[Cluster]:
    """One prefork worker (-c 2) per broker, shared by the scenario tests of a session:
    each test works in its own workflows and its own sink keys (see ``steps``)."""
    yield from _cluster(session, f"core-{request.param}", BROKERS[request.param], workers=1)


@pytest.fixture
def race_cluster(session: Session) -> Iterator[Cluster]:
    """Two prefork workers (-c 2 each) on one Redis queue: four pool processes racing."""
    yield from _cluster(session, "race", REDIS_BROKER, workers=2)


def _cluster(session: Session, name: str, broker: str, workers: int) -> Iterator[Cluster]:
    _reachable(broker)
    session.brokers_used.add(broker.split(":", 1)[0])
    cluster = session.cluster(name, broker)
    try:
        for _ in range(workers):
            cluster.start_worker(concurrency=2)
        yield cluster
    finally:
        cluster.stop()
        cluster.delete_broker_objects()
        cluster.app.close()


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
