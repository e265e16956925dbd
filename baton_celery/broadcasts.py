"""The seed's broadcast functions: build one event from keyword fields and deliver it.

baton itself delivers what its store transitions imply through :mod:`announce`; these
are the public API of the module baton was ported from, for code that wants to send an
event of its own (a test, a bridge from another system). Each returns the event sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from . import pubsub
from .events import (
    CANCELLED,
    COMPLETED,
    DISCARDED,
    EXECUTING,
    RETRYABLE,
    SNOOZED,
    StepUpdated,
    WorkflowFinished,
    utcnow,
)

__all__ = [
    "broadcast_step_cancelled",
    "broadcast_step_completed",
    "broadcast_step_discarded",
    "broadcast_step_retrying",
    "broadcast_step_snoozed",
    "broadcast_step_started",
    "broadcast_workflow_finished",
]


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
    pubsub.broadcast(event)
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
    """Broadcast that a whole workflow has reached a terminal state; also sends
    :data:`~baton_celery.pubsub.workflow_finished_telemetry`."""
    event = WorkflowFinished(
        workflow_id=workflow_id,
        workflow_label=workflow_label,
        outcome=outcome,
        failed_steps=tuple(failed_steps),
        timestamp=timestamp or utcnow(),
    )
    pubsub.broadcast(event)
    pubsub.send_finished_telemetry(event, total_count, duration)
    return event
