"""Crashes and outages, on real prefork workers (-c 2) with the Redis store:

- a pool process SIGKILLed mid-step, with acks_late + task_reject_on_worker_lost: the
  step is redelivered (a second "executing", same job id, next attempt), settles once, and
  the workflow finishes once — on a Redis broker and on RabbitMQ;
- the same without them: the step is "discarded" (worker lost) and its dependents cascade;
- the whole worker SIGKILLed mid-workflow: another worker picks the step up (RabbitMQ
  redelivers it), or the backstop settles what was lost; the workflow finishes once;
- the store's Redis stopped mid-workflow: tasks keep running and end within a bound, the
  errors are logged, and once Redis is back the backstop and new workflows proceed.

Every server-side name is unique to the test: the Redis servers (broker, store, sink) are
the test's own, on spare ports; RabbitMQ queues and the control exchange are unique.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import redis
from celery import Celery

import baton_celery
from baton_celery import Workflow, backstop

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fault_worker_app import STEP, create_app  # noqa: E402
from redis_servers import LocalRedis  # noqa: E402

pytestmark = pytest.mark.integration

AMQP = "amqp://guest:guest@127.0.0.1:5672//"
WAIT = 60.0


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """The Redis of this module's own: broker (db 0), store (db 1) and sink (db 2)."""
    server = LocalRedis(tmp_path_factory.mktemp("fault-redis")).start()
    yield server
    server.remove()


@dataclass
class Rig:
    """One broker + store + queue, its client app, its workers, and the sink."""

    broker: str
    store: str
    sink_url: str
    acks_late: bool
    tmp: Path
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.queue = f"fault-{self.id}"
        self.prefix = f"fault:{self.id}"
        self.sink = redis.Redis.from_url(self.sink_url, socket_timeout=WAIT + 10)
        self.app: Celery = create_app(
            self.broker, self.store, self.queue, f"fault-ctl-{self.id}", self.acks_late
        )

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def start_worker(self) -> subprocess.Popen[bytes]:
        node = f"fault-{uuid.uuid4().hex[:8]}"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), str(ROOT / "tests")]),
            "FAULT_BROKER": self.broker,
            "FAULT_STORE": self.store,
            "FAULT_QUEUE": self.queue,
            "FAULT_CONTROL": f"fault-ctl-{self.id}",
            "FAULT_SINK": self.sink_url,
            "FAULT_PREFIX": self.prefix,
            "FAULT_ACKS_LATE": "1" if self.acks_late else "0",
            "FAULT_NODE": node,
        }
        log = self.tmp / f"{node}.log"
        self.logs.append(log)
        cmd = [sys.executable, "-m", "celery", "-A", "fault_worker_app", "worker",
               "-P", "prefork", "-c", "2", "-Q", self.queue, "-n", f"{node}@%h", "-l", "INFO",
               "--without-mingle", "--without-gossip", "--without-heartbeat"]  # fmt: skip
        with open(log, "wb") as out:
            process = subprocess.Popen(
                cmd, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.workers.append(process)
        if self.sink.blpop([self.key("ready", node)], timeout=WAIT) is None:
            raise AssertionError(f"worker {node} did not start\n{self.log_text()}")
        return process

    def kill_worker(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the worker's main process and its pool: the whole process group."""
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=WAIT)

    def stop(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.workers:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=20)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-6000:] for p in self.logs if p.exists())

    # the steps and what they report --------------------------------------------------

    def s(self, name: str, block: bool = False) -> Any:
        return self.app.tasks[STEP].s(self.id, name, block=block)

    def started(self, name: str) -> int:
        """Wait for the next run of ``name``; its pool process id."""
        popped = self.sink.blpop([self.key("started", self.id, name)], timeout=WAIT)
        assert popped is not None, f"{name} did not start\n{self.log_text()}"
        return int(popped[1])

    def release(self, name: str) -> None:
        self.sink.rpush(self.key("release", self.id, name), "go")

    def events(self, workflow_id: str) -> list[dict[str, Any]]:
        raw = self.sink.lrange(self.key("events", workflow_id), 0, -1)
        return [json.loads(r) for r in raw]

    def wait_events(
        self, workflow_id: str, until: Callable[[list[dict[str, Any]]], bool], what: str
    ) -> list[dict[str, Any]]:
        """Block on the sink until the workflow's events satisfy ``until``."""
        deadline = time.monotonic() + WAIT
        seen: list[dict[str, Any]] = []
        key = self.key("events", workflow_id)
        while True:
            seen = [json.loads(r) for r in self.sink.lrange(key, 0, -1)]
            if until(seen):
                return seen
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}: {seen}\n{self.log_text()}")
            # Every event also pushes a wake-up token: block until the next one.
            self.sink.blpop([self.key("wake", workflow_id)], timeout=remaining)

    def finished(self) -> list[dict[str, Any]]:
        return [json.loads(r) for r in self.sink.lrange(self.key("finished"), 0, -1)]


def steps_of(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "step_updated" and e["step_name"] == name]


def finishes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "workflow_finished"]


def has_finish(events: list[dict[str, Any]]) -> bool:
    return bool(finishes(events))


@pytest.fixture
def make_rig(servers: LocalRedis, tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []
    collectors: list[Callable[..., None]] = []

    def make(broker: str = "redis", acks_late: bool = True, store: str | None = None) -> Rig:
        url = f"redis://127.0.0.1:{servers.port}"
        rig = Rig(
            broker=f"{url}/0" if broker == "redis" else AMQP,
            store=store or f"{url}/1",
            sink_url=f"{url}/2",
            acks_late=acks_late,
            tmp=tmp_path,
        )
        rigs.append(rig)

        # Events this (test) process sends itself, e.g. from a backstop sweep.
        def forward(workflow_id: str, event: baton_celery.Event) -> None:
            data = event.to_dict()
            data["source"] = "test"
            rig.sink.rpush(rig.key("events", workflow_id), json.dumps(data))
            rig.sink.rpush(rig.key("wake", workflow_id), "1")
            if isinstance(event, baton_celery.WorkflowFinished):
                rig.sink.rpush(rig.key("finished"), json.dumps(data))

        baton_celery.subscribe_all(forward)
        collectors.append(forward)
        return rig

    yield make
    for forward in collectors:
        baton_celery.unsubscribe_all(forward)
    for rig in rigs:
        rig.stop()
        baton_celery.uninstall(rig.app)
        if rig.broker == AMQP:
            with rig.app.connection_for_write() as conn:
                conn.default_channel.queue_delete(rig.queue)
        rig.app.close()
        rig.sink.close()


# --- a pool process killed mid-step --------------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_redelivered_step_runs_again_settles_once_and_finishes_once(
    make_rig: Callable[..., Rig], broker: str
) -> None:
    rig = make_rig(broker=broker, acks_late=True)
    rig.start_worker()
    handle = (
        Workflow(label="redelivery")
        .add("a", rig.s("a", block=True))
        .add("b", rig.s("b"), deps=["a"])
        .apply_async(app=rig.app)
    )
    first = rig.started("a")
    os.kill(first, signal.SIGKILL)  # the pool process dies mid-step
    second = rig.started("a")  # redelivered: runs again, in a new pool process
    assert second != first
    rig.release("a")
    events = rig.wait_events(handle.id, has_finish, "the finish")
    runs = [e for e in steps_of(events, "a") if e["state"] == "executing"]
    assert [e["attempt"] for e in runs] == [1, 2]
    assert len({e["job_id"] for e in runs}) == 1
    assert [e["state"] for e in steps_of(events, "a")] == ["executing", "executing", "completed"]
    assert [e["state"] for e in steps_of(events, "b")] == ["executing", "completed"]
    assert [f["outcome"] for f in finishes(events)] == ["completed"]
    assert [f["workflow_id"] for f in rig.finished()] == [handle.id]
    assert handle.status().steps["a"].attempt == 2


def test_without_acks_late_a_lost_step_is_discarded_and_dependents_cascade(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(acks_late=False)
    rig.start_worker()
    handle = (
        Workflow(label="lost")
        .add("a", rig.s("a", block=True))
        .add("b", rig.s("b"), deps=["a"])
        .add("c", rig.s("c"), deps=["b"])
        .apply_async(app=rig.app)
    )
    os.kill(rig.started("a"), signal.SIGKILL)
    events = rig.wait_events(handle.id, has_finish, "the finish")
    (lost,) = [e for e in steps_of(events, "a") if e["state"] == "discarded"]
    assert "WorkerLostError" in lost["error"]
    assert [e["state"] for e in steps_of(events, "b")] == ["cancelled"]
    assert [e["state"] for e in steps_of(events, "c")] == ["cancelled"]
    (finish,) = finishes(events)
    assert (finish["outcome"], finish["failed_steps"]) == ("failed", ["a", "b", "c"])
    assert rig.sink.llen(rig.key("started", rig.id, "a")) == 0  # it never ran again


# --- the whole worker killed mid-workflow ---------------------------------------------


def test_whole_worker_killed_another_worker_picks_the_step_up(
    make_rig: Callable[..., Rig],
) -> None:
    """RabbitMQ requeues what a dead connection had not acked (acks_late)."""
    rig = make_rig(broker="amqp", acks_late=True)
    doomed = rig.start_worker()
    handle = (
        Workflow(label="worker-killed")
        .add("a", rig.s("a", block=True))
        .add("b", rig.s("b"), deps=["a"])
        .apply_async(app=rig.app)
    )
    rig.started("a")
    rig.kill_worker(doomed)
    rig.start_worker()
    rig.started("a")
    rig.release("a")
    events = rig.wait_events(handle.id, has_finish, "the finish")
    assert [e["attempt"] for e in steps_of(events, "a") if e["state"] == "executing"] == [1, 2]
    assert [f["outcome"] for f in finishes(events)] == ["completed"]
    assert len(rig.finished()) == 1


def test_whole_worker_killed_the_backstop_finishes_the_workflow_once(
    make_rig: Callable[..., Rig],
) -> None:
    """Without acks_late the running steps' messages are gone with the worker: the backstop
    settles them, the dependents cascade, and the workflow finishes once — however often
    it sweeps, and while another worker runs."""
    rig = make_rig(acks_late=False)
    doomed = rig.start_worker()
    handle = (
        Workflow(label="worker-killed-backstop")
        .add("a", rig.s("a", block=True))
        .add("b", rig.s("b", block=True))
        .add("c", rig.s("c"), deps=["a", "b"])
        .apply_async(app=rig.app)
    )
    rig.started("a")
    rig.started("b")
    rig.kill_worker(doomed)
    rig.start_worker()
    assert handle.status().steps["a"].state == "executing"
    later = time.time() + 120  # as if two minutes had passed without progress
    reports = [backstop.sweep(rig.app, stuck_after=60, now=later) for _ in range(3)]
    assert sorted(s for _, s, _ in reports[0].settled) == ["a", "b"]
    assert reports[1].settled == reports[2].settled == []
    events = rig.wait_events(handle.id, has_finish, "the finish")
    assert "worker lost or hung" in steps_of(events, "a")[-1]["error"]
    assert [e["state"] for e in steps_of(events, "c")] == ["cancelled"]
    (finish,) = finishes(events)
    assert finish["failed_steps"] == ["a", "b", "c"]
    assert len(rig.finished()) == 1


# --- the store's Redis away -------------------------------------------------------------


def test_store_redis_down_tasks_keep_running_and_state_resumes(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    store_server = LocalRedis(tmp_path / "store").start()
    try:
        rig = make_rig(acks_late=False, store=store_server.url)
        rig.start_worker()
        handle = (
            Workflow(label="store-down")
            .add("a", rig.s("a", block=True))
            .add("b", rig.s("b"), deps=["a"])
            .apply_async(app=rig.app)
        )
        rig.started("a")
        store_server.stop()  # the store goes away while "a" runs
        released = time.time()
        rig.release("a")
        # The task ends (its success hook fails on the store, bounded by the timeout).
        popped = rig.sink.blpop([rig.key("postrun")], timeout=WAIT)
        assert popped is not None, rig.log_text()
        (_task_id, state, ended) = json.loads(popped[1])
        assert state == "SUCCESS"
        assert ended - released < 10.0  # store_timeout is 1 s: no hang
        # Starting a workflow while the store is down fails loudly, publishing nothing.
        with pytest.raises(baton_celery.StoreError):
            Workflow().add("x", rig.s("x")).apply_async(app=rig.app)  # nothing published
        log = rig.log_text()
        assert "task_success hook failed" in log and "StoreError" in log

        store_server.start()  # back, with its data (append-only file)
        assert handle.status().steps["a"].state == "executing"  # the settle was lost
        report = backstop.sweep(rig.app, stuck_after=60, now=time.time() + 120)
        assert [s for _, s, _ in report.settled] == ["a"]
        events = rig.wait_events(handle.id, has_finish, "the finish")
        assert [f["outcome"] for f in finishes(events)] == ["failed"]
        # New workflows run normally on the same worker: its connections recovered.
        again = Workflow().add("c", rig.s("c")).add("d", rig.s("d"), deps=["c"])
        done = again.apply_async(app=rig.app)
        events = rig.wait_events(done.id, has_finish, "the finish after the outage")
        assert [f["outcome"] for f in finishes(events)] == ["completed"]
    finally:
        store_server.remove()
