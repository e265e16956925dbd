"""An OpenTelemetry span exporter that every process of a test (the client, each worker's
main and pool processes) appends to one JSON-lines file with, and its reader.

One ``os.write`` of whole lines per export, to a file opened with ``O_APPEND``: the
processes' lines never interleave. No thread: safe across the prefork pool's fork.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

__all__ = ["JsonLinesExporter", "read_spans", "trace_to"]


def _hex(value: int, width: int) -> str:
    return f"{value:0{width}x}"


def as_record(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "trace_id": _hex(context.trace_id, 32),
        "span_id": _hex(context.span_id, 16),
        "parent_id": None if span.parent is None else _hex(span.parent.span_id, 16),
        "links": [_hex(link.context.span_id, 16) for link in span.links],
        "status": span.status.status_code.name,
        "description": span.status.description,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events],
        "start": span.start_time,
        "end": span.end_time,
        "pid": os.getpid(),
    }


class JsonLinesExporter(SpanExporter):
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(as_record(s), default=list) + "\n" for s in spans)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def trace_to(path: str | Path) -> None:
    """Export this process's spans to ``path`` (setting the global tracer provider, or
    adding to the one already set)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))


def read_spans(*paths: str | Path) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in paths:
        if Path(path).exists():
            found.extend(json.loads(line) for line in Path(path).read_text().splitlines())
    return found
