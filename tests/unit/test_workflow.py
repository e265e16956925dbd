"""Workflow validation (nothing published, nothing stored on error), what apply_async
stores and publishes, and WorkflowHandle.status / wait / label on a stored workflow."""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain, chord, group, signals
from redis_servers import LocalRedis

import baton_celery
from baton_celery import Workflow, WorkflowError, WorkflowHandle
from baton_celery.runtime import runtime_for
from baton_celery.stores import Store, UnknownWorkflow

_counter = itertools.count()


class Published:
    """Every message published while the test runs (before_task_publish)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, sender: Any = None, headers: Any = None, **_: Any) -> None:
        with self.lock:
            self.messages.append({"task": sender, "headers": dict(headers or {})})


@pytest.fixture
def app() -> Iterator[Celery]:
    """An app with baton installed on a memory store, no worker: published messages
    stay in the (memory) broker."""
    n = next(_counter)
    celery_app = Celery(f"unit-workflow-{n}", set_as_current=False)
    celery_app.conf.update(
        broker_url="memory://",
        task_default_queue=f"unit-workflow-{n}-{uuid.uuid4().hex[:8]}",
        baton_store="memory://",
        task_ignore_result=True,
    )

    @celery_app.task(name=f"{celery_app.main}.add")
    def add(x: int, y: int) -> int:
        return x + y

    @celery_app.task(name=f"{celery_app.main}.noop")
    def noop() -> None:
        return None

    baton_celery.install(celery_app)
    yield celery_app
    baton_celery.uninstall(celery_app)


@pytest.fixture
def published() -> Iterator[Published]:
    recorder = Published()
    signals.before_task_publish.connect(recorder, weak=False)
    yield recorder
    signals.before_task_publish.disconnect(recorder)


def store_of(app: Celery) -> Store:
    runtime = runtime_for(app)
    assert runtime is not None
    return runtime.store


def task(app: Celery, name: str) -> Any:
    return app.tasks[f"{app.main}.{name}"]


def add_sig(app: Celery, *args: Any) -> Any:
    return task(app, "add").s(*args)


def assert_nothing_happened(app: Celery, wf: Workflow, published: Published) -> None:
    assert published.messages == []
    with pytest.raises(UnknownWorkflow):
        store_of(app).load(wf.id)


# --- validation ---------------------------------------------------------------------


def test_duplicate_step_names_are_rejected(app: Celery, published: Published) -> None:
    wf = Workflow().add("a", add_sig(app, 1, 2)).add("a", add_sig(app, 3, 4))
    with pytest.raises(WorkflowError, match="duplicate step name 'a'"):
        wf.apply_async()
    assert_nothing_happened(app, wf, published)


def test_unknown_dependencies_are_rejected(app: Celery, published: Published) -> None:
    wf = Workflow().add("a", add_sig(app, 1, 2)).add("b", add_sig(app, 1, 2), deps=["ghost"])
    with pytest.raises(WorkflowError, match="'b' depends on unknown step 'ghost'"):
        wf.apply_async()
    assert_nothing_happened(app, wf, published)


def test_self_dependency_is_rejected(app: Celery, published: Published) -> None:
    wf = Workflow().add("a", add_sig(app, 1, 2), deps=["a"])
    with pytest.raises(WorkflowError, match="'a' depends on itself"):
        wf.apply_async()
    assert_nothing_happened(app, wf, published)


def test_a_two_step_cycle_is_named(app: Celery, published: Published) -> None:
    wf = (
        Workflow()
        .add("root", add_sig(app, 1, 2))
        .add("a", add_sig(app, 1, 2), deps=["b"])
        .add("b", add_sig(app, 1, 2), deps=["a"])
    )
    with pytest.raises(WorkflowError) as caught:
        wf.apply_async()
    message = str(caught.value)
    assert "cycle" in message
    assert "a -> b -> a" in message or "b -> a -> b" in message
    assert_nothing_happened(app, wf, published)


def test_a_longer_cycle_names_every_step_of_it_and_only_those(
    app: Celery, published: Published
) -> None:
    wf = (
        Workflow()
        .add("start", add_sig(app, 1, 2))
        .add("x", add_sig(app, 1, 2), deps=["start", "z"])
        .add("y", add_sig(app, 1, 2), deps=["x"])
        .add("z", add_sig(app, 1, 2), deps=["y"])
        .add("tail", add_sig(app, 1, 2), deps=["z"])
    )
    with pytest.raises(WorkflowError) as caught:
        wf.apply_async()
    message = str(caught.value)
    cycle = message.split("cycle: ", 1)[1].split(" -> ")
    assert cycle[0] == cycle[-1]
    assert sorted(cycle[:-1]) == ["x", "y", "z"]
    # Consecutive names follow dependency edges (in one direction or the other).
    deps = {"x": {"start", "z"}, "y": {"x"}, "z": {"y"}}
    pairs = list(zip(cycle, cycle[1:]))
    assert all(b in deps[a] for a, b in pairs) or all(a in deps[b] for a, b in pairs)
    assert_nothing_happened(app, wf, published)


def test_a_diamond_is_not_a_cycle(app: Celery, published: Published) -> None:
    wf = (
        Workflow()
        .add("a", add_sig(app, 1, 2))
        .add("b", add_sig(app, 1, 2), deps=["a"])
        .add("c", add_sig(app, 1, 2), deps=["a"])
        .add("d", add_sig(app, 1, 2), deps=["b", "c"])
    )
    wf.validate()
    handle = wf.apply_async()
    assert [m["headers"]["baton"]["step"] for m in published.messages] == ["a"]
    assert list(handle.status().steps) == ["a", "b", "c", "d"]


def test_an_empty_workflow_is_rejected(app: Celery, published: Published) -> None:
    wf = Workflow(label="empty")
    with pytest.raises(WorkflowError, match="at least one step"):
        wf.apply_async(app)
    assert published.messages == []


@pytest.mark.parametrize(
    "thing",
    [lambda: None, "some.task", {"task": "some.task"}, 42, None],
    ids=["function", "task-name", "plain-dict", "int", "none"],
)
def test_something_that_is_not_a_signature_is_rejected(
    app: Celery, published: Published, thing: Any
) -> None:
    wf = Workflow().add("ok", add_sig(app, 1, 2)).add("bad", thing)
    with pytest.raises(WorkflowError, match=r"'bad'.*signature"):
        wf.apply_async(app)
    assert_nothing_happened(app, wf, published)


def test_a_task_itself_instead_of_a_signature_is_rejected(
    app: Celery, published: Published
) -> None:
    wf = Workflow().add("ok", add_sig(app, 1, 2)).add("bad", task(app, "add"))
    with pytest.raises(WorkflowError, match="signature"):
        wf.apply_async(app)
    assert_nothing_happened(app, wf, published)


@pytest.mark.parametrize("kind", ["group", "chain", "chord"])
def test_canvases_are_rejected(app: Celery, published: Published, kind: str) -> None:
    a, b = add_sig(app, 1, 2), add_sig(app, 3, 4)
    canvas = {
        "group": lambda: group(a, b),
        "chain": lambda: chain(a, b),
        "chord": lambda: chord([a], b),
    }[kind]()
    wf = Workflow().add("ok", add_sig(app, 1, 2)).add("canvas", canvas)
    with pytest.raises(WorkflowError, match=r"'canvas'.*canvas"):
        wf.apply_async(app)
    assert_nothing_happened(app, wf, published)


def test_non_json_arguments_are_rejected(app: Celery, published: Published) -> None:
    wf = Workflow().add("ok", add_sig(app, 1, 2)).add("bad", add_sig(app, object(), 2))
    with pytest.raises(WorkflowError, match="JSON"):
        wf.apply_async()
    assert_nothing_happened(app, wf, published)


def test_non_json_keyword_arguments_are_rejected(app: Celery, published: Published) -> None:
    sig = task(app, "add").s(x=1, y={1, 2})
    wf = Workflow().add("bad", sig)
    with pytest.raises(WorkflowError, match="JSON"):
        wf.apply_async()
    assert_nothing_happened(app, wf, published)


def test_non_json_options_are_rejected(app: Celery, published: Published) -> None:
    wf = Workflow().add("bad", add_sig(app, 1, 2).set(headers={"x": object()}))
    with pytest.raises(WorkflowError, match="JSON"):
        wf.apply_async()
    assert_nothing_happened(app, wf, published)


def test_deps_given_as_a_string_are_rejected() -> None:
    with pytest.raises(WorkflowError, match="list of step names"):
        Workflow().add("b", None, deps="a")


@pytest.mark.parametrize("name", ["", None, 3])
def test_step_names_must_be_non_empty_strings(app: Celery, published: Published, name: Any) -> None:
    wf = Workflow().add(name, add_sig(app, 1, 2))
    with pytest.raises(WorkflowError, match="step names"):
        wf.apply_async()
    assert_nothing_happened(app, wf, published)


def test_bad_label_or_id_are_rejected() -> None:
    with pytest.raises(WorkflowError):
        Workflow(label=42)  # type: ignore[arg-type]
    with pytest.raises(WorkflowError):
        Workflow(workflow_id="")
    with pytest.raises(WorkflowError):
        Workflow(workflow_id=7)  # type: ignore[arg-type]


def test_apply_async_without_install_fails_before_anything(published: Published) -> None:
    bare = Celery(f"unit-workflow-bare-{next(_counter)}", set_as_current=False)
    bare.conf.broker_url = "memory://"

    @bare.task(name="bare.noop")
    def noop() -> None:
        return None

    with pytest.raises(RuntimeError, match="install"):
        Workflow().add("a", noop.s()).apply_async()
    assert published.messages == []


def test_a_workflow_id_that_exists_is_refused(app: Celery, published: Published) -> None:
    wid = f"fixed-{uuid.uuid4()}"
    Workflow(workflow_id=wid).add("a", add_sig(app, 1, 2)).apply_async()
    count = len(published.messages)
    with pytest.raises(ValueError, match="already exists"):
        Workflow(workflow_id=wid).add("b", add_sig(app, 1, 2)).apply_async()
    assert len(published.messages) == count
    assert list(store_of(app).load(wid).steps) == ["a"]


# --- what apply_async stores and publishes ------------------------------------------


def test_defaults_id_is_a_uuid4_and_label_none() -> None:
    wf = Workflow()
    assert uuid.UUID(wf.id).version == 4
    assert wf.label is None
    assert Workflow().id != wf.id
    assert Workflow(label="x", workflow_id="given").id == "given"


def test_add_returns_the_workflow_for_chaining(app: Celery) -> None:
    wf = Workflow()
    assert wf.add("a", add_sig(app, 1, 2)) is wf


def test_apply_async_publishes_only_the_roots_with_the_baton_header(
    app: Celery, published: Published
) -> None:
    wf = (
        Workflow(label="etl")
        .add("extract_a", add_sig(app, 1, 2))
        .add("extract_b", task(app, "noop").s())
        .add("join", add_sig(app, 0, 0), deps=["extract_a", "extract_b"])
    )
    handle = wf.apply_async()
    assert handle.id == wf.id
    assert handle.label == "etl"
    record = store_of(app).load(wf.id)
    assert [m["task"] for m in published.messages] == [f"{app.main}.add", f"{app.main}.noop"]
    for message, name in zip(published.messages, ["extract_a", "extract_b"]):
        assert message["headers"]["id"] == record.steps[name].job_id
        header = dict(message["headers"]["baton"])
        assert isinstance(header.pop("published_at"), float)
        assert header == {
            "workflow_id": wf.id,
            "workflow_label": "etl",
            "step": name,
            "dispatch": 1,
        }
    assert record.steps["join"].dispatch == 0
    assert record.steps["join"].deps == ("extract_a", "extract_b")
    assert record.steps["extract_a"].task == f"{app.main}.add"


def test_a_task_id_set_on_the_signature_becomes_the_job_id(
    app: Celery, published: Published
) -> None:
    job = f"job-{uuid.uuid4()}"
    wf = Workflow().add("a", add_sig(app, 1, 2).set(task_id=job))
    wf.apply_async()
    assert published.messages[0]["headers"]["id"] == job
    assert store_of(app).locate(job) == (wf.id, "a")


def test_signature_options_and_headers_are_kept(app: Celery, published: Published) -> None:
    sig = add_sig(app, 1, 2).set(headers={"tenant": "acme"}, priority=3)
    Workflow().add("a", sig).apply_async()
    headers = published.messages[0]["headers"]
    assert headers["tenant"] == "acme"
    assert headers["baton"]["step"] == "a"


def test_ignore_flags_are_stored(app: Celery) -> None:
    wf = (
        Workflow()
        .add("a", add_sig(app, 1, 2))
        .add("b", add_sig(app, 1, 2), deps=["a"], ignore_cancelled=True)
        .add("c", add_sig(app, 1, 2), deps=("a",), ignore_discarded=True)
    )
    wf.apply_async()
    steps = store_of(app).load(wf.id).steps
    assert (steps["b"].ignore_cancelled, steps["b"].ignore_discarded) == (True, False)
    assert (steps["c"].ignore_cancelled, steps["c"].ignore_discarded) == (False, True)


def test_apply_async_with_an_explicit_app(app: Celery) -> None:
    unbound = app.signature(f"{app.main}.add", args=(1, 2))
    handle = Workflow().add("a", unbound).apply_async(app)
    assert handle.app is app
    assert handle.status().steps["a"].state == "pending"


# --- WorkflowHandle -----------------------------------------------------------------


def test_status_of_an_unstarted_workflow_is_pending_everywhere(app: Celery) -> None:
    wf = Workflow(label="st").add("a", add_sig(app, 1, 2)).add("b", add_sig(app, 1, 2), deps=["a"])
    status = wf.apply_async().status()
    assert status.workflow_id == wf.id
    assert status.workflow_label == "st"
    assert list(status.steps) == ["a", "b"]
    for step in status.steps.values():
        assert step.state == "pending"
        assert step.attempt == 0
        assert step.error is None
        assert step.has_result is False
    assert status.outcome is None
    assert status.failed_steps == ()
    assert not status.finished


def test_status_follows_the_store_and_shows_the_outcome(app: Celery) -> None:
    wf = (
        Workflow(label="st")
        .add("a", add_sig(app, 1, 2))
        .add("b", add_sig(app, 1, 2), deps=["a"])
        .add("c", add_sig(app, 1, 2))
    )
    handle = wf.apply_async()
    store = store_of(app)
    store.begin(wf.id, "a", 1)
    status = handle.status()
    assert status.steps["a"].state == "executing"
    assert status.steps["a"].attempt == 1
    store.retrying(wf.id, "a", "ValueError: once")
    assert handle.status().steps["a"] == (
        "retryable",
        1,
        status.steps["a"].job_id,
        "ValueError: once",
        False,
    )
    store.begin(wf.id, "a", 1)
    store.settle(wf.id, "a", "discarded", error="ValueError: again")
    store.settle(wf.id, "c", "completed", has_result=True, result=3)
    final = handle.status()
    assert final.finished
    assert final.outcome == "failed"
    assert final.failed_steps == ("a", "b")
    assert final.steps["a"].attempt == 2
    assert final.steps["b"].state == "cancelled"
    assert final.steps["b"].attempt == 0
    assert final.steps["c"].has_result is True


def test_a_handle_can_be_rebuilt_from_the_id(app: Celery) -> None:
    wf = Workflow(label="rebuilt").add("a", add_sig(app, 1, 2))
    wf.apply_async()
    handle = WorkflowHandle(wf.id, app)
    assert handle.id == wf.id
    assert handle.label == "rebuilt"
    assert handle.status().steps["a"].state == "pending"
    assert wf.id in repr(handle)


def test_status_of_an_unknown_workflow_raises(app: Celery) -> None:
    with pytest.raises(UnknownWorkflow):
        WorkflowHandle("no-such-workflow", app).status()


def test_wait_times_out_on_an_unfinished_workflow(app: Celery) -> None:
    handle = Workflow().add("a", add_sig(app, 1, 2)).apply_async()
    with pytest.raises(TimeoutError):
        handle.wait(timeout=0.05)


def test_wait_returns_the_finished_event(app: Celery) -> None:
    wf = Workflow(label="w").add("a", add_sig(app, 1, 2)).add("b", add_sig(app, 1, 2))
    handle = wf.apply_async()
    store = store_of(app)
    store.settle(wf.id, "b", "discarded", error="E")
    out = store.settle(wf.id, "a", "completed")
    assert out.finish is not None
    finished = handle.wait(timeout=5)
    assert finished.workflow_id == wf.id
    assert finished.workflow_label == "w"
    assert finished.outcome == "failed"
    assert finished.failed_steps == ("b",)
    assert finished.timestamp.utcoffset() == timedelta(0)
    assert finished.timestamp.timestamp() == pytest.approx(out.finish.finished_at)
    assert WorkflowHandle(wf.id, app).wait(timeout=1) == finished


def test_wait_wakes_up_when_another_thread_finishes_the_workflow(app: Celery) -> None:
    wf = Workflow().add("a", add_sig(app, 1, 2))
    handle = wf.apply_async()
    waiting = threading.Event()
    got: list[Any] = []

    def waiter() -> None:
        waiting.set()
        got.append(handle.wait(timeout=10))

    thread = threading.Thread(target=waiter)
    thread.start()
    waiting.wait(5)
    store_of(app).settle(wf.id, "a", "completed")
    thread.join(10)
    assert [e.outcome for e in got] == ["completed"]


def test_a_step_whose_first_publish_fails_is_published_once_by_the_apps_retry(
    tmp_path: Path,
) -> None:
    """A step goes out in one attempt without kombu's retry first; when that fails (the
    broker is down), it is published the app's usual way, with its retry policy: here
    the broker comes up just before that second attempt, and the step goes out once."""
    broker = LocalRedis(tmp_path)
    app = Celery(f"unit-workflow-{next(_counter)}", set_as_current=False)
    app.conf.update(broker_url=broker.url, baton_store="memory://", task_ignore_result=True,
                    task_default_queue="first-publish-fails")  # fmt: skip

    @app.task(name="first-publish.noop", shared=False)
    def noop() -> None:
        return None

    baton_celery.install(app)
    attempts: list[str] = []

    def attempted(sender: Any = None, **_: Any) -> None:
        attempts.append(sender)
        if len(attempts) == 2:  # the first failed: the broker is down
            broker.start()

    signals.before_task_publish.connect(attempted, weak=False)
    try:
        wf = Workflow()
        wf.add("only", noop.si())
        wf.apply_async(app=app)
        assert attempts == ["first-publish.noop"] * 2
        assert broker.client().llen("first-publish-fails") == 1
    finally:
        signals.before_task_publish.disconnect(attempted)
        baton_celery.uninstall(app)
        broker.stop()


def test_an_eager_step_that_raises_runs_once(app: Celery) -> None:
    """Eager mode with propagation: publishing a step runs it and raises what it raised;
    baton settles it discarded and does not publish it again."""
    app.conf.update(task_always_eager=True, task_eager_propagates=True)
    runs: list[str] = []

    @app.task(name=f"{app.main}.boom", shared=False)
    def boom() -> None:
        runs.append("boom")
        raise ValueError("boom")

    wf = Workflow()
    wf.add("a", task(app, "noop").si())
    wf.add("b", boom.si(), deps=["a"])
    handle = wf.apply_async(app=app)
    assert runs == ["boom"]
    assert handle.status().steps["b"].state == "discarded"
