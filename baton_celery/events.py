"""The two event types baton_celery sends: a step changed state, a workflow finished."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Any, ClassVar, Union

__all__ = [
    "CANCELLED",
    "COMPLETED",
    "DISCARDED",
    "EXECUTING",
    "RETRYABLE",
    "SNOOZED",
    "STEP_STATES",
    "Event",
    "StepUpdated",
    "WorkflowFinished",
    "cut_error",
    "event_from_dict",
    "utcnow",
]

EXECUTING = "executing"
COMPLETED = "completed"
RETRYABLE = "retryable"
DISCARDED = "discarded"
CANCELLED = "cancelled"
SNOOZED = "snoozed"

#: Every state a StepUpdated event can carry.
STEP_STATES = frozenset({EXECUTING, COMPLETED, RETRYABLE, DISCARDED, CANCELLED, SNOOZED})

OUTCOMES = frozenset({"completed", "failed"})


def cut_error(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, saying so."""
    return text if len(text) <= limit else text[: limit - 14] + "… [truncated]"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _seq(data: dict[str, Any]) -> int:
    seq = data.get("seq", 0)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError(f"seq must be a whole number >= 0, got {seq!r}")
    return seq


def _parse_timestamp(value: Any) -> datetime:
    if isinstance(value, datetime):
        stamp = value
    elif isinstance(value, str):
        stamp = datetime.fromisoformat(value)
    else:
        raise ValueError(f"timestamp must be an ISO 8601 string, got {value!r}")
    if stamp.tzinfo is None:
        raise ValueError(f"timestamp must be timezone-aware, got {value!r}")
    return stamp.astimezone(timezone.utc)


@dataclasses.dataclass(frozen=True)
class StepUpdated:
    """A workflow step changed state.

    ``attempt`` counts how many times the step has started (1 on its first run, 0 for a
    step cancelled before it ran). Events never carry result values: ``has_result`` only.
    ``seq`` numbers the event within its workflow (1, 2, ...: the order the store made
    them in); ``(workflow_id, seq)`` identifies it. 0 for an event no store numbered.
    """

    kind: ClassVar[str] = "step_updated"

    workflow_id: str
    workflow_label: str | None
    step_name: str
    worker: str
    state: str
    job_id: str | None
    attempt: int
    has_result: bool
    error: str | None
    timestamp: datetime
    seq: int = 0

    def __post_init__(self) -> None:
        if self.state not in STEP_STATES:
            raise ValueError(f"unknown step state {self.state!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (timestamp as ISO 8601), with the event's ``kind``."""
        data = dataclasses.asdict(self)
        data["timestamp"] = self.timestamp.isoformat()
        data["kind"] = self.kind
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepUpdated:
        fields = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name != "seq"}
        fields["timestamp"] = _parse_timestamp(fields["timestamp"])
        return cls(**fields, seq=_seq(data))


@dataclasses.dataclass(frozen=True)
class WorkflowFinished:
    """A whole workflow settled: sent exactly once per workflow.

    ``outcome`` is "completed" when every step completed, else "failed";
    ``failed_steps`` lists the steps that ended cancelled or discarded, in the order
    they were added to the workflow. ``seq`` is its number in the workflow: after every
    step event.
    """

    kind: ClassVar[str] = "workflow_finished"

    workflow_id: str
    workflow_label: str | None
    outcome: str
    failed_steps: tuple[str, ...]
    timestamp: datetime
    seq: int = 0

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown workflow outcome {self.outcome!r}")
        # Accept any sequence but keep the frozen event hashable and immutable.
        object.__setattr__(self, "failed_steps", tuple(self.failed_steps))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (timestamp as ISO 8601), with the event's ``kind``."""
        return {
            "kind": self.kind,
            "workflow_id": self.workflow_id,
            "workflow_label": self.workflow_label,
            "outcome": self.outcome,
            "failed_steps": list(self.failed_steps),
            "timestamp": self.timestamp.isoformat(),
            "seq": self.seq,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkflowFinished:
        return cls(
            workflow_id=data["workflow_id"],
            workflow_label=data["workflow_label"],
            outcome=data["outcome"],
            failed_steps=tuple(data["failed_steps"]),
            timestamp=_parse_timestamp(data["timestamp"]),
            seq=_seq(data),
        )


Event = Union[StepUpdated, WorkflowFinished]


def event_from_dict(data: dict[str, Any]) -> Event:
    """Rebuild either event from its ``to_dict()`` form, dispatching on ``kind``."""
    kind = data.get("kind")
    if kind == StepUpdated.kind:
        return StepUpdated.from_dict(data)
    if kind == WorkflowFinished.kind:
        return WorkflowFinished.from_dict(data)
    raise ValueError(f"not a baton_celery event: kind={kind!r}")
