"""OpenTelemetry spans and Prometheus metrics from real prefork workers (two pool
processes each): what a user's tracing backend and dashboards would get.

Spans: every process (this client, each worker's processes) exports to JSON-lines files
(see span_lines.py). Metrics: the workers write prometheus-client's multiprocess files,
and ``celery baton metrics`` serves them over HTTP, scraped here.

What the instrumentation makes of a step's events is written before that step's
task_postrun (its receivers run in the settle, and the finish in the last settle): a
test waits for every step's final task_postrun (see :func:`settled`), not for the sink's
copy of the events, which another receiver forwards in no particular order.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import HERE, WAIT, Cluster, Steps
from opentelemetry import trace
from prometheus_client.parser import text_string_to_metric_families
from span_lines import read_spans, trace_to

from baton_celery import Workflow, WorkflowHandle


@pytest.fixture(scope="module")
def client_spans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This process's spans (the workflows' start), to a file of its own."""
    path = tmp_path_factory.mktemp("otel-client") / "client.jsonl"
    trace_to(path)
    return path


def diamond(steps: Steps, block: bool = False) -> Workflow:
    """a -> (b, c) -> d; b and c block until released when ``block``."""
    return (
        Workflow(label="diamond")
        .add("a", steps.s("a"))
        .add("b", steps.s("b", block=block), deps=["a"])
        .add("c", steps.s("c", block=block), deps=["a"])
        .add("d", steps.s("d"), deps=["b", "c"])
    )


def failing(steps: Steps) -> Workflow:
    """x fails once (retried) -> y; x -> z (always fails) -> w (cancelled)."""
    return (
        Workflow(label="failing")
        .add("x", steps.s("x", fail_times=1))
        .add("y", steps.s("y"), deps=["x"])
        .add("z", steps.s("z", fail_forever=True), deps=["x"])
        .add("w", steps.s("w"), deps=["z"])
    )


FINAL = ("SUCCESS", "FAILURE")


def settled(cluster: Cluster, *handles: WorkflowHandle) -> None:
    """Wait until each workflow finished and every step that ran reached its final
    task_postrun: then every span and count of its events is written."""
    for handle in handles:
        cluster.events_until_finish(handle.id)
    ran = [
        step.job_id
        for handle in handles
        for step in WorkflowHandle(handle.id, cluster.app).status().steps.values()
        if step.attempt > 0
    ]
    cluster.wait_postruns(
        lambda by_task: all(any(s in FINAL for s in by_task.get(j, ())) for j in ran),
        "every step's final task_postrun",
    )


def of(spans: list[dict[str, Any]], workflow_id: str) -> dict[str, list[dict[str, Any]]]:
    """The workflow's spans by name, attempts in order."""
    found: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        if span["attributes"].get("baton.workflow.id") == workflow_id:
            found.setdefault(span["name"], []).append(span)
    for named in found.values():
        named.sort(key=lambda s: s["attributes"].get("baton.step.attempt", 0))
    return found


def test_one_trace_per_workflow_across_two_pool_processes(
    make_cluster: Callable[..., Cluster], tmp_path: Path, client_spans: Path
) -> None:
    workers_file = tmp_path / "workers.jsonl"
    cluster = make_cluster("otel", "redis", store="redis", otel_spans=str(workers_file))
    steps = cluster.steps()
    with trace.get_tracer("the user's code").start_as_current_span("caller") as caller:
        dia = diamond(steps, block=True).apply_async()
    # b and c block at once: one in each pool process.
    pids = {steps.wait_started("b"), steps.wait_started("c")}
    assert len(pids) == 2
    steps.release("b")
    steps.release("c")
    fail = failing(steps).apply_async()  # no span is current: a start span is made
    settled(cluster, dia, fail)
    spans = read_spans(workers_file, client_spans)

    # The diamond: children of the caller's span, in its trace.
    found = of(spans, dia.id)
    assert sorted(found) == [
        "baton.step a",
        "baton.step b",
        "baton.step c",
        "baton.step d",
        "baton.workflow diamond",
    ]
    assert all(len(named) == 1 for named in found.values())
    context = caller.get_span_context()
    every = [s for named in found.values() for s in named]
    assert {s["trace_id"] for s in every} == {f"{context.trace_id:032x}"}
    assert {s["parent_id"] for s in every} == {f"{context.span_id:016x}"}
    (a,), (b,), (c,), (d,) = (found[f"baton.step {n}"] for n in "abcd")
    assert a["links"] == []
    assert b["links"] == c["links"] == [a["span_id"]]
    assert sorted(d["links"]) == sorted([b["span_id"], c["span_id"]])
    assert {b["pid"], c["pid"]} == pids  # each recorded by the process that ran it
    assert all(s["status"] == "UNSET" for s in every)
    (flow,) = found["baton.workflow diamond"]
    assert flow["attributes"]["baton.workflow.outcome"] == "completed"
    assert flow["pid"] in pids  # the pool process that settled d won the finish
    assert flow["start"] <= a["start"] and flow["end"] >= d["end"]

    # The failing one: under the start span this process made.
    found = of(spans, fail.id)
    (start,) = found.pop("baton.workflow.start")
    assert start["parent_id"] is None and start["pid"] == os.getpid()
    every = [s for named in found.values() for s in named]
    assert {s["trace_id"] for s in every} == {start["trace_id"]}
    assert {s["parent_id"] for s in every} == {start["span_id"]}
    assert sorted(found) == [
        "baton.step x",
        "baton.step y",
        "baton.step z",
        "baton.workflow failing",
    ]  # w was cancelled before it ran: no attempt, no span
    x1, x2 = found["baton.step x"]
    assert x1["attributes"]["baton.step.state"] == "retryable"
    assert x1["status"] == "ERROR" and x1["description"] == "RuntimeError: x flaked"
    assert [e["name"] for e in x1["events"]] == ["exception"]
    assert x2["attributes"]["baton.step.state"] == "completed" and x2["status"] == "UNSET"
    (y,), (z,) = found["baton.step y"], found["baton.step z"]
    assert y["links"] == z["links"] == [x2["span_id"]]
    assert z["status"] == "ERROR" and z["attributes"]["baton.step.state"] == "discarded"
    (raised,) = z["events"]
    assert raised["attributes"]["exception.type"] == "ValueError"
    assert "z is broken" in raised["attributes"]["exception.stacktrace"]
    (flow,) = found["baton.workflow failing"]
    assert flow["status"] == "ERROR"
    assert flow["attributes"]["baton.workflow.outcome"] == "failed"
    assert flow["attributes"]["baton.workflow.failed_steps"] == ["z", "w"]
    assert flow["attributes"]["baton.workflow.step_count"] == 4
    assert {s["pid"] for s in every} <= {p for p in {s["pid"] for s in spans} if p != os.getpid()}


# --- metrics -----------------------------------------------------------------------------


@pytest.fixture
def serve_metrics() -> Iterator[Callable[[Cluster], str]]:
    """``serve(cluster)``: ``celery baton metrics --port 0`` for the cluster's app; its
    URL once it listens. Stopped at teardown."""
    servers: list[subprocess.Popen[bytes]] = []

    def serve(cluster: Cluster) -> str:
        cmd = [sys.executable, "-m", "celery", "-A", "worker_app", "baton", "metrics"]
        server = subprocess.Popen(
            [*cmd, "--port", "0"],
            cwd=HERE,
            env=cluster.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        servers.append(server)
        assert server.stderr is not None
        said = b""
        deadline = time.monotonic() + WAIT
        with selectors.DefaultSelector() as selector:
            selector.register(server.stderr, selectors.EVENT_READ)
            while b"serving metrics on " not in said or not said.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise AssertionError(f"celery baton metrics did not listen: {said!r}")
                chunk = os.read(server.stderr.fileno(), 4096)
                if not chunk:
                    raise AssertionError(f"celery baton metrics exited: {said!r}")
                said += chunk
        line = said.decode().split("serving metrics on ", 1)[1]
        return line.split()[0]

    try:
        yield serve
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=10)
            if server.stderr is not None:
                server.stderr.close()


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}} of one scrape."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            if "le" not in sample.labels:
                samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def by(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def test_metrics_scraped_over_http_match_the_run(
    make_cluster: Callable[..., Cluster],
    tmp_path: Path,
    serve_metrics: Callable[[Cluster], str],
) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    cluster = make_cluster("metrics", "redis", metrics_dir=str(directory))
    steps = cluster.steps()
    dia, fail = diamond(steps).apply_async(), failing(steps).apply_async()
    settled(cluster, dia, fail)
    held = Workflow(label="held").add("h", steps.s("h", block=True)).apply_async()
    steps.wait_started("h")
    try:
        found = scrape(serve_metrics(cluster))
        assert WorkflowHandle(held.id, cluster.app).status().outcome is None
    finally:
        steps.release("h")

    events = {
        ("diamond", step, state): 1.0 for step in "abcd" for state in ("executing", "completed")
    }
    events.update(
        {
            ("failing", "x", "executing"): 2.0,
            ("failing", "x", "retryable"): 1.0,
            ("failing", "x", "completed"): 1.0,
            ("failing", "y", "executing"): 1.0,
            ("failing", "y", "completed"): 1.0,
            ("failing", "z", "executing"): 1.0,
            ("failing", "z", "discarded"): 1.0,
            ("failing", "w", "cancelled"): 1.0,
            ("held", "h", "executing"): 1.0,
        }
    )
    assert found["baton_step_events_total"] == {
        by(workflow_label=label, step=step, state=state): count
        for (label, step, state), count in events.items()
    }
    assert found["baton_workflows_finished_total"] == {
        by(workflow_label="diamond", outcome="completed"): 1.0,
        by(workflow_label="failing", outcome="failed"): 1.0,
    }
    assert found["baton_workflow_duration_seconds_count"] == {
        by(workflow_label="diamond"): 1.0,
        by(workflow_label="failing"): 1.0,
    }
    ran = {("diamond", s): 1.0 for s in "abcd"}
    assert found["baton_step_run_seconds_count"] == {
        by(workflow_label=label, step=step): count
        for (label, step), count in {
            **ran,
            ("failing", "x"): 2.0,
            ("failing", "y"): 1.0,
            ("failing", "z"): 1.0,
        }.items()
    }
    assert found["baton_step_queue_wait_seconds_count"] == {
        by(workflow_label=label, step=step): 1.0
        for label, step in [*ran, ("failing", "x"), ("failing", "y"), ("failing", "z"),
                            ("held", "h")]
    }  # fmt: skip
    assert found["baton_workflows_running"] == {by(workflow_label="held"): 1.0}
