"""OpenTelemetry traces of workflows: each workflow one trace, each step attempt a span
linked to the spans of the dependencies it waited for.

Turn it on with one setting (``pip install 'baton_celery[otel]'``; spans go to the
global tracer provider, which you set up as usual, in every process)::

    app.conf.baton_otel = True          # before baton_celery.install(app)
    # or: baton_celery.otel.instrument(app)

A runnable example, printing the spans of one workflow run on an in-process worker::

    from celery import Celery
    from celery.contrib.testing.worker import start_worker
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    import baton_celery
    from baton_celery import Workflow

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)

    app = Celery("demo", broker="memory://", backend="cache+memory://")
    app.conf.update(baton_store="memory://", baton_otel=True)
    baton_celery.install(app)

    @app.task
    def step():
        return 1

    with start_worker(app, pool="solo", perform_ping_check=False):
        handle = (
            Workflow(label="demo")
            .add("a", step.s())
            .add("b", step.s(), deps=["a"])
            .apply_async()
        )
        handle.wait(timeout=10)

What it records, with the global tracer provider:

- where a workflow starts (``Workflow.apply_async``), the caller's current span becomes
  the workflow's trace parent; without one, a short root span ``baton.workflow.start``
  is made for it. That context is kept in the store with the workflow (an annotation),
  so that every worker process, on any host, finds it;
- one span per step attempt, ``baton.step <name>``, from its ``executing`` event to the
  event that settled the attempt (``completed``, ``retryable``, ``discarded``, or
  ``cancelled`` when a running step was terminated), recorded by the process that
  settled it, a child of the trace parent, with a link to the span of each dependency
  it waited for. A failed attempt has an error status and its exception (with the
  traceback, where the failing process still has it). Snoozed deliveries and steps
  cancelled before they ran have no attempt, so no span;
- one span per workflow, ``baton.workflow <label>``, from its creation to its finish,
  recorded by the one process that won the finish, a child of the same trace parent,
  with an error status when it failed.

Attributes: ``baton.workflow.id``, ``baton.workflow.label``, ``baton.workflow.outcome``,
``baton.workflow.failed_steps``, ``baton.workflow.step_count`` (workflow span);
``baton.workflow.id``, ``baton.workflow.label``, ``baton.step.name``,
``baton.step.attempt``, ``baton.step.state``, ``celery.task_id``, ``celery.task_name``
(step spans).

The spans are made when an attempt settles, with the times the store stamped on its
events: a process that dies mid-step loses nothing (the process that settles the step,
e.g. the worker's main process for a lost worker, records the span from the store's
history). They are not made current inside the task: opentelemetry-instrumentation-
celery's ``run/<task>`` span (or your own) stays the task's current span, in the trace
its message carried. When the workflow started without a span and the starting process
had no tracer provider, the workers use a trace id derived from the workflow id, so the
workflow still is one trace.

With a prefork pool, set the tracer provider up in ``worker_process_init`` (or use a
processor that survives a fork): a BatchSpanProcessor's thread does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ._observe import SHAPES, Bounded, Observer, Shape
from .events import (
    CANCELLED,
    COMPLETED,
    DISCARDED,
    EXECUTING,
    RETRYABLE,
    Event,
    StepUpdated,
    WorkflowFinished,
)
from .install import install
from .runtime import Runtime, runtime_for

__all__ = [
    "PARENT_KEY",
    "STEP_KEY",
    "instrument",
    "instrumented",
    "uninstrument",
]

logger = logging.getLogger(__name__)

#: The store annotation that keeps a workflow's trace parent (a W3C carrier, JSON).
PARENT_KEY = "otel.parent"
#: The store annotation that keeps a settled step's span context, for its dependents'
#: links (formatted with the step's name).
STEP_KEY = "otel.step:{}"

TRACER_NAME = "baton_celery"
#: The states that end an attempt (and so its span).
ENDS_ATTEMPT = frozenset({COMPLETED, RETRYABLE, DISCARDED, CANCELLED})
FAILED = frozenset({RETRYABLE, DISCARDED, CANCELLED})
SETTLED = frozenset({COMPLETED, DISCARDED, CANCELLED})

_w3c = TraceContextTextMapPropagator()


def _ns(stamp: datetime) -> int:
    return int(stamp.timestamp() * 1e9)


def _carrier(ctx: otel_context.Context) -> str | None:
    """``ctx``'s span context as a W3C carrier in JSON, or None when it has none."""
    carrier: dict[str, str] = {}
    _w3c.inject(carrier, context=ctx)
    return json.dumps(carrier, separators=(",", ":")) if "traceparent" in carrier else None


def _context(text: str | None) -> otel_context.Context | None:
    """The context a :func:`_carrier` string holds, or None when it holds none."""
    if not text:
        return None
    try:
        carrier = json.loads(text)
    except ValueError:
        return None
    if not isinstance(carrier, dict):
        return None
    ctx = _w3c.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def _span_context(text: str | None) -> SpanContext | None:
    ctx = _context(text)
    return None if ctx is None else trace.get_current_span(ctx).get_span_context()


def derived_parent(workflow_id: str) -> otel_context.Context:
    """The trace parent when the workflow's start recorded none (its process had no
    tracer provider): a remote span context derived from the workflow id, the same in
    every process. A UUID workflow id is the trace id itself."""
    try:
        trace_id = uuid.UUID(workflow_id).int
    except ValueError:
        trace_id = int.from_bytes(hashlib.sha256(workflow_id.encode()).digest()[:16], "big")
    span_id = int.from_bytes(hashlib.sha256(b"parent:" + workflow_id.encode()).digest()[:8], "big")
    parent = SpanContext(
        trace_id or 1, span_id or 1, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


def _tracing() -> bool:
    """Whether spans would go anywhere: a tracer provider has been set in this process.
    Until one is, nothing is read from or written to the store."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def _exception_for(error: str | None) -> BaseException | None:
    """The exception being handled, when it is the one the event's error names: a step's
    failure reaches baton from inside Celery's ``except`` block (task_failure,
    task_retry), so its traceback is still there. A Retry stands for what it wraps."""
    exc = sys.exc_info()[1]
    inner = getattr(exc, "exc", None)
    if isinstance(inner, BaseException):
        exc = inner
    if exc is None or not error or not error.startswith(f"{type(exc).__name__}:"):
        return None
    return exc


def _record_error(span: trace.Span, error: str | None, state: str, end: int) -> None:
    span.set_status(Status(StatusCode.ERROR, error or state))
    exc = _exception_for(error) if state != CANCELLED else None
    if exc is not None:
        span.record_exception(exc, timestamp=end)
    elif error:
        kind, _, message = error.partition(": ")
        attributes = {"exception.type": kind, "exception.message": message or kind}
        span.add_event("exception", attributes, timestamp=end)


class Tracing(Observer):
    """Makes the spans (see the module's docstring)."""

    name = "OpenTelemetry instrumentation"

    def __init__(self) -> None:
        super().__init__()
        self.shapes = SHAPES
        self.parents: Bounded[str, otel_context.Context] = Bounded(1024)
        # (workflow id, step) -> the carrier of a settled step's span recorded here: its
        # dependents that run in this process need not read it back from the store.
        self.recorded: Bounded[tuple[str, str], str] = Bounded(10000)
        # (workflow id, step, attempt) -> when that attempt started executing (ns)
        self.starts: Bounded[tuple[str, str, int], int] = Bounded(10000)
        self._tracer: tuple[Any, trace.Tracer] | None = None

    def forget(self) -> None:
        self.shapes.clear()
        self.parents.clear()
        self.recorded.clear()
        self.starts.clear()

    @property
    def tracer(self) -> trace.Tracer:
        """baton's tracer from the global provider (taken again if the provider changes)."""
        provider = trace.get_tracer_provider()
        cached = self._tracer
        if cached is None or cached[0] is not provider:
            cached = self._tracer = (provider, provider.get_tracer(TRACER_NAME))
        return cached[1]

    # --- a workflow starts (the caller's process) ---------------------------------------

    def created(self, app: Any, workflow_id: str, label: str | None) -> None:
        if not _tracing():
            return
        ctx = otel_context.get_current()
        if not trace.get_current_span(ctx).get_span_context().is_valid:
            root = self.tracer.start_span(
                "baton.workflow.start",
                context=otel_context.Context(),
                attributes=_workflow_attributes(workflow_id, label),
            )
            root.end()
            ctx = trace.set_span_in_context(root)
        carrier = _carrier(ctx)
        runtime = runtime_for(app)
        if carrier is None or runtime is None:
            return
        runtime.store.annotate(workflow_id, {PARENT_KEY: carrier})
        self.parents.put(workflow_id, ctx)

    # --- events -------------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        if not _tracing():
            return
        if isinstance(event, StepUpdated):
            if event.state == EXECUTING:
                key = (event.workflow_id, event.step_name, event.attempt)
                self.starts.put(key, _ns(event.timestamp))
            elif event.state in ENDS_ATTEMPT and event.attempt > 0:
                self._attempt(event)
        elif isinstance(event, WorkflowFinished):
            self._workflow(event)

    def _shape(self, workflow_id: str) -> Shape | None:
        return self.shapes.get(workflow_id, self.runtimes())

    def _notes(self, shape: Shape, workflow_id: str, deps: tuple[str, ...]) -> dict[str, str]:
        """The trace parent (unless remembered) and the deps' span contexts (unless
        recorded here): one read, none when this process has them all."""
        notes: dict[str, str] = {}
        keys = []
        for dep in deps:
            carrier = self.recorded.get((workflow_id, dep))
            if carrier is None:
                keys.append(STEP_KEY.format(dep))
            else:
                notes[STEP_KEY.format(dep)] = carrier
        if self.parents.get(workflow_id) is None:
            keys.append(PARENT_KEY)
        if keys:
            notes.update(shape.runtime.store.annotations(workflow_id, keys))
        return notes

    def _parent(self, workflow_id: str, notes: Mapping[str, str]) -> otel_context.Context:
        parent = self.parents.get(workflow_id)
        if parent is None:
            parent = _context(notes.get(PARENT_KEY)) or derived_parent(workflow_id)
            self.parents.put(workflow_id, parent)
        return parent

    def _attempt(self, event: StepUpdated) -> None:
        """Record the span of the attempt this event settled."""
        shape = self._shape(event.workflow_id)
        if shape is None:
            return  # not a workflow of an instrumented app
        start = self.starts.pop((event.workflow_id, event.step_name, event.attempt))
        if start is None:
            # Started in another process (the settle of a lost or terminated worker's
            # step, in the main process): its start is in the store's history.
            start = _started(shape.runtime, event)
            if start is None:
                return  # this attempt already ended (e.g. retryable, then cancelled)
        deps = shape.deps.get(event.step_name, ())
        notes = self._notes(shape, event.workflow_id, deps)
        links = [
            Link(found)
            for found in (_span_context(notes.get(STEP_KEY.format(d))) for d in deps)
            if found is not None
        ]
        end = _ns(event.timestamp)
        span = self.tracer.start_span(
            f"baton.step {event.step_name}",
            context=self._parent(event.workflow_id, notes),
            kind=SpanKind.INTERNAL,
            attributes=_step_attributes(event),
            links=links,
            start_time=min(start, end),
        )
        if event.state in FAILED:
            _record_error(span, event.error, event.state, end)
        span.end(end_time=end)
        if event.state in SETTLED and event.step_name in shape.needed:
            carrier = _carrier(trace.set_span_in_context(span))
            if carrier is not None:
                shape.runtime.store.annotate(
                    event.workflow_id, {STEP_KEY.format(event.step_name): carrier}
                )
                self.recorded.put((event.workflow_id, event.step_name), carrier)

    def _workflow(self, event: WorkflowFinished) -> None:
        """Record the workflow's span: this process won its finish."""
        shape = self._shape(event.workflow_id)
        if shape is None:
            return
        notes = self._notes(shape, event.workflow_id, ())
        attributes = _workflow_attributes(event.workflow_id, event.workflow_label)
        attributes.update(
            {
                "baton.workflow.outcome": event.outcome,
                "baton.workflow.failed_steps": list(event.failed_steps),
                "baton.workflow.step_count": len(shape.deps),
            }
        )
        end = _ns(event.timestamp)
        span = self.tracer.start_span(
            "baton.workflow" + (f" {event.workflow_label}" if event.workflow_label else ""),
            context=self._parent(event.workflow_id, notes),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=min(int(shape.created_at * 1e9), end),
        )
        if event.outcome != COMPLETED:
            failed = ", ".join(event.failed_steps)
            span.set_status(Status(StatusCode.ERROR, f"failed steps: {failed}"))
        span.end(end_time=end)
        self.parents.pop(event.workflow_id)


def _workflow_attributes(workflow_id: str, label: str | None) -> dict[str, Any]:
    attributes: dict[str, Any] = {"baton.workflow.id": workflow_id}
    if label is not None:
        attributes["baton.workflow.label"] = label
    return attributes


def _step_attributes(event: StepUpdated) -> dict[str, Any]:
    attributes = _workflow_attributes(event.workflow_id, event.workflow_label)
    attributes.update(
        {
            "baton.step.name": event.step_name,
            "baton.step.attempt": event.attempt,
            "baton.step.state": event.state,
            "celery.task_name": event.worker,
        }
    )
    if event.job_id is not None:
        attributes["celery.task_id"] = event.job_id
    return attributes


def _started(runtime: Runtime, event: StepUpdated) -> int | None:
    """When the attempt ``event`` settled started, from the store's history: its step's
    last event before this one must be that attempt's ``executing``."""
    previous = None
    for earlier in runtime.store.history(event.workflow_id):
        if earlier.seq >= event.seq:
            break
        if isinstance(earlier, StepUpdated) and earlier.step_name == event.step_name:
            previous = earlier
    if previous is None or previous.state != EXECUTING or previous.attempt != event.attempt:
        return None
    return _ns(previous.timestamp)


_tracing_observer = Tracing()


def instrument(app: Any) -> None:
    """Record OpenTelemetry spans of ``app``'s workflows in this process (installing
    baton on it if needed). What ``baton_otel = True`` does; twice is harmless."""
    install(app)
    _tracing_observer.add(app)


def uninstrument(app: Any) -> None:
    """Stop recording spans of ``app``'s workflows in this process."""
    _tracing_observer.remove(app)


def instrumented(app: Any) -> bool:
    """Whether :func:`instrument` is in effect for ``app`` in this process."""
    return _tracing_observer.observes(app)
