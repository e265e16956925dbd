"""Throughput of baton_celery on a real prefork worker (-c 2), Redis broker, no-op tasks,
results ignored, side by side with bare Celery in one run (median of alternating rounds):

- parallel: N tasks as workflows of parallel steps (baton; with the bridge on and a
  listener following every event; with baton_fast_begin off, every step asking the
  store's gate), vs N bare tasks, vs N bare tasks with baton installed (tasks that are
  not steps);
- sequential: workflows of S sequential steps vs Celery chains of S tasks, all submitted
  at once: tasks/s until every one ended;
- one sequential workflow vs one chain, wall time (median of reps).

The work is published while the worker is up (as in production), then the worker takes
up its queue. Besides tasks/s (wall time from then to the last task), each run reports
the CPU it cost: the worker's processes (main and pool) and the redis-server serving
broker and store (or both servers, with ``--store redis-apart``), per task, read from
/proc: a figure other load on the machine does not move much, where wall-clock
throughput does. The scenarios' order rotates every round.

Run: python bench/bench_throughput.py [--workflows 150 --width 20 --rounds 3 --only ...]
     [--store redis|redis-apart|sqlite] [--commands: the Redis commands each task made]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _servers import own_redis  # noqa: E402

#: scenario -> (what the worker runs: BENCH_BATON, the shape of the work)
SCENARIOS = {
    "bare": ("0", "tasks"),
    "bare, baton installed": ("installed", "tasks"),
    "baton": ("1", "parallel"),
    "baton + listener": ("bridge", "parallel"),
    "baton, gated": ("gated", "parallel"),
    "chains": ("0", "chains"),
    "baton sequential": ("1", "sequential"),
}
#: Each ratio: (scenario, the scenario it is compared with).
RATIOS = [
    ("bare, baton installed", "bare"),
    ("baton", "bare"),
    ("baton + listener", "bare"),
    ("baton, gated", "bare"),
    ("baton sequential", "chains"),
]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commands(server: redis.Redis) -> dict[str, tuple[int, float]]:
    """Redis's commandstats: command -> (calls, microseconds) so far."""
    return {
        name.removeprefix("cmdstat_"): (int(stat["calls"]), float(stat["usec"]))
        for name, stat in server.info("commandstats").items()
    }


def commands_per_task(
    before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]], tasks: int
) -> str:
    """The Redis commands a run made, per task: calls (and CPU µs) of each."""
    parts = []
    for name, (calls, usec) in sorted(after.items()):
        calls0, usec0 = before.get(name, (0, 0.0))
        if calls - calls0 >= tasks // 10:
            parts.append(f"{name} {(calls - calls0) / tasks:.2f} ({(usec - usec0) / tasks:.0f} us)")
    return ", ".join(parts)


def cpu_parts(worker: int, servers: set[int]) -> tuple[float, float, float]:
    """CPU so far of the worker's main process, of its pool (its children), and of the
    redis-servers (the broker's, and the store's when it has one of its own)."""
    children = subprocess.run(
        ["pgrep", "-P", str(worker)], capture_output=True, text=True, check=False
    ).stdout.split()
    pool = sum(cpu_seconds(int(c)) for c in children)
    return cpu_seconds(worker), pool, sum(cpu_seconds(pid) for pid in servers)


def server_pids(port: int, store: str) -> set[int]:
    """The redis-servers of the broker (``port``) and of the store."""
    ports = {port}
    if store.startswith("redis://"):
        ports.add(urlsplit(store).port or port)
    pids = set()
    for each in ports:
        with redis.Redis(port=each) as server:
            pids.add(int(server.info("server")["process_id"]))
    return pids


class Worker:
    def __init__(self, port: int, store: str, queue: str, mode: str) -> None:
        self.db = redis.Redis(port=port, db=2)
        self.db.delete("bench:ready", "bench:done")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]),
            "BENCH_BROKER": f"redis://127.0.0.1:{port}/0",
            "BENCH_STORE": store,
            "BENCH_SIGNALS": f"redis://127.0.0.1:{port}/2",
            "BENCH_QUEUE": queue,
            "BENCH_BATON": mode,
        }
        # It starts on a queue of its own and takes up the benchmark's queue when told
        # (consume()): the work is published to a worker that is up, as in production
        # (messages published before a worker receives revokes take baton's gate).
        self.queue, self.name = queue, f"{queue}@{socket.gethostname()}"
        cmd = [sys.executable, "-m", "celery", "-A", "bench_app", "worker", "-P", "prefork",
               "-c", "2", "-Q", f"{queue}-idle", "-l", "WARNING", "--without-mingle",
               "--without-gossip", "--without-heartbeat", "-n", f"{queue}@%h"]  # fmt: skip
        self.process = subprocess.Popen(
            cmd, cwd=HERE, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if self.db.blpop(["bench:ready"], timeout=60) is None:
            self.stop()
            raise RuntimeError("the benchmark worker did not start")
        self.ready_at = time.time()

    def consume(self, app: Any) -> float:
        """Take up the benchmark's queue now; when it was asked to."""
        started = time.time()
        # Asked again when no reply came: a worker just up may not yet listen for control
        # messages, and one sent before that is lost (asking twice is harmless).
        for _ in range(5):
            replies = app.control.add_consumer(
                self.queue, destination=[self.name], reply=True, timeout=2
            )
            if replies:
                return started
        raise RuntimeError("the benchmark worker did not take up its queue")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.db.close()


def client_app(port: int, store: str, queue: str, mode: str) -> Any:
    from celery import Celery

    import baton_celery

    app = Celery(f"bench-client-{queue}", set_as_current=False)
    app.conf.update(
        broker_url=f"redis://127.0.0.1:{port}/0",
        task_default_queue=queue,
        task_ignore_result=True,
    )
    if mode != "0":
        app.conf.baton_store = store
        app.conf.baton_bridge = mode == "bridge"
        baton_celery.install(app)
    return app


def submit(app: Any, shape: str, workflows: int, width: int) -> list[str]:
    """Queue the work; the ids of the workflows made."""
    from celery import chain

    from baton_celery import Workflow

    noop, last = app.signature("bench.noop"), app.signature("bench.last")
    ids = []
    if shape in ("parallel", "sequential"):
        for w in range(workflows):
            flow = Workflow(label="bench")
            for i in range(width):
                if shape == "parallel":
                    flow.add(f"s{i}", noop.clone(args=(w, i)))
                else:
                    task = last if i == width - 1 else noop
                    flow.add(f"s{i}", task.clone(args=(w, i)), deps=[f"s{i - 1}"] if i else [])
            ids.append(flow.apply_async(app=app).id)
    elif shape == "chains":
        for w in range(workflows):
            links = [noop.clone(args=(w, i)) for i in range(width - 1)]
            chain(*links, last.clone(args=(w,))).apply_async()
    else:
        with app.producer_or_acquire() as producer:
            for w in range(workflows):
                for i in range(width):
                    noop.clone(args=(w, i)).apply_async(producer=producer)
    return ids


def finished(broker: redis.Redis, signals_db: redis.Redis, queue: str, shape: str, n: int) -> bool:
    if shape in ("chains", "sequential"):
        return int(signals_db.llen("bench:done")) >= n
    pipe = broker.pipeline(transaction=False)
    pipe.llen(queue)
    pipe.hlen("unacked")
    length, unacked = pipe.execute()
    return int(length) == 0 and int(unacked) == 0


def throughput(
    port: int, store: str, scenario: str, workflows: int, width: int, show_commands: bool = False
) -> tuple[float, tuple[float, float, float]]:
    """tasks/s, and CPU microseconds per task: the worker's main process, its pool, the
    redis-server."""
    import baton_celery

    mode, shape = SCENARIOS[scenario]
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    app = client_app(port, store, queue, mode)
    worker = Worker(port, store, queue, mode)
    ids = submit(app, shape, workflows, width)
    listener = baton_celery.listen(app) if mode == "bridge" else None
    events: list[int] = []

    def count(workflow_id: str, event: Any = None, **_: Any) -> None:
        events.append(1)

    if listener is not None:
        baton_celery.subscribe_all(count)
    broker = redis.Redis(port=port, db=0)
    servers = server_pids(port, store)
    before = cpu_parts(worker.process.pid, servers)
    stats = commands(broker) if show_commands else {}
    try:
        started = worker.consume(app)
        while not finished(broker, worker.db, queue, shape, workflows):
            time.sleep(0.02)  # polling the queue: 20 ms keeps the poll off the CPU
        elapsed = time.time() - started
        after = cpu_parts(worker.process.pid, servers)
        if show_commands:
            print(f"    redis commands per task, {scenario}: "
                  f"{commands_per_task(stats, commands(broker), workflows * width)}")  # fmt: skip
    finally:
        worker.stop()
        if listener is not None:
            listener.stop()
            baton_celery.unsubscribe_all(count)
        broker.delete(queue)
        broker.close()
    if ids:  # every workflow must have finished, exactly as the worker claimed
        from baton_celery.runtime import runtime_for

        runtime = runtime_for(app)
        assert runtime is not None
        outcomes = [runtime.store.summary(i).state for i in ids]
        assert outcomes == ["completed"] * workflows, outcomes
        if listener is not None:  # the listener saw every event (2 a step, 1 a finish)
            assert len(events) == workflows * (2 * width + 1), len(events)
        baton_celery.uninstall(app)
    tasks = workflows * width
    parts = tuple((a - b) / tasks * 1e6 for a, b in zip(after, before))
    return tasks / elapsed, parts  # type: ignore[return-value]


def one_sequence(port: int, store: str, steps: int, reps: int) -> tuple[list[float], list[float]]:
    """Wall time of one sequential workflow and of one chain, alternating."""
    from celery import chain

    from baton_celery import Workflow

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    app = client_app(port, store, queue, "1")
    noop, last = app.signature("bench.noop"), app.signature("bench.last")
    worker = Worker(port, store, queue, "1")
    flows, chains = [], []
    try:
        worker.consume(app)
        for rep in range(reps + 2):  # the first two warm the pool up
            flow = Workflow(label="seq")
            for i in range(steps):
                task = last if i == steps - 1 else noop
                flow.add(f"s{i}", task.clone(args=(i,)), deps=[f"s{i - 1}"] if i else [])
            started = time.time()
            flow.apply_async(app=app)
            popped = worker.db.blpop(["bench:done"], timeout=60)
            assert popped is not None, "the workflow did not finish"
            if rep >= 2:
                flows.append(float(popped[1]) - started)
            canvas = chain(*[noop.clone(args=(i,)) for i in range(steps - 1)], last.clone())
            started = time.time()
            canvas.apply_async()
            popped = worker.db.blpop(["bench:done"], timeout=60)
            assert popped is not None, "the chain did not finish"
            if rep >= 2:
                chains.append(float(popped[1]) - started)
    finally:
        worker.stop()
    return flows, chains


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=150)
    parser.add_argument("--width", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq-reps", type=int, default=15)
    parser.add_argument(
        "--store",
        choices=("redis", "redis-apart", "sqlite"),
        default="redis",
        help="redis: the broker's redis-server; redis-apart: a redis-server of its own",
    )
    parser.add_argument(
        "--commands", action="store_true", help="print the Redis commands each task made"
    )
    parser.add_argument("--only", nargs="*", default=list(SCENARIOS), help="scenarios to run")
    args = parser.parse_args(argv)
    n = args.workflows * args.width
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(own_redis())
        if args.store == "redis":
            store = f"redis://127.0.0.1:{port}/1"
        elif args.store == "redis-apart":
            store = f"redis://127.0.0.1:{stack.enter_context(own_redis())}/1"
        else:
            store = f"sqlite:///{stack.enter_context(tempfile.TemporaryDirectory())}/x.sqlite3"
        rates: dict[str, list[float]] = {s: [] for s in args.only}
        costs: dict[str, list[float]] = {s: [] for s in args.only}
        for round_ in range(args.rounds):  # interleaved, so drifts hit every scenario
            order = args.only[round_ % len(args.only) :] + args.only[: round_ % len(args.only)]
            for scenario in order:
                rate, parts = throughput(
                    port, store, scenario, args.workflows, args.width, args.commands
                )
                rates[scenario].append(rate)
                costs[scenario].append(sum(parts))
                main_, pool, server = parts
                print(f"  round {round_ + 1}: {scenario:22s} {rate:7.0f} tasks/s"
                      f" {sum(parts):7.0f} us CPU/task (main {main_:.0f}, pool {pool:.0f},"
                      f" redis {server:.0f})", flush=True)  # fmt: skip
        flows, chains = one_sequence(port, store, args.width, args.seq_reps)
    print(f"\nThroughput, {args.store} store: {n} no-op tasks ({args.workflows} x "
          f"{args.width}), prefork -c 2, Redis broker, median of {args.rounds} rounds")  # fmt: skip
    median = {s: statistics.median(r) for s, r in rates.items()}
    cpu = {s: statistics.median(c) for s, c in costs.items()}
    for scenario, rate in median.items():
        print(f"  {scenario:22s} {rate:7.0f} tasks/s  {cpu[scenario]:7.0f} us CPU/task")
    print("  ratios (throughput; CPU per task):")
    for scenario, base in RATIOS:
        if scenario in median and base in median:
            print(f"  {scenario:22s} / {base:8s} {median[scenario] / median[base]:.3f};"
                  f" {cpu[scenario] / cpu[base]:.3f}")  # fmt: skip
    flow_t, chain_t = statistics.median(flows), statistics.median(chains)
    print(f"\nOne sequential workflow of {args.width} steps vs one chain, median of "
          f"{args.seq_reps}: {flow_t * 1000:.1f} vs {chain_t * 1000:.1f} ms, "
          f"ratio {flow_t / chain_t:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
