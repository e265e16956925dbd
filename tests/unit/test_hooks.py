"""The Celery hooks end to end, in-process: a real worker (solo pool, a thread of the
test process) on kombu's memory broker, baton on the memory store.

Every test builds its own app, queue and worker. Nothing waits with time.sleep: tests
block on threading primitives (EventLog.wait_finished, a Condition fed by Celery's
task_postrun / task_revoked signals) with generous timeouts.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import itertools
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from billiard.exceptions import WorkerLostError
from celery import Celery, signals
from celery.app.task import Context
from celery.contrib.testing.worker import start_worker
from celery.worker import state as worker_state

import baton_celery
from baton_celery import NotAStepError, Workflow, collect_events, guard
from baton_celery.events import StepUpdated
from baton_celery.hooks import on_worker_init
from baton_celery.runtime import runtime_for
from baton_celery.stores import Store, UnknownWorkflow, store_from_url
from baton_celery.testing import EventLog

TIMEOUT = 15.0
_apps = itertools.count()


class Processed:
    """Counts, per task id, the deliveries a worker finished (task_postrun, which also
    fires for a gated step ended by Ignore) and the revocations (task_revoked)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.states: dict[str, list[str]] = collections.defaultdict(list)

    def on_postrun(
        self, sender: Any = None, task_id: Any = None, state: Any = None, **_: Any
    ) -> None:
        with self.cond:
            self.states[task_id].append(str(state))
            self.cond.notify_all()

    def on_revoked(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        with self.cond:
            self.states[getattr(request, "id", None)].append("REVOKED")
            self.cond.notify_all()

    def count(self, task_id: str) -> int:
        with self.cond:
            return len(self.states[task_id])

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, TIMEOUT):
                raise AssertionError(f"timed out waiting for {what}: {dict(self.states)}")

    def wait(self, task_id: str, count: int = 1) -> list[str]:
        self.wait_for(lambda: len(self.states[task_id]) >= count, f"{count} x {task_id}")
        with self.cond:
            return list(self.states[task_id])


class Harness:
    """One Celery app with baton installed, the tasks the tests use, and what they did."""

    def __init__(self, tag: str, **conf: Any) -> None:
        self.name = f"unit-hooks-{tag}-{next(_apps)}-{uuid.uuid4().hex[:6]}"
        self.app = Celery(self.name, set_as_current=False)
        settings: dict[str, Any] = {
            "broker_url": "memory://",
            "broker_transport_options": {"polling_interval": 0.01},
            "broker_connection_retry_on_startup": True,
            "task_default_queue": self.name,
            "task_ignore_result": True,
            "worker_hijack_root_logger": False,
            "baton_store": "memory://",
            "baton_snooze_delay": 0.05,
        }
        settings.update(conf)
        self.app.conf.update(settings)
        self.lock = threading.Lock()
        self.calls: list[tuple[str, Any, int]] = []  # (task, first argument, retries)
        self.gates: dict[str, threading.Event] = collections.defaultdict(threading.Event)
        self.early_dispatch = 0  # the publication number early_publisher's message carries
        self._define_tasks()

    def _called(self, task: str, arg: Any, retries: int = 0) -> None:
        with self.lock:
            self.calls.append((task, arg, retries))

    def called(self, task: str) -> list[Any]:
        with self.lock:
            return [arg for name, arg, _ in self.calls if name == task]

    def _define_tasks(self) -> None:
        app, prefix = self.app, self.name

        @app.task(name=f"{prefix}.wake")
        def wake() -> None:
            return None

        @app.task(name=f"{prefix}.record", bind=True)
        def record(self_: Any, tag: str) -> str:
            self._called("record", tag, self_.request.retries)
            return tag

        @app.task(name=f"{prefix}.nothing")
        def nothing(tag: str) -> None:
            self._called("nothing", tag)
            return None

        @app.task(name=f"{prefix}.add")
        def add(x: int, y: int) -> int:
            self._called("add", (x, y))
            return x + y

        @app.task(name=f"{prefix}.flaky", bind=True, max_retries=5)
        def flaky(self_: Any, tag: str, failures: int) -> str:
            retries = self_.request.retries
            self._called("flaky", tag, retries)
            if retries < failures:
                raise self_.retry(exc=RuntimeError(f"{tag} attempt {retries + 1}"), countdown=0)
            return tag

        @app.task(name=f"{prefix}.doomed", bind=True, max_retries=1)
        def doomed(self_: Any, tag: str) -> None:
            self._called("doomed", tag, self_.request.retries)
            raise self_.retry(exc=ValueError(f"{tag} is doomed"), countdown=0)

        @app.task(name=f"{prefix}.unretriable", bind=True, max_retries=3)
        def unretriable(self_: Any, tag: str) -> None:
            self._called("unretriable", tag, self_.request.retries)
            # The retry's publish fails (no such serializer): Celery raises Reject.
            raise self_.retry(exc=OSError(f"{tag} flaked"), countdown=0, serializer="nope")

        @app.task(name=f"{prefix}.crash")
        def crash(message: str) -> None:
            self._called("crash", message)
            raise KeyError(message)

        @app.task(name=f"{prefix}.read_deps")
        def read_deps(tag: str) -> dict[str, Any]:
            self._called("read_deps", tag)
            return baton_celery.dependency_results()

        @app.task(name=f"{prefix}.unserializable")
        def unserializable(tag: str) -> set[int]:
            self._called("unserializable", tag)
            return {1, 2}

        @app.task(name=f"{prefix}.wait_for")
        def wait_for(key: str) -> str:
            self._called("wait_for", key)
            if not self.gates[key].wait(TIMEOUT):
                raise TimeoutError(f"gate {key} never opened")
            return key

        @app.task(name=f"{prefix}.early_publisher", bind=True, max_retries=3)
        def early_publisher(
            self_: Any, workflow_id: str, label: str, step: str, job_id: str
        ) -> str:
            """First attempt: publish a message for ``step`` while this step (its
            dependency) is unfinished, then retry; the retry waits until that message was
            snoozed."""
            retries = self_.request.retries
            self._called("early_publisher", step, retries)
            if retries == 0:
                self.publish_step_message(
                    "record", [step], job_id, workflow_id, label, step, self.early_dispatch
                )
                raise self_.retry(countdown=0)
            if not self.gates["snoozed"].wait(TIMEOUT):
                raise TimeoutError("the early message was never snoozed")
            return "published"

    def task(self, short: str) -> Any:
        return self.app.tasks[f"{self.name}.{short}"]

    def sig(self, short: str, *args: Any) -> Any:
        return self.task(short).s(*args)

    @property
    def store(self) -> Store:
        runtime = runtime_for(self.app)
        assert runtime is not None
        return runtime.store

    def publish_step_message(
        self,
        short: str,
        args: list[Any],
        job_id: str,
        workflow_id: str,
        label: str | None,
        step: str,
        dispatch: int,
    ) -> None:
        """A message for a step as baton itself would publish it (a duplicate or stray)."""
        header = {
            "workflow_id": workflow_id,
            "workflow_label": label,
            "step": step,
            "dispatch": dispatch,
        }
        self.app.send_task(
            f"{self.name}.{short}", args=args, task_id=job_id, headers={"baton": header}
        )

    @contextlib.contextmanager
    def worker(self) -> Iterator[None]:
        root_level = logging.getLogger().level
        with start_worker(
            self.app, pool="solo", perform_ping_check=False, shutdown_timeout=TIMEOUT
        ):
            try:
                yield
            finally:
                # The blocking loop only notices the stop flag between deliveries (and
                # drains once more on Celery 5.4+): wake it twice instead of waiting 2 s.
                worker_state.should_terminate = 0
                self.task("wake").delay()
                self.task("wake").delay()
        logging.getLogger().setLevel(root_level)


@pytest.fixture(autouse=True)
def _fresh_failure_log() -> Iterator[None]:
    """Each test sees its first failure of a kind logged in full (see baton_celery.guard)."""
    guard.reset()
    yield
    guard.reset()


@pytest.fixture
def processed() -> Iterator[Processed]:
    probe = Processed()
    signals.task_postrun.connect(probe.on_postrun, weak=False)
    signals.task_revoked.connect(probe.on_revoked, weak=False)
    yield probe
    signals.task_postrun.disconnect(probe.on_postrun)
    signals.task_revoked.disconnect(probe.on_revoked)


@contextlib.contextmanager
def installed(harness: Harness) -> Iterator[Harness]:
    baton_celery.install(harness.app)
    try:
        yield harness
    finally:
        baton_celery.uninstall(harness.app)


@pytest.fixture
def h() -> Iterator[Harness]:
    with installed(Harness("t")) as harness:
        yield harness


def states(events: EventLog) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in events.steps:
        out.setdefault(e.step_name, []).append(e.state)
    return out


def step_events(events: EventLog, name: str) -> list[StepUpdated]:
    return [e for e in events.steps if e.step_name == name]


def baton_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("baton_celery") and r.levelno >= 30]


# --- success ------------------------------------------------------------------------


def test_success_path_events_and_finish(h: Harness) -> None:
    telemetry: list[dict[str, Any]] = []

    def on_telemetry(sender: Any, **kwargs: Any) -> None:
        telemetry.append({"sender": sender, **kwargs})

    wf = (
        Workflow(label="happy")
        .add("a", h.sig("add", 1, 2))
        .add("b", h.sig("record", "b"), deps=["a"])
        .add("c", h.sig("nothing", "c"), deps=["a"])
        .add("d", h.sig("record", "d"), deps=["b", "c"])
    )
    baton_celery.workflow_finished_telemetry.connect(on_telemetry)
    try:
        with h.worker(), collect_events(wf.id) as events:
            handle = wf.apply_async()
            [finished] = events.wait_finished(TIMEOUT)
            waited = handle.wait(timeout=TIMEOUT)
    finally:
        baton_celery.workflow_finished_telemetry.disconnect(on_telemetry)

    assert finished.outcome == "completed"
    assert finished.failed_steps == ()
    assert finished.workflow_label == "happy"
    assert waited == finished
    assert events[-1] == finished  # the finish comes last, once
    assert states(events) == {s: ["executing", "completed"] for s in "abcd"}
    status = handle.status()
    assert status.outcome == "completed"
    for e in events.steps:
        assert e.workflow_id == wf.id
        assert e.workflow_label == "happy"
        assert e.attempt == 1
        assert e.error is None
        assert e.job_id == status.steps[e.step_name].job_id
        assert e.timestamp.utcoffset() is not None
    assert step_events(events, "a")[0].worker == f"{h.name}.add"
    assert step_events(events, "c")[1].has_result is False  # returned None
    assert step_events(events, "a")[1].has_result is True
    assert step_events(events, "a")[0].has_result is False  # not yet, while executing
    # A dependent starts only after its dependencies completed.
    order = [(e.step_name, e.state) for e in events.steps]
    assert order.index(("a", "completed")) < order.index(("b", "executing"))
    assert order.index(("b", "completed")) < order.index(("d", "executing"))
    assert order.index(("c", "completed")) < order.index(("d", "executing"))
    assert sorted(h.called("record")) == ["b", "d"]
    assert telemetry == [
        {
            "sender": wf.id,
            "outcome": "completed",
            "failed_count": 0,
            "total_count": 4,
            "duration": telemetry[0]["duration"],
        }
    ]
    assert telemetry[0]["duration"] >= 0


def test_retry_then_success(h: Harness) -> None:
    wf = Workflow(label="retry").add("s", h.sig("flaky", "s", 2))
    with h.worker(), collect_events(wf.id) as events:
        handle = wf.apply_async()
        [finished] = events.wait_finished(TIMEOUT)
    assert finished.outcome == "completed"
    s = step_events(events, "s")
    assert [(e.state, e.attempt) for e in s] == [
        ("executing", 1),
        ("retryable", 1),
        ("executing", 2),
        ("retryable", 2),
        ("executing", 3),
        ("completed", 3),
    ]
    assert s[1].error == "RuntimeError: s attempt 1"
    assert s[3].error == "RuntimeError: s attempt 2"
    assert s[2].error is None and s[5].error is None
    assert len({e.job_id for e in s}) == 1  # one Celery task id across retries
    assert h.called("flaky") == ["s", "s", "s"]
    assert handle.status().steps["s"].attempt == 3


def test_a_retry_that_cannot_be_published_discards_the_step(h: Harness) -> None:
    """Celery rejects the message when it cannot publish a retry, and sends neither
    task_failure nor task_retry: the step baton marked retryable must not hang."""
    wf = Workflow(label="unretriable").add("s", h.sig("unretriable", "s"))
    wf.add("after", h.sig("record", "after"), deps=["s"])
    with h.worker(), collect_events(wf.id) as events:
        wf.apply_async()
        [finished] = events.wait_finished(TIMEOUT)
    assert (finished.outcome, finished.failed_steps) == ("failed", ("s", "after"))
    s = step_events(events, "s")
    assert [(e.state, e.attempt) for e in s] == [
        ("executing", 1),
        ("retryable", 1),
        ("discarded", 1),
    ]
    assert s[2].error is not None and s[2].error.startswith("retry could not be published")
    assert h.called("unretriable") == ["s"]


# --- failures, cascade, ignore flags -----------------------------------------------


def test_retries_exhausted_cascade_and_ignore_flags(h: Harness) -> None:
    wf = (
        Workflow(label="doomed")
        .add("report", h.sig("record", "report"), deps=["load"])
        .add("load", h.sig("record", "load"), deps=["transform"])
        .add("transform", h.sig("doomed", "transform"))
        .add("audit", h.sig("record", "audit"), deps=["transform"], ignore_discarded=True)
        .add("notify", h.sig("record", "notify"), deps=["load"], ignore_cancelled=True)
        .add("strict", h.sig("record", "strict"), deps=["load"], ignore_discarded=True)
        .add("side", h.sig("record", "side"))
    )
    with h.worker(), collect_events(wf.id) as events:
        handle = wf.apply_async()
        [finished] = events.wait_finished(TIMEOUT)

    assert finished.outcome == "failed"
    assert finished.failed_steps == ("report", "load", "transform", "strict")  # added order
    t = step_events(events, "transform")
    assert [(e.state, e.attempt) for e in t] == [
        ("executing", 1),
        ("retryable", 1),
        ("executing", 2),
        ("discarded", 2),
    ]
    assert t[1].error == "ValueError: transform is doomed"
    assert t[3].error == "ValueError: transform is doomed"
    [load] = step_events(events, "load")
    assert (load.state, load.attempt) == ("cancelled", 0)
    assert load.error == "dependency 'transform' was discarded (failure began at 'transform')"
    [report] = step_events(events, "report")
    assert report.state == "cancelled"
    assert report.error == "dependency 'load' was cancelled (failure began at 'transform')"
    [strict] = step_events(events, "strict")  # ignore_discarded does not cover cancelled
    assert strict.state == "cancelled"
    assert "'load'" in (strict.error or "") and "'transform'" in (strict.error or "")
    for name in ("audit", "notify", "side"):
        assert states(events)[name] == ["executing", "completed"]
    assert sorted(h.called("record")) == ["audit", "notify", "side"]
    assert h.called("doomed") == ["transform", "transform"]
    status = handle.status()
    assert status.failed_steps == finished.failed_steps
    assert status.steps["report"].error == report.error


def test_failure_without_retry_is_discarded_with_a_bounded_error() -> None:
    with installed(Harness("bounded", baton_max_error_length=40)) as h:
        wf = (
            Workflow()
            .add("boom", h.sig("crash", "x" * 5000))
            .add("after", h.sig("record", "after"), deps=["boom"])
        )
        with h.worker(), collect_events(wf.id) as events:
            wf.apply_async()
            [finished] = events.wait_finished(TIMEOUT)
    [boom] = [e for e in step_events(events, "boom") if e.state != "executing"]
    assert (boom.state, boom.attempt) == ("discarded", 1)
    assert boom.error is not None
    assert boom.error.startswith("KeyError: ")
    assert len(boom.error) <= 40
    [after] = step_events(events, "after")
    assert after.state == "cancelled"
    assert finished.failed_steps == ("boom", "after")


def test_cascade_errors_respect_the_error_bound_too() -> None:
    """baton_max_error_length bounds every error string an event carries, including the
    "dependency ... was ... (failure began at ...)" of a cascade."""
    limit = 40
    with installed(Harness("bounded-cascade", baton_max_error_length=limit)) as h:
        wf = (
            Workflow()
            .add("extract_customer_orders", h.sig("crash", "x"))
            .add(
                "transform_customer_orders", h.sig("record", "t"), deps=["extract_customer_orders"]
            )
        )
        with h.worker(), collect_events(wf.id) as events:
            handle = wf.apply_async()
            events.wait_finished(TIMEOUT)
        # The store keeps the whole reason; only the events are cut.
        assert handle.status().steps["transform_customer_orders"].state == "cancelled"
    [cancelled] = step_events(events, "transform_customer_orders")
    assert cancelled.state == "cancelled"
    assert cancelled.error is not None
    assert cancelled.error.startswith("dependency ")
    assert len(cancelled.error) <= limit, cancelled.error


# --- gating -------------------------------------------------------------------------


@pytest.mark.parametrize("dispatch", [0, 1], ids=["older-publication", "same-publication"])
def test_snooze_gating(h: Harness, processed: Processed, dispatch: int) -> None:
    """A message for a step whose dependency is unfinished does not run the body: the
    step is "snoozed" and requeued without using a retry; it runs once the dependency
    completed, exactly once — also when the early message carries the publication number
    the release will have (its requeued copy must not run the body a second time)."""
    h.early_dispatch = dispatch
    label = "snooze"
    wf = Workflow(label=label)
    b_job = f"b-{uuid.uuid4()}"
    wf.add("a", h.sig("early_publisher", wf.id, label, "b", b_job))
    wf.add("b", h.sig("record", "b").set(task_id=b_job), deps=["a"])

    def on_event(workflow_id: str, event: Any) -> None:
        if isinstance(event, StepUpdated) and (event.step_name, event.state) == ("b", "snoozed"):
            h.gates["snoozed"].set()

    baton_celery.subscribe(wf.id, on_event)
    try:
        with h.worker(), collect_events(wf.id) as events:
            wf.apply_async()
            [finished] = events.wait_finished(TIMEOUT)

            def drained() -> bool:
                # every copy of b's message was handled: the early one, the release,
                # and one requeued copy per snooze.
                snoozes = states(events)["b"].count("snoozed")
                return len(processed.states[b_job]) >= 2 + snoozes

            processed.wait_for(drained, "every copy of b's message")
    finally:
        baton_celery.unsubscribe(wf.id, on_event)

    assert finished.outcome == "completed"
    b = step_events(events, "b")
    assert b[0].state == "snoozed"
    assert b[0].attempt == 0  # a snooze is not an attempt
    assert [e.state for e in b if e.state != "snoozed"] == ["executing", "completed"]
    assert [e.attempt for e in b if e.state != "snoozed"] == [1, 1]
    order = [(e.step_name, e.state) for e in events.steps]
    assert order.index(("b", "snoozed")) < order.index(("a", "completed"))
    assert order.index(("a", "completed")) < order.index(("b", "executing"))
    # The body ran once, after the dependency, and without a Celery retry.
    with h.lock:
        assert [(t, r) for t, arg, r in h.calls if t == "record"] == [("record", 0)]
    assert h.called("early_publisher") == ["b", "b"]
    assert "SUCCESS" in processed.states[b_job]
    assert processed.states[b_job].count("SUCCESS") == 1


def test_duplicate_delivery_of_a_completed_step_does_not_run_again(
    h: Harness, processed: Processed
) -> None:
    wf = Workflow(label="dup").add("once", h.sig("record", "once"))
    with h.worker(), collect_events(wf.id) as events:
        handle = wf.apply_async()
        events.wait_finished(TIMEOUT)
        job = handle.status().steps["once"].job_id
        processed.wait(job, 1)
        before = list(events)
        for dispatch in (1, 0):  # the same publication again, and an older one
            h.publish_step_message("record", ["once"], job, wf.id, "dup", "once", dispatch)
        processed.wait(job, 3)
    assert h.called("record") == ["once"]
    assert list(events) == before  # no new events, no second finish
    assert processed.states[job] == ["SUCCESS", "IGNORED", "IGNORED"]
    assert handle.status().steps["once"].attempt == 1


# --- results ------------------------------------------------------------------------


def test_dependency_results_returns_only_declared_dependencies(h: Harness) -> None:
    wf = (
        Workflow()
        .add("a", h.sig("add", 1, 2))
        .add("none", h.sig("nothing", "none"))
        .add("b", h.sig("add", 10, 20), deps=["a"])
        .add("reader", h.sig("read_deps", "reader"), deps=["b", "none"])
        .add("root_reader", h.sig("read_deps", "root_reader"))
    )
    with h.worker(), collect_events(wf.id) as events:
        wf.apply_async()
        [finished] = events.wait_finished(TIMEOUT)
    assert finished.outcome == "completed"
    stored = h.store.results(wf.id, ["reader", "root_reader"])
    assert stored == {"reader": {"b": 30, "none": None}, "root_reader": {}}
    assert sorted(h.called("read_deps")) == ["reader", "root_reader"]


def test_dependency_results_outside_a_step_raises(h: Harness) -> None:
    with pytest.raises(NotAStepError):
        baton_celery.dependency_results()


def test_an_unserializable_result_is_not_stored_but_the_step_completes(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    wf = (
        Workflow()
        .add("odd", h.sig("unserializable", "odd"))
        .add("reader", h.sig("read_deps", "reader"), deps=["odd"])
    )
    with (
        caplog.at_level(logging.WARNING, logger="baton_celery"),
        h.worker(),
        collect_events(wf.id) as events,
    ):
        wf.apply_async()
        [finished] = events.wait_finished(TIMEOUT)
    assert finished.outcome == "completed"
    assert step_events(events, "odd")[-1].has_result is True
    assert h.store.results(wf.id, ["reader"]) == {"reader": {"odd": None}}
    assert any("not JSON-serializable" in r.getMessage() for r in caplog.records)


# --- robustness ---------------------------------------------------------------------


def test_a_raising_subscriber_does_not_fail_the_task(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    wf = Workflow().add("a", h.sig("record", "a")).add("b", h.sig("record", "b"), deps=["a"])

    def broken(workflow_id: str, event: Any) -> None:
        raise RuntimeError("subscriber bug")

    baton_celery.subscribe(wf.id, broken)
    try:
        with (
            caplog.at_level(logging.ERROR, logger="baton_celery"),
            h.worker(),
            collect_events(wf.id) as events,
        ):
            handle = wf.apply_async()
            [finished] = events.wait_finished(TIMEOUT)
    finally:
        baton_celery.unsubscribe(wf.id, broken)
    assert finished.outcome == "completed"
    assert states(events) == {"a": ["executing", "completed"], "b": ["executing", "completed"]}
    assert handle.status().outcome == "completed"
    logged = [
        r
        for r in caplog.records
        if r.exc_info is not None and isinstance(r.exc_info[1], RuntimeError)
    ]
    # Rate-limited: the first failure with its traceback, the next ones only counted.
    assert len(logged) == 1 and len(events) == 5


@pytest.mark.parametrize(
    "header",
    ["garbage", {"workflow_id": "w"}, {"workflow_id": 7, "step": "s"}, ["w", "s"]],
    ids=["string", "no-step", "bad-id", "list"],
)
def test_a_malformed_header_runs_as_a_plain_task_with_a_warning(
    h: Harness, processed: Processed, caplog: pytest.LogCaptureFixture, header: Any
) -> None:
    job = f"malformed-{uuid.uuid4()}"
    with (
        caplog.at_level(logging.WARNING, logger="baton_celery"),
        h.worker(),
        collect_events() as events,
    ):
        h.app.send_task(f"{h.name}.record", args=["plain"], task_id=job, headers={"baton": header})
        assert processed.wait(job) == ["SUCCESS"]
    assert h.called("record") == ["plain"]
    assert list(events) == []
    warnings = [r for r in baton_errors(caplog) if "malformed" in r.getMessage()]
    assert warnings
    assert job in warnings[0].getMessage()


def test_non_step_tasks_produce_no_events(
    h: Harness, processed: Processed, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.DEBUG, logger="baton_celery"),
        h.worker(),
        collect_events() as events,
    ):
        ok = h.task("record").delay("plain")
        added = h.task("add").apply_async((2, 3), headers={"other": "header"})
        failed = h.task("crash").delay("plain failure")
        retried = h.task("flaky").delay("plain-retry", 1)
        assert processed.wait(ok.id) == ["SUCCESS"]
        assert processed.wait(added.id) == ["SUCCESS"]
        assert processed.wait(failed.id) == ["FAILURE"]
        assert processed.wait(retried.id, 2) == ["RETRY", "SUCCESS"]
    assert list(events) == []
    assert [r for r in caplog.records if r.name.startswith("baton_celery")] == []
    for task_id in (ok.id, added.id, failed.id, retried.id):
        assert h.store.locate(task_id) is None


def test_a_step_of_an_unknown_workflow_runs_and_the_error_is_logged(
    h: Harness, processed: Processed, caplog: pytest.LogCaptureFixture
) -> None:
    job = f"orphan-{uuid.uuid4()}"
    with (
        caplog.at_level(logging.ERROR, logger="baton_celery"),
        h.worker(),
        collect_events() as events,
    ):
        h.publish_step_message("record", ["orphan"], job, "no-such-workflow", None, "s", 1)
        assert processed.wait(job) == ["SUCCESS"]
    assert h.called("record") == ["orphan"]
    assert list(events) == []
    failures = [r for r in baton_errors(caplog) if "hook failed" in r.getMessage()]
    assert {r.getMessage().split(" hook")[0].split()[-1] for r in failures} == {
        "task_prerun",
        "task_success",
    }
    assert all(isinstance(r.exc_info[1], UnknownWorkflow) for r in failures if r.exc_info)


def test_a_store_that_is_down_is_logged_and_never_fails_the_task(
    tmp_path: Path, processed: Processed, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file-not-a-directory"
    blocker.write_text("")
    broken = f"sqlite:///{blocker}/baton.sqlite3"
    job = f"down-{uuid.uuid4()}"
    with (
        installed(Harness("down", baton_store=broken, baton_store_timeout=0.2)) as h,
        caplog.at_level(logging.ERROR, logger="baton_celery"),
        h.worker(),
        collect_events() as events,
    ):
        h.publish_step_message("record", ["r"], job, "wf", None, "s", 1)
        assert processed.wait(job) == ["SUCCESS"]
    assert h.called("record") == ["r"]
    assert list(events) == []
    assert len([r for r in baton_errors(caplog) if "hook failed" in r.getMessage()]) == 2


# --- install ------------------------------------------------------------------------


def test_install_twice_is_harmless(processed: Processed) -> None:
    h = Harness("twice")
    first = baton_celery.install(h.app)
    try:
        assert baton_celery.install(h.app) is first
        h.app.finalize()
        assert baton_celery.install(h.app) is first
        for method in ("before_start", "retry"):
            wrapper = getattr(type(h.task("record")), method)
            assert not hasattr(wrapper._baton_original, "_baton_original")  # wrapped once
        wf = Workflow().add("a", h.sig("record", "a")).add("b", h.sig("add", 1, 1), deps=["a"])
        with h.worker(), collect_events(wf.id) as events:
            handle = wf.apply_async()
            [finished] = events.wait_finished(TIMEOUT)
            job = handle.status().steps["a"].job_id
            h.publish_step_message("record", ["a"], job, wf.id, None, "a", 1)
            processed.wait(job, 2)
        assert finished.outcome == "completed"
        assert states(events) == {"a": ["executing", "completed"], "b": ["executing", "completed"]}
        assert h.called("record") == ["a"]  # the duplicate was gated (once)
    finally:
        baton_celery.uninstall(h.app)


def test_install_on_a_finalized_app_still_gates(processed: Processed) -> None:
    h = Harness("finalized")
    h.app.finalize()
    with installed(h):
        wf = Workflow().add("only", h.sig("record", "only"))
        with h.worker(), collect_events(wf.id) as events:
            handle = wf.apply_async()
            events.wait_finished(TIMEOUT)
            job = handle.status().steps["only"].job_id
            h.publish_step_message("record", ["only"], job, wf.id, None, "only", 1)
            assert processed.wait(job, 2) == ["SUCCESS", "IGNORED"]
    assert h.called("record") == ["only"]


def test_a_user_before_start_annotation_does_not_disable_the_gate(
    processed: Processed,
) -> None:
    """A project that already wraps every task's before_start through task_annotations
    keeps its wrapper, and baton's gate still works (a duplicate delivery of a completed
    step does not run it again)."""
    wrapped: list[str] = []

    def user_around(before_start: Callable[..., Any]) -> Callable[..., Any]:
        def around(task: Any, task_id: str, args: Any, kwargs: Any) -> Any:
            wrapped.append(task_id)
            return before_start(task, task_id, args, kwargs)

        return around

    h = Harness("user-annotation", task_annotations={"*": {"@before_start": user_around}})
    with installed(h):
        wf = Workflow().add("only", h.sig("record", "only"))
        with h.worker(), collect_events(wf.id) as events:
            handle = wf.apply_async()
            events.wait_finished(TIMEOUT)
            job = handle.status().steps["only"].job_id
            h.publish_step_message("record", ["only"], job, wf.id, None, "only", 1)
            processed.wait(job, 2)
    assert job in wrapped  # the project's own wrapper still runs
    assert h.called("record") == ["only"]  # and the duplicate was gated


def test_an_app_without_install_sends_no_events(processed: Processed) -> None:
    h = Harness("bare")
    job = f"bare-{uuid.uuid4()}"
    with h.worker(), collect_events() as events:
        h.publish_step_message("record", ["x"], job, "wf", None, "s", 1)
        assert processed.wait(job) == ["SUCCESS"]
    assert list(events) == []
    assert runtime_for(h.app) is None


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # see test_sqlite_close_releases_...
def test_two_apps_keep_their_own_config(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/two.sqlite3"
    with (
        installed(Harness("one", baton_max_error_length=30)) as one,
        installed(Harness("two", baton_store=url, baton_snooze_delay=0.5)) as two,
    ):
        r1, r2 = runtime_for(one.app), runtime_for(two.app)
        assert r1 is not None and r2 is not None and r1 is not r2
        assert (r1.config.store, r1.config.max_error_length) == ("memory://", 30)
        assert (r2.config.store, r2.config.max_error_length) == (url, 2000)
        assert (r1.config.snooze_delay, r2.config.snooze_delay) == (0.05, 0.5)
        assert not r1.store.shared_across_processes
        assert r2.store.shared_across_processes

        message = "y" * 500
        finished = {}
        for h in (one, two):
            wf = Workflow(label=h.name).add("boom", h.sig("crash", message))
            with h.worker(), collect_events(wf.id) as events:
                wf.apply_async()
                [finished[h.name]] = events.wait_finished(TIMEOUT)
            [discarded] = [e for e in events.steps if e.state == "discarded"]
            limit = 30 if h is one else 2000
            assert discarded.error is not None
            assert len(discarded.error) <= limit
            assert (message in discarded.error) is (h is two)
        wid_one = finished[one.name].workflow_id
        wid_two = finished[two.name].workflow_id
        with pytest.raises(UnknownWorkflow):
            r2.store.load(wid_one)
        with pytest.raises(UnknownWorkflow):
            r1.store.load(wid_two)
        # The SQLite store is the source of truth for any process: a fresh store on the
        # same file sees the finish.
        fresh = store_from_url(url)
        try:
            assert fresh.load(wid_two).outcome == "failed"
        finally:
            fresh.close()
        r2.store.close()
    # The worker's threads opened their own SQLite connections; let them go now, while
    # this test ignores the ResourceWarning Python 3.13 gives for each.
    gc.collect()


# --- cancel, revoke, lost worker ----------------------------------------------------


def test_handle_cancel(h: Harness, processed: Processed) -> None:
    """Cancel while a step runs: pending and queued steps are cancelled at once (the
    queued one never runs), the running one finishes, the workflow finishes "failed"
    exactly once."""
    running = threading.Event()
    wf = (
        Workflow(label="cancel")
        .add("slow", h.sig("wait_for", "slow"))
        .add("queued", h.sig("record", "queued"))
        .add("after", h.sig("record", "after"), deps=["slow"])
    )

    def on_event(workflow_id: str, event: Any) -> None:
        if isinstance(event, StepUpdated) and (event.step_name, event.state) == (
            "slow",
            "executing",
        ):
            running.set()

    baton_celery.subscribe(wf.id, on_event)
    try:
        with h.worker(), collect_events(wf.id) as events:
            handle = wf.apply_async()
            assert running.wait(TIMEOUT)
            handle.cancel()
            mid = handle.status()
            assert mid.steps["queued"].state == "cancelled"
            assert mid.steps["after"].state == "cancelled"
            assert mid.steps["slow"].state == "executing"
            assert events.finished == []
            h.gates["slow"].set()  # let the running step finish
            [finished] = events.wait_finished(TIMEOUT)
            processed.wait(mid.steps["queued"].job_id)  # the queued message was handled
            handle.cancel()  # cancelling a finished workflow does nothing
    finally:
        baton_celery.unsubscribe(wf.id, on_event)
    assert finished.outcome == "failed"
    assert finished.failed_steps == ("queued", "after")
    assert states(events) == {
        "slow": ["executing", "completed"],
        "queued": ["cancelled"],
        "after": ["cancelled"],
    }
    for name in ("queued", "after"):
        [event] = step_events(events, name)
        assert event.attempt == 0
        assert event.error == "workflow cancelled"
    assert h.called("record") == []
    assert len(events.finished) == 1
    assert handle.status().outcome == "failed"


def test_cancel_announces_even_when_revoking_fails(h: Harness) -> None:
    """The cancel is committed in the store (and may claim the finish) before the queued
    steps are revoked: a broker error while revoking must not swallow the cancelled
    events and the one WorkflowFinished, which nobody could send afterwards."""

    def broken_revoke(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker unreachable")

    wf = Workflow().add("a", h.sig("record", "a")).add("b", h.sig("record", "b"), deps=["a"])
    with collect_events(wf.id) as events:  # no worker: a stays queued, so it is revoked
        handle = wf.apply_async()
        h.app.control.revoke = broken_revoke  # type: ignore[method-assign]
        with contextlib.suppress(ConnectionError):
            handle.cancel()
    assert handle.status().outcome == "failed"  # the store recorded the finish...
    assert states(events) == {"a": ["cancelled"], "b": ["cancelled"]}  # ...and events
    assert [(f.outcome, f.failed_steps) for f in events.finished] == [("failed", ("a", "b"))]


def test_cancel_before_anything_ran_finishes_at_once(h: Harness) -> None:
    wf = Workflow().add("a", h.sig("record", "a")).add("b", h.sig("record", "b"), deps=["a"])
    with collect_events(wf.id) as events:  # no worker: a stays queued
        handle = wf.apply_async()
        handle.cancel()
    assert states(events) == {"a": ["cancelled"], "b": ["cancelled"]}
    assert [(f.outcome, f.failed_steps) for f in events.finished] == [("failed", ("a", "b"))]


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"terminated": False}, "revoked"),
        ({"terminated": True, "signum": 15}, "revoked and terminated (signal 15)"),
        ({"expired": True}, "expired"),
    ],
)
def test_task_revoked_cancels_the_step_and_cascades(
    h: Harness, kwargs: dict[str, Any], reason: str
) -> None:
    """task_revoked comes from the worker's main process with a Context built from the
    message: it carries the baton header."""
    wf = (
        Workflow(label="rv")
        .add("a", h.sig("record", "a"))
        .add("b", h.sig("record", "b"), deps=["a"])
    )
    with collect_events(wf.id) as events:  # no worker: a stays queued
        handle = wf.apply_async()
        job = handle.status().steps["a"].job_id
        header = {"workflow_id": wf.id, "workflow_label": "rv", "step": "a", "dispatch": 1}
        request = Context(id=job, baton=header)
        signals.task_revoked.send(sender=h.task("record"), request=request, **kwargs)
        signals.task_revoked.send(sender=h.task("record"), request=request, **kwargs)
    [a] = step_events(events, "a")
    assert (a.state, a.attempt, a.error) == ("cancelled", 0, reason)
    [b] = step_events(events, "b")
    assert b.error == "dependency 'a' was cancelled (failure began at 'a')"
    assert [(f.outcome, f.failed_steps) for f in events.finished] == [("failed", ("a", "b"))]


def test_worker_lost_is_discarded_through_the_job_index(h: Harness) -> None:
    """WorkerLostError is reported by the main process, where sender.request is not the
    failing request: baton finds the step by its task id."""
    wf = (
        Workflow(label="lost")
        .add("a", h.sig("record", "a"))
        .add("b", h.sig("record", "b"), deps=["a"])
    )
    with collect_events(wf.id) as events:
        handle = wf.apply_async()
        job = handle.status().steps["a"].job_id
        signals.task_failure.send(
            sender=h.task("record"),
            task_id=job,
            exception=WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL)."),
        )
        # A failure of a task that is no step is ignored.
        signals.task_failure.send(
            sender=h.task("record"), task_id="not-a-step", exception=RuntimeError("x")
        )
    [a] = step_events(events, "a")
    assert a.state == "discarded"
    assert a.error is not None and a.error.startswith("WorkerLostError: Worker exited")
    assert states(events)["b"] == ["cancelled"]
    assert [(f.outcome, f.failed_steps) for f in events.finished] == [("failed", ("a", "b"))]


# --- worker start: the memory store under a prefork pool ----------------------------


@pytest.mark.parametrize(
    ("pool", "store", "refused"),
    [
        ("prefork", "memory://", True),
        ("processes", "memory://", True),  # Celery's alias of prefork
        ("solo", "memory://", False),
        ("threads", "memory://", False),
        ("prefork", "sqlite:///{tmp}/p.sqlite3", False),
    ],
)
def test_memory_store_under_prefork_is_refused_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, pool: str, store: str, refused: bool
) -> None:
    with (
        installed(Harness("pool", baton_store=store.format(tmp=tmp_path))) as h,
        caplog.at_level(logging.ERROR, logger="baton_celery"),
    ):
        h.app.WorkController(
            pool=pool,
            hostname=f"{h.name}@unit",
            concurrency=1,
            without_mingle=True,
            without_gossip=True,
            without_heartbeat=True,
        )
    errors = [r for r in baton_errors(caplog) if "prefork" in r.getMessage()]
    assert bool(errors) is refused


def test_worker_init_of_an_app_without_baton_is_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness("no-baton")
    with caplog.at_level(logging.DEBUG, logger="baton_celery"):
        on_worker_init(sender=type("W", (), {"app": h.app, "pool_cls": "prefork"})())
    assert caplog.records == []
