"""The Celery app every integration test runs in real ``celery worker`` processes.

``create_app(settings)`` builds the app of one test cluster; the test process builds the
same app from the same :class:`Settings` as its client. Its flags: the broker and the
store, the bridge on or off, acks_late (with task_reject_on_worker_lost), the prefetch
and the store's timeout. Run as a worker (``celery -A worker_app worker``), the module
reads them from the ``BATON_IT_*`` environment the harness sets, and reports to a Redis
"sink" that the test process reads: this is how a test observes a prefork worker.

Sink keys (all under ``BATON_IT_PREFIX``, unique to one test session):

- ``{prefix}:events:{workflow_id}``  every event of a workflow, JSON, with its ``source``
- ``{prefix}:finished:{cluster}``    every WorkflowFinished sent by that cluster's workers
- ``{prefix}:postrun:{cluster}``     ``[task_id, state, source, time]`` per task_postrun
- ``{prefix}:ready:{node}``          the node name, pushed once the worker is ready
- ``{prefix}:{tag}:...``             per-test task bookkeeping (calls, started, release, deps)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import redis
from celery import Celery, signals
from kombu import Exchange, Queue

import baton_celery

STEP = "baton_it.step"
TOUCH = "baton_it.touch"


@dataclasses.dataclass(frozen=True)
class Settings:
    """One cluster's app; every name in it is unique to the cluster."""

    broker: str
    store: str
    queue: str
    broker_prefix: str  # kombu's global_keyprefix on a Redis broker
    bridge_exchange: str | None = None  # the bridge on, publishing on this exchange
    acks_late: bool = False  # with task_reject_on_worker_lost
    prefetch: int = 4
    store_timeout: float = 5.0
    otel_spans: str | None = None  # baton_otel on, every process's spans to this file
    metrics_dir: str | None = None  # baton_metrics on, PROMETHEUS_MULTIPROC_DIR for workers
    # The workers forward every event to the sink through a receiver of their own; off,
    # no receiver runs in them (steps take the path that does not wait for the store),
    # and the tests follow the events through a listener and the store's history.
    observe_events: bool = True
    fast_begin: bool = False  # baton_fast_begin

    @property
    def control(self) -> str:
        return f"{self.queue}-control"

    def env(self) -> dict[str, str]:
        return {f"BATON_IT_{k.upper()}": json.dumps(v) for k, v in vars(self).items()}

    @classmethod
    def from_env(cls) -> Settings:
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: json.loads(os.environ[f"BATON_IT_{n.upper()}"]) for n in names})


def create_app(settings: Settings) -> Celery:
    """The app of one cluster; the client and its workers build it from the same settings."""
    queue = settings.queue
    transport_options: dict[str, Any] = {}
    if settings.broker.startswith("redis"):
        transport_options["global_keyprefix"] = settings.broker_prefix
    app = Celery(f"baton_it-{queue}")
    app.conf.update(
        broker_url=settings.broker,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        baton_store=settings.store,
        baton_store_timeout=settings.store_timeout,
        baton_fast_begin=settings.fast_begin,
        baton_snooze_delay=0.2,
        task_ignore_result=True,
        task_acks_late=settings.acks_late,
        task_reject_on_worker_lost=settings.acks_late,
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        # Durable: a killed worker's unacked messages must outlive its connection.
        task_queues=[Queue(queue, Exchange(queue, auto_delete=True), routing_key=queue)],
        control_exchange=settings.control,
        worker_prefetch_multiplier=settings.prefetch,
        worker_redirect_stdouts=False,
    )

    if settings.bridge_exchange is not None:
        app.conf.update(baton_bridge=True, baton_bridge_exchange=settings.bridge_exchange)
    if settings.otel_spans is not None:
        app.conf.update(baton_otel=True)
    if settings.metrics_dir is not None:
        app.conf.update(baton_metrics=True)

    @app.task(name=STEP, shared=False, bind=True, max_retries=2, default_retry_delay=0.1)
    def step(
        self: Any,
        tag: str,
        name: str,
        fail_times: int = 0,
        fail_forever: bool = False,
        block: bool = False,
        block_timeout: float = 60.0,
        retry_countdown: float = 0.1,
        hold_retry_hook: bool = False,
    ) -> dict[str, Any]:
        """Counts its runs; can block until released (``started`` gets its pool process
        id), fail N times then pass, or always fail; records what
        ``dependency_results()`` gave it. ``hold_retry_hook`` is read by
        :func:`hold_retry_hook`, which runs before baton's task_retry receiver."""
        db = sink()
        runs = int(db.incr(tag_key(tag, "calls", name)))
        if block:
            db.rpush(tag_key(tag, "started", name), os.getpid())
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
        except baton_celery.StoreError:  # the store is down: the task runs on regardless
            deps = "store error"
        db.rpush(tag_key(tag, "deps", name), json.dumps(deps))
        return {"step": name, "run": runs}

    @app.task(name=TOUCH, shared=False)
    def touch() -> None:
        return None

    baton_celery.install(app)
    return app


# --- running as a worker: reporting to the sink ---------------------------------------

PREFIX = os.environ.get("BATON_IT_PREFIX", "baton-it:unset")
CLUSTER = os.environ.get("BATON_IT_CLUSTER", "unset")
NODE = os.environ.get("BATON_IT_NODE", "unset")

_sink: tuple[int, redis.Redis] | None = None


def sink() -> redis.Redis:
    """This process's sink client (a new one after a fork)."""
    global _sink
    if _sink is None or _sink[0] != os.getpid():
        client = redis.Redis.from_url(os.environ["BATON_IT_SINK"], socket_timeout=120)
        _sink = (os.getpid(), client)
    return _sink[1]


def sink_key(prefix: str, *parts: str) -> str:
    return ":".join((prefix, *parts))


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
    record = [task_id, state, source(), time.time()]
    sink().rpush(sink_key(PREFIX, "postrun", CLUSTER), json.dumps(record))


def announce_ready(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None) or NODE
    sink().rpush(sink_key(PREFIX, "ready", NODE), hostname)


def observe(**_: Any) -> None:
    """In a worker's main process, before its pool forks: report to the sink. (Other
    commands of this app, ``celery baton watch``, report nothing.)"""
    if Settings.from_env().observe_events:
        # A receiver that raises beside the forwarder: the forwarder must still get every
        # event (blinker keeps no order between receivers, so either may run first).
        baton_celery.subscribe_all(explode)
        baton_celery.subscribe_all(forward)
    signals.task_postrun.connect(record_postrun, weak=False)
    signals.worker_ready.connect(announce_ready, weak=False)


if "BATON_IT_BROKER" in os.environ:
    # Connected before create_app() installs baton: Celery calls receivers in order.
    signals.task_retry.connect(hold_retry_hook, weak=False)
    _settings = Settings.from_env()
    if _settings.otel_spans is not None:
        from span_lines import trace_to

        trace_to(_settings.otel_spans)  # before the pool forks: no thread to lose
    app = create_app(_settings)
    signals.worker_init.connect(observe, weak=False)
