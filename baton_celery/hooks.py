"""Celery signal receivers: a step's lifecycle in, at most one store transition each,
events out.

Every receiver is a :func:`step_hook`: it finds the step the signal is about (a getattr
or two on the request: tasks that are not workflow steps, Celery's own included, return
at once), applies one atomic store transition (none in task_prerun on the fast path,
where the step's begin travels with its settle), and hands the result to
:func:`~baton_celery.announce.announce`. The decorator runs all of it under the guard: a
failure of baton or of its store is logged (rate-limited) and never reaches the task.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from . import pubsub, revokes, running
from .announce import announce, wanted
from .events import CANCELLED, COMPLETED, DISCARDED
from .guard import guarded, log_failure
from .identity import identity_of
from .running import StepRef
from .runtime import runtime_for
from .stores.transition import Transition

__all__ = ["RECEIVERS", "StepRef", "begin_unsent", "settle_run", "step_hook"]

logger = logging.getLogger(__name__)

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

# Set on a request when its retry was marked before Celery published it (task_wrappers).
RETRY_MARKED_ATTR = "baton_retry_marked"
# The gate decision for the current request, set in task_prerun, read in before_start.
GATE_ATTR = "baton_gate"
# For a snoozed request: the step's publication number when it was snoozed.
SNOOZE_DISPATCH_ATTR = "baton_snooze_dispatch"
# A step's fast-path run (running.Run) while its begin may still be unsent.
RUN_ATTR = "baton_run"


def step_of(app: Any, request: Any) -> StepRef | None:
    """The step a request runs, or None when it is not a step (or baton is not installed
    on the app)."""
    ident = identity_of(request)
    if ident is None:
        return None
    runtime = runtime_for(app)
    if runtime is None:
        return None
    return StepRef(
        runtime, ident.workflow_id, ident.step, ident.dispatch, ident.published_at, ident.leaf
    )


Finder = Callable[[Any, dict[str, Any]], "StepRef | None"]
Body = Callable[[StepRef, Any, dict[str, Any]], None]


def _current_request(sender: Any, kwargs: dict[str, Any]) -> StepRef | None:
    return step_of(sender.app, sender.request)


def _given_request(sender: Any, kwargs: dict[str, Any]) -> StepRef | None:
    return step_of(sender.app, kwargs.get("request"))


def _current_run(sender: Any, kwargs: dict[str, Any]) -> StepRef | None:
    # A fast-path run carries its step from task_prerun: its header is not read again.
    request = sender.request
    run = getattr(request, RUN_ATTR, None)
    return run.ref if run is not None else step_of(sender.app, request)


def step_hook(where: str, find: Finder = _current_request) -> Callable[[Body], Any]:
    """Make ``body(ref, sender, kwargs)`` a Celery signal receiver that runs only for
    workflow steps, entirely under the guard."""

    def decorate(body: Body) -> Callable[..., None]:
        def receiver(sender: Any = None, **kwargs: Any) -> None:
            try:
                ref = find(sender, kwargs)
                if ref is not None:
                    body(ref, sender, kwargs)
            except Exception as exc:
                log_failure(f"{where} hook", exc, kwargs.get("task_id"))

        # Named like the body, but not functools.wraps: its __wrapped__ would make
        # Celery 5.3's connect() read the body's signature and refuse a receiver that
        # takes no **kwargs.
        receiver.__name__ = receiver.__qualname__ = body.__name__
        receiver.__doc__ = body.__doc__
        return receiver

    return decorate


# --- task_prerun (pool child): gate the step and count the attempt --------------------


@step_hook("task_prerun")
def on_task_prerun(ref: StepRef, sender: Any, kwargs: dict[str, Any]) -> None:
    request = sender.request
    runtime = ref.runtime
    if _gate_known(ref, request):
        # Its begin travels with its settle (one transition), or is sent by the watchdog
        # if it runs for long (see running.py).
        setattr(request, RUN_ATTR, running.start(ref))
        return
    out = runtime.store.begin(ref.workflow_id, ref.step, ref.dispatch)
    # Per-request (a Context), not per-task state: safe with concurrent requests. The
    # gate in before_start (task_wrappers) acts on it: task_prerun cannot stop a task.
    setattr(request, GATE_ATTR, out.decision)
    setattr(request, SNOOZE_DISPATCH_ATTR, out.dispatch)
    announce(runtime, out)


def _gate_known(ref: StepRef, request: Any) -> bool:
    """Whether the gate's answer is known to be "run" without asking the store (the fast
    path, ``baton_fast_begin``): the message is one baton published (an early or a
    snoozed copy carries dispatch 0), delivered for the first time (a redelivery may be
    of a step that completed: the broker flags it), published since this worker receives
    revokes (see :mod:`revokes`: a cancel's revoke reached it, and Celery refused the
    message before it got here) and less than ``fresh_for`` seconds ago (older, the
    backstop may have discarded the step, or a Redis broker restored a copy past its
    visibility timeout), and no receiver in this process wants its events at once.

    What remains is the race the gate has too: a cancel while the message is on its way
    to the pool. Then the body runs; its settle changes nothing, and a warning says so.
    Publication times are the publisher's clock: hosts' clocks must agree (NTP)."""
    runtime = ref.runtime
    if ref.dispatch < 1 or not runtime.fast_path or request.is_eager:
        return False
    if (request.delivery_info or {}).get("redelivered"):
        return False
    published = ref.published_at
    since = revokes.since()
    return (
        published is not None
        and since is not None
        and since <= published
        and time.time() - published < runtime.fresh_for
        and not pubsub.has_receivers(ref.workflow_id)
    )


def _unbegun(request: Any) -> running.Run | None:
    """Take a fast-path run off its request: the run, when its begin is still to be sent
    (by the caller's transition), else None (not a fast-path run, or the watchdog sent
    it)."""
    run = getattr(request, RUN_ATTR, None) if request is not None else None
    if run is None:
        return None
    setattr(request, RUN_ATTR, None)
    return run if running.close(run) else None


def begin_unsent(ref: StepRef, request: Any) -> None:
    """Before a transition that needs the step executing (a retry): send the begin of a
    fast-path run, if not sent yet. (A run that ends without a settle, by Ignore or
    Reject, is left to the watchdog: its begin is sent after ``baton_running_after``,
    and the step stays executing, as on the gated path.)"""
    run = _unbegun(request)
    if run is not None:
        out = ref.runtime.store.begin(ref.workflow_id, ref.step, ref.dispatch, run.ran_for())
        running.check_gate(ref, out)
        announce(ref.runtime, out)


def settle_run(
    ref: StepRef,
    request: Any,
    state: str,
    *,
    has_result: bool = False,
    result: Any = None,
    error: str | None = None,
) -> None:
    """Settle the step a request ran: with its begin (one transition) when it ran on the
    fast path and the watchdog did not send the begin; the events it made, announced.

    A fast-path step that no step depends on, whose events nobody in this process takes,
    has nothing to act on in the reply: it is sent without waiting for it (the task's
    result goes back to the worker at once; the reply is read later, see
    ``Store.run_unanswered``)."""
    runtime = ref.runtime
    store = runtime.store
    run = _unbegun(request)
    if run is not None and ref.leaf and not wanted(runtime, ref.workflow_id):
        store.run_unanswered(_answered(ref), ref.workflow_id, ref.step, ref.dispatch,
                             run.ran_for(), state, has_result=has_result, result=result,
                             error=error)  # fmt: skip
        running.collect_later(store)
        return
    if run is not None:
        out = store.run(ref.workflow_id, ref.step, ref.dispatch, run.ran_for(), state,
                        has_result=has_result, result=result, error=error)  # fmt: skip
        running.check_gate(ref, out)
    else:
        out = store.settle(ref.workflow_id, ref.step, state, has_result=has_result,
                           result=result, error=error)  # fmt: skip
    announce(runtime, out)


def _answered(ref: StepRef) -> Callable[[Transition], None]:
    """What to do with the reply of a run sent without waiting, when it is read."""

    def answered(out: Transition) -> None:
        with guarded("a step's settle, read late", ref.workflow_id):
            running.check_gate(ref, out)
            announce(ref.runtime, out)

    return answered


# --- task_success / task_retry / task_failure (pool child) ---------------------------


def _result_for_store(ref: StepRef, result: Any) -> Any:
    if result is None or not ref.runtime.config.store_results:
        return None
    try:
        json.dumps(result)
    except (TypeError, ValueError):
        logger.warning(UNSERIALIZABLE, ref.step, ref.workflow_id)
        return None
    return result


# task_success carries no task_id: the request is still the sender's.
@step_hook("task_success", find=_current_run)
def on_task_success(ref: StepRef, sender: Any, kwargs: dict[str, Any]) -> None:
    result = kwargs.get("result")
    settle_run(
        ref,
        sender.request,
        COMPLETED,
        has_result=result is not None,
        result=_result_for_store(ref, result),
    )


def mark_retrying(ref: StepRef, request: Any, cause: Any) -> None:
    """The step failed and will be retried: one transition, its events."""
    begin_unsent(ref, request)
    out = ref.runtime.store.retrying(ref.workflow_id, ref.step, ref.runtime.error_text(cause))
    announce(ref.runtime, out)


@step_hook("task_retry", find=_given_request)
def on_task_retry(ref: StepRef, sender: Any, kwargs: dict[str, Any]) -> None:
    if getattr(kwargs.get("request"), RETRY_MARKED_ATTR, False):
        return  # already marked by the retry wrapper, before the retry was published
    # reason is the Retry exception; its .exc is what the task raised, when known.
    reason = kwargs.get("reason")
    mark_retrying(ref, kwargs.get("request"), getattr(reason, "exc", None) or reason)


def _failing_request(sender: Any, kwargs: dict[str, Any]) -> StepRef | None:
    task_id = kwargs.get("task_id")
    if getattr(sender.request, "id", None) == task_id:
        return step_of(sender.app, sender.request)
    # A WorkerLostError is reported by the main process, where sender.request is not the
    # failing request: find the step through the store's job index for that task id.
    runtime = runtime_for(sender.app)
    located = runtime.store.locate(task_id) if runtime is not None and task_id else None
    if runtime is None or located is None:
        return None
    return StepRef(runtime, located[0], located[1], 0)


@step_hook("task_failure", find=_failing_request)
def on_task_failure(ref: StepRef, sender: Any, kwargs: dict[str, Any]) -> None:
    # In the pool process that ran it, the request is the sender's; a WorkerLostError is
    # reported by the main process (no run of its own there).
    ran_here = getattr(sender.request, "id", None) == kwargs.get("task_id")
    error = ref.runtime.error_text(kwargs.get("exception"))
    settle_run(ref, sender.request if ran_here else None, DISCARDED, error=error)


# --- task_revoked (always the main process) ------------------------------------------


# The request here is a Context built from the message: it still carries the headers.
@step_hook("task_revoked", find=_given_request)
def on_task_revoked(ref: StepRef, sender: Any, kwargs: dict[str, Any]) -> None:
    if kwargs.get("expired"):
        reason = "expired"
    elif kwargs.get("terminated"):
        reason = f"revoked and terminated (signal {kwargs.get('signum')})"
    else:
        reason = "revoked"
    out = ref.runtime.store.settle(ref.workflow_id, ref.step, CANCELLED, error=reason)
    announce(ref.runtime, out)


# --- worker_init (the worker's main process) ------------------------------------------


def on_worker_init(sender: Any = None, **_: Any) -> None:
    """Tell the store it serves a worker's tasks (the pool's processes are forked from
    this one), and refuse loudly a store that the prefork pool's processes cannot
    share."""
    try:
        app = getattr(sender, "app", None)
        runtime = runtime_for(app) if app is not None else None
        if runtime is None:
            return
        runtime.store.serves_tasks()
        if runtime.store.shared_across_processes:
            return
        if _is_prefork(getattr(sender, "pool_cls", None)):
            logger.error(MEMORY_UNDER_PREFORK, runtime.config.store)
    except Exception as exc:
        log_failure("worker_init hook", exc)


# --- worker_process_shutdown (a pool process), worker_shutdown (the main process) ------


def on_process_exit(sender: Any = None, **_: Any) -> None:
    """Read the replies of the settles sent without waiting before the process ends (a
    reply lost with its connection has its settle sent again: see
    ``Store.run_unanswered``)."""
    running.collect()


# Celery's own pool aliases that run a prefork pool (celery.concurrency.ALIASES).
PREFORK_ALIASES = frozenset({"prefork", "processes"})


def _is_prefork(pool: Any) -> bool:
    """Whether a worker's pool_cls is the prefork pool, without importing any pool.

    worker_init fires before Celery resolves pool_cls, so it may still be an alias
    string or a class; and Celery keeps worker_init free of pool imports, so that a
    handler there can still monkey-patch for gevent/eventlet.
    """
    if isinstance(pool, str):
        return pool.lower() in PREFORK_ALIASES or pool.endswith("prefork:TaskPool")
    return isinstance(pool, type) and any(
        c.__module__ == "celery.concurrency.prefork" and c.__name__ == "TaskPool"
        for c in pool.__mro__
    )


#: Every Celery signal baton listens to, and its receiver.
RECEIVERS: list[tuple[str, Callable[..., None]]] = [
    ("task_prerun", on_task_prerun),
    ("task_success", on_task_success),
    ("task_retry", on_task_retry),
    ("task_failure", on_task_failure),
    ("task_revoked", on_task_revoked),
    ("worker_init", on_worker_init),
    ("worker_process_shutdown", on_process_exit),
    ("worker_shutdown", on_process_exit),
]
