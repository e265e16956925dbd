"""Canvas (chain, group, chord, nested) as workflows: the translation of shapes to steps,
and each shape run on an in-process worker (solo pool, kombu's memory broker, the memory
store), compared with what Celery's canvas semantics give."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, chain, chord, group
from celery.contrib.testing.worker import start_worker
from celery.worker import state as worker_state

import baton_celery
from baton_celery import Workflow, WorkflowError, WorkflowHandle, collect_events

TIMEOUT = 15.0

app = Celery(f"unit-canvas-{uuid.uuid4().hex[:6]}", set_as_current=False)
app.conf.update(
    broker_url="memory://",
    broker_transport_options={"polling_interval": 0.01},
    broker_connection_retry_on_startup=True,
    task_default_queue=app.main,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    baton_store="memory://",
    baton_snooze_delay=0.05,
)
linked: list[tuple[str, Any]] = []
linked_cond = threading.Condition()


@app.task(name="add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="tsum")
def tsum(xs: list[int]) -> int:
    return sum(xs)


@app.task(name="ident")
def ident(*args: Any, **kwargs: Any) -> Any:
    return [list(args), kwargs]


@app.task(name="boom")
def boom(*args: Any) -> None:
    raise ValueError("boom")


@app.task(name="opaque")
def opaque() -> Any:
    return object()  # not JSON-serializable (the worker's memory broker still carries it)


@app.task(name="wake")
def wake() -> None:
    pass


@app.task(name="record")
def record(*args: Any) -> None:
    with linked_cond:
        linked.append(("record", list(args)))
        linked_cond.notify_all()


@app.task(name="on_error")
def on_error(request: Any, exc: Any, traceback: Any) -> None:
    with linked_cond:
        linked.append(("on_error", str(exc)))
        linked_cond.notify_all()


@pytest.fixture(scope="module")
def worker() -> Iterator[None]:
    baton_celery.install(app)
    root_level = logging.getLogger().level
    try:
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=TIMEOUT):
            try:
                yield
            finally:
                worker_state.should_terminate = 0
                wake.delay()
                wake.delay()
    finally:
        logging.getLogger().setLevel(root_level)
        baton_celery.uninstall(app)


def run(canvas: Any) -> tuple[Any, Any]:
    workflow = Workflow.from_canvas(canvas)
    with collect_events(workflow.id) as log:
        handle = workflow.apply_async(app)
        finished = handle.wait(timeout=TIMEOUT)
        log.wait_finished(timeout=TIMEOUT)
    assert len(log.finished) == 1 and log.finished[0].outcome == finished.outcome
    return handle, log


def steps_of(canvas: Any) -> list[tuple[str, tuple[str, ...]]]:
    return [(s.name, s.deps) for s in Workflow.from_canvas(canvas)._steps]


# -- translation ---------------------------------------------------------------------


def test_chain_links_depend_on_the_previous_part() -> None:
    assert steps_of(chain(add.s(1, 2), add.s(3), add.s(4))) == [
        ("add", ()),
        ("add#2", ("add",)),
        ("add#3", ("add#2",)),
    ]


def test_group_then_task_is_a_chord() -> None:
    expected = [("add", ()), ("add#2", ()), ("tsum", ("add", "add#2"))]
    assert steps_of(group(add.s(1, 1), add.s(2, 2)) | tsum.s()) == expected
    assert steps_of(chord([add.s(1, 1), add.s(2, 2)], tsum.s())) == expected


def test_names_from_set_step_and_generated_ones_avoid_them() -> None:
    canvas = chain(add.s(1, 1).set(step="add#2"), add.s(1), add.s(2))
    assert [n for n, _ in steps_of(canvas)] == ["add#2", "add", "add#3"]


def test_per_task_options_are_kept_and_step_is_not_an_option() -> None:
    canvas = chain(
        add.s(1, 1).set(step="first", queue="q1", priority=3, headers={"h": "v"}),
        add.s(1).set(countdown=0.5),
    )
    first, second = Workflow.from_canvas(canvas)._steps
    assert first.name == "first" and "step" not in first.signature.options
    assert {k: first.signature.options[k] for k in ("queue", "priority", "headers")} == {
        "queue": "q1",
        "priority": 3,
        "headers": {"h": "v"},
    }
    assert second.signature.options["countdown"] == 0.5


def test_translating_leaves_the_canvas_as_it_was() -> None:
    canvas = chain(add.s(1, 1), add.s(1))
    before = repr(canvas), [dict(t.options) for t in canvas.tasks]
    Workflow.from_canvas(canvas)
    assert (repr(canvas), [dict(t.options) for t in canvas.tasks]) == before


def linked_chain() -> Any:
    canvas = chain(add.s(1, 1), add.s(1))
    canvas.link(record.s())  # kept on the chain itself, not on a task
    return canvas


@pytest.mark.parametrize(
    ("canvas", "message"),
    [
        (lambda: group([]), "empty group"),
        (lambda: chain(), "empty chain"),
        (lambda: add.chunks([(1, 2)], 1), "baton cannot express a chunks"),
        (lambda: add.map([1, 2]), "baton cannot express a xmap"),
        (lambda: chain(add.s(1, 1).set(step="x"), add.s(2).set(step="x")), "duplicate step"),
        (lambda: group(add.s(1, 1), add.s(2, 2)).set(link=record.s()), "link on a group itself"),
        (linked_chain, "link on a chain itself"),
        (lambda: chain(add.s(1, 1).set(step=""), add.s(1)), "step names must be"),
    ],
)
def test_bad_input_is_a_workflow_error_naming_the_problem(canvas: Any, message: str) -> None:
    with pytest.raises(WorkflowError, match=message):
        Workflow.from_canvas(canvas())


# -- running ---------------------------------------------------------------------------

SHAPES = {
    "chain": (lambda: chain(add.s(1, 2), add.s(3), add.s(4)), 10),
    "group": (lambda: group(add.s(1, 1), add.s(2, 2)), [2, 4]),
    "chord": (lambda: chord([add.s(1, 1), add.s(2, 2), add.s(3, 3)], tsum.s()), 12),
    "chain of chords": (
        lambda: chain(
            chord([add.s(1, 1), add.s(2, 2)], tsum.s()), chord([add.s(1), add.s(2)], tsum.s())
        ),
        15,
    ),
    "chord of chains": (
        lambda: chord([chain(add.s(1, 1), add.s(1)), chain(add.s(2, 2), add.s(2))], tsum.s()),
        9,
    ),
    "group in a chain": (lambda: chain(add.s(1, 1), group(add.s(1), add.s(2))), [3, 4]),
    "chain in a group": (
        lambda: group(chain(add.s(1, 1), add.s(10)), add.s(5, 5), group(add.s(0, 1), add.s(0, 2))),
        [12, 10, 1, 2],
    ),
    "chord body a chain": (lambda: chord([add.s(1, 1), add.s(2, 2)], tsum.s() | add.s(100)), 106),
    "partials and si": (
        lambda: chain(add.s(1, 1), ident.s(7, k="v"), ident.si("alone")),
        [["alone"], {}],
    ),
    "group of one in a chain": (lambda: chain(add.s(1, 1), group(add.s(1)), add.s(1)), 4),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_gives_celerys_result(worker: None, shape: str) -> None:
    make, expected = SHAPES[shape]
    handle, log = run(make())
    assert handle.status().outcome == "completed"
    assert handle.result() == expected
    assert WorkflowHandle(handle.id, app).result() == expected  # the shape is in the store
    assert set(handle.results()) == set(handle.status().steps)
    for name in handle.status().steps:
        assert log.states(name) == ["executing", "completed"]


def test_partial_args_come_after_the_passed_result(worker: None) -> None:
    handle, _ = run(chain(add.s(1, 1), ident.s(7, k="v")))
    assert handle.result() == [[2, 7], {"k": "v"}]


def test_link_and_link_error_fire_as_celery_fires_them(worker: None) -> None:
    token = uuid.uuid4().hex
    ok = add.s(1, 1)
    ok.link(record.si(token))
    bad = boom.s()
    bad.link_error(on_error.s())
    handle, _ = run(group(ok, bad))
    with linked_cond:
        assert linked_cond.wait_for(
            lambda: ("record", [token]) in linked and ("on_error", "boom") in linked, TIMEOUT
        )
    assert handle.status().outcome == "failed"


def test_failing_chain_link_names_the_dropped_links(worker: None) -> None:
    handle, log = run(chain(add.s(1, 1), boom.s(), add.s(1), add.s(2)))
    finished = log.finished[0]
    assert finished.outcome == "failed"
    assert finished.failed_steps == ("boom", "add#2", "add#3")
    for name in ("add#2", "add#3"):
        (event,) = [e for e in log.steps if e.step_name == name]
        assert event.state == "cancelled" and "'boom'" in (event.error or "")
    with pytest.raises(WorkflowError, match="add#3"):
        handle.result()


def test_failing_chord_header_cancels_the_body(worker: None) -> None:
    handle, log = run(chord([add.s(1, 1), boom.s(), add.s(2, 2)], tsum.s()))
    assert log.finished[0].failed_steps == ("boom", "tsum")
    assert log.states("tsum") == ["cancelled"]
    assert handle.results() == {"add": 2, "add#2": 4}


def test_failing_task_in_a_nested_group(worker: None) -> None:
    _, log = run(chord([add.s(1, 1), group(add.s(2, 2), boom.s())], tsum.s()))
    assert log.finished[0].failed_steps == ("boom", "tsum")


def test_unpassable_result_fails_the_step_that_needed_it(worker: None) -> None:
    _, log = run(chain(opaque.s(), add.s(1)))
    assert log.finished[0].failed_steps == ("add",)
    (event,) = [e for e in log.steps if e.step_name == "add"]
    assert event.state == "discarded"
    assert "not JSON-serializable" in (event.error or "")


def test_result_of_a_plain_workflow_is_refused(worker: None) -> None:
    handle = Workflow().add("a", add.s(1, 1)).apply_async(app)
    handle.wait(timeout=TIMEOUT)
    assert handle.results() == {"a": 2}
    with pytest.raises(WorkflowError, match="from_canvas"):
        handle.result()
