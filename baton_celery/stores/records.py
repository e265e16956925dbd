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
from typing import Any

from ..events import CANCELLED, COMPLETED, DISCARDED, EXECUTING, RETRYABLE, SNOOZED

__all__ = [
    "PENDING",
    "RUN",
    "SKIP",
    "SNOOZE",
    "TERMINAL",
    "Finish",
    "StepRecord",
    "Transition",
    "WorkflowRecord",
    "begin",
    "cancel",
    "mark_retrying",
    "settle",
    "settle_stuck",
]

#: A step that has not started yet (waiting for its dependencies, or queued).
PENDING = "pending"
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

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    def failed_steps(self) -> list[str]:
        return [s.name for s in self.steps.values() if s.state in FAILED]

    def stamp(self, step: StepRecord) -> StepRecord:
        """Give ``step``'s new state the workflow's next event number."""
        self.seq += 1
        step.seq = self.seq
        step.updated_at = time.time()
        return step

    def dependents(self, name: str) -> Iterator[StepRecord]:
        return (s for s in self.steps.values() if name in s.deps)

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


@dataclasses.dataclass(frozen=True)
class Finish:
    """The finish claim, won by exactly one transition per workflow."""

    outcome: str
    failed_steps: tuple[str, ...]
    total_count: int
    duration: float
    finished_at: float
    seq: int  # numbered after every step event of the workflow


@dataclasses.dataclass
class Transition:
    """What one transition did, for the caller to act on after the store committed.

    Every transition (begin, retrying, settle, cancel, the backstop's) returns one.
    ``applied`` is False when it changed nothing (a duplicate settle, a stale retry, a
    message skipped at the gate): then it implies no event. Otherwise ``step`` (when the
    transition is about one step) has a new event, in :attr:`step_state`; ``cancelled``
    holds the steps it cancelled (the cascade), ``released`` the dependents that must now
    be published, and ``finish`` is set on the one transition that won the finish claim.
    ``decision`` is the gate's answer, for ``begin`` only.
    """

    workflow_id: str
    workflow_label: str | None
    applied: bool = False
    step: StepRecord | None = None
    decision: str | None = None
    released: list[StepRecord] = dataclasses.field(default_factory=list)
    cancelled: list[StepRecord] = dataclasses.field(default_factory=list)
    finish: Finish | None = None

    @property
    def step_state(self) -> str | None:
        """The state of the step's own event: its new state, or "snoozed" for a step
        that stayed pending because its message came too early. None: no event."""
        if not self.applied or self.step is None:
            return None
        return SNOOZED if self.step.state == PENDING else self.step.state


def _fail(step: StepRecord, state: str, error: str | None, origin: str | None) -> None:
    step.state = state
    step.error = error
    step.origin = origin or step.name


def _cascade_reason(dep: StepRecord) -> str:
    return f"dependency {dep.name!r} was {dep.state} (failure began at {dep.origin!r})"


def _propagate(record: WorkflowRecord, settled: StepRecord, out: Transition) -> None:
    """Release or cancel the dependents of a step that just settled, transitively."""
    stack = [settled]
    while stack:
        dep = stack.pop()
        for child in record.dependents(dep.name):
            if child.state != PENDING or child.dispatch:
                continue  # already published, running or settled
            if not child.tolerates(dep):
                _fail(child, CANCELLED, _cascade_reason(dep), dep.origin)
            elif not all(child.tolerates(record.steps[d]) for d in child.deps):
                continue  # still waiting for another dependency
            elif record.cancel_requested:
                _fail(child, CANCELLED, WORKFLOW_CANCELLED, None)
            else:
                child.dispatch += 1
                child.updated_at = time.time()
                out.released.append(child)
                continue
            out.cancelled.append(record.stamp(child))
            stack.append(child)


def _claim_finish(record: WorkflowRecord, out: Transition) -> None:
    if record.finished or not all(s.settled for s in record.steps.values()):
        return
    failed = record.failed_steps()
    record.outcome = "failed" if failed else "completed"
    record.finished_at = time.time()
    record.seq += 1
    out.finish = Finish(
        outcome=record.outcome,
        failed_steps=tuple(failed),
        total_count=len(record.steps),
        duration=max(0.0, record.finished_at - record.created_at),
        finished_at=record.finished_at,
        seq=record.seq,
    )


def _cancel_at_gate(
    record: WorkflowRecord, step: StepRecord, error: str, origin: str | None
) -> Transition:
    out = Transition(record.id, record.label, applied=True, step=step, decision=SKIP)
    _fail(step, CANCELLED, error, origin)
    record.stamp(step)
    _propagate(record, step, out)
    _claim_finish(record, out)
    return out


def begin(record: WorkflowRecord, name: str, dispatch: int) -> Transition:
    """A step's message is about to run: decide whether it may, and count the attempt.

    ``dispatch`` is the publication number the message carries. A message older than the
    step's latest publication (a snoozed copy overtaken by the release) is skipped; a
    redelivery of the current one (worker lost, acks_late) runs again as a new attempt.
    """
    step = record.steps[name]
    if step.settled or dispatch < step.dispatch:
        return Transition(record.id, record.label, step=step, decision=SKIP)
    if record.cancel_requested:
        return _cancel_at_gate(record, step, WORKFLOW_CANCELLED, None)
    deps = [record.steps[d] for d in step.deps]
    blocking = next((d for d in deps if d.settled and not step.tolerates(d)), None)
    if blocking is not None:
        # Normally cascaded when the dependency settled; reached only by a stray message.
        return _cancel_at_gate(record, step, _cascade_reason(blocking), blocking.origin)
    if not all(d.settled for d in deps):
        record.stamp(step)
        return Transition(record.id, record.label, applied=True, step=step, decision=SNOOZE)
    step.state = EXECUTING
    step.dispatch = max(step.dispatch, dispatch)
    step.attempt += 1
    step.error = None
    record.stamp(step)
    return Transition(record.id, record.label, applied=True, step=step, decision=RUN)


def mark_retrying(record: WorkflowRecord, name: str, error: str | None) -> Transition:
    """The step failed and Celery will retry it; not applied when it is not running
    (a stale report)."""
    step = record.steps[name]
    if step.state != EXECUTING:
        return Transition(record.id, record.label, step=step)
    step.state = RETRYABLE
    step.error = error
    record.stamp(step)
    return Transition(record.id, record.label, applied=True, step=step)


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
        return Transition(record.id, record.label, step=step)
    out = Transition(record.id, record.label, applied=True, step=step)
    step.state = state
    step.has_result = has_result
    step.result = result
    step.error = error
    if state in FAILED:
        step.origin = step.name
    record.stamp(step)
    _propagate(record, step, out)
    _claim_finish(record, out)
    return out


def settle_stuck(record: WorkflowRecord, name: str, seq: int, error: str) -> Transition:
    """The backstop's transition: discard a step that made no progress since it was seen
    with event number ``seq``. Anything that happened to it since (it started, retried,
    settled) wins: then nothing changes and ``applied`` is False."""
    step = record.steps[name]
    if step.settled or step.seq != seq:
        return Transition(record.id, record.label, step=step)
    return settle(record, name, DISCARDED, error=error)


def cancel(record: WorkflowRecord) -> Transition:
    """Cancel the workflow: steps that have not started are cancelled now; running ones
    finish (their dependents will not be released); the finish is claimed once all settle."""
    out = Transition(
        record.id, record.label, applied=not record.finished and not record.cancel_requested
    )
    if not out.applied:
        return out
    record.cancel_requested = True
    for step in record.steps.values():
        if step.state == PENDING:
            _fail(step, CANCELLED, WORKFLOW_CANCELLED, None)
            out.cancelled.append(record.stamp(step))
    _claim_finish(record, out)
    return out
