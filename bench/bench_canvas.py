"""Canvas benchmark: a chord of 100 header tasks and a chain of 20, run by Celery (Redis
broker, Redis result backend) and by baton through ``Workflow.from_canvas`` (Redis broker,
Redis store, no result backend), each on its own real prefork worker (``-c 2``).

Run: ``python bench/bench_canvas.py [--runs 5]``. Prints the median wall time of each,
from ``apply_async`` to the result in hand (Celery: ``.get()``; baton: the finish through
the broker bridge, then ``handle.result()``). This file is also the workers' app module.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from celery import Celery, chain, chord, signals

import baton_celery
from baton_celery import Workflow

HERE = Path(__file__).resolve().parent
REDIS = "redis://127.0.0.1:6379/13"


def make_app(mode: str, tag: str) -> Celery:
    app = Celery(f"bench-canvas-{tag}-{mode}", set_as_current=False)
    app.conf.update(
        broker_url=REDIS,
        task_default_queue=f"bench-canvas-{tag}-{mode}",
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=4,
        worker_hijack_root_logger=False,
    )
    if mode == "celery":
        app.conf.result_backend = REDIS
    else:
        app.conf.update(
            task_ignore_result=True,
            baton_store=f"{REDIS}?key_prefix=bench-canvas-{tag}",
            baton_bridge=True,
            baton_bridge_exchange=f"bench-canvas-{tag}",
        )

    @app.task(name=f"{app.main}.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name=f"{app.main}.tsum")
    def tsum(xs: list[int]) -> int:
        return sum(xs)

    if mode == "baton":
        baton_celery.install(app)
    return app


if os.environ.get("BENCH_CANVAS_MODE"):  # imported by a worker
    worker_app = make_app(os.environ["BENCH_CANVAS_MODE"], os.environ["BENCH_CANVAS_TAG"])

    @signals.worker_ready.connect
    def _ready(sender: Any = None, **_: Any) -> None:
        redis.Redis.from_url(REDIS).rpush(os.environ["BENCH_CANVAS_READY"], "ready")


@contextmanager
def worker(mode: str, tag: str) -> Iterator[Celery]:
    ready = f"bench-canvas-ready-{tag}-{mode}"
    env = {
        **os.environ,
        "BENCH_CANVAS_MODE": mode,
        "BENCH_CANVAS_TAG": tag,
        "BENCH_CANVAS_READY": ready,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable, "-m", "celery", "-A", "bench_canvas:worker_app", "worker",
        "-P", "prefork", "-c", "2", "-l", "error", "-n", f"{mode}-{tag}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    process = subprocess.Popen(cmd, cwd=HERE, env=env)
    db = redis.Redis.from_url(REDIS)
    try:
        if db.blpop([ready], timeout=60) is None:
            raise SystemExit(f"the {mode} worker was not ready in 60 s")
        yield make_app(mode, tag)
    finally:
        process.terminate()
        process.wait(timeout=60)
        db.delete(ready)


def shapes(app: Celery) -> dict[str, Any]:
    add, tsum = app.tasks[f"{app.main}.add"], app.tasks[f"{app.main}.tsum"]
    return {
        "chord of 100": lambda: chord([add.s(i, i) for i in range(100)], tsum.s()),
        "chain of 20": lambda: chain(add.s(0, 0), *[add.s(1) for _ in range(19)]),
    }


def timed(runs: int, once: Any) -> tuple[float, Any]:
    once()  # warm-up
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = once()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    tag = uuid.uuid4().hex[:8]
    figures: dict[str, dict[str, float]] = {}
    with worker("celery", tag) as app:
        for name, make in shapes(app).items():
            t, result = timed(runs, lambda make=make: make().apply_async().get(timeout=120))
            figures.setdefault(name, {})["celery"] = t
            figures[name]["celery_result"] = result
    with worker("baton", tag) as app, baton_celery.listen(app):

        def run_baton(make: Any) -> Any:
            handle = Workflow.from_canvas(make()).apply_async(app)
            handle.wait(timeout=120)
            return handle.result()

        for name, make in shapes(app).items():
            t, result = timed(runs, lambda make=make: run_baton(make))
            assert result == figures[name]["celery_result"], (name, result)
            figures[name]["baton"] = t
    for name, f in figures.items():
        print(
            f"{name}: celery {f['celery'] * 1000:.1f} ms, baton {f['baton'] * 1000:.1f} ms, "
            f"ratio {f['baton'] / f['celery']:.2f} (median of {runs}; same results)"
        )


if __name__ == "__main__":
    main()
