"""Topics "workflow:all" and "workflow:{id}", the receiver call shape, isolation of a
raising receiver, the broadcast_* functions and the finish telemetry."""

from __future__ import annotations

import gc
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import pytest

import baton_celery
from baton_celery import broadcasts, guard, pubsub
from baton_celery.events import Event, StepUpdated, WorkflowFinished

STAMP = datetime(2026, 11, 24, 8, 0, tzinfo=timezone.utc)


class Recorder:
    """A receiver that keeps every call: (workflow_id positional, keyword arguments)."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        with self.lock:
            self.calls.append((args, kwargs))

    @property
    def events(self) -> list[Event]:
        return [kwargs["event"] for _, kwargs in self.calls]


@pytest.fixture(autouse=True)
def _fresh_failure_log() -> Iterator[None]:
    """Each test sees its first failure of a kind logged in full (see baton_celery.guard)."""
    guard.reset()
    yield
    guard.reset()


@pytest.fixture
def subscriptions() -> Iterator[Callable[..., None]]:
    """Subscribe through this; everything is dropped again after the test."""
    made: list[tuple[str | None, Callable[..., Any]]] = []

    def add(receiver: Callable[..., Any], workflow_id: str | None = None) -> None:
        if workflow_id is None:
            baton_celery.subscribe_all(receiver)
        else:
            baton_celery.subscribe(workflow_id, receiver)
        made.append((workflow_id, receiver))

    yield add
    for workflow_id, receiver in made:
        if workflow_id is None:
            baton_celery.unsubscribe_all(receiver)
        else:
            baton_celery.unsubscribe(workflow_id, receiver)


def new_id() -> str:
    return str(uuid.uuid4())


def step_fields(workflow_id: str, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "workflow_id": workflow_id,
        "workflow_label": "etl",
        "step_name": "load",
        "worker": "tasks.load",
        "job_id": "job-9",
        "attempt": 1,
    }
    fields.update(overrides)
    return fields


# --- topics -------------------------------------------------------------------------


def test_topic_names() -> None:
    assert pubsub.ALL_TOPIC == "workflow:all"
    assert pubsub.topic("abc-123") == "workflow:abc-123"


def test_subscribe_receives_only_its_own_workflow(subscriptions: Callable[..., None]) -> None:
    mine, other = new_id(), new_id()
    rec = Recorder()
    subscriptions(rec, mine)
    broadcasts.broadcast_step_started(**step_fields(other))
    assert rec.calls == []
    event = broadcasts.broadcast_step_started(**step_fields(mine))
    assert rec.calls == [((mine,), {"event": event})]


def test_subscribe_all_receives_every_workflow(subscriptions: Callable[..., None]) -> None:
    one, two = new_id(), new_id()
    rec = Recorder()
    subscriptions(rec)
    first = broadcasts.broadcast_step_started(**step_fields(one))
    second = baton_celery.broadcast_workflow_finished(two, None, "completed", [])
    assert rec.calls == [((one,), {"event": first}), ((two,), {"event": second})]


def test_receiver_is_called_blinker_style(subscriptions: Callable[..., None]) -> None:
    """receiver(workflow_id, event=...): the id positionally, the event by keyword."""
    wid = new_id()
    seen: list[tuple[str, Event]] = []

    def receiver(sender: str, *, event: Event) -> None:
        seen.append((sender, event))

    subscriptions(receiver, wid)
    event = broadcasts.broadcast_step_completed(**step_fields(wid), has_result=True)
    assert seen == [(wid, event)]


def test_specific_topic_is_sent_before_the_all_topic(
    subscriptions: Callable[..., None],
) -> None:
    wid = new_id()
    order: list[str] = []
    subscriptions(lambda sender, event: order.append("all"))
    subscriptions(lambda sender, event: order.append("one"), wid)
    broadcasts.broadcast_step_snoozed(**step_fields(wid))
    assert order == ["one", "all"]


def test_unsubscribe_stops_delivery_and_forgets_the_empty_topic() -> None:
    wid = new_id()
    rec = Recorder()
    baton_celery.subscribe(wid, rec)
    try:
        assert pubsub.topic(wid) in pubsub._topics
        broadcasts.broadcast_step_started(**step_fields(wid))
    finally:
        baton_celery.unsubscribe(wid, rec)
    broadcasts.broadcast_step_completed(**step_fields(wid))
    assert [e.state for e in rec.events if isinstance(e, StepUpdated)] == ["executing"]
    assert pubsub.topic(wid) not in pubsub._topics


def test_unsubscribe_keeps_the_other_receivers(subscriptions: Callable[..., None]) -> None:
    wid = new_id()
    stays, goes = Recorder(), Recorder()
    subscriptions(stays, wid)
    baton_celery.subscribe(wid, goes)
    baton_celery.unsubscribe(wid, goes)
    broadcasts.broadcast_step_started(**step_fields(wid))
    assert len(stays.calls) == 1
    assert goes.calls == []


def test_unsubscribe_of_an_unknown_topic_or_receiver_is_harmless(
    subscriptions: Callable[..., None],
) -> None:
    wid = new_id()
    baton_celery.unsubscribe(new_id(), Recorder())  # no such topic
    rec = Recorder()
    subscriptions(rec, wid)
    baton_celery.unsubscribe(wid, Recorder())  # topic exists, receiver does not
    broadcasts.broadcast_step_started(**step_fields(wid))
    assert len(rec.calls) == 1


def test_unsubscribe_all_stops_delivery() -> None:
    rec = Recorder()
    baton_celery.subscribe_all(rec)
    try:
        broadcasts.broadcast_step_started(**step_fields(new_id()))
    finally:
        baton_celery.unsubscribe_all(rec)
    broadcasts.broadcast_step_started(**step_fields(new_id()))
    assert len(rec.calls) == 1


def test_subscribing_twice_delivers_once(subscriptions: Callable[..., None]) -> None:
    wid = new_id()
    rec = Recorder()
    subscriptions(rec, wid)
    subscriptions(rec, wid)
    broadcasts.broadcast_step_started(**step_fields(wid))
    assert len(rec.calls) == 1


def test_subscriptions_hold_strong_references() -> None:
    """A lambda subscribed and then forgotten by the caller still receives."""
    wid = new_id()
    got: list[Event] = []
    receiver = lambda sender, event: got.append(event)  # noqa: E731
    baton_celery.subscribe(wid, receiver)
    try:
        gc.collect()
        broadcasts.broadcast_step_started(**step_fields(wid))
    finally:
        baton_celery.unsubscribe(wid, receiver)
    assert len(got) == 1


def test_a_receiver_may_unsubscribe_itself_while_being_called() -> None:
    wid = new_id()
    calls: list[str] = []

    def once(sender: str, event: Event) -> None:
        calls.append(sender)
        baton_celery.unsubscribe(wid, once)

    after = Recorder()
    baton_celery.subscribe(wid, once)
    baton_celery.subscribe(wid, after)
    try:
        broadcasts.broadcast_step_started(**step_fields(wid))
        broadcasts.broadcast_step_completed(**step_fields(wid))
    finally:
        baton_celery.unsubscribe(wid, after)
    assert calls == [wid]
    assert len(after.calls) == 2


# --- a raising receiver -------------------------------------------------------------


def test_a_raising_receiver_is_logged_and_others_still_run(
    subscriptions: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    wid = new_id()
    before, after, everyone = Recorder(), Recorder(), Recorder()

    def broken(sender: str, event: Event) -> None:
        raise RuntimeError("subscriber bug")

    subscriptions(before, wid)
    subscriptions(broken, wid)
    subscriptions(after, wid)
    subscriptions(broken)
    subscriptions(everyone)
    with caplog.at_level(logging.ERROR, logger="baton_celery"):
        event = broadcasts.broadcast_step_discarded(**step_fields(wid), error="ValueError: x")
    assert [c[1]["event"] for c in before.calls] == [event]
    assert [c[1]["event"] for c in after.calls] == [event]
    assert [c[1]["event"] for c in everyone.calls] == [event]
    failures = [r for r in caplog.records if "receiver" in r.getMessage()]
    assert len(failures) == 2  # once on the workflow's topic, once on "workflow:all"
    for record in failures:
        assert record.levelno == logging.ERROR
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], RuntimeError)
        assert wid in record.getMessage()


def test_a_raising_telemetry_receiver_does_not_escape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(sender: str, **kwargs: Any) -> None:
        raise ZeroDivisionError("telemetry bug")

    pubsub.workflow_finished_telemetry.connect(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="baton_celery.pubsub"):
            event = baton_celery.broadcast_workflow_finished(new_id(), None, "completed", [])
    finally:
        pubsub.workflow_finished_telemetry.disconnect(broken)
    assert event.outcome == "completed"
    assert any(
        r.exc_info is not None and isinstance(r.exc_info[1], ZeroDivisionError)
        for r in caplog.records
    )


# --- broadcast_step_* ---------------------------------------------------------------

BROADCASTS = [
    (baton_celery.broadcast_step_started, "executing"),
    (baton_celery.broadcast_step_completed, "completed"),
    (baton_celery.broadcast_step_retrying, "retryable"),
    (baton_celery.broadcast_step_discarded, "discarded"),
    (baton_celery.broadcast_step_cancelled, "cancelled"),
    (baton_celery.broadcast_step_snoozed, "snoozed"),
]


@pytest.mark.parametrize(("broadcast", "state"), BROADCASTS)
def test_each_broadcast_sends_its_state(
    broadcast: Callable[..., StepUpdated], state: str, subscriptions: Callable[..., None]
) -> None:
    wid = new_id()
    rec = Recorder()
    subscriptions(rec, wid)
    returned = broadcast(**step_fields(wid, attempt=3), has_result=True, error="E: x")
    assert rec.events == [returned]
    assert returned == StepUpdated(
        workflow_id=wid,
        workflow_label="etl",
        step_name="load",
        worker="tasks.load",
        state=state,
        job_id="job-9",
        attempt=3,
        has_result=True,
        error="E: x",
        timestamp=returned.timestamp,
    )


@pytest.mark.parametrize(("broadcast", "state"), BROADCASTS)
def test_broadcast_defaults_and_timestamp(
    broadcast: Callable[..., StepUpdated], state: str
) -> None:
    before = datetime.now(timezone.utc)
    event = broadcast(**step_fields(new_id()))
    after = datetime.now(timezone.utc)
    assert event.state == state
    assert event.has_result is False
    assert event.error is None
    assert event.timestamp.utcoffset() == timedelta(0)
    assert before <= event.timestamp <= after


def test_broadcast_keeps_an_explicit_timestamp() -> None:
    event = baton_celery.broadcast_step_cancelled(**step_fields(new_id()), timestamp=STAMP)
    assert event.timestamp == STAMP


# --- broadcast_workflow_finished ----------------------------------------------------


def test_broadcast_workflow_finished_sends_the_event(
    subscriptions: Callable[..., None],
) -> None:
    wid = new_id()
    rec = Recorder()
    subscriptions(rec, wid)
    event = baton_celery.broadcast_workflow_finished(
        wid, "etl", "failed", ["b", "a"], total_count=4, duration=1.5, timestamp=STAMP
    )
    assert rec.events == [event]
    assert event == WorkflowFinished(
        workflow_id=wid,
        workflow_label="etl",
        outcome="failed",
        failed_steps=("b", "a"),
        timestamp=STAMP,
    )


def test_broadcast_workflow_finished_sends_telemetry(
    subscriptions: Callable[..., None],
) -> None:
    wid = new_id()
    order: list[str] = []
    telemetry: list[tuple[Any, dict[str, Any]]] = []

    def on_telemetry(sender: Any, **kwargs: Any) -> None:
        order.append("telemetry")
        telemetry.append((sender, kwargs))

    subscriptions(lambda sender, event: order.append("event"), wid)
    baton_celery.workflow_finished_telemetry.connect(on_telemetry)
    try:
        baton_celery.broadcast_workflow_finished(
            wid, "etl", "failed", ["x", "y"], total_count=5, duration=2.25
        )
    finally:
        baton_celery.workflow_finished_telemetry.disconnect(on_telemetry)
    assert telemetry == [
        (wid, {"outcome": "failed", "failed_count": 2, "total_count": 5, "duration": 2.25})
    ]
    assert order == ["event", "telemetry"]


def test_telemetry_of_a_completed_workflow_counts_no_failures() -> None:
    telemetry: list[dict[str, Any]] = []

    def on_telemetry(sender: Any, **kwargs: Any) -> None:
        telemetry.append(kwargs)

    baton_celery.workflow_finished_telemetry.connect(on_telemetry)
    try:
        baton_celery.broadcast_workflow_finished(
            new_id(), None, "completed", (), total_count=3, duration=0.0
        )
    finally:
        baton_celery.workflow_finished_telemetry.disconnect(on_telemetry)
    assert telemetry == [
        {"outcome": "completed", "failed_count": 0, "total_count": 3, "duration": 0.0}
    ]


def test_broadcast_workflow_finished_rejects_a_bad_outcome() -> None:
    rec = Recorder()
    baton_celery.subscribe_all(rec)
    try:
        with pytest.raises(ValueError):
            baton_celery.broadcast_workflow_finished(new_id(), None, "partial", [])
    finally:
        baton_celery.unsubscribe_all(rec)
    assert rec.calls == []


def test_broadcasts_from_many_threads_all_arrive(subscriptions: Callable[..., None]) -> None:
    wid = new_id()
    rec = Recorder()
    subscriptions(rec, wid)
    start = threading.Barrier(8)

    def send(n: int) -> None:
        start.wait(5)
        for i in range(25):
            broadcasts.broadcast_step_started(**step_fields(wid, step_name=f"s{n}-{i}"))

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(rec.calls) == 200
    assert len({e.step_name for e in rec.events if isinstance(e, StepUpdated)}) == 200
