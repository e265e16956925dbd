"""memory:// — workflows in this process's memory (tests, solo and threads pools)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Mapping
from typing import Callable

from ..events import Event
from .base import RecordStore, UnknownWorkflow, check_query, matches
from .records import WorkflowRecord
from .transition import Transition, WorkflowSummary

__all__ = ["MemoryStore"]


class MemoryStore(RecordStore):
    """Keeps workflows, and their histories, in dicts guarded by a lock; nothing expires.

    Only one process sees it: under a prefork pool each child and the main process would
    hold their own copy and miss each other's transitions, so installing it there is
    refused with an error at worker start (see :mod:`baton_celery.hooks`).
    """

    shared_across_processes = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workflows: dict[str, WorkflowRecord] = {}
        self._events: dict[str, list[Event]] = {}
        self._jobs: dict[str, tuple[str, str]] = {}
        self._notes: dict[str, dict[str, str]] = {}

    def create(self, record: WorkflowRecord) -> None:
        with self._lock:
            if record.id in self._workflows:
                raise ValueError(f"workflow {record.id!r} already exists")
            self._workflows[record.id] = copy.deepcopy(record)
            self._events[record.id] = []
            for step in record.steps.values():
                self._jobs[step.job_id] = (record.id, step.name)

    def load(self, workflow_id: str) -> WorkflowRecord:
        with self._lock:
            return copy.deepcopy(self._get(workflow_id))

    def locate(self, job_id: str) -> tuple[str, str] | None:
        return self._jobs.get(job_id)

    def history(self, workflow_id: str, after: int = 0) -> list[Event]:
        with self._lock:
            self._get(workflow_id)
            return [e for e in self._events[workflow_id] if e.seq > after]

    def workflows(
        self,
        *,
        limit: int = 100,
        before: float | None = None,
        label: str | None = None,
        state: str | None = None,
        active_since: float | None = None,
    ) -> list[WorkflowSummary]:
        check_query(limit, state)
        with self._lock:
            newest = sorted(self._workflows.values(), key=lambda r: r.created_at, reverse=True)
            found = []
            for record in newest:
                summary = record.summary()
                if matches(summary, before, label, state, active_since):
                    found.append(summary)
                    if len(found) == limit:
                        break
            return found

    def annotate(self, workflow_id: str, values: Mapping[str, str]) -> None:
        with self._lock:
            self._get(workflow_id)
            self._notes.setdefault(workflow_id, {}).update(values)

    def annotations(self, workflow_id: str, keys: Iterable[str]) -> dict[str, str]:
        with self._lock:
            self._get(workflow_id)
            notes = self._notes.get(workflow_id, {})
            return {k: notes[k] for k in keys if k in notes}

    def live_workflows(self, before: float | None = None) -> list[str]:
        with self._lock:
            live = [
                r
                for r in self._workflows.values()
                if not r.finished and (before is None or r.created_at < before)
            ]
        return [r.id for r in sorted(live, key=lambda r: r.created_at)]

    def _get(self, workflow_id: str) -> WorkflowRecord:
        try:
            return self._workflows[workflow_id]
        except KeyError:
            raise UnknownWorkflow(workflow_id) from None

    def _transform(
        self, workflow_id: str, change: Callable[[WorkflowRecord], Transition]
    ) -> Transition:
        with self._lock:
            out = change(self._get(workflow_id))
            self._events[workflow_id].extend(out.events)
            # A copy: callers read the outcome after the lock is released.
            return copy.deepcopy(out)
