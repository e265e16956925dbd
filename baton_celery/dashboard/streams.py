"""The live streams (server-sent events) behind the pages, with nothing lost or repeated
between a page's snapshot and its live updates.

A detail page's stream starts from the ``seq`` its snapshot ended at (the query's
``after``, or the ``Last-Event-ID`` its browser sends when it reconnects): the view
subscribes to the hub first, then reads the store's history after that number; the
stream sends it, then the live events numbered above the last one sent. A live event
that skips a number (the bridge lost one) is filled in from the store, and a quiet
stream asks the store once per heartbeat, so a page stays right even when no event
reaches the dashboard live.

An index page's stream sends workflow summaries: first those of the workflows active
since its snapshot (``since``, or the ``Last-Event-ID`` of a reconnect), then live ones.
The page keeps, per workflow, the summary with the highest ``seq``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from ..events import Event
from ..stores import Store, StoreError, UnknownWorkflow
from ..stores.transition import WorkflowSummary
from .hub import Subscription
from .messages import END, KEEPALIVE, event_item, sse, summary_item

__all__ = ["RETRY_MS", "SINCE_MARGIN", "index_stream", "workflow_stream"]

logger = logging.getLogger(__name__)

STORE_FAILED = "baton_celery dashboard: a live stream cannot read the store: %s"

#: How long a browser waits before it reconnects a dropped stream (milliseconds).
RETRY_MS = 2000
#: An index stream replays what was active this many seconds before its snapshot (or
#: its last quiet moment): a live event can be that late (broker, reorder window).
SINCE_MARGIN = 30.0
#: An index stream never replays more than this many seconds back (a client's ``since``
#: from a page left open for days would read every workflow since then).
MAX_CATCH_UP = 3600.0


def workflow_stream(
    store: Store,
    page: Subscription,
    workflow_id: str,
    after: int,
    first: list[Event],
    heartbeat: float,
) -> Iterator[str]:
    """A detail page's stream: ``first`` (its history after ``after``, read once ``page``
    had subscribed), then live events. Ends after the finish, which the page expects."""
    yield f"retry: {RETRY_MS}\n\n"
    last = after
    backlog = [event_item(e) for e in first]
    while True:
        for item in backlog:
            if item.seq <= last:
                continue  # sent already
            yield item.text
            last = item.seq
            if item.kind == "finish":
                yield END
                return
        live = page.get(heartbeat)
        if live is not None and live.kind == "closed":
            return  # the hub stopped, or the page fell behind: the browser reconnects
        if live is not None and live.seq <= last + 1:
            backlog = [live]
            continue
        if live is None:
            yield KEEPALIVE
        # Quiet for a heartbeat, or a number was skipped: read what follows from the store.
        try:
            backlog = [event_item(e) for e in store.history(workflow_id, last)]
        except UnknownWorkflow:
            return  # it expired (baton_retention) while the page was open
        except StoreError as exc:
            logger.warning(STORE_FAILED, exc)
            backlog = []


def index_stream(
    page: Subscription,
    first: list[WorkflowSummary],
    *,
    label: str | None,
    since: float,
    heartbeat: float,
) -> Iterator[str]:
    """An index page's stream: ``first`` (the summaries of the workflows active since
    ``since``, read once ``page`` had subscribed), then live ones with that ``label``
    (when given). Each quiet heartbeat moves the browser's reconnect point (its
    Last-Event-ID) forward."""
    yield f"retry: {RETRY_MS}\n\n"
    yield sse(id=repr(since))
    for summary in reversed(first):  # oldest first, as they happened
        yield summary_item(summary).text
    while True:
        item = page.get(heartbeat)
        if item is None:
            yield sse(id=repr(time.time() - SINCE_MARGIN)) + KEEPALIVE
            continue
        if item.kind == "closed":
            return
        if label is not None and item.label != label:
            continue
        yield item.text
