"""The dashboard on its real server (waitress, in a thread of the test): streams are
written event by event, the read-only rule holds on the wire, and stopping the server
ends its open streams. Also: ``celery baton dashboard`` is a subcommand."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner

from baton_celery.cli import baton
from baton_celery.dashboard import DashboardConfig, Server, make_server

from .conftest import add_workflow

TIMEOUT = 10.0


@pytest.fixture
def server(celery_app: Celery) -> Iterator[Server]:
    config = DashboardConfig(port=0, heartbeat=30.0)  # no poll: only live writes show up
    served = make_server(celery_app, config)
    served.dashboard.hub.start(listen_to_broker=False)
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        served.stop()
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def connect(server: Server) -> http.client.HTTPConnection:
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)


def next_message(response: http.client.HTTPResponse) -> dict[str, Any]:
    """Read up to the next message with data; a socket timeout fails the test."""
    message: dict[str, Any] = {}
    while True:
        line = response.readline().decode()
        if not line:
            raise EOFError("the stream ended")
        if line == "\n" and "data" in message:
            return message
        field, _, value = line.rstrip("\n").partition(": ")
        if field == "data":
            message["data"] = json.loads(value)
        elif field in ("id", "event"):
            message[field] = value


def test_each_event_is_written_when_it_happens(server: Server) -> None:
    store = server.dashboard.store
    wf = add_workflow(store, {"a": [], "b": ["a"]})
    conn = connect(server)
    try:
        conn.request("GET", f"/api/workflows/{wf}/stream")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        assert response.getheader("Cache-Control") == "no-cache"
        # One event at a time: the next one exists only after this one was read.
        for step, state in [("a", "executing"), ("a", "completed"), ("b", "executing")]:
            if state == "executing":
                events = store.begin(wf, step, 1).events
            else:
                events = store.settle(wf, step, state).events
            for event in events:
                server.dashboard.hub.publish(event)
            message = next_message(response)
            assert (message["data"]["step_name"], message["data"]["state"]) == (step, state)
        server.stop()  # ends the open stream
        assert response.read() == b""
    finally:
        conn.close()


def test_read_only_on_the_wire(server: Server) -> None:
    conn = connect(server)
    try:
        for method in ["POST", "PUT", "DELETE", "OPTIONS"]:
            conn.request(method, "/")
            response = conn.getresponse()
            response.read()
            assert response.status == 405, method
            assert sorted(response.getheader("Allow", "").split(", ")) == ["GET", "HEAD"]
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 200 and b'id="baton-data"' in response.read()
        assert response.getheader("Server") == "baton_celery"
    finally:
        conn.close()


def test_the_cli_has_the_subcommand() -> None:
    result = CliRunner().invoke(baton, ["dashboard", "--help"])
    assert result.exit_code == 0, result.output
    assert "--host" in result.output and "--port" in result.output
    assert "dashboard" in CliRunner().invoke(baton, ["--help"]).output
