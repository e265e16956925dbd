"""The Celery app the integration tests run in real ``celery worker`` processes.

``create_app()`` builds the app for one test "cluster" (a broker, a store, a queue); the
test process builds the same app as its client. Run as a worker (``celery -A
baton_worker_app worker``), the module reads its configuration from environment variables
set by the fixture that starts it, and forwards every baton event, every task_postrun and
its readiness to a Redis "sink" that the test process reads: this is how a test observes a
prefork worker from the outside.

Sink keys (all under ``BATON_IT_PREFIX``, unique to one test session):

- ``{prefix}:events:{workflow_id}``  every event of a workflow, JSON, with its ``source``
- ``{prefix}:finished:{cluster}``    every WorkflowFinished sent by that cluster's workers
- ``{prefix}:postrun:{cluster}``     ``[task_id, state, source]`` per task_postrun
- ``{prefix}:ready:{node}``          the node name, pushed once the worker is ready
- ``{prefix}:{tag}:...``             per-test task bookkeeping (calls, started, release, deps)
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery, signals
from kombu import Exchange, Queue

import baton_celery

STEP = "baton_it.step"
TOUCH = "baton_it.touch"


def sink_key(prefix: str, *parts: str) -> str:
    return ":".join((prefix, *parts))


def create_app(
    *,
    broker: str,
    store: str,
    queue: str,
    control: str,
    broker_prefix: str,
    snooze_delay: float = 0.2,
) -> Celery:
    """The app of one cluster; the client and its workers build it with the same args.

    Every broker-side name is unique to the test session (``queue``, ``control``, and on
    Redis a ``global_keyprefix``), so nothing collides with other users of the broker.
    """
    transport_options: dict[str, Any] = {}
    if broker.startswith("redis"):
        transport_options["global_keyprefix"] = broker_prefix
    app = Celery(f"baton_it-{queue}")
    exchange = Exchange(queue, type="direct", auto_delete=True)
    app.conf.update(
        broker_url=broker,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        baton_store=store,
        baton_snooze_delay=snooze_delay,
        task_ignore_result=True,
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        task_queues=[Queue(queue, exchange, routing_key=queue, auto_delete=True)],
        control_exchange=control,
        worker_prefetch_multiplier=4,
        worker_redirect_stdouts=False,
    )

    @app.task(name=STEP, shared=False, bind=True, max_retries=2, default_retry_delay=0.1)
    def step(
        self: Any,
        tag: str,
        name: str,
        fail_times: int = 0,
        fail_forever: bool = False,
        block: bool = False,
        block_timeout: float = 30.0,
        retry_countdown: float = 0.1,
        hold_retry_hook: bool = False,
    ) -> dict[str, Any]:
        """Counts its runs; can block until released, fail N times then pass, or always
        fail; records what ``dependency_results()`` gave it. ``hold_retry_hook`` is read
        by :func:`hold_retry_hook`, which runs before baton's task_retry receiver."""
        db = sink()
        runs = int(db.incr(tag_key(tag, "calls", name)))
        if block:
            db.rpush(tag_key(tag, "started", name), self.request.id)
            if db.blpop([tag_key(tag, "release", name)], timeout=block_timeout) is None:
                raise TimeoutError(f"{name} was never released")
        if fail_forever:
            raise ValueError(f"{name} is broken")
        if runs <= fail_times:
            raise self.retry(exc=RuntimeError(f"{name} flaked"), countdown=retry_countdown)
        try:
            deps: Any = baton_celery.dependency_results()
        except baton_celery.NotAStepError:
            deps = "not a step"
        db.rpush(tag_key(tag, "deps", name), json.dumps(deps))
        return {"step": name, "run": runs}

    @app.task(name=TOUCH, shared=False)
    def touch() -> None:
        return None

    baton_celery.install(app)
    return app


# --- running as a worker: configuration from the environment ------------------------

PREFIX = os.environ.get("BATON_IT_PREFIX", "baton-it:unset")
CLUSTER = os.environ.get("BATON_IT_CLUSTER", "unset")
NODE = os.environ.get("BATON_IT_NODE", "unset")

_sink: tuple[int, redis.Redis] | None = None


def sink() -> redis.Redis:
    """This process's sink client (a new one after a fork)."""
    global _sink
    if _sink is None or _sink[0] != os.getpid():
        client = redis.Redis.from_url(os.environ["BATON_IT_SINK"], socket_timeout=60)
        _sink = (os.getpid(), client)
    return _sink[1]


def tag_key(tag: str, *parts: str) -> str:
    return sink_key(PREFIX, tag, *parts)


def source() -> str:
    return f"{NODE}/{os.getpid()}"


def forward(workflow_id: str, event: baton_celery.Event) -> None:
    data = event.to_dict()
    data["source"] = source()
    payload = json.dumps(data)
    pipe = sink().pipeline(transaction=False)
    pipe.rpush(sink_key(PREFIX, "events", workflow_id), payload)
    if isinstance(event, baton_celery.WorkflowFinished):
        pipe.rpush(sink_key(PREFIX, "finished", CLUSTER), payload)
    pipe.execute()


def explode(workflow_id: str, event: baton_celery.Event) -> None:
    if event.workflow_label == "raise-receiver":
        raise RuntimeError("a subscriber bug")


def hold_retry_hook(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Fault injection: hold this task_retry (and so baton's, connected after it) until
    the test says so. Celery publishes the retry *before* it sends task_retry, so another
    pool process may begin the next attempt first; this makes that interleaving certain."""
    kwargs = getattr(request, "kwargs", None) or {}
    if kwargs.get("hold_retry_hook"):
        tag, name = request.args[:2]
        sink().rpush(tag_key(tag, "retry-held", name), request.id)
        sink().blpop([tag_key(tag, "retry-release", name)], timeout=30)


def record_postrun(task_id: str = "", state: Any = None, **_: Any) -> None:
    sink().rpush(sink_key(PREFIX, "postrun", CLUSTER), json.dumps([task_id, state, source()]))


def announce_ready(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None) or NODE
    sink().rpush(sink_key(PREFIX, "ready", NODE), hostname)


if "BATON_IT_BROKER" in os.environ:
    # Connected before create_app() installs baton: Celery calls receivers in order.
    signals.task_retry.connect(hold_retry_hook, weak=False)
    app = create_app(
        broker=os.environ["BATON_IT_BROKER"],
        store=os.environ["BATON_IT_STORE"],
        queue=os.environ["BATON_IT_QUEUE"],
        control=os.environ["BATON_IT_CONTROL"],
        broker_prefix=os.environ["BATON_IT_BROKER_PREFIX"],
    )
    # The raising receiver is subscribed first: the forwarder must still get every event.
    baton_celery.subscribe_all(explode)
    baton_celery.subscribe_all(forward)
    signals.task_postrun.connect(record_postrun, weak=False)
    signals.worker_ready.connect(announce_ready, weak=False)
