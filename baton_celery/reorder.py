"""Per-workflow ordering of bridge events: the pure part of the listener.

Events of one workflow reach a listener from several processes, each numbered (``seq``)
in the store's atomic transition. A :class:`Reorderer` puts them back in that order and
hands each to ``deliver``; it does no I/O of its own (``fill``, when given, reads the
missing events behind a gap from the store's history) and reads time only through
``clock``::

    from baton_celery.reorder import Reorderer

    out = []                            # first, second: two events of workflow "wf-1"
    reorderer = Reorderer(out.append, window=2.0)
    reorderer.push("wf-1", 2, second)   # early: held
    reorderer.push("wf-1", 1, first)    # delivers first, then second
    reorderer.tick()                    # call often: delivers what waited past a gap

A workflow's WorkflowFinished is delivered after all of its step events, and the
workflow is then forgotten (later stragglers are dropped).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from typing import Callable

from .events import Event, WorkflowFinished

__all__ = ["Reorderer"]

logger = logging.getLogger(__name__)

GAP = (
    "baton_celery: workflow %s: event(s) %s never arrived within %.1f s; delivering the "
    "events after them"
)
LATE = "baton_celery: workflow %s: event %d arrived after a later one was delivered; dropped"


@dataclasses.dataclass
class _Flow:
    """One workflow's ordering state: the next number to deliver and what waits for it."""

    next: int = 1
    # seq -> (event or None for one already delivered here, ends the workflow, arrival)
    held: dict[int, tuple[Event | None, bool, float]] = dataclasses.field(default_factory=dict)
    seen: float = 0.0


class Reorderer:
    """Puts each workflow's events back in the order of their numbers.

    ``push(workflow_id, seq, event)`` delivers at once what is next, holds what comes
    early, and drops duplicates and stragglers (a number already passed). ``tick()``
    delivers, after ``window`` seconds, what waits behind a gap that was never filled.
    An event of ``None`` marks a number as delivered without delivering anything (this
    process's own events, already delivered locally). A workflow's state is forgotten
    once its WorkflowFinished is delivered; at most ``max_workflows`` are tracked (the
    oldest is flushed and forgotten first), and a workflow idle for ``idle_after``
    seconds is forgotten too: both are parked with the number they would go on at, and
    taken up there when the workflow speaks again.
    """

    def __init__(
        self,
        deliver: Callable[[Event], None],
        window: float = 2.0,
        *,
        fill: Callable[[str, int], list[Event]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_workflows: int = 100_000,
        remember_finished: int = 10_000,
        idle_after: float = 3600.0,
    ) -> None:
        self.deliver = deliver
        self.window = window
        self.fill = fill
        self.clock = clock
        self.max_workflows = max_workflows
        self.remember_finished = remember_finished
        self.idle_after = idle_after
        self.flows: OrderedDict[str, _Flow] = OrderedDict()
        self.finished: OrderedDict[str, None] = OrderedDict()
        # Flows forgotten while idle (or evicted), with the number they would go on at:
        # taken up there when the workflow speaks again (a step running for hours).
        self.parked: OrderedDict[str, int] = OrderedDict()
        self.waiting: set[str] = set()  # workflows with held events
        self.gaps = 0
        self.dropped = 0
        self._last_sweep = clock()

    def knows(self, workflow_id: str) -> bool:
        """Whether the workflow is being followed, or finished and remembered."""
        return (
            workflow_id in self.flows or workflow_id in self.finished or workflow_id in self.parked
        )

    def next_of(self, workflow_id: str) -> int | None:
        """The number a followed workflow's next event must have (None: not followed)."""
        flow = self.flows.get(workflow_id)
        return self.parked.get(workflow_id) if flow is None else flow.next

    def open(self, workflow_id: str, first: int) -> None:
        """Follow a workflow from event ``first`` on (a listener that starts mid-run);
        nothing changes for a workflow already followed or finished."""
        if not self.knows(workflow_id):
            self.flows[workflow_id] = _Flow(next=first, seen=self.clock())
            if len(self.flows) > self.max_workflows:
                self._forget(next(iter(self.flows)), flush=True)

    def push(self, workflow_id: str, seq: int, event: Event | None, final: bool = False) -> None:
        """Take event number ``seq`` of a workflow; ``final`` marks its WorkflowFinished
        (implied when ``event`` is one)."""
        final = final or isinstance(event, WorkflowFinished)
        now = self.clock()
        if workflow_id in self.finished:
            self._drop_late(workflow_id, seq)
            return
        flow = self.flows.get(workflow_id)
        if flow is None:
            first = self.parked.pop(workflow_id, 1)
            flow = self.flows[workflow_id] = _Flow(next=first, seen=now)
            if len(self.flows) > self.max_workflows:
                self._forget(next(iter(self.flows)), flush=True)
        else:
            self.flows.move_to_end(workflow_id)
        flow.seen = now
        if seq < flow.next or seq in flow.held:
            self._drop_late(workflow_id, seq)
            return
        if seq > flow.next:
            flow.held[seq] = (event, final, now)
            self.waiting.add(workflow_id)
            return
        if self._emit(workflow_id, flow, event, final):
            self._drain(workflow_id, flow)

    def tick(self) -> None:
        """Fill from ``fill`` (the store's history) what waited longer than the window
        behind a gap, else deliver what follows the gap; forget idle workflows."""
        now = self.clock()
        for workflow_id in list(self.waiting):
            flow = self.flows.get(workflow_id)
            if flow is None:
                self.waiting.discard(workflow_id)
                continue
            if self.fill is not None and self._overdue(flow, now):
                for event in self.fill(workflow_id, flow.next - 1):
                    self.push(workflow_id, event.seq, event)
                if self.flows.get(workflow_id) is not flow:
                    continue  # finished meanwhile
            while flow.held and self._overdue(flow, now):
                first = min(flow.held)
                self.gaps += 1
                missing = f"{flow.next}" if first - flow.next == 1 else f"{flow.next}-{first - 1}"
                logger.warning(GAP, workflow_id, missing, self.window)
                flow.next = first
                if not self._drain(workflow_id, flow):
                    break  # finished and forgotten
        if now - self._last_sweep >= min(self.idle_after, 60.0):
            self._last_sweep = now
            for workflow_id, flow in list(self.flows.items()):
                if not flow.held and now - flow.seen >= self.idle_after:
                    self._forget(workflow_id, flush=False)

    def _overdue(self, flow: _Flow, now: float) -> bool:
        return bool(flow.held) and now - min(h[2] for h in flow.held.values()) >= self.window

    def _drain(self, workflow_id: str, flow: _Flow) -> bool:
        """Deliver the held events that are next in line; False once the flow is gone."""
        while flow.next in flow.held:
            event, final, _ = flow.held.pop(flow.next)
            if not self._emit(workflow_id, flow, event, final):
                return False
        if not flow.held:
            self.waiting.discard(workflow_id)
        return True

    def _emit(self, workflow_id: str, flow: _Flow, event: Event | None, final: bool) -> bool:
        flow.next += 1
        if event is not None:
            self.deliver(event)
        if final:
            self.flows.pop(workflow_id, None)
            self.waiting.discard(workflow_id)
            self.finished[workflow_id] = None
            if len(self.finished) > self.remember_finished:
                self.finished.popitem(last=False)
            return False
        return True

    def _forget(self, workflow_id: str, *, flush: bool) -> None:
        flow = self.flows.pop(workflow_id, None)
        self.waiting.discard(workflow_id)
        if flow is None:
            return
        if flush:
            for seq in sorted(flow.held):
                event = flow.held[seq][0]
                if event is not None:
                    self.deliver(event)
                flow.next = seq + 1
        self.parked[workflow_id] = flow.next
        while len(self.parked) > self.remember_finished:
            self.parked.popitem(last=False)

    def _drop_late(self, workflow_id: str, seq: int) -> None:
        # Also every event a replay and the live feed both bring: normal, so quiet.
        self.dropped += 1
        logger.debug(LATE, workflow_id, seq)
