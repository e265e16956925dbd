"""Topics and delivery: "workflow:all" and "workflow:{id}", carried by blinker signals.

This module only delivers events it is given (they are built in :mod:`announce`, or by
the seed's ``broadcast_*`` functions in :mod:`broadcasts`).

Receivers are called blinker-style, ``receiver(workflow_id, event=event)``. Unlike a bare
blinker ``send``, a receiver that raises is logged and the others still run: these sends
happen inside Celery tasks, and a subscriber's bug must never fail the user's task.
Subscriptions hold strong references; drop them with :func:`unsubscribe` /
:func:`unsubscribe_all`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from blinker import NamedSignal, Namespace

from .events import Event, WorkflowFinished
from .guard import log_failure

__all__ = [
    "ALL_TOPIC",
    "broadcast",
    "event_made",
    "has_receivers",
    "send_finished_telemetry",
    "send_made",
    "send_workflow_created",
    "subscribe",
    "subscribe_all",
    "topic",
    "unsubscribe",
    "unsubscribe_all",
    "workflow_created",
    "workflow_finished_telemetry",
]

logger = logging.getLogger(__name__)

ALL_TOPIC = "workflow:all"

Receiver = Callable[..., Any]

_topics = Namespace()
_topics_lock = threading.Lock()
_all = _topics.signal(ALL_TOPIC)

#: Sent once per finished workflow, after the WorkflowFinished event, with
#: ``sender=workflow_id`` and keyword arguments ``outcome``, ``failed_count``,
#: ``total_count`` and ``duration`` (seconds from the workflow's start, or None).
workflow_finished_telemetry: NamedSignal = Namespace().signal("baton.workflow.finished")

#: Sent in the process that starts a workflow, once it is stored and before its root
#: steps are published, with ``sender=workflow_id`` and keyword arguments ``app`` and
#: ``label``: where instrumentation captures the caller's context (see
#: :mod:`baton_celery.otel`). A receiver that raises is logged; the workflow still starts.
workflow_created: NamedSignal = Namespace().signal("baton.workflow.created")

#: Every event this process's own transitions made, once (not those a listener brings
#: from other processes), with ``sender=workflow_id`` and ``event``: where
#: instrumentation records each event once, in the process where it happened.
event_made: NamedSignal = Namespace().signal("baton.event.made")


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
    """Call each receiver in isolation: one that raises is logged (rate-limited), the
    rest still run."""
    # Snapshot the receivers: one may unsubscribe itself while we iterate.
    for receiver in list(signal.receivers_for(workflow_id)):
        try:
            receiver(workflow_id, **kwargs)
        except Exception as exc:
            log_failure(f"receiver {receiver!r} on {signal.name}", exc, workflow_id)


def has_receivers(workflow_id: str) -> bool:
    """Whether an event of this workflow would reach any receiver in this process."""
    if _all.receivers:
        return True
    specific = _topics.get(topic(workflow_id))
    return specific is not None and bool(specific.receivers)


def broadcast(event: Event) -> None:
    """Send an event to its workflow's topic, then to "workflow:all"."""
    specific = _topics.get(topic(event.workflow_id))
    if specific is not None and specific.receivers:
        _send(specific, event.workflow_id, event=event)
    if _all.receivers:
        _send(_all, event.workflow_id, event=event)


def send_made(event: Event) -> None:
    """Send :data:`event_made` for an event made here (nothing to do with no receiver)."""
    if event_made.receivers:
        _send(event_made, event.workflow_id, event=event)


def send_workflow_created(app: Any, workflow_id: str, label: str | None) -> None:
    """Send :data:`workflow_created` (nothing to do when no receiver is connected)."""
    if workflow_created.receivers:
        _send(workflow_created, workflow_id, app=app, label=label)


def send_finished_telemetry(
    event: WorkflowFinished, total_count: int | None, duration: float | None
) -> None:
    """Send :data:`workflow_finished_telemetry` for a finish just broadcast."""
    if workflow_finished_telemetry.receivers:
        _send(
            workflow_finished_telemetry,
            event.workflow_id,
            outcome=event.outcome,
            failed_count=len(event.failed_steps),
            total_count=total_count,
            duration=duration,
        )
