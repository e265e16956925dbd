"""Celery signal receivers: a step's lifecycle in, store transitions and events out.

Each hook reads the step identity from the request (one getattr: tasks that are not
workflow steps, Celery's own included, return at once), applies one atomic store
transition, then announces what it implies. Every hook body runs under :func:`_guard`:
a failure of baton or of its store is logged and never reaches the user's task.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any, Callable

from celery import signals
from celery.exceptions import Ignore, Reject

from .completion import announce, emit_step
from .config import Config
from .events import CANCELLED, COMPLETED, DISCARDED, SNOOZED
from .identity import HEADER, StepIdentity, identity_of
from .runtime import Runtime, installed_apps, register, runtime_for, unregister
from .stores.records import RUN, SKIP, SNOOZE

__all__ = ["install", "uninstall"]

logger = logging.getLogger(__name__)

HOOK_FAILED = "baton_celery: %s hook failed for task %s; the task itself is unaffected"
UNSERIALIZABLE = (
    "baton_celery: the result of step %r (workflow %s) is not JSON-serializable; "
    "it is not stored, dependency_results() will not include it"
)
MEMORY_UNDER_PREFORK = (
    "baton_celery: baton_store is %r, which only this process can see, but this worker "
    "runs a prefork pool: step events from the pool's processes would be missed. Use "
    "the default SQLite store (leave baton_store unset) or 'sqlite:///path', or run the "
    "worker with -P solo / -P threads."
)

# Set on a request when its retry was marked before Celery published it.
RETRY_MARKED_ATTR = "baton_retry_marked"
# The gate decision for the current request, set in task_prerun, read in before_start.
GATE_ATTR = "baton_gate"
# For a snoozed request: the step's publication number when it was snoozed.
SNOOZE_DISPATCH_ATTR = "baton_snooze_dispatch"


@contextlib.contextmanager
def _guard(hook: str, task_id: Any) -> Iterator[None]:
    try:
        yield
    except Exception:
        logger.exception(HOOK_FAILED, hook, task_id)


def _step_of(sender: Any, request: Any) -> tuple[Runtime, StepIdentity] | None:
    ident = identity_of(request)
    if ident is None:
        return None
    runtime = runtime_for(sender.app)
    return None if runtime is None else (runtime, ident)


# --- task_prerun (pool child): gate the step and count the attempt --------------------


def on_task_prerun(sender: Any = None, task_id: Any = None, **_: Any) -> None:
    found = _step_of(sender, sender.request)
    if found is None:
        return
    runtime, ident = found
    with _guard("task_prerun", task_id):
        gate = runtime.store.begin(ident.workflow_id, ident.step, ident.dispatch)
        # Per-request (a Context), not per-task state: safe with concurrent requests.
        setattr(sender.request, GATE_ATTR, gate.decision)
        setattr(sender.request, SNOOZE_DISPATCH_ATTR, gate.step.dispatch)
        if gate.decision == RUN:
            emit_step(runtime, "executing", ident.workflow_id, ident.workflow_label, gate.step)
        elif gate.decision == SNOOZE:
            emit_step(runtime, SNOOZED, ident.workflow_id, ident.workflow_label, gate.step)
        elif gate.settlement is not None:
            announce(runtime, gate.settlement)


def _gate_before_start(before_start: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a task class's before_start so a gated step's body does not run.

    task_prerun cannot stop a task (Celery logs and swallows a receiver's exception), but
    before_start runs next, inside the tracer's try: Ignore raised here ends the request
    without running the body and without task_success/task_failure.
    """

    def gated_before_start(self: Any, task_id: str, args: Any, kwargs: Any) -> Any:
        decision = getattr(self.request, GATE_ATTR, None)
        if decision == SNOOZE:
            runtime = runtime_for(self.app)
            delay = runtime.config.snooze_delay if runtime else 1.0
            # Same task id, headers and retries count: a snooze uses no retry attempt.
            signature = self.signature_from_request()
            _stamp_snoozed_copy(signature, getattr(self.request, SNOOZE_DISPATCH_ATTR, None))
            signature.apply_async(countdown=delay)
            raise Ignore()
        if decision == SKIP:
            raise Ignore()
        return before_start(self, task_id, args, kwargs)

    gated_before_start._baton_gate = True  # type: ignore[attr-defined]
    return gated_before_start


def _stamp_snoozed_copy(signature: Any, dispatch: Any) -> None:
    """Give the requeued copy of a snoozed message the step's current publication number.

    A message delivered early may carry the number baton will give the step when it
    releases it. Requeued unchanged, the copy would be as current as the released message
    and both would run the body. Stamped with the number the step had when it was snoozed,
    the copy is stale once the step is released, and the gate skips it.
    """
    headers = signature.options.get("headers")
    ident = headers.get(HEADER) if isinstance(headers, dict) else None
    if isinstance(ident, dict) and isinstance(dispatch, int):
        signature.options["headers"] = {**headers, HEADER: {**ident, "dispatch": dispatch}}


# --- task_success / task_retry / task_failure (pool child) ---------------------------


def _result_for_store(runtime: Runtime, ident: StepIdentity, result: Any) -> Any:
    if result is None or not runtime.config.store_results:
        return None
    try:
        json.dumps(result)
    except (TypeError, ValueError):
        logger.warning(UNSERIALIZABLE, ident.step, ident.workflow_id)
        return None
    return result


def on_task_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    # task_success carries no task_id: the request is still the sender's.
    request = sender.request
    found = _step_of(sender, request)
    if found is None:
        return
    runtime, ident = found
    with _guard("task_success", request.id):
        out = runtime.store.settle(
            ident.workflow_id,
            ident.step,
            COMPLETED,
            has_result=result is not None,
            result=_result_for_store(runtime, ident, result),
        )
        announce(runtime, out)


def _mark_retrying_first(retry: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a task class's retry so the step is marked retryable before Celery publishes
    the retry message.

    Celery publishes the retry inside Task.retry and sends task_retry only afterwards:
    with a short countdown the next attempt can start in another pool process first, and
    a late "retryable" would then overwrite the running attempt (and come out after its
    "executing"). Marking here keeps retryable(n) before executing(n + 1); on_task_retry
    then skips the request. Eager calls and a retry Celery will refuse
    (MaxRetriesExceededError) are left to the signals.
    """

    def retry_after_marking(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        with _guard("retry", getattr(request, "id", None)):
            limit = kwargs.get("max_retries")
            if limit is None:
                limit = self.max_retries
            if (
                not request.called_directly
                and not request.is_eager
                and (limit is None or request.retries + 1 <= limit)
            ):
                exc = kwargs.get("exc")
                if exc is None and len(args) >= 3:
                    exc = args[2]  # Task.retry(args, kwargs, exc, ...)
                _mark_retrying(self, request, exc if exc is not None else sys.exc_info()[1])
        try:
            return retry(self, *args, **kwargs)
        except Reject as rejected:
            # Celery could not publish the retry (broker down) and rejects the message:
            # neither task_failure nor task_retry follows, so the step marked retryable
            # above would hang. It will not run again: settle it discarded.
            if getattr(request, RETRY_MARKED_ATTR, False):
                _discard_unretried(self, request, rejected)
            raise

    retry_after_marking._baton_gate = True  # type: ignore[attr-defined]
    return retry_after_marking


def _mark_retrying(task: Any, request: Any, cause: Any) -> None:
    found = _step_of(task, request)
    if found is None:
        return
    runtime, ident = found
    with _guard("task_retry", getattr(request, "id", None)):
        step = runtime.store.retrying(ident.workflow_id, ident.step, runtime.error_text(cause))
        setattr(request, RETRY_MARKED_ATTR, True)
        if step is not None:
            emit_step(runtime, "retryable", ident.workflow_id, ident.workflow_label, step)


def _discard_unretried(task: Any, request: Any, rejected: Reject) -> None:
    found = _step_of(task, request)
    if found is None:
        return
    runtime, ident = found
    with _guard("retry", getattr(request, "id", None)):
        error = runtime.error_text(f"retry could not be published: {rejected.reason!r}")
        out = runtime.store.settle(ident.workflow_id, ident.step, DISCARDED, error=error)
        announce(runtime, out)


def on_task_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    if getattr(request, RETRY_MARKED_ATTR, False):
        return  # already marked by retry_after_marking, before the retry was published
    # reason is the Retry exception; its .exc is what the task raised, when known.
    _mark_retrying(sender, request, getattr(reason, "exc", None) or reason)


def on_task_failure(
    sender: Any = None, task_id: Any = None, exception: Any = None, **_: Any
) -> None:
    request = sender.request
    # A WorkerLostError is reported by the main process, where sender.request is not the
    # failing request: fall back to the store's job index for that task id.
    if getattr(request, "id", None) == task_id:
        found = _step_of(sender, request)
        if found is None:
            return
        runtime, ident = found
        workflow_id, step = ident.workflow_id, ident.step
    else:
        maybe_runtime = runtime_for(sender.app)
        if maybe_runtime is None:
            return
        runtime = maybe_runtime
        with _guard("task_failure", task_id):
            located = runtime.store.locate(task_id)
        if located is None:
            return
        workflow_id, step = located
    with _guard("task_failure", task_id):
        out = runtime.store.settle(
            workflow_id, step, DISCARDED, error=runtime.error_text(exception)
        )
        announce(runtime, out)


# --- task_revoked (always the main process) ------------------------------------------


def on_task_revoked(
    sender: Any = None,
    request: Any = None,
    terminated: bool = False,
    signum: Any = None,
    expired: bool = False,
    **_: Any,
) -> None:
    # The request here is a Context built from the message: it still carries the headers.
    found = _step_of(sender, request)
    if found is None:
        return
    runtime, ident = found
    if expired:
        reason = "expired"
    elif terminated:
        reason = f"revoked and terminated (signal {signum})"
    else:
        reason = "revoked"
    with _guard("task_revoked", getattr(request, "id", None)):
        out = runtime.store.settle(ident.workflow_id, ident.step, CANCELLED, error=reason)
        announce(runtime, out)


def on_worker_init(sender: Any = None, **_: Any) -> None:
    """Refuse loudly a store that the prefork pool's processes cannot share."""
    app = getattr(sender, "app", None)
    runtime = runtime_for(app) if app is not None else None
    if runtime is None:
        return
    if runtime.store.shared_across_processes:
        return
    # worker_init fires before Celery resolves pool_cls: it may still be an alias string
    # ("prefork", "processes") or a class.
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool as PreforkPool

    pool = getattr(sender, "pool_cls", None)
    try:
        pool = get_implementation(pool) if isinstance(pool, str) else pool
    except Exception:  # an unknown alias is Celery's to report
        return
    if isinstance(pool, type) and issubclass(pool, PreforkPool):
        logger.error(MEMORY_UNDER_PREFORK, runtime.config.store)


_RECEIVERS: list[tuple[Any, Callable[..., None]]] = [
    (signals.task_prerun, on_task_prerun),
    (signals.task_success, on_task_success),
    (signals.task_retry, on_task_retry),
    (signals.task_failure, on_task_failure),
    (signals.task_revoked, on_task_revoked),
    (signals.worker_init, on_worker_init),
]


def _connect_receivers() -> None:
    # Celery's signals are process-wide: connect once (dispatch_uid) and strongly
    # (weak=False); the receivers find each app's runtime through sender.app.
    for signal, receiver in _RECEIVERS:
        signal.connect(receiver, weak=False, dispatch_uid=f"baton_celery.{receiver.__name__}")


def _disconnect_receivers() -> None:
    for signal, receiver in _RECEIVERS:
        signal.disconnect(receiver, dispatch_uid=f"baton_celery.{receiver.__name__}")


# The Task methods baton wraps on every task class, and the wrapper for each.
_WRAPPERS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "before_start": _gate_before_start,
    "retry": _mark_retrying_first,
}
_GATE_ANNOTATION = {f"@{method}": wrap for method, wrap in _WRAPPERS.items()}


def _with_gate(annotation: dict[str, Any]) -> dict[str, Any]:
    """The user's ``"*"`` annotation with baton's wrappers outermost around theirs.

    Celery applies ``"@method"`` as an around-wrapper and a plain ``"method"`` by
    replacing the method: either would otherwise drop baton's, so both are composed.
    """
    merged = dict(annotation)
    for method, wrap in _WRAPPERS.items():
        around = merged.pop(f"@{method}", None)
        plain = merged.pop(method, None)
        if around is not None:
            merged[f"@{method}"] = _compose(wrap, around)
        elif plain is not None:
            merged[f"@{method}"] = _compose(wrap, _replacing(plain))
        else:
            merged[f"@{method}"] = wrap
    return merged


def _replacing(plain: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A plain annotation (it replaces the method) as an around-wrapper."""
    return lambda _original: plain


def _compose(
    outer: Callable[[Callable[..., Any]], Callable[..., Any]],
    inner: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return lambda original: outer(inner(original))


def _install_gate(app: Any) -> None:
    """Wrap every task's before_start with the gate, through task annotations.

    Celery applies annotations when a task class is bound, and resolves only the first
    ``"*"`` entry: ours is merged into an existing ``"*"`` dict, else appended. Tasks
    already bound (the app was finalized before install) are wrapped directly.
    """
    current = app.conf.task_annotations
    entries = list(current) if isinstance(current, (list, tuple)) else [current]
    entries = [e for e in entries if e is not None]
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and "*" in entry:
            entries[i] = {**entry, "*": _with_gate(entry["*"])}
            break
    else:
        entries.append({"*": dict(_GATE_ANNOTATION)})
    app.conf.task_annotations = entries
    app.__dict__.pop("annotations", None)  # drop Celery's cached, already-expanded copy
    if app.finalized:
        for task in app.tasks.values():
            cls = type(task)
            for method, wrap in _WRAPPERS.items():
                if not getattr(getattr(cls, method), "_baton_gate", False):
                    cls.add_around(method, wrap)


def install(app: Any) -> Runtime:
    """Connect baton_celery to a Celery app; its ``baton_*`` settings are read now.

    Installing twice is harmless, and each app in a process keeps its own configuration.
    """
    runtime = runtime_for(app)
    if runtime is not None:
        return runtime
    runtime = Runtime(app, Config.from_app(app))
    _install_gate(app)
    register(app, runtime)
    _connect_receivers()
    return runtime


def uninstall(app: Any) -> None:
    """Undo :func:`install` for this app (the gate stays on bound task classes, inert)."""
    runtime = unregister(app)
    if runtime is not None:
        runtime.store.close()
    if not installed_apps():
        _disconnect_receivers()
