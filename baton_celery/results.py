"""Reading the results of a step's declared dependencies, from inside the step."""

from __future__ import annotations

from typing import Any

from celery import current_task

from .identity import identity_of
from .runtime import runtime_for

__all__ = ["NotAStepError", "dependency_results"]


class NotAStepError(RuntimeError):
    """dependency_results() was called outside a task running as a workflow step."""


def dependency_results() -> dict[str, Any]:
    """The results of the current step's completed dependencies, by step name.

    Only the dependencies declared with ``Workflow.add(..., deps=[...])`` are included;
    a dependency that returned None maps to None, and one that ended cancelled or
    discarded (allowed by an ignore flag) is absent::

        @app.task
        def load():
            rows = baton_celery.dependency_results()["transform"]
    """
    task = current_task
    request = getattr(task, "request", None)
    ident = identity_of(request) if request is not None else None
    runtime = runtime_for(task.app) if ident is not None else None
    if ident is None or runtime is None:
        raise NotAStepError("dependency_results() must be called inside a running workflow step")
    return runtime.store.dependency_results(ident.workflow_id, ident.step)
