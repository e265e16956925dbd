"""Canvas end to end: each shape run twice on a real prefork ``celery worker`` on a real
broker (Redis, RabbitMQ), once by Celery itself with a Redis result backend, once by baton through
``Workflow.from_canvas`` with no result backend; the results must be identical, with
every step's events and one finish (received here through the broker bridge).

Self-contained: this file is also the workers' app module (``-A test_canvas_e2e``),
configured by environment variables; a worker says it is ready by pushing its node name
on a Redis list the test blocks on.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import redis
from celery import Celery, chain, chord, group, signals

import baton_celery
from baton_celery import Workflow, WorkflowError, collect_events

HERE = Path(__file__).resolve().parent
REDIS = "redis://127.0.0.1:6379/0"
BROKERS = {"redis": REDIS, "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//"}
TIMEOUT = 30.0
READY_TIMEOUT = 60


def make_app(mode: str, tag: str, broker: str) -> Celery:
    app = Celery(f"canvas-e2e-{tag}-{mode}", set_as_current=False)
    conf: dict[str, Any] = {
        "broker_url": BROKERS[broker],
        "task_default_queue": f"canvas-e2e-{tag}-{mode}",
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }
    if mode == "celery":
        conf["result_backend"] = REDIS
    else:
        conf.update(
            task_ignore_result=True,
            baton_store=f"{REDIS}?key_prefix=canvas-e2e-{tag}",
            baton_bridge=True,
            baton_bridge_exchange=f"canvas-e2e-{tag}",
        )
    app.conf.update(conf)

    @app.task(name=f"{app.main}.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name=f"{app.main}.tsum")
    def tsum(xs: list[Any]) -> Any:
        return sum(xs)

    @app.task(name=f"{app.main}.pair")
    def pair(*args: Any, **kwargs: Any) -> Any:
        return [list(args), kwargs]

    @app.task(name=f"{app.main}.boom")
    def boom(*args: Any) -> None:
        raise ValueError("boom")

    if mode == "baton":
        baton_celery.install(app)
    return app


if os.environ.get("CANVAS_E2E_MODE"):  # imported by a worker
    worker_app = make_app(
        os.environ["CANVAS_E2E_MODE"], os.environ["CANVAS_E2E_TAG"], os.environ["CANVAS_E2E_BROKER"]
    )

    @signals.worker_ready.connect
    def _ready(sender: Any = None, **_: Any) -> None:
        with redis.Redis.from_url(REDIS) as db:
            db.rpush(os.environ["CANVAS_E2E_READY"], "ready")


class T:
    """The tasks of one app, by short name: ``T(app).add.s(1, 2)``. Each app's tasks
    have their own names: Celery warns when two apps of a process register one name."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def __getattr__(self, name: str) -> Any:
        return self.app.tasks[f"{self.app.main}.{name}"]


def start_worker(mode: str, tag: str, broker: str) -> Iterator[Celery]:
    ready = f"canvas-e2e-ready-{tag}-{mode}"
    env = {
        **os.environ,
        "CANVAS_E2E_MODE": mode,
        "CANVAS_E2E_TAG": tag,
        "CANVAS_E2E_BROKER": broker,
        "CANVAS_E2E_READY": ready,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    app = make_app(mode, tag, broker)
    cmd = [
        sys.executable, "-m", "celery", "-A", "test_canvas_e2e:worker_app", "worker",
        "-P", "prefork", "-c", "2", "-l", "warning", "-n", f"{mode}-{tag}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    process = subprocess.Popen(cmd, cwd=HERE, env=env)
    try:
        with redis.Redis.from_url(REDIS) as db:
            if db.blpop([ready], timeout=READY_TIMEOUT) is None:
                pytest.fail(f"the {mode} worker was not ready in {READY_TIMEOUT} s")
        yield app
    finally:
        process.terminate()
        process.wait(timeout=30)
        close_result_backend(app)
        with redis.Redis.from_url(REDIS) as db:
            db.delete(ready)


def close_result_backend(app: Celery) -> None:
    """Close the sockets of the Redis result backend's client and result consumer: left
    to the garbage collector, they would fail a later test with a ResourceWarning."""
    if app.conf.result_backend is None:
        return
    # An AsyncResult collected later unsubscribes in __del__, which would open a new
    # pub/sub connection: collect the tests' results first, while the consumer is open.
    gc.collect()
    backend = app.backend
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None:
        consumer.stop()
        # Results still alive would unsubscribe from a closed consumer, reconnecting.
        consumer.subscribed_to.clear()
    backend.client.connection_pool.disconnect()
    backend.client.close()


@pytest.fixture(scope="module", params=sorted(BROKERS))
def broker(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def tag(broker: str) -> str:
    return f"{broker}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def celery_app(tag: str, broker: str) -> Iterator[Celery]:
    yield from start_worker("celery", tag, broker)


@pytest.fixture(scope="module")
def baton_app(tag: str, broker: str) -> Iterator[Celery]:
    for app in start_worker("baton", tag, broker):
        with baton_celery.listen(app):
            yield app
        baton_celery.uninstall(app)


SHAPES: dict[str, Callable[[T], Any]] = {
    "chain": lambda t: chain(t.add.s(1, 2), t.add.s(3), t.add.s(4)),
    "group": lambda t: group(t.add.s(1, 1), t.add.s(2, 2)),
    "chord": lambda t: chord([t.add.s(i, i) for i in range(5)], t.tsum.s()),
    "chain of chords": lambda t: chain(
        chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s()),
        chord([t.add.s(1), t.add.s(2)], t.tsum.s()),
    ),
    "chord of chains": lambda t: chord(
        [chain(t.add.s(1, 1), t.add.s(1)), chain(t.add.s(2, 2), t.add.s(2))], t.tsum.s()
    ),
    "group in a chain": lambda t: chain(t.add.s(1, 1), group(t.add.s(1), t.add.s(2))),
    "chain in a group": lambda t: group(chain(t.add.s(1, 1), t.add.s(10)), t.add.s(5, 5)),
    "chord body a chain": lambda t: chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s() | t.add.s(9)),
    "partials and si": lambda t: chain(t.add.s(1, 1), t.pair.s(7, k="v"), t.pair.si("alone")),
    "group then task": lambda t: chain(group(t.add.s(1, 1), t.add.s(2, 2)), t.tsum.s()),
}


# disable_sync_subtasks=False: after an in-process worker ran in this pytest process (the
# unit tests), Celery takes every .get() for one inside a task and refuses it.


def run_baton(app: Celery, canvas: Any) -> Any:
    workflow = Workflow.from_canvas(canvas)
    with collect_events(workflow.id) as log:
        handle = workflow.apply_async(app)
        (finished,) = log.wait_finished(timeout=TIMEOUT)
    assert len(log.finished) == 1 and finished.outcome == handle.wait(timeout=TIMEOUT).outcome
    return handle, log


@pytest.mark.parametrize("shape", SHAPES)
def test_same_result_as_celery_without_a_result_backend(
    celery_app: Celery, baton_app: Celery, shape: str
) -> None:
    expected = (
        SHAPES[shape](T(celery_app)).apply_async().get(timeout=TIMEOUT, disable_sync_subtasks=False)
    )
    handle, log = run_baton(baton_app, SHAPES[shape](T(baton_app)))
    assert handle.result() == expected
    assert log.finished[0].outcome == "completed"
    for name in handle.status().steps:
        assert log.states(name) == ["executing", "completed"]


def test_failing_chain_link_names_the_links_celery_drops(
    celery_app: Celery, baton_app: Celery
) -> None:
    def make(t: T) -> Any:
        return chain(t.add.s(1, 1), t.boom.s(), t.add.s(1), t.add.s(2))

    with pytest.raises(ValueError, match="boom"):
        make(T(celery_app)).apply_async().get(timeout=TIMEOUT, disable_sync_subtasks=False)
    handle, log = run_baton(baton_app, make(T(baton_app)))
    assert log.finished[0].failed_steps == ("boom", "add#2", "add#3")
    assert log.states("add#2") == log.states("add#3") == ["cancelled"]
    with pytest.raises(WorkflowError, match="add#3"):
        handle.result()


def test_failing_chord_header_cancels_the_body(baton_app: Celery) -> None:
    t = T(baton_app)
    _, log = run_baton(
        baton_app, chord([t.add.s(1, 1), group(t.boom.s(), t.add.s(2, 2))], t.tsum.s())
    )
    assert log.finished[0].failed_steps == ("boom", "tsum")
    assert log.states("tsum") == ["cancelled"]
