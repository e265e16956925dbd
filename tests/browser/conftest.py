"""Fixtures of the browser tests: a real headless Chromium (Debian's package, driven by
Playwright), real prefork workers from the integration harness (tests/integration), and
the dashboard as a real server: ``celery -A worker_app baton dashboard`` in a subprocess,
or :func:`baton_celery.dashboard.make_server` in a thread when a test needs settings of
its own (authentication).

Screenshots go to ``.artifacts/browser/`` at the top of the repository (ignored by git),
one per page a test looks at, overwritten by each run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from celery import Celery
from playwright.sync_api import Browser, Page, expect, sync_playwright

import baton_celery
from baton_celery.dashboard import DashboardConfig, Server, make_server
from baton_celery.events import Event
from baton_celery.stores import Store
from baton_celery.stores.records import StepRecord, WorkflowRecord

ROOT = Path(__file__).resolve().parents[2]
INTEGRATION = ROOT / "tests" / "integration"
sys.path.insert(0, str(INTEGRATION))

from harness import HERE as WORKER_DIR  # noqa: E402
from harness import Cluster  # noqa: E402


def _integration_fixtures() -> Any:
    """The integration suite's conftest, loaded under a name of its own: its ``session``
    fixture (the sink, unique names, cleanup) and its ``running`` clusters are reused."""
    spec = importlib.util.spec_from_file_location("baton_it_conftest", INTEGRATION / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_it = _integration_fixtures()
session = _it.session  # a fixture: the harness's Session
running = _it.running

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
ARTIFACTS = ROOT / ".artifacts" / "browser"
#: How long a page may take to show what the workers did (a loaded 2-core machine).
EXPECT_TIMEOUT = 30_000
SERVE_TIMEOUT = 60.0

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} is missing: run scripts/ensure-chromium (apt-get install chromium)",
            pytrace=False,
        )
    expect.set_options(timeout=EXPECT_TIMEOUT)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class Watched:
    """A page whose script errors fail the test (checked by :meth:`check`). A response's
    error status is not one: tests open 401 and 404 pages on purpose."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def check(self) -> None:
        assert not self.errors, f"errors in the page: {self.errors}"


@pytest.fixture
def pages(browser: Browser) -> Iterator[Any]:
    """``pages(**context_options)``: a new page (1400 × 900) in a context of its own;
    each is checked for script errors and closed at the end of the test."""
    opened: list[tuple[Any, Watched]] = []

    def new(**options: Any) -> Page:
        context = browser.new_context(viewport={"width": 1400, "height": 900}, **options)
        watched = Watched(context.new_page())
        opened.append((context, watched))
        return watched.page

    yield new
    for context, _ in opened:
        context.close()
    for _, watched in opened:
        watched.check()


def store_kind(cluster: Cluster) -> str:
    """ "sqlite" or "redis": which store a cluster runs on (for screenshot names)."""
    return cluster.settings.store.split(":", 1)[0]


def artifact(name: str) -> Path:
    """Where the screenshot ``name`` goes: ``.artifacts/browser/<name>.png``."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / f"{name}.png"


def screenshot(page: Page, name: str) -> Path:
    """Save the whole page (see :func:`artifact`)."""
    path = artifact(name)
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def cluster(session: Any, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """One prefork worker (-c 2) on a Redis broker with the bridge on, per store (SQLite,
    then the Redis store), shared by a module's tests (each works in workflows and sink
    keys of its own)."""
    with running(session, "browser", "redis", store=request.param, bridge=True) as started:
        yield started


@contextlib.contextmanager
def dashboard_process(cluster: Cluster, *args: str) -> Iterator[str]:
    """``celery -A worker_app baton dashboard --port 0 ARGS`` of the cluster's app, as a
    real process; yields the address it serves, and stops it (SIGTERM) afterwards."""
    cmd = [sys.executable, "-m", "celery", "-A", "worker_app", "baton", "dashboard"]
    process = subprocess.Popen(
        [*cmd, "--port", "0", *args], cwd=WORKER_DIR, env=cluster.env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            seen.append(line)
            lines.put(line)
        lines.put("")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        while True:
            try:
                line = lines.get(timeout=SERVE_TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"the dashboard did not start: {''.join(seen)}") from None
            if not line:
                raise AssertionError(f"the dashboard exited: {''.join(seen)}")
            if line.startswith("baton dashboard: serving "):
                yield line.split()[3]
                break
    finally:
        process.terminate()
        try:
            code = process.wait(timeout=SERVE_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"the dashboard ignored SIGTERM: {''.join(seen)}") from None
        reader.join(SERVE_TIMEOUT)
        assert process.stderr is not None
        process.stderr.close()
        assert code == 0, f"the dashboard exited with {code}: {''.join(seen)}"


@pytest.fixture(scope="module")
def dashboard(cluster: Cluster) -> Iterator[str]:
    """The address of the cluster's dashboard, served by the CLI in its own process."""
    with dashboard_process(cluster) as url:
        yield url


@dataclass
class Local:
    """A dashboard served by waitress in a thread of the test, over the memory store: for
    tests that need settings of their own or a big workflow made in a blink."""

    url: str
    server: Server
    store: Store

    def workflow(self, steps: dict[str, list[str]], label: str | None = "local") -> str:
        """Store a workflow of ``{step: [deps]}`` (in this order); its id."""
        workflow_id = str(uuid.uuid4())
        self.store.create(
            WorkflowRecord(
                id=workflow_id,
                label=label,
                steps={
                    name: StepRecord(name, f"tests.{name}", str(uuid.uuid4()), {}, tuple(deps))
                    for name, deps in steps.items()
                },
            )
        )
        return workflow_id

    def publish(self, events: list[Event]) -> None:
        """Hand events to the dashboard, as its broker listener would."""
        for event in events:
            self.server.dashboard.hub.publish(event)


@pytest.fixture
def local_dashboard() -> Iterator[Callable[..., Local]]:
    """``local_dashboard(**settings)``: a started :class:`Local` with these
    ``baton_dashboard_*`` settings; stopped at the end of the test."""
    started: list[tuple[Celery, Server, threading.Thread]] = []

    def start(**settings: Any) -> Local:
        app = Celery(f"browser-local-{uuid.uuid4().hex[:8]}", set_as_current=False)
        app.conf.update(broker_url="memory://", baton_store="memory://")
        runtime = baton_celery.install(app)
        server = make_server(app, DashboardConfig(port=0, **settings), listen=False)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((app, server, thread))
        return Local(server.url, server, runtime.store)

    yield start
    for app, server, thread in started:
        server.stop()
        thread.join(SERVE_TIMEOUT)
        baton_celery.uninstall(app)
        app.close()
