"""After a store transition committed: the events it implies, delivered in order.

This is the only place events are built from what the store did. For one transition, in
order: the step's own event, the cascade's ``cancelled`` events, the publication of the
dependents it released, and the finish when this transition won the claim. Each event
goes to this process's receivers (:mod:`pubsub`) and, when it is on, to the broker
bridge, numbered with the ``seq`` the store gave it.

The finish claim itself is made inside the store's atomic transition (see
:func:`baton_celery.stores.records.settle`): of all the processes settling a workflow's
last steps, exactly one gets ``Transition.finish``, so exactly one announces it.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from . import bridge, pubsub
from .dispatch import publish_step
from .events import CANCELLED, DISCARDED, Event, StepUpdated, WorkflowFinished
from .guard import log_failure
from .stores.records import StepRecord, Transition

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["announce", "publish_or_discard"]

logger = logging.getLogger(__name__)


def _at(unix_time: float) -> datetime:
    return datetime.fromtimestamp(unix_time, timezone.utc)


def step_event(runtime: Runtime, out: Transition, step: StepRecord, state: str) -> StepUpdated:
    """The StepUpdated for ``step``'s new ``state``, stamped when the store changed it."""
    return StepUpdated(
        workflow_id=out.workflow_id,
        workflow_label=out.workflow_label,
        step_name=step.name,
        worker=step.task,
        state=state,
        job_id=step.job_id,
        attempt=step.attempt,
        has_result=step.has_result,
        # The store keeps the whole text; events carry it cut to baton_max_error_length.
        error=runtime.error_text(step.error),
        timestamp=_at(step.updated_at),
    )


def _deliver(runtime: Runtime, event: Event, seq: int) -> None:
    pubsub.broadcast(event)
    bridge.publish(runtime, event, seq)


def announce(runtime: Runtime, out: Transition) -> None:
    """Deliver everything a committed transition implies (nothing when it changed
    nothing), and publish the steps it released."""
    state = out.step_state
    if state is not None and out.step is not None:
        _deliver(runtime, step_event(runtime, out, out.step, state), out.step.seq)
    for step in out.cancelled:
        _deliver(runtime, step_event(runtime, out, step, CANCELLED), step.seq)
    for step in out.released:
        publish_or_discard(runtime, out.workflow_id, out.workflow_label, step)
    finish = out.finish
    if finish is not None:
        event = WorkflowFinished(
            workflow_id=out.workflow_id,
            workflow_label=out.workflow_label,
            outcome=finish.outcome,
            failed_steps=finish.failed_steps,
            timestamp=_at(finish.finished_at),
        )
        _deliver(runtime, event, finish.seq)
        pubsub.send_finished_telemetry(event, finish.total_count, finish.duration)


def publish_or_discard(runtime: Runtime, wid: str, label: str | None, step: StepRecord) -> None:
    """Publish a released (or root) step; one that cannot be sent is settled "discarded"
    (it would otherwise keep the workflow open forever). Never raises: the other released
    steps must still be published."""
    try:
        publish_step(runtime.app, wid, label, step)
    except Exception as exc:
        log_failure(f"publishing step {step.name!r}", exc, wid)
        error = runtime.error_text(f"could not be published: {type(exc).__name__}: {exc}")
        try:
            announce(runtime, runtime.store.settle(wid, step.name, DISCARDED, error=error))
        except Exception as settle_exc:  # the backstop settles it later
            log_failure(f"discarding unpublished step {step.name!r}", settle_exc, wid)
