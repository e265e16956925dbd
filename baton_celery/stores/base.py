"""The store contract: where workflow state lives, and the atomic transitions on it."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from typing import Any, Callable

from ..events import COMPLETED, Event
from . import records
from .records import RUNNING, WorkflowRecord
from .transition import Transition, WorkflowSummary

__all__ = [
    "WORKFLOW_STATES",
    "RecordStore",
    "Store",
    "StoreError",
    "UnknownWorkflow",
]

#: The states :meth:`Store.workflows` filters on.
WORKFLOW_STATES = (RUNNING, "completed", "failed")
#: The most workflows one :meth:`Store.workflows` call returns.
MAX_PAGE = 1000


class StoreError(Exception):
    """The store could not be reached or could not complete an operation."""


class UnknownWorkflow(KeyError):
    """No workflow with this id is stored (never created, or pruned after its retention)."""


class Store(abc.ABC):
    """Where workflows live. Every method is one atomic operation.

    Contract (shared by every backend and checked by tests/test_store_contract.py):

    - ``create`` stores a whole workflow or nothing, and refuses an id that exists.
    - ``begin``, ``run``, ``retrying``, ``settle`` and ``cancel`` each apply one transition from
      :mod:`baton_celery.stores.records` atomically: of any number of racing callers
      settling a workflow's last steps, exactly one gets ``Transition.finish``.
    - A step settles once: a second ``settle`` returns ``applied=False`` and changes nothing.
    - Every event a transition makes (``Transition.events``) is kept in the workflow's
      history by the same atomic operation, and :meth:`history` returns them as made;
      the history expires with the workflow (``baton_retention``).
    - Methods raise :class:`UnknownWorkflow` for an unknown id, :class:`StoreError` when
      the backend fails, and never block for longer than the store's timeout.
    """

    #: Whether every process of a prefork worker sees the same state.
    shared_across_processes: bool = True
    #: Where this store can publish the events its transitions make, for listeners
    #: (None: it cannot; the broker bridge carries them instead).
    feed_channel: str | None = None
    #: Where it does publish them ("": nowhere); the runtime sets it when the bridge is on.
    channel: str = ""

    @abc.abstractmethod
    def create(self, record: WorkflowRecord) -> None: ...

    @abc.abstractmethod
    def load(self, workflow_id: str) -> WorkflowRecord: ...

    @abc.abstractmethod
    def locate(self, job_id: str) -> tuple[str, str] | None:
        """The (workflow id, step name) a Celery task id belongs to, if any."""

    @abc.abstractmethod
    def begin(self, workflow_id: str, step: str, dispatch: int, ran_for: float = 0.0) -> Transition:
        """The gate: run, snooze or skip the step's message. ``ran_for``: the seconds its
        body has run already (the fast path's watchdog), for its ``executing`` event."""

    @abc.abstractmethod
    def run(
        self,
        workflow_id: str,
        step: str,
        dispatch: int,
        ran_for: float,
        state: str,
        *,
        has_result: bool = False,
        result: Any = None,
        error: str | None = None,
    ) -> Transition:
        """A step that ran without asking the gate (the fast path): its begin, stamped
        ``ran_for`` seconds ago, and its settle, as one transition. When the gate's
        answer is not "run" (``decision``), only the gate's part applied."""

    @abc.abstractmethod
    def retrying(self, workflow_id: str, step: str, error: str | None) -> Transition: ...

    @abc.abstractmethod
    def settle(
        self,
        workflow_id: str,
        step: str,
        state: str,
        *,
        has_result: bool = False,
        result: Any = None,
        error: str | None = None,
    ) -> Transition: ...

    @abc.abstractmethod
    def cancel(self, workflow_id: str) -> Transition: ...

    @abc.abstractmethod
    def history(self, workflow_id: str, after: int = 0) -> list[Event]:
        """The workflow's events numbered above ``after``, in the order they were made:
        every event its transitions made, equal to what a receiver got."""

    def summary(self, workflow_id: str) -> WorkflowSummary:
        """One workflow at a glance (as :meth:`workflows` lists it)."""
        return self.load(workflow_id).summary()

    @abc.abstractmethod
    def workflows(
        self,
        *,
        limit: int = 100,
        before: float | None = None,
        label: str | None = None,
        state: str | None = None,
        active_since: float | None = None,
    ) -> list[WorkflowSummary]:
        """At most ``limit`` workflows, newest first (by creation time): those created
        before ``before`` (a Unix time: the next page starts at the last one's
        ``created_at``), with that ``label`` and ``state`` ("running", "completed",
        "failed") when given, and with ``active_since`` (a Unix time) only those still
        running or finished at or after it. Use :func:`check_query` for the arguments."""

    @abc.abstractmethod
    def annotate(self, workflow_id: str, values: Mapping[str, str]) -> None:
        """Keep small strings with a workflow (e.g. trace contexts: see
        :mod:`baton_celery.otel`), by key, until the workflow expires. One operation, not
        part of any transition: the hot path never calls it."""

    @abc.abstractmethod
    def annotations(self, workflow_id: str, keys: Iterable[str]) -> dict[str, str]:
        """The values :meth:`annotate` kept under ``keys`` (missing keys are left out)."""

    def settle_stuck(self, workflow_id: str, step: str, seq: int, error: str) -> Transition:
        """Discard ``step`` unless it changed since it was seen with event number ``seq``
        (see :func:`records.settle_stuck`): the backstop's transition."""
        raise NotImplementedError(f"{type(self).__name__} has no backstop support")

    def live_workflows(self, before: float | None = None) -> list[str]:
        """Ids of workflows that have not finished (created before ``before``, a Unix
        time, when given), oldest first: where the backstop looks. May include ids that
        finished or vanished meanwhile, or newer ones; callers load each one."""
        raise NotImplementedError(f"{type(self).__name__} has no backstop support")

    def unindex(self, workflow_id: str, job_ids: Iterable[str] = ()) -> None:  # noqa: B027
        """Forget an id that :meth:`live_workflows` listed but that finished or vanished
        (a no-op where the index is a query)."""

    def results(self, workflow_id: str, names: Iterable[str]) -> dict[str, Any]:
        """The stored results of the named steps that completed with one."""
        record = self.load(workflow_id)
        return {
            n: record.steps[n].result
            for n in names
            if record.steps[n].state == COMPLETED and record.steps[n].has_result
        }

    def dependency_results(self, workflow_id: str, step: str) -> dict[str, Any]:
        """The results of ``step``'s completed dependencies by name (None for one that
        returned nothing); what :func:`baton_celery.dependency_results` gives a step."""
        record = self.load(workflow_id)
        steps = record.steps
        return {d: steps[d].result for d in steps[step].deps if steps[d].state == COMPLETED}

    def run_unanswered(
        self,
        answered: Callable[[Transition], None],
        workflow_id: str,
        step: str,
        dispatch: int,
        ran_for: float,
        state: str,
        *,
        has_result: bool = False,
        result: Any = None,
        error: str | None = None,
    ) -> None:
        """:meth:`run`, for a caller that needs nothing from the reply at once (a step no
        other step depends on, whose events nobody in this process takes): a store may
        send it without waiting for its reply, and hand the reply to ``answered`` later,
        when it reads it (before its next such call, or in :meth:`collect`, from
        whichever thread calls that). This one runs it now."""
        answered(self.run(workflow_id, step, dispatch, ran_for, state,
                          has_result=has_result, result=result, error=error))  # fmt: skip

    def collect(self) -> None:  # noqa: B027 - optional hook
        """Read the replies of the transitions :meth:`run_unanswered` sent, if any, and
        hand them on (waits no longer than the store's timeout for each)."""

    def serves_tasks(self) -> None:  # noqa: B027 - optional hook
        """This process is a worker's (and its pool's, forked from it): the store may
        keep a connection open for the tasks' transitions."""

    def release_thread(self) -> None:  # noqa: B027 - optional hook
        """The calling thread is done with the store for now (the fast path's watchdog,
        after a begin): a store with a connection per thread closes this thread's."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the store may be used again afterwards."""


def check_query(limit: int, state: str | None) -> None:
    """Refuse a :meth:`Store.workflows` query a store cannot answer in bounded time."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be a whole number from 1 to {MAX_PAGE}, got {limit!r}")
    if state is not None and state not in WORKFLOW_STATES:
        raise ValueError(f"state must be one of {', '.join(WORKFLOW_STATES)}, got {state!r}")


def matches(
    summary: WorkflowSummary,
    before: float | None,
    label: str | None,
    state: str | None,
    active_since: float | None,
) -> bool:
    """Whether a workflow passes a :meth:`Store.workflows` query's filters."""
    return (
        (before is None or summary.created_at < before)
        and (label is None or summary.label == label)
        and (state is None or summary.state == state)
        and (
            active_since is None
            or summary.finished_at is None
            or summary.finished_at >= active_since
        )
    )


class RecordStore(Store):
    """A store that keeps each workflow as one record and transforms it under a lock or a
    transaction: the transitions are written once, in :mod:`records`, for all such stores."""

    @abc.abstractmethod
    def _transform(
        self, workflow_id: str, change: Callable[[WorkflowRecord], Transition]
    ) -> Transition:
        """Load the record, apply ``change``, save it and append the events it made to
        the history: all atomically."""

    def begin(self, workflow_id: str, step: str, dispatch: int, ran_for: float = 0.0) -> Transition:
        return self._transform(workflow_id, lambda r: records.begin(r, step, dispatch, ran_for))

    def run(
        self,
        workflow_id: str,
        step: str,
        dispatch: int,
        ran_for: float,
        state: str,
        *,
        has_result: bool = False,
        result: Any = None,
        error: str | None = None,
    ) -> Transition:
        return self._transform(
            workflow_id,
            lambda r: records.run(
                r, step, dispatch, ran_for, state, has_result=has_result, result=result,
                error=error,
            ),
        )  # fmt: skip

    def retrying(self, workflow_id: str, step: str, error: str | None) -> Transition:
        return self._transform(workflow_id, lambda r: records.mark_retrying(r, step, error))

    def settle(
        self,
        workflow_id: str,
        step: str,
        state: str,
        *,
        has_result: bool = False,
        result: Any = None,
        error: str | None = None,
    ) -> Transition:
        return self._transform(
            workflow_id,
            lambda r: records.settle(
                r, step, state, has_result=has_result, result=result, error=error
            ),
        )

    def cancel(self, workflow_id: str) -> Transition:
        return self._transform(workflow_id, records.cancel)

    def settle_stuck(self, workflow_id: str, step: str, seq: int, error: str) -> Transition:
        return self._transform(workflow_id, lambda r: records.settle_stuck(r, step, seq, error))
