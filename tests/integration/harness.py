"""The integration tests' harness: the brokers and stores they run on, real prefork
``celery worker`` subprocesses of :mod:`worker_app`, the Redis "sink" through which the
tests watch them, and redis-servers of a test's own.

Every name a run creates is unique to it (queues, exchanges, control exchanges, Redis
broker keys through kombu's ``global_keyprefix``, store and sink keys under
``baton-it:<session>:``) and is deleted at teardown. Nothing is flushed: other users of
these servers are left alone. Nothing here sleeps to synchronise: waits are BLPOPs on
the sink bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import redis
from celery import Celery
from worker_app import STEP, Settings, create_app, sink_key

import baton_celery

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from redis_servers import LocalRedis  # noqa: E402  (a redis-server of a test's own)

__all__ = ["BROKERS", "SINK_URL", "STORES", "Cluster", "LocalRedis", "Session", "Steps"]

REDIS = "redis://127.0.0.1:6379"
#: The brokers the tests run on, by the name tests parametrize with.
BROKERS = {"redis": f"{REDIS}/12", "amqp": "amqp://guest:guest@127.0.0.1:5672//"}
#: The stores, by name: a template filled with the session's directory and a key prefix.
STORES = {
    "sqlite": "sqlite:///{tmp}/{name}.sqlite3",
    "redis": f"{REDIS}/13?key_prefix={{prefix}}",
}
SINK_URL = f"{REDIS}/13"

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
WAIT = 60.0
TERMINAL = ("completed", "discarded", "cancelled")


def unique(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:10]}"


# --- reading the sink --------------------------------------------------------------


class ListReader:
    """Consumes one sink list into a local buffer; waits block on BLPOP, up to a deadline."""

    def __init__(self, db: redis.Redis, key: str, decode: Callable[[bytes], Any] = json.loads):
        self.db = db
        self.key = key
        self.decode = decode
        self.items: list[Any] = []

    def drain(self) -> list[Any]:
        """Take what is in the list now, without blocking."""
        while True:
            batch = self.db.lpop(self.key, 500)
            if not batch:
                return self.items
            self.items.extend(self.decode(raw) for raw in batch)

    def wait(
        self,
        until: Callable[[list[Any]], bool],
        timeout: float,
        what: str,
        diagnose: Callable[[], str] = lambda: "",
    ) -> list[Any]:
        """Block until ``until(items)`` holds; AssertionError naming ``what`` on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            if until(self.items):
                return self.items
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                shown = "\n  ".join(map(str, self.items[-40:]))
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what} on {self.key}; "
                    f"{len(self.items)} items, the last ones:\n  {shown}\n{diagnose()}"
                )
            popped = self.db.blpop([self.key], timeout=max(remaining, 0.01))
            if popped is not None:
                self.items.append(self.decode(popped[1]))


# --- workers -----------------------------------------------------------------------


@dataclass
class Worker:
    node: str
    process: subprocess.Popen[bytes]
    log_path: Path
    hostname: str = ""  # the full node name (node@host), known once it is ready

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        tail = "\n".join(self.log().splitlines()[-lines:])
        return f"--- log of worker {self.node} (last {lines} lines) ---\n{tail}"


@dataclass
class Cluster:
    """One app (a broker, a store, a queue, maybe a bridge exchange) served by one or more
    worker processes, with the same app as the client in the test process."""

    name: str  # unique to the session
    settings: Settings
    session: Session
    app: Celery
    workers: list[Worker] = field(default_factory=list)
    helpers: list[Steps] = field(default_factory=list)

    @property
    def db(self) -> redis.Redis:
        return self.session.db

    @property
    def broker(self) -> str:
        return self.settings.broker

    def env(self) -> dict[str, str]:
        """The environment of a ``celery -A worker_app ...`` command of this cluster."""
        path = [str(HERE), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        return {
            **os.environ,
            **self.settings.env(),
            "PYTHONPATH": os.pathsep.join(path),
            "BATON_IT_SINK": SINK_URL,
            "BATON_IT_PREFIX": self.session.prefix,
            "BATON_IT_CLUSTER": self.name,
            **(
                {"PROMETHEUS_MULTIPROC_DIR": self.settings.metrics_dir}
                if self.settings.metrics_dir
                else {}
            ),
        }

    def steps(self) -> Steps:
        """The ``step`` task for one test, with its own sink keys."""
        helper = Steps(self)
        self.helpers.append(helper)
        return helper

    def main_sources(self) -> set[str]:
        """The ``source`` of events sent by the workers' main processes (not the pool)."""
        return {f"{w.node}/{w.process.pid}" for w in self.workers}

    def diagnose(self) -> str:
        return "\n".join(w.log_tail() for w in self.workers)

    def log(self) -> str:
        return "".join(w.log() for w in self.workers)

    def start_worker(self, concurrency: int = 2) -> Worker:
        node = unique(f"baton-it-{self.name}")
        log_path = self.session.tmp / f"{node}.log"
        cmd = [
            sys.executable, "-m", "celery", "-A", "worker_app", "worker",
            "-P", "prefork", "-c", str(concurrency), "-Q", self.settings.queue,
            "-n", f"{node}@%h", "-l", "INFO",
            "--without-mingle", "--without-gossip", "--without-heartbeat",
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                cmd, cwd=HERE, env={**self.env(), "BATON_IT_NODE": node}, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        worker = Worker(node, process, log_path)
        self.workers.append(worker)
        self._await_ready(worker)
        return worker

    def _await_ready(self, worker: Worker) -> None:
        key = sink_key(self.session.prefix, "ready", worker.node)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            # BLPOP in slices only to notice a worker that died while starting.
            remaining = deadline - time.monotonic()
            popped = self.db.blpop([key], timeout=min(remaining, 1.0)) if remaining > 0 else None
            if popped is not None:
                worker.hostname = popped[1].decode()
                return
            code = worker.process.poll()
            if code is not None or time.monotonic() >= deadline:
                why = (
                    f"exited with {code}" if code is not None else f"not ready in {READY_TIMEOUT} s"
                )
                raise AssertionError(
                    f"celery worker {worker.node} ({self.broker}) {why}\n{worker.log_tail(200)}"
                )

    def kill_worker(self, worker: Worker) -> None:
        """SIGKILL the worker's main process and its pool: its whole process group."""
        os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        """Release blocked steps, TERM every worker (warm shutdown), KILL its process
        group after a bound."""
        for helper in self.helpers:
            helper.release_all()
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # The worker's own process group (start_new_session): its pool children too.
                os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait(timeout=STOP_TIMEOUT)

    def quiesce(self, timeout: float = 10.0) -> None:
        """A barrier on every worker's main process: a control ping is answered by the
        same loop that runs task_revoked and that handled any earlier control command."""
        nodes = [w.hostname for w in self.workers]
        replies = self.app.control.ping(destination=nodes, timeout=timeout, limit=len(nodes))
        answered = {name for reply in replies for name in reply}
        missing = [n for n in nodes if n not in answered]
        assert not missing, f"no ping reply from {missing} (got {replies})\n{self.diagnose()}"

    def delete_broker_objects(self) -> None:
        """What this cluster declared on the broker (on Redis, its keys go with the
        session's global_keyprefix)."""
        control = self.settings.control
        exchanges = [self.settings.queue, f"{control}.pidbox", f"reply.{control}.pidbox"]
        if self.settings.bridge_exchange:
            exchanges.append(self.settings.bridge_exchange)
        with contextlib.suppress(OSError), self.app.connection_for_write() as conn:
            channel = conn.default_channel
            channel.queue_delete(self.settings.queue)
            for exchange in exchanges:
                channel.exchange_delete(exchange)

    # observing ------------------------------------------------------------------------

    def events(self, workflow_id: str) -> ListReader:
        return self.session.reader(sink_key(self.session.prefix, "events", workflow_id))

    def events_until_finish(self, workflow_id: str, timeout: float = WAIT) -> list[Any]:
        """Every event of the workflow forwarded so far, once its finish has arrived."""
        return self.events(workflow_id).wait(has_finish, timeout, "the finish", self.diagnose)

    def finished(self) -> ListReader:
        """Every WorkflowFinished this cluster's workers sent."""
        return self.session.reader(sink_key(self.session.prefix, "finished", self.name))

    def postruns(self) -> ListReader:
        return self.session.reader(sink_key(self.session.prefix, "postrun", self.name))

    def wait_postruns(
        self, until: Callable[[dict[str, list[str]]], bool], what: str, timeout: float = 30.0
    ) -> dict[str, list[str]]:
        """Wait on task_postrun records, viewed as {task_id: [state, ...]}."""
        self.postruns().wait(lambda items: until(by_task(items)), timeout, what, self.diagnose)
        return by_task(self.postruns().items)


def by_task(postruns: Iterable[list[Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for task_id, state, _source, _time in postruns:
        out.setdefault(task_id, []).append(state)
    return out


@dataclass
class Session:
    """What one pytest session shares: the sink, its key prefix and unique broker names."""

    db: redis.Redis
    tmp: Path
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    readers: dict[str, ListReader] = field(default_factory=dict)
    brokers_used: set[str] = field(default_factory=set)

    @property
    def prefix(self) -> str:
        return f"baton-it:{self.id}"

    @property
    def broker_prefix(self) -> str:
        return f"{self.prefix}:"

    def reader(self, key: str) -> ListReader:
        if key not in self.readers:
            self.readers[key] = ListReader(self.db, key)
        return self.readers[key]

    def cluster(self, kind: str, broker: str, store: str = "sqlite", **flags: Any) -> Cluster:
        """A cluster's app, without workers. ``broker`` and ``store`` name an entry of
        :data:`BROKERS` and :data:`STORES`, or are URLs; ``flags`` are
        :class:`Settings`' (``bridge=True`` gives it a bridge exchange of its own)."""
        name = unique(kind)
        queue = f"baton-it-{self.id}-{name}"
        store_url = STORES.get(store, store).format(
            tmp=self.tmp, name=name, prefix=f"{self.prefix}:store-{name}"
        )
        settings = Settings(
            broker=BROKERS.get(broker, broker),
            store=store_url,
            queue=queue,
            broker_prefix=self.broker_prefix,
            bridge_exchange=f"{queue}-events" if flags.pop("bridge", False) else None,
            **flags,
        )
        self.brokers_used.add(settings.broker.split(":", 1)[0])
        return Cluster(name, settings, self, create_app(settings))

    def delete_keys(self) -> None:
        for key in self.db.scan_iter(match=f"{self.prefix}:*", count=1000):
            self.db.delete(key)


# --- the client side ---------------------------------------------------------------


class Steps:
    """Builds signatures of the ``step`` task for one test (one ``tag``) and talks to the
    running copies of it through the sink: how often each ran, releasing blocked ones."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.tag = unique("t")
        self.blocked: set[str] = set()

    def key(self, *parts: str) -> str:
        return sink_key(self.cluster.session.prefix, self.tag, *parts)

    def s(self, name: str, **options: Any) -> Any:
        if options.get("block"):
            self.blocked.add(name)
        return self.cluster.app.tasks[STEP].s(self.tag, name, **options)

    def calls(self, name: str) -> int:
        return int(self.cluster.db.get(self.key("calls", name)) or 0)

    def wait_started(self, name: str, timeout: float = WAIT) -> int:
        """Wait for the next run of the blocking step ``name``; its pool process id."""
        popped = self.cluster.db.blpop([self.key("started", name)], timeout=timeout)
        if popped is None:
            raise AssertionError(
                f"step {name} did not start within {timeout} s\n{self.cluster.diagnose()}"
            )
        return int(popped[1])

    def release(self, name: str) -> None:
        self.cluster.db.rpush(self.key("release", name), "go")

    def release_all(self, copies: int = 4) -> None:
        """Release every blocking step, including extra copies of it that should not
        have run (a failing test must not leave pool processes stuck)."""
        for name in self.blocked:
            self.cluster.db.rpush(self.key("release", name), *["go"] * copies)

    def deps_seen(self, name: str) -> list[Any]:
        return [json.loads(raw) for raw in self.cluster.db.lrange(self.key("deps", name), 0, -1)]


def client_forwarder(session: Session) -> Callable[..., None]:
    """Forwards the events the test process itself sends (handle.cancel(), a backstop
    sweep) to the sink."""

    def forward(workflow_id: str, event: baton_celery.Event) -> None:
        data = event.to_dict()
        data["source"] = f"client/{os.getpid()}"
        session.db.rpush(sink_key(session.prefix, "events", workflow_id), json.dumps(data))

    return forward


# --- asserting on events -----------------------------------------------------------


def step_events(events: list[dict[str, Any]], step: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["kind"] == "step_updated" and (step is None or e["step_name"] == step)
    ]


def states(events: list[dict[str, Any]], step: str) -> list[str]:
    return [e["state"] for e in step_events(events, step)]


def finishes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "workflow_finished"]


def has_finish(events: list[dict[str, Any]]) -> bool:
    return bool(finishes(events))


def terminal(events: list[dict[str, Any]], step: str) -> list[dict[str, Any]]:
    return [e for e in step_events(events, step) if e["state"] in TERMINAL]


def index_of(events: list[dict[str, Any]], step: str, state: str, nth: int = 0) -> int:
    hits = [
        i
        for i, e in enumerate(events)
        if e["kind"] == "step_updated" and e["step_name"] == step and e["state"] == state
    ]
    assert len(hits) > nth, f"no {state!r} event #{nth} for {step!r} in {events}"
    return hits[nth]
