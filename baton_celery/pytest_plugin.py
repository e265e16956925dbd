"""pytest fixtures for testing your own workflows.

Installed with baton_celery as a pytest plugin (the ``pytest11`` entry point) and inert
until a test asks for one of its fixtures. They are built on Celery's own pytest
fixtures (``celery_app`` and the in-process worker of ``celery_worker``, on the memory
broker), which pytest-celery loads (or run pytest with ``-p celery.contrib.pytest``). A user's
test, in ``test_etl.py``::

    from baton_celery import Workflow

    def test_etl(celery_app, baton_run):
        @celery_app.task
        def extract():
            return [1, 2, 3]

        @celery_app.task
        def load():
            raise ValueError("disk full")

        run = baton_run(
            Workflow(label="etl")
            .add("extract", extract.s())
            .add("load", load.s(), deps=["extract"])
        )
        assert run.outcome == "failed"
        assert run.failed_steps == ("load",)
        assert run.states("load") == ["executing", "discarded"]
        assert run.results() == {"extract": [1, 2, 3]}

The fixtures:

- ``baton_store``: the store URL of ``baton_app`` (``"memory://"``); override it to test
  on another (``"sqlite:///..."``, a Redis store);
- ``baton_app``: Celery's ``celery_app`` with baton installed on that store;
- ``baton_worker``: the in-process worker of Celery's ``celery_worker`` (solo pool)
  serving it;
- ``baton_run``: ``baton_run(workflow, timeout=10.0)`` starts the workflow on
  ``baton_app``, waits for its finish and returns a :class:`WorkflowRun`: the finish,
  and every event of the workflow from the store's history (as its receivers got them,
  in whatever process they ran);
- ``baton_events``: the events sent in this process while the test runs (an
  :class:`~baton_celery.testing.EventLog`, see :func:`baton_celery.collect_events`).

With pytest-celery's ``celery_setup`` (workers in Docker containers), override
``baton_app`` to return ``celery_setup.app`` with baton installed on a store the
containers share (a Redis store), and ``baton_worker`` to return
``celery_setup.worker``: ``baton_run`` then reads everything from that store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:
    from .events import Event, WorkflowFinished
    from .testing import EventLog
    from .workflow import Workflow, WorkflowHandle

__all__ = [
    "WorkflowRun",
    "baton_app",
    "baton_events",
    "baton_run",
    "baton_store",
    "baton_worker",
]

NO_CELERY_FIXTURES = (
    "baton_celery's fixtures are built on Celery's pytest fixtures (celery_app, "
    "celery_worker_pool, ...), which are not loaded: install pytest-celery, or run pytest with "
    "-p celery.contrib.pytest"
)

#: Seconds baton_run waits for a workflow's finish, unless told otherwise.
DEFAULT_TIMEOUT = 10.0
#: Seconds between two polls of kombu's memory transport, unless the app sets its own.
MEMORY_POLLING = 0.01


@dataclasses.dataclass(frozen=True)
class WorkflowRun:
    """A finished workflow, as :func:`baton_run` returns it."""

    handle: WorkflowHandle
    finished: WorkflowFinished
    events: list[Event]  # every event of the workflow, in order (its store history)

    @property
    def outcome(self) -> str:
        return self.finished.outcome

    @property
    def failed_steps(self) -> tuple[str, ...]:
        return self.finished.failed_steps

    def states(self, step: str) -> list[str]:
        """The states ``step`` went through, in order."""
        return [e.state for e in self.events if getattr(e, "step_name", None) == step]  # type: ignore[union-attr]

    def results(self) -> dict[str, Any]:
        """Each completed step's stored result, by name."""
        return self.handle.results()


def _celery_fixture(request: pytest.FixtureRequest, name: str) -> Any:
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        pytest.fail(NO_CELERY_FIXTURES, pytrace=False)


@pytest.fixture
def baton_store() -> str:
    """The store of :func:`baton_app`: override it to test on another."""
    return "memory://"


@pytest.fixture
def baton_app(request: pytest.FixtureRequest, baton_store: str) -> Iterator[Any]:
    """Celery's ``celery_app`` with baton installed (on ``baton_store``), uninstalled
    after the test."""
    import baton_celery

    app = _celery_fixture(request, "celery_app")
    if app.conf.get("baton_store") is None:
        app.conf.baton_store = baton_store
    options = app.conf.broker_transport_options
    if str(app.conf.broker_url).startswith("memory") and "polling_interval" not in options:
        # kombu's memory transport polls its queues every second by default: each step
        # of a workflow would wait for it.
        app.conf.broker_transport_options = {**options, "polling_interval": MEMORY_POLLING}
    baton_celery.install(app)
    try:
        yield app
    finally:
        baton_celery.uninstall(app)


@pytest.fixture
def baton_worker(request: pytest.FixtureRequest, baton_app: Any) -> Iterator[Any]:
    """An in-process worker serving :func:`baton_app`: the one Celery's ``celery_worker``
    starts (pool ``celery_worker_pool``, ``celery_worker_parameters``, after importing
    ``celery_includes``). pytest-celery 1.x gives the name ``celery_worker`` to its
    Docker worker, so this fixture starts it itself."""
    from celery.contrib.testing.worker import start_worker

    for module in _celery_fixture(request, "celery_includes"):
        baton_app.loader.import_task_module(module)
    pool = _celery_fixture(request, "celery_worker_pool")
    parameters = _celery_fixture(request, "celery_worker_parameters")
    with start_worker(baton_app, pool=pool, **parameters) as worker:
        try:
            yield worker
        finally:
            _wake_to_stop(baton_app, pool)


def _wake_to_stop(app: Any, pool: str) -> None:
    """A solo worker notices that it must stop only between two deliveries: give it two,
    rather than wait for its poll (seconds per test)."""
    if pool != "solo" or "celery.ping" not in app.tasks:
        return
    from celery.worker import state

    state.should_terminate = 0
    for _ in range(2):
        app.send_task("celery.ping")


@pytest.fixture
def baton_events() -> Iterator[EventLog]:
    """The events sent in this process while the test runs."""
    from .testing import collect_events

    with collect_events() as events:
        yield events


@pytest.fixture
def baton_run(baton_app: Any, baton_worker: Any) -> Callable[..., WorkflowRun]:
    """``baton_run(workflow, timeout=10.0)``: start it, wait for its finish, and return
    a :class:`WorkflowRun`. Tasks the test defined after the worker started are
    served too."""

    def run(workflow: Workflow, timeout: float = DEFAULT_TIMEOUT) -> WorkflowRun:
        consumer = getattr(baton_worker, "consumer", None)
        if consumer is not None:  # an in-process worker: learn the test's own tasks
            consumer.update_strategies()
        handle = workflow.apply_async(app=baton_app)
        finished = handle.wait(timeout=timeout)
        return WorkflowRun(handle, finished, handle.events())

    return run
