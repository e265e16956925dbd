"""The dashboard's figures: first paint of a 1,000-step workflow's page, and live fan-out
to many open pages.

    python bench/bench_dashboard.py [--clients 50] [--events 2000] [--rounds 5]

1. First paint: a 1,000-step workflow (10 layers of 100, finished: 2,000 events in its
   history) served by waitress; Chromium (Debian's, /usr/bin/chromium) opens its page
   ``--rounds`` times. Reported: first contentful paint, the page fully drawn (graph,
   timeline, steps and history), and the graph's layout alone (medians).
2. Fan-out, the dashboard alone: ``celery baton dashboard`` in its own process; this
   process publishes ``--events`` step events (plus the finish) on the broker bridge as
   fast as it can, and ``--clients`` live streams of that workflow read them. Reported:
   events/s delivered (each client, all of them), latency from publish to client.
3. Fan-out, end to end: a real prefork worker (-c 2) runs a workflow of 200 no-op steps
   while ``--clients`` streams and one Chromium page follow it. Reported: latency from
   the worker's event (its store timestamp) to the clients, and to the browser's page.

A redis-server of its own is the broker; the store is a SQLite file (the worker and the
dashboard share it). All on one machine: the clients' threads share its CPUs with the
server, the broker and the worker.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
from celery import Celery, signals

import baton_celery
from baton_celery import StepUpdated, Workflow, WorkflowFinished
from baton_celery.bridge import publish
from baton_celery.dashboard import DashboardConfig, make_server
from baton_celery.runtime import runtime_for
from baton_celery.stores.records import StepRecord, WorkflowRecord

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
TIMEOUT = 120.0

# --- the app: the worker's and the dashboard's (configured by environment) -------------


def create_app(broker: str, store: str, queue: str) -> Celery:
    app = Celery("bench_dashboard", set_as_current=False)
    app.conf.update(
        broker_url=broker,
        baton_store=store,
        baton_bridge=True,
        baton_bridge_exchange=f"{queue}-events",
        task_default_queue=queue,
        task_ignore_result=True,
        worker_prefetch_multiplier=8,
        worker_redirect_stdouts=False,
    )

    @app.task(name="bench.noop", shared=False)
    def noop() -> None:
        return None

    @app.task(name="bench.hold", shared=False)
    def hold(key: str) -> None:
        """Wait until the benchmark says go (its clients are connected)."""
        client = redis.Redis.from_url(broker)
        try:
            client.blpop([key], timeout=60)
        finally:
            client.close()

    baton_celery.install(app)
    return app


if "BENCH_DASH_BROKER" in os.environ:
    env = os.environ
    app = create_app(env["BENCH_DASH_BROKER"], env["BENCH_DASH_STORE"], env["BENCH_DASH_QUEUE"])

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        client = redis.Redis.from_url(os.environ["BENCH_DASH_BROKER"])
        client.rpush(os.environ["BENCH_DASH_READY"], "1")
        client.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def spread(ms: list[float]) -> str:
    return f"p50 {statistics.median(ms):.1f} ms, p99 {pct(ms, 99):.1f} ms, max {max(ms):.1f} ms"


def thousand_steps() -> dict[str, list[str]]:
    shape: dict[str, list[str]] = {}
    previous: list[str] = []
    for layer in range(10):
        current = [f"layer{layer}-step-{k:03d}" for k in range(100)]
        for k, name in enumerate(current):
            shape[name] = list(dict.fromkeys([previous[k], previous[0]])) if previous else []
        previous = current
    return shape


def store_workflow(store: Any, shape: dict[str, list[str]], label: str) -> str:
    workflow_id = str(uuid.uuid4())
    steps = {
        name: StepRecord(name, f"bench.{name}", str(uuid.uuid4()), {}, tuple(deps))
        for name, deps in shape.items()
    }
    store.create(WorkflowRecord(id=workflow_id, label=label, steps=steps))
    return workflow_id


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        raise SystemExit(f"{CHROMIUM} is missing: scripts/ensure-chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


# --- 1. first paint -------------------------------------------------------------------


def bench_first_paint(rounds: int) -> None:
    app = Celery("bench-first-paint", set_as_current=False)
    app.conf.update(broker_url="memory://", baton_store="memory://")
    store = baton_celery.install(app).store
    shape = thousand_steps()
    workflow_id = store_workflow(store, shape, "one thousand steps")
    for name in shape:
        store.begin(workflow_id, name, 1)
        store.settle(workflow_id, name, "completed")
    server = make_server(app, DashboardConfig(port=0), listen=False)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"{server.url}workflows/{workflow_id}"
    fcp, ready, graph = [], [], []
    try:
        with chromium() as browser:
            for _ in range(rounds):
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                response = page.goto(url)
                assert response is not None and response.ok
                size = len(response.body())
                page.wait_for_function("performance.getEntriesByName('baton-ready').length")
                page.wait_for_function("performance.getEntriesByType('paint').length >= 2")
                paints = page.evaluate(
                    "Object.fromEntries(performance.getEntriesByType('paint')"
                    ".map(p => [p.name, p.startTime]))"
                )
                fcp.append(paints["first-contentful-paint"])
                ready.append(
                    page.evaluate("performance.getEntriesByName('baton-ready')[0].startTime")
                )
                graph.append(
                    page.evaluate("performance.getEntriesByName('baton-graph')[0].duration")
                )
                page.close()
    finally:
        server.stop()
        thread.join(TIMEOUT)
        baton_celery.uninstall(app)
    print(
        f"1,000-step page ({size / 1e6:.2f} MB served): first contentful paint "
        f"{statistics.median(fcp):.0f} ms, fully drawn {statistics.median(ready):.0f} ms, "
        f"graph layout {statistics.median(graph):.0f} ms (medians of {rounds}; from navigation)"
    )


# --- live clients -------------------------------------------------------------------


class Client(threading.Thread):
    """One live page's stream, read on a thread: when each event arrived."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.arrived: dict[int, float] = {}  # seq -> when it was read
        self.stamps: dict[int, float] = {}  # seq -> the event's own timestamp
        self.connected = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        host, port = self.url.split("//")[1].split("/")[0].split(":")
        path = "/" + self.url.split("//")[1].split("/", 1)[1]
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"{path}: {response.status} {response.read()[:200]!r}")
            self.connected.set()
            kind = ""
            while True:
                line = response.readline()
                if not line:
                    return
                if line.startswith(b"event: "):
                    kind = line[7:].strip().decode()
                elif line.startswith(b"data: "):
                    if kind == "end":
                        return
                    now = time.time()
                    data = json.loads(line[6:])
                    self.arrived[data["seq"]] = now
                    stamp = datetime.fromisoformat(data["timestamp"]).timestamp()
                    self.stamps[data["seq"]] = stamp
        except BaseException as exc:
            self.error = exc
        finally:
            conn.close()
            self.connected.set()
            self.done.set()


def open_clients(url: str, count: int) -> list[Client]:
    clients = [Client(url) for _ in range(count)]
    for client in clients:
        client.start()
    for client in clients:
        client.connected.wait(TIMEOUT)
        if client.error is not None:
            raise SystemExit(f"a client failed: {client.error!r}")
    return clients


def close_clients(clients: list[Client]) -> None:
    for client in clients:
        if not client.done.wait(TIMEOUT):
            raise SystemExit("a client did not get the whole stream")
        if client.error is not None:
            raise SystemExit(f"a client failed: {client.error!r}")


@contextlib.contextmanager
def environment() -> Iterator[dict[str, str]]:
    """A redis-server of its own (the broker), a SQLite store, unique names."""
    sys.path.insert(0, str(HERE))
    from _servers import own_redis

    with own_redis() as port, tempfile.TemporaryDirectory(prefix="baton-bench-") as tmp:
        run = uuid.uuid4().hex[:8]
        yield {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
            "BENCH_DASH_BROKER": f"redis://127.0.0.1:{port}/0",
            "BENCH_DASH_STORE": f"sqlite:///{tmp}/store.sqlite3",
            "BENCH_DASH_QUEUE": f"bench-dashboard-{run}",
            "BENCH_DASH_READY": f"bench-dashboard-{run}:ready",
            "BENCH_DASH_TMP": tmp,
        }


@contextlib.contextmanager
def process(env: dict[str, str], name: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    log = open(os.path.join(env["BENCH_DASH_TMP"], f"{name}.log"), "w")  # noqa: SIM115
    cmd = [sys.executable, "-m", "celery", "-A", "bench_dashboard", *args]
    child = subprocess.Popen(
        cmd, cwd=HERE, env=env, stdout=log, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield child
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        assert child.stderr is not None
        child.stderr.close()
        log.close()


@contextlib.contextmanager
def dashboard(env: dict[str, str]) -> Iterator[str]:
    """``celery baton dashboard`` in its own process; the address it serves."""
    with process(env, "dashboard", "baton", "dashboard", "--port", "0") as child:
        assert child.stderr is not None
        for line in child.stderr:
            if line.startswith("baton dashboard: serving "):
                # Keep reading what it logs, or a full pipe would stall it.
                threading.Thread(target=child.stderr.read, daemon=True).start()
                yield line.split()[3]
                return
        raise SystemExit("the dashboard did not start")


def rate_and_latency(clients: list[Client], start: float) -> tuple[int, float, list[float]]:
    """Events delivered, events/s in all, and each event's latency (ms) for the events
    made after ``start`` (earlier ones came from the store's history on connect)."""
    delivered = sum(len(c.arrived) for c in clients)
    last = max(max(c.arrived.values()) for c in clients)
    latency = [
        (c.arrived[seq] - c.stamps[seq]) * 1000
        for c in clients
        for seq in c.arrived
        if c.stamps[seq] >= start
    ]
    return delivered, delivered / (last - start), latency


# --- 2. fan-out, the dashboard alone ----------------------------------------------------


def publish_flat_out(broker: str, store: str, queue: str, workflow_id: str, events: int) -> None:
    """In a process of its own (so that the clients' threads are not starved): publish
    ``events`` step events and the finish on the bridge, as fast as it goes."""
    app = create_app(broker, store, queue)
    runtime = runtime_for(app)
    assert runtime is not None
    for seq in range(1, events + 1):
        state = "executing" if seq % 2 else "retryable"
        publish(runtime, StepUpdated(
            workflow_id, "fan-out", "step", "bench.step", state, None, seq, False, None,
            datetime.now(timezone.utc), seq,
        ))  # fmt: skip
    now = datetime.now(timezone.utc)
    publish(runtime, WorkflowFinished(workflow_id, "fan-out", "completed", (), now, events + 1))
    baton_celery.uninstall(app)
    app.close()


def bench_fanout(clients_count: int, events: int) -> None:
    with environment() as env:
        names = env["BENCH_DASH_BROKER"], env["BENCH_DASH_STORE"], env["BENCH_DASH_QUEUE"]
        app = create_app(*names)
        runtime = runtime_for(app)
        assert runtime is not None
        workflow_id = store_workflow(runtime.store, {"step": []}, "fan-out")
        try:
            with dashboard(env) as url:
                clients = open_clients(f"{url}api/workflows/{workflow_id}/stream", clients_count)
                publisher = multiprocessing.get_context("spawn").Process(
                    target=publish_flat_out, args=(*names, workflow_id, events)
                )
                publisher.start()
                publisher.join(TIMEOUT)
                close_clients(clients)
        finally:
            baton_celery.uninstall(app)
            app.close()
    stamps = clients[0].stamps  # when each event was published
    start, sent = min(stamps.values()), max(stamps.values())
    delivered, rate, latency = rate_and_latency(clients, start)
    expected = clients_count * (events + 1)
    print(
        f"fan-out, dashboard alone: {events + 1} events published by another process in "
        f"{sent - start:.2f} s to {clients_count} streams: {delivered} of {expected} "
        f"delivered, {rate:.0f} events/s in all ({rate / clients_count:.0f}/s per stream); "
        f"publish to client {spread(latency)}"
    )


# --- 3. fan-out, end to end -------------------------------------------------------------


def bench_end_to_end(clients_count: int, steps: int = 200) -> None:
    with environment() as env:
        app = create_app(env["BENCH_DASH_BROKER"], env["BENCH_DASH_STORE"], env["BENCH_DASH_QUEUE"])
        broker = redis.Redis.from_url(env["BENCH_DASH_BROKER"])
        worker_args = ["worker", "-P", "prefork", "-c", "2", "-l", "WARNING",
                       "--without-mingle", "--without-gossip", "--without-heartbeat"]  # fmt: skip
        try:
            with process(env, "worker", *worker_args), dashboard(env) as url:
                if broker.blpop([env["BENCH_DASH_READY"]], timeout=60) is None:
                    raise SystemExit("the worker did not start")
                gate = f"{env['BENCH_DASH_QUEUE']}:go"
                workflow = Workflow(label="end to end").add("gate", app.tasks["bench.hold"].s(gate))
                for k in range(steps):
                    workflow.add(f"step-{k:03d}", app.tasks["bench.noop"].s(), deps=["gate"])
                handle = workflow.apply_async(app=app)
                page_url = f"{url}workflows/{handle.id}"
                clients = open_clients(f"{url}api/workflows/{handle.id}/stream", clients_count)
                with chromium() as browser:
                    page = browser.new_page()
                    page.add_init_script(SEEN_IN_THE_PAGE)
                    page.goto(page_url)
                    page.wait_for_selector('#live[data-live="live"]')
                    start = time.time()
                    broker.rpush(gate, "go")
                    page.wait_for_selector('#live[data-live="finished"]', timeout=TIMEOUT * 1000)
                    seen = page.evaluate("window.batonSeen")
                close_clients(clients)
                history = {e.seq: e.timestamp.timestamp() for e in handle.events()}
        finally:
            broker.close()
            baton_celery.uninstall(app)
            app.close()
    delivered, rate, latency = rate_and_latency(clients, start)
    in_page = [
        (at - history[int(seq)]) * 1000
        for seq, at in seen.items()
        if history.get(int(seq), 0) >= start
    ]
    print(
        f"end to end, {steps} steps on a prefork worker, {clients_count} streams: "
        f"{delivered} events delivered, {rate:.0f} events/s in all; "
        f"worker's event to client {spread(latency)}"
    )
    print(f"end to end, the same in Chromium: worker's event to the page's DOM {spread(in_page)}")


#: Run in the page before its own scripts: when each history entry appears (by seq).
SEEN_IN_THE_PAGE = """
window.batonSeen = {};
new MutationObserver(records => {
  const now = Date.now() / 1000;
  for (const r of records) for (const n of r.addedNodes)
    if (n.dataset && n.dataset.seq && !(n.dataset.seq in window.batonSeen))
      window.batonSeen[n.dataset.seq] = now;
}).observe(document, {childList: true, subtree: true});
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50, help="live streams")
    parser.add_argument("--events", type=int, default=2000, help="events in the fan-out")
    parser.add_argument("--rounds", type=int, default=5, help="page loads for first paint")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} CPUs; broker: a redis-server of its own; store: SQLite")
    bench_first_paint(args.rounds)
    bench_fanout(args.clients, args.events)
    bench_end_to_end(args.clients)


if __name__ == "__main__":
    main()
