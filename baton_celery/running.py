"""Steps running on the fast path whose begin has not reached the store yet, and the
watchdog that sends the begin of a long one (and reads the replies of the settles sent
without waiting: see :func:`collect_later`).

On the fast path (see ``hooks.on_task_prerun``) a step's body starts without asking the
store's gate; its begin then travels with its settle, one transition (``Store.run``).
So that a step that runs for long still shows as executing (in ``status()``, the events,
the dashboard), one daemon thread per process sends the begin of every such step still
running after ``baton_running_after`` seconds; the settle then finds it sent and settles
alone. The thread wakes every :data:`TICK` seconds and does nothing while no step is due.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import NamedTuple

from .announce import announce
from .guard import guarded
from .runtime import Runtime
from .stores.base import Store
from .stores.records import RUN
from .stores.transition import Transition

__all__ = [
    "RAN_ANYWAY",
    "Run",
    "StepRef",
    "announcing",
    "check_gate",
    "close",
    "collect",
    "collect_later",
    "start",
]

logger = logging.getLogger(__name__)

RAN_ANYWAY = (
    "baton_celery: step %r of workflow %s ran, but the store's gate answered %r (a "
    "revoke or a cancel that came too late to stop it); its settle changes nothing"
)
#: Seconds between two looks of the watchdog at the running steps.
TICK = 0.1


class StepRef(NamedTuple):
    """The step a signal is about, and the installed app's runtime."""

    runtime: Runtime
    workflow_id: str
    step: str
    dispatch: int
    published_at: float | None = None  # when baton published the message (its header)
    leaf: bool = False  # no step depends on it (its header)


class Run:
    """One fast-path run of a step: when it started, and whether its begin was sent."""

    __slots__ = ("begun", "ref", "sending", "started")

    def __init__(self, ref: StepRef) -> None:
        self.ref = ref
        self.started = time.monotonic()
        self.begun = False
        # None while the watchdog may still take it; set when either side took it (the
        # watchdog's, to wait for its begin; _CLOSED by the settle).
        self.sending: threading.Event | None = None

    def ran_for(self) -> float:
        return time.monotonic() - self.started


_CLOSED = threading.Event()
_CLOSED.set()

_lock = threading.Lock()
_open: dict[int, Run] = {}
# The stores that sent settles without waiting for their replies (Store.run_unanswered).
_unanswered: weakref.WeakSet[Store] = weakref.WeakSet()
_watchdog: tuple[int, threading.Thread] | None = None  # (its process id, the thread)


# The step whose begin the watchdog's thread is announcing (see announcing()).
_announcing = threading.local()


def announcing(workflow_id: str, step: str) -> StepRef | None:
    """The step if this thread is the watchdog announcing that step's begin (where no
    task request is current: instrumentation finds the step's publication time here)."""
    ref: StepRef | None = getattr(_announcing, "ref", None)
    return ref if ref is not None and (ref.workflow_id, ref.step) == (workflow_id, step) else None


def check_gate(ref: StepRef, out: Transition) -> None:
    """A fast-path step's body ran: warn when the gate, asked late, would have said no."""
    if out.decision != RUN:
        logger.warning(RAN_ANYWAY, ref.step, ref.workflow_id, out.decision)


def _forget_after_fork() -> None:
    # A forked child inherits neither the watchdog thread nor the parent's runs; a lock
    # the parent's watchdog held at the fork would stay held.
    global _lock, _open, _unanswered
    _lock, _open, _unanswered = threading.Lock(), {}, weakref.WeakSet()


os.register_at_fork(after_in_child=_forget_after_fork)


def start(ref: StepRef) -> Run:
    """A step's body starts without its begin: watch it."""
    run = Run(ref)
    with _lock:
        _open[id(run)] = run
    if _watchdog is None or _watchdog[0] != os.getpid():  # threads do not survive fork()
        _spawn()
    return run


def close(run: Run) -> bool:
    """Take ``run`` back to settle it: True when its begin was not sent (the settle must
    carry it: ``Store.run``), False when the watchdog sent it (once it was)."""
    with _lock:
        _open.pop(id(run), None)
        sending, run.sending = run.sending, run.sending or _CLOSED
    if sending is None:
        return True
    # The watchdog is sending (or sent) it: the settle must come after it. Bounded by
    # the store's own timeout; a begin that failed is carried by the settle instead.
    sending.wait(run.ref.runtime.config.store_timeout + 1.0)
    return not run.begun


def collect_later(store: Store) -> None:
    """``store`` sent a settle without waiting for its reply: the watchdog reads it at
    its next tick, if nothing read it before (the store's next such send does)."""
    if store not in _unanswered:
        with _lock:
            _unanswered.add(store)


def collect() -> None:
    """Read every reply still waiting (the watchdog's tick; a process on its way out)."""
    with _lock:
        stores = list(_unanswered)
    for store in stores:
        with guarded("reading the replies of settles sent without waiting"):
            store.collect()


def _spawn() -> None:
    global _watchdog
    with _lock:
        if _watchdog is not None and _watchdog[0] == os.getpid():
            return
        thread = threading.Thread(target=_watch, name="baton-running", daemon=True)
        _watchdog = (os.getpid(), thread)
    thread.start()


def _watch() -> None:
    while True:
        time.sleep(TICK)
        collect()
        now = time.monotonic()
        with _lock:
            due = [
                run
                for run in _open.values()
                if now - run.started >= run.ref.runtime.config.running_after
            ]
            for run in due:
                del _open[id(run)]
                run.sending = threading.Event()
        for run in due:
            _begin(run)


def _begin(run: Run) -> None:
    """Send the begin of a step that has been running for a while (the watchdog's
    thread); whatever happens, the settle waiting for it is let through."""
    ref = run.ref
    assert run.sending is not None
    try:
        with guarded("sending a long step's begin", ref.workflow_id):
            out = ref.runtime.store.begin(ref.workflow_id, ref.step, ref.dispatch, run.ran_for())
            run.begun = True
            check_gate(ref, out)
            _announcing.ref = ref
            announce(ref.runtime, out)
    finally:
        _announcing.ref = None
        run.sending.set()
        with guarded("releasing the watchdog's store connection", ref.workflow_id):
            ref.runtime.store.release_thread()  # this thread lives on, idle
