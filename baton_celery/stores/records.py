"""A workflow's stored state, and the transitions every store applies atomically.

The functions here are pure: each takes a :class:`WorkflowRecord`, changes it in place and
returns what the caller must do next (run or not, which dependents to publish, which
steps were cancelled, whether this call won the finish). A store's only job is to run one
of them at a time per workflow, atomically, against its own storage.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from ..events import (
    CANCELLED,
    COMPLETED,
    DISCARDED,
    EXECUTING,
    RETRYABLE,
    SNOOZED,
    Event,
    StepUpdated,
    WorkflowFinished,
    cut_error,
)
from .transition import Finish, Released, Transition, WorkflowSummary

__all__ = [
    "PENDING",
    "RUN",
    "SKIP",
    "SNOOZE",
    "TERMINAL",
    "Finish",
    "Released",
    "StepRecord",
    "Transition",
    "WorkflowRecord",
    "WorkflowSummary",
    "begin",
    "cancel",
    "finish_event",
    "mark_retrying",
    "settle",
    "settle_stuck",
    "step_event",
]

#: A step that has not started yet (waiting for its dependencies, or queued).
PENDING = "pending"
DEFAULT_ERROR_LIMIT = 2000

#: A workflow's state before it finished (then: its outcome, "completed" or "failed").
RUNNING = "running"
TERMINAL = frozenset({COMPLETED, DISCARDED, CANCELLED})
FAILED = frozenset({DISCARDED, CANCELLED})

# Gate decisions for a step's message that is about to run.
RUN = "run"  # run the body; the step is now executing
SNOOZE = "snooze"  # a dependency has not settled: requeue, do not run
SKIP = "skip"  # already settled (a duplicate delivery, or cancelled meanwhile): do not run

WORKFLOW_CANCELLED = "workflow cancelled"


@dataclasses.dataclass
class StepRecord:
    name: str
    task: str
    job_id: str
    signature: dict[str, Any]
    deps: tuple[str, ...] = ()
    ignore_cancelled: bool = False
    ignore_discarded: bool = False
    state: str = PENDING
    dispatch: int = 0  # how many times baton published it: 0 until its dependencies allow
    attempt: int = 0
    has_result: bool = False
    result: Any = None
    error: str | None = None
    origin: str | None = None  # for a failed step: the step where the failure began
    seq: int = 0  # the workflow-wide number of this step's latest event (see WorkflowRecord.seq)
    updated_at: float = 0.0  # when it was last stamped or published (0: at creation)

    @property
    def settled(self) -> bool:
        return self.state in TERMINAL

    def released(self, leaf: bool) -> Released:
        """What publishing this step takes (``leaf``: no step depends on it)."""
        return Released(self.name, self.job_id, self.signature, self.dispatch, leaf)

    def tolerates(self, dep: StepRecord) -> bool:
        """Whether this step may run after ``dep`` ended as it did."""
        if dep.state == COMPLETED:
            return True
        if dep.state == CANCELLED:
            return self.ignore_cancelled
        if dep.state == DISCARDED:
            return self.ignore_discarded
        return False


@dataclasses.dataclass
class WorkflowRecord:
    id: str
    label: str | None
    steps: dict[str, StepRecord]  # in the order the steps were added
    created_at: float = dataclasses.field(default_factory=time.time)
    cancel_requested: bool = False
    outcome: str | None = None
    finished_at: float | None = None
    # Every event a transition implies gets the next number, inside the same atomic update,
    # so a receiver in another process can put one workflow's events back in order.
    seq: int = 0
    # When its latest event happened: a later transition's events are never stamped
    # earlier, whichever process (and clock) makes them.
    updated_at: float = 0.0
    # Error texts the store makes itself (a cascade's reason) are cut to this length: the
    # baton_max_error_length of the app that created the workflow.
    error_limit: int = DEFAULT_ERROR_LIMIT

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def failed_steps(self) -> list[str]:
        return [s.name for s in self.steps.values() if s.state in FAILED]

    def tick(self) -> float:
        """Now, for a transition's events: never before the workflow's latest event."""
        self.updated_at = max(time.time(), self.updated_at, self.created_at)
        return self.updated_at

    def summary(self) -> WorkflowSummary:
        return WorkflowSummary(
            id=self.id,
            label=self.label,
            state=self.outcome or RUNNING,
            created_at=self.created_at,
            finished_at=self.finished_at,
            total=len(self.steps),
            settled=sum(1 for s in self.steps.values() if s.settled),
            failed_steps=tuple(self.failed_steps()) if self.finished else (),
            seq=self.seq,
        )

    def dependents(self, name: str) -> Iterator[StepRecord]:
        return (s for s in self.steps.values() if name in s.deps)

    def depended_on(self) -> set[str]:
        """The names of the steps some step depends on (the others are leaves)."""
        return {d for s in self.steps.values() for d in s.deps}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkflowRecord:
        data = json.loads(text)
        steps = {}
        for name, raw in data.pop("steps").items():
            raw["deps"] = tuple(raw["deps"])
            steps[name] = StepRecord(**raw)
        return cls(steps=steps, **data)


def _at(unix_time: float) -> datetime:
    return datetime.fromtimestamp(unix_time, timezone.utc)


def step_event(workflow_id: str, label: str | None, step: StepRecord, state: str) -> StepUpdated:
    """The event of ``step``'s latest change (numbered ``step.seq``), to ``state``."""
    return StepUpdated(
        workflow_id=workflow_id,
        workflow_label=label,
        step_name=step.name,
        worker=step.task,
        state=state,
        job_id=step.job_id,
        attempt=step.attempt,
        has_result=step.has_result,
        error=step.error,
        timestamp=_at(step.updated_at),
        seq=step.seq,
    )


def finish_event(workflow_id: str, label: str | None, finish: Finish) -> WorkflowFinished:
    return WorkflowFinished(
        workflow_id=workflow_id,
        workflow_label=label,
        outcome=finish.outcome,
        failed_steps=finish.failed_steps,
        timestamp=_at(finish.finished_at),
        seq=finish.seq,
    )


def _emit(record: WorkflowRecord, out: Transition, step: StepRecord, state: str) -> StepRecord:
    """Number and stamp ``step``'s new ``state``, and make its event."""
    record.seq += 1
    step.seq = record.seq
    step.updated_at = record.updated_at
    _made(out).append(step_event(record.id, record.label, step, state))
    return step


def _made(out: Transition) -> list[Event]:
    """The events a transition of this module makes (a plain list, in order)."""
    assert isinstance(out.events, list)
    return out.events


def _applied(record: WorkflowRecord, **fields: Any) -> Transition:
    """A transition that will change the record: its events are stamped from now on."""
    record.tick()
    return Transition(record.id, record.label, applied=True, **fields)


def _unchanged(record: WorkflowRecord, **fields: Any) -> Transition:
    return Transition(record.id, record.label, **fields)


def _fail(step: StepRecord, state: str, error: str | None, origin: str | None) -> None:
    step.state = state
    step.error = error
    step.origin = origin or step.name


def _cascade_reason(record: WorkflowRecord, dep: StepRecord) -> str:
    reason = f"dependency {dep.name!r} was {dep.state} (failure began at {dep.origin!r})"
    return cut_error(reason, record.error_limit)


def _propagate(record: WorkflowRecord, settled: StepRecord, out: Transition) -> None:
    """Release or cancel the dependents of a step that just settled, transitively."""
    stack = [settled]
    while stack:
        dep = stack.pop()
        for child in record.dependents(dep.name):
            if child.state != PENDING or child.dispatch:
                continue  # already published, running or settled
            if not child.tolerates(dep):
                _fail(child, CANCELLED, _cascade_reason(record, dep), dep.origin)
            elif not all(child.tolerates(record.steps[d]) for d in child.deps):
                continue  # still waiting for another dependency
            elif record.cancel_requested:
                _fail(child, CANCELLED, WORKFLOW_CANCELLED, None)
            else:
                child.dispatch += 1
                child.updated_at = record.updated_at
                out.released.append(child.released(not any(record.dependents(child.name))))
                continue
            _emit(record, out, child, CANCELLED)
            stack.append(child)


def _claim_finish(record: WorkflowRecord, out: Transition) -> None:
    if record.finished or not all(s.settled for s in record.steps.values()):
        return
    failed = record.failed_steps()
    record.outcome = "failed" if failed else "completed"
    record.finished_at = record.updated_at
    record.seq += 1
    out.finish = Finish(
        outcome=record.outcome,
        failed_steps=tuple(failed),
        total_count=len(record.steps),
        duration=max(0.0, record.finished_at - record.created_at),
        finished_at=record.finished_at,
        seq=record.seq,
    )
    _made(out).append(finish_event(record.id, record.label, out.finish))


def _cancel_at_gate(
    record: WorkflowRecord, step: StepRecord, error: str, origin: str | None
) -> Transition:
    out = _applied(record, decision=SKIP, dispatch=step.dispatch)
    _fail(step, CANCELLED, error, origin)
    _emit(record, out, step, CANCELLED)
    _propagate(record, step, out)
    _claim_finish(record, out)
    return out


def begin(record: WorkflowRecord, name: str, dispatch: int, ran_for: float = 0.0) -> Transition:
    """A step's message is about to run: decide whether it may, and count the attempt.

    ``dispatch`` is the publication number the message carries. A message older than the
    step's latest publication (a snoozed copy overtaken by the release) is skipped; a
    redelivery of the current one (worker lost, acks_late) runs again as a new attempt.
    ``ran_for``: the seconds the body has run already (the fast path): the executing
    event is stamped that much earlier, never before the workflow's latest event.
    """
    floor = max(record.updated_at, record.created_at)
    step = record.steps[name]
    if step.settled or dispatch < step.dispatch:
        return _unchanged(record, decision=SKIP, dispatch=step.dispatch)
    if record.cancel_requested:
        return _cancel_at_gate(record, step, WORKFLOW_CANCELLED, None)
    deps = [record.steps[d] for d in step.deps]
    blocking = next((d for d in deps if d.settled and not step.tolerates(d)), None)
    if blocking is not None:
        # Normally cascaded when the dependency settled; reached only by a stray message.
        return _cancel_at_gate(record, step, _cascade_reason(record, blocking), blocking.origin)
    if not all(d.settled for d in deps):
        out = _applied(record, decision=SNOOZE, dispatch=step.dispatch)
        _emit(record, out, step, SNOOZED)
        return out
    step.dispatch = max(step.dispatch, dispatch)
    out = _applied(record, decision=RUN, dispatch=step.dispatch)
    step.state = EXECUTING
    step.attempt += 1
    step.error = None
    _emit(record, out, step, EXECUTING)
    if ran_for > 0:
        started = _at(max(record.updated_at - ran_for, floor))
        _made(out)[-1] = dataclasses.replace(_made(out)[-1], timestamp=started)
    return out


def run(
    record: WorkflowRecord,
    name: str,
    dispatch: int,
    ran_for: float,
    state: str,
    *,
    has_result: bool = False,
    result: Any = None,
    error: str | None = None,
) -> Transition:
    """A step that ran without asking the gate (the fast path): :func:`begin` and
    :func:`settle` as one transition. Its ``executing`` event is stamped when the body
    started, ``ran_for`` seconds ago (never before the workflow's latest event). When the
    gate does not answer "run", only the gate's part applies (the body ran anyway)."""
    gate = begin(record, name, dispatch, ran_for)
    if gate.decision != RUN:
        return gate
    out = settle(record, name, state, has_result=has_result, result=result, error=error)
    out.decision, out.dispatch = RUN, gate.dispatch
    out.events = [*_made(gate), *_made(out)]
    return out


def mark_retrying(record: WorkflowRecord, name: str, error: str | None) -> Transition:
    """The step failed and Celery will retry it; not applied when it is not running
    (a stale report)."""
    step = record.steps[name]
    if step.state != EXECUTING:
        return _unchanged(record)
    out = _applied(record)
    step.state = RETRYABLE
    step.error = error
    _emit(record, out, step, RETRYABLE)
    return out


def settle(
    record: WorkflowRecord,
    name: str,
    state: str,
    *,
    has_result: bool = False,
    result: Any = None,
    error: str | None = None,
) -> Transition:
    """The step reached a terminal state: record it, release or cancel its dependents, and
    claim the finish if it was the last outstanding step."""
    if state not in TERMINAL:
        raise ValueError(f"not a terminal state: {state!r}")
    step = record.steps[name]
    if step.settled:
        return _unchanged(record)
    out = _applied(record)
    step.state = state
    step.has_result = has_result
    step.result = result
    step.error = error
    if state in FAILED:
        step.origin = step.name
    _emit(record, out, step, state)
    _propagate(record, step, out)
    _claim_finish(record, out)
    return out


def settle_stuck(record: WorkflowRecord, name: str, seq: int, error: str) -> Transition:
    """The backstop's transition: discard a step that made no progress since it was seen
    with event number ``seq``. Anything that happened to it since (it started, retried,
    settled) wins: then nothing changes and ``applied`` is False."""
    step = record.steps[name]
    if step.settled or step.seq != seq:
        return _unchanged(record)
    return settle(record, name, DISCARDED, error=error)


def cancel(record: WorkflowRecord) -> Transition:
    """Cancel the workflow: steps that have not started are cancelled now; running ones
    finish (their dependents will not be released); the finish is claimed once all settle."""
    if record.finished or record.cancel_requested:
        return _unchanged(record)
    out = _applied(record)
    record.cancel_requested = True
    for step in record.steps.values():
        if step.state == PENDING:
            _fail(step, CANCELLED, WORKFLOW_CANCELLED, None)
            _emit(record, out, step, CANCELLED)
            if step.dispatch:
                out.revoke.append(step.job_id)
    _claim_finish(record, out)
    return out
