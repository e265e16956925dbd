"""Prometheus metrics of workflows and their steps.

Turn it on with one setting (``pip install 'baton_celery[prometheus]'``)::

    app.conf.baton_metrics = True       # before baton_celery.install(app)
    # or: baton_celery.metrics.instrument(app)

and serve them, from the workers' host::

    PROMETHEUS_MULTIPROC_DIR=/run/baton-metrics celery -A proj worker
    PROMETHEUS_MULTIPROC_DIR=/run/baton-metrics celery -A proj baton metrics --port 9808

A runnable example, on an in-process worker, printing what a scrape would get::

    from celery import Celery
    from celery.contrib.testing.worker import start_worker
    from prometheus_client import generate_latest

    import baton_celery
    from baton_celery import Workflow, metrics

    app = Celery("demo", broker="memory://", backend="cache+memory://")
    app.conf.update(baton_store="memory://", baton_metrics=True)
    baton_celery.install(app)

    @app.task
    def step():
        return 1

    with start_worker(app, pool="solo", perform_ping_check=False):
        Workflow(label="demo").add("a", step.s()).apply_async().wait(timeout=10)
    print(generate_latest(metrics.registry_for(app)).decode())

The metrics (labels are names, never ids, so their number stays bounded):

- ``baton_step_events_total{workflow_label, step, state}``: step events;
- ``baton_workflows_finished_total{workflow_label, outcome}``: finished workflows;
- ``baton_workflow_duration_seconds{workflow_label}``: a histogram of workflow
  durations, creation to finish;
- ``baton_step_queue_wait_seconds{workflow_label, step}``: a histogram of the time from
  baton publishing a step to its first attempt starting (retries wait by design, and are
  left out);
- ``baton_step_run_seconds{workflow_label, step}``: a histogram of attempts' run times,
  ``executing`` to the event that ended the attempt;
- ``baton_workflows_running{workflow_label}``: a gauge of the workflows not finished yet,
  read from the store at scrape time by :func:`registry_for` (and so by ``celery baton
  metrics``): a workflow starts in one process and finishes in another, often on another
  host, so a gauge moved up there and down here would be right in no process.

Each event is counted once, by the process it happened in (a bridge listener does not
count what it hears). A workflow without a label is ``workflow_label=""``.

Prefork pools: every process counts its own, so run the worker (and ``celery baton
metrics``, which reads them all) with prometheus-client's multiprocess mode: the
``PROMETHEUS_MULTIPROC_DIR`` environment variable, set to an empty directory of that
host before the processes start. Without it, :func:`registry_for` serves this process's
metrics (a solo or threads pool that serves them itself) and the running gauge.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import Any, Callable

from celery import current_task
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from . import running
from ._observe import SHAPES, Bounded, Observer
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
from .guard import log_failure
from .identity import identity_of
from .install import install
from .runtime import runtime_for
from .stores.base import MAX_PAGE

__all__ = [
    "MULTIPROC_ENV",
    "RunningWorkflows",
    "instrument",
    "instrumented",
    "registry_for",
    "uninstrument",
    "wsgi_app",
]

logger = logging.getLogger(__name__)

#: prometheus-client's multiprocess mode: the directory every process writes to.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Buckets (seconds) of the workflow and step histograms: steps of milliseconds to
#: workflows of an hour.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    900.0, 3600.0, float("inf"),
)  # fmt: skip
#: The most running workflows the gauge counts, per scrape (pages of the store's index).
RUNNING_LIMIT = 100 * MAX_PAGE

ENDS_ATTEMPT = frozenset({COMPLETED, RETRYABLE, DISCARDED, CANCELLED})


class Instruments:
    """The metric objects, made once per process (in prometheus-client's default
    registry, which multiprocess mode leaves to the files)."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.step_events = Counter(
            "baton_step_events",
            "Step events, by workflow label, step name and state.",
            ["workflow_label", "step", "state"],
            registry=registry,
        )
        self.finished = Counter(
            "baton_workflows_finished",
            "Finished workflows, by workflow label and outcome.",
            ["workflow_label", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "baton_workflow_duration_seconds",
            "Workflow durations, from creation to finish.",
            ["workflow_label"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "baton_step_queue_wait_seconds",
            "From baton publishing a step to its first attempt starting.",
            ["workflow_label", "step"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.run = Histogram(
            "baton_step_run_seconds",
            "Step attempts' run times, from executing to the event that ended the attempt.",
            ["workflow_label", "step"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )


def _published_at(event: StepUpdated) -> float | None:
    """When baton published the message of the step now starting in this process: its
    ``executing`` event is made where the task's request is current (task_prerun, or
    task_success on the fast path), or by the watchdog's thread (running.py)."""
    task = current_task._get_current_object() if current_task else None
    request = getattr(task, "request", None)
    if request is None or getattr(request, "id", None) != event.job_id:
        ref = running.announcing(event.workflow_id, event.step_name)
        return None if ref is None else ref.published_at
    ident = identity_of(request)
    return None if ident is None else ident.published_at


class Recording(Observer):
    """Counts and times the events made in this process (see the module's docstring)."""

    name = "Prometheus instrumentation"

    def __init__(self) -> None:
        super().__init__()
        self._instruments: Instruments | None = None
        self._made = threading.Lock()
        self.shapes = SHAPES
        # (workflow id, step, attempt) -> when that attempt started executing
        self.starts: Bounded[tuple[str, str, int], float] = Bounded(10000)

    @property
    def instruments(self) -> Instruments:
        made = self._instruments
        if made is None:
            with self._made:
                if self._instruments is None:
                    self._instruments = Instruments()
                made = self._instruments
        return made

    def forget(self) -> None:
        self.shapes.clear()
        self.starts.clear()

    def observe(self, event: Event) -> None:
        metrics = self.instruments
        label = event.workflow_label or ""
        if isinstance(event, WorkflowFinished):
            metrics.finished.labels(label, event.outcome).inc()
            shape = self.shapes.get(event.workflow_id, self.runtimes())
            if shape is not None:
                duration = event.timestamp.timestamp() - shape.created_at
                metrics.duration.labels(label).observe(max(0.0, duration))
            return
        metrics.step_events.labels(label, event.step_name, event.state).inc()
        at = event.timestamp.timestamp()
        key = (event.workflow_id, event.step_name, event.attempt)
        if event.state == EXECUTING:
            self.starts.put(key, at)
            published = _published_at(event) if event.attempt == 1 else None
            if published is not None:
                metrics.queue_wait.labels(label, event.step_name).observe(max(0.0, at - published))
        elif event.state in ENDS_ATTEMPT:
            started = self.starts.pop(key)
            if started is not None:
                metrics.run.labels(label, event.step_name).observe(max(0.0, at - started))


_recording = Recording()


def instrument(app: Any) -> None:
    """Count and time ``app``'s workflows in this process (installing baton on it if
    needed). What ``baton_metrics = True`` does; twice is harmless."""
    install(app)
    _recording.add(app)


def uninstrument(app: Any) -> None:
    """Stop counting ``app``'s workflows in this process."""
    _recording.remove(app)


def instrumented(app: Any) -> bool:
    """Whether :func:`instrument` is in effect for ``app`` in this process."""
    return _recording.observes(app)


# --- exposition -----------------------------------------------------------------------


class RunningWorkflows(Collector):
    """``baton_workflows_running{workflow_label}``, counted in the app's store when
    scraped (at most :data:`RUNNING_LIMIT` workflows). A store error is logged and the
    gauge left out of that scrape, rather than reported as zero."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def describe(self) -> Iterable[Metric]:
        return []  # nothing is read from the store when the collector is registered

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.count()
        except Exception as exc:
            log_failure("counting running workflows", exc)
            return
        gauge = GaugeMetricFamily(
            "baton_workflows_running",
            "Workflows not finished yet, by workflow label (read from the store).",
            labels=["workflow_label"],
        )
        for label, count in sorted(counts.items()):
            gauge.add_metric([label], count)
        yield gauge

    def count(self) -> dict[str, int]:
        runtime = runtime_for(self.app) or install(self.app)
        store = runtime.store
        counts: Tally[str] = Tally()
        seen: set[str] = set()
        before: float | None = None
        while len(seen) < RUNNING_LIMIT:
            page = store.workflows(limit=MAX_PAGE, before=before, state="running")
            for summary in page:
                if summary.id not in seen:
                    seen.add(summary.id)
                    counts[summary.label or ""] += 1
            if len(page) < MAX_PAGE:
                break
            before = page[-1].created_at
        return dict(counts)


class _ThisProcess(Collector):
    """This process's own metrics (prometheus-client's default registry)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def registry_for(app: Any, directory: str | None = None) -> CollectorRegistry:
    """A registry to serve: every process's metrics from the multiprocess ``directory``
    (default: ``$PROMETHEUS_MULTIPROC_DIR``), else this process's own, and the running
    workflows of ``app``'s store."""
    directory = directory or os.environ.get(MULTIPROC_ENV)
    registry = CollectorRegistry()
    if directory:
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ThisProcess())
    registry.register(RunningWorkflows(app))
    return registry


def wsgi_app(app: Any, directory: str | None = None) -> Callable[..., Any]:
    """A WSGI application serving :func:`registry_for` ``(app)`` in Prometheus' text
    format: mount it in a web app, or see ``celery baton metrics``."""
    return make_wsgi_app(registry_for(app, directory))  # type: ignore[no-any-return]
