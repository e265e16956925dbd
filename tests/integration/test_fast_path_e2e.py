"""End-to-end: steps on the fast path (baton_fast_begin, the default: a fresh first
delivery runs without asking the store's gate, its begin sent with its settle, or by
the watchdog once it runs past baton_running_after), on real prefork workers over Redis
and RabbitMQ with the Redis store, with no receiver in the workers. The guarantees hold:
a long step shows as executing while it runs, a retried step counts its attempts, a
redelivered step runs again as a new attempt and settles once, every event is in the
history in order, one finish."""

from __future__ import annotations

import os
import signal
from typing import Callable

import pytest
from harness import BROKERS, Cluster

import baton_celery
from baton_celery import Workflow, collect_events
from baton_celery.events import StepUpdated

TIMEOUT = 60.0


@pytest.fixture(params=sorted(BROKERS))
def quiet(request: pytest.FixtureRequest, make_cluster: Callable[..., Cluster]) -> Cluster:
    """Workers without receivers of their own (the events reach this process through the
    store's channel), acks_late so that a killed pool process's step is redelivered."""
    return make_cluster(
        "fast", request.param, store="redis", bridge=True, observe_events=False,
        acks_late=True, prefetch=1, fast_begin=True,
    )  # fmt: skip


def attempts(events: list[baton_celery.Event], step: str) -> list[tuple[str, int]]:
    return [
        (e.state, e.attempt) for e in events if isinstance(e, StepUpdated) and e.step_name == step
    ]


def test_a_diamond_with_a_retry_and_a_redelivery(quiet: Cluster) -> None:
    steps = quiet.steps()
    with collect_events() as log, baton_celery.listen(quiet.app) as listener:
        assert listener.ready
        handle = (
            Workflow(label="fast")
            .add("a", steps.s("a", block=True))
            .add("b", steps.s("b", fail_times=1), deps=["a"])
            .add("c", steps.s("c", block=True), deps=["a"])
            .add("d", steps.s("d"), deps=["b", "c"])
            .apply_async(app=quiet.app)
        )
        steps.wait_started("a")
        log.wait_for("a", "executing", timeout=TIMEOUT)  # the watchdog's begin
        status = handle.status().steps
        assert (status["a"].state, status["b"].state) == ("executing", "pending")
        steps.release("a")
        first = steps.wait_started("c")
        log.wait_for("c", "executing", timeout=TIMEOUT)  # it shows as running: then killed
        os.kill(first, signal.SIGKILL)  # redelivered: runs again in a new pool process
        assert steps.wait_started("c") != first
        steps.release("c")
        (finished,) = log.wait_finished(timeout=TIMEOUT)
    assert finished.outcome == "completed"
    history = handle.events()
    assert list(log) == history, "every event once, in order, as the store has them"
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    assert attempts(history, "a") == [("executing", 1), ("completed", 1)]
    assert attempts(history, "b") == [
        ("executing", 1), ("retryable", 1), ("executing", 2), ("completed", 2)
    ]  # fmt: skip
    assert attempts(history, "c") == [("executing", 1), ("executing", 2), ("completed", 2)]
    assert attempts(history, "d") == [("executing", 1), ("completed", 1)]
    assert steps.calls("b") == 2 and steps.calls("c") == 2 and steps.calls("d") == 1
