"""Publishing a step: its stored signature, its fixed task id and the ``baton`` header."""

from __future__ import annotations

import time
from typing import Any

from kombu.exceptions import OperationalError

from .canvas import INPUT, RESULT, Tail, flatten
from .identity import HEADER, StepIdentity
from .runtime import runtime_for
from .stores.transition import Released

__all__ = ["ResultNotPassable", "publish_step"]


class ResultNotPassable(RuntimeError):
    """A canvas step's input (its dependencies' results) cannot be read from the store."""


def publish_step(app: Any, workflow_id: str, label: str | None, step: Released) -> None:
    """Send one step to the broker as its own task, under the job id chosen at creation.

    A canvas step (see :mod:`baton_celery.canvas`) gets its dependencies' results, read
    from the store now, as its first argument, as a Celery chain link or chord body would.

    Custom headers reach ``task.request`` in the worker and survive Celery's retries, but
    not tasks a step publishes itself: only the steps baton publishes carry the header.
    """
    signature = app.signature(step.signature)
    options = dict(signature.options)
    incoming = options.pop(INPUT, None)
    options.pop(RESULT, None)
    signature.options = options
    if incoming is not None:
        signature = signature.clone(args=(_input(app, workflow_id, incoming),))
    headers = dict(signature.options.get("headers") or {})
    ident = StepIdentity(workflow_id, label, step.name, step.dispatch, time.time(), step.leaf)
    headers[HEADER] = ident.header()
    if not _retried(app, signature):
        signature.apply_async(task_id=step.job_id, headers=headers)
        return
    try:
        # One attempt without kombu's retry wrapper first: it costs a publish 15-30 us of
        # CPU (bench/bench_hooks.py, "sequence step"), on every step baton publishes.
        signature.apply_async(task_id=step.job_id, headers=headers, retry=False)
    except (OperationalError, OSError):
        # The broker refused it: then with the app's retry policy, what that attempt left
        # out. As with that retry, a publish whose reply the broker lost may go out twice.
        signature.apply_async(task_id=step.job_id, headers=headers)


def _retried(app: Any, signature: Any) -> bool:
    """Whether the app would publish the step with its retry policy: not in eager mode
    (no publish: the task runs at once, and may raise), nor when the app or the step's
    own options turn the retry off."""
    conf = app.conf
    if conf.task_always_eager or not conf.task_publish_retry:
        return False
    return bool(signature.options.get("retry", True))


def _input(app: Any, workflow_id: str, incoming: Tail) -> Any:
    runtime = runtime_for(app)
    if runtime is None:
        raise ResultNotPassable("baton_celery is not installed on this app")
    if not runtime.config.store_results:
        raise ResultNotPassable(
            "baton_store_results is off: the results this step takes as its first "
            "argument are not stored"
        )
    # Only the completed steps that returned something are listed; one listed with None
    # returned a value the store could not keep (not JSON-serializable).
    stored = runtime.store.results(workflow_id, dict.fromkeys(flatten(incoming)))

    def value(tail: Tail) -> Any:
        if not isinstance(tail, str):
            return [value(t) for t in tail]
        if tail in stored and stored[tail] is None:
            raise ResultNotPassable(
                f"the result of step {tail!r} is not JSON-serializable, so it cannot be "
                "passed on as this step's argument"
            )
        return stored.get(tail)

    return value(incoming)
