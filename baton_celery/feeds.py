"""Where a listener's live events come from: the store's own channel (the Redis store
publishes each transition's events from inside its script) or the broker bridge's
fanout exchange (every other store; see :mod:`baton_celery.bridge`).

A feed runs in the listener's thread until it is stopped or its connection fails (then
it raises, and the listener reconnects). It calls back into the listener: ``on_ready()``
once its subscription is proven live, ``on_alive()`` whenever the connection shows it
works (a message, an answered probe), ``on_event(event, origin)`` for each event,
``on_missed(workflow_id)`` for a message of a workflow it could not read (the listener
reads that workflow's events from the store), ``on_malformed(reason)`` for a message it
drops, and ``on_tick()`` often.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from queue import Empty
from typing import Any, Protocol

from kombu.entity import Exchange, Queue
from kombu.messaging import Consumer, Producer

from .envelope import ENVELOPE_VERSION, send_envelope
from .events import Event, event_from_dict

__all__ = ["BrokerFeed", "Feed", "FeedListener", "StoreFeed"]

logger = logging.getLogger(__name__)

#: How long a feed blocks for a message before it calls ``tick()``.
TICK = 0.05
#: After this many idle seconds a feed checks its connection (a probe through the
#: exchange, a PING on Redis) and gives up on it when no answer came back within
#: PROBE_TIMEOUT seconds: a half-open connection or a silently lost subscription would
#: otherwise go unnoticed.
HEARTBEAT = 2.0
PROBE_TIMEOUT = 10.0


class FeedListener(Protocol):
    """What a feed calls back (:class:`baton_celery.listener.Listener`)."""

    max_message: int

    def on_ready(self) -> None: ...
    def on_alive(self) -> None: ...
    def on_event(self, event: Event, origin: str) -> None: ...
    def on_missed(self, workflow_id: str) -> None: ...
    def on_malformed(self, reason: str) -> None: ...
    def on_tick(self) -> None: ...
    def stopping(self) -> bool: ...


class Feed(Protocol):
    def run(self, listener: FeedListener) -> None:
        """Consume until the listener stops (return) or the connection fails (raise)."""


class StoreFeed:
    """The Redis store's channel: one message per transition, a header line
    ``[workflow id, label, origin]`` then one line per event (as the history keeps
    them). Ordered as Redis ran the scripts, so nothing needs reordering on one Redis."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def run(self, listener: FeedListener) -> None:
        from .stores.redis_scripts import decode_event

        pubsub = self.store.client.pubsub()
        try:
            pubsub.subscribe(self.store.feed_channel)
            pinged = 0.0
            activity = time.monotonic()
            while not listener.stopping():
                message = pubsub.get_message(timeout=TICK)
                now = time.monotonic()
                if message is not None:
                    activity, pinged = now, 0.0
                    listener.on_alive()
                    kind = message.get("type")
                    if kind in ("subscribe", b"subscribe"):
                        listener.on_ready()
                    elif kind in ("message", b"message"):
                        self._accept(listener, message.get("data"), decode_event)
                elif pinged and now - pinged >= PROBE_TIMEOUT:
                    raise ConnectionError(f"no answer to a PING in {PROBE_TIMEOUT} s")
                elif not pinged and now - activity >= HEARTBEAT:
                    pubsub.ping()
                    pinged = now
                listener.on_tick()
        finally:
            try:
                pubsub.close()
            except Exception:
                logger.debug("baton_celery: closing the store feed", exc_info=True)

    def _accept(self, listener: FeedListener, data: Any, decode: Any) -> None:
        try:
            text = data.decode() if isinstance(data, bytes) else data
            header, _, rest = text.partition("\n")
            workflow_id, label, origin = json.loads(header)
            if not isinstance(workflow_id, str):
                raise ValueError(f"bad workflow id {workflow_id!r}")
        except Exception as exc:
            listener.on_malformed(f"{type(exc).__name__}: {exc}"[:500])
            return
        try:
            if len(text) > listener.max_message:
                raise ValueError(f"{len(text)} bytes, more than baton_bridge_max_message")
            events = [decode(workflow_id, label or None, line) for line in rest.split("\n")]
        except Exception as exc:
            # A transition of a known workflow (a big cascade): its events are in the store.
            listener.on_malformed(f"{type(exc).__name__}: {exc}"[:500])
            listener.on_missed(workflow_id)
            return
        for event in events:
            listener.on_event(event, origin)


class BrokerFeed:
    """The broker bridge's fanout exchange, through the listener's own exclusive,
    auto-deleted queue. Ready once a probe it sent itself through the exchange came back
    (on Redis, kombu subscribes on the first drain, not on consume)."""

    def __init__(self, app: Any, exchange: Exchange) -> None:
        self.app = app
        self.exchange = exchange
        self._probe: str | None = None  # the nonce of the probe on its way, if any
        self._probe_sent = 0.0
        self._activity = 0.0  # when a message last arrived
        self._connected = False

    def run(self, listener: FeedListener) -> None:
        conn = self.app.connection_for_read()
        try:
            # One quick attempt: the back-off between attempts is the listener's.
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
                channel,
                [queue],
                accept=["json"],
                no_ack=True,
                on_message=lambda message: self._on_message(listener, message),
            )
            consumer.consume()
            producer = Producer(conn.channel(), exchange=self.exchange)  # type: ignore[no-untyped-call]
            is_redis = conn.transport.driver_type == "redis"
            self._probe, self._connected = None, False
            next_probe = 0.0
            while not listener.stopping():
                try:
                    conn.drain_events(timeout=TICK)
                except socket.timeout:
                    pass
                except (KeyError, TypeError, ValueError) as exc:
                    if not is_redis:
                        raise
                    self._skip_raw(listener, exc)
                if is_redis:
                    self._drain_buffered(listener, channel)
                listener.on_tick()
                now = time.monotonic()
                if not self._connected:
                    if now >= next_probe:
                        self._send_probe(producer)
                        next_probe = now + 0.25
                elif self._probe is None:
                    if now - self._activity >= HEARTBEAT:
                        self._send_probe(producer)
                elif now - self._probe_sent >= PROBE_TIMEOUT:
                    raise ConnectionError(f"no probe came back in {PROBE_TIMEOUT} s")
        finally:
            try:
                conn.release()
            except Exception:
                logger.debug("baton_celery: closing the listener's connection", exc_info=True)

    def _skip_raw(self, listener: FeedListener, exc: BaseException) -> None:
        # Redis: a raw PUBLISH that is not a kombu message fails inside kombu
        # (KeyError('properties')) after it was read off the socket: the subscription is
        # intact, so skip it instead of reconnecting.
        listener.on_malformed(f"not a kombu message ({exc!r})")

    def _drain_buffered(self, listener: FeedListener, channel: Any) -> None:
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
                self._skip_raw(listener, exc)
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

    def _on_message(self, listener: FeedListener, message: Any) -> None:
        self._activity = time.monotonic()
        listener.on_alive()
        try:
            body = message.body
            size = len(body) if isinstance(body, (bytes, str)) else 0
            if size > listener.max_message:
                raise ValueError(f"{size} bytes, more than baton_bridge_max_message")
            data = message.decode()  # refuses anything but JSON (accept=["json"])
            self._accept(listener, data)
        except Exception as exc:
            listener.on_malformed(f"{type(exc).__name__}: {exc}"[:500])

    def _accept(self, listener: FeedListener, data: Any) -> None:
        """Check one decoded envelope; a probe of ours proves the subscription."""
        if not isinstance(data, dict) or data.get("v") != ENVELOPE_VERSION:
            raise ValueError("not a baton_celery envelope (version 1)")
        if "probe" in data:
            if data["probe"] == self._probe and self._probe is not None:
                self._probe = None
                if not self._connected:
                    self._connected = True
                    listener.on_ready()
            return
        seq, origin = data.get("seq"), data.get("origin")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ValueError(f"bad seq {seq!r}")
        if not isinstance(origin, str):
            raise ValueError(f"bad origin {origin!r}")
        raw = data.get("event")
        if not isinstance(raw, dict):
            raise ValueError("no event")
        event = event_from_dict({**raw, "seq": seq})
        listener.on_event(event, origin)
