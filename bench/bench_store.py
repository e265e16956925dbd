"""The Redis store's cost per step as workflows grow, and its memory per live step.

For workflows of 10, 1,000 and 10,000 steps, three shapes (parallel steps; a sequential
chain, where each settle releases the next; a fan-in into one final step), each step's
begin + settle as a worker does them, one client, on a redis-server of the benchmark's
own: microseconds per step (the finishing transition, which sets every key's expiry, is
included). Memory: Redis's used_memory before and after creating a workflow and starting
all its steps, per step.

Run: python bench/bench_store.py
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from pathlib import Path

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


def run_workflow(store: RedisStore, shape: str, n: int) -> float:
    """Seconds spent in begin + settle for all steps of one workflow (creation excluded)."""
    made = record(shape, n)
    store.create(made)
    names = list(made.steps)
    started = time.perf_counter()
    finished = False
    for name in names:
        gate = store.begin(made.id, name, 1)
        assert gate.decision == "run", (shape, name, gate.decision)
        finished = store.settle(made.id, name, "completed").finish is not None or finished
    elapsed = time.perf_counter() - started
    assert finished
    return elapsed


def cost_per_step(store: RedisStore, shape: str, n: int, total: int = 10_000) -> float:
    """Microseconds per step, best of 3 passes of about ``total`` steps each."""
    passes = []
    for _ in range(3):
        spent = sum(run_workflow(store, shape, n) for _ in range(max(1, total // n)))
        passes.append(spent / (max(1, total // n) * n) * 1e6)
    return min(passes)


def memory_per_step(store: RedisStore, n: int) -> tuple[float, float]:
    """Bytes per step of a live workflow (every step executing): Redis's used_memory
    delta, and the sum of MEMORY USAGE over the workflow's keys and its job index keys
    (exact per key, without the keyspace's own growth)."""
    client = store.client
    before = int(client.info("memory")["used_memory"])
    made = record("parallel", n)
    store.create(made)
    for name in made.steps:
        store.begin(made.id, name, 1)
    after = int(client.info("memory")["used_memory"])
    base = store._base(made.id)
    keys = [base + k for k in ("meta", "steps", "jobs")]
    keys += [f"{base}s:{name}" for name in made.steps]
    keys += [store._global(f"job:{s.job_id}") for s in made.steps.values()]
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    usage = sum(int(u or 0) for u in pipe.execute())
    return (after - before) / n, usage / n


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
        print("\nStore cost per step (begin + settle, us), by workflow size:")
        print(f"  {'shape':10s}" + "".join(f"{n:>10,d}" for n in SIZES) + "   max/min")
        for shape in SHAPES:
            costs = [cost_per_step(store, shape, n) for n in SIZES]
            spread = max(costs) / min(costs)
            print(f"  {shape:10s}" + "".join(f"{c:10.0f}" for c in costs) + f"   {spread:.2f}")
        print("\nRedis memory per live step (all steps executing), bytes:")
        print("  steps      used_memory delta   MEMORY USAGE of its keys")
        for n in SIZES:
            sizes = [memory_per_step(store, n) for _ in range(3)]
            delta = statistics.median(s[0] for s in sizes)
            usage = statistics.median(s[1] for s in sizes)
            print(f"  {n:>7,d}  {delta:14.0f}   {usage:18.0f}")
        store.close()


if __name__ == "__main__":
    main()
