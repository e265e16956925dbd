"""What a store's transition returns, and what its index lists: the types shared by the
transitions (:mod:`.records`), every store, and the code that acts on a transition."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

from ..events import Event

__all__ = ["Finish", "Released", "Transition", "WorkflowSummary"]


class Released(NamedTuple):
    """A step a transition released: what publishing it takes."""

    name: str
    job_id: str
    signature: dict[str, Any]
    dispatch: int  # its publication number, carried by its message
    leaf: bool = False  # no step depends on it: its settle releases nothing


@dataclasses.dataclass(frozen=True)
class WorkflowSummary:
    """One workflow at a glance, as a store's index lists it (see ``Store.workflows``)."""

    id: str
    label: str | None
    state: str  # "running", then its outcome: "completed" or "failed"
    created_at: float  # Unix time
    finished_at: float | None
    total: int  # steps in all
    settled: int  # steps that reached a terminal state
    failed_steps: tuple[str, ...]  # once finished: the steps that ended discarded/cancelled
    seq: int  # the number of its latest event

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["failed_steps"] = list(self.failed_steps)
        return data


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
    message skipped at the gate): then it made no event. Otherwise ``events`` holds every
    event it made, numbered and stamped inside the transition and kept in the store's
    history with it, in order: the step's own, the cascade's ``cancelled`` ones, then the
    finish when this transition won the claim (``finish`` is set then). ``released``
    holds the dependents that must now be published, ``revoke`` the Celery task ids of
    the queued steps a ``cancel`` cancelled. ``decision`` is the gate's answer and
    ``dispatch`` the step's publication number, for ``begin``.
    """

    workflow_id: str
    workflow_label: str | None
    applied: bool = False
    decision: str | None = None
    dispatch: int = 0
    released: list[Released] = dataclasses.field(default_factory=list)
    revoke: list[str] = dataclasses.field(default_factory=list)
    finish: Finish | None = None
    events: Sequence[Event] = dataclasses.field(default_factory=list)
