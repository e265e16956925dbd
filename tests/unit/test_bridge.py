"""The bridge's publishing side: configuration, envelope, exchange, and a publisher that
never fails the caller."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from kombu.entity import Queue

import baton_celery
from baton_celery import bridge, guard
from baton_celery.bridge import Publisher
from baton_celery.config import Config
from baton_celery.envelope import bridge_exchange, envelope, process_token
from baton_celery.events import StepUpdated, event_from_dict, utcnow


def an_event(seq: int = 1) -> StepUpdated:
    return StepUpdated("w", "lbl", "a", "t", "completed", "j", 1, True, None, utcnow(), seq)


def test_bridge_settings_have_defaults_and_parse_strings() -> None:
    app = Celery("cfg", set_as_current=False)
    config = Config.from_app(app)
    assert config.bridge is False and config.bridge_background is False
    assert config.bridge_exchange == "baton_celery.events"
    assert config.bridge_reorder_window == 2.0 and config.bridge_max_message == 65536
    app.conf.baton_bridge = "true"
    app.conf.baton_bridge_background = "on"
    app.conf.baton_bridge_reorder_window = "0.5"
    config = Config.from_app(app)
    assert config.bridge is True and config.bridge_background is True
    assert config.bridge_reorder_window == 0.5


def test_the_exchange_flags_are_fixed() -> None:
    ex = bridge_exchange("x")
    assert (ex.type, ex.durable, ex.auto_delete, ex.delivery_mode) == ("fanout", False, False, 1)


def test_envelope_carries_seq_origin_and_a_result_free_event() -> None:
    event = an_event(7)
    body = envelope(event)
    assert body["v"] == 1 and body["seq"] == 7 and body["origin"] == process_token()
    assert event_from_dict(body["event"]) == event
    assert "result" not in body["event"]


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("bridge-unit", broker="memory://", set_as_current=False)
    app.conf.baton_store = "memory://"
    baton_celery.install(app)
    yield app
    baton_celery.uninstall(app)


def test_a_runtime_with_the_bridge_off_never_makes_a_publisher(app: Celery) -> None:
    runtime = baton_celery.install(app)
    made = len(bridge._publishers)
    bridge.publish(runtime, an_event())
    assert bridge.publisher_for(runtime) is None
    assert runtime not in bridge._by_runtime and len(bridge._publishers) == made
    assert bridge.close(runtime)  # nothing to close


def test_a_broker_that_cannot_be_reached_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Celery("down", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.update(baton_store="memory://", baton_bridge=True, baton_bridge_publish_retries=0)
    app.conf.broker_connection_timeout = 0.5
    publisher = Publisher(app, Config.from_app(app))
    with caplog.at_level(logging.ERROR, "baton_celery.bridge"):
        publisher.publish(an_event(1))  # inline: the send was tried (and failed) here
    publisher.close()
    assert publisher.dropped == 1 and publisher.published == 0
    assert "could not publish 1 event(s)" in caplog.text


def test_after_a_failed_send_events_are_dropped_without_trying_for_a_while() -> None:
    """A task must not pay the broker's failure on every event: after one failed send the
    publisher drops at once until its back-off ends, and tries again after that."""
    app = Celery("down-backoff", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.update(baton_store="memory://", baton_bridge=True, baton_bridge_publish_retries=0)
    publisher = Publisher(app, Config.from_app(app))
    publisher.publish(an_event(1))
    assert publisher.dropped == 1 and publisher._down_until > 0
    far = publisher._down_until = time.monotonic() + 60
    publisher.publish(an_event(2))
    # Dropped at once: a send that failed again would have moved the back-off's end.
    assert publisher.dropped == 2 and publisher._down_until == far
    publisher._down_until = 0.0  # the back-off is over
    publisher.publish(an_event(3))
    assert publisher.dropped == 3 and publisher._down_until > 0  # tried, failed again
    publisher.close()


def test_a_full_queue_drops_and_logs(app: Celery, caplog: pytest.LogCaptureFixture) -> None:
    app.conf.baton_bridge_queue_size = 1
    app.conf.baton_bridge_background = True
    publisher = Publisher(app, Config.from_app(app))
    publisher._adopt_process()
    publisher._thread = threading.current_thread()  # stands in for a stuck sender
    try:
        with caplog.at_level(logging.ERROR, "baton_celery.bridge"):
            publisher.publish(an_event(1))
            publisher.publish(an_event(2))
    finally:
        publisher._thread = None
        publisher._queue.get_nowait()
        publisher._queue.task_done()
    assert publisher.dropped == 1
    assert "publish queue is full" in caplog.text


def test_a_flush_that_times_out_leaves_no_thread_behind(app: Celery) -> None:
    """A broker that hangs: flush gives up after its timeout, and nothing it started is
    left waiting for the queue."""
    app.conf.baton_bridge_background = True
    publisher = Publisher(app, Config.from_app(app))
    release = threading.Event()
    publisher._send = lambda bodies: release.wait(10)  # type: ignore[assignment,method-assign]
    publisher.publish(an_event(1))  # starts the sender, which then hangs
    before = set(threading.enumerate())
    try:
        assert publisher.flush(0.1) is False
        assert set(threading.enumerate()) - before == set()
    finally:
        release.set()
        publisher.close(5)


def test_a_background_flush_returns_once_the_envelopes_reached_the_broker(app: Celery) -> None:
    """The sender is slow; flush waits for it: when it returns True, every envelope is on
    a queue bound to the exchange, in order."""
    app.conf.baton_bridge_background = True
    publisher = Publisher(app, Config.from_app(app))
    send = publisher._send

    def slow_send(bodies: list[dict[str, object]]) -> None:
        time.sleep(0.2)
        send(bodies)

    publisher._send = slow_send  # type: ignore[method-assign]
    with app.connection_for_read() as conn:
        bound: Any = Queue("bridge-unit-flush", publisher.exchange, routing_key="")(conn)  # type: ignore[no-untyped-call]
        bound.declare()
        for seq in (1, 2, 3):
            publisher.publish(an_event(seq))
        assert publisher.flush(5)
        arrived = [bound.get(no_ack=True) for _ in range(3)]
        bound.delete()
    publisher.close()
    assert [json.loads(m.body)["seq"] if m else None for m in arrived] == [1, 2, 3]
    assert publisher.published == 3 and publisher.dropped == 0


@pytest.fixture
def bridged() -> Iterator[Celery]:
    """An app whose bridge is on, publishing from a background thread."""
    app = Celery("bridge-on-unit", broker="memory://", set_as_current=False)
    app.conf.update(baton_store="memory://", baton_bridge=True, baton_bridge_background=True)
    baton_celery.install(app)
    yield app
    baton_celery.uninstall(app)


def test_close_sends_what_is_queued_then_stops_and_forgets_the_publisher(
    bridged: Celery,
) -> None:
    runtime = baton_celery.install(bridged)
    with bridged.connection_for_read() as conn:
        bound: Any = Queue("bridge-unit-close", bridge_exchange("baton_celery.events"))(conn)  # type: ignore[no-untyped-call]
        bound.declare()
        for seq in (1, 2):
            bridge.publish(runtime, an_event(seq))
        publisher = bridge._by_runtime[runtime]
        thread = publisher._thread
        assert bridge.close(runtime, 5)
        arrived = [bound.get(no_ack=True) for _ in range(2)]
        bound.delete()
    assert [json.loads(m.body)["seq"] if m else None for m in arrived] == [1, 2]
    assert thread is not None and not thread.is_alive()
    assert publisher._conn is None
    assert runtime not in bridge._by_runtime and publisher not in bridge._publishers


def test_uninstall_closes_the_publisher_install_made(bridged: Celery) -> None:
    runtime = baton_celery.install(bridged)
    bridge.publish(runtime, an_event())
    publisher = bridge._by_runtime[runtime]
    thread = publisher._thread
    baton_celery.uninstall(bridged)
    assert thread is not None and not thread.is_alive()
    assert runtime not in bridge._by_runtime


def test_closing_a_full_queue_still_stops_the_thread(bridged: Celery) -> None:
    """The flush ran out of time with the queue full: the stop still gets in (one queued
    event is dropped for it), so the thread ends once the hung send returns."""
    bridged.conf.baton_bridge_queue_size = 1
    publisher = Publisher(bridged, Config.from_app(bridged))
    release = threading.Event()
    publisher._send = lambda bodies: release.wait(10)  # type: ignore[assignment,method-assign]
    publisher.publish(an_event(1))  # taken by the sender, which hangs
    deadline = time.monotonic() + 5
    while publisher._queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.01)  # until the sender has taken it off the queue
    publisher.publish(an_event(2))  # fills the queue
    thread = publisher._thread
    assert publisher.close(0.1) is False
    release.set()
    assert thread is not None
    thread.join(5)
    assert not thread.is_alive() and publisher.dropped == 1


def test_a_failing_publish_logs_its_traceback_once_not_on_every_event(
    bridged: Celery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = baton_celery.install(bridged)

    def broken(runtime: object) -> None:
        raise RuntimeError("a bug in the bridge")

    monkeypatch.setattr(bridge, "publisher_for", broken)
    guard.reset()
    with caplog.at_level(logging.ERROR, "baton_celery"):
        for seq in range(1, 51):
            bridge.publish(runtime, an_event(seq))  # never raises
    [record] = [r for r in caplog.records if "bridge publish failed" in r.getMessage()]
    guard.reset()
    assert record.exc_info is not None and "a bug in the bridge" in caplog.text
