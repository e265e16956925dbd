"""The live streams: a detail page's stream sends the history after its snapshot, then
live events, each number once and none missing (duplicates dropped, gaps filled from the
store); an index page's stream replays what changed since its snapshot, then follows."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Callable

from baton_celery.dashboard.hub import Hub
from baton_celery.dashboard.streams import index_stream, workflow_stream

from .conftest import Site

#: A heartbeat long enough that a test waiting on one would time out visibly: the live
#: path must deliver without the store poll a heartbeat brings.
NO_POLL = 20.0


def messages(chunks: Iterator[Any], count: int) -> list[dict[str, Any]]:
    """The next ``count`` messages with data or an id (comments and ``retry`` skipped),
    from a stream's chunks (text, or the bytes of a response)."""
    out: list[dict[str, Any]] = []
    while len(out) < count:
        message: dict[str, Any] = {}
        chunk = next(chunks)
        text = chunk.decode() if isinstance(chunk, bytes) else chunk
        for line in text.splitlines():
            field, _, value = line.partition(": ")
            if field in ("id", "event"):
                message[field] = value
            elif field == "data":
                message["data"] = json.loads(value)
        if message:
            out.append(message)
    return out


def ids(found: list[dict[str, Any]]) -> list[str]:
    return [m.get("id", "") for m in found]


def test_history_then_live_each_number_once(site: Site) -> None:
    hub = site.dashboard.hub
    wf = site.workflow({"a": [], "b": ["a"]})
    site.run(wf, "a")  # events 1, 2: the page's snapshot has 1
    page = hub.subscribe(wf)
    stream = workflow_stream(site.store, page, wf, 1, site.store.history(wf, 1), NO_POLL)
    first = messages(stream, 1)
    assert ids(first) == ["2"] and first[0]["event"] == "step"
    assert (first[0]["data"]["step_name"], first[0]["data"]["state"]) == ("a", "completed")
    (started,) = site.begin(wf, "b")  # 3
    old = site.store.history(wf, 1)[0]
    for event in (started, started, old):  # a repeat, and one the page has
        hub.publish(event)
    assert ids(messages(stream, 1)) == ["3"]
    _completed, finished = site.settle(wf, "b")  # 4, 5
    hub.publish(finished)  # 4 never arrives live: it is read from the store
    tail = messages(stream, 3)
    assert ids(tail) == ["4", "5", ""]
    assert [m["event"] for m in tail] == ["step", "finish", "end"]
    assert tail[0]["data"]["state"] == "completed"
    assert list(stream) == []  # ended after the finish
    page.close()
    assert hub.open_streams == 0


def test_a_quiet_stream_reads_the_store_every_heartbeat(site: Site) -> None:
    wf = site.workflow({"a": []})
    page = site.dashboard.hub.subscribe(wf)
    stream = workflow_stream(site.store, page, wf, 0, [], heartbeat=0.05)
    next(stream)  # retry
    site.run(wf, "a")  # nothing published: the dashboard hears of it from the store
    assert ids(messages(stream, 4)) == ["1", "2", "3", ""]
    page.close()


def test_closing_the_hub_ends_the_streams(site: Site) -> None:
    wf = site.workflow({"a": []})
    hub = site.dashboard.hub
    page = hub.subscribe(wf)
    stream = workflow_stream(site.store, page, wf, 0, [], NO_POLL)
    next(stream)
    hub.close()
    assert list(stream) == []
    assert hub.subscribe(wf).get(0).kind == "closed"  # type: ignore[union-attr]


def test_a_page_that_falls_behind_is_cut_off_and_resumes(make_site: Callable[..., Site]) -> None:
    site = make_site(stream_queue=10)
    wf = site.workflow({f"s{i}": [] for i in range(8)})
    response = site.client.get(f"/api/workflows/{wf}/stream")
    chunks = iter(response.response)
    assert next(chunks).startswith(b"retry:")
    for i in range(8):
        for event in site.run(wf, f"s{i}"):
            site.dashboard.hub.publish(event)  # 17 events for 10 places: it overflows
    rest = b"".join(chunks).decode()  # ends: its browser would reconnect
    response.close()
    assert "workflow_finished" not in rest
    seen = [int(line[4:]) for line in rest.splitlines() if line.startswith("id: ")]
    resumed = site.client.get(
        f"/api/workflows/{wf}/stream", headers={"Last-Event-ID": str(max(seen, default=0))}
    )
    body = resumed.get_data(as_text=True)
    more = [int(line[4:]) for line in body.splitlines() if line.startswith("id: ")]
    assert seen + more == list(range(1, 18))
    assert body.endswith("event: end\ndata: {}\n\n")


def test_last_event_id_wins_over_the_query(site: Site) -> None:
    wf = site.workflow({"a": []})
    site.run(wf, "a")
    body = site.client.get(
        f"/api/workflows/{wf}/stream?after=0", headers={"Last-Event-ID": "2"}
    ).get_data(as_text=True)
    assert [line for line in body.splitlines() if line.startswith("id:")] == ["id: 3"]
    bad = site.client.get(f"/api/workflows/{wf}/stream", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 400


def test_too_many_streams_is_a_503(make_site: Callable[..., Site]) -> None:
    site = make_site(max_streams=2, threads=8)
    wf = site.workflow({"a": []})
    open_ = [site.client.get(f"/api/workflows/{wf}/stream"), site.client.get("/api/stream")]
    refused = site.client.get("/api/stream")
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "10"
    assert "too many open live pages (2)" in refused.get_json()["error"]
    for response in open_:
        response.close()
    assert site.dashboard.hub.open_streams == 0
    again = site.client.get("/api/stream")
    assert again.status_code == 200
    again.close()


# --- the index ----------------------------------------------------------------------


def test_index_replays_what_changed_since_its_snapshot(site: Site) -> None:
    before = time.time() - 1
    finished_early = site.workflow({"a": []}, label="etl")
    site.run(finished_early, "a")
    since = time.time()
    running = site.workflow({"a": [], "b": []}, label="etl")
    other = site.workflow({"a": []}, label="other")
    response = site.client.get(f"/api/stream?label=etl&since={since}")
    found = messages(iter(response.response), 2)
    response.close()
    assert found[0] == {"id": repr(since)}  # where a reconnect starts
    assert [m["data"]["id"] for m in found[1:]] == [running]
    response = site.client.get("/api/stream", headers={"Last-Event-ID": repr(before)})
    replayed = {m["data"]["id"] for m in messages(iter(response.response), 4)[1:]}
    response.close()
    assert replayed == {finished_early, running, other}


def test_index_follows_live_summaries(site: Site) -> None:
    hub: Hub = site.dashboard.hub
    page = hub.subscribe(None)
    stream = index_stream(page, [], label="etl", since=time.time(), heartbeat=NO_POLL)
    messages(stream, 1)  # its starting id
    wf = site.workflow({"a": [], "b": []}, label="etl")
    ignored = site.workflow({"a": []}, label="other")
    for event in site.begin(ignored, "a") + site.begin(wf, "a"):
        hub.publish(event)
    (first,) = messages(stream, 1)
    assert (first["data"]["id"], first["data"]["seq"], first["data"]["settled"]) == (wf, 1, 0)
    events = site.settle(wf, "a") + site.run(wf, "b")  # 2, 3, 4, finish 5
    hub.publish(events[0])
    hub.publish(events[2])  # 3 is missing: the summary is read from the store again
    hub.publish(events[3])  # the finish: counted in what the store gave
    hub.publish(events[1])  # an old one
    (wf2,) = site.begin(site.workflow({"x": []}, label="etl"), "x")
    hub.publish(wf2)
    summaries = [m["data"] for m in messages(stream, 3)]
    assert [(s["seq"], s["settled"], s["state"]) for s in summaries] == [
        (2, 1, "running"),
        (5, 2, "completed"),  # the store had the finish already
        (1, 0, "running"),  # the next workflow: nothing came in between
    ]
    assert summaries[2]["id"] == wf2.workflow_id
    page.close()


def test_index_heartbeat_moves_the_reconnect_point(site: Site) -> None:
    page = site.dashboard.hub.subscribe(None)
    stream = index_stream(page, [], label=None, since=1.0, heartbeat=0.05)
    first, beat = messages(stream, 2)
    assert first == {"id": "1.0"}
    assert time.time() - 60 < float(beat["id"]) < time.time()
    page.close()
