"""The listener's ordering (Reorderer): pure, on a fake clock."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from baton_celery.events import Event, StepUpdated, WorkflowFinished, utcnow
from baton_celery.reorder import Reorderer


def step(wid: str, name: str, state: str = "completed") -> StepUpdated:
    return StepUpdated(wid, None, name, "t", state, "j", 1, False, None, utcnow())


def finish(wid: str) -> WorkflowFinished:
    return WorkflowFinished(wid, None, "completed", (), utcnow())


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def out() -> list[Event]:
    return []


@pytest.fixture
def reorderer(out: list[Event], clock: Clock) -> Reorderer:
    return Reorderer(out.append, window=2.0, clock=clock)


def test_in_order_events_are_delivered_at_once(reorderer: Reorderer, out: list[Event]) -> None:
    a, b = step("w", "a"), step("w", "b")
    reorderer.push("w", 1, a)
    reorderer.push("w", 2, b)
    assert out == [a, b]


def test_early_events_wait_for_the_missing_number(reorderer: Reorderer, out: list[Event]) -> None:
    e1, e2, e3, fin = step("w", "a"), step("w", "b"), step("w", "c"), finish("w")
    reorderer.push("w", 4, fin)
    reorderer.push("w", 2, e2)
    assert out == []
    reorderer.push("w", 1, e1)
    assert out == [e1, e2]
    reorderer.push("w", 3, e3)
    assert out == [e1, e2, e3, fin]
    assert "w" not in reorderer.flows and "w" in reorderer.finished


def test_workflows_are_ordered_independently(reorderer: Reorderer, out: list[Event]) -> None:
    x2, y1 = step("x", "b"), step("y", "a")
    reorderer.push("x", 2, x2)
    reorderer.push("y", 1, y1)
    assert out == [y1]


def test_duplicates_and_stragglers_after_the_finish_are_dropped(
    reorderer: Reorderer, out: list[Event]
) -> None:
    e1, fin = step("w", "a"), finish("w")
    reorderer.push("w", 1, e1)
    reorderer.push("w", 1, e1)
    reorderer.push("w", 2, fin)
    reorderer.push("w", 1, e1)
    assert out == [e1, fin]
    assert reorderer.dropped == 2


def test_a_gap_is_held_for_the_window_then_skipped(
    reorderer: Reorderer, out: list[Event], clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    e3, fin = step("w", "c"), finish("w")
    reorderer.push("w", 3, e3)
    reorderer.push("w", 5, fin)
    clock.now = 1.9
    reorderer.tick()
    assert out == []
    clock.now = 2.0
    with caplog.at_level(logging.WARNING, "baton_celery.reorder"):
        reorderer.tick()
    # 1-2 never came: deliver 3; 4 is missing too, and 5 has waited as long: deliver it.
    assert out == [e3, fin]
    assert reorderer.gaps == 2
    assert "event(s) 1-2 never arrived" in caplog.text
    assert "w" in reorderer.finished and not reorderer.waiting


def test_own_events_count_without_being_delivered(reorderer: Reorderer, out: list[Event]) -> None:
    e2 = step("w", "b")
    reorderer.push("w", 2, e2)
    reorderer.push("w", 1, None)  # ours: already delivered locally
    assert out == [e2]
    reorderer.push("w", 3, None, final=True)  # our own finish ends the workflow
    assert "w" in reorderer.finished and "w" not in reorderer.flows


def test_tracked_workflows_are_bounded(out: list[Event], clock: Clock) -> None:
    reorderer = Reorderer(out.append, window=2.0, clock=clock, max_workflows=2)
    held = step("a", "x")
    reorderer.push("a", 2, held)
    reorderer.push("b", 1, step("b", "x"))
    reorderer.push("c", 1, step("c", "x"))  # evicts "a", flushing what it held
    assert held in out
    assert list(reorderer.flows) == ["b", "c"]


def test_idle_workflows_are_forgotten(out: list[Event], clock: Clock) -> None:
    reorderer = Reorderer(out.append, window=2.0, clock=clock, idle_after=10.0)
    reorderer.push("w", 1, step("w", "a"))
    clock.now = 61.0
    reorderer.tick()
    assert not reorderer.flows


def numbered(event: Event, seq: int) -> Event:
    return dataclasses.replace(event, seq=seq)


def test_a_gap_past_the_window_is_filled_from_the_store(
    out: list[Event], clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    stored = [numbered(step("w", n), i) for i, n in enumerate("abc", 1)]
    asked: list[tuple[str, int]] = []

    def fill(workflow_id: str, after: int) -> list[Event]:
        asked.append((workflow_id, after))
        return [e for e in stored if e.seq > after]

    reorderer = Reorderer(out.append, window=2.0, clock=clock, fill=fill)
    reorderer.push("w", 1, stored[0])
    reorderer.push("w", 3, stored[2])  # 2 was lost on the way
    reorderer.tick()
    assert out == [stored[0]] and asked == []  # within the window: wait
    clock.now = 2.5
    with caplog.at_level(logging.WARNING, "baton_celery.reorder"):
        reorderer.tick()
    assert asked == [("w", 1)]
    assert out == stored and reorderer.gaps == 0
    assert "never arrived" not in caplog.text


def test_a_gap_the_store_cannot_fill_is_skipped_after_the_window(
    out: list[Event], clock: Clock
) -> None:
    reorderer = Reorderer(out.append, window=2.0, clock=clock, fill=lambda w, after: [])
    first, third = numbered(step("w", "a"), 1), numbered(step("w", "c"), 3)
    reorderer.push("w", 1, first)
    reorderer.push("w", 3, third)
    clock.now = 2.5
    reorderer.tick()
    assert out == [first, third] and reorderer.gaps == 1


def test_open_follows_a_workflow_from_a_later_number(
    reorderer: Reorderer, out: list[Event]
) -> None:
    reorderer.open("w", 5)
    assert reorderer.knows("w") and reorderer.next_of("w") == 5
    fifth, fourth = step("w", "e"), step("w", "d")
    reorderer.push("w", 4, fourth)  # before this listener's window: dropped
    reorderer.push("w", 5, fifth)
    assert out == [fifth]
    reorderer.open("w", 1)  # already followed: unchanged
    assert reorderer.next_of("w") == 6
    reorderer.push("w", 6, finish("w"))
    assert reorderer.knows("w") and reorderer.next_of("w") is None  # finished


def test_a_workflow_idle_past_idle_after_goes_on_where_it_stopped(
    out: list[Event], clock: Clock
) -> None:
    """A step that runs for hours: its workflow is forgotten while idle, then taken up at
    the next number; what was delivered before is not delivered again."""
    reorderer = Reorderer(out.append, window=2.0, clock=clock, idle_after=60.0)
    first, second = numbered(step("w", "a", "executing"), 1), numbered(step("w", "a"), 2)
    reorderer.push("w", 1, first)
    clock.now = 120.0
    reorderer.tick()
    assert "w" not in reorderer.flows and reorderer.knows("w") and reorderer.next_of("w") == 2
    reorderer.push("w", 1, first)  # a replay of what was delivered: dropped
    reorderer.push("w", 2, second)
    assert out == [first, second]
