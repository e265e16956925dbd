"""Crashes and outages, on real prefork workers (-c 2) with the Redis store:

- a pool process SIGKILLed mid-step, with acks_late + task_reject_on_worker_lost: the
  step is redelivered (a second "executing", same job id, next attempt), settles once, and
  the workflow finishes once — on a Redis broker and on RabbitMQ;
- the same without them: the step is "discarded" (worker lost) and its dependents cascade;
- the whole worker SIGKILLed mid-workflow: another worker picks the step up (RabbitMQ
  redelivers it), or the backstop settles what was lost; the workflow finishes once;
- the store's Redis stopped mid-workflow: tasks keep running and end within a bound, the
  errors are logged, and once Redis is back the backstop and new workflows proceed.

Every name on the brokers and the store is unique to the test; the store's Redis that is
stopped is a redis-server of the test's own.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import pytest
from harness import BROKERS, WAIT, Cluster, LocalRedis, Steps, finishes, states, step_events

import baton_celery
from baton_celery import Workflow, backstop


def rig(make: Callable[..., Cluster], broker: str = "redis", **flags: Any) -> tuple[Cluster, Steps]:
    """A cluster of one worker on the Redis store (a prefetch of one, a 1 s store
    timeout), and the ``step`` task for the test."""
    flags = {"store": "redis", "prefetch": 1, "store_timeout": 1.0, **flags}
    cluster = make("fault", broker, **flags)
    return cluster, cluster.steps()


# --- a pool process killed mid-step --------------------------------------------------


@pytest.mark.parametrize("broker", sorted(BROKERS))
def test_redelivered_step_runs_again_settles_once_and_finishes_once(
    make_cluster: Callable[..., Cluster], broker: str
) -> None:
    cluster, steps = rig(make_cluster, broker, acks_late=True)
    handle = (
        Workflow(label="redelivery")
        .add("a", steps.s("a", block=True))
        .add("b", steps.s("b"), deps=["a"])
        .apply_async(app=cluster.app)
    )
    first = steps.wait_started("a")
    os.kill(first, signal.SIGKILL)  # the pool process dies mid-step
    second = steps.wait_started("a")  # redelivered: runs again, in a new pool process
    assert second != first
    steps.release("a")
    events = cluster.events_until_finish(handle.id)
    runs = [e for e in step_events(events, "a") if e["state"] == "executing"]
    assert [e["attempt"] for e in runs] == [1, 2]
    assert len({e["job_id"] for e in runs}) == 1
    assert states(events, "a") == ["executing", "executing", "completed"]
    assert states(events, "b") == ["executing", "completed"]
    assert [f["outcome"] for f in finishes(events)] == ["completed"]
    assert [f["workflow_id"] for f in cluster.finished().drain()] == [handle.id]
    assert handle.status().steps["a"].attempt == 2


def test_without_acks_late_a_lost_step_is_discarded_and_dependents_cascade(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster, steps = rig(make_cluster, acks_late=False)
    handle = (
        Workflow(label="lost")
        .add("a", steps.s("a", block=True))
        .add("b", steps.s("b"), deps=["a"])
        .add("c", steps.s("c"), deps=["b"])
        .apply_async(app=cluster.app)
    )
    os.kill(steps.wait_started("a"), signal.SIGKILL)
    events = cluster.events_until_finish(handle.id)
    (lost,) = [e for e in step_events(events, "a") if e["state"] == "discarded"]
    assert "WorkerLostError" in lost["error"]
    assert states(events, "b") == ["cancelled"]
    assert states(events, "c") == ["cancelled"]
    (finish,) = finishes(events)
    assert (finish["outcome"], finish["failed_steps"]) == ("failed", ["a", "b", "c"])
    assert cluster.db.llen(steps.key("started", "a")) == 0  # it never ran again


# --- the whole worker killed mid-workflow ---------------------------------------------


def test_whole_worker_killed_another_worker_picks_the_step_up(
    make_cluster: Callable[..., Cluster],
) -> None:
    """RabbitMQ requeues what a dead connection had not acked (acks_late)."""
    cluster, steps = rig(make_cluster, "amqp", acks_late=True)
    handle = (
        Workflow(label="worker-killed")
        .add("a", steps.s("a", block=True))
        .add("b", steps.s("b"), deps=["a"])
        .apply_async(app=cluster.app)
    )
    steps.wait_started("a")
    cluster.kill_worker(cluster.workers[0])
    cluster.start_worker()
    steps.wait_started("a")
    steps.release("a")
    events = cluster.events_until_finish(handle.id)
    assert [e["attempt"] for e in step_events(events, "a") if e["state"] == "executing"] == [1, 2]
    assert [f["outcome"] for f in finishes(events)] == ["completed"]
    assert len(cluster.finished().drain()) == 1


def test_whole_worker_killed_the_backstop_finishes_the_workflow_once(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Without acks_late the running steps' messages are gone with the worker: the backstop
    settles them, the dependents cascade, and the workflow finishes once — however often
    it sweeps, and while another worker runs."""
    cluster, steps = rig(make_cluster, acks_late=False)
    handle = (
        Workflow(label="worker-killed-backstop")
        .add("a", steps.s("a", block=True))
        .add("b", steps.s("b", block=True))
        .add("c", steps.s("c"), deps=["a", "b"])
        .apply_async(app=cluster.app)
    )
    steps.wait_started("a")
    steps.wait_started("b")
    cluster.kill_worker(cluster.workers[0])
    cluster.start_worker()
    assert handle.status().steps["a"].state == "executing"
    later = time.time() + 120  # as if two minutes had passed without progress
    reports = [backstop.sweep(cluster.app, stuck_after=60, now=later) for _ in range(3)]
    assert sorted(s for _, s, _ in reports[0].settled) == ["a", "b"]
    assert reports[1].settled == reports[2].settled == []
    events = cluster.events_until_finish(handle.id)
    assert "worker lost or hung" in step_events(events, "a")[-1]["error"]
    assert states(events, "c") == ["cancelled"]
    (finish,) = finishes(events)  # once, by this process's sweep; no worker sent one
    assert finish["failed_steps"] == ["a", "b", "c"]
    assert finish["source"].startswith("client/") and cluster.finished().drain() == []


# --- the store's Redis away -------------------------------------------------------------


def test_store_redis_down_tasks_keep_running_and_state_resumes(
    own_redis: LocalRedis, make_cluster: Callable[..., Cluster]
) -> None:
    cluster, steps = rig(make_cluster, acks_late=False, store=own_redis.url)
    handle = (
        Workflow(label="store-down")
        .add("a", steps.s("a", block=True))
        .add("b", steps.s("b"), deps=["a"])
        .apply_async(app=cluster.app)
    )
    steps.wait_started("a")
    own_redis.stop()  # the store goes away while "a" runs
    released = time.time()
    steps.release("a")
    # The task ends (its success hook fails on the store, bounded by the timeout).
    postruns = cluster.postruns().wait(bool, WAIT, "the postrun of a", cluster.diagnose)
    (_task_id, state, _source, ended) = postruns[0]
    assert state == "SUCCESS"
    assert ended - released < 10.0  # store_timeout is 1 s: no hang
    # Starting a workflow while the store is down fails loudly, publishing nothing.
    with pytest.raises(baton_celery.StoreError):
        Workflow().add("x", steps.s("x")).apply_async(app=cluster.app)  # nothing published
    log = cluster.log()
    assert "task_success hook failed" in log and "StoreError" in log

    own_redis.start()  # back, with its data (append-only file)
    assert handle.status().steps["a"].state == "executing"  # the settle was lost
    report = backstop.sweep(cluster.app, stuck_after=60, now=time.time() + 120)
    assert [s for _, s, _ in report.settled] == ["a"]
    events = cluster.events_until_finish(handle.id)
    assert [f["outcome"] for f in finishes(events)] == ["failed"]
    # New workflows run normally on the same worker: its connections recovered.
    again = Workflow().add("c", steps.s("c")).add("d", steps.s("d"), deps=["c"])
    done = again.apply_async(app=cluster.app)
    events = cluster.events_until_finish(done.id)
    assert [f["outcome"] for f in finishes(events)] == ["completed"]
