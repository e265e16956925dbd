"""``celery baton``'s formatting and the status command (click's runner, memory store)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import click
import pytest
from celery import Celery
from celery.bin.base import CLIContext
from click.testing import CliRunner

import baton_celery
from baton_celery import backstop, cli
from baton_celery.cli import Board, baton, format_event
from baton_celery.events import StepUpdated, WorkflowFinished, utcnow
from baton_celery.stores.records import StepRecord, WorkflowRecord


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("cli-unit", broker="memory://", set_as_current=False)
    app.conf.baton_store = "memory://"
    baton_celery.install(app)
    yield app
    baton_celery.uninstall(app)


def test_format_event_lines() -> None:
    step = StepUpdated("w1", "etl", "load", "t", "retryable", "j", 2, False, "boom", utcnow())
    assert format_event(step).split()[1:] == [
        "w1", "etl", "load", "retryable", "attempt=2", "error='boom'",
    ]  # fmt: skip
    done = WorkflowFinished("w1", None, "failed", ("load",), utcnow())
    assert format_event(done).split()[1:] == ["w1", "-", "FINISHED", "failed", "failed=load"]


def test_board_renders_workflows_and_steps() -> None:
    board = Board()
    board.apply(StepUpdated("w1", "etl", "a", "t", "executing", "j", 1, False, None, utcnow()))
    board.apply(StepUpdated("w1", "etl", "a", "t", "completed", "j", 1, True, None, utcnow()))
    board.apply(WorkflowFinished("w1", "etl", "completed", (), utcnow()))
    text = board.render()
    assert "w1  etl  [completed]" in text
    assert any(line.split()[:2] == ["a", "completed"] for line in text.splitlines())


def test_status_prints_steps_and_outcome(app: Celery) -> None:
    store = baton_celery.install(app).store
    steps = {
        "a": StepRecord("a", "t", "ja", {}, state="completed", attempt=1),
        "b": StepRecord("b", "t", "jb", {}, deps=("a",)),
    }
    store.create(WorkflowRecord("wf-1", "etl", steps))
    result = CliRunner().invoke(baton, ["status", "wf-1"], obj=CLIContext(app, True, None))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "outcome: running" in lines
    assert [line.split()[:3] for line in lines[-2:]] == [
        ["a", "completed", "1"],
        ["b", "pending", "0"],
    ]


def test_status_events_prints_the_history(app: Celery) -> None:
    store = baton_celery.install(app).store
    steps = {"a": StepRecord("a", "t", "ja", {}, dispatch=1), "b": StepRecord("b", "t", "jb", {})}
    store.create(WorkflowRecord("wf-h", "etl", steps))
    store.begin("wf-h", "a", 1)
    store.settle("wf-h", "a", "discarded", error="ValueError: no")
    store.settle("wf-h", "b", "completed")
    args = ["status", "wf-h", "--events"]
    result = CliRunner().invoke(baton, args, obj=CLIContext(app, True, None))
    assert result.exit_code == 0, result.output
    history = result.output.split("history (4 events):\n")[1].splitlines()
    assert [line.split()[0] for line in history] == ["1", "2", "3", "4"]
    assert [line.split()[4:6] for line in history[:3]] == [
        ["a", "executing"], ["a", "discarded"], ["b", "completed"],
    ]  # fmt: skip
    assert "error='ValueError: no'" in history[1]
    assert history[3].split()[4:6] == ["FINISHED", "failed"]


@pytest.mark.parametrize(
    ("text", "back"),
    [("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1.5m", 90)],
)
def test_since_takes_a_duration(text: str, back: float) -> None:
    now = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)
    assert cli.parse_since(text, now) == now - timedelta(seconds=back)


def test_since_takes_an_iso_time_with_an_offset() -> None:
    now = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)
    assert cli.parse_since("2026-12-03T10:00:00Z", now) == now - timedelta(hours=2)
    assert cli.parse_since("2026-12-03T11:00:00+01:00", now) == now - timedelta(hours=2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2026-12-03T10:00:00", "no UTC offset"),
        ("2026-12-04T10:00:00Z", "in the future"),
        ("ten minutes", "give a duration"),
        ("10x", "give a duration"),
    ],
)
def test_since_refuses_what_it_cannot_place(text: str, message: str) -> None:
    now = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)
    with pytest.raises(click.BadParameter, match=message):
        cli.parse_since(text, now)


def test_watch_since_is_checked_before_anything_starts(app: Celery) -> None:
    args = ["watch", "--since", "yesterday"]
    result = CliRunner().invoke(baton, args, obj=CLIContext(app, True, None))
    assert result.exit_code == 2 and "give a duration" in result.output


def test_status_of_an_unknown_workflow_exits_2(app: Celery) -> None:
    result = CliRunner().invoke(baton, ["status", "nope"], obj=CLIContext(app, True, None))
    assert result.exit_code == 2
    assert "no workflow nope" in result.output


def test_backstop_command_discards_a_stuck_step_and_finishes_the_workflow(app: Celery) -> None:
    store = baton_celery.install(app).store
    steps = {"a": StepRecord("a", "t", "ja", {}, state="executing", attempt=1, dispatch=1)}
    store.create(WorkflowRecord("wf-stuck", "etl", steps))
    with baton_celery.collect_events("wf-stuck") as events:
        result = CliRunner().invoke(
            baton, ["backstop", "--stuck-after", "0"], obj=CLIContext(app, True, None)
        )
    assert result.exit_code == 0, result.output
    assert "1 stuck step(s) discarded" in result.output
    assert events.states("a") == ["discarded"]
    [finished] = events.finished
    assert (finished.outcome, finished.failed_steps) == ("failed", ("a",))


def test_backstop_every_keeps_sweeping_until_interrupted(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweeps: list[float | None] = []

    def sweep(app: Celery, stuck_after: float | None = None) -> backstop.SweepReport:
        sweeps.append(stuck_after)
        if len(sweeps) == 3:
            raise KeyboardInterrupt  # Ctrl-C while sweeping
        return backstop.sweep(app, stuck_after)

    monkeypatch.setattr(cli, "sweep", sweep)
    result = CliRunner().invoke(
        baton,
        ["backstop", "--every", "0.01", "--stuck-after", "5"],
        obj=CLIContext(app, True, None),
    )
    assert result.exit_code == 130, result.output
    assert sweeps == [5.0, 5.0, 5.0]
    assert result.output.count("backstop: 0 live workflow(s) examined") == 2


def test_watch_one_workflow_times_out_with_exit_2(app: Celery) -> None:
    store = baton_celery.install(app).store
    store.create(WorkflowRecord("wf-open", "etl", {"a": StepRecord("a", "t", "ja", {})}))
    result = CliRunner().invoke(
        baton,
        ["watch", "--workflow", "wf-open", "--lines", "--timeout", "0.5"],
        obj=CLIContext(app, True, None),
    )
    assert result.exit_code == 2, result.output
    assert "has not finished" in result.output


def test_watch_one_workflow_ends_on_a_finish_it_only_sees_in_the_store(app: Celery) -> None:
    """The finish's event never reaches the watcher (the bridge is off here, as when it
    was lost in a broker restart): the store, read every second, still ends the watch."""
    store = baton_celery.install(app).store
    store.create(WorkflowRecord("wf-quiet", "etl", {"a": StepRecord("a", "t", "ja", {})}))
    settle = threading.Timer(0.3, lambda: store.settle("wf-quiet", "a", "discarded", error="x"))
    settle.start()
    try:
        result = CliRunner().invoke(
            baton,
            ["watch", "--workflow", "wf-quiet", "--lines", "--timeout", "20"],
            obj=CLIContext(app, True, None),
        )
    finally:
        settle.join()
    assert result.exit_code == 1, result.output  # it failed: exit 1
    assert "workflow wf-quiet finished: failed" in result.output
