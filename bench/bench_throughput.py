"""Throughput and latency of baton_celery on a real prefork worker (-c 2), Redis broker,
no-op tasks, results ignored, side by side with bare Celery in one run:

- N workflow steps (workflows x parallel steps) with baton on the Redis store, vs N bare
  tasks, vs N bare tasks with Celery's task events on (-E): tasks/s and ratios to bare;
- a sequential workflow of 20 steps vs the same 20 tasks as a chain: wall time.

Run: python bench/bench_throughput.py [--workflows 100 --width 20 --rounds 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _servers import own_redis  # noqa: E402

SCENARIOS = ("bare", "bare -E", "baton")


class Worker:
    def __init__(self, port: int, queue: str, mode: str, events: bool) -> None:
        self.db = redis.Redis(port=port, db=2)
        self.db.delete("bench:ready", "bench:done")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]),
            "BENCH_BROKER": f"redis://127.0.0.1:{port}/0",
            "BENCH_STORE": f"redis://127.0.0.1:{port}/1",
            "BENCH_SIGNALS": f"redis://127.0.0.1:{port}/2",
            "BENCH_QUEUE": queue,
            "BENCH_BATON": mode,
        }
        cmd = [sys.executable, "-m", "celery", "-A", "bench_app", "worker", "-P", "prefork",
               "-c", "2", "-Q", queue, "-l", "WARNING", "--without-mingle",
               "--without-gossip", "--without-heartbeat", "-n", f"{queue}@%h"]  # fmt: skip
        if events:
            cmd.append("-E")
        self.process = subprocess.Popen(
            cmd, cwd=HERE, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if self.db.blpop(["bench:ready"], timeout=60) is None:
            self.stop()
            raise RuntimeError("the benchmark worker did not start")
        self.ready_at = time.time()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def client_app(port: int, queue: str, baton: bool) -> Any:
    from celery import Celery

    import baton_celery

    app = Celery(f"bench-client-{queue}", set_as_current=False)
    app.conf.update(
        broker_url=f"redis://127.0.0.1:{port}/0",
        task_default_queue=queue,
        task_ignore_result=True,
    )
    if baton:
        app.conf.baton_store = f"redis://127.0.0.1:{port}/1"
        baton_celery.install(app)
    return app


def drained(broker: redis.Redis, queue: str) -> bool:
    pipe = broker.pipeline(transaction=False)
    pipe.llen(queue)
    pipe.hlen("unacked")
    length, unacked = pipe.execute()
    return int(length) == 0 and int(unacked) == 0


def throughput(port: int, scenario: str, workflows: int, width: int) -> float:
    from baton_celery import Workflow

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    baton = scenario == "baton"
    app = client_app(port, queue, baton)
    noop = app.signature("bench.noop")
    ids = []
    if baton:
        for w in range(workflows):
            flow = Workflow(label="bench")
            for i in range(width):
                flow.add(f"s{i}", noop.clone(args=(w, i)))
            ids.append(flow.apply_async(app=app).id)
    else:
        with app.producer_or_acquire() as producer:
            for w in range(workflows):
                for i in range(width):
                    noop.clone(args=(w, i)).apply_async(producer=producer)
    broker = redis.Redis(port=port, db=0)
    worker = Worker(port, queue, "1" if baton else "0", events=scenario == "bare -E")
    try:
        while not drained(broker, queue):
            time.sleep(0.02)  # polling the queue's length: 20 ms keeps the poll off the CPU
        elapsed = time.time() - worker.ready_at
    finally:
        worker.stop()
    if baton:  # every workflow must have finished, exactly as the worker claimed
        from baton_celery.runtime import runtime_for

        store = runtime_for(app).store  # type: ignore[union-attr]
        outcomes = [store.load(i).outcome for i in ids]
        assert outcomes == ["completed"] * workflows, outcomes
    broker.delete(queue)
    return workflows * width / elapsed


def sequential(port: int, steps: int, reps: int) -> tuple[list[float], list[float]]:
    from celery import chain

    from baton_celery import Workflow

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    app = client_app(port, queue, baton=True)
    noop, last = app.signature("bench.noop"), app.signature("bench.last")
    worker = Worker(port, queue, "1", events=False)
    signals_db = worker.db
    flows, chains = [], []
    try:
        for rep in range(reps + 2):  # the first two warm the pool up
            flow = Workflow(label="seq")
            for i in range(steps):
                flow.add(f"s{i}", noop.clone(args=(i,)), deps=[f"s{i - 1}"] if i else [])
            started = time.time()
            flow.apply_async(app=app)
            popped = signals_db.blpop(["bench:done"], timeout=60)
            assert popped is not None, "the workflow did not finish"
            if rep >= 2:
                flows.append(float(popped[1]) - started)
            canvas = chain(*[noop.clone(args=(i,)) for i in range(steps - 1)], last.clone())
            started = time.time()
            canvas.apply_async()
            popped = signals_db.blpop(["bench:done"], timeout=60)
            assert popped is not None, "the chain did not finish"
            if rep >= 2:
                chains.append(float(popped[1]) - started)
    finally:
        worker.stop()
    return flows, chains


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=100)
    parser.add_argument("--width", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq-steps", type=int, default=20)
    parser.add_argument("--seq-reps", type=int, default=15)
    args = parser.parse_args(argv)
    n = args.workflows * args.width
    with own_redis() as port:
        rates: dict[str, list[float]] = {s: [] for s in SCENARIOS}
        for round_ in range(args.rounds):  # interleaved, so drifts hit every scenario
            for scenario in SCENARIOS:
                rate = throughput(port, scenario, args.workflows, args.width)
                rates[scenario].append(rate)
                print(f"  round {round_ + 1}: {scenario:8s} {rate:7.0f} tasks/s", flush=True)
        flows, chains = sequential(port, args.seq_steps, args.seq_reps)
    bare = statistics.median(rates["bare"])
    print(f"\nThroughput: {n} tasks ({args.workflows} workflows x {args.width} parallel "
          f"steps for baton), prefork -c 2, Redis broker, median of {args.rounds}")  # fmt: skip
    for scenario in SCENARIOS:
        rate = statistics.median(rates[scenario])
        print(f"  {scenario:8s} {rate:7.0f} tasks/s   ratio to bare {rate / bare:.3f}")
    flow_t, chain_t = statistics.median(flows), statistics.median(chains)
    print(f"\nSequential: {args.seq_steps} steps, median of {args.seq_reps} runs")
    print(f"  baton workflow {flow_t * 1000:7.1f} ms")
    print(f"  celery chain   {chain_t * 1000:7.1f} ms")
    print(f"  ratio          {flow_t / chain_t:.3f}")


if __name__ == "__main__":
    main()
