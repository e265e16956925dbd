"""The pure functions behind the pages: a summary advanced by events, a step folded from
its history (the browser's workflow.js applies events the same way), query parsing."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from baton_celery.dashboard.views import BadQuery, IndexQuery, advance, apply_event
from baton_celery.events import StepUpdated, WorkflowFinished
from baton_celery.stores.records import WorkflowSummary

SUMMARY = WorkflowSummary(
    id="w", label="l", state="running", created_at=100.0, finished_at=None, total=2,
    settled=0, failed_steps=(), seq=1,
)  # fmt: skip


def at(second: float) -> datetime:
    return datetime.fromtimestamp(second, timezone.utc)


def step(
    state: str, seq: int, second: float, attempt: int = 1, error: str | None = None
) -> StepUpdated:
    return StepUpdated(
        workflow_id="w", workflow_label="l", step_name="a", worker="t", state=state,
        job_id="j", attempt=attempt, has_result=False, error=error, timestamp=at(second),
        seq=seq,
    )  # fmt: skip


def test_advance_counts_settled_steps_once_and_spots_gaps() -> None:
    assert advance(SUMMARY, step("executing", 1, 101)) is SUMMARY  # counted already
    done = advance(SUMMARY, step("completed", 2, 102))
    assert done is not None and (done.settled, done.seq) == (1, 2)
    assert advance(done, step("executing", 4, 103)) is None  # 3 is missing
    retried = advance(done, step("retryable", 3, 103))
    assert retried is not None and retried.settled == 1
    finish = WorkflowFinished("w", "l", "failed", ("b",), at(110), seq=4)
    final = advance(retried, finish)
    assert final is not None
    assert (final.state, final.finished_at, final.failed_steps) == ("failed", 110.0, ("b",))


def fresh() -> dict[str, Any]:
    return {"state": "pending", "attempt": 0, "error": None, "has_result": False,
            "started_at": None, "settled_at": None, "runs": []}  # fmt: skip


def test_a_step_folded_from_its_events() -> None:
    view = fresh()
    for event in [
        step("snoozed", 1, 100, attempt=0),
        step("executing", 2, 101),
        step("retryable", 3, 102, error="E: once"),
        step("executing", 4, 103, attempt=2),
        step("executing", 5, 104, attempt=3),  # redelivered: its worker was lost
        step("completed", 6, 106, attempt=3),
    ]:
        apply_event(view, event)
    assert (view["state"], view["attempt"], view["error"]) == ("completed", 3, None)
    assert (view["started_at"], view["settled_at"]) == (101.0, 106.0)
    assert view["runs"] == [
        [101.0, 102.0, "retryable"],
        [103.0, 104.0, "lost"],
        [104.0, 106.0, "completed"],
    ]


def test_index_query_params_keep_only_what_is_set() -> None:
    query = IndexQuery.from_args({"label": "etl", "state": "", "before": "12.5"}, 50)
    assert (query.limit, query.label, query.state, query.before) == (50, "etl", None, 12.5)
    assert query.params(before=None) == {"label": "etl"}
    with pytest.raises(BadQuery, match="limit: out of range"):
        IndexQuery.from_args({"limit": "-1"}, 50)
