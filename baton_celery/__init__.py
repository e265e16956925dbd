"""baton_celery: workflows of named steps on Celery, live step events, and one
exactly-once "workflow finished" event.

Install it on your app, build a workflow, subscribe to its events::

    import baton_celery
    from baton_celery import Workflow

    baton_celery.install(app)
    baton_celery.subscribe_all(lambda workflow_id, event: print(event))

    handle = (
        Workflow(label="etl")
        .add("extract", extract.s())
        .add("load", load.s(), deps=["extract"])
        .apply_async()
    )
    handle.wait(timeout=60)
"""

from .broadcasts import (
    broadcast_step_cancelled,
    broadcast_step_completed,
    broadcast_step_discarded,
    broadcast_step_retrying,
    broadcast_step_snoozed,
    broadcast_step_started,
    broadcast_workflow_finished,
)
from .events import STEP_STATES, Event, StepUpdated, WorkflowFinished, event_from_dict
from .install import install, uninstall
from .listener import Listener, listen
from .pubsub import (
    subscribe,
    subscribe_all,
    unsubscribe,
    unsubscribe_all,
    workflow_finished_telemetry,
)
from .results import NotAStepError, dependency_results
from .stores import Store, StoreError, store_from_url
from .testing import collect_events
from .workflow import StepStatus, Workflow, WorkflowError, WorkflowHandle, WorkflowStatus

__all__ = [
    "STEP_STATES",
    "Event",
    "Listener",
    "NotAStepError",
    "StepStatus",
    "StepUpdated",
    "Store",
    "StoreError",
    "Workflow",
    "WorkflowError",
    "WorkflowFinished",
    "WorkflowHandle",
    "WorkflowStatus",
    "broadcast_step_cancelled",
    "broadcast_step_completed",
    "broadcast_step_discarded",
    "broadcast_step_retrying",
    "broadcast_step_snoozed",
    "broadcast_step_started",
    "broadcast_workflow_finished",
    "collect_events",
    "dependency_results",
    "event_from_dict",
    "install",
    "listen",
    "store_from_url",
    "subscribe",
    "subscribe_all",
    "uninstall",
    "unsubscribe",
    "unsubscribe_all",
    "workflow_finished_telemetry",
]
