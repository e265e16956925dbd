"""End-to-end: a workflow's history, on real prefork workers, over Redis and RabbitMQ, with
the SQLite and the Redis store: equal to what a live listener saw (read back from a fresh
process), replayed whole to a listener started after the workflow ran unwatched, and
given once to listeners started in the middle of a run."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from typing import Any, Callable

import pytest
from harness import Cluster, Steps

import baton_celery
from baton_celery import Workflow, WorkflowHandle, collect_events, event_from_dict
from baton_celery.events import Event
from baton_celery.testing import EventLog

TIMEOUT = 60.0

#: (broker, store): the broker bridge on either broker, and the Redis store's own feed.
FEEDS = [("redis", "sqlite"), ("amqp", "redis")]


@pytest.fixture(params=FEEDS, ids=lambda p: f"{p[0]}-broker-{p[1]}-store")
def bridged(request: pytest.FixtureRequest, make_cluster: Callable[..., Cluster]) -> Cluster:
    broker, store = request.param
    return make_cluster("history", broker, store=store, bridge=True)


def diamond(steps: Steps, label: str, **first: Any) -> WorkflowHandle:
    """a -> (b, which fails once and retries; c) -> d; ``first`` goes to a's step."""
    return (
        Workflow(label=label)
        .add("a", steps.s("a", **first))
        .add("b", steps.s("b", fail_times=1), deps=["a"])
        .add("c", steps.s("c"), deps=["a"])
        .add("d", steps.s("d"), deps=["b", "c"])
        .apply_async(app=steps.cluster.app)
    )


READ_HISTORY = """
import json, sys
from celery import Celery
import baton_celery
app = Celery("reader", set_as_current=False)
app.conf.baton_store = sys.argv[1]
baton_celery.install(app)
handle = baton_celery.WorkflowHandle(sys.argv[2], app)
print(json.dumps([event.to_dict() for event in handle.events()]))
"""


def history_in_a_fresh_process(cluster: Cluster, workflow_id: str) -> list[Event]:
    done = subprocess.run(
        [sys.executable, "-c", READ_HISTORY, cluster.settings.store, workflow_id],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return [event_from_dict(data) for data in json.loads(done.stdout)]


def test_the_history_is_what_a_live_listener_saw(bridged: Cluster) -> None:
    with collect_events() as log, baton_celery.listen(bridged.app) as listener:
        assert listener.ready
        handle = diamond(bridged.steps(), "history")
        log.wait_finished(timeout=TIMEOUT)
    history = history_in_a_fresh_process(bridged, handle.id)
    assert list(log) == history
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    stamps = [e.timestamp for e in history]
    assert stamps == sorted(stamps)


def test_a_listener_started_after_an_unwatched_run_replays_it_all(bridged: Cluster) -> None:
    since = datetime.now(timezone.utc)
    handles = [diamond(bridged.steps(), f"unwatched-{i}") for i in range(3)]
    for handle in handles:
        assert handle.wait(timeout=TIMEOUT).outcome == "completed"
    with collect_events() as log, baton_celery.listen(bridged.app, since=since) as listener:
        assert listener.ready  # listen() returns once the replay is done
    for handle in handles:
        got = [e for e in log if e.workflow_id == handle.id]
        assert got == handle.events(), "the whole story, in order, each event once"
        assert len(log.finished) >= 3 and got[-1] in log.finished


def test_listeners_started_mid_run_get_each_event_once(bridged: Cluster) -> None:
    """Two listeners start while step a runs: one replays since before the workflow was
    made, the other (no ``since``) follows from its own start; each gets every event of
    its window exactly once, in order."""
    steps = bridged.steps()
    since = datetime.now(timezone.utc)
    handle = diamond(steps, "mid-run", block=True)
    steps.wait_started("a")
    early, late = EventLog(), EventLog()
    with (
        baton_celery.listen(bridged.app, since=since, deliver=early.add) as replaying,
        baton_celery.listen(bridged.app, deliver=late.add) as following,
    ):
        assert replaying.ready and following.ready
        started = following._started
        steps.release("a")
        early.wait_finished(timeout=TIMEOUT)
        late.wait_finished(timeout=TIMEOUT)
    history = handle.events()
    assert [e for e in early if e.workflow_id == handle.id] == history
    mine = [e for e in late if e.workflow_id == handle.id]
    assert mine == [e for e in history if e.timestamp.timestamp() >= started]
    assert mine[0].seq > 1 and mine[-1] == history[-1]  # a's executing came before
