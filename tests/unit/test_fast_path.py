"""The fast path: a fresh first delivery of a step's message runs without asking the
store's gate, its begin carried by its settle (one transition), or sent by the watchdog
when the step runs for long; every other message asks the gate first. On a real Redis
broker (it flags redeliveries), an in-process worker, and the Redis and SQLite stores."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import redis
from celery import Celery, signals
from celery.app.task import Context
from celery.contrib.testing.worker import start_worker
from redis_servers import SHARED_REDIS_URL, shared_redis_url, unique_prefix

import baton_celery
from baton_celery import Workflow, revokes
from baton_celery.hooks import StepRef, _gate_known
from baton_celery.stores import Store

BROKER = "redis://127.0.0.1:6379/14"


@pytest.fixture(params=["redis", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        return shared_redis_url(unique_prefix())
    return f"sqlite:///{tmp_path / 'fast.sqlite3'}"


def make_app(store_url: str, **conf: Any) -> Celery:
    prefix = unique_prefix()
    app = Celery(f"fast-{prefix}", set_as_current=False)
    app.conf.update(
        broker_url=BROKER, broker_connection_retry_on_startup=True,
        broker_transport_options={"global_keyprefix": f"{prefix}:"},
        task_ignore_result=True, worker_hijack_root_logger=False,
        task_default_queue=f"q-{prefix}", baton_store=store_url, **conf,
    )  # fmt: skip
    return app


@contextlib.contextmanager
def ran(task_id: str) -> Iterator[None]:
    """Wait, on leaving the block, until the task ``task_id`` has run (task_postrun comes
    after baton's own receivers of the run)."""
    done = threading.Event()

    def postrun(task_id: str = "", **_: Any) -> None:
        if task_id == wanted:
            done.set()

    wanted = task_id
    signals.task_postrun.connect(postrun, weak=False)
    try:
        yield
        assert done.wait(15), f"task {task_id} did not run"
    finally:
        signals.task_postrun.disconnect(postrun)


def spy(store: Store, calls: list[str]) -> None:
    """Record which transitions the store is asked for (not the calls one of them makes:
    a store's run_unanswered may be its run)."""
    inside = threading.local()
    for name in ("begin", "run", "run_unanswered", "settle"):
        real = getattr(store, name)

        def recorded(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            if getattr(inside, "call", False):
                return _real(*args, **kwargs)
            calls.append(_name)
            inside.call = True
            try:
                return _real(*args, **kwargs)
            finally:
                inside.call = False

        setattr(store, name, recorded)


def test_one_transition_per_step_unless_a_receiver_here_wants_the_events(store_url: str) -> None:
    """Without a receiver in the worker, each step is one ``run`` (sent without waiting
    for its reply, for a step no other depends on); with one, a begin and a settle.
    Either way the events, their order and the finish are the same, and the executing
    event is stamped when the body started."""
    app = make_app(store_url)

    @app.task(name=f"{app.main}.work", shared=False)
    def work(seconds: float = 0.0) -> None:
        time.sleep(seconds)  # the step's own work, which the events must time

    store = baton_celery.install(app).store
    calls: list[str] = []
    spy(store, calls)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            for receiver in (None, lambda workflow_id, event: None):
                calls.clear()
                if receiver is not None:
                    baton_celery.subscribe_all(receiver)
                try:
                    last = f"b-{uuid.uuid4()}"
                    flow = Workflow().add("a", work.s(0.2))
                    flow.add("b", work.s().set(task_id=last), deps=["a"])
                    # Not handle.wait(): it would be a receiver of the workflow here.
                    with ran(last):
                        handle = flow.apply_async(app)
                finally:
                    if receiver is not None:
                        baton_celery.unsubscribe_all(receiver)
                events = handle.events()
                assert [(e.step_name, e.state) for e in events[:-1]] == [
                    ("a", "executing"), ("a", "completed"),
                    ("b", "executing"), ("b", "completed"),
                ]  # fmt: skip
                assert handle.status().outcome == "completed"
                ran_for = (events[1].timestamp - events[0].timestamp).total_seconds()
                assert 0.2 <= ran_for < 5.0
                wanted = ["run", "run_unanswered"] if receiver is None else ["begin", "settle"] * 2
                assert calls == wanted
    finally:
        baton_celery.uninstall(app)


def blocking_task(app: Celery) -> tuple[Any, Callable[[], None], redis.Redis]:
    """A task that runs until ``release()`` is called; the Redis client it waits on."""
    key = f"{unique_prefix()}:release"
    client = redis.Redis.from_url(SHARED_REDIS_URL)

    @app.task(name=f"{app.main}.block", shared=False)
    def block() -> None:
        assert client.blpop([key], timeout=20) is not None  # until the test releases it

    def release() -> None:
        client.rpush(key, "go")

    return block, release, client


def wait_executing(handle: Any, step: str) -> None:
    deadline = time.monotonic() + 10
    while handle.status().steps[step].state != "executing":
        assert time.monotonic() < deadline, f"step {step!r} never showed as running"
        time.sleep(0.02)  # polling the store for the state under test


def test_a_long_step_shows_as_executing_while_it_runs(store_url: str) -> None:
    """The watchdog sends the begin of a step still running after baton_running_after;
    the settle then settles alone."""
    app = make_app(store_url, baton_running_after=0.2)
    block, release, client = blocking_task(app)

    store = baton_celery.install(app).store
    calls: list[str] = []
    spy(store, calls)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            job = f"a-{uuid.uuid4()}"
            with ran(job):
                handle = Workflow().add("a", block.s().set(task_id=job)).apply_async(app)
                wait_executing(handle, "a")
                assert calls == ["begin"]
                release()
            assert calls == ["begin", "settle"]
            events = handle.events()
            assert [(e.state, e.attempt) for e in events[:-1]] == [
                ("executing", 1), ("completed", 1)
            ]  # fmt: skip
            assert events[-1].outcome == "completed"
    finally:
        client.close()
        baton_celery.uninstall(app)


@pytest.fixture
def ready_worker() -> Iterator[float]:
    """This process acts as a worker that has received revokes for 10 s."""
    previous = revokes._since
    revokes._since = multiprocessing.RawValue("d", time.time() - 10)
    try:
        yield revokes._since.value
    finally:
        revokes._since = previous


def test_only_a_fresh_first_delivery_skips_the_gate(ready_worker: float) -> None:
    app = make_app(shared_redis_url(unique_prefix()))
    rt = baton_celery.install(app)
    now = time.time()

    def known(dispatch: int = 1, published: float | None = now, **request: Any) -> bool:
        context = Context(delivery_info={"redelivered": False}, is_eager=False)
        context.update(request)
        return _gate_known(StepRef(rt, "w", "s", dispatch, published), context)

    try:
        assert known()
        assert not known(delivery_info={"redelivered": True})  # may have completed
        assert not known(dispatch=0)  # an early or snoozed copy
        assert not known(is_eager=True)
        assert not known(published=None)  # not published by baton (or an old version)
        assert not known(published=ready_worker - 1)  # before this worker got revokes
        assert not known(published=now - rt.fresh_for - 1)  # the backstop may have run
        assert rt.fresh_for == 60.0
        receiver = lambda workflow_id, event: None  # noqa: E731
        baton_celery.subscribe("w", receiver)
        try:
            assert not known()  # a receiver here wants the executing event at once
        finally:
            baton_celery.unsubscribe("w", receiver)
    finally:
        baton_celery.uninstall(app)
    app.conf.baton_fast_begin = False
    app.conf.broker_transport_options = {"visibility_timeout": 30}
    rt = baton_celery.install(app)
    try:
        assert not known()
        assert rt.fresh_for == 15.0  # half the visibility timeout
    finally:
        baton_celery.uninstall(app)


def test_a_worker_cut_off_from_its_broker_asks_the_gate() -> None:
    """Not a worker, not connected yet, or reconnected since the message was published:
    a revoke may have been missed."""
    previous = revokes._since
    app = make_app(shared_redis_url(unique_prefix()))
    rt = baton_celery.install(app)
    context = Context(delivery_info={"redelivered": False}, is_eager=False)
    published = time.time()
    try:
        revokes._since = None
        assert revokes.since() is None
        assert not _gate_known(StepRef(rt, "w", "s", 1, published), context)
        revokes._since = multiprocessing.RawValue("d", 0.0)  # made, not started
        assert revokes.since() is None
        assert not _gate_known(StepRef(rt, "w", "s", 1, published), context)
        revokes._since.value = published + 1  # reconnected after the publication
        assert not _gate_known(StepRef(rt, "w", "s", 1, published), context)
        revokes._since.value = published - 1
        assert _gate_known(StepRef(rt, "w", "s", 1, published), context)
    finally:
        revokes._since = previous
        baton_celery.uninstall(app)


def test_the_worker_marks_since_when_it_receives_revokes(store_url: str) -> None:
    app = make_app(store_url)
    baton_celery.install(app)
    try:
        before = time.time()
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            since = revokes.since()
            assert since is not None and before <= since <= time.time()
        assert revokes.since() is None  # stopped with the consumer
        app.conf.worker_enable_remote_control = False
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            assert revokes.since() is None  # revokes never arrive: no fast path
    finally:
        baton_celery.uninstall(app)
    assert revokes.ReceivesRevokes not in app.steps["consumer"]


def test_metrics_time_a_long_step_whose_begin_the_watchdog_sent() -> None:
    """The queue wait and the run time of a fast-path step whose executing event the
    watchdog's thread made (no task request is current there)."""
    from prometheus_client import REGISTRY

    label = f"long-{uuid.uuid4().hex[:8]}"
    app = make_app(shared_redis_url(unique_prefix()), baton_running_after=0.2, baton_metrics=True)
    block, release, client = blocking_task(app)

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"workflow_label": label, "step": "a"}) or 0.0

    baton_celery.install(app)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            job = f"a-{uuid.uuid4()}"
            with ran(job):
                handle = Workflow(label=label).add("a", block.s().set(task_id=job)).apply_async(app)
                wait_executing(handle, "a")
                release()
        assert value("baton_step_queue_wait_seconds_count") == 1
        assert value("baton_step_run_seconds_count") == 1
        assert value("baton_step_run_seconds_sum") >= 0.2
    finally:
        client.close()
        baton_celery.uninstall(app)


def test_a_run_ended_without_a_settle_is_left_executing(store_url: str) -> None:
    """A task that raises Ignore settles nothing: as on the gated path, the step is left
    executing (for the backstop), its begin sent by the watchdog."""
    from celery.exceptions import Ignore

    app = make_app(store_url, baton_running_after=0.1)

    @app.task(name=f"{app.main}.ignore", shared=False)
    def ignore() -> None:
        raise Ignore()

    store = baton_celery.install(app).store
    calls: list[str] = []
    spy(store, calls)
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
            job = f"a-{uuid.uuid4()}"
            with ran(job):
                handle = Workflow().add("a", ignore.s().set(task_id=job)).apply_async(app)
            wait_executing(handle, "a")
        assert calls == ["begin"]
        assert [(e.state, e.attempt) for e in handle.events()] == [("executing", 1)]
    finally:
        baton_celery.uninstall(app)
