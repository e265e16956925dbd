"""Helpers for testing code that uses baton_celery (in the spirit of blinker's
``connected_to``)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from . import pubsub
from .events import Event, StepUpdated, WorkflowFinished

__all__ = ["EventLog", "collect_events"]


class EventLog(list[Event]):
    """The events collected so far, in arrival order, with small conveniences."""

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition()

    def add(self, event: Event) -> None:
        """Take one event (a listener's ``deliver``: ``listen(app, deliver=log.add)``)."""
        with self._cond:
            self.append(event)
            self._cond.notify_all()

    def _receive(self, workflow_id: str, event: Event, **_: Any) -> None:
        self.add(event)

    @property
    def steps(self) -> list[StepUpdated]:
        return [e for e in self if isinstance(e, StepUpdated)]

    @property
    def finished(self) -> list[WorkflowFinished]:
        return [e for e in self if isinstance(e, WorkflowFinished)]

    def states(self, step_name: str) -> list[str]:
        """The states one step went through, in order."""
        return [e.state for e in self.steps if e.step_name == step_name]

    def wait_for(self, step_name: str, state: str, timeout: float = 10.0) -> StepUpdated:
        """Block until a step reached ``state`` (its first such event); TimeoutError
        otherwise."""

        def found() -> StepUpdated | None:
            return next(
                (e for e in self.steps if (e.step_name, e.state) == (step_name, state)), None
            )

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout):
                raise TimeoutError(f"step {step_name!r} did not reach {state!r}")
            event = found()
            assert event is not None
            return event

    def wait_finished(self, timeout: float = 10.0, count: int = 1) -> list[WorkflowFinished]:
        """Block until ``count`` WorkflowFinished events arrived; TimeoutError otherwise."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.finished) >= count, timeout):
                raise TimeoutError(f"{len(self.finished)} of {count} workflows finished")
            return self.finished


@contextlib.contextmanager
def collect_events(workflow_id: str | None = None) -> Iterator[EventLog]:
    """Collect the events sent in this process while the block runs.

    With ``workflow_id``, only that workflow's topic; otherwise "workflow:all"::

        with collect_events() as events:
            handle = workflow.apply_async()
            events.wait_finished()
        assert events.finished[0].outcome == "completed"
    """
    log = EventLog()
    if workflow_id is None:
        pubsub.subscribe_all(log._receive)
    else:
        pubsub.subscribe(workflow_id, log._receive)
    try:
        yield log
    finally:
        if workflow_id is None:
            pubsub.unsubscribe_all(log._receive)
        else:
            pubsub.unsubscribe(workflow_id, log._receive)
