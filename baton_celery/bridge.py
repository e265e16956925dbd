"""The broker bridge, publishing side: every event a worker sends is also published on a
kombu fanout exchange, so listeners in other processes receive it (see
:mod:`baton_celery.listener`).

Turn it on in the app's config::

    app.conf.baton_bridge = True

Each event travels as one small JSON envelope (see :mod:`baton_celery.envelope`).

Publishing is transient (delivery mode 1) and bounded: by default inline, in the
process that produced the event, over one connection per process, with a bounded retry
policy and the broker connection's own timeouts; an envelope that cannot be sent is
dropped and logged. ``baton_bridge_background = True`` hands envelopes to a small thread
per process instead (see the README's benchmarks for what each costs).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from kombu.messaging import Producer

from .envelope import bridge_exchange, envelope, send_envelope
from .events import Event
from .guard import RateLimitedLog, log_failure

if TYPE_CHECKING:
    from .config import Config
    from .runtime import Runtime

__all__ = ["Publisher", "close", "flush_all", "publish", "publisher_for"]

logger = logging.getLogger(__name__)

PUBLISH_FAILED = (
    "baton_celery: could not publish %d event(s) on the bridge exchange %r (%s); "
    "they are dropped (listeners elsewhere miss them, the store still has the state)"
)
QUEUE_FULL = (
    "baton_celery: the bridge's publish queue is full (%d events): dropping events; "
    "is the broker down or too slow? (%d dropped so far)"
)
FLUSH_INCOMPLETE = "baton_celery: %d bridge event(s) not published before the process exit"


_STOP = object()


#: Seconds a bridge publish may wait on a Redis broker's socket.
SOCKET_TIMEOUT = 2.0
#: Seconds events are dropped without trying, after a send to the broker failed.
BROKER_BACKOFF = 5.0
REDIS_TRANSPORTS = frozenset({"redis", "rediss", "sentinel"})


class Publisher:
    """Publishes envelopes for one app, from the calling thread or a background thread.

    Everything that holds a connection or a thread is per process id: a prefork pool
    child inherits none of its parent's (threads do not survive ``fork()``, and an
    inherited AMQP socket must not be used nor closed by the child). The background
    thread is started lazily on the first event of each process, and one FIFO queue per
    process keeps that process's events in the order they were produced.
    """

    def __init__(self, app: Any, config: Config) -> None:
        self.app = app
        self.exchange = bridge_exchange(config.bridge_exchange)
        self.background = config.bridge_background
        self.queue_size = config.bridge_queue_size
        self.flush_timeout = config.bridge_flush_timeout
        self.retry_policy = {
            "max_retries": config.bridge_publish_retries,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        }
        self.dropped = 0
        self.published = 0
        self._pid = -1
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._producer: Any = None
        self._fail_log = RateLimitedLog(logger)
        self._down_until = 0.0  # after a failed send, drop at once until then
        self._full_log = RateLimitedLog(logger, traceback=False)
        _publishers.add(self)

    # --- per-process state ------------------------------------------------------------

    def _adopt_process(self) -> None:
        """Forget what the parent process had (after a fork): its queue, thread and
        connection. The inherited connection is dropped, not closed: closing it would send
        a close on a socket the parent still uses."""
        # A lock inherited through fork() may have been held by a parent thread that
        # does not exist here: take new ones before anything else.
        if self._pid != os.getpid():
            self._lock, self._send_lock = threading.Lock(), threading.Lock()
        with self._lock:
            if self._pid == os.getpid():
                return
            self._queue = queue.Queue(maxsize=self.queue_size)
            self._thread = None
            self._conn = None
            self._producer = None
            self._pid = os.getpid()

    def _ensure_thread(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="baton-bridge-publisher", daemon=True
                )
                self._thread.start()

    # --- publishing -------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Hand one event over; never raises, never waits for the broker in background
        mode (and at most the bounded retry policy otherwise)."""
        if self._pid != os.getpid():
            self._adopt_process()
        body = envelope(event)
        if not self.background:
            self._send([body])
            return
        self._ensure_thread()
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            self.dropped += 1
            self._full_log(QUEUE_FULL, self.queue_size, self.dropped)

    def _run(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            batch = [item]
            # Take what else is waiting (bounded), so a burst costs one wake-up.
            while len(batch) < 256:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            stop = any(b is _STOP for b in batch)
            bodies = [b for b in batch if b is not _STOP]
            if bodies:
                self._send(bodies)
            for _ in batch:
                q.task_done()
            if stop:
                return

    def _connection(self) -> Any:
        if self._conn is None:
            conn = self.app.connection_for_write()
            if conn.transport_cls in REDIS_TRANSPORTS:
                # kombu's Redis transport has no socket timeout by default: a hung (not
                # refused) broker would block the publishing task for good.
                conn.release()
                conn = self.app.connection_for_write(
                    transport_options={"socket_timeout": SOCKET_TIMEOUT}
                )
            self._conn = conn
            self._producer = Producer(  # type: ignore[no-untyped-call]
                self._conn, exchange=self.exchange, auto_declare=False
            )
        return self._conn

    def _send(self, bodies: list[dict[str, Any]]) -> None:
        if time.monotonic() < self._down_until:
            # The broker failed us a moment ago: a task must not pay for that again on
            # every event. Drop (counted) until the back-off ends, then try once more.
            self.dropped += len(bodies)
            return
        with self._send_lock:
            sent = 0
            try:
                self._connection()
                # kombu >= 5.7 can pipeline a burst (Redis: one round trip, one client).
                batch: Any = getattr(self._producer, "batch", None)
                use_batch = batch is not None and len(bodies) > 1
                with batch(max_size=len(bodies)) if use_batch else contextlib.nullcontext():
                    self._publish_each(bodies)
                sent = len(bodies)
            except Exception as exc:
                lost = len(bodies) - sent
                self.dropped += lost
                self._fail_log(PUBLISH_FAILED, lost, self.exchange.name, exc)
                self._reset_connection()
                self._down_until = time.monotonic() + BROKER_BACKOFF
            finally:
                self.published += sent

    def _publish_each(self, bodies: list[dict[str, Any]]) -> None:
        for body in bodies:
            send_envelope(self._producer, self.exchange, body, self.retry_policy)

    def _reset_connection(self) -> None:
        conn, self._conn, self._producer = self._conn, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # a broken connection may fail to close: it is gone anyway
                logger.debug("baton_celery: closing a broken bridge connection", exc_info=True)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait (bounded) until this process's queued events are sent; True when all were.
        Used at process exit, and by tests and benchmarks. Waits in the calling thread:
        nothing is left behind when the time runs out."""
        q = self._queue
        if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
            return q.unfinished_tasks == 0
        deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
        with q.all_tasks_done:  # the condition Queue.join() waits on, with a deadline
            while q.unfinished_tasks and (remaining := deadline - time.monotonic()) > 0:
                q.all_tasks_done.wait(remaining)
            left = q.unfinished_tasks
        if left:
            logger.warning(FLUSH_INCOMPLETE, left)
        return not left

    def close(self, timeout: float | None = None) -> bool:
        """Flush (bounded by ``timeout``, default ``baton_bridge_flush_timeout``), stop the
        thread and release this process's connection; True when every queued event was
        sent. A later :meth:`publish` starts again."""
        if self._pid != os.getpid():
            return True
        deadline = time.monotonic() + (self.flush_timeout if timeout is None else timeout)
        flushed = self.flush(timeout)
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._put_stop()
            thread.join(max(0.0, deadline - time.monotonic()))
        # A send in progress (a hung broker) may hold the lock: wait for it, bounded.
        if self._send_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            try:
                self._reset_connection()
            finally:
                self._send_lock.release()
        return flushed

    def _put_stop(self) -> None:
        """Queue the thread's stop after what is queued; a full queue (the flush ran out of
        time) drops one queued event for it, or the thread would wait for good."""
        with contextlib.suppress(queue.Empty, queue.Full):
            if self._queue.full():
                self._queue.get_nowait()
                self._queue.task_done()
                self.dropped += 1
            self._queue.put_nowait(_STOP)


_publishers: weakref.WeakSet[Publisher] = weakref.WeakSet()
_by_runtime: weakref.WeakKeyDictionary[Runtime, Publisher] = weakref.WeakKeyDictionary()
_by_runtime_lock = threading.Lock()


def publisher_for(runtime: Runtime) -> Publisher | None:
    """The runtime's publisher in this process, made on first use; None (and nothing
    made) while the runtime's bridge is off."""
    if not runtime.config.bridge:
        return None
    publisher = _by_runtime.get(runtime)
    if publisher is None:
        with _by_runtime_lock:
            publisher = _by_runtime.get(runtime)
            if publisher is None:
                publisher = _by_runtime[runtime] = Publisher(runtime.app, runtime.config)
    return publisher


def publish(runtime: Runtime, event: Event) -> None:
    """Publish ``event`` (numbered in its workflow by the store) when the app's bridge
    is on and its store does not publish events itself (see ``Runtime.broker_bridge``).

    Never raises: a bridge failure is logged and must not reach the task."""
    if not runtime.config.bridge:
        return
    try:
        if not runtime.broker_bridge:
            return
        publisher = publisher_for(runtime)
        if publisher is not None:
            publisher.publish(event)
    except Exception as exc:
        log_failure("bridge publish", exc, event.workflow_id)


def close(runtime: Runtime, timeout: float | None = None) -> bool:
    """Close and forget the runtime's publisher in this process, if it has one: what is
    queued is sent for at most ``timeout`` seconds (default ``baton_bridge_flush_timeout``),
    its thread is stopped and its connection released. ``uninstall(app)`` calls it; a
    later :func:`publish` for the runtime would make a new one. True when no event was
    left unsent."""
    with _by_runtime_lock:
        publisher = _by_runtime.pop(runtime, None)
    if publisher is None:
        return True
    _publishers.discard(publisher)
    return publisher.close(timeout)


def flush_all(timeout: float | None = None, **_: Any) -> None:
    """Flush every publisher of this process, each bounded by its flush timeout (or
    ``timeout``). Connected to Celery's worker_process_shutdown (prefork children leave
    with ``os._exit``, skipping atexit) and worker_shutdown, and registered with atexit."""
    for publisher in list(_publishers):
        try:
            publisher.close(timeout)
        except Exception:
            logger.exception("baton_celery: flushing the bridge failed")


def _connect_exit_hooks() -> None:
    from celery import signals

    signals.worker_process_shutdown.connect(
        flush_all, weak=False, dispatch_uid="baton_celery.bridge.flush_child"
    )
    signals.worker_shutdown.connect(
        flush_all, weak=False, dispatch_uid="baton_celery.bridge.flush_main"
    )
    atexit.register(flush_all)


_connect_exit_hooks()
