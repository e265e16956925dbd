"""After a store transition committed: the events it made, delivered in order, and the
steps it released, published.

The store makes the events inside the atomic transition (numbered, stamped and kept in
its history: see :mod:`baton_celery.stores.records`); this module only delivers them, in
order, to this process's receivers (:mod:`pubsub`) and, when it is on, to the broker
bridge. For one transition that is: the step's own event, the cascade's ``cancelled``
events, then the finish when this transition won the claim; the dependents it released
are published after the step's own events, before the finish.

The finish claim itself is made inside the store's atomic transition (see
:func:`baton_celery.stores.records.settle`): of all the processes settling a workflow's
last steps, exactly one gets ``Transition.finish``, so exactly one announces it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import bridge, pubsub
from .dispatch import publish_step
from .events import DISCARDED, Event, WorkflowFinished
from .guard import log_failure
from .listener import delivered_here, listening
from .stores.transition import Released, Transition

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = ["announce", "publish_or_discard", "wanted"]

logger = logging.getLogger(__name__)


def _deliver(runtime: Runtime, event: Event) -> None:
    pubsub.send_made(event)
    pubsub.broadcast(event)
    if listening(runtime.app):  # this process also listens: not twice from its history
        delivered_here(runtime.app, event)
    bridge.publish(runtime, event)


def wanted(runtime: Runtime, workflow_id: str) -> bool:
    """Whether anything in this process takes the workflow's events: a receiver, this
    process's listener, the broker bridge. (The store kept them, and published them when
    it is the bridge, whatever this says.)"""
    return (
        pubsub.has_receivers(workflow_id)
        or bool(pubsub.event_made.receivers)
        or runtime.broker_bridge
        or listening(runtime.app)
        or bool(pubsub.workflow_finished_telemetry.receivers)
    )


def announce(runtime: Runtime, out: Transition) -> None:
    """Deliver every event a committed transition made (none when it changed nothing,
    or when nothing here takes them), and publish the steps it released."""
    events = list(out.events) if out.events and wanted(runtime, out.workflow_id) else []
    finish = out.finish
    for event in events:
        if not isinstance(event, WorkflowFinished):
            _deliver(runtime, event)
    for step in out.released:
        publish_or_discard(runtime, out.workflow_id, out.workflow_label, step)
    if finish is not None and events:
        event = events[-1]
        assert isinstance(event, WorkflowFinished)
        _deliver(runtime, event)
        pubsub.send_finished_telemetry(event, finish.total_count, finish.duration)


def publish_or_discard(runtime: Runtime, wid: str, label: str | None, step: Released) -> None:
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
