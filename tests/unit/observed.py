"""What the instrumentation's unit tests share: an app with a few step tasks on a memory
store, run by an in-process solo worker."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.worker import state as worker_state

import baton_celery
from baton_celery import Workflow, WorkflowFinished

TIMEOUT = 15.0
_apps = itertools.count()


def make_app(**conf: Any) -> Celery:
    """A fresh app (memory broker and store) with the tasks ``ok``, ``flaky`` (fails
    ``times`` times, retried) and ``broken`` (always raises), baton installed."""
    n = next(_apps)
    app = Celery(f"unit-observed-{n}", set_as_current=False)
    settings: dict[str, Any] = {
        "broker_url": "memory://",
        "result_backend": "cache+memory://",
        "task_ignore_result": True,
        "broker_connection_retry_on_startup": True,
        "baton_store": "memory://",
    }
    app.conf.update({**settings, **conf})
    runs: dict[str, int] = {}

    @app.task(name="obs.ok", shared=False)
    def ok(name: str) -> str:
        return name

    @app.task(name="obs.flaky", shared=False, bind=True, max_retries=3)
    def flaky(self: Any, name: str, times: int) -> str:
        runs[name] = runs.get(name, 0) + 1
        if runs[name] <= times:
            try:
                raise ConnectionError(f"{name} flaked")
            except ConnectionError as exc:
                raise self.retry(exc=exc, countdown=0) from None
        return name

    @app.task(name="obs.broken", shared=False)
    def broken(name: str) -> str:
        raise ValueError(f"{name} is broken")

    @app.task(name="obs.wake", shared=False)
    def wake() -> None:
        return None

    assert app.conf.broker_url  # configuration loaded, as in a worker: install reads it
    baton_celery.install(app)
    return app


def sig(app: Celery, task: str, *args: Any) -> Any:
    return app.tasks[f"obs.{task}"].s(*args)


def diamond(app: Celery, label: str) -> Workflow:
    """a -> (b, c) -> d"""
    return (
        Workflow(label=label)
        .add("a", sig(app, "ok", "a"))
        .add("b", sig(app, "ok", "b"), deps=["a"])
        .add("c", sig(app, "ok", "c"), deps=["a"])
        .add("d", sig(app, "ok", "d"), deps=["b", "c"])
    )


def failing(app: Celery, label: str) -> Workflow:
    """x (fails once, retried) -> y; x -> z (broken) -> w (cancelled)"""
    return (
        Workflow(label=label)
        .add("x", sig(app, "flaky", f"x-{label}", 1))
        .add("y", sig(app, "ok", "y"), deps=["x"])
        .add("z", sig(app, "broken", "z"), deps=["x"])
        .add("w", sig(app, "ok", "w"), deps=["z"])
    )


@contextlib.contextmanager
def worker(app: Celery) -> Iterator[None]:
    root_level = logging.getLogger().level
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=TIMEOUT):
        try:
            yield
        finally:
            # The solo loop notices the stop flag between deliveries: wake it.
            worker_state.should_terminate = 0
            app.tasks["obs.wake"].delay()
            app.tasks["obs.wake"].delay()
    logging.getLogger().setLevel(root_level)


def run(app: Celery, *workflows: Workflow) -> list[WorkflowFinished]:
    """Start the workflows and wait for each to finish (a worker must be running)."""
    handles = [w.apply_async() for w in workflows]
    return [h.wait(timeout=TIMEOUT) for h in handles]
