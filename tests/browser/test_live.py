"""End to end in Chromium: a real prefork worker, the dashboard served by ``celery baton
dashboard`` in its own process, and a workflow. The index, opened first, shows it appear
and finish; its page, opened mid-run, shows steps go from executing to completed, a step
cancelled after a failure, and the finish, all without a reload; reloaded, the finished
page shows the final states."""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable

from harness import Cluster
from playwright.sync_api import Page, expect

from baton_celery import Workflow

from .conftest import screenshot, store_kind


def step(page: Page, name: str) -> Any:
    return page.locator(f'tr[data-step="{name}"]')


def api(page: Page, url: str) -> Any:
    response = page.request.get(url)
    assert response.ok, response.status
    return json.loads(response.text())


def test_a_workflow_followed_live(
    cluster: Cluster, dashboard: str, pages: Callable[..., Page]
) -> None:
    steps = cluster.steps()
    workflow_id = str(uuid.uuid4())
    store = store_kind(cluster)
    index = pages()
    index.goto(dashboard)
    expect(index.locator('#live[data-live="live"]')).to_be_visible()

    (
        Workflow(label="browser-e2e", workflow_id=workflow_id)
        .add("extract", steps.s("extract", block=True))
        .add("transform", steps.s("transform", block=True), deps=["extract"])
        .add("validate", steps.s("validate", fail_forever=True), deps=["extract"])
        .add("load", steps.s("load"), deps=["transform", "validate"])
        .apply_async(app=cluster.app)
    )
    row = index.locator(f'[data-workflow-id="{workflow_id}"]')
    expect(row).to_have_attribute("data-state", "running")  # it appeared, no reload
    expect(row.locator(".count")).to_have_text("0 / 4")

    steps.wait_started("extract")
    detail = pages()
    detail.goto(f"{dashboard}workflows/{workflow_id}")  # mid-run
    summary = detail.locator(f'[data-workflow-id="{workflow_id}"]')
    expect(summary).to_have_attribute("data-state", "running")
    expect(step(detail, "extract")).to_have_attribute("data-state", "executing")
    expect(detail.locator('[data-node="extract"]')).to_have_attribute("data-state", "executing")
    expect(step(detail, "load")).to_have_attribute("data-state", "pending")
    expect(detail.locator('#live[data-live="live"]')).to_be_visible()
    screenshot(detail, f"detail-running-{store}")

    steps.release("extract")
    expect(step(detail, "extract")).to_have_attribute("data-state", "completed")
    expect(step(detail, "validate")).to_have_attribute("data-state", "discarded")
    expect(step(detail, "validate").locator(".error")).to_have_text(
        "ValueError: validate is broken"
    )
    expect(step(detail, "load")).to_have_attribute("data-state", "cancelled")  # after the failure
    steps.wait_started("transform")
    expect(step(detail, "transform")).to_have_attribute("data-state", "executing")
    expect(summary).to_have_attribute("data-state", "running")
    expect(row.locator(".count")).to_have_text("3 / 4")
    screenshot(detail, f"detail-failing-{store}")

    steps.release("transform")
    expect(step(detail, "transform")).to_have_attribute("data-state", "completed")
    expect(summary).to_have_attribute("data-state", "failed")  # the finish, live
    expect(detail.locator('#live[data-live="finished"]')).to_be_visible()
    expect(summary.locator('[data-field="failed"]')).to_have_text("validate, load")
    expect(row).to_have_attribute("data-state", "failed")
    expect(row.locator(".failed-steps")).to_have_text("validate, load")
    screenshot(detail, f"detail-finished-live-{store}")
    screenshot(index, f"index-{store}")

    # Every event once, in order, none missing: the page's history is the store's.
    stored = api(detail, f"{dashboard}api/workflows/{workflow_id}")
    shown = detail.locator("#history li").evaluate_all("items => items.map(i => +i.dataset.seq)")
    assert shown == [e["seq"] for e in stored["history"]] == list(range(1, len(shown) + 1))
    final = {s["name"]: s["state"] for s in stored["steps"]}
    assert final == {
        "extract": "completed",
        "transform": "completed",
        "validate": "discarded",
        "load": "cancelled",
    }

    detail.reload()
    for name, state in final.items():
        expect(step(detail, name)).to_have_attribute("data-state", state)
        expect(detail.locator(f'[data-node="{name}"]')).to_have_attribute("data-state", state)
    expect(summary).to_have_attribute("data-state", "failed")
    expect(detail.locator('#live[data-live="finished"]')).to_be_visible()
    expect(detail.locator("#history li")).to_have_count(len(shown))
    screenshot(detail, f"detail-reloaded-{store}")
