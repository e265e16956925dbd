"""The pages in Chromium beyond the live scenario: a 1,000-step workflow (laid out in
well under a second, nothing overlapping or cut off), an index of 10,000 workflows
(paged), escaping of task texts, 404, read-only methods, and authentication on and off."""

from __future__ import annotations

import base64
import uuid
from typing import Any, Callable

from harness import Cluster
from playwright.sync_api import Page, expect

from baton_celery import StepUpdated, Workflow

from .conftest import Local, artifact, screenshot, store_kind

LONG_ERROR = "ValueError: <script>window.pwned = 1</script> " + "row 17 has a bad date; " * 90
#: "Well under a second" for laying out 1,000 steps, on a loaded 2-core machine.
LAYOUT_BUDGET_MS = 500


def run_all(local: Local, workflow_id: str, names: list[str], fail: dict[str, str]) -> None:
    """Run every step in order through the store's transitions (as a worker would), the
    ones in ``fail`` discarded with that error; cancelled ones are skipped."""
    store = local.store
    cancelled: set[str] = set()
    for name in names:
        if name in cancelled:
            continue
        store.begin(workflow_id, name, 1)
        if name in fail:
            out = store.settle(workflow_id, name, "discarded", error=fail[name])
            cancelled.update(
                e.step_name
                for e in out.events
                if isinstance(e, StepUpdated) and e.state == "cancelled"
            )
        else:
            store.settle(workflow_id, name, "completed", has_result=True, result=1)


def overlaps(page: Page, selector: str) -> list[str]:
    """Pairs of elements matching ``selector`` whose boxes overlap, as shown."""
    found: list[str] = page.evaluate(
        """selector => {
            const boxes = [...document.querySelectorAll(selector)].map(e => {
                const r = e.getBoundingClientRect();
                return {n: e.dataset.node, l: r.left, r: r.right, t: r.top, b: r.bottom};
            }).sort((a, b) => a.l - b.l);
            const bad = [];
            for (let i = 0; i < boxes.length; i++)
                for (let j = i + 1; j < boxes.length && boxes[j].l < boxes[i].r; j++)
                    if (boxes[j].t < boxes[i].b && boxes[i].t < boxes[j].b)
                        bad.push(boxes[i].n + " / " + boxes[j].n);
            return bad;
        }""",
        selector,
    )
    return found


def measure(page: Page, name: str) -> float:
    duration: float = page.evaluate(f"performance.getEntriesByName('{name}')[0].duration")
    return duration


def test_a_1000_step_workflow(local_dashboard: Callable[..., Local], pages: Any) -> None:
    local = local_dashboard()
    shape: dict[str, list[str]] = {}
    previous: list[str] = []
    for stage in range(10):
        current = [f"stage{stage}-part-{k:03d}" for k in range(100)]
        for k, name in enumerate(current):
            shape[name] = list(dict.fromkeys([previous[k], previous[0]])) if previous else []
        previous = current
    workflow_id = local.workflow(shape, label="one thousand steps")
    run_all(local, workflow_id, list(shape), fail={"stage3-part-007": LONG_ERROR})

    page = pages()
    page.goto(f"{local.url}workflows/{workflow_id}")
    expect(page.locator("tr[data-step]")).to_have_count(1000)
    expect(page.locator("[data-node]")).to_have_count(1000)
    layout, first_render = measure(page, "baton-graph"), measure(page, "baton-first-render")
    assert layout < LAYOUT_BUDGET_MS, f"laying out 1,000 steps took {layout:.0f} ms"
    print(f"1,000 steps: graph {layout:.1f} ms, whole first render {first_render:.1f} ms")
    summary = page.locator(f'[data-workflow-id="{workflow_id}"]')
    expect(summary).to_have_attribute("data-state", "failed")
    expect(page.locator('tr[data-state="cancelled"]')).to_have_count(6)
    failed = page.locator('tr[data-step="stage3-part-007"]')
    expect(failed).to_have_attribute("data-state", "discarded")
    expect(failed.locator(".error")).to_have_text(LONG_ERROR.strip())
    assert page.evaluate("window.pwned") is None
    assert overlaps(page, "#graph [data-node]") == []
    # Nothing cut off: the page never scrolls sideways; the big parts scroll in boxes.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert page.evaluate(
        "(b => b.scrollWidth > b.clientWidth)(document.querySelector('.graph-box'))"
    )
    error_box = failed.locator(".error")
    assert error_box.evaluate("e => e.scrollHeight > e.clientHeight")  # long: it scrolls
    screenshot(page, "detail-1000-steps")
    page.locator("#fit").click()
    assert page.evaluate(
        "(b => b.scrollWidth <= b.clientWidth)(document.querySelector('.graph-box'))"
    )
    page.locator(".graph-box").screenshot(path=str(artifact("detail-1000-steps-fit")))


def test_an_index_of_10000_workflows_is_paged(
    local_dashboard: Callable[..., Local], pages: Any
) -> None:
    local = local_dashboard(page_size=50)
    ids = [local.workflow({"a": []}, label=f"batch-{i % 7}") for i in range(10_000)]
    page = pages()
    response = page.goto(local.url)
    assert response is not None and response.ok
    rows = page.locator("tr[data-workflow-id]")
    expect(rows).to_have_count(50)
    expect(rows.first).to_have_attribute("data-workflow-id", ids[-1])  # newest first
    page.locator("#older").click()
    expect(rows.first).to_have_attribute("data-workflow-id", ids[-51])
    expect(rows).to_have_count(50)
    page.goto(f"{local.url}?label=batch-3&state=running")
    expect(rows).to_have_count(50)
    assert set(rows.evaluate_all("rs => rs.map(r => r.querySelector('.name').textContent)")) == {
        "batch-3"
    }
    screenshot(page, "index-10000")


def test_task_texts_show_as_text(cluster: Cluster, dashboard: str, pages: Any) -> None:
    steps = cluster.steps()
    label = '<img src=x onerror="window.pwned=1">'
    name = "<script>window.pwned=1</script>"
    workflow_id = str(uuid.uuid4())
    Workflow(label=label, workflow_id=workflow_id).add(
        name, steps.s(name, fail_forever=True)
    ).apply_async(app=cluster.app)
    page = pages()
    page.goto(f"{dashboard}workflows/{workflow_id}")
    expect(page.locator(f'[data-workflow-id="{workflow_id}"]')).to_have_attribute(
        "data-state", "failed"
    )
    expect(page.locator("h1")).to_have_text(label)
    row = page.locator("tr[data-step]")
    assert row.get_attribute("data-step") == name
    expect(row.locator(".name")).to_have_text(name)
    expect(row.locator(".error")).to_have_text(f"ValueError: {name} is broken")
    page.goto(dashboard)
    expect(page.locator(f'[data-workflow-id="{workflow_id}"] .name')).to_have_text(label)
    assert page.evaluate("window.pwned") is None
    assert page.locator("script:not([src]):not([type='application/json'])").count() == 0
    screenshot(page, f"escaping-index-{store_kind(cluster)}")


def test_404_and_read_only(dashboard: str, pages: Any) -> None:
    page = pages()
    response = page.goto(f"{dashboard}workflows/no-such-workflow")
    assert response is not None and response.status == 404
    expect(page.locator(".error-message")).to_have_text("no workflow no-such-workflow in the store")
    screenshot(page, "not-found")
    for path in ["", "api/workflows", "workflows/x", "api/stream"]:
        for method in ["POST", "PUT", "PATCH", "DELETE"]:
            answer = page.request.fetch(f"{dashboard}{path}", method=method)
            assert answer.status == 405, (method, path)
            answer.dispose()


def test_authentication_off_and_on(local_dashboard: Callable[..., Local], pages: Any) -> None:
    open_ = local_dashboard()
    page = pages()
    assert page.goto(open_.url).status == 200  # type: ignore[union-attr]

    token = "a-token-for-the-test"
    guarded = local_dashboard(token=token, heartbeat=0.2)
    workflow_id = guarded.workflow({"a": []}, label="guarded")
    page = pages()
    refused = page.goto(guarded.url)
    assert refused is not None and refused.status == 401
    landed = page.goto(f"{guarded.url}workflows/{workflow_id}?token={token}")
    assert landed is not None and landed.status == 200
    assert page.url == f"{guarded.url}workflows/{workflow_id}"  # the token left the address
    expect(page.locator('#live[data-live="live"]')).to_be_visible()  # the stream got in too
    guarded.publish(guarded.store.begin(workflow_id, "a", 1).events)
    expect(page.locator('tr[data-step="a"]')).to_have_attribute("data-state", "executing")

    basic = local_dashboard(basic_auth="ops:secret")
    right = pages(http_credentials={"username": "ops", "password": "secret"})
    assert right.goto(basic.url).status == 200  # type: ignore[union-attr]
    expect(right.locator('#live[data-live="live"]')).to_be_visible()
    # (Chromium itself ends a navigation answered 401 with a Basic challenge.)
    for credentials, status in [(b"", 401), (b"ops:nope", 401), (b"ops:secret", 200)]:
        header = {"Authorization": "Basic " + base64.b64encode(credentials).decode()}
        answer = pages().request.get(basic.url, headers=header if credentials else {})
        assert answer.status == status, credentials
        answer.dispose()
