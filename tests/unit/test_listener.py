"""The listener's delivery through kombu's in-memory transport (a real kombu fanout, no
server)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

import baton_celery
from baton_celery import listener as listener_module
from baton_celery.announce import announce
from baton_celery.bridge import Publisher
from baton_celery.config import Config
from baton_celery.envelope import bridge_exchange
from baton_celery.events import Event, StepUpdated, WorkflowFinished, utcnow
from baton_celery.listener import Listener, listening
from baton_celery.testing import EventLog


def step(wid: str, name: str, state: str = "completed") -> StepUpdated:
    return StepUpdated(wid, None, name, "t", state, "j", 1, False, None, utcnow())


def finish(wid: str) -> WorkflowFinished:
    return WorkflowFinished(wid, None, "completed", (), utcnow())


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("listener-unit", broker="memory://", set_as_current=False)
    app.conf.baton_store = "memory://"
    app.conf.baton_bridge = True
    app.conf.baton_bridge_exchange = "unit-events"
    baton_celery.install(app)
    yield app
    baton_celery.uninstall(app)


def test_listener_delivers_what_a_publisher_sends(app: Celery) -> None:
    got: list[Event] = []
    done = threading.Event()

    def deliver(event: Event) -> None:
        got.append(event)
        if isinstance(event, WorkflowFinished):
            done.set()

    publisher = Publisher(app, Config.from_app(app))
    with Listener(app, deliver=deliver) as listener:
        assert listener.wait_ready(5)
        assert listening(app)
        listener._token = "someone-else"  # as if the publisher were another process
        made: list[Event] = [step("w", "a", "executing"), step("w", "a"), finish("w")]
        events = [replace(event, seq=seq) for seq, event in enumerate(made, 1)]
        for seq in (2, 1, 3):
            publisher.publish(events[seq - 1])  # inline: sent when this returns
        assert done.wait(5)
    publisher.close()
    assert got == events
    assert not listening(app)


def test_listener_skips_its_own_process_events(app: Celery) -> None:
    got: list[Event] = []
    publisher = Publisher(app, Config.from_app(app))
    with Listener(app, deliver=got.append) as listener:
        assert listener.wait_ready(5)
        publisher.publish(replace(step("w", "a"), seq=1))  # inline: sent when this returns
        # A foreign message after ours: when it is delivered, ours was handled before.
        marker = replace(step("other", "m"), seq=1)
        body = {"v": 1, "seq": 1, "origin": "x", "event": marker.to_dict()}
        seen = threading.Event()

        def deliver(event: Event) -> None:
            got.append(event)
            seen.set()

        listener._deliver_to = deliver
        with app.connection_for_write() as conn:
            ex = bridge_exchange("unit-events")
            conn.Producer().publish(
                json.dumps(body), exchange=ex, routing_key="", declare=[ex],
                content_type="application/json", content_encoding="utf-8",
            )  # fmt: skip
        assert seen.wait(5)
    publisher.close()
    assert got == [marker]


def test_listen_returns_a_running_listener(app: Celery) -> None:
    listener: Any = baton_celery.listen(app, timeout=5)
    try:
        assert listener.ready and listener.connections == 1
    finally:
        listener.stop()
    assert not listener.ready


def test_an_outage_logs_one_traceback_not_a_line_per_attempt(
    app: Celery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(listener_module, "RECONNECT_FIRST", 0.001)
    monkeypatch.setattr(listener_module, "RECONNECT_MAX", 0.001)
    listener = Listener(app)

    def refused(_: Any) -> None:
        if listener.reconnects >= 20:
            listener._stop.set()
        raise ConnectionRefusedError("the broker is down")

    monkeypatch.setattr(listener, "_feed", lambda: SimpleNamespace(run=refused))
    with caplog.at_level(logging.WARNING, "baton_celery.listener"):
        listener.start()
        assert listener._thread is not None
        listener._thread.join(5)
    assert listener.reconnects == 20
    [record] = [r for r in caplog.records if "lost its connection" in r.getMessage()]
    assert record.exc_info is not None


def test_the_back_off_starts_again_after_a_good_connection(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener_module, "RECONNECT_FIRST", 0.001)
    listener = Listener(app)
    waits: list[float] = []
    listener._connection_lost = lambda message, exc, backoff: waits.append(backoff)  # type: ignore[assignment]

    def consume(_: Any) -> None:
        if len(waits) == 3:
            listener.connections += 1  # this attempt got through, then the broker went
        if len(waits) == 5:
            listener._stop.set()
        raise ConnectionResetError("gone")

    monkeypatch.setattr(listener, "_feed", lambda: SimpleNamespace(run=consume))
    listener.start()
    assert listener._thread is not None
    listener._thread.join(5)
    assert waits == [0.001, 0.002, 0.004, 0.001, 0.002]


def test_events_this_process_delivered_are_not_delivered_again_from_the_store(
    app: Celery,
) -> None:
    """A process that makes events and listens: its own events reach its receivers at
    once; when the live feed does not bring them back (its bridge publish failed), the
    listener's gap fill from the store must not deliver them a second time."""
    from baton_celery.stores.records import StepRecord, WorkflowRecord

    runtime = baton_celery.install(app)
    store = runtime.store
    steps = {n: StepRecord(n, "t", f"j-{n}", {}, dispatch=1) for n in ("a", "b")}
    store.create(WorkflowRecord("wf-own", None, steps))
    got = EventLog()
    publisher = Publisher(app, Config.from_app(app))
    with Listener(app, deliver=got.add, reorder_window=0.05) as listener:
        assert listener.wait_ready(5)
        listener._token = "someone-else"  # the publisher stands for the workers
        remote = store.begin("wf-own", "a", 1).events  # seq 1, by "a worker"
        publisher.publish(remote[0])
        # This process settles b: announced here (its own receivers), never published.
        own = store.settle("wf-own", "b", "completed")
        app.conf.baton_bridge = False
        runtime._config = None  # read the settings again: this process's bridge is off
        announce(runtime, own)
        last = store.settle("wf-own", "a", "completed").events  # seq 3 and the finish
        app.conf.baton_bridge = True
        runtime._config = None
        for event in last:
            publisher.publish(event)
        got.wait_finished(5)
    publisher.close()
    assert [e.seq for e in got] == [1, 3, 4]  # 2 was delivered here, by announce


@pytest.mark.parametrize(
    ("since", "error"),
    [
        (datetime(2026, 1, 1), "timezone-aware"),
        (datetime.now(timezone.utc) + timedelta(hours=1), "in the future"),
        ("10m", "must be a datetime"),
    ],
)
def test_since_must_be_an_aware_time_not_in_the_future(app: Celery, since: Any, error: str) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        Listener(app, since=since)


def test_a_replay_the_store_cannot_serve_is_tried_again_and_live_goes_on(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store is down when the listener starts: it logs, keeps its live feed, and
    replays once the store answers again."""
    from baton_celery.stores.records import StepRecord, WorkflowRecord

    runtime = baton_celery.install(app)
    store = runtime.store
    store.create(WorkflowRecord("wf-late", None, {"a": StepRecord("a", "t", "j", {}, dispatch=1)}))
    since = datetime.now(timezone.utc) - timedelta(minutes=1)
    store.begin("wf-late", "a", 1)
    calls = {"n": 0}
    real = store.workflows

    def flaky(**kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise baton_celery.StoreError("the store is down")
        return real(**kwargs)

    monkeypatch.setattr(store, "workflows", flaky)
    monkeypatch.setattr(listener_module, "REPLAY_RETRY", 0.05)
    got = EventLog()
    publisher = Publisher(app, Config.from_app(app))
    with Listener(app, since=since, deliver=got.add) as listener:
        assert listener.wait_ready(5)  # live, although the replay failed
        listener._token = "someone-else"  # the publisher stands for a worker
        for event in store.settle("wf-late", "a", "completed").events:
            publisher.publish(event)
        got.wait_finished(5)
    publisher.close()
    assert calls["n"] >= 2
    assert [e.seq for e in got] == [1, 2, 3]  # the one made before it started, replayed


def test_a_listener_sends_the_finish_telemetry_of_other_processes(app: Celery) -> None:
    from baton_celery.pubsub import workflow_finished_telemetry
    from baton_celery.stores.records import StepRecord, WorkflowRecord

    store = baton_celery.install(app).store
    store.create(WorkflowRecord("wf-t", None, {"a": StepRecord("a", "t", "j", {}, dispatch=1)}))
    events = [*store.begin("wf-t", "a", 1).events, *store.settle("wf-t", "a", "completed").events]
    sent: list[dict[str, Any]] = []

    def telemetry(workflow_id: str, **kwargs: Any) -> None:
        sent.append({"workflow_id": workflow_id, **kwargs})

    workflow_finished_telemetry.connect(telemetry)
    publisher = Publisher(app, Config.from_app(app))
    try:
        got = EventLog()
        with Listener(app, deliver=got.add) as listener:
            assert listener.wait_ready(5)
            listener._token = "someone-else"
            for event in events:
                publisher.publish(event)
            got.wait_finished(5)
    finally:
        workflow_finished_telemetry.disconnect(telemetry)
        publisher.close()
    [one] = sent
    assert (one["workflow_id"], one["outcome"], one["total_count"]) == ("wf-t", "completed", 1)
    assert one["failed_count"] == 0 and one["duration"] >= 0
