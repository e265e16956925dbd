"""baton_celery.metrics: Prometheus counts and times of a known run on an in-process worker,
the running gauge read from the store, and the WSGI exposition."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from celery import Celery
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import baton_celery
from baton_celery import Workflow, metrics, pubsub
from baton_celery.identity import StepIdentity, identity_of

from .observed import diamond, failing, make_app, run, sig, worker


@pytest.fixture
def app() -> Iterator[Celery]:
    app = make_app(baton_metrics=True)
    yield app
    baton_celery.uninstall(app)


def value(name: str, **labels: str) -> float:
    found = REGISTRY.get_sample_value(name, labels)
    return 0.0 if found is None else found


def scrape(registry: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_known_run_counts_exactly(app: Celery) -> None:
    dia, fail = f"dia-{uuid.uuid4().hex[:8]}", f"fail-{uuid.uuid4().hex[:8]}"
    assert metrics.instrumented(app)
    with worker(app):
        run(app, diamond(app, dia), failing(app, fail))

    def events(label: str, step: str, state: str) -> float:
        return value("baton_step_events_total", workflow_label=label, step=step, state=state)

    for step in "abcd":
        assert events(dia, step, "executing") == events(dia, step, "completed") == 1
        assert value("baton_step_run_seconds_count", workflow_label=dia, step=step) == 1
        assert value("baton_step_queue_wait_seconds_count", workflow_label=dia, step=step) == 1
    assert events(fail, "x", "executing") == 2
    assert events(fail, "x", "retryable") == events(fail, "x", "completed") == 1
    assert events(fail, "y", "executing") == events(fail, "y", "completed") == 1
    assert events(fail, "z", "executing") == events(fail, "z", "discarded") == 1
    assert events(fail, "w", "cancelled") == 1
    assert events(fail, "w", "executing") == 0
    # Two attempts of x ran; its retry's wait is left out of the queue wait.
    assert value("baton_step_run_seconds_count", workflow_label=fail, step="x") == 2
    assert value("baton_step_queue_wait_seconds_count", workflow_label=fail, step="x") == 1
    assert value("baton_step_run_seconds_count", workflow_label=fail, step="w") == 0
    assert value("baton_workflows_finished_total", workflow_label=dia, outcome="completed") == 1
    assert value("baton_workflows_finished_total", workflow_label=fail, outcome="failed") == 1
    assert value("baton_workflows_finished_total", workflow_label=fail, outcome="completed") == 0
    for label in (dia, fail):
        assert value("baton_workflow_duration_seconds_count", workflow_label=label) == 1
        assert value("baton_workflow_duration_seconds_sum", workflow_label=label) > 0


def test_a_workflow_without_a_label(app: Celery) -> None:
    before = value("baton_workflows_finished_total", workflow_label="", outcome="completed")
    with worker(app):
        run(app, Workflow().add("only", sig(app, "ok", "only")))
    after = value("baton_workflows_finished_total", workflow_label="", outcome="completed")
    assert after == before + 1


def test_the_running_gauge_is_read_from_the_store(app: Celery) -> None:
    """No worker runs: the workflows stay running, whichever process started them."""
    label = f"waiting-{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        Workflow(label=label).add("a", sig(app, "ok", "a")).apply_async()
    Workflow(label=None).add("a", sig(app, "ok", "a")).apply_async()
    found = scrape(metrics.registry_for(app))
    assert found["baton_workflows_running", (("workflow_label", label),)] == 3
    assert found["baton_workflows_running", (("workflow_label", ""),)] == 1


def test_the_running_gauge_pages_through_the_store(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    label = f"paged-{uuid.uuid4().hex[:8]}"
    for _ in range(5):
        Workflow(label=label).add("a", sig(app, "ok", "a")).apply_async()
    monkeypatch.setattr(metrics, "MAX_PAGE", 2)
    assert metrics.RunningWorkflows(app).count() == {label: 5}


def test_a_store_error_leaves_the_gauge_out(caplog: pytest.LogCaptureFixture) -> None:
    from baton_celery.stores.memory import MemoryStore

    class Down(MemoryStore):
        def workflows(self, **_: Any) -> Any:
            raise baton_celery.StoreError("down")

    app = make_app(baton_store=Down())
    try:
        found = scrape(metrics.registry_for(app))
        assert not any(name == "baton_workflows_running" for name, _ in found)
        assert "counting running workflows failed" in caplog.text
    finally:
        baton_celery.uninstall(app)


def test_the_wsgi_app_serves_the_text_format(app: Celery) -> None:
    Workflow(label="served").add("a", sig(app, "ok", "a")).apply_async()
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(metrics.wsgi_app(app)(environ, lambda s, h: status.append(s)))
    assert status == ["200 OK"]
    assert b'baton_workflows_running{workflow_label="served"} 1.0' in body


def test_the_multiprocess_directory_is_read_when_given(app: Celery, tmp_path: Any) -> None:
    found = scrape(metrics.registry_for(app, str(tmp_path)))
    # An empty directory: no process wrote yet; only the gauge, none of this process's.
    assert {name for name, _ in found} <= {"baton_workflows_running"}


def test_published_at_travels_in_the_header() -> None:
    ident = StepIdentity("wf", "etl", "load", 1, 1700000000.5)
    assert ident.header()["published_at"] == 1700000000.5
    assert identity_of(SimpleNamespace(baton=ident.header())) == ident
    bad = {**ident.header(), "published_at": "yesterday"}
    assert identity_of(SimpleNamespace(baton=bad)) == ident._replace(published_at=None)
    assert "published_at" not in StepIdentity("wf", None, "s", 0).header()


def test_nothing_is_connected_when_off() -> None:
    before = len(pubsub.event_made.receivers)
    plain = make_app()
    try:
        assert not metrics.instrumented(plain)
        assert len(pubsub.event_made.receivers) == before
        metrics.instrument(plain)
        metrics.instrument(plain)
        assert len(pubsub.event_made.receivers) == before + 1
    finally:
        baton_celery.uninstall(plain)
    assert not metrics.instrumented(plain)
    assert len(pubsub.event_made.receivers) == before
