"""One dashboard process's feed of live events, fanned out to its open pages.

A :class:`Hub` receives every event once — from a :class:`~baton_celery.Listener` with
``deliver=`` (the broker bridge, or the Redis store's own channel) and from this
process's own topics (a cancel sent from the dashboard) — and offers it to the
:class:`Subscription` of each open page that wants it: a detail page subscribes to one
workflow, an index page to the summaries of all of them. Offering never blocks: a page
that falls ``stream_queue`` items behind is cut off, and its browser reconnects and
catches up from the store.

The summaries are kept here, once for every index page: the first event of a workflow
(or one after a gap) reads its summary from the store, each next event advances it
(:func:`~baton_celery.dashboard.views.advance`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import OrderedDict
from typing import Any

from .. import pubsub
from ..events import Event
from ..listener import Listener, listen
from ..stores import Store, StoreError, UnknownWorkflow
from ..stores.transition import WorkflowSummary
from .messages import CLOSED, Item, event_item, summary_item
from .views import advance

__all__ = ["Hub", "Subscription"]

logger = logging.getLogger(__name__)

SUMMARY_FAILED = "baton_celery dashboard: cannot read workflow %s's summary: %s"
FELL_BEHIND = "baton_celery dashboard: a live page fell %d events behind; it will resync"

#: How many workflows' summaries the hub keeps (the least recently changed go first).
TRACKED = 10000


class Subscription:
    """One open page's bounded inbox of live items."""

    def __init__(self, hub: Hub, workflow_id: str | None, size: int) -> None:
        self.hub = hub
        self.workflow_id = workflow_id  # None: every workflow's summary (an index page)
        self.inbox: queue.Queue[Item] = queue.Queue(maxsize=size)
        self.behind = False  # it overflowed: the page must catch up from the store

    def offer(self, item: Item) -> None:
        if self.behind:
            return
        try:
            self.inbox.put_nowait(item)
        except queue.Full:
            self.behind = True
            logger.warning(FELL_BEHIND, self.inbox.maxsize)
            # Drop the backlog and end the stream: the page reconnects and catches up.
            with contextlib.suppress(queue.Empty):
                while True:
                    self.inbox.get_nowait()
            with contextlib.suppress(queue.Full):
                self.inbox.put_nowait(CLOSED)

    def get(self, timeout: float) -> Item | None:
        """The next item, or None after ``timeout`` seconds without one."""
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.hub.unsubscribe(self)


class Hub:
    """Live events in, one :class:`Subscription` per open page out.

    ``start(listen_to_broker=False)`` starts no listener: the hub then gets only this
    process's own events and what is given to :meth:`publish` (tests, an in-process
    worker).
    """

    def __init__(self, app: Any, store: Store, *, stream_queue: int = 10000) -> None:
        self.app = app
        self.store = store
        self.stream_queue = stream_queue
        self.listener: Listener | None = None
        self._lock = threading.Lock()
        self._pages: dict[str | None, set[Subscription]] = {}
        self._summaries: OrderedDict[str, WorkflowSummary] = OrderedDict()
        self._summaries_lock = threading.Lock()  # events come from the listener and locally
        self._closed = False

    def start(self, *, listen_to_broker: bool = True, timeout: float = 10.0) -> Hub:
        """Subscribe to this process's topics and, by default, start a listener to the
        workers' events (returns once it is subscribed, or after ``timeout`` seconds while
        it keeps trying)."""
        pubsub.subscribe_all(self._local)
        if listen_to_broker:
            self.listener = listen(self.app, deliver=self.publish, timeout=timeout)
        return self

    def close(self) -> None:
        """Stop listening and end every open stream."""
        pubsub.unsubscribe_all(self._local)
        if self.listener is not None:
            self.listener.stop()
        with self._lock:
            self._closed = True
            pages = [p for group in self._pages.values() for p in group]
            self._pages.clear()
        for page in pages:
            page.offer(CLOSED)

    @property
    def open_streams(self) -> int:
        with self._lock:
            return sum(len(group) for group in self._pages.values())

    def subscribe(self, workflow_id: str | None, limit: int | None = None) -> Subscription | None:
        """A new inbox for one workflow's events, or (None) for every summary; None when
        ``limit`` inboxes are open already."""
        page = Subscription(self, workflow_id, self.stream_queue)
        with self._lock:
            if limit is not None and sum(len(g) for g in self._pages.values()) >= limit:
                return None
            if self._closed:
                page.offer(CLOSED)
            else:
                self._pages.setdefault(workflow_id, set()).add(page)
        return page

    def unsubscribe(self, page: Subscription) -> None:
        with self._lock:
            group = self._pages.get(page.workflow_id)
            if group is not None:
                group.discard(page)
                if not group:
                    del self._pages[page.workflow_id]

    def _local(self, workflow_id: str, event: Event, **_: Any) -> None:
        self.publish(event)

    def publish(self, event: Event) -> None:
        """Offer one event to the pages that want it (called in the listener's thread, one
        event at a time; each workflow's events in order)."""
        with self._lock:
            detail = list(self._pages.get(event.workflow_id, ()))
            index = list(self._pages.get(None, ()))
        if detail:
            item = event_item(event)
            for page in detail:
                page.offer(item)
        if index:
            summary = self._advance(event)
            if summary is not None:
                item = summary_item(summary)
                for page in index:
                    page.offer(item)

    def _advance(self, event: Event) -> WorkflowSummary | None:
        """The workflow's summary after ``event``, from the last one kept or the store;
        None when there is nothing new to show."""
        with self._summaries_lock:
            return self._advance_locked(event)

    def _advance_locked(self, event: Event) -> WorkflowSummary | None:
        known = self._summaries.get(event.workflow_id)
        if known is not None and event.seq <= known.seq:
            return None  # counted already: nothing new to show
        summary = advance(known, event) if known is not None else None
        if summary is None:
            try:
                summary = self.store.summary(event.workflow_id)
            except (UnknownWorkflow, StoreError) as exc:
                logger.warning(SUMMARY_FAILED, event.workflow_id, exc)
                return None
        self._summaries[event.workflow_id] = summary
        self._summaries.move_to_end(event.workflow_id)
        while len(self._summaries) > TRACKED:
            self._summaries.popitem(last=False)
        return summary
