"""What the pages and the JSON API show, computed from the store: pure functions.

A workflow's steps are shown as its history makes them: the declared steps (names, task
names, dependencies) start ``pending`` and each event is applied in order, exactly as the
browser applies the live events that follow (``static/workflow.js`` mirrors
:func:`apply_event`). So the snapshot a page starts from and the stream it then follows
meet at one number, the last event's ``seq``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from ..events import Event, StepUpdated, WorkflowFinished
from ..stores.base import MAX_PAGE, WORKFLOW_STATES
from ..stores.records import PENDING, RUNNING, TERMINAL, WorkflowRecord
from ..stores.transition import WorkflowSummary

__all__ = [
    "BadQuery",
    "IndexQuery",
    "advance",
    "apply_event",
    "number",
    "workflow_detail",
]

#: Longest label a filter accepts.
MAX_LABEL = 200


class BadQuery(ValueError):
    """A request's query string cannot be answered; the message says why."""


@dataclasses.dataclass(frozen=True)
class IndexQuery:
    """The index's filters and page: ``?label=&state=&before=&limit=``."""

    limit: int
    label: str | None = None
    state: str | None = None
    before: float | None = None

    @classmethod
    def from_args(cls, args: Mapping[str, str], default_limit: int) -> IndexQuery:
        label = args.get("label") or None
        if label is not None and len(label) > MAX_LABEL:
            raise BadQuery(f"label: at most {MAX_LABEL} characters")
        state = args.get("state") or None
        if state is not None and state not in WORKFLOW_STATES:
            raise BadQuery(f"state: one of {', '.join(WORKFLOW_STATES)}, got {state!r}")
        return cls(
            limit=number(args, "limit", int, default_limit, 1, MAX_PAGE),
            label=label,
            state=state,
            before=number(args, "before", float, None),
        )

    def params(self, **changes: Any) -> dict[str, Any]:
        """The query string of this query with ``changes``, leaving out empty values."""
        values = {**dataclasses.asdict(self), **changes}
        return {k: v for k, v in values.items() if v is not None and k != "limit"}


def number(
    args: Mapping[str, str], name: str, kind: type, default: Any, low: Any = 0, high: Any = 2**53
) -> Any:
    """``args[name]`` as an int or a float within bounds, ``default`` when absent;
    :class:`BadQuery` naming it otherwise."""
    raw = args.get(name)
    if raw in (None, ""):
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise BadQuery(f"{name}: not a number: {raw!r}") from None
    if not low <= value <= high:  # NaN too
        raise BadQuery(f"{name}: out of range: {raw!r}")
    return value


# --- the index: a summary kept current by events ------------------------------------


def advance(summary: WorkflowSummary, event: Event) -> WorkflowSummary | None:
    """``summary`` after ``event``: itself when the event is already counted in it, None
    when events are missing in between (read the summary from the store again)."""
    if event.seq <= summary.seq:
        return summary
    if event.seq != summary.seq + 1:
        return None
    if isinstance(event, WorkflowFinished):
        return dataclasses.replace(
            summary,
            state=event.outcome,
            finished_at=event.timestamp.timestamp(),
            failed_steps=event.failed_steps,
            seq=event.seq,
        )
    # A step settles once, so each terminal event counts one more settled step.
    settled = summary.settled + (1 if event.state in TERMINAL else 0)
    return dataclasses.replace(summary, settled=settled, seq=event.seq)


# --- the detail: steps as the history makes them ------------------------------------


def _new_step(record: WorkflowRecord, name: str) -> dict[str, Any]:
    step = record.steps[name]
    return {
        "name": name,
        "task": step.task,
        "job_id": step.job_id,
        "deps": list(step.deps),
        "state": PENDING,
        "attempt": 0,
        "error": None,
        "has_result": False,
        "started_at": None,  # when its first attempt began
        "settled_at": None,
        "runs": [],  # [start, end or None, state it ended in or None] per attempt
    }


def apply_event(step: dict[str, Any], event: StepUpdated) -> None:
    """Change a step view by one of its events (``static/workflow.js`` does the same)."""
    at = event.timestamp.timestamp()
    runs: list[list[Any]] = step["runs"]
    if event.state == "snoozed":
        return  # its message came early and was requeued: nothing changed
    step["state"] = event.state
    step["attempt"] = event.attempt
    step["error"] = event.error
    step["has_result"] = event.has_result
    if event.state == "executing":
        if step["started_at"] is None:
            step["started_at"] = at
        if runs and runs[-1][1] is None:  # redelivered after its worker was lost
            runs[-1][1:] = [at, "lost"]
        runs.append([at, None, None])
        return
    if runs and runs[-1][1] is None:
        runs[-1][1:] = [at, event.state]
    if event.state in TERMINAL:
        step["settled_at"] = at


def workflow_detail(record: WorkflowRecord, history: Iterable[Event]) -> dict[str, Any]:
    """One workflow for the detail page and ``/api/workflows/<id>``: its summary, its
    steps in the order they were added, and its history. Load ``record`` before reading
    ``history``: the steps then reflect every event up to the last one listed."""
    steps = {name: _new_step(record, name) for name in record.steps}
    events = []
    state, seq = RUNNING, 0
    finished_at: float | None = None
    failed: tuple[str, ...] = ()
    for event in history:
        events.append(event.to_dict())
        seq = event.seq
        if isinstance(event, WorkflowFinished):
            state, finished_at = event.outcome, event.timestamp.timestamp()
            failed = event.failed_steps
        elif event.step_name in steps:
            apply_event(steps[event.step_name], event)
    summary = WorkflowSummary(
        id=record.id,
        label=record.label,
        state=state,
        created_at=record.created_at,
        finished_at=finished_at,
        total=len(steps),
        settled=sum(1 for s in steps.values() if s["state"] in TERMINAL),
        failed_steps=tuple(failed),
        seq=seq,
    )
    return {"workflow": summary.to_dict(), "steps": list(steps.values()), "history": events}
