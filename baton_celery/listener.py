"""The broker bridge, receiving side: events of every worker, delivered to this process's
topics.

In a web app, a CLI or a notebook::

    import baton_celery

    baton_celery.subscribe_all(lambda workflow_id, event: print(event))
    with baton_celery.listen(app):   # or: listener = baton_celery.listen(app); listener.stop()
        handle = workflow.apply_async()
        handle.wait(timeout=60)       # woken by the live WorkflowFinished

:func:`listen` starts a background thread that consumes the bridge's fanout exchange
(``baton_bridge_exchange``) through its own exclusive, auto-deleted queue over the app's
broker, and re-sends each remote event through the local topics: the receivers given to
:func:`~baton_celery.subscribe_all` and :func:`~baton_celery.subscribe` get them exactly
as they get local ones. The workers must publish (``app.conf.baton_bridge = True``).

What a receiver may rely on:

- one workflow's events arrive in the order they happened (by the number each got in the
  store's atomic transition), and its WorkflowFinished after all of its step events; a
  missing number is waited for at most ``baton_bridge_reorder_window`` seconds, then the
  events behind it are delivered and the gap is logged (:mod:`baton_celery.reorder`);
- an event this process sent itself (it is also a worker) is not delivered twice;
- receivers run in the listener's thread, one event at a time;
- delivery is live only: events sent while the listener was not connected (before it was
  ready, during a broker restart) are not replayed. The store stays the source of truth:
  ``WorkflowHandle.status()`` / ``.wait()``.

Only JSON is accepted; malformed, foreign or oversized messages are logged and dropped
and the consumer carries on.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
import weakref
from queue import Empty
from typing import Any, Callable

from kombu.entity import Queue
from kombu.messaging import Consumer, Producer

from . import pubsub
from .config import Config
from .envelope import ENVELOPE_VERSION, bridge_exchange, process_token, send_envelope
from .events import Event, WorkflowFinished, event_from_dict
from .guard import RateLimitedLog
from .reorder import Reorderer
from .runtime import runtime_for

__all__ = ["Listener", "Reorderer", "listen", "listening"]

logger = logging.getLogger(__name__)

DROPPED = "baton_celery: dropped a bridge message: %s"
CONNECTION_LOST = (
    "baton_celery: bridge listener lost its broker connection (%r); reconnecting in %.1f s"
)
NOT_READY = (
    "baton_celery: bridge listener for %s is not connected after %.1f s; it keeps trying "
    "in the background"
)

#: How long the consumer blocks for a message before it looks at its timers.
TICK = 0.05
#: After this many idle seconds the listener sends itself a probe through the exchange,
#: and reconnects when one has not come back within PROBE_TIMEOUT seconds: a half-open
#: connection or a silently lost subscription would otherwise go unnoticed.
HEARTBEAT = 2.0
PROBE_TIMEOUT = 10.0
#: Seconds between reconnection attempts: doubled after each failure, up to the max.
RECONNECT_FIRST = 0.2
RECONNECT_MAX = 5.0


_listeners: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Listener]] = weakref.WeakKeyDictionary()
_listeners_lock = threading.Lock()


def listening(app: Any) -> bool:
    """Whether a listener for ``app`` is running (and connected) in this process."""
    with _listeners_lock:
        found = _listeners.get(app)
        return any(listener.ready for listener in found) if found else False


class Listener:
    """A background consumer of the bridge's fanout exchange for one app.

    Use :func:`listen` to start one. A context manager; :meth:`stop` ends it. The
    counters (``received``, ``delivered``, ``malformed``, ``reconnects``) are for tests
    and dashboards.
    """

    def __init__(
        self,
        app: Any,
        *,
        exchange: str | None = None,
        reorder_window: float | None = None,
        max_message: int | None = None,
        deliver: Callable[[Event], None] | None = None,
    ) -> None:
        runtime = runtime_for(app)
        config = runtime.config if runtime is not None else Config.from_app(app)
        self.app = app
        self.exchange = bridge_exchange(exchange or config.bridge_exchange)
        self.max_message = max_message or config.bridge_max_message
        window = config.bridge_reorder_window if reorder_window is None else reorder_window
        self.reorderer = Reorderer(self._deliver, window)
        self._deliver_to = deliver or pubsub.broadcast
        self.received = 0
        self.delivered = 0
        self.malformed = 0
        self.reconnects = 0
        self.connections = 0  # how many times it has become ready (1 + reconnections)
        self._connected = threading.Event()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._probe: str | None = None  # the nonce of the probe on its way, if any
        self._probe_sent = 0.0
        self._activity = 0.0  # when a message last arrived
        self._thread: threading.Thread | None = None
        self._token = process_token()
        self._connection_lost = RateLimitedLog(logger, logging.WARNING)

    # --- lifecycle --------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Connected, and its subscription proven live by its own probe message."""
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

    def _run(self) -> None:
        backoff = RECONNECT_FIRST
        while not self._stop.is_set():
            connections = self.connections
            try:
                self._consume()
            except Exception as exc:
                self._connected.clear()
                if self._stop.is_set():
                    break
                if self.connections > connections:  # it was up: a new outage starts
                    backoff = RECONNECT_FIRST
                self.reconnects += 1
                self._connection_lost(CONNECTION_LOST, exc, backoff)
                # A bounded back-off that a stop() interrupts at once.
                self._stop.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX)

    def _consume(self) -> None:
        conn = self.app.connection_for_read()
        try:
            # One quick attempt: the back-off between attempts is _run's, and stoppable.
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.1)
            queue = Queue(  # type: ignore[no-untyped-call]
                f"baton_celery.listener.{uuid.uuid4().hex}",
                self.exchange,
                routing_key="",
                durable=False,
                exclusive=True,
                auto_delete=True,
                no_ack=True,  # Redis: with acks, every fanout message lands in the unacked hash
            )
            channel = conn.channel()
            consumer: Any = Consumer(  # type: ignore[no-untyped-call]
                channel, [queue], accept=["json"], no_ack=True, on_message=self._on_message
            )
            consumer.consume()
            producer = Producer(conn.channel(), exchange=self.exchange)  # type: ignore[no-untyped-call]
            is_redis = conn.transport.driver_type == "redis"
            self._probe = None
            next_probe = 0.0
            while not self._stop.is_set():
                try:
                    conn.drain_events(timeout=TICK)
                except socket.timeout:
                    pass
                except (KeyError, TypeError, ValueError) as exc:
                    if not is_redis:
                        raise
                    self._skip_raw(exc)
                if is_redis:
                    self._drain_buffered(channel)
                self.reorderer.tick()
                now = time.monotonic()
                if not self._connected.is_set():
                    if now >= next_probe:
                        # Redis subscribes on the first drain_events, not on consume():
                        # ready only once a probe sent through the exchange came back.
                        self._send_probe(producer)
                        next_probe = now + 0.25
                elif self._probe is None:
                    if now - self._activity >= HEARTBEAT:
                        self._send_probe(producer)
                elif now - self._probe_sent >= PROBE_TIMEOUT:
                    # A half-open connection or a lost subscription: start again.
                    raise ConnectionError(f"no probe came back in {PROBE_TIMEOUT} s")
        finally:
            self._connected.clear()
            try:
                conn.release()
            except Exception:
                logger.debug("baton_celery: closing the listener's connection", exc_info=True)

    def _skip_raw(self, exc: BaseException) -> None:
        # Redis: a raw PUBLISH that is not a kombu message fails inside kombu
        # (KeyError('properties')) after it was read off the socket: the subscription is
        # intact, so skip it instead of reconnecting.
        self.malformed += 1
        logger.warning(DROPPED, f"not a kombu message ({exc!r})")

    def _drain_buffered(self, channel: Any) -> None:
        """Redis: read the messages already buffered in the pub/sub client.

        When kombu's read loop stops on a malformed message (an exception, or a silent
        skip of one that is not JSON), the messages that came in the same read wait in
        redis-py's buffer, where the poller does not see them until something else
        arrives. Uses kombu's Redis channel internals when they are there; otherwise the
        heartbeat probe is what wakes the poller."""
        client = getattr(channel, "__dict__", {}).get("subclient")
        receive = getattr(channel, "_receive", None)
        connection = getattr(client, "connection", None)
        if connection is None or receive is None:
            return
        for _ in range(10_000):  # bounded: a flood must not starve the timers
            try:
                if not connection.can_read(timeout=0):
                    return
                receive()
            except (KeyError, TypeError, ValueError) as exc:
                self._skip_raw(exc)
            except Empty:  # kombu's way to skip a payload that is not JSON
                pass

    def _send_probe(self, producer: Any) -> None:
        self._probe = uuid.uuid4().hex
        self._probe_sent = time.monotonic()
        send_envelope(
            producer,
            self.exchange,
            {"v": ENVELOPE_VERSION, "probe": self._probe},
            {"max_retries": 1},
        )

    def _on_message(self, message: Any) -> None:
        self.received += 1
        self._activity = time.monotonic()
        try:
            body = message.body
            size = len(body) if isinstance(body, (bytes, str)) else 0
            if size > self.max_message:
                raise ValueError(f"{size} bytes, more than baton_bridge_max_message")
            data = message.decode()  # refuses anything but JSON (accept=["json"])
            self._accept(data)
        except Exception as exc:
            self.malformed += 1
            logger.warning(DROPPED, f"{type(exc).__name__}: {exc}"[:500])

    def _accept(self, data: Any) -> None:
        """Check one decoded envelope and hand it to the reorderer."""
        if not isinstance(data, dict) or data.get("v") != ENVELOPE_VERSION:
            raise ValueError("not a baton_celery envelope (version 1)")
        if "probe" in data:
            if data["probe"] == self._probe and self._probe is not None:
                self._probe = None
                if not self._connected.is_set():
                    with self._changed:
                        self.connections += 1
                        self._connected.set()
                        self._changed.notify_all()
            return
        seq, origin = data.get("seq"), data.get("origin")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ValueError(f"bad seq {seq!r}")
        if not isinstance(origin, str):
            raise ValueError(f"bad origin {origin!r}")
        raw = data.get("event")
        if not isinstance(raw, dict):
            raise ValueError("no event")
        event = event_from_dict(raw)
        # Our own events were delivered here when they happened: only count them.
        own = origin == self._token
        final = isinstance(event, WorkflowFinished)
        self.reorderer.push(event.workflow_id, seq, None if own else event, final)

    def _deliver(self, event: Event) -> None:
        self.delivered += 1
        try:
            self._deliver_to(event)
        except Exception:  # pubsub isolates receivers; this guards a custom deliver
            logger.exception("baton_celery: delivering a bridge event failed")


def listen(app: Any, *, timeout: float = 10.0, **options: Any) -> Listener:
    """Start a :class:`Listener` for ``app`` and wait up to ``timeout`` seconds until it is
    subscribed. If the broker cannot be reached by then, a warning is logged and the
    listener keeps trying in the background (``listener.wait_ready()`` tells when).

    ``options``: ``exchange``, ``reorder_window``, ``max_message`` override the app's
    ``baton_bridge_*`` settings; ``deliver`` replaces the local topics as the target.
    """
    listener = Listener(app, **options).start()
    if not listener.wait_ready(timeout):
        logger.warning(NOT_READY, app, timeout)
    return listener
