"""memory:// — workflows in this process's memory (tests, solo and threads pools)."""

from __future__ import annotations

import copy
import threading
from typing import Callable, TypeVar

from .base import RecordStore, UnknownWorkflow
from .records import WorkflowRecord

__all__ = ["MemoryStore"]

T = TypeVar("T")


class MemoryStore(RecordStore):
    """Keeps workflows in a dict guarded by a lock.

    Only one process sees it: under a prefork pool each child and the main process would
    hold their own copy and miss each other's transitions, so installing it there is
    refused with an error at worker start (see :mod:`baton_celery.hooks`).
    """

    shared_across_processes = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workflows: dict[str, WorkflowRecord] = {}
        self._jobs: dict[str, tuple[str, str]] = {}

    def create(self, record: WorkflowRecord) -> None:
        with self._lock:
            if record.id in self._workflows:
                raise ValueError(f"workflow {record.id!r} already exists")
            self._workflows[record.id] = copy.deepcopy(record)
            for step in record.steps.values():
                self._jobs[step.job_id] = (record.id, step.name)

    def load(self, workflow_id: str) -> WorkflowRecord:
        with self._lock:
            return copy.deepcopy(self._get(workflow_id))

    def locate(self, job_id: str) -> tuple[str, str] | None:
        return self._jobs.get(job_id)

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

    def _transform(self, workflow_id: str, change: Callable[[WorkflowRecord], T]) -> T:
        with self._lock:
            # Return copies: callers read the outcome after the lock is released.
            return copy.deepcopy(change(self._get(workflow_id)))
