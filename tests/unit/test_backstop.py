"""The backstop sweep on every store: stuck steps are discarded with a reason, their
dependents cascade, the workflow finishes once; steps that progress are left alone."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from celery.bin.base import CLIContext
from click.testing import CliRunner
from redis_servers import shared_redis_url

import baton_celery
from baton_celery import backstop
from baton_celery.cli import baton
from baton_celery.stores.records import StepRecord, WorkflowRecord

STORES = ["memory", "sqlite", "redis"]


@pytest.fixture(params=STORES)
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Celery]:
    urls = {
        "memory": "memory://",
        "sqlite": f"sqlite:///{tmp_path}/backstop.sqlite3",
        "redis": shared_redis_url(),
    }
    made = Celery(f"backstop-{uuid.uuid4().hex[:8]}", set_as_current=False)
    made.conf.update(baton_store=urls[request.param], broker_url="memory://")
    baton_celery.install(made)
    yield made
    baton_celery.uninstall(made)


def chain_record(*, created_ago: float = 0.0) -> WorkflowRecord:
    """a -> b -> c, and an independent root d."""
    wid = f"wf-{uuid.uuid4()}"

    def step(name: str, deps: tuple[str, ...] = ()) -> StepRecord:
        return StepRecord(name, f"t.{name}", f"{wid}/{name}", {"task": f"t.{name}"}, deps=deps,
                          dispatch=0 if deps else 1)  # fmt: skip

    steps = {"a": step("a"), "b": step("b", ("a",)), "c": step("c", ("b",)), "d": step("d")}
    return WorkflowRecord(wid, "stuck", steps, created_at=time.time() - created_ago)


def test_stuck_steps_are_discarded_and_the_workflow_finishes_once(app: Celery) -> None:
    store = baton_celery.runtime.runtime_for(app).store  # type: ignore[union-attr]
    record = chain_record()
    store.create(record)
    store.begin(record.id, "a", 1)  # a's worker then dies: executing forever
    # d was published but its message never arrived anywhere.
    later = time.time() + 120
    with baton_celery.collect_events(record.id) as events:
        assert backstop.sweep(app, stuck_after=600, now=later).settled == []  # not yet
        report = backstop.sweep(app, stuck_after=60, now=later)
        again = backstop.sweep(app, stuck_after=60, now=later)
    assert sorted((s, r.split(":")[0]) for _, s, r in report.settled) == [
        ("a", "worker lost or hung"),
        ("d", "never started"),
    ]
    assert report.finished == [record.id]
    assert again.settled == [] and again.finished == []
    loaded = store.load(record.id)
    assert loaded.outcome == "failed"
    assert {n: s.state for n, s in loaded.steps.items()} == {
        "a": "discarded", "b": "cancelled", "c": "cancelled", "d": "discarded",
    }  # fmt: skip
    assert "(backstop)" in (loaded.steps["a"].error or "")
    assert loaded.steps["c"].error == "dependency 'b' was cancelled (failure began at 'a')"
    assert len(events.finished) == 1 and events.finished[0].failed_steps == ("a", "b", "c", "d")
    assert events.states("a") == ["discarded"]
    assert events.states("c") == ["cancelled"]
    assert store.live_workflows() == []


def test_progress_and_young_workflows_are_left_alone(app: Celery) -> None:
    store = baton_celery.runtime.runtime_for(app).store  # type: ignore[union-attr]
    record = chain_record()
    store.create(record)
    store.begin(record.id, "a", 1)
    store.settle(record.id, "d", "completed")
    report = backstop.sweep(app, stuck_after=60)  # now: nothing is a minute old
    assert report.settled == []
    assert store.load(record.id).steps["a"].state == "executing"


def test_a_successful_workflow_whose_last_step_hung_is_finished(app: Celery) -> None:
    store = baton_celery.runtime.runtime_for(app).store  # type: ignore[union-attr]
    wid = f"wf-{uuid.uuid4()}"
    record = WorkflowRecord(
        wid, None, {"only": StepRecord("only", "t", f"{wid}/only", {}, dispatch=1)}
    )
    store.create(record)
    store.begin(wid, "only", 1)
    report = backstop.sweep(app, stuck_after=1, now=time.time() + 5)
    assert report.finished == [wid]
    assert store.load(wid).outcome == "failed"


def test_the_beat_task_and_the_command_line(app: Celery) -> None:
    task = backstop.register_task(app)
    assert app.tasks[backstop.TASK_NAME].name == task.name == "baton_celery.backstop"
    assert "0 stuck step(s)" in task(stuck_after=60)

    store = baton_celery.runtime.runtime_for(app).store  # type: ignore[union-attr]
    record = chain_record(created_ago=30)
    store.create(record)
    result = CliRunner().invoke(
        baton, ["backstop", "--stuck-after", "10"], obj=CLIContext(app, True, None)
    )
    assert result.exit_code == 0, result.output
    assert "2 stuck step(s) discarded, 1 workflow(s) finished" in result.output
    assert store.load(record.id).outcome == "failed"


def test_one_command_line_the_celery_subcommand() -> None:
    """``python -m baton_celery.backstop`` is gone: ``celery baton backstop`` is the one."""
    assert not hasattr(backstop, "main") and "main" not in backstop.__all__
