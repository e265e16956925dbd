"""Events of every worker, delivered to this process's topics: live, and replayed from
the store's history so that nothing is lost to a listener that was away.

In a web app, a CLI or a notebook::

    from datetime import datetime, timedelta, timezone
    import baton_celery

    baton_celery.subscribe_all(lambda workflow_id, event: print(event))
    since = datetime.now(timezone.utc) - timedelta(minutes=10)
    with baton_celery.listen(app, since=since):   # or: listener = listen(app); listener.stop()
        handle = workflow.apply_async()
        handle.wait(timeout=60)                   # woken by the live WorkflowFinished

:func:`listen` starts a background thread that follows the workers' events (they must
turn ``app.conf.baton_bridge = True`` on) and re-sends each through the local topics: the
receivers given to :func:`~baton_celery.subscribe_all` and
:func:`~baton_celery.subscribe` get them exactly as they get local ones. With the Redis
store the events come from the store itself (each transition publishes what it made on
the store's channel); with any other store, from the broker bridge's fanout exchange
(:mod:`baton_celery.feeds`).

What a receiver may rely on:

- each event exactly once, and one workflow's events in the order they happened (by the
  number each got in the store's atomic transition), its WorkflowFinished last;
- with ``since``, the events stored since then are delivered first, for every workflow
  (including those that started and finished while nobody listened), then the live ones;
  without it, the events made from the moment the listener started;
- after a lost broker connection, every event made meanwhile is read from the store's
  history once the listener is back; a gap the live feed leaves is filled from there too
  (only when the store has lost them, e.g. after its retention, are they skipped, and
  logged);
- an event this process made itself (it is also a worker) is not delivered twice;
- receivers run in the listener's thread, one event at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from datetime import datetime
from typing import Any, Callable

from . import pubsub
from .envelope import bridge_exchange
from .events import Event, WorkflowFinished
from .feeds import BrokerFeed, Feed, StoreFeed
from .guard import RateLimitedLog
from .process import process_token
from .reorder import Reorderer
from .runtime import Runtime, runtime_for
from .stores import UnknownWorkflow

__all__ = ["Listener", "Reorderer", "delivered_here", "listen", "listening"]

logger = logging.getLogger(__name__)

DROPPED = "baton_celery: dropped a bridge message: %s"
CONNECTION_LOST = "baton_celery: bridge listener lost its connection (%r); reconnecting in %.1f s"
NOT_READY = (
    "baton_celery: bridge listener for %s is not connected after %.1f s; it keeps trying "
    "in the background"
)
REPLAY_FAILED = (
    "baton_celery: bridge listener could not read the store's history (%s); live events "
    "go on, the replay is tried again"
)

#: Seconds between reconnection attempts: doubled after each failure, up to the max.
RECONNECT_FIRST = 0.2
RECONNECT_MAX = 5.0
#: After a reconnection, the events since this many seconds before the connection was
#: last seen alive are read from the store (clocks of hosts may disagree a little).
REPLAY_MARGIN = 5.0
#: Seconds between two tries of a replay the store could not serve.
REPLAY_RETRY = 1.0
#: Workflows read per page of a replay.
REPLAY_PAGE = 500


_listeners: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Listener]] = weakref.WeakKeyDictionary()
_listeners_lock = threading.Lock()


def listening(app: Any) -> bool:
    """Whether a listener for ``app`` is running (and connected) in this process."""
    with _listeners_lock:
        found = _listeners.get(app)
        return any(listener.ready for listener in found) if found else False


def delivered_here(app: Any, event: Event) -> None:
    """An event this process made was delivered to its receivers at once (announce):
    its listeners must not deliver it again when the store's history brings it."""
    with _listeners_lock:
        found = _listeners.get(app)
        listeners = list(found) if found else []
    for listener in listeners:
        listener._here.put((event.workflow_id, event.seq))


def check_since(since: datetime | None) -> float | None:
    """``since`` as a Unix time; a clear error when it is naive or in the future."""
    if since is None:
        return None
    if not isinstance(since, datetime):
        raise TypeError(f"since must be a datetime, got {since!r}")
    if since.tzinfo is None or since.utcoffset() is None:
        raise ValueError(f"since must be timezone-aware (e.g. tzinfo=timezone.utc): {since!r}")
    stamp = since.timestamp()
    if stamp > time.time() + 1.0:
        raise ValueError(f"since is in the future: {since.isoformat()}")
    return stamp


class Listener:
    """A background follower of every worker's events for one app.

    Use :func:`listen` to start one. A context manager; :meth:`stop` ends it. The
    counters (``received``, ``delivered``, ``replayed``, ``malformed``, ``reconnects``)
    are for tests and dashboards.
    """

    def __init__(
        self,
        app: Any,
        *,
        since: datetime | None = None,
        exchange: str | None = None,
        reorder_window: float | None = None,
        max_message: int | None = None,
        deliver: Callable[[Event], None] | None = None,
    ) -> None:
        self.app = app
        self.since = check_since(since)
        self.runtime = runtime_for(app) or Runtime(app)
        config = self.runtime.config
        self.exchange = bridge_exchange(exchange or config.bridge_exchange)
        self.max_message = max_message or config.bridge_max_message
        window = config.bridge_reorder_window if reorder_window is None else reorder_window
        self.reorderer = Reorderer(self._deliver, window, fill=self._fill)
        self._deliver_to = deliver or pubsub.broadcast
        self.received = 0
        self.delivered = 0
        self.replayed = 0
        self.malformed = 0
        self.reconnects = 0
        self.connections = 0  # how many times it has become ready (1 + reconnections)
        self._started = time.time()
        self._alive = self._started  # when the feed last showed it was connected
        self._replay_from: float | None = self.since  # a replay to do, from then
        self._replay_tried = 0.0
        self._connected = threading.Event()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token = process_token()
        # (workflow id, seq) of events this process delivered itself (delivered_here)
        self._here: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._connection_lost = RateLimitedLog(logger, logging.WARNING)
        self._replay_failed = RateLimitedLog(logger, logging.WARNING, traceback=False)

    # --- lifecycle --------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Connected, and its subscription proven live."""
        return self._connected.is_set() and not self._stop.is_set()

    def wait_ready(self, timeout: float | None = None, *, after: int = 0) -> bool:
        """Block until the listener is connected and subscribed (True) or ``timeout``.

        With ``after``, wait for a connection later than that count of
        :attr:`connections` (e.g. the reconnection after a broker restart)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.ready and self.connections > after, timeout)

    def start(self) -> Listener:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="baton-bridge-listener", daemon=True)
        with _listeners_lock:
            _listeners.setdefault(self.app, weakref.WeakSet()).add(self)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop consuming and close the connection (waits up to ``timeout`` seconds)."""
        self._stop.set()
        with self._changed:
            self._connected.clear()
            self._changed.notify_all()
        with _listeners_lock:
            found = _listeners.get(self.app)
            if found is not None:
                found.discard(self)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- the loop ---------------------------------------------------------------------

    def _feed(self) -> Feed:
        store = self.runtime.store
        if store.feed_channel:
            return StoreFeed(store)
        return BrokerFeed(self.app, self.exchange)

    def _run(self) -> None:
        backoff = RECONNECT_FIRST
        while not self._stop.is_set():
            connections = self.connections
            try:
                self._feed().run(self)
            except Exception as exc:
                self._connected.clear()
                if self._stop.is_set():
                    break
                if self.connections > connections:  # it was up: a new outage starts
                    backoff = RECONNECT_FIRST
                    self._outage_from(self._alive)
                self.reconnects += 1
                self._connection_lost(CONNECTION_LOST, exc, backoff)
                # A bounded back-off that a stop() interrupts at once.
                self._stop.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX)
            finally:
                self._connected.clear()

    # --- what the feed calls ----------------------------------------------------------

    def stopping(self) -> bool:
        return self._stop.is_set()

    def _outage_from(self, alive: float) -> None:
        """The connection was lost, last seen alive at ``alive``: once connected again,
        read what was made since then. (Taken now: the message that proves the next
        connection live moves ``_alive`` before ``on_ready``.)"""
        since = alive - REPLAY_MARGIN
        if self._replay_from is None or since < self._replay_from:
            self._replay_from = since

    def on_ready(self) -> None:
        """The feed is subscribed: replay what was missed, then go live."""
        if self.connections:  # a reconnection: read what was made while away
            self._outage_from(self._alive)
        self._replay()
        with self._changed:
            self.connections += 1
            self._connected.set()
            self._changed.notify_all()

    def on_alive(self) -> None:
        self._alive = time.time()

    def on_missed(self, workflow_id: str) -> None:
        """Events of this workflow came but could not be read: take them from the store."""
        self._catch_up(workflow_id, self.since or self._started)

    def on_event(self, event: Event, origin: str) -> None:
        self.received += 1
        own = origin == self._token
        workflow_id = event.workflow_id
        # First seen mid-run: start where this listener's window starts (at this event
        # when the store has none since then; clocks differ a little).
        if (
            event.seq > 1
            and not self.reorderer.knows(workflow_id)
            and self._catch_up(workflow_id, self.since or self._started)
        ):
            self.reorderer.open(workflow_id, event.seq)
        # Our own events were delivered here when they happened: only count them.
        final = isinstance(event, WorkflowFinished)
        self.reorderer.push(workflow_id, event.seq, None if own else event, final)

    def on_malformed(self, reason: str) -> None:
        self.malformed += 1
        logger.warning(DROPPED, reason)

    def on_tick(self) -> None:
        self._take_here()
        if self._replay_from is not None and time.time() - self._replay_tried >= REPLAY_RETRY:
            self._replay()
        self.reorderer.tick()

    def _take_here(self) -> None:
        """Mark what this process delivered itself as delivered (see delivered_here)."""
        while True:
            try:
                workflow_id, seq = self._here.get_nowait()
            except queue.Empty:
                return
            if self.reorderer.knows(workflow_id):
                self.reorderer.push(workflow_id, seq, None)

    # --- the store's history ----------------------------------------------------------

    def _replay(self) -> None:
        """Deliver the stored events since ``_replay_from`` of every workflow active
        since then; on a store error, try again later (the live feed goes on)."""
        since = self._replay_from
        if since is None:
            return
        self._replay_tried = time.time()
        store = self.runtime.store
        try:
            before = None
            while True:
                page = store.workflows(active_since=since, limit=REPLAY_PAGE, before=before)
                for summary in reversed(page):  # oldest first
                    self._catch_up(summary.id, since, strict=True)
                if len(page) < REPLAY_PAGE:
                    break
                before = page[-1].created_at
        except Exception as exc:
            self._replay_failed(REPLAY_FAILED, f"{type(exc).__name__}: {exc}")
            return
        self._replay_from = None

    def _catch_up(self, workflow_id: str, since: float, *, strict: bool = False) -> bool:
        """Push a workflow's stored events this listener has not delivered: after the
        last one delivered when it is followed, else those made at or after ``since``.
        False when the store could not tell (an unknown workflow, or a store error:
        raised when ``strict``, as a replay retries, else logged)."""
        if self.reorderer.knows(workflow_id) and self.reorderer.next_of(workflow_id) is None:
            return True  # finished and delivered
        try:
            following = self.reorderer.next_of(workflow_id)
            events = self.runtime.store.history(workflow_id, (following or 1) - 1)
        except UnknownWorkflow:
            return False
        except Exception as exc:
            if strict:
                raise
            self._replay_failed(REPLAY_FAILED, f"{type(exc).__name__}: {exc}")
            return False
        if following is None:
            events = [e for e in events if e.timestamp.timestamp() >= since]
            if not events:
                return True
            self.reorderer.open(workflow_id, events[0].seq)
        for event in events:
            self.replayed += 1
            self.reorderer.push(workflow_id, event.seq, event)
        return True

    def _fill(self, workflow_id: str, after: int) -> list[Event]:
        """The reorderer's gap filler: the stored events after ``after``."""
        try:
            return self.runtime.store.history(workflow_id, after)
        except UnknownWorkflow:
            return []  # expired meanwhile
        except Exception as exc:
            self._replay_failed(REPLAY_FAILED, f"{type(exc).__name__}: {exc}")
            return []

    # --- delivery ---------------------------------------------------------------------

    def _deliver(self, event: Event) -> None:
        self.delivered += 1
        try:
            self._deliver_to(event)
        except Exception:  # pubsub isolates receivers; this guards a custom deliver
            logger.exception("baton_celery: delivering a bridge event failed")
        if isinstance(event, WorkflowFinished) and pubsub.workflow_finished_telemetry.receivers:
            self._telemetry(event)

    def _telemetry(self, event: WorkflowFinished) -> None:
        """workflow_finished_telemetry for a finish made in another process."""
        try:
            summary = self.runtime.store.summary(event.workflow_id)
            duration = max(0.0, event.timestamp.timestamp() - summary.created_at)
            pubsub.send_finished_telemetry(event, summary.total, duration)
        except Exception as exc:
            self._replay_failed(REPLAY_FAILED, f"{type(exc).__name__}: {exc}")


def listen(
    app: Any, *, since: datetime | None = None, timeout: float = 10.0, **options: Any
) -> Listener:
    """Start a :class:`Listener` for ``app`` and wait up to ``timeout`` seconds until it is
    subscribed (and, with ``since``, has replayed the stored events since then). If it
    cannot connect by then, a warning is logged and it keeps trying in the background
    (``listener.wait_ready()`` tells when).

    ``since``: a timezone-aware datetime, not in the future. ``options``: ``exchange``,
    ``reorder_window``, ``max_message`` override the app's ``baton_bridge_*`` settings;
    ``deliver`` replaces the local topics as the target.
    """
    listener = Listener(app, since=since, **options).start()
    if not listener.wait_ready(timeout):
        logger.warning(NOT_READY, app, timeout)
    return listener
