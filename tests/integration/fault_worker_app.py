"""The Celery app of the fault tests, run in real prefork workers (``celery -A
fault_worker_app worker``), configured by environment variables set by test_faults.py.

The worker reports to a Redis "sink" (FAULT_SINK, keys under FAULT_PREFIX): every baton
event (``events:<workflow id>``), every WorkflowFinished (``finished``), each step run
(``started:<tag>:<step>``: the pool process id), each task_postrun (``postrun``) and its
readiness (``ready:<node>``); ``wake:<workflow id>`` gets a token per event. A step can
block until the test releases it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery, signals

import baton_celery

STEP = "fault.step"

PREFIX = os.environ.get("FAULT_PREFIX", "fault:unset")
NODE = os.environ.get("FAULT_NODE", "unset")


def create_app(broker: str, store: str, queue: str, control: str, acks_late: bool) -> Celery:
    """The app of one test; the client and the workers build it with the same arguments."""
    app = Celery(f"fault-{queue}")
    app.conf.update(
        broker_url=broker,
        broker_connection_retry_on_startup=True,
        baton_store=store,
        baton_store_timeout=1.0,
        baton_snooze_delay=0.2,
        task_ignore_result=True,
        task_default_queue=queue,
        task_acks_late=acks_late,
        task_reject_on_worker_lost=acks_late,
        control_exchange=control,
        worker_prefetch_multiplier=1,
        worker_redirect_stdouts=False,
    )

    @app.task(name=STEP, bind=True, shared=False)
    def step(self: Any, tag: str, name: str, block: bool = False) -> str:
        db = sink()
        db.rpush(key("started", tag, name), os.getpid())
        if block and db.blpop([key("release", tag, name)], timeout=60) is None:
            raise TimeoutError(f"{name} was never released")
        return name

    baton_celery.install(app)
    return app


_sink: tuple[int, redis.Redis] | None = None


def sink() -> redis.Redis:
    global _sink
    if _sink is None or _sink[0] != os.getpid():
        _sink = (os.getpid(), redis.Redis.from_url(os.environ["FAULT_SINK"], socket_timeout=60))
    return _sink[1]


def key(*parts: str) -> str:
    return ":".join((PREFIX, *parts))


def forward(workflow_id: str, event: baton_celery.Event) -> None:
    data = event.to_dict()
    data["source"] = f"{NODE}/{os.getpid()}"
    payload = json.dumps(data)
    pipe = sink().pipeline(transaction=False)
    pipe.rpush(key("events", workflow_id), payload)
    if isinstance(event, baton_celery.WorkflowFinished):
        pipe.rpush(key("finished"), payload)
    pipe.rpush(key("wake", workflow_id), "1")  # what a waiting test blocks on
    pipe.execute()


def record_postrun(task_id: str = "", state: Any = None, **_: Any) -> None:
    sink().rpush(key("postrun"), json.dumps([task_id, state, time.time()]))


def announce_ready(sender: Any = None, **_: Any) -> None:
    sink().rpush(key("ready", NODE), "1")


if "FAULT_BROKER" in os.environ:
    app = create_app(
        broker=os.environ["FAULT_BROKER"],
        store=os.environ["FAULT_STORE"],
        queue=os.environ["FAULT_QUEUE"],
        control=os.environ["FAULT_CONTROL"],
        acks_late=os.environ.get("FAULT_ACKS_LATE") == "1",
    )
    baton_celery.subscribe_all(forward)
    signals.task_postrun.connect(record_postrun, weak=False)
    signals.worker_ready.connect(announce_ready, weak=False)
