"""End-to-end: events of workflows run by real prefork workers reach a listener in this
process over real Redis and RabbitMQ, in order, with exactly one finish; a broker
restart; malformed messages on the exchange."""

from __future__ import annotations

import json
import subprocess
import threading
from typing import Any, Callable

import pytest
import redis
from harness import BROKERS, Cluster, LocalRedis, Steps

import baton_celery
from baton_celery import Workflow, WorkflowFinished, WorkflowHandle, collect_events
from baton_celery.envelope import bridge_exchange, process_token
from baton_celery.events import StepUpdated, utcnow
from baton_celery.listener import Listener

TIMEOUT = 60.0


class Tap(Listener):
    """A second listener that records every event as its feed brings it (no reordering,
    no replay, no delivery): what the workers really sent, with their numbers."""

    def __init__(self, app: Any) -> None:
        super().__init__(app, deliver=lambda event: None)
        self.envelopes: list[dict[str, Any]] = []
        self._cond = threading.Condition()

    def on_event(self, event: Any, origin: str) -> None:
        with self._cond:
            self.envelopes.append({"seq": event.seq, "origin": origin, "event": event.to_dict()})
            self._cond.notify_all()

    def wait_count(self, count: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.envelopes) >= count, timeout), (
                f"{len(self.envelopes)} of {count} envelopes arrived"
            )
            return list(self.envelopes)


#: (broker, store): the broker bridge on either broker, and the Redis store's own feed.
FEEDS = [("redis", "sqlite"), ("amqp", "sqlite"), ("amqp", "redis")]


@pytest.fixture(params=FEEDS, ids=lambda p: f"{p[0]}-broker-{p[1]}-store")
def bridged(request: pytest.FixtureRequest, make_cluster: Callable[..., Cluster]) -> Cluster:
    broker, store = request.param
    return make_cluster("bridge", broker, store=store, bridge=True)


def diamond(steps: Steps, label: str) -> WorkflowHandle:
    """a -> (b, which fails once and retries; c) -> d."""
    return (
        Workflow(label=label)
        .add("a", steps.s("a"))
        .add("b", steps.s("b", fail_times=1), deps=["a"])
        .add("c", steps.s("c"), deps=["a"])
        .add("d", steps.s("d"), deps=["b", "c"])
        .apply_async(app=steps.cluster.app)
    )


def key_of(event: Any) -> str:
    data = event if isinstance(event, dict) else event.to_dict()
    return json.dumps(data, sort_keys=True)


def test_listener_receives_every_event_in_order(bridged: Cluster) -> None:
    runs = 6
    with (
        Tap(bridged.app) as tap,
        collect_events() as log,
        baton_celery.listen(bridged.app) as listener,
    ):
        assert listener.ready and tap.wait_ready(10)
        handles = [diamond(bridged.steps(), f"diamond-{i}") for i in range(runs)]
        log.wait_finished(timeout=TIMEOUT, count=runs)
        for handle in handles:
            assert handle.wait(timeout=TIMEOUT).outcome == "completed"
        store = baton_celery.install(bridged.app).store
        total = {h.id: store.load(h.id).seq for h in handles}
        envelopes = tap.wait_count(sum(total.values()))
        assert listener.malformed == 0 and listener.reconnects == 0
    seq_of = {key_of(e["event"]): e["seq"] for e in envelopes}
    # Sent by the workers' processes, not by this one.
    assert {e["origin"] for e in envelopes}.isdisjoint({process_token()})
    for handle in handles:
        sent = sorted(e["seq"] for e in envelopes if e["event"]["workflow_id"] == handle.id)
        assert sent == list(range(1, total[handle.id] + 1)), "every event numbered once"
        got = [e for e in log if e.workflow_id == handle.id]
        assert [seq_of[key_of(e)] for e in got] == sent, "delivered in order, each once"
        finishes = [e for e in got if isinstance(e, WorkflowFinished)]
        assert len(finishes) == 1 and got[-1] is finishes[0]
        steps = [e for e in got if isinstance(e, StepUpdated)]
        states = {n: [e.state for e in steps if e.step_name == n] for n in "abcd"}
        assert states == {
            "a": ["executing", "completed"],
            "b": ["executing", "retryable", "executing", "completed"],
            "c": ["executing", "completed"],
            "d": ["executing", "completed"],
        }


def test_wait_uses_the_live_finish(bridged: Cluster) -> None:
    with baton_celery.listen(bridged.app) as listener:
        assert listener.ready
        handle = diamond(bridged.steps(), "wait")
        finished = handle.wait(timeout=TIMEOUT)
    assert finished.outcome == "completed"
    assert finished == WorkflowHandle(handle.id, bridged.app).wait(timeout=1)


@pytest.fixture(params=sorted(BROKERS))
def bare(request: pytest.FixtureRequest, make_cluster: Callable[..., Cluster]) -> Cluster:
    """A cluster without workers: only its app, exchange and names."""
    return make_cluster("bridge", request.param, workers=0, bridge=True)


def test_malformed_messages_are_dropped_and_the_listener_carries_on(bare: Cluster) -> None:
    exchange = bridge_exchange(bare.settings.bridge_exchange)
    good = StepUpdated("wf-ok", None, "s", "t", "executing", "j", 1, False, None, utcnow(), 1)
    received: list[Any] = []
    arrived = threading.Event()

    def deliver(event: Any) -> None:
        received.append(event)
        arrived.set()

    with Listener(bare.app, deliver=deliver) as listener:
        assert listener.wait_ready(10)
        with bare.app.connection_for_write() as conn:
            producer = conn.Producer()

            def send(body: Any, **options: Any) -> None:
                options.setdefault("content_type", "application/json")
                options.setdefault("content_encoding", "utf-8")
                producer.publish(
                    body, exchange=exchange, routing_key="", declare=[exchange], **options
                )

            envelope = {"v": 1, "seq": 1, "origin": "o"}
            bad = [
                (b"\x80\x04K\x01.", {"content_type": "application/x-python-serialize"}),
                ("{not json", {}),
                (json.dumps({"hello": 1}), {}),
                (json.dumps({"v": 1, "seq": "x", "origin": "o", "event": {}}), {}),
                (json.dumps({"v": 1, "seq": 1, "origin": "o", "event": {"kind": "x"}}), {}),
                (json.dumps({**envelope, "event": {"kind": "step_updated"}}), {}),
                (json.dumps({"v": 1, "seq": 1, "origin": "o", "pad": "x" * 70_000}), {}),
            ]
            for body, options in bad:
                send(body, **options)
            raw = 0
            if bare.broker.startswith("redis"):
                # Not kombu messages at all: kombu fails inside drain_events.
                with redis.Redis.from_url(bare.broker) as client:
                    db = client.connection_pool.connection_kwargs["db"]
                    channel = f"{bare.settings.broker_prefix}/{db}.{exchange.name}"
                    raw += client.publish(channel, b"not json at all")
                    raw += client.publish(channel, json.dumps({"body": "e30="}))
                    raw += client.publish(channel, json.dumps([1, 2]))
                assert raw == 3
            send(json.dumps({"v": 1, "seq": 1, "origin": "other", "event": good.to_dict()}))
        assert arrived.wait(10), (listener.received, listener.malformed)
        assert received == [good]
        # kombu itself swallows the raw non-JSON one (it logs a warning).
        assert listener.malformed >= len(bad) + max(raw - 1, 0)
        assert listener.reconnects == 0 and listener.connections == 1


def run_across_an_outage(
    cluster: Cluster, stop: Callable[[], None], start: Callable[[], None]
) -> None:
    """a -> b -> c, the broker stopped while b runs; b completes during the outage (its
    events cannot be sent, and c cannot be published: it is discarded, which finishes the
    workflow). Back, the listener reconnects and reads what it missed from the store:
    every event once, in order, equal to the workflow's history."""
    steps = cluster.steps()
    with collect_events() as log, baton_celery.listen(cluster.app) as listener:
        assert listener.ready
        handle = (
            Workflow(label="outage")
            .add("a", steps.s("a"))
            .add("b", steps.s("b", block=True), deps=["a"])
            .add("c", steps.s("c"), deps=["b"])
            .apply_async(app=cluster.app)
        )
        with log._cond:
            assert log._cond.wait_for(lambda: log.states("b") == ["executing"], TIMEOUT), list(log)
        before = listener.connections
        stop()
        try:
            steps.release("b")
            finished = handle.wait(timeout=TIMEOUT)  # from the store: the broker is down
        finally:
            start()
        assert listener.wait_ready(TIMEOUT, after=before), "no reconnection"
        log.wait_finished(timeout=TIMEOUT)
    assert finished.outcome == "failed" and finished.failed_steps == ("c",)
    assert listener.reconnects >= 1 and listener.replayed >= 3
    assert log.states("b") == ["executing", "completed"]
    assert log.states("c") == ["discarded"]
    assert list(log) == handle.events(), "each event once, in order, as the store has them"


def test_redis_restart_during_a_run(
    own_redis: LocalRedis, make_cluster: Callable[..., Cluster]
) -> None:
    """Our own redis-server (never the shared one) is restarted while a step runs."""

    run_across_an_outage(
        make_cluster("bridge", own_redis.url, bridge=True), own_redis.stop, own_redis.start
    )


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def start_rabbitmq() -> None:
    _rabbitmqctl("start_app")
    _rabbitmqctl("await_startup")


def test_rabbitmq_restart_during_a_run(make_cluster: Callable[..., Cluster]) -> None:
    """RabbitMQ's app is stopped and started (rabbitmqctl stop_app / start_app) while a
    step runs; the listener's exclusive queue is lost with it."""
    run_across_an_outage(
        make_cluster("bridge", "amqp", bridge=True),
        lambda: _rabbitmqctl("stop_app"),
        start_rabbitmq,
    )
