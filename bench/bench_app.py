"""The Celery app the throughput benchmark runs in a real prefork worker (configured by
environment).

BENCH_BROKER   the broker URL (Redis)
BENCH_QUEUE    the queue of this run
BENCH_BATON    "0": baton not installed; "installed": installed (the run sends plain
               tasks only); "1": installed, on the store BENCH_STORE; "bridge": and the
               bridge on (a listener follows the events in the benchmark's process);
               "gated": baton_fast_begin off (every step asks the store's gate)
BENCH_SIGNALS  a Redis URL: the worker pushes "ready" there, and one entry per
               ``bench.last`` task (the end of a chain or of a sequential workflow)

No receiver of baton's events runs in the worker: ends are seen through ``bench.last``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, signals

import baton_celery

app = Celery("bench")
app.conf.update(
    broker_url=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/14"),
    task_default_queue=os.environ.get("BENCH_QUEUE", "bench"),
    task_ignore_result=True,
    worker_prefetch_multiplier=4,
    worker_redirect_stdouts=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.noop")
def noop(*_: Any) -> None:
    return None


@app.task(name="bench.last")
def last(*_: Any) -> None:
    return None


_signals: tuple[int, redis.Redis] | None = None


def signals_db() -> redis.Redis:
    global _signals
    if _signals is None or _signals[0] != os.getpid():
        _signals = (os.getpid(), redis.Redis.from_url(os.environ["BENCH_SIGNALS"]))
    return _signals[1]


def _chain_end(sender: Any = None, **_: Any) -> None:
    if getattr(sender, "name", "") == "bench.last":
        signals_db().rpush("bench:done", repr(time.time()))


def _ready(**_: Any) -> None:
    signals_db().rpush("bench:ready", "1")


if "BENCH_SIGNALS" in os.environ:
    signals.worker_ready.connect(_ready, weak=False)
    signals.task_postrun.connect(_chain_end, weak=False)
    mode = os.environ.get("BENCH_BATON", "0")
    if mode != "0":
        app.conf.baton_store = os.environ["BENCH_STORE"]
        app.conf.baton_bridge = mode == "bridge"
        app.conf.baton_fast_begin = mode != "gated"
        baton_celery.install(app)
