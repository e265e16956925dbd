"""What the OpenTelemetry and Prometheus instrumentation cost on a real prefork worker.

    python bench/bench_observe.py [--workflows 60] [--width 10] [--rounds 3]

Starts a redis-server of its own (broker and store), queues ``--workflows`` workflows
(a root, ``--width`` parallel steps, a join: no-op tasks), then starts a prefork worker
(2 processes) and times it from ready until every workflow finished. Three modes, run
in turn each round:

- ``absent``: opentelemetry and prometheus_client cannot be imported in the worker (as
  if the extras were not installed); baton on;
- ``off``: both importable, ``baton_otel`` / ``baton_metrics`` off;
- ``otel``: ``baton_otel`` on, an SDK tracer provider with a SimpleSpanProcessor and an
  exporter that drops the spans;
- ``metrics``: ``baton_metrics`` on, prometheus-client in multiprocess mode;
- ``on``: both.

Each round runs the modes in a different order (rotated), so that a drift of the
machine's load does not favour one.

It prints each mode's median steps per second and its cost against ``absent``, and the
time the client took to start the workflows (``on``: the trace parent is annotated).

This file is also the worker's app module (``celery -A bench_observe worker``).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

MODES = ("absent", "off", "otel", "metrics", "on")

if os.environ.get("BENCH_OBSERVE") == "absent":
    # As if the extras were not installed: importing them fails.
    sys.modules["opentelemetry"] = None  # type: ignore[assignment]
    sys.modules["prometheus_client"] = None  # type: ignore[assignment]

import redis  # noqa: E402
from celery import Celery, signals  # noqa: E402

import baton_celery  # noqa: E402


def create_app(broker: str, store: str, queue: str, mode: str) -> Celery:
    app = Celery(f"bench-observe-{queue}", set_as_current=False)
    app.conf.update(
        broker_url=broker,
        baton_store=store,
        baton_otel=mode in ("otel", "on"),
        baton_metrics=mode in ("metrics", "on"),
        task_ignore_result=True,
        task_default_queue=queue,
        worker_prefetch_multiplier=4,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
    )

    @app.task(name="bench.noop", shared=False)
    def noop(*_: Any) -> None:
        return None

    assert app.conf.broker_url  # configuration loaded: install turns instrumentation on
    baton_celery.install(app)
    return app


def _drop_spans() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> Any:
            from opentelemetry.sdk.trace.export import SpanExportResult

            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Drop()))
    trace.set_tracer_provider(provider)


if "BENCH_BROKER" in os.environ:
    _mode = os.environ["BENCH_OBSERVE"]
    if _mode in ("otel", "on"):
        _drop_spans()
    app = create_app(
        os.environ["BENCH_BROKER"], os.environ["BENCH_STORE"], os.environ["BENCH_QUEUE"], _mode
    )
    _signals = redis.Redis.from_url(os.environ["BENCH_SIGNALS"])

    def _finished(workflow_id: str, event: Any = None, **_: Any) -> None:
        if isinstance(event, baton_celery.WorkflowFinished):
            _signals.rpush("bench:done", "1")

    def _ready(**_: Any) -> None:
        _signals.rpush("bench:ready", "1")

    def _observe(**_: Any) -> None:
        global _signals
        _signals = redis.Redis.from_url(os.environ["BENCH_SIGNALS"])  # one per process

    baton_celery.subscribe_all(_finished)
    signals.worker_ready.connect(_ready, weak=False)
    signals.worker_process_init.connect(_observe, weak=False)


def _tracing_set() -> bool:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    return isinstance(trace.get_tracer_provider(), TracerProvider)


def run(port: int, mode: str, workflows: int, width: int) -> tuple[float, float]:
    """(steps per second in the worker, seconds the client took to start them)."""
    from baton_celery import Workflow

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    broker, store, signals_url = (f"redis://127.0.0.1:{port}/{n}" for n in (0, 1, 2))
    if mode in ("otel", "on") and not _tracing_set():
        _drop_spans()
    client = create_app(broker, store, queue, mode if mode != "absent" else "off")
    noop = client.signature("bench.noop")
    started = time.perf_counter()
    for w in range(workflows):
        flow = Workflow(label="bench").add("root", noop.clone(args=(w,)))
        for i in range(width):
            flow.add(f"s{i}", noop.clone(args=(w, i)), deps=["root"])
        flow.add("join", noop.clone(args=(w,)), deps=[f"s{i}" for i in range(width)])
        flow.apply_async(app=client)
    starting = time.perf_counter() - started
    db = redis.Redis.from_url(signals_url)
    db.delete("bench:ready", "bench:done")
    with tempfile.TemporaryDirectory(prefix="baton-bench-prom-") as directory:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
            "BENCH_BROKER": broker,
            "BENCH_STORE": store,
            "BENCH_SIGNALS": signals_url,
            "BENCH_QUEUE": queue,
            "BENCH_OBSERVE": mode,
            "PROMETHEUS_MULTIPROC_DIR": directory,
        }
        cmd = [sys.executable, "-m", "celery", "-A", "bench_observe", "worker", "-P",
               "prefork", "-c", "2", "-Q", queue, "-l", "WARNING", "--without-mingle",
               "--without-gossip", "--without-heartbeat", "-n", f"{queue}@%h"]  # fmt: skip
        log = open(os.environ.get("BENCH_WORKER_LOG", os.devnull), "ab")  # noqa: SIM115
        worker = subprocess.Popen(
            cmd, cwd=HERE, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        try:
            assert db.blpop(["bench:ready"], timeout=60) is not None, "worker did not start"
            ready = time.perf_counter()
            for _ in range(workflows):
                assert db.blpop(["bench:done"], timeout=60) is not None, "a workflow hung"
            elapsed = time.perf_counter() - ready
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
            log.close()
            db.close()
            baton_celery.uninstall(client)
            client.close()
    return workflows * (width + 2) / elapsed, starting


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=60)
    parser.add_argument("--width", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from _servers import own_redis

    rates: dict[str, list[float]] = {m: [] for m in MODES}
    starts: dict[str, list[float]] = {m: [] for m in MODES}
    with own_redis() as port:
        for round_ in range(args.rounds):
            for mode in MODES[round_ % len(MODES) :] + MODES[: round_ % len(MODES)]:
                rate, starting = run(port, mode, args.workflows, args.width)
                rates[mode].append(rate)
                starts[mode].append(starting)
                print(f"  {mode:<6} {rate:7.0f} steps/s, started in {starting:.3f} s", flush=True)
    base = statistics.median(rates["absent"])
    steps = args.workflows * (args.width + 2)
    print(f"{args.rounds} rounds of {args.workflows} workflows ({steps} steps), median:")
    for mode in MODES:
        median = statistics.median(rates[mode])
        spread = f"{min(rates[mode]):.0f}-{max(rates[mode]):.0f}"
        start = statistics.median(starts[mode])
        print(
            f"  {mode:<6} {median:7.0f} steps/s (range {spread}), {median / base - 1:+.1%};"
            f" the client started them in {start:.3f} s"
        )


if __name__ == "__main__":
    main()
