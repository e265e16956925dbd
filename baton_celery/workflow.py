"""Building a workflow of named steps, starting it, and following it through a handle.

Example::

    from baton_celery import Workflow

    wf = (
        Workflow(label="nightly-etl")
        .add("extract", extract.s("2026-11-24"))
        .add("clean", clean.s(), deps=["extract"])
        .add("load", load.s(), deps=["clean"])
    )
    handle = wf.apply_async()
    finished = handle.wait(timeout=60)  # a WorkflowFinished event
    print(finished.outcome, finished.failed_steps)
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, NamedTuple

from celery.canvas import Signature, _chain, chord, group

from . import pubsub
from .announce import announce, publish_or_discard
from .events import COMPLETED, EXECUTING, RETRYABLE, Event, WorkflowFinished
from .listener import listening
from .runtime import Runtime, runtime_for
from .stores.records import StepRecord, WorkflowRecord

__all__ = ["StepStatus", "Workflow", "WorkflowError", "WorkflowHandle", "WorkflowStatus"]

#: With a bridge listener running, how often (seconds) wait() re-reads the store anyway:
#: events sent while the listener was reconnecting are not replayed, the store has them.
LIVE_FALLBACK = 1.0


class WorkflowError(ValueError):
    """The workflow is not valid; nothing was published and nothing was stored."""


@dataclasses.dataclass(frozen=True)
class _Step:
    name: str
    signature: Any
    deps: tuple[str, ...]
    ignore_cancelled: bool
    ignore_discarded: bool


class Workflow:
    """A set of named steps, each one Celery task signature, with dependencies."""

    def __init__(self, label: str | None = None, workflow_id: str | None = None) -> None:
        if label is not None and not isinstance(label, str):
            raise WorkflowError(f"label must be a string or None, got {label!r}")
        if workflow_id is not None and (not isinstance(workflow_id, str) or not workflow_id):
            raise WorkflowError(f"workflow_id must be a non-empty string, got {workflow_id!r}")
        self.label = label
        self.id = workflow_id or str(uuid.uuid4())
        self._steps: list[_Step] = []

    @classmethod
    def from_canvas(
        cls, signature: Any, label: str | None = None, workflow_id: str | None = None
    ) -> Workflow:
        """A workflow of a Celery canvas (chain, group, chord, nested): one step per task
        signature, its dependencies and arguments as Celery's canvas semantics give them
        (see :mod:`baton_celery.canvas`). A step is named ``sig.set(step="name")``, else
        after its task (``add``, ``add#2``, ...). Raises :class:`WorkflowError` for what
        baton cannot express."""
        from .canvas import RESULT, translate

        workflow = cls(label=label, workflow_id=workflow_id)
        steps, shape = translate(signature, WorkflowError)
        steps[0].signature.options[RESULT] = shape
        for step in steps:
            workflow.add(step.name, step.signature, deps=step.deps)
        return workflow

    def add(
        self,
        name: str,
        signature: Any,
        deps: Iterable[str] = (),
        ignore_cancelled: bool = False,
        ignore_discarded: bool = False,
    ) -> Workflow:
        """Add a step; it runs once every step in ``deps`` completed. Returns the workflow.

        With ``ignore_cancelled`` / ``ignore_discarded``, a dependency that ended cancelled /
        discarded counts as satisfied instead of cancelling this step.
        """
        if isinstance(deps, str):
            raise WorkflowError(f"step {name!r}: deps must be a list of step names, not {deps!r}")
        self._steps.append(
            _Step(name, signature, tuple(deps), bool(ignore_cancelled), bool(ignore_discarded))
        )
        return self

    def validate(self) -> None:
        """Raise :class:`WorkflowError` unless the workflow can be started."""
        if not self._steps:
            raise WorkflowError("a workflow needs at least one step")
        names: set[str] = set()
        for step in self._steps:
            if not isinstance(step.name, str) or not step.name:
                raise WorkflowError(f"step names must be non-empty strings, got {step.name!r}")
            if step.name in names:
                raise WorkflowError(f"duplicate step name {step.name!r}")
            names.add(step.name)
            _check_signature(step)
        for step in self._steps:
            for dep in step.deps:
                if dep not in names:
                    raise WorkflowError(f"step {step.name!r} depends on unknown step {dep!r}")
                if dep == step.name:
                    raise WorkflowError(f"step {step.name!r} depends on itself")
        cycle = _find_cycle({s.name: s.deps for s in self._steps})
        if cycle:
            raise WorkflowError("dependency cycle: " + " -> ".join(cycle))

    def apply_async(self, app: Any = None) -> WorkflowHandle:
        """Validate, store the whole workflow, and publish its root steps.

        ``app`` defaults to the app of the first step's signature; baton_celery must be
        installed on it.
        """
        self.validate()
        app = app or self._steps[0].signature._app or self._steps[0].signature.app
        runtime = _runtime(app)
        record = WorkflowRecord(
            self.id,
            self.label,
            {s.name: _record(s) for s in self._steps},
            error_limit=runtime.config.max_error_length,
        )
        for step in record.steps.values():
            if not step.deps:
                step.dispatch = 1
        runtime.store.create(record)
        pubsub.send_workflow_created(app, record.id, record.label)
        parents = record.depended_on()
        for step in record.steps.values():
            if step.dispatch:
                released = step.released(step.name not in parents)
                publish_or_discard(runtime, record.id, record.label, released)
        return WorkflowHandle(record.id, app, label=record.label)


def _check_signature(step: _Step) -> None:
    sig = step.signature
    if isinstance(sig, (group, _chain, chord)):
        raise WorkflowError(
            f"step {step.name!r}: canvases ({type(sig).__name__}) are not supported yet; "
            "give each task its own step"
        )
    if not isinstance(sig, Signature):
        raise WorkflowError(
            f"step {step.name!r}: expected a Celery signature such as task.s(...), got {sig!r}"
        )
    try:
        json.dumps([sig.args, sig.kwargs])
    except (TypeError, ValueError) as exc:
        raise WorkflowError(
            f"step {step.name!r}: arguments must be JSON-serializable: {exc}"
        ) from exc
    try:
        json.dumps(sig.options)
    except (TypeError, ValueError) as exc:
        raise WorkflowError(
            f"step {step.name!r}: options must be JSON-serializable: {exc}"
        ) from exc


def _record(step: _Step) -> StepRecord:
    options = dict(step.signature.options)
    job_id = options.pop("task_id", None) or str(uuid.uuid4())
    signature = {**step.signature, "options": options}
    return StepRecord(
        name=step.name,
        task=step.signature.task,
        job_id=job_id,
        signature=signature,
        deps=step.deps,
        ignore_cancelled=step.ignore_cancelled,
        ignore_discarded=step.ignore_discarded,
    )


def _find_cycle(graph: Mapping[str, tuple[str, ...]]) -> list[str] | None:
    """A cycle as a closed path of names (["a", "b", "a"]), or None. Iterative DFS."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    for root in graph:
        if color[root] != WHITE:
            continue
        path: list[str] = [root]
        stack = [iter(graph[root])]
        color[root] = GREY
        while stack:
            dep = next(stack[-1], None)
            if dep is None:
                color[path.pop()] = BLACK
                stack.pop()
            elif color[dep] == GREY:
                # path runs root -> ... -> current, and current depends on dep.
                return [*path[path.index(dep) :], dep]  # "a -> b -> a": a needs b needs a
            elif color[dep] == WHITE:
                color[dep] = GREY
                path.append(dep)
                stack.append(iter(graph[dep]))
    return None


def _runtime(app: Any) -> Runtime:
    runtime = runtime_for(app)
    if runtime is None:
        raise RuntimeError(
            f"baton_celery is not installed on Celery app {app!r}: call baton_celery.install(app)"
        )
    return runtime


class StepStatus(NamedTuple):
    state: str  # "pending" until it starts, then executing/retryable/completed/...
    attempt: int
    job_id: str
    error: str | None
    has_result: bool


@dataclasses.dataclass(frozen=True)
class WorkflowStatus:
    workflow_id: str
    workflow_label: str | None
    steps: dict[str, StepStatus]  # in the order the steps were added
    outcome: str | None  # None until finished
    failed_steps: tuple[str, ...]

    @property
    def finished(self) -> bool:
        return self.outcome is not None


class WorkflowHandle:
    """A started workflow. Rebuild one in any process with ``WorkflowHandle(id, app)``."""

    def __init__(self, workflow_id: str, app: Any, *, label: str | None = None) -> None:
        self.id = workflow_id
        self.app = app
        self._label = label

    def __repr__(self) -> str:
        return f"<WorkflowHandle {self.id} label={self._label!r}>"

    @property
    def label(self) -> str | None:
        if self._label is None:
            self._label = self._load().label
        return self._label

    def _load(self) -> WorkflowRecord:
        return _runtime(self.app).store.load(self.id)

    def status(self) -> WorkflowStatus:
        """Every step's current state, and the outcome once the workflow finished."""
        record = self._load()
        return WorkflowStatus(
            workflow_id=record.id,
            workflow_label=record.label,
            steps={
                s.name: StepStatus(s.state, s.attempt, s.job_id, s.error, s.has_result)
                for s in record.steps.values()
            },
            outcome=record.outcome,
            failed_steps=tuple(record.failed_steps()) if record.finished else (),
        )

    def events(self, after: int = 0) -> list[Event]:
        """The workflow's history: every event it made so far (numbered above ``after``),
        in the order they happened, as its receivers got them, from any process. Raises
        ``UnknownWorkflow`` (a KeyError) for an unknown or expired id."""
        return _runtime(self.app).store.history(self.id, after)

    def results(self) -> dict[str, Any]:
        """Each completed step's stored result by name (None for one that returned
        nothing, or whose result was not stored)."""
        record = self._load()
        return {s.name: s.result for s in record.steps.values() if s.state == COMPLETED}

    def result(self) -> Any:
        """For a workflow made by :meth:`Workflow.from_canvas`: what Celery's own
        AsyncResult of that canvas would give (the last link of a chain, the body's result
        for a chord, the list for a group). Raises :class:`WorkflowError` before the
        workflow finished, or when a step the result needs did not complete."""
        from .canvas import RESULT

        record = self._load()
        first = next(iter(record.steps.values()))
        shape = first.signature.get("options", {}).get(RESULT)
        if shape is None:
            raise WorkflowError(f"workflow {self.id} was not made by Workflow.from_canvas")
        if not record.finished:
            raise WorkflowError(f"workflow {self.id} has not finished")

        def value(tail: Any) -> Any:
            if not isinstance(tail, str):
                return [value(t) for t in tail]
            step = record.steps[tail]
            if step.state != COMPLETED:
                raise WorkflowError(f"step {tail!r} ended {step.state}: {step.error}")
            return step.result

        return value(shape)

    def wait(self, timeout: float | None = None, interval: float = 0.25) -> WorkflowFinished:
        """Block until the workflow finished; return its WorkflowFinished event.

        Reads the store (the source of truth, from any process) first. Meanwhile it
        listens on the workflow's topic: a live WorkflowFinished (sent in this process, or
        received by a :func:`~baton_celery.listen` listener) ends the wait at once. With a
        listener running for this app, the store is re-read only every
        ``LIVE_FALLBACK`` seconds; otherwise it is polled with a short back-off up to
        ``interval`` seconds. Raises TimeoutError after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.01
        arrived: list[WorkflowFinished] = []
        woken = threading.Event()

        def on_event(workflow_id: str, event: Any = None, **_: Any) -> None:
            if isinstance(event, WorkflowFinished):
                arrived.append(event)
                woken.set()

        pubsub.subscribe(self.id, on_event)
        try:
            while True:
                record = self._load()
                if record.finished and record.finished_at is not None:
                    return _finished_event(record)
                if arrived:
                    return arrived[0]
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"workflow {self.id} did not finish within {timeout} s")
                live = listening(self.app)
                step = LIVE_FALLBACK if live else pause
                if woken.wait(step if remaining is None else min(step, remaining)):
                    return arrived[0]
                if not live:
                    pause = min(pause * 2, interval)
        finally:
            pubsub.unsubscribe(self.id, on_event)

    def cancel(self, terminate: bool = False) -> None:
        """Cancel the workflow: steps not yet published never will be, queued ones are
        revoked, running ones finish (or are terminated with ``terminate=True``). Each
        cancelled step gets its event, and the workflow finishes "failed" once."""
        runtime = _runtime(self.app)
        out = runtime.store.cancel(self.id)
        # Announce what the store committed before revoking: a revoke that fails (broker
        # down) must not lose the cancelled events or the only WorkflowFinished.
        announce(runtime, out)
        record = runtime.store.load(self.id)
        queued = out.revoke
        retrying = [s.job_id for s in record.steps.values() if s.state == RETRYABLE]
        running = [s.job_id for s in record.steps.values() if s.state == EXECUTING]
        if queued or retrying:
            self.app.control.revoke(queued + retrying)
        if terminate and running:
            self.app.control.revoke(running, terminate=True)


def _finished_event(record: WorkflowRecord) -> WorkflowFinished:
    assert record.outcome is not None and record.finished_at is not None
    return WorkflowFinished(
        workflow_id=record.id,
        workflow_label=record.label,
        outcome=record.outcome,
        failed_steps=tuple(record.failed_steps()),
        timestamp=datetime.fromtimestamp(record.finished_at, timezone.utc),
        seq=record.seq,
    )
