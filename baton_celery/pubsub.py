"""Topics and broadcasting: "workflow:all" and "workflow:{id}", carried by blinker signals.

Receivers are called blinker-style, ``receiver(workflow_id, event=event)``. Unlike a bare
blinker ``send``, a receiver that raises is logged and the others still run: these sends
happen inside Celery tasks, and a subscriber's bug must never fail the user's task.
Subscriptions hold strong references; drop them with :func:`unsubscribe` /
:func:`unsubscribe_all`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Callable

from blinker import NamedSignal, Namespace

from .events import (
    CANCELLED,
    COMPLETED,
    DISCARDED,
    EXECUTING,
    RETRYABLE,
    SNOOZED,
    Event,
    StepUpdated,
    WorkflowFinished,
    utcnow,
)

__all__ = [
    "ALL_TOPIC",
    "broadcast",
    "broadcast_step_cancelled",
    "broadcast_step_completed",
    "broadcast_step_discarded",
    "broadcast_step_retrying",
    "broadcast_step_snoozed",
    "broadcast_step_started",
    "broadcast_workflow_finished",
    "subscribe",
    "subscribe_all",
    "topic",
    "unsubscribe",
    "unsubscribe_all",
    "workflow_finished_telemetry",
]

logger = logging.getLogger(__name__)

ALL_TOPIC = "workflow:all"
RECEIVER_FAILED = (
    "baton_celery: receiver %r raised on %s for workflow %s; other receivers still run"
)

Receiver = Callable[..., Any]

_topics = Namespace()
_topics_lock = threading.Lock()
_all = _topics.signal(ALL_TOPIC)

#: Sent once per finished workflow, after the WorkflowFinished event, with
#: ``sender=workflow_id`` and keyword arguments ``outcome``, ``failed_count``,
#: ``total_count`` and ``duration`` (seconds from the workflow's start, or None).
workflow_finished_telemetry: NamedSignal = Namespace().signal("baton.workflow.finished")


def topic(workflow_id: str) -> str:
    """The name of one workflow's topic."""
    return f"workflow:{workflow_id}"


def subscribe_all(receiver: Receiver) -> None:
    """Receive every event of every workflow ("workflow:all")."""
    _all.connect(receiver, weak=False)


def unsubscribe_all(receiver: Receiver) -> None:
    """Drop a :func:`subscribe_all` subscription."""
    _all.disconnect(receiver)


def subscribe(workflow_id: str, receiver: Receiver) -> None:
    """Receive the events of one workflow ("workflow:{workflow_id}")."""
    with _topics_lock:
        _topics.signal(topic(workflow_id)).connect(receiver, weak=False)


def unsubscribe(workflow_id: str, receiver: Receiver) -> None:
    """Drop a :func:`subscribe` subscription; the topic is forgotten once it is empty."""
    name = topic(workflow_id)
    with _topics_lock:
        signal = _topics.get(name)
        if signal is None:
            return
        signal.disconnect(receiver)
        if not signal.receivers:
            del _topics[name]


def _send(signal: NamedSignal, workflow_id: str, **kwargs: Any) -> None:
    """Call each receiver in isolation: one that raises is logged, the rest still run."""
    # Snapshot the receivers: one may unsubscribe itself while we iterate.
    for receiver in list(signal.receivers_for(workflow_id)):
        try:
            receiver(workflow_id, **kwargs)
        except Exception:
            logger.exception(RECEIVER_FAILED, receiver, signal.name, workflow_id)


def broadcast(event: Event) -> None:
    """Send an event to its workflow's topic, then to "workflow:all"."""
    specific = _topics.get(topic(event.workflow_id))
    if specific is not None and specific.receivers:
        _send(specific, event.workflow_id, event=event)
    if _all.receivers:
        _send(_all, event.workflow_id, event=event)


def _step_event(
    state: str,
    *,
    workflow_id: str,
    workflow_label: str | None,
    step_name: str,
    worker: str,
    job_id: str | None,
    attempt: int,
    has_result: bool = False,
    error: str | None = None,
    timestamp: datetime | None = None,
) -> StepUpdated:
    event = StepUpdated(
        workflow_id=workflow_id,
        workflow_label=workflow_label,
        step_name=step_name,
        worker=worker,
        state=state,
        job_id=job_id,
        attempt=attempt,
        has_result=has_result,
        error=error,
        timestamp=timestamp or utcnow(),
    )
    broadcast(event)
    return event


def broadcast_step_started(**fields: Any) -> StepUpdated:
    """Broadcast that a step has started executing."""
    return _step_event(EXECUTING, **fields)


def broadcast_step_completed(**fields: Any) -> StepUpdated:
    """Broadcast that a step completed successfully."""
    return _step_event(COMPLETED, **fields)


def broadcast_step_retrying(**fields: Any) -> StepUpdated:
    """Broadcast that a step failed and will retry."""
    return _step_event(RETRYABLE, **fields)


def broadcast_step_discarded(**fields: Any) -> StepUpdated:
    """Broadcast that a step was permanently discarded."""
    return _step_event(DISCARDED, **fields)


def broadcast_step_cancelled(**fields: Any) -> StepUpdated:
    """Broadcast that a step was cancelled (cascaded from a failed dependency, or revoked)."""
    return _step_event(CANCELLED, **fields)


def broadcast_step_snoozed(**fields: Any) -> StepUpdated:
    """Broadcast that a step was delivered before its dependencies settled (snoozing)."""
    return _step_event(SNOOZED, **fields)


def broadcast_workflow_finished(
    workflow_id: str,
    workflow_label: str | None,
    outcome: str,
    failed_steps: Sequence[str],
    *,
    total_count: int | None = None,
    duration: float | None = None,
    timestamp: datetime | None = None,
) -> WorkflowFinished:
    """Broadcast that a whole workflow has reached a terminal state.

    Sent once by the completion tracker when the last outstanding step settles; also
    sends :data:`workflow_finished_telemetry`.
    """
    event = WorkflowFinished(
        workflow_id=workflow_id,
        workflow_label=workflow_label,
        outcome=outcome,
        failed_steps=tuple(failed_steps),
        timestamp=timestamp or utcnow(),
    )
    broadcast(event)
    if workflow_finished_telemetry.receivers:
        _send(
            workflow_finished_telemetry,
            workflow_id,
            outcome=outcome,
            failed_count=len(event.failed_steps),
            total_count=total_count,
            duration=duration,
        )
    return event
