"""The dashboard's pages and JSON API through Flask's test client: what they show, the
404s, the 405s of a read-only site, escaping, bad queries, and mounting under a prefix."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import pytest
from flask import Flask
from werkzeug.test import Client

from baton_celery.dashboard import mount
from baton_celery.dashboard.blueprint import Dashboard

from .conftest import Site

PAGES = ["/", "/workflows/{id}", "/api/workflows", "/api/workflows/{id}"]
STREAMS = ["/api/stream", "/api/workflows/{id}/stream"]


def snapshot(html: str) -> dict[str, Any]:
    """The JSON a page starts from (its <script type="application/json">)."""
    found = re.search(r'<script type="application/json" id="baton-data">(.*?)</script>', html, re.S)
    assert found, html
    data: dict[str, Any] = json.loads(found.group(1))
    return data


def test_index_lists_workflows_newest_first(site: Site) -> None:
    first = site.workflow({"a": []}, label="older")
    second = site.workflow({"a": [], "b": ["a"]}, label="newer")
    site.run(second, "a")
    data = site.client.get("/api/workflows").get_json()
    assert [w["id"] for w in data["workflows"]] == [second, first]
    newer = data["workflows"][0]
    assert (newer["label"], newer["state"], newer["settled"], newer["total"]) == (
        "newer", "running", 1, 2,
    )  # fmt: skip
    page = snapshot(site.client.get("/").get_data(as_text=True))
    assert page["data"]["workflows"] == data["workflows"]
    assert page["live"]["first_page"] is True


def test_index_filters_and_pages(site: Site) -> None:
    ids = [site.workflow({"a": []}, label="etl" if i % 2 else "other") for i in range(5)]
    done = ids[1]
    site.run(done, "a")
    only = site.client.get("/api/workflows?label=etl&state=completed").get_json()
    assert [w["id"] for w in only["workflows"]] == [done]
    first = site.client.get("/api/workflows?limit=2").get_json()
    assert [w["id"] for w in first["workflows"]] == ids[:2:-1][:2]
    second = site.client.get(f"/api/workflows?limit=2&before={first['next_before']}").get_json()
    assert [w["id"] for w in second["workflows"]] == [ids[2], ids[1]]
    html = site.client.get("/?label=etl").get_data(as_text=True)
    assert 'value="etl"' in html


@pytest.mark.parametrize(
    "query, why",
    [
        ("state=sleeping", "state: one of running, completed, failed"),
        ("before=yesterday", "before: not a number"),
        ("limit=0", "limit: out of range"),
        ("limit=5000", "limit: out of range"),
        ("before=nan", "before: out of range"),
        ("label=" + "x" * 201, "label: at most 200 characters"),
    ],
)
def test_a_bad_query_is_a_400_that_says_why(site: Site, query: str, why: str) -> None:
    api = site.client.get(f"/api/workflows?{query}")
    assert api.status_code == 400
    assert why in api.get_json()["error"]
    page = site.client.get(f"/?{query}")
    assert page.status_code == 400
    assert why in page.get_data(as_text=True)


def test_detail_shows_steps_as_their_history_made_them(site: Site) -> None:
    wf = site.workflow({"extract": [], "load": ["extract"], "report": ["load"]}, label="etl")
    site.run(wf, "extract")
    site.begin(wf, "load")
    site.store.retrying(wf, "load", "RuntimeError: flaked")
    site.begin(wf, "load")
    site.settle(wf, "load", "discarded", error="ValueError: broken")
    data = site.client.get(f"/api/workflows/{wf}").get_json()
    steps = {s["name"]: s for s in data["steps"]}
    assert [s["name"] for s in data["steps"]] == ["extract", "load", "report"]
    assert steps["extract"]["state"] == "completed"
    assert steps["extract"]["task"] == "tests.extract"
    assert (steps["load"]["state"], steps["load"]["attempt"]) == ("discarded", 2)
    assert steps["load"]["error"] == "ValueError: broken"
    assert [run[2] for run in steps["load"]["runs"]] == ["retryable", "discarded"]
    assert steps["report"]["state"] == "cancelled" and steps["report"]["runs"] == []
    assert steps["report"]["deps"] == ["load"]
    workflow = data["workflow"]
    assert (workflow["state"], workflow["settled"], workflow["failed_steps"]) == (
        "failed", 3, ["load", "report"],
    )  # fmt: skip
    assert [e["seq"] for e in data["history"]] == list(range(1, workflow["seq"] + 1))
    assert data["history"][-1]["kind"] == "workflow_finished"
    page = snapshot(site.client.get(f"/workflows/{wf}").get_data(as_text=True))
    assert page["detail"] == data
    # The store agrees with the fold of the history.
    record = site.store.load(wf)
    assert {n: s.state for n, s in record.steps.items()} == {
        n: s["state"] for n, s in steps.items()
    }


def test_an_unknown_workflow_is_a_404(site: Site) -> None:
    for path in ["/workflows/nope", "/api/workflows/nope", "/api/workflows/nope/stream"]:
        response = site.client.get(path)
        assert response.status_code == 404, path
        assert "no workflow nope" in response.get_data(as_text=True)
    assert site.client.get("/api/workflows/nope").get_json() == {
        "error": "no workflow nope in the store"
    }
    assert site.client.get("/no/such/page").status_code == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_only_get_and_head(site: Site, method: str) -> None:
    wf = site.workflow({"a": []})
    paths = [p.format(id=wf) for p in PAGES + STREAMS]
    for path in [*paths, f"/api/workflows/{wf}/cancel", "/static/common.js"]:
        response = site.client.open(path, method=method)
        assert response.status_code == 405, (method, path)
        response.close()
    assert site.client.head("/").status_code == 200
    assert site.store.load(wf).steps["a"].state == "pending"  # nothing changed


def test_cancel_only_when_turned_on_and_with_its_header(make_site: Callable[..., Site]) -> None:
    site = make_site(allow_cancel=True)
    wf = site.workflow({"a": [], "b": ["a"]})
    site.begin(wf, "a")
    page = snapshot(site.client.get(f"/workflows/{wf}").get_data(as_text=True))
    assert page["live"]["cancel"] == f"/api/workflows/{wf}/cancel"
    assert site.client.post(f"/api/workflows/{wf}/cancel").status_code == 400
    assert site.store.load(wf).outcome is None
    headers = {"X-Baton-Dashboard": "cancel"}
    response = site.client.post(f"/api/workflows/{wf}/cancel", headers=headers)
    assert response.status_code == 200
    assert site.store.load(wf).steps["b"].state == "cancelled"
    missing = site.client.post("/api/workflows/nope/cancel", headers=headers)
    assert missing.status_code == 404


def test_task_texts_are_escaped(site: Site) -> None:
    evil = "<script>alert('x')</script>"
    wf = site.workflow({"a": []}, label=f"<b>{evil}</b>")
    site.begin(wf, "a")
    site.settle(wf, "a", "discarded", error=f"ValueError: {evil}")
    for path in ["/", f"/workflows/{wf}"]:
        html = site.client.get(path).get_data(as_text=True)
        assert "<script>alert" not in html and "<b><script>" not in html, path
    detail = site.client.get(f"/workflows/{wf}").get_data(as_text=True)
    assert "&lt;b&gt;&lt;script&gt;" in detail  # the title and heading, as text
    assert snapshot(detail)["detail"]["steps"][0]["error"] == f"ValueError: {evil}"


def test_security_headers(site: Site) -> None:
    for path in ["/", "/api/workflows", "/no/such/page"]:
        response = site.client.get(path)
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_the_static_files_are_served(site: Site) -> None:
    for name in ["common.js", "index.js", "graph.js", "workflow.js", "dashboard.css"]:
        response = site.client.get(f"/static/{name}")
        assert response.status_code == 200 and response.data, name
        response.close()


def test_mounted_in_a_flask_host_under_a_prefix(make_site: Callable[..., Site]) -> None:
    site = make_site()  # only for its dashboard's store; the host mounts another one
    wf = site.workflow({"a": []}, label="hosted")
    host = Flask("host")

    @host.get("/")
    def home() -> str:
        return "the host's own page"

    dashboard = Dashboard(site.dashboard.celery_app, site.dashboard.config, listen=False)
    host.register_blueprint(dashboard.blueprint, url_prefix="/ops/baton")
    client = host.test_client()
    assert client.get("/").get_data(as_text=True) == "the host's own page"
    html = client.get("/ops/baton/").get_data(as_text=True)
    live = snapshot(html)["live"]
    assert live["stream"].startswith("/ops/baton/api/stream?")
    assert live["workflow_url"] == "/ops/baton/workflows/WORKFLOW_ID"
    assert 'href="/ops/baton/static/dashboard.css"' in html
    assert client.get(f"/ops/baton/api/workflows/{wf}").get_json()["workflow"]["label"] == "hosted"
    dashboard.close()


def test_mounted_under_a_prefix_of_any_wsgi_app(make_site: Callable[..., Site]) -> None:
    site = make_site()
    wf = site.workflow({"a": []})

    def other(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"not the dashboard"]

    app = mount(
        other, "/baton", site.dashboard.celery_app, config=site.dashboard.config, listen=False
    )
    client = Client(app)
    assert client.get("/elsewhere").get_data() == b"not the dashboard"
    page = client.get(f"/baton/workflows/{wf}")
    assert page.status_code == 200
    assert snapshot(page.get_data(as_text=True))["live"]["stream"] == (
        f"/baton/api/workflows/{wf}/stream"
    )
    app.mounts["/baton"].extensions["baton_dashboard"].close()
    with pytest.raises(ValueError, match="prefix must start with /"):
        mount(other, "baton", site.dashboard.celery_app)
