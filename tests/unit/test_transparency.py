"""baton installed changes nothing for what it wraps, and undoes itself on uninstall.

Regression tests for defects a cold read and Celery's own test suites found: the
original before_start / retry are called exactly as Celery would call them; a decorator
around them survives; install -> uninstall -> install leaves one wrapper; worker_init
imports no pool; the guard covers the failure paths that used to escape into Celery.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from billiard.exceptions import WorkerLostError
from celery import Celery, Task
from celery.exceptions import Ignore

import baton_celery
from baton_celery import guard
from baton_celery.hooks import GATE_ATTR, on_task_failure, on_worker_init
from baton_celery.runtime import runtime_for
from baton_celery.stores import StoreError
from baton_celery.stores.memory import MemoryStore


@pytest.fixture(autouse=True)
def _fresh_failure_log() -> Iterator[None]:
    guard.reset()
    yield
    guard.reset()


def make_app(**conf: Any) -> Celery:
    app = Celery(f"transparency-{uuid.uuid4().hex[:8]}", set_as_current=False)
    settings = {"broker_url": "memory://", "task_ignore_result": True, "baton_store": "memory://"}
    app.conf.update({**settings, **conf})
    return app


@pytest.fixture
def app() -> Iterator[Celery]:
    app = make_app()
    yield app
    baton_celery.uninstall(app)


def baton_failures(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "baton_celery" and text in r.getMessage()]


# --- before_start is called as Celery calls it ------------------------------------------

seen: list[tuple[Any, ...]] = []


class Recorder:
    """A callable object (no __get__): Celery calls it without the task."""

    def __call__(self, *args: Any) -> None:
        seen.append(("object", *args))


def logged(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        seen.append(("decorator", *args[1:]))
        return fn(*args, **kwargs)

    return wrapper


class StaticHook(Task):  # type: ignore[misc]
    @staticmethod
    def before_start(task_id: str, args: Any, kwargs: Any) -> None:
        seen.append(("static", task_id, args, kwargs))


class ObjectHook(Task):  # type: ignore[misc]
    before_start = Recorder()


class DecoratedHook(Task):  # type: ignore[misc]
    @logged
    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        seen.append(("method", task_id, args, kwargs))


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        (StaticHook, [("static",)]),
        (ObjectHook, [("object",)]),
        (DecoratedHook, [("decorator",), ("method",)]),
    ],
    ids=["staticmethod", "callable-object", "functools-wraps"],
)
def test_the_original_before_start_gets_what_celery_gives_it(
    app: Celery, base: type, expected: list[tuple[str]]
) -> None:
    baton_celery.install(app)

    @app.task(base=base, name=f"{app.main}.hooked")
    def hooked(x: int, y: int = 0) -> int:
        return x + y

    seen.clear()
    result = hooked.apply((1,), {"y": 2}, task_id="t-1")
    assert result.result == 3
    assert seen == [(*kind, "t-1", (1,), {"y": 2}) for kind in expected]


def test_a_mock_before_start_is_called_with_three_arguments(app: Celery) -> None:
    """As in Celery's own test of before_start (t/unit/tasks/test_trace.py)."""
    baton_celery.install(app)

    @app.task(name=f"{app.main}.plain")
    def plain(x: int) -> int:
        return x

    hook = mock.Mock()
    task = app.tasks[plain.name]
    type(task).before_start = hook  # set on the class after binding, as a user might
    assert task.apply((4,), task_id="t-2").result == 4
    hook.assert_called_once_with("t-2", (4,), {})


def test_the_gate_still_stops_a_gated_step_around_a_staticmethod(app: Celery) -> None:
    baton_celery.install(app)

    @app.task(base=StaticHook, name=f"{app.main}.gated")
    def gated() -> str:
        return "ran"

    task = app.tasks[gated.name]
    seen.clear()
    task.push_request(id="t-3", **{GATE_ATTR: "skip"})
    try:
        with pytest.raises(Ignore):
            task.before_start("t-3", (), {})
    finally:
        task.pop_request()
    assert seen == []  # skipped before the original ran


# --- install / uninstall ----------------------------------------------------------------


def test_install_uninstall_install_leaves_one_wrapper_and_uninstall_restores(
    app: Celery,
) -> None:
    @app.task(base=DecoratedHook, name=f"{app.main}.t")
    def t() -> None:
        return None

    app.finalize()
    cls = type(app.tasks[t.name])
    before = {name: cls.__dict__.get(name) for name in ("before_start", "retry")}
    for _ in range(3):
        baton_celery.install(app)
        for name in ("before_start", "retry"):
            wrapper = cls.__dict__[name]
            assert not hasattr(wrapper._baton_original, "_baton_original")
        baton_celery.uninstall(app)
        assert {name: cls.__dict__.get(name) for name in before} == before
    assert runtime_for(app) is None
    assert "annotations" not in app.__dict__ or not any(
        type(a).__name__ == "TaskAnnotations" for a in app.annotations
    )


def test_tasks_bound_after_install_are_wrapped_and_keep_user_annotations(app: Celery) -> None:
    calls: list[str] = []

    def around(before_start: Any) -> Any:
        def wrapped(task: Any, task_id: str, args: Any, kwargs: Any) -> Any:
            calls.append(task_id)
            return before_start(task, task_id, args, kwargs)

        return wrapped

    app.conf.task_annotations = [{"*": {"@before_start": around, "rate_limit": "7/s"}}]
    baton_celery.install(app)

    @app.task(name=f"{app.main}.late")
    def late() -> str:
        return "ok"

    assert late.apply(task_id="t-4").result == "ok"
    assert calls == ["t-4"]  # the user's around-wrapper runs inside baton's
    assert late.rate_limit == "7/s"  # and the entry's other keys still apply
    assert hasattr(type(app.tasks[late.name]).__dict__["before_start"], "_baton_original")


def test_a_setting_changed_after_install_is_taken_up_with_a_warning(
    app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = baton_celery.install(app)
    assert runtime.config.bridge is False
    app.conf.baton_bridge = True
    with caplog.at_level(logging.WARNING, logger="baton_celery"):
        runtime.store  # noqa: B018 - the first use in this process
    assert runtime.config.bridge is True
    assert any("baton_bridge changed after install" in r.getMessage() for r in caplog.records)


# --- failure paths under the guard --------------------------------------------------------


class LocateFails(MemoryStore):
    def locate(self, job_id: str) -> tuple[str, str] | None:
        raise StoreError("store down")


def test_worker_lost_with_a_failing_store_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app(baton_store=LocateFails())
    baton_celery.install(app)
    try:

        @app.task(name=f"{app.main}.lost")
        def lost() -> None:
            return None

        # The main process reports a WorkerLostError: sender.request is not the request.
        with caplog.at_level(logging.ERROR, logger="baton_celery"):
            on_task_failure(
                sender=app.tasks[lost.name], task_id="gone-1", exception=WorkerLostError("x")
            )
        [record] = baton_failures(caplog, "task_failure hook failed")
        assert record.exc_info is not None and isinstance(record.exc_info[1], StoreError)
    finally:
        baton_celery.uninstall(app)


class BrokenStore(MemoryStore):
    @property  # type: ignore[override]
    def shared_across_processes(self) -> bool:
        raise StoreError("cannot tell")


def test_worker_init_is_guarded(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(baton_store=BrokenStore())
    baton_celery.install(app)
    try:
        worker = mock.Mock(app=app, pool_cls="prefork")
        with caplog.at_level(logging.ERROR, logger="baton_celery"):
            on_worker_init(sender=worker)
        assert baton_failures(caplog, "worker_init hook failed")
    finally:
        baton_celery.uninstall(app)


def test_worker_init_imports_no_pool() -> None:
    """Celery keeps worker_init free of pool imports (gevent/eventlet patch there)."""
    script = textwrap.dedent(
        """
        import sys
        from types import SimpleNamespace
        from celery import Celery
        import baton_celery
        from baton_celery.hooks import on_worker_init
        for pool in ("prefork", "solo", "threads"):
            app = Celery("p", set_as_current=False)
            app.conf.baton_store = "memory://"
            baton_celery.install(app)
            on_worker_init(sender=SimpleNamespace(app=app, pool_cls=pool))
        print(sorted(m for m in sys.modules if m.startswith("celery.concurrency.")))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_snoozed_step_whose_requeue_fails_does_not_fail_the_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A broker that refuses connections at once: the requeue's publish fails.
    app = make_app(
        broker_url="amqp://guest:guest@127.0.0.1:1//",
        broker_connection_timeout=0.5,
        broker_connection_retry=False,
        task_publish_retry=False,
    )
    baton_celery.install(app)
    try:

        @app.task(name=f"{app.main}.early")
        def early() -> str:
            return "ran"

        task = app.tasks[early.name]
        header = {"workflow_id": "w", "workflow_label": None, "step": "s", "dispatch": 1}
        task.push_request(id="t-5", headers={"baton": header}, **{GATE_ATTR: "snooze"})
        try:
            with caplog.at_level(logging.ERROR, logger="baton_celery"), pytest.raises(Ignore):
                task.before_start("t-5", (), {})
        finally:
            task.pop_request()
        assert baton_failures(caplog, "requeueing a snoozed step failed")
    finally:
        baton_celery.uninstall(app)


def test_install_does_not_load_a_pending_configuration() -> None:
    """Celery loads an app's configuration lazily; install must not force it (Celery's
    own t/unit/app tests found that it did)."""
    app = Celery(f"pending-{uuid.uuid4().hex[:8]}", set_as_current=False)
    baton_celery.install(app)
    try:
        assert not app.configured
        app.add_defaults({"baton_max_error_length": 55, "broker_url": "memory://"})
        app.config_from_object({"baton_store": "memory://"})  # still lazy: nothing read
        assert not app.configured
        runtime = runtime_for(app)
        assert runtime is not None and runtime.config.max_error_length == 55
        assert runtime.config.store == "memory://"
    finally:
        baton_celery.uninstall(app)
