"""The Redis store's cost per step as workflows grow, its Redis CPU per transition, its
memory per step, and how fast a listener replays history.

- For workflows of 10, 1,000 and 10,000 steps, three shapes (parallel steps; a
  sequential chain, where each settle releases the next; a fan-in into one final step),
  each step's begin + settle as a worker does them, one client, on a redis-server of the
  benchmark's own: microseconds per step (the finishing transition, which sets every
  key's expiry, is included).
- Redis CPU per call of each transition script (INFO commandstats, usec_per_call).
- Memory: MEMORY USAGE of a finished no-op workflow's keys (its history included) and
  of its job index entries, per step; and of one history entry.
- Replay: events per second ``Store.history`` reads back, over 100 workflows; live: events
  per second one listener delivers from the store's channel.

Run: python bench/bench_store.py
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _servers import own_redis  # noqa: E402

from baton_celery.stores import store_from_url  # noqa: E402
from baton_celery.stores.records import StepRecord, WorkflowRecord  # noqa: E402
from baton_celery.stores.redis import RedisStore  # noqa: E402

SIZES = (10, 1_000, 10_000)
SHAPES = ("parallel", "chain", "fan-in")
SIGNATURE = {"task": "proj.tasks.transform", "args": [42, "2026-11-24"], "kwargs": {},
             "options": {}}  # fmt: skip


def record(shape: str, n: int) -> WorkflowRecord:
    wid = str(uuid.uuid4())
    steps = {}
    for i in range(n):
        if shape == "chain":
            deps: tuple[str, ...] = (f"step-{i - 1}",) if i else ()
        elif shape == "fan-in":
            deps = tuple(f"step-{j}" for j in range(n - 1)) if i == n - 1 else ()
        else:
            deps = ()
        steps[f"step-{i}"] = StepRecord(
            f"step-{i}", SIGNATURE["task"], str(uuid.uuid4()), SIGNATURE, deps=deps,
            dispatch=0 if deps else 1,
        )  # fmt: skip
    return WorkflowRecord(wid, "bench", steps)


def run_workflow(store: RedisStore, shape: str, n: int, fast: bool = False) -> float:
    """Seconds spent in begin + settle (``fast``: the fast path's one ``run``) for all
    steps of one workflow (creation excluded)."""
    made = record(shape, n)
    store.create(made)
    names = list(made.steps)
    started = time.perf_counter()
    finished = False
    for name in names:
        if fast:
            out = store.run(made.id, name, 1, 0.001, "completed")
        else:
            assert store.begin(made.id, name, 1).decision == "run", (shape, name)
            out = store.settle(made.id, name, "completed")
        finished = out.finish is not None or finished
    elapsed = time.perf_counter() - started
    assert finished
    return elapsed


def cost_per_step(
    store: RedisStore, shape: str, n: int, total: int = 10_000, fast: bool = False
) -> float:
    """Microseconds per step, best of 3 passes of about ``total`` steps each."""
    passes = []
    for _ in range(3):
        spent = sum(run_workflow(store, shape, n, fast) for _ in range(max(1, total // n)))
        passes.append(spent / (max(1, total // n) * n) * 1e6)
    return min(passes)


def memory_per_step(store: RedisStore, n: int) -> tuple[float, float, float]:
    """Bytes per step of a finished no-op workflow (every step ran and completed): the
    sum of MEMORY USAGE over the workflow's own keys, history included; over its job index
    entries; and of one history entry (the history list's usage per event)."""
    client = store.client
    made = record("parallel", n)
    store.create(made)
    for name in made.steps:
        store.begin(made.id, name, 1)
        store.settle(made.id, name, "completed")
    base = store._base(made.id)
    own = [base + k for k in ("m", "sig", "steps", "jobs", "failed", "ev")]
    own += [f"{base}s:{name}" for name in made.steps]
    jobs = [store._global(f"job:{s.job_id}") for s in made.steps.values()]

    def usage(keys: list[str]) -> int:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key, samples=0)
        return sum(int(u or 0) for u in pipe.execute())

    events = client.llen(base + "ev")
    return usage(own) / n, usage(jobs) / n, usage([base + "ev"]) / events


def cpu_per_transition(store: RedisStore, n: int = 2000) -> dict[str, float]:
    """Redis CPU per call (microseconds) of begin, settle, and run (the fast path's
    begin and settle in one), on parallel steps; and of a run that releases the next
    step (a chain's)."""
    client = store.client
    spent: dict[str, float] = {}
    made, fast, chain = record("parallel", n), record("parallel", n), record("chain", n)
    for each in (made, fast, chain):
        store.create(each)
    for script, steps, call in (
        ("begin", made.steps, lambda name: store.begin(made.id, name, 1)),
        ("settle", made.steps, lambda name: store.settle(made.id, name, "completed")),
        ("run", fast.steps, lambda name: store.run(fast.id, name, 1, 0.001, "completed")),
        ("run, releasing the next", chain.steps,
         lambda name: store.run(chain.id, name, 1, 0.001, "completed")),
    ):  # fmt: skip
        call(next(iter(steps)))  # the script is loaded: EVALSHA from here on
        client.config_resetstat()
        for name in list(steps)[1:]:
            call(name)
        stats = client.info("commandstats")["cmdstat_evalsha"]
        spent[script] = float(stats["usec_per_call"])
    return spent


def replay_rate(store: RedisStore, workflows: int = 100, width: int = 20) -> float:
    """Events per second read back through ``history`` (one listener's replay)."""
    ids = []
    for _ in range(workflows):
        made = record("parallel", width)
        store.create(made)
        for name in made.steps:
            store.begin(made.id, name, 1)
            store.settle(made.id, name, "completed")
        ids.append(made.id)
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        count = sum(len(store.history(i)) for i in ids)
        best = max(best, count / (time.perf_counter() - started))
    return best


def _flood(port: int, channel: str, messages: int, width: int) -> None:
    """Publish ``messages`` transitions' messages on the store's channel, as the scripts
    write them: a header line, then the step's executing and completed events."""
    import json

    import redis

    client = redis.Redis(port=port)
    event = '["s",%d,"1764859200.123456","s%d","%s",1,false,false,"bench.noop","w:s%d"]'
    pipe = client.pipeline(transaction=False)
    for i in range(messages):
        seq, step = 2 * (i % width), i % width
        header = json.dumps([f"w{i // width}", None, "bench"])
        lines = [
            event % (seq + 1, step, "executing", step),
            event % (seq + 2, step, "completed", step),
        ]
        pipe.publish(channel, "\n".join([header, *lines]))
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()


def live_rate(port: int, messages: int = 20_000, width: int = 20) -> float:
    """Events per second one listener delivers from the store's channel (a flood from
    another process), to a receiver of every workflow."""
    import multiprocessing
    import threading

    from celery import Celery

    import baton_celery

    app = Celery("bench-feed", set_as_current=False)
    app.conf.baton_store = f"redis://127.0.0.1:{port}/0"
    baton_celery.install(app)
    got, done = [0], threading.Event()

    def count(workflow_id: str, event: Any = None, **_: Any) -> None:
        got[0] += 1
        if got[0] == 2 * messages:
            done.set()

    baton_celery.subscribe_all(count)
    listener = baton_celery.listen(app)
    try:
        assert listener.wait_ready(10)
        started = time.perf_counter()
        flood = multiprocessing.Process(target=_flood, args=(port, "baton:events", messages, width))
        flood.start()
        assert done.wait(120), f"{got[0]} of {2 * messages} events"
        elapsed = time.perf_counter() - started
        flood.join()
    finally:
        listener.stop()
        baton_celery.unsubscribe_all(count)
        baton_celery.uninstall(app)
    return 2 * messages / elapsed


def main() -> None:
    with own_redis() as port:
        store = store_from_url(f"redis://127.0.0.1:{port}/0", retention=60.0)
        assert isinstance(store, RedisStore)
        ping = []
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(2000):
                store.client.ping()
            ping.append((time.perf_counter() - started) / 2000 * 1e6)
        print(f"Redis round trip (PING) from Python: {min(ping):.0f} us")
        for fast, what in ((False, "begin + settle"), (True, "the fast path's run")):
            print(f"\nStore cost per step ({what}, us), by workflow size:")
            print(f"  {'shape':10s}" + "".join(f"{n:>10,d}" for n in SIZES) + "   max/min")
            for shape in SHAPES:
                costs = [cost_per_step(store, shape, n, fast=fast) for n in SIZES]
                spread = max(costs) / min(costs)
                print(f"  {shape:10s}" + "".join(f"{c:10.0f}" for c in costs) + f"   {spread:.2f}")
        print("\nRedis CPU per transition (INFO commandstats usec_per_call):")
        for script, usec in cpu_per_transition(store).items():
            print(f"  {script:24s} {usec:6.1f} us")
        print("\nRedis memory per step of a finished no-op workflow (MEMORY USAGE), bytes:")
        print("  steps   workflow keys   job index   total   one history event")
        for n in SIZES:
            sizes = [memory_per_step(store, n) for _ in range(3)]
            own, jobs, event = (statistics.median(s[i] for s in sizes) for i in range(3))
            print(f"  {n:>7,d}  {own:12.0f}  {jobs:10.0f}  {own + jobs:6.0f}  {event:10.0f}")
        print(f"\nReplay: {replay_rate(store):,.0f} events/s read back with history()")
        store.close()
        print(
            f"Live: {live_rate(port):,.0f} events/s one listener delivers from the store's channel"
        )


if __name__ == "__main__":
    main()
