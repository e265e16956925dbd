"""A pytest plugin for running Celery's own test suite, with or without baton_celery.

Loaded with ``-p compat_plugin`` (this folder on ``PYTHONPATH``) in both passes of the
compatibility gate (``run.py``), with the same options but one:

- ``--compat-record=PATH`` writes each test's final outcome (passed, failed, error,
  skipped, xfailed, xpassed) and, for failures, the error's text to a JSON file, for
  ``run.py`` to compare the two passes. A failed subtest fails its test.
- ``--compat-baton`` installs baton_celery into every Celery app created in the run:
  ``Celery.__init__`` is wrapped so that each new app gets ``baton_store`` (by default
  ``memory://``: nothing is written to disk; ``--compat-baton-store=URL``) and
  ``baton_celery.install(app)``, as a user would right after creating the app. Before any
  test runs, a fresh app is checked to really have baton installed (its runtime, its task
  annotations, the wrapped ``before_start``), else the run stops: a gate that installed
  nothing would prove nothing.

Patching Celery here is test tooling, not the product: the product never does it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

RECORD_OPTION = "--compat-record"
BATON_OPTION = "--compat-baton"
STORE_OPTION = "--compat-baton-store"
#: Characters of a failure's text kept per test (the head and the tail of the traceback).
MAX_TEXT = 6000
#: Outcomes ranked: a test's result is the worst of its phases and subtests.
RANK = {"passed": 0, "xfailed": 0, "skipped": 0, "xpassed": 1, "failed": 2, "error": 3}
INSTALL_COUNT_KEY = "baton_compat_installs"

_installs = 0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("baton-compat", "baton_celery's compatibility gate")
    group.addoption(RECORD_OPTION, metavar="PATH", help="write each test's outcome to PATH")
    group.addoption(
        BATON_OPTION,
        action="store_true",
        help="install baton_celery into every Celery app created during the run",
    )
    group.addoption(
        STORE_OPTION,
        metavar="URL",
        default="memory://",
        help="the baton_store of those apps (default: memory://)",
    )


# --- baton in every app ----------------------------------------------------------------


def _install_everywhere(store: str) -> None:
    from celery.app import base

    import baton_celery

    original_init = base.Celery.__init__
    if getattr(original_init, "_baton_compat", False):
        return

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        global _installs
        original_init(self, *args, **kwargs)
        # Set on the pending configuration: Celery keeps it without loading the config.
        self.conf.baton_store = store
        baton_celery.install(self)
        _installs += 1

    __init__._baton_compat = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = original_init  # type: ignore[attr-defined]
    base.Celery.__init__ = __init__  # type: ignore[method-assign]


def _check_baton_active(store: str) -> None:
    """A fresh app must come out of Celery() with baton installed, and its tasks with
    baton's wrapped before_start; uninstalled again afterwards."""
    from celery import Celery

    import baton_celery
    from baton_celery.runtime import runtime_for
    from baton_celery.task_wrappers import ORIGINAL, TaskAnnotations

    global _installs
    before = _installs
    app = Celery("baton-compat-sanity", set_as_current=False)
    try:
        problems = []
        if _installs != before + 1:
            problems.append("Celery() did not go through the wrapped __init__")
        runtime = runtime_for(app)
        if runtime is None:
            problems.append("runtime_for(app) is None")
        elif runtime.config.store != store:
            problems.append(f"the store is {runtime.config.store!r}, not {store!r}")
        if not any(isinstance(a, TaskAnnotations) for a in app.annotations or ()):
            problems.append(f"app.annotations has no baton entry: {app.annotations!r}")

        @app.task(shared=False)
        def probe() -> None:
            pass

        app.finalize()
        if not hasattr(type(app.tasks[probe.name]).before_start, ORIGINAL):
            problems.append("a task's before_start is not baton's gate")
        if problems:
            raise pytest.UsageError("baton_celery is not active: " + "; ".join(problems))
    finally:
        baton_celery.uninstall(app)
        _installs = before


# --- outcomes ---------------------------------------------------------------------------


class Recorder:
    """Collects the final outcome of each test id from its reports (setup, call,
    teardown, subtests, reruns) and writes them out at the end of the session."""

    def __init__(self, config: pytest.Config, path: str) -> None:
        self.config = config
        self.path = Path(path)
        self.tests: dict[str, dict[str, Any]] = {}
        self.collect_errors: dict[str, dict[str, str]] = {}
        self.worker_installs = 0

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.outcome == "rerun":  # pytest-rerunfailures: the next attempt decides
            self.tests.pop(report.nodeid, None)
            return
        outcome = _outcome(report)
        if outcome is None:
            return
        entry = self.tests.setdefault(report.nodeid, {"outcome": None})
        current = entry["outcome"]
        if current is None or RANK[outcome] > RANK[current]:
            entry["outcome"] = outcome
            if outcome in ("failed", "error"):
                entry["where"] = report.when + (_subtest_label(report) or "")
                entry["message"] = _crash_message(report)
                entry["text"] = _cut(report.longreprtext)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        """A module that cannot be collected: its tests are missing from the record."""
        if report.failed:
            self.collect_errors[report.nodeid] = {
                "message": _crash_message(report),
                "text": _cut(report.longreprtext),
            }

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist: a worker's count of the apps baton was installed into."""
        output = getattr(node, "workeroutput", None) or {}
        self.worker_installs += int(output.get(INSTALL_COUNT_KEY, 0))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        import celery

        baton = bool(self.config.getoption(BATON_OPTION))
        meta = {
            "python": sys.version.split()[0],
            "celery": celery.__version__,
            "celery_file": celery.__file__,
            "baton": baton,
            "baton_installs": self.worker_installs + _installs if baton else 0,
        }
        record = {"meta": meta, "tests": self.tests, "collect_errors": self.collect_errors}
        self.path.write_text(json.dumps(record, indent=1))


def _outcome(report: pytest.TestReport) -> str | None:
    """This report's say on its test's outcome; None when it has none."""
    xfail = hasattr(report, "wasxfail")
    if type(report).__name__ == "SubTestReport":  # pytest-subtests: only a failure counts
        return "failed" if report.failed else None
    if report.when == "call":
        if report.passed:
            return "xpassed" if xfail else "passed"
        if report.skipped:
            return "xfailed" if xfail else "skipped"
        return "failed"
    if report.failed:
        return "error"
    if report.skipped:  # skipped (or xfail-ed) in setup: the test has no call phase
        return "xfailed" if xfail else "skipped"
    return None


def _subtest_label(report: Any) -> str | None:
    context = getattr(report, "context", None)
    if context is None:
        return None
    parts = [repr(context.msg)] if getattr(context, "msg", None) is not None else []
    parts += [f"{k}={v!r}" for k, v in (getattr(context, "kwargs", None) or {}).items()]
    return " [subtest " + ", ".join(parts) + "]"


def _crash_message(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The error in a line: pytest's crash message, with the first ``where`` of an assert."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None and crash.message:
        lines = [line.strip() for line in str(crash.message).splitlines() if line.strip()]
        where = [line for line in lines[1:] if line.startswith("+  where")][:1]
        return " ".join(lines[:1] + [w.removeprefix("+  ") for w in where])
    lines = [line for line in report.longreprtext.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _cut(text: str) -> str:
    if len(text) <= MAX_TEXT:
        return text
    half = MAX_TEXT // 2
    return text[:half] + "\n[... cut ...]\n" + text[-half:]


# --- hooks ------------------------------------------------------------------------------


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption(BATON_OPTION):
        store = config.getoption(STORE_OPTION)
        _install_everywhere(store)
        _check_baton_active(store)
    path = config.getoption(RECORD_OPTION)
    if path and not _is_xdist_worker(config):
        config.pluginmanager.register(Recorder(config, path), "baton-compat-recorder")


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _is_xdist_worker(session.config):
        session.config.workeroutput[INSTALL_COUNT_KEY] = _installs  # type: ignore[attr-defined]


def pytest_report_header(config: pytest.Config) -> str | None:
    if config.getoption(BATON_OPTION):
        store = config.getoption(STORE_OPTION)
        return f"baton_celery: installed into every Celery app (baton_store {store})"
    return None
