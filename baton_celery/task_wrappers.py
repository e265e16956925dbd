"""The two Task methods baton wraps on every task class: ``before_start`` (the gate) and
``retry`` (mark the step retryable before Celery publishes the retry).

Both wrappers call the method they wrap exactly as Celery would have: a function (or any
other descriptor: a staticmethod, a classmethod) bound to the task, a plain callable (a
callable object, a Mock, a partial) as it is. They are set as plain class attributes, not
through Celery's ``"@method"`` annotations: ``Task.add_around`` unwraps ``__wrapped__``
(dropping a ``functools.wraps`` decorator) and flattens a staticmethod into a function
that would then get the task as an extra first argument.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

from celery.app.annotations import _first_match, _first_match_any, prepare
from celery.exceptions import Ignore, Reject

from .events import DISCARDED
from .guard import guarded
from .hooks import (
    GATE_ATTR,
    RETRY_MARKED_ATTR,
    SNOOZE_DISPATCH_ATTR,
    mark_retrying,
    settle_run,
    step_of,
)
from .identity import HEADER
from .runtime import runtime_for
from .stores.records import SKIP, SNOOZE

__all__ = ["TaskAnnotations", "unwrap_task_class", "wrap_task_class"]

#: Marks baton's wrappers; holds what they wrap.
ORIGINAL = "_baton_original"
#: On a wrapper: whether the class itself defined the method (else it was inherited).
OWNED = "_baton_owned"


def _bound(original: Any, task: Any) -> Callable[..., Any]:
    """``original`` as Celery would call it on ``task``."""
    get = getattr(type(original), "__get__", None)
    return get(original, task, type(task)) if get is not None else original  # type: ignore[no-any-return]


# --- before_start: the gate -----------------------------------------------------------


def gate_before_start(original: Any) -> Callable[..., Any]:
    """A before_start that keeps a gated step's body from running, then the original.

    task_prerun cannot stop a task (Celery logs and swallows a receiver's exception), but
    before_start runs next, inside the tracer's try: Ignore raised here ends the request
    without running the body and without task_success/task_failure.
    """

    def before_start(self: Any, task_id: str, args: Any, kwargs: Any) -> Any:
        decision = getattr(self.request, GATE_ATTR, None)
        if decision == SNOOZE:
            _requeue_snoozed(self)
            raise Ignore()
        if decision == SKIP:
            raise Ignore()
        return _bound(original, self)(task_id, args, kwargs)

    return before_start


def _requeue_snoozed(task: Any) -> None:
    # A copy with the same task id, headers and retries count: a snooze uses no retry
    # attempt. When the broker refuses it, the step stays published and not started:
    # the backstop settles it (it cannot be left to fail the user's task).
    request = task.request
    with guarded("requeueing a snoozed step", request.id):
        runtime = runtime_for(task.app)
        delay = runtime.config.snooze_delay if runtime else 1.0
        signature = task.signature_from_request()
        _stamp_snoozed_copy(signature, getattr(request, SNOOZE_DISPATCH_ATTR, None))
        signature.apply_async(countdown=delay)


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


# --- retry: retryable before the retry is published ------------------------------------


def mark_retry_first(original: Any) -> Callable[..., Any]:
    """A retry that marks the step retryable before Celery publishes the retry message.

    Celery publishes the retry inside Task.retry and sends task_retry only afterwards:
    with a short countdown the next attempt can start in another pool process first, and
    a late "retryable" would then overwrite the running attempt (and come out after its
    "executing"). Marking here keeps retryable(n) before executing(n + 1); the task_retry
    hook then skips the request. Eager calls and a retry Celery will refuse
    (MaxRetriesExceededError) are left to the signals.
    """

    def retry(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        with guarded("retry wrapper", getattr(request, "id", None)):
            ref = step_of(self.app, request)
            if ref is not None and _will_publish(self, request, kwargs):
                exc = kwargs.get("exc")
                if exc is None and len(args) >= 3:
                    exc = args[2]  # Task.retry(args, kwargs, exc, ...)
                mark_retrying(ref, request, exc if exc is not None else sys.exc_info()[1])
                setattr(request, RETRY_MARKED_ATTR, True)
        try:
            return _bound(original, self)(*args, **kwargs)
        except Reject as rejected:
            # Celery could not publish the retry (broker down) and rejects the message:
            # neither task_failure nor task_retry follows, so the step marked retryable
            # above would hang. It will not run again: settle it discarded.
            if getattr(request, RETRY_MARKED_ATTR, False):
                _discard_unretried(self, request, rejected)
            raise

    return retry


def _will_publish(task: Any, request: Any, kwargs: dict[str, Any]) -> bool:
    limit = kwargs.get("max_retries")
    if limit is None:
        limit = task.max_retries
    return (
        not request.called_directly
        and not request.is_eager
        and (limit is None or request.retries + 1 <= limit)
    )


def _discard_unretried(task: Any, request: Any, rejected: Reject) -> None:
    with guarded("retry wrapper", getattr(request, "id", None)):
        ref = step_of(task.app, request)
        if ref is None:
            return
        error = ref.runtime.error_text(f"retry could not be published: {rejected.reason!r}")
        settle_run(ref, request, DISCARDED, error=error)


# --- putting them on task classes -------------------------------------------------------

#: The wrapped methods, and the wrapper of each.
WRAPPERS: dict[str, Callable[[Any], Callable[..., Any]]] = {
    "before_start": gate_before_start,
    "retry": mark_retry_first,
}


def wrap_task_class(cls: type) -> None:
    """Put baton's wrappers around a task class's methods (once)."""
    for name, wrap in WRAPPERS.items():
        original = inspect.getattr_static(cls, name)
        if hasattr(original, ORIGINAL):
            continue
        wrapper = wrap(original)
        setattr(wrapper, ORIGINAL, original)
        setattr(wrapper, OWNED, name in cls.__dict__)
        wrapper.__name__ = wrapper.__qualname__ = name
        setattr(cls, name, wrapper)


def unwrap_task_class(cls: type) -> None:
    """Give a task class back the methods it had before :func:`wrap_task_class`."""
    for name in WRAPPERS:
        wrapper = cls.__dict__.get(name)
        if not hasattr(wrapper, ORIGINAL):
            continue
        if getattr(wrapper, OWNED):
            setattr(cls, name, getattr(wrapper, ORIGINAL))
        else:
            delattr(cls, name)


class TaskAnnotations:
    """baton's stand-in for an app's task annotations: the user's own, then baton's
    wrappers around whatever they made of the two methods.

    Celery applies annotations when it binds a task class, and uses only the first entry
    that matches the task by name and the first ``"*"`` entry (``resolve_all``): an entry
    of baton's own beside the user's would be skipped or would skip theirs. This object is
    the one entry Celery sees; it reads ``app.conf.task_annotations`` when a class is
    bound, applies the user's entries for the two methods itself (in Celery's order and
    way), wraps them last, and hands every other key back to Celery unchanged.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    def _user(self) -> list[Any]:
        return list(prepare(self.app.conf.task_annotations))

    def annotate(self, task: type) -> dict[str, Any]:
        user = self._user()
        by_name = _first_match(user, task) or {}
        for_any = _first_match_any(user) or {}
        for entry in (by_name, for_any):
            for key, value in entry.items():
                if key.lstrip("@") in WRAPPERS:
                    if key.startswith("@"):
                        task.add_around(key[1:], value)  # type: ignore[attr-defined]
                    else:
                        setattr(task, key, value)
        wrap_task_class(task)
        return _other_keys(by_name)

    def annotate_any(self) -> dict[str, Any] | None:
        return _other_keys(_first_match_any(self._user()) or {}) or None


def _other_keys(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k.lstrip("@") not in WRAPPERS}
