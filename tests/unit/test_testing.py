"""collect_events(): the helper for users' own tests."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest

import baton_celery
from baton_celery import broadcasts, collect_events, pubsub
from baton_celery.events import StepUpdated, WorkflowFinished


def new_id() -> str:
    return str(uuid.uuid4())


def step(workflow_id: str, name: str, state: str) -> StepUpdated:
    fields: dict[str, Any] = {
        "workflow_id": workflow_id,
        "workflow_label": None,
        "step_name": name,
        "worker": f"tasks.{name}",
        "job_id": f"job-{name}",
        "attempt": 1,
    }
    send = {
        "executing": broadcasts.broadcast_step_started,
        "completed": broadcasts.broadcast_step_completed,
        "retryable": broadcasts.broadcast_step_retrying,
        "cancelled": broadcasts.broadcast_step_cancelled,
    }[state]
    return send(**fields)


def finish(workflow_id: str, outcome: str = "completed") -> WorkflowFinished:
    return baton_celery.broadcast_workflow_finished(workflow_id, None, outcome, [])


def test_collects_every_workflow_in_order() -> None:
    one, two = new_id(), new_id()
    with collect_events() as events:
        a = step(one, "a", "executing")
        b = step(two, "b", "executing")
        c = finish(one)
    assert list(events) == [a, b, c]
    assert events.steps == [a, b]
    assert events.finished == [c]


def test_collects_one_workflow_only() -> None:
    mine, other = new_id(), new_id()
    with collect_events(mine) as events:
        step(other, "x", "executing")
        mine_event = step(mine, "a", "completed")
        finish(other)
    assert list(events) == [mine_event]
    assert events.finished == []


def test_stops_collecting_when_the_block_ends() -> None:
    wid = new_id()
    all_receivers = len(pubsub._all.receivers)
    with collect_events() as everything, collect_events(wid) as one:
        step(wid, "a", "executing")
    step(wid, "a", "completed")
    finish(wid)
    assert len(everything) == 1
    assert len(one) == 1
    assert len(pubsub._all.receivers) == all_receivers
    assert pubsub.topic(wid) not in pubsub._topics


def test_unsubscribes_even_when_the_block_raises() -> None:
    wid = new_id()
    with pytest.raises(KeyError), collect_events(wid) as events:
        raise KeyError("test failure")
    step(wid, "a", "executing")
    assert list(events) == []
    assert pubsub.topic(wid) not in pubsub._topics


def test_states_of_one_step() -> None:
    wid = new_id()
    with collect_events(wid) as events:
        step(wid, "a", "executing")
        step(wid, "b", "executing")
        step(wid, "a", "retryable")
        step(wid, "a", "executing")
        step(wid, "a", "completed")
        step(wid, "b", "cancelled")
    assert events.states("a") == ["executing", "retryable", "executing", "completed"]
    assert events.states("b") == ["executing", "cancelled"]
    assert events.states("nope") == []


def test_wait_finished_returns_at_once_when_already_finished() -> None:
    wid = new_id()
    with collect_events(wid) as events:
        done = finish(wid, "failed")
        assert events.wait_finished(timeout=0.01) == [done]


def test_wait_finished_times_out() -> None:
    with collect_events(new_id()) as events, pytest.raises(TimeoutError, match="0 of 1"):
        events.wait_finished(timeout=0.05)


def test_wait_finished_wakes_up_on_an_event_from_another_thread() -> None:
    one, two = new_id(), new_id()
    go = threading.Event()

    def sender() -> None:
        go.wait(5)
        step(one, "a", "completed")
        finish(one)
        finish(two)

    with collect_events() as events:
        thread = threading.Thread(target=sender)
        thread.start()
        go.set()
        finished = events.wait_finished(timeout=10, count=2)
        thread.join(5)
    assert [f.workflow_id for f in finished] == [one, two]


def test_wait_finished_counts() -> None:
    with collect_events() as events:
        finish(new_id())
        with pytest.raises(TimeoutError, match="1 of 2"):
            events.wait_finished(timeout=0.05, count=2)


def test_collectors_are_independent() -> None:
    wid = new_id()
    with collect_events(wid) as outer:
        step(wid, "a", "executing")
        with collect_events(wid) as inner:
            step(wid, "a", "completed")
        step(wid, "b", "executing")
    assert len(outer) == 3
    assert len(inner) == 1
