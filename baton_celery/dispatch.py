"""Publishing a step: its stored signature, its fixed task id and the ``baton`` header."""

from __future__ import annotations

from typing import Any

from .identity import HEADER, StepIdentity
from .stores.records import StepRecord

__all__ = ["publish_step"]


def publish_step(app: Any, workflow_id: str, label: str | None, step: StepRecord) -> None:
    """Send one step to the broker as its own task, under the job id chosen at creation.

    Custom headers reach ``task.request`` in the worker and survive Celery's retries, but
    not tasks a step publishes itself: only the steps baton publishes carry the header.
    """
    signature = app.signature(step.signature)
    headers = dict(signature.options.get("headers") or {})
    headers[HEADER] = StepIdentity(workflow_id, label, step.name, step.dispatch).header()
    signature.apply_async(task_id=step.job_id, headers=headers)
