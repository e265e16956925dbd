"""The bridge's wire format: the fanout exchange, and the JSON envelope one event
travels in (shared by the publishing side, :mod:`bridge`, and :mod:`listener`).

Each message is a small JSON envelope::

    {"v": 1, "seq": 7, "origin": "<process token>", "event": {...event.to_dict()...}}

``seq`` is the event's number within its workflow, assigned in the same atomic store
update as the transition itself: a listener puts one workflow's events, sent by several
processes, back in order with it. ``origin`` names the sending process, so a process that
is both a worker and a listener does not deliver its own events twice.
"""

from __future__ import annotations

import json
from typing import Any

from kombu.entity import Exchange

from .events import Event
from .process import process_token

__all__ = ["ENVELOPE_VERSION", "bridge_exchange", "envelope", "process_token", "send_envelope"]

ENVELOPE_VERSION = 1


def bridge_exchange(name: str) -> Exchange:
    """The fanout exchange the bridge uses. Its flags are fixed: RabbitMQ refuses (406) a
    second declaration of the same name with other flags, so every process must agree.
    Not auto-deleted: a publisher may have declared it long before the next listener
    comes, and publishing to an exchange that vanished fails with 404 on RabbitMQ."""
    return Exchange(  # type: ignore[no-untyped-call]
        name, type="fanout", durable=False, auto_delete=False, delivery_mode=1
    )


def envelope(event: Event) -> dict[str, Any]:
    """The JSON document one event travels in."""
    return {
        "v": ENVELOPE_VERSION,
        "seq": event.seq,
        "origin": process_token(),
        "event": event.to_dict(),
    }


def send_envelope(
    producer: Any, exchange: Exchange, body: dict[str, Any], retry_policy: dict[str, Any]
) -> None:
    """Publish one JSON envelope on the bridge's exchange: transient, JSON only."""
    producer.publish(
        json.dumps(body, separators=(",", ":")),
        exchange=exchange,
        routing_key="",
        # Declare on publish: on Redis an undeclared exchange is taken for a direct one
        # (the message lands in a list nobody reads); on RabbitMQ a missing one closes
        # the channel with 404.
        declare=[exchange],
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=1,
        retry=True,
        retry_policy=retry_policy,
    )
