"""Cross-process event benchmark for the broker bridge.

    python bench/bench_events.py [--broker redis://127.0.0.1:6379/9] [--workflows 300]

Starts a real ``celery worker`` (prefork, 2 processes) on the broker with the SQLite
store and the bridge on, and a listener in this process. It prints:

1. finish latency: from the last step settling in a worker (the finish claim's time in
   the store transition, which is the WorkflowFinished timestamp) to WorkflowFinished
   arriving in this process's receiver; p50 / p99 over sequential one-step workflows,
   for background-thread publishing and for publishing inline in the task;
2. the hot-path cost: wall time of fan-out workflows (20 parallel no-op steps each) with
   the bridge off, background and inline;
3. listener throughput: events per second one listener delivers while two processes
   publish envelopes as fast as they can.

This file is also the worker's app module (``celery -A bench_events worker``).
"""

from __future__ import annotations

import argparse
import contextlib
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from celery import Celery, signals  # noqa: E402

import baton_celery  # noqa: E402
from baton_celery.envelope import bridge_exchange  # noqa: E402
from baton_celery.events import StepUpdated, WorkflowFinished, utcnow  # noqa: E402
from baton_celery.listener import Listener  # noqa: E402


def create_app(
    broker: str, store: str, queue: str, exchange: str, background: bool, bridge: bool = True
) -> Celery:
    app = Celery(f"bench-{queue}")
    app.conf.update(
        broker_url=broker,
        baton_store=store,
        baton_bridge=bridge,
        baton_bridge_exchange=exchange,
        baton_bridge_background=background,
        task_ignore_result=True,
        task_default_queue=queue,
        worker_prefetch_multiplier=8,
        worker_redirect_stdouts=False,
    )

    @app.task(name="bench.noop", shared=False)
    def noop() -> None:
        return None

    baton_celery.install(app)
    return app


if "BENCH_BROKER" in os.environ:
    app = create_app(
        os.environ["BENCH_BROKER"],
        os.environ["BENCH_STORE"],
        os.environ["BENCH_QUEUE"],
        os.environ["BENCH_EXCHANGE"],
        os.environ["BENCH_BACKGROUND"] == "1",
        os.environ["BENCH_BRIDGE"] == "1",
    )

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        redis.Redis.from_url(os.environ["BENCH_SINK"]).rpush(os.environ["BENCH_READY"], "1")


class Worker:
    def __init__(self, broker: str, sink: str, background: bool, bridge: bool) -> None:
        self.id = uuid.uuid4().hex[:8]
        self.tmp = tempfile.mkdtemp(prefix="baton-bench-")
        self.broker, self.sink = broker, sink
        self.store = f"sqlite:///{self.tmp}/store.sqlite3"
        self.queue = f"bench-{self.id}"
        self.exchange = f"bench-{self.id}-events"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
            "BENCH_BROKER": broker,
            "BENCH_STORE": self.store,
            "BENCH_QUEUE": self.queue,
            "BENCH_EXCHANGE": self.exchange,
            "BENCH_BACKGROUND": "1" if background else "0",
            "BENCH_BRIDGE": "1" if bridge else "0",
            "BENCH_SINK": sink,
            "BENCH_READY": f"bench:{self.id}:ready",
        }
        self.app = create_app(broker, self.store, self.queue, self.exchange, background, bridge)
        cmd = [
            sys.executable, "-m", "celery", "-A", "bench_events", "worker", "-P", "prefork",
            "-c", "2", "-Q", self.queue, "-l", "WARNING", "--without-mingle",
            "--without-gossip", "--without-heartbeat", "-n", f"{self.id}@%h",
        ]  # fmt: skip
        self.log = open(os.path.join(self.tmp, "worker.log"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            cmd, cwd=HERE, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        if redis.Redis.from_url(sink).blpop([env["BENCH_READY"]], timeout=60) is None:
            raise SystemExit(f"worker did not start; see {self.tmp}/worker.log")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()
        with self.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(self.queue)
            conn.default_channel.exchange_delete(self.exchange)
        self.app.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def bench_latency(broker: str, sink: str, background: bool, runs: int) -> list[float]:
    worker = Worker(broker, sink, background, bridge=True)
    latencies: list[float] = []
    arrived = threading.Event()

    def deliver(event: Any) -> None:
        if isinstance(event, WorkflowFinished):
            latencies.append(time.time() - event.timestamp.timestamp())
            arrived.set()

    try:
        with Listener(worker.app, deliver=deliver) as listener:
            assert listener.wait_ready(10)
            noop = worker.app.tasks["bench.noop"]
            for i in range(runs + 20):
                arrived.clear()
                baton_celery.Workflow(label="lat").add("only", noop.s()).apply_async(worker.app)
                if not arrived.wait(30):
                    raise SystemExit("a WorkflowFinished did not arrive")
                if i < 20:  # warm-up: connections, first forks
                    latencies.clear()
    finally:
        worker.stop()
    return latencies


def bench_fanout(broker: str, sink: str, mode: str, workflows: int, width: int) -> float:
    worker = Worker(broker, sink, background=(mode == "background"), bridge=(mode != "off"))
    try:
        noop = worker.app.tasks["bench.noop"]

        def run(n: int) -> float:
            start = time.perf_counter()
            handles = []
            for _ in range(n):
                wf = baton_celery.Workflow(label="fan")
                for j in range(width):
                    wf.add(f"s{j}", noop.s())
                handles.append(wf.apply_async(worker.app))
            for h in handles:
                h.wait(timeout=300)
            return time.perf_counter() - start

        run(3)  # warm-up
        return run(workflows)
    finally:
        worker.stop()


def _publisher(broker: str, exchange: str, count: int, tag: str) -> None:
    app = Celery("bench-pub", broker=broker)
    ex = bridge_exchange(exchange)
    with app.connection_for_write() as conn:
        producer = conn.Producer()
        per = 10  # events per workflow: 9 step events and a finish
        batch: Any = getattr(producer, "batch", None)  # kombu >= 5.7: pipelined publishing
        scope = batch(max_size=200) if batch is not None else contextlib.nullcontext()
        with scope:
            _publish(producer, ex, count, tag, per)


def _publish(producer: Any, ex: Any, count: int, tag: str, per: int) -> None:
    for i in range(count):
        wid, seq = f"{tag}-{i // per}", i % per + 1
        if seq == per:
            event: Any = WorkflowFinished(wid, None, "completed", (), utcnow())
        else:
            event = StepUpdated(
                wid, None, f"s{seq}", "t", "completed", "j", 1, True, None, utcnow()
            )
        body = {"v": 1, "seq": seq, "origin": tag, "event": event.to_dict()}
        producer.publish(
            json.dumps(body), exchange=ex, routing_key="", declare=[ex],
            content_type="application/json", content_encoding="utf-8", delivery_mode=1,
        )  # fmt: skip


def bench_listener(broker: str, per_publisher: int, publishers: int) -> tuple[float, int, int]:
    exchange = f"bench-{uuid.uuid4().hex[:8]}-flood"
    app = Celery("bench-listen", broker=broker)
    total = per_publisher * publishers
    times: list[float] = []
    done = threading.Event()

    def deliver(event: Any) -> None:
        times.append(time.perf_counter())
        if len(times) >= total:
            done.set()

    with Listener(app, exchange=exchange, deliver=deliver) as listener:
        assert listener.wait_ready(10)
        ctx = multiprocessing.get_context("spawn")
        procs = [
            ctx.Process(target=_publisher, args=(broker, exchange, per_publisher, f"p{i}"))
            for i in range(publishers)
        ]
        for p in procs:
            p.start()
        done.wait(120)
        for p in procs:
            p.join()
        received = len(times)
    with app.connection_for_write() as conn:
        conn.default_channel.exchange_delete(exchange)
    rate = (received - 1) / (times[-1] - times[0]) if received > 1 else 0.0
    return rate, received, total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--sink", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--workflows", type=int, default=300, help="latency samples")
    parser.add_argument("--fanout", type=int, default=40, help="fan-out workflows per mode")
    parser.add_argument("--events", type=int, default=20000, help="listener flood, per publisher")
    parser.add_argument("--only-listener", action="store_true", help="just part 3")
    args = parser.parse_args(argv)
    print(f"broker {args.broker}; worker: prefork -c 2; store: SQLite; {os.cpu_count()} CPUs")

    if args.only_listener:
        rate, received, total = bench_listener(args.broker, args.events, 2)
        print(f"listener throughput: {rate:.0f} events/s delivered ({received} of {total})")
        return
    for background in (True, False):
        lat = [x * 1000 for x in bench_latency(args.broker, args.sink, background, args.workflows)]
        mode = "background thread" if background else "inline in the task"
        print(
            f"finish latency, {mode:<18}: p50 {statistics.median(lat):.2f} ms  "
            f"p99 {pct(lat, 99):.2f} ms  max {max(lat):.2f} ms  (n={len(lat)})"
        )

    width = 20
    for mode in ("off", "background", "inline"):
        wall = bench_fanout(args.broker, args.sink, mode, args.fanout, width)
        steps = args.fanout * width
        print(
            f"fan-out {args.fanout} x {width} steps, bridge {mode:<10}: {wall:.2f} s "
            f"({steps / wall:.0f} steps/s)"
        )

    rate, received, total = bench_listener(args.broker, args.events, 2)
    print(f"listener throughput: {rate:.0f} events/s delivered ({received} of {total} received)")


if __name__ == "__main__":
    main()
