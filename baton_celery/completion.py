"""After a store transition: send the events it implies, publish released dependents,
and announce the finish when this transition won the claim.

The claim itself is made inside the store's atomic transition (see
:func:`baton_celery.stores.records.settle`): of all the processes settling a workflow's
last steps, exactly one gets a ``Settlement.finish``, so exactly one announces it.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

from . import bridge, pubsub
from .dispatch import publish_step
from .events import CANCELLED, COMPLETED, DISCARDED, EXECUTING, RETRYABLE, SNOOZED, StepUpdated
from .stores.records import Settlement, StepRecord

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["announce", "emit_step", "publish_or_discard"]

logger = logging.getLogger(__name__)

PUBLISH_FAILED = "baton_celery: could not publish step %r of workflow %s; discarding it"
DISCARD_FAILED = (
    "baton_celery: could not discard unpublished step %r of workflow %s; the backstop will "
    "settle it"
)

_BROADCASTS: dict[str, Callable[..., StepUpdated]] = {
    EXECUTING: pubsub.broadcast_step_started,
    COMPLETED: pubsub.broadcast_step_completed,
    RETRYABLE: pubsub.broadcast_step_retrying,
    DISCARDED: pubsub.broadcast_step_discarded,
    CANCELLED: pubsub.broadcast_step_cancelled,
    SNOOZED: pubsub.broadcast_step_snoozed,
}


def emit_step(
    runtime: Runtime,
    state: str,
    workflow_id: str,
    label: str | None,
    step: StepRecord,
    error: str | None = None,
) -> None:
    """Broadcast a StepUpdated for ``step`` in ``state`` (its error unless one is given),
    and publish it on the broker bridge (numbered ``step.seq``) when that is on."""
    event = _BROADCASTS[state](
        workflow_id=workflow_id,
        workflow_label=label,
        step_name=step.name,
        worker=step.task,
        job_id=step.job_id,
        attempt=step.attempt,
        has_result=step.has_result,
        # The store keeps the whole text; events carry it cut to baton_max_error_length.
        error=runtime.error_text(error if error is not None else step.error),
    )
    bridge.publish(runtime, event, step.seq)


def publish_or_discard(runtime: Runtime, wid: str, label: str | None, step: StepRecord) -> None:
    """Publish a released step; one that cannot be sent is settled "discarded" (it would
    otherwise keep the workflow open forever). Never raises: the other released steps
    must still be published."""
    try:
        publish_step(runtime.app, wid, label, step)
    except Exception as exc:
        logger.exception(PUBLISH_FAILED, step.name, wid)
        error = runtime.error_text(f"could not be published: {type(exc).__name__}: {exc}")
        try:
            announce(runtime, runtime.store.settle(wid, step.name, DISCARDED, error=error))
        except Exception:
            logger.exception(DISCARD_FAILED, step.name, wid)


def announce(runtime: Runtime, out: Settlement) -> None:
    """Act on a committed settlement: the step's own event, the cascade's events, the
    released dependents, and the finish — in that order."""
    wid, label = out.workflow_id, out.workflow_label
    if out.applied and out.step is not None:
        emit_step(runtime, out.step.state, wid, label, out.step)
    for step in out.cancelled:
        emit_step(runtime, CANCELLED, wid, label, step)
    for step in out.released:
        publish_or_discard(runtime, wid, label, step)
    if out.finish is not None:
        finish = out.finish
        event = pubsub.broadcast_workflow_finished(
            wid,
            label,
            finish.outcome,
            finish.failed_steps,
            total_count=finish.total_count,
            duration=finish.duration,
            timestamp=datetime.fromtimestamp(finish.finished_at, timezone.utc),
        )
        bridge.publish(runtime, event, finish.seq)
