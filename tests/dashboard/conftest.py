"""Fixtures of the dashboard's in-process tests: a Celery app on the memory store (no
broker is used: workflows are driven through the store's own transitions, which make the
numbered events the dashboard shows), and the dashboard of it with Flask's test client."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import pytest
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient

import baton_celery
from baton_celery.dashboard import DashboardConfig, create_app
from baton_celery.dashboard.blueprint import Dashboard
from baton_celery.events import Event
from baton_celery.stores import Store
from baton_celery.stores.records import StepRecord, WorkflowRecord

_apps = itertools.count()


@dataclass
class Site:
    """A dashboard under test: its Flask app and client, and the store behind it."""

    web: Flask
    client: FlaskClient
    dashboard: Dashboard
    store: Store

    def workflow(self, steps: dict[str, list[str]], label: str | None = "test") -> str:
        """Store a workflow of ``{step: [deps]}``; its id."""
        return add_workflow(self.store, steps, label)

    def run(self, workflow_id: str, step: str, state: str = "completed", **kw: Any) -> list[Event]:
        """Start ``step`` and settle it in ``state``: the events it made."""
        return self.begin(workflow_id, step) + self.settle(workflow_id, step, state, **kw)

    def begin(self, workflow_id: str, step: str) -> list[Event]:
        return self.store.begin(workflow_id, step, 1).events

    def settle(
        self, workflow_id: str, step: str, state: str = "completed", **kw: Any
    ) -> list[Event]:
        return self.store.settle(workflow_id, step, state, **kw).events


def add_workflow(store: Store, steps: dict[str, list[str]], label: str | None = "test") -> str:
    workflow_id = str(uuid.uuid4())
    record = WorkflowRecord(
        id=workflow_id,
        label=label,
        steps={
            name: StepRecord(
                name=name,
                task=f"tests.{name}",
                job_id=str(uuid.uuid4()),
                signature={},
                deps=tuple(deps),
            )
            for name, deps in steps.items()
        },
    )
    store.create(record)
    return workflow_id


@pytest.fixture
def celery_app() -> Iterator[Celery]:
    app = Celery(f"dashboard-test-{next(_apps)}", set_as_current=False)
    app.conf.update(broker_url="memory://", baton_store="memory://", task_ignore_result=True)
    baton_celery.install(app)
    try:
        yield app
    finally:
        baton_celery.uninstall(app)
        app.close()


@pytest.fixture
def make_site(celery_app: Celery) -> Iterator[Callable[..., Site]]:
    """``make_site(**settings)``: the dashboard of ``celery_app`` with these
    ``DashboardConfig`` fields (a short heartbeat by default), without a broker listener."""
    made: list[Dashboard] = []

    def make(**settings: Any) -> Site:
        config = DashboardConfig(**{"heartbeat": 0.05, **settings}).checked()
        web = create_app(celery_app, config, listen=False)
        dashboard: Dashboard = web.extensions["baton_dashboard"]
        made.append(dashboard)
        return Site(web, web.test_client(), dashboard, dashboard.store)

    yield make
    for dashboard in made:
        dashboard.close()


@pytest.fixture
def site(make_site: Callable[..., Site]) -> Site:
    return make_site()
