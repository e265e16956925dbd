"""Server-sent-events messages: each live item is formatted once, for every page."""

from __future__ import annotations

import dataclasses
import json

from ..events import Event, WorkflowFinished
from ..stores.transition import WorkflowSummary

__all__ = ["CLOSED", "END", "KEEPALIVE", "Item", "event_item", "sse", "summary_item"]


def sse(data: str = "", *, event: str | None = None, id: str | None = None) -> str:
    """One message of the ``text/event-stream`` format (``data`` is one line: JSON)."""
    lines = []
    if id is not None:
        lines.append(f"id: {id}")
    if event is not None:
        lines.append(f"event: {event}")
    if data:
        lines.append(f"data: {data}")
    return "\n".join(lines) + "\n\n"


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class Item:
    """One message for a page's stream: ``kind`` is "step" or "finish" (a workflow's
    event, ``id`` its seq), "workflow" (a summary, for the index) or "closed"."""

    seq: int
    kind: str
    text: str
    label: str | None = None  # a summary's workflow label


def event_item(event: Event) -> Item:
    kind = "finish" if isinstance(event, WorkflowFinished) else "step"
    return Item(event.seq, kind, sse(_json(event.to_dict()), event=kind, id=str(event.seq)))


def summary_item(summary: WorkflowSummary) -> Item:
    text = sse(_json(summary.to_dict()), event="workflow")
    return Item(summary.seq, "workflow", text, summary.label)


#: The hub is shutting down, or the page fell behind: end the stream (the browser
#: reconnects and catches up from the store).
CLOSED = Item(-1, "closed", "")
#: A comment line: keeps proxies and the server from closing a quiet stream.
KEEPALIVE = ": keep-alive\n\n"
#: Sent after a workflow's finish: the page closes its stream.
END = sse("{}", event="end")
