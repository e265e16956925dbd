"""The pytest plugin, used as a user would: a sample test file of theirs, run by pytest
in a subprocess (the plugin found through its pytest11 entry point)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

USERS_TESTS = """
import pytest

import baton_celery
from baton_celery import Workflow


def test_etl_fails_where_it_should(celery_app, baton_run):
    @celery_app.task
    def extract():
        return [1, 2, 3]

    @celery_app.task
    def load():
        raise ValueError("disk full")

    @celery_app.task
    def report():
        return "never"

    run = baton_run(
        Workflow(label="etl")
        .add("extract", extract.s())
        .add("load", load.s(), deps=["extract"])
        .add("report", report.s(), deps=["load"])
    )
    assert run.outcome == "failed"
    assert run.failed_steps == ("load", "report")
    assert run.states("extract") == ["executing", "completed"]
    assert run.states("load") == ["executing", "discarded"]
    assert run.states("report") == ["cancelled"]
    assert run.results() == {"extract": [1, 2, 3]}


def test_dependency_results_and_live_events(celery_app, baton_run, baton_events):
    @celery_app.task
    def numbers():
        return [1, 2]

    @celery_app.task
    def total():
        return sum(baton_celery.dependency_results()["numbers"])

    run = baton_run(
        Workflow(label="sum").add("numbers", numbers.s()).add("total", total.s(), deps=["numbers"])
    )
    assert run.outcome == "completed"
    assert run.results()["total"] == 3
    assert [e.state for e in baton_events.steps] == [
        "executing", "completed", "executing", "completed"
    ]
    assert baton_events.finished[0].workflow_id == run.handle.id


@pytest.fixture
def baton_store(tmp_path):
    return f"sqlite:///{tmp_path}/store.sqlite3"


def test_another_store(baton_app, baton_run):
    @baton_app.task
    def one():
        return 1

    assert baton_app.conf.baton_store.startswith("sqlite:///")
    assert baton_run(Workflow().add("one", one.s())).outcome == "completed"


def test_inert_unless_asked_for():
    from celery import signals
    from baton_celery.runtime import installed_apps

    assert installed_apps() == []
    assert not any("baton" in repr(r) for r in signals.task_prerun.receivers)
"""


def run_pytest(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    test_file = tmp_path / "test_users_workflows.py"
    test_file.write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(test_file), "-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_users_tests_use_the_fixtures(tmp_path: Path) -> None:
    done = run_pytest(
        tmp_path, USERS_TESTS, "-v", "-W", "error::pytest.PytestUnraisableExceptionWarning"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout


def test_without_celerys_fixtures_it_says_what_to_do(tmp_path: Path) -> None:
    source = """
        from baton_celery import Workflow

        def test_needs_celery(baton_run):
            pass
    """
    done = run_pytest(tmp_path, source, "-p", "no:celery")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "install pytest-celery, or run pytest with -p celery.contrib.pytest" in done.stdout
