"""What baton costs a pool process per task, in-process: Celery's own tracer
(``build_tracer``, what a prefork child runs for each message) calls the hooks of no-op
tasks, one after another, on a redis-server of the benchmark's own (store and broker);
the round's messages are taken off the broker first, so that only the task's side is
measured.

- bare: a no-op task, baton not installed;
- not a step: the same task with baton installed;
- leaf (fast path): parallel steps, fresh first deliveries that no step depends on (their
  settle is sent without waiting for its reply);
- fast path, waiting: the same steps when they have a dependent (each waits for its
  transition's reply: the released steps);
- gated: ``baton_fast_begin = False`` (begin at task_prerun, settle at task_success);
- chain link: the first task of a Celery chain of two, baton not installed (the tracer
  publishes the second);
- sequence step: the first step of a workflow of two in sequence, on the fast path (its
  settle's reply releases the second, which the hook publishes): what a sequence pays
  per step where a chain pays a chain link.

Each figure is CPU (``process_time``) and wall time per task, median of alternating
rounds; ``--profile SCENARIO`` prints where that scenario's time goes instead.

Run: python bench/bench_hooks.py [--tasks 3000 --rounds 5] [--profile leaf --sort tottime]
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _servers import own_redis  # noqa: E402

WIDTH = 20
#: scenario -> (baton installed, fast path, what is published: one task or step each,
#: WIDTH parallel steps with a dependent, or the first of two in sequence)
SCENARIOS: dict[str, tuple[bool, bool, str]] = {
    "bare": (False, False, "single"),
    "not a step": (True, False, "single"),
    "leaf": (True, True, "parallel"),
    "fast, waiting": (True, True, "with dependent"),
    "gated": (True, False, "parallel"),
    "chain link": (False, False, "sequence"),
    "sequence step": (True, True, "sequence"),
}


def make_app(port: int, scenario: str) -> Any:
    from celery import Celery

    import baton_celery

    installed, fast, _ = SCENARIOS[scenario]
    app = Celery(f"hooks-{scenario}", set_as_current=False)
    app.conf.update(
        broker_url=f"redis://127.0.0.1:{port}/1",
        task_ignore_result=True,
        task_default_queue="hooks",
    )

    @app.task(name="bench.noop", shared=False)
    def noop(*_: Any) -> None:
        return None

    if installed:
        app.conf.baton_store = f"redis://127.0.0.1:{port}/0"
        app.conf.baton_fast_begin = fast
        runtime = baton_celery.install(app)
        runtime.store.serves_tasks()  # as worker_init tells it in a worker
    return app


def receiving_revokes() -> None:
    """What the worker's consumer step does (revokes.py): the fast path needs it."""
    from baton_celery import revokes

    revokes._since = multiprocessing.RawValue("d", time.time() - 1.0)


def messages(
    app: Any, scenario: str, tasks: int
) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Publish the round's work to the broker and take it back as the
    (task id, args, request) the worker would hand the tracer."""
    from baton_celery import Workflow

    _, _, shape = SCENARIOS[scenario]
    with app.connection_for_write() as conn:  # the last round's released steps
        conn.SimpleQueue("hooks").clear()
    noop = app.signature("bench.noop")
    if shape == "single":
        for i in range(tasks):
            noop.clone(args=(i,)).apply_async()
    elif shape == "sequence" and scenario == "chain link":
        for i in range(tasks):
            (noop.clone(args=(i, 0)) | noop.clone(args=(i, 1))).apply_async()
    elif shape == "sequence":
        for i in range(tasks):
            flow = Workflow(label="hooks")
            flow.add("first", noop.clone(args=(i, 0)))
            flow.add("second", noop.clone(args=(i, 1)), deps=["first"])
            flow.apply_async(app=app)
    else:
        for w in range(tasks // WIDTH):
            flow = Workflow(label="hooks")
            for i in range(WIDTH):
                flow.add(f"s{i}", noop.clone(args=(w, i)))
            if shape == "with dependent":  # released when all the others settled: not measured
                flow.add("after", noop.clone(args=(w,)), deps=[f"s{i}" for i in range(WIDTH)])
            flow.apply_async(app=app)
    out = []
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue("hooks")
        while len(out) < tasks:
            message = queue.get(timeout=5)
            args, _kwargs, embed = message.decode()
            request = dict(message.headers, delivery_info={"redelivered": False}, is_eager=False)
            request.update(embed)  # a chain's next tasks
            out.append((message.headers["id"], tuple(args), request))
            message.ack()
        queue.clear()
        queue.close()
    return out


def run_round(
    app: Any, work: list[tuple[str, tuple[Any, ...], dict[str, Any]]]
) -> tuple[float, float]:
    """CPU and wall time per task, in µs, of tracing ``work``."""
    from celery.app.trace import build_tracer

    from baton_celery import running

    task = app.tasks["bench.noop"]
    tracer = build_tracer(task.name, task, app=app, hostname="bench@host")
    cpu, wall = time.process_time(), time.perf_counter()
    for task_id, args, request in work:
        tracer(task_id, args, {}, request)
    running.collect()  # the replies of the settles sent without waiting (the watchdog's)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / len(work) * 1e6, wall / len(work) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", choices=list(SCENARIOS))
    parser.add_argument("--only", nargs="*", choices=list(SCENARIOS), help="these scenarios")
    parser.add_argument("--sort", default="cumulative", help="the profile's order (pstats)")
    options = parser.parse_args()
    receiving_revokes()
    with own_redis() as port:
        if options.profile:
            app = make_app(port, options.profile)
            run_round(app, messages(app, options.profile, options.tasks))  # warm up
            work = messages(app, options.profile, options.tasks)
            profile = cProfile.Profile()
            profile.runcall(run_round, app, work)
            pstats.Stats(profile).sort_stats(options.sort).print_stats(45)
            return
        names = options.only or list(SCENARIOS)
        apps = {name: make_app(port, name) for name in names}
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        for number in range(options.rounds + 1):  # the first round warms up
            for name in names[number % len(names) :] + names[: number % len(names)]:
                work = messages(apps[name], name, options.tasks)
                figure = run_round(apps[name], work)
                if number:
                    figures[name].append(figure)
        print(f"{options.tasks:,d} no-op tasks per round, median of {options.rounds} rounds")
        print(f"  {'scenario':16s} {'CPU us/task':>12s} {'wall us/task':>13s}")
        for name, values in figures.items():
            cpu = statistics.median(v[0] for v in values)
            wall = statistics.median(v[1] for v in values)
            print(f"  {name:16s} {cpu:12.0f} {wall:13.0f}")


if __name__ == "__main__":
    main()
