"""baton_celery.otel: spans of workflows and step attempts, on an in-process worker with
the OpenTelemetry SDK (an in-memory exporter)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import baton_celery
from baton_celery import guard, otel, pubsub
from baton_celery.events import StepUpdated, utcnow
from baton_celery.runtime import runtime_for
from baton_celery.stores.memory import MemoryStore

from .observed import diamond, failing, make_app, run, sig, worker

_exporter = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _provider() -> None:
    """The process's global tracer provider can be set once: an SDK one, exporting to
    memory (kept for the session; other tests do not trace)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(_exporter))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    _exporter.clear()
    guard.reset()
    yield _exporter
    _exporter.clear()


@pytest.fixture
def app() -> Iterator[Celery]:
    app = make_app(baton_otel=True)
    yield app
    baton_celery.uninstall(app)


def of(spans: InMemorySpanExporter, workflow_id: str) -> list[ReadableSpan]:
    return [
        s
        for s in spans.get_finished_spans()
        if (s.attributes or {}).get("baton.workflow.id") == workflow_id
    ]


def named(found: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in found if s.name == name]


def one(found: list[ReadableSpan], name: str) -> ReadableSpan:
    hits = named(found, name)
    assert len(hits) == 1, f"{len(hits)} spans named {name!r} in {[s.name for s in found]}"
    return hits[0]


def sid(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def links_of(span: ReadableSpan) -> set[int]:
    return {link.context.span_id for link in span.links}


def test_a_diamond_under_the_callers_span(app: Celery, spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("a user's code")
    with worker(app), tracer.start_as_current_span("caller") as caller:
        (finished,) = run(app, diamond(app, "dia"))
    found = of(spans, finished.workflow_id)
    assert sorted(s.name for s in found) == [
        "baton.step a",
        "baton.step b",
        "baton.step c",
        "baton.step d",
        "baton.workflow dia",
    ]
    caller_id = caller.get_span_context().span_id
    trace_id = caller.get_span_context().trace_id
    assert all(s.context is not None and s.context.trace_id == trace_id for s in found)
    assert all(parent_of(s) == caller_id for s in found)  # no start span: the caller's
    a, b, c, d = (one(found, f"baton.step {n}") for n in "abcd")
    assert links_of(a) == set()
    assert links_of(b) == links_of(c) == {sid(a)}
    assert links_of(d) == {sid(b), sid(c)}
    assert d.attributes is not None and dict(d.attributes) == {
        "baton.workflow.id": finished.workflow_id,
        "baton.workflow.label": "dia",
        "baton.step.name": "d",
        "baton.step.attempt": 1,
        "baton.step.state": "completed",
        "celery.task_name": "obs.ok",
        "celery.task_id": baton_celery.WorkflowHandle(finished.workflow_id, app)
        .status()
        .steps["d"]
        .job_id,
    }
    flow = one(found, "baton.workflow dia")
    assert flow.attributes is not None
    assert flow.attributes["baton.workflow.outcome"] == "completed"
    assert flow.attributes["baton.workflow.step_count"] == 4
    assert flow.status.status_code == StatusCode.UNSET
    record = runtime_for(app).store.load(finished.workflow_id)  # type: ignore[union-attr]
    assert flow.start_time == int(record.created_at * 1e9)
    assert flow.end_time == int(finished.timestamp.timestamp() * 1e9)
    assert all(s.status.status_code == StatusCode.UNSET for s in found)
    # Each attempt's span covers executing -> completed, as the store stamped them.
    events = {
        (e.step_name, e.state): e
        for e in baton_celery.WorkflowHandle(finished.workflow_id, app).events()
        if isinstance(e, StepUpdated)
    }
    assert d.start_time == int(events["d", "executing"].timestamp.timestamp() * 1e9)
    assert d.end_time == int(events["d", "completed"].timestamp.timestamp() * 1e9)


def test_a_failing_workflow(app: Celery, spans: InMemorySpanExporter) -> None:
    with worker(app):
        (finished,) = run(app, failing(app, "fail"))
    assert finished.outcome == "failed"
    found = of(spans, finished.workflow_id)
    start = one(found, "baton.workflow.start")  # no span was current: a root for it
    assert start.parent is None
    assert all(parent_of(s) == sid(start) for s in found if s is not start)
    x1, x2 = sorted(named(found, "baton.step x"), key=lambda s: s.attributes["baton.step.attempt"])  # type: ignore[index]
    assert x1.attributes is not None and x1.attributes["baton.step.state"] == "retryable"
    assert x1.status.status_code == StatusCode.ERROR
    assert x1.status.description == "ConnectionError: x-fail flaked"
    (exc_event,) = x1.events
    assert exc_event.name == "exception"
    assert exc_event.attributes is not None
    assert exc_event.attributes["exception.type"] == "ConnectionError"
    assert x2.status.status_code == StatusCode.UNSET
    y, z = one(found, "baton.step y"), one(found, "baton.step z")
    assert links_of(y) == links_of(z) == {sid(x2)}  # the attempt that completed
    assert z.status.status_code == StatusCode.ERROR
    (raised,) = z.events
    assert raised.attributes is not None
    assert raised.attributes["exception.type"] == "ValueError"
    assert raised.attributes["exception.message"] == "z is broken"
    assert "raise ValueError" in str(raised.attributes["exception.stacktrace"])
    assert named(found, "baton.step w") == []  # cancelled before it ran: no attempt
    flow = one(found, "baton.workflow fail")
    assert flow.status.status_code == StatusCode.ERROR
    assert flow.attributes is not None
    assert flow.attributes["baton.workflow.outcome"] == "failed"
    assert tuple(flow.attributes["baton.workflow.failed_steps"]) == ("z", "w")  # type: ignore[arg-type]


def test_the_trace_parent_and_links_travel_in_the_store(
    app: Celery, spans: InMemorySpanExporter
) -> None:
    """What another process (or host) would read: annotations, not this process's memory."""
    with worker(app):
        (finished,) = run(app, diamond(app, "stored"))
    found = of(spans, finished.workflow_id)
    store = runtime_for(app).store  # type: ignore[union-attr]
    notes = store.annotations(
        finished.workflow_id, [otel.PARENT_KEY, *(otel.STEP_KEY.format(n) for n in "abcd")]
    )
    assert set(notes) == {otel.PARENT_KEY, "otel.step:a", "otel.step:b", "otel.step:c"}
    start = one(found, "baton.workflow.start")
    assert f"{sid(start):016x}" in notes[otel.PARENT_KEY]
    assert f"{sid(one(found, 'baton.step b')):016x}" in notes["otel.step:b"]


def test_a_workflow_started_without_a_tracer_gets_a_trace_from_its_id() -> None:
    workflow_id = str(uuid.uuid4())
    ctx = otel.derived_parent(workflow_id)
    parent = trace.get_current_span(ctx).get_span_context()
    assert parent.trace_id == uuid.UUID(workflow_id).int
    assert parent.is_remote and parent.trace_flags.sampled
    assert otel.derived_parent(workflow_id) is not ctx
    again = trace.get_current_span(otel.derived_parent(workflow_id)).get_span_context()
    assert (again.trace_id, again.span_id) == (parent.trace_id, parent.span_id)
    named_id = trace.get_current_span(otel.derived_parent("nightly-42")).get_span_context()
    assert named_id.is_valid


def test_steps_without_a_stored_parent_share_the_derived_trace(
    app: Celery, spans: InMemorySpanExporter
) -> None:
    """The starting process had no tracer: the workers still make one trace of it."""
    pubsub.workflow_created.disconnect(otel._tracing_observer._on_created)
    try:
        with worker(app):
            (finished,) = run(app, diamond(app, "derived"))
    finally:
        pubsub.workflow_created.connect(otel._tracing_observer._on_created, weak=False)
    found = of(spans, finished.workflow_id)
    assert len(found) == 5
    assert {s.context.trace_id for s in found if s.context} == {uuid.UUID(finished.workflow_id).int}


def test_nothing_is_connected_when_off() -> None:
    before = (len(pubsub.event_made.receivers), len(pubsub.workflow_created.receivers))
    plain = make_app()
    try:
        assert not otel.instrumented(plain)
        assert (len(pubsub.event_made.receivers), len(pubsub.workflow_created.receivers)) == before
    finally:
        baton_celery.uninstall(plain)


def test_instrument_twice_then_uninstall(spans: InMemorySpanExporter) -> None:
    before = len(pubsub.event_made.receivers)
    app = make_app()
    otel.instrument(app)
    otel.instrument(app)
    assert otel.instrumented(app)
    assert len(pubsub.event_made.receivers) == before + 1
    baton_celery.uninstall(app)
    assert not otel.instrumented(app)
    assert len(pubsub.event_made.receivers) == before


def test_the_setting_is_read_when_celery_loads_the_configuration() -> None:
    app = Celery("lazy-otel", set_as_current=False)
    app.config_from_object({"baton_otel": True, "baton_store": "memory://"})
    baton_celery.install(app)
    try:
        assert not app.configured and not otel.instrumented(app)
        app.loader.import_default_modules()  # anything that reads the configuration
        _ = app.conf.broker_url
        assert otel.instrumented(app)
    finally:
        baton_celery.uninstall(app)
    assert not otel.instrumented(app)


def test_events_heard_by_a_listener_are_not_traced_again(
    app: Celery, spans: InMemorySpanExporter
) -> None:
    """The span of a remote event is recorded where it happened: instrumentation takes
    the events this process made (announce), not what its receivers hear."""
    event = StepUpdated("wf", None, "a", "t", "completed", "j", 1, False, None, utcnow(), 1)
    seen: list[Any] = []
    original = otel._tracing_observer.observe
    otel._tracing_observer.observe = seen.append  # type: ignore[method-assign]
    try:
        pubsub.broadcast(event)  # what a listener does with another process's event
        pubsub.send_made(event)  # what announce does with an event made here
    finally:
        del otel._tracing_observer.observe
    assert seen == [event]
    assert original  # the class's own method is back


class NoNotes(MemoryStore):
    """A store whose annotations fail (an outage of just that call)."""

    def annotate(self, workflow_id: str, values: Any) -> None:
        raise baton_celery.StoreError("annotations are down")

    def annotations(self, workflow_id: str, keys: Any) -> dict[str, str]:
        raise baton_celery.StoreError("annotations are down")


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_store_failure_is_logged_and_the_workflow_runs_on(spans: InMemorySpanExporter) -> None:
    # The worker sets up logging its own way: listen on baton's logger itself.
    logged = Lines()
    logging.getLogger("baton_celery").addHandler(logged)
    app = make_app(baton_otel=True, baton_store=NoNotes())
    try:
        with worker(app):
            (finished,) = run(app, diamond(app, "no-notes"))
        assert finished.outcome == "completed"
        assert any(
            "OpenTelemetry instrumentation of a workflow's start failed" in line
            and "the task itself is unaffected" in line
            for line in logged.lines
        ), logged.lines
        assert any("OpenTelemetry instrumentation of an event failed" in x for x in logged.lines)
    finally:
        logging.getLogger("baton_celery").removeHandler(logged)
        baton_celery.uninstall(app)


def test_the_spans_of_one_app_only(spans: InMemorySpanExporter) -> None:
    traced, plain = make_app(baton_otel=True), make_app()
    try:
        with worker(plain):
            (finished,) = run(plain, diamond(plain, "plain"))
        assert of(spans, finished.workflow_id) == []
        assert sig(plain, "ok", "x") is not None
    finally:
        baton_celery.uninstall(traced)
        baton_celery.uninstall(plain)
