"""The backstop sweep: settles steps that a crash left hanging, so their workflows finish.

A step whose worker died without a clean return (SIGKILL, OOM, a lost host) stays
"executing" forever; a step whose message was lost stays published but never starts.
The sweep finds such steps — no progress for ``stuck_after`` seconds — and settles each
"discarded" with an error naming the reason. That runs the normal machinery: the step's
event, its dependents' cascade, and the finish, through the same exactly-once claim as
every other transition (a step that makes progress meanwhile wins, and is left alone).
Successful workflows are swept too: a workflow whose last step hung is finished "failed".

Run it periodically, with celery beat::

    from baton_celery.backstop import register_task

    register_task(app)  # the task "baton_celery.backstop"
    app.conf.beat_schedule = {
        "baton-backstop": {"task": "baton_celery.backstop", "schedule": 60.0},
    }

or from the command line (``celery baton backstop``, see :mod:`baton_celery.cli`)::

    celery -A proj baton backstop --stuck-after 900
    celery -A proj baton backstop --every 60     # keep sweeping

``stuck_after`` defaults to the app's ``baton_backstop_after`` (seconds, default 3600):
set it above your longest task's run time plus its longest queue wait, or the sweep
will discard steps that are merely slow. Clocks of the hosts must agree (NTP).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from .announce import announce
from .events import EXECUTING, RETRYABLE
from .runtime import Runtime, runtime_for
from .stores import StoreError, UnknownWorkflow
from .stores.records import PENDING, StepRecord, WorkflowRecord

__all__ = ["TASK_NAME", "SweepReport", "register_task", "stuck_reason", "sweep"]

logger = logging.getLogger(__name__)

TASK_NAME = "baton_celery.backstop"
DEFAULT_STUCK_AFTER = 3600.0

NOT_INSTALLED = (
    "baton_celery is not installed on Celery app {app!r}: call baton_celery.install(app)"
)
SWEEP_FAILED = "baton_celery backstop: could not sweep workflow %s"
STUCK_EXECUTING = "worker lost or hung: executing with no progress for {age:.0f} s (backstop)"
STUCK_RETRYING = "retry never started: retryable with no progress for {age:.0f} s (backstop)"
STUCK_PUBLISHED = "never started: published {age:.0f} s ago and not picked up (backstop)"


@dataclasses.dataclass
class SweepReport:
    """What one sweep did."""

    examined: int = 0  # live workflows loaded
    settled: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    finished: list[str] = dataclasses.field(default_factory=list)  # finishes the sweep won
    errors: int = 0

    def __str__(self) -> str:
        lines = [
            f"backstop: {self.examined} live workflow(s) examined, {len(self.settled)} stuck "
            f"step(s) discarded, {len(self.finished)} workflow(s) finished, {self.errors} error(s)"
        ]
        lines += [f"  {wid} {step!r}: {reason}" for wid, step, reason in self.settled]
        return "\n".join(lines)


def stuck_reason(
    record: WorkflowRecord, step: StepRecord, now: float, stuck_after: float
) -> str | None:
    """Why ``step`` counts as stuck at ``now``, or None while it may still progress."""
    age = now - max(step.updated_at, record.created_at)
    if age < stuck_after:
        return None
    if step.state == EXECUTING:
        return STUCK_EXECUTING.format(age=age)
    if step.state == RETRYABLE:
        return STUCK_RETRYING.format(age=age)
    if step.state == PENDING and step.dispatch > 0:
        return STUCK_PUBLISHED.format(age=age)
    return None  # settled, or waiting for its dependencies (they are swept themselves)


def _runtime(app: Any) -> Runtime:
    runtime = runtime_for(app)
    if runtime is None:
        raise RuntimeError(NOT_INSTALLED.format(app=app))
    return runtime


def sweep(app: Any, stuck_after: float | None = None, *, now: float | None = None) -> SweepReport:
    """Settle every step stuck for ``stuck_after`` seconds in the app's store; announce
    what that implies (events, cascade, released dependents, the finish) from here."""
    runtime = _runtime(app)
    if stuck_after is None:
        stuck_after = float(app.conf.get("baton_backstop_after") or DEFAULT_STUCK_AFTER)
    now = time.time() if now is None else now
    store = runtime.store
    report = SweepReport()
    # A workflow younger than the threshold cannot hold a step stuck for that long.
    for workflow_id in store.live_workflows(before=now - stuck_after):
        try:
            _sweep_one(runtime, workflow_id, now, stuck_after, report)
        except (StoreError, KeyError):
            report.errors += 1
            logger.exception(SWEEP_FAILED, workflow_id)
    return report


def _sweep_one(
    runtime: Runtime, workflow_id: str, now: float, stuck_after: float, report: SweepReport
) -> None:
    store = runtime.store
    try:
        record = store.load(workflow_id)
    except UnknownWorkflow:
        store.unindex(workflow_id)  # expired, or its creation failed half-way
        return
    if record.finished:  # its finisher could not clean the index up
        store.unindex(workflow_id, [s.job_id for s in record.steps.values()])
        return
    report.examined += 1
    for step in record.steps.values():
        reason = stuck_reason(record, step, now, stuck_after)
        if reason is None:
            continue
        out = store.settle_stuck(workflow_id, step.name, step.seq, runtime.error_text(reason) or "")
        if not out.applied:
            continue  # it moved meanwhile: not stuck after all
        report.settled.append((workflow_id, step.name, reason))
        logger.warning(
            "baton_celery backstop: workflow %s step %r: %s", workflow_id, step.name, reason
        )
        if out.finish is not None:
            report.finished.append(workflow_id)
        announce(runtime, out)


def register_task(app: Any, name: str = TASK_NAME) -> Any:
    """Register the sweep as a task on ``app`` (for beat_schedule); returns the task.

    The task takes an optional ``stuck_after`` and returns the report as text.
    """

    def backstop(stuck_after: float | None = None) -> str:
        return str(sweep(app, stuck_after))

    return app.task(name=name, ignore_result=True, shared=False)(backstop)
