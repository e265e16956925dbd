"""The pure transitions of baton_celery.stores.records: begin, settle, mark_retrying,
cancel. Every store applies exactly these, so they are tested here without any store."""

from __future__ import annotations

import json
from typing import Any

import pytest

from baton_celery.events import StepUpdated
from baton_celery.stores import records
from baton_celery.stores.records import (
    PENDING,
    RUN,
    SKIP,
    SNOOZE,
    StepRecord,
    Transition,
    WorkflowRecord,
    begin,
    cancel,
    mark_retrying,
    settle,
)


def make_record(
    *steps: tuple[Any, ...],
    workflow_id: str = "wf",
    label: str | None = "label",
) -> WorkflowRecord:
    """steps: (name, deps) or (name, deps, {StepRecord overrides}); roots get dispatch 1,
    as Workflow.apply_async does."""
    made: dict[str, StepRecord] = {}
    for spec in steps:
        name, deps = spec[0], tuple(spec[1])
        extra: dict[str, Any] = spec[2] if len(spec) > 2 else {}
        made[name] = StepRecord(
            name=name,
            task=f"tasks.{name}",
            job_id=f"job-{name}",
            signature={"task": f"tasks.{name}", "args": [], "kwargs": {}, "options": {}},
            deps=deps,
            dispatch=0 if deps else 1,
            **extra,
        )
    return WorkflowRecord(workflow_id, label, made)


def own(out: Transition) -> StepUpdated:
    """The event of the step a transition is about: its first."""
    event = out.events[0]
    assert isinstance(event, StepUpdated)
    return event


def cascade(out: Transition) -> list[str]:
    """The steps a step's transition cancelled after its own event, in order."""
    return [e.step_name for e in out.events[1:] if isinstance(e, StepUpdated)]


def run(record: WorkflowRecord, name: str) -> None:
    """Begin a released step and complete it."""
    gate = begin(record, name, record.steps[name].dispatch)
    assert gate.decision == RUN, (name, gate.decision)
    settle(record, name, "completed", has_result=True, result=name.upper())


# --- begin --------------------------------------------------------------------------


def test_begin_runs_a_root_and_counts_the_first_attempt() -> None:
    record = make_record(("a", ()))
    gate = begin(record, "a", 1)
    assert gate.decision == RUN
    assert gate.applied and cascade(gate) == [] and gate.finish is None
    step = record.steps["a"]
    assert (step.state, step.attempt, step.dispatch) == ("executing", 1, 1)
    assert (own(gate).step_name, own(gate).state, own(gate).attempt) == ("a", "executing", 1)
    assert gate.dispatch == 1


def test_begin_counts_every_attempt_and_clears_the_last_error() -> None:
    record = make_record(("a", ()))
    begin(record, "a", 1)
    mark_retrying(record, "a", "ValueError: first")
    gate = begin(record, "a", 1)
    assert gate.decision == RUN
    assert record.steps["a"].attempt == 2
    assert record.steps["a"].error is None
    assert record.steps["a"].state == "executing"


def test_begin_snoozes_while_a_dependency_is_unfinished() -> None:
    record = make_record(("a", ()), ("b", ("a",)))
    assert begin(record, "b", 0).decision == SNOOZE
    begin(record, "a", 1)  # a is executing
    assert begin(record, "b", 0).decision == SNOOZE
    mark_retrying(record, "a", "boom")  # a is retrying
    assert begin(record, "b", 0).decision == SNOOZE
    b = record.steps["b"]
    assert (b.state, b.attempt) == (PENDING, 0)  # a snooze uses no attempt


def test_begin_runs_once_every_dependency_completed() -> None:
    record = make_record(("a", ()), ("x", ()), ("b", ("a", "x")))
    run(record, "a")
    assert begin(record, "b", 0).decision == SNOOZE
    run(record, "x")
    assert record.steps["b"].dispatch == 1
    assert begin(record, "b", 1).decision == RUN


def test_begin_skips_a_settled_step() -> None:
    """A duplicate delivery of a completed step does not run again."""
    record = make_record(("a", ()))
    run(record, "a")
    gate = begin(record, "a", 1)
    assert gate.decision == SKIP
    assert not gate.applied and gate.events == []
    assert record.steps["a"].attempt == 1
    assert record.steps["a"].state == "completed"


def test_begin_skips_a_stale_dispatch() -> None:
    """A snoozed copy overtaken by the release (an older publication) is skipped."""
    record = make_record(("a", ()), ("b", ("a",)))
    assert begin(record, "b", 0).decision == SNOOZE
    run(record, "a")  # releases b: dispatch 1
    assert record.steps["b"].dispatch == 1
    gate = begin(record, "b", 0)
    assert gate.decision == SKIP
    assert record.steps["b"].state == PENDING
    assert record.steps["b"].attempt == 0
    assert begin(record, "b", 1).decision == RUN


def test_begin_runs_a_redelivery_of_the_current_dispatch_again() -> None:
    """Worker lost with acks_late: the same message comes back while 'executing'."""
    record = make_record(("a", ()))
    begin(record, "a", 1)
    gate = begin(record, "a", 1)
    assert gate.decision == RUN
    assert record.steps["a"].attempt == 2


def test_begin_cancels_a_stray_message_whose_dependency_failed() -> None:
    record = make_record(("a", ()), ("b", ("a",)), ("c", ("b",)))
    begin(record, "a", 1)
    out = settle(record, "a", "discarded", error="E: a")
    assert cascade(out) == ["b", "c"]
    # A message for b arriving anyway is skipped: b is settled.
    assert begin(record, "b", 1).decision == SKIP


def test_begin_cancels_at_the_gate_when_a_dependency_blocks() -> None:
    """A step published while its dependency was not yet failed (e.g. an extra message),
    gated after the dependency ended discarded: cancelled, with the cascade and finish."""
    record = make_record(("a", ()), ("b", ("a",)), ("c", ("b",)))
    record.steps["b"].dispatch = 1  # published early (stray)
    begin(record, "a", 1)
    out = settle(record, "a", "discarded", error="E: a")
    assert cascade(out) == []  # b was already published: left to its gate
    gate = begin(record, "b", 1)
    assert gate.decision == SKIP
    assert gate.applied
    assert (own(gate).step_name, own(gate).state) == ("b", "cancelled")
    assert record.steps["b"].state == "cancelled"
    assert record.steps["b"].error is not None and "'a'" in record.steps["b"].error
    assert record.steps["b"].origin == "a"
    assert cascade(gate) == ["c"]
    assert gate.finish is not None
    assert gate.finish.failed_steps == ("a", "b", "c")


def test_begin_after_cancel_request_cancels_the_step() -> None:
    record = make_record(("a", ()), ("b", ()))
    begin(record, "a", 1)
    cancel(record)
    gate = begin(record, "a", 1)  # a retry attempt of a running step after cancel
    assert gate.decision == SKIP
    assert record.steps["a"].state == "cancelled"
    assert gate.finish is not None
    assert gate.finish.outcome == "failed"


# --- settle -------------------------------------------------------------------------


def test_settle_rejects_a_non_terminal_state() -> None:
    record = make_record(("a", ()))
    for state in ("executing", "retryable", "snoozed", "pending"):
        with pytest.raises(ValueError, match="terminal"):
            settle(record, "a", state)
    assert record.steps["a"].state == PENDING


def test_settle_records_the_result_and_claims_the_finish() -> None:
    record = make_record(("a", ()), workflow_id="wf-9", label="one")
    begin(record, "a", 1)
    out = settle(record, "a", "completed", has_result=True, result={"rows": 3})
    assert out.applied
    assert (out.workflow_id, out.workflow_label) == ("wf-9", "one")
    assert (own(out).step_name, own(out).state, own(out).has_result) == ("a", "completed", True)
    step = record.steps["a"]
    assert (step.has_result, step.result, step.error) == (True, {"rows": 3}, None)
    assert out.finish is not None
    assert out.finish.outcome == "completed"
    assert out.finish.failed_steps == ()
    assert out.finish.total_count == 1
    assert out.finish.duration >= 0
    assert record.outcome == "completed"
    assert record.finished
    assert record.finished_at == out.finish.finished_at


def test_settle_applies_once_only() -> None:
    record = make_record(("a", ()), ("b", ()))
    begin(record, "a", 1)
    first = settle(record, "a", "completed", has_result=True, result=1)
    assert first.applied
    again = settle(record, "a", "discarded", error="late failure")
    assert not again.applied
    assert again.released == [] and again.events == [] and again.finish is None
    assert record.steps["a"].state == "completed"
    assert record.steps["a"].result == 1
    assert record.steps["a"].error is None


def test_settle_releases_a_dependent_only_when_all_its_deps_completed() -> None:
    record = make_record(("a", ()), ("b", ()), ("c", ("a", "b")), ("d", ("a",)))
    begin(record, "a", 1)
    out = settle(record, "a", "completed")
    assert [s.name for s in out.released] == ["d"]
    assert record.steps["c"].dispatch == 0
    assert record.steps["d"].dispatch == 1
    assert out.finish is None
    begin(record, "b", 1)
    out = settle(record, "b", "completed")
    assert [s.name for s in out.released] == ["c"]
    assert record.steps["c"].dispatch == 1
    assert record.steps["c"].state == PENDING


def test_settle_does_not_release_an_already_published_step_twice() -> None:
    record = make_record(("a", ()), ("b", ()), ("c", ("a", "b")))
    run(record, "a")
    out = settle(record, "b", "completed")
    assert [s.name for s in out.released] == ["c"]
    # A late duplicate settle of b must not release c a second time.
    again = settle(record, "b", "completed")
    assert again.released == []
    assert record.steps["c"].dispatch == 1


def test_failure_cascades_transitively_naming_the_dependency_and_the_origin() -> None:
    record = make_record(
        ("a", ()),
        ("b", ("a",)),
        ("c", ("b",)),
        ("d", ("c",)),
        ("side", ()),
    )
    begin(record, "a", 1)
    out = settle(record, "a", "discarded", error="ValueError: bad input")
    assert out.applied
    assert cascade(out) == ["b", "c", "d"]
    assert out.released == []
    assert record.steps["a"].state == "discarded"
    assert record.steps["a"].error == "ValueError: bad input"
    assert record.steps["a"].origin == "a"
    for name, dep in (("b", "a"), ("c", "b"), ("d", "c")):
        step = record.steps[name]
        assert step.state == "cancelled"
        assert step.attempt == 0
        assert step.origin == "a"
        assert step.error is not None
        assert f"'{dep}'" in step.error  # the dependency that caused it
        assert "'a'" in step.error  # where the failure began
    assert record.steps["b"].error == "dependency 'a' was discarded (failure began at 'a')"
    assert record.steps["c"].error == "dependency 'b' was cancelled (failure began at 'a')"
    assert out.finish is None  # "side" is still pending
    fin = settle(record, "side", "completed")
    assert fin.finish is not None
    assert fin.finish.outcome == "failed"
    assert fin.finish.failed_steps == ("a", "b", "c", "d")


def test_cancelled_origin_propagates_from_a_revoked_step() -> None:
    record = make_record(("a", ()), ("b", ("a",)), ("c", ("b",)))
    out = settle(record, "a", "cancelled", error="revoked")
    assert cascade(out) == ["b", "c"]
    assert record.steps["c"].error == "dependency 'b' was cancelled (failure began at 'a')"
    assert out.finish is not None and out.finish.failed_steps == ("a", "b", "c")


def test_ignore_discarded_counts_a_discarded_dependency_as_satisfied() -> None:
    record = make_record(
        ("a", ()),
        ("tolerant", ("a",), {"ignore_discarded": True}),
        ("strict", ("a",)),
        ("wrong_flag", ("a",), {"ignore_cancelled": True}),
    )
    begin(record, "a", 1)
    out = settle(record, "a", "discarded", error="E")
    assert [s.name for s in out.released] == ["tolerant"]
    assert cascade(out) == ["strict", "wrong_flag"]
    assert begin(record, "tolerant", 1).decision == RUN


def test_ignore_cancelled_counts_a_cancelled_dependency_as_satisfied() -> None:
    record = make_record(
        ("a", ()),
        ("b", ("a",)),
        ("tolerant", ("b",), {"ignore_cancelled": True}),
        ("wrong_flag", ("b",), {"ignore_discarded": True}),
    )
    begin(record, "a", 1)
    out = settle(record, "a", "discarded", error="E")
    assert cascade(out) == ["b", "wrong_flag"]
    assert [s.name for s in out.released] == ["tolerant"]
    assert record.steps["tolerant"].state == PENDING
    assert record.steps["tolerant"].dispatch == 1


def test_an_ignore_flag_still_waits_for_the_other_dependencies() -> None:
    record = make_record(("a", ()), ("slow", ()), ("c", ("a", "slow"), {"ignore_discarded": True}))
    out = settle(record, "a", "discarded", error="E")
    assert out.released == [] and cascade(out) == []
    assert record.steps["c"].dispatch == 0
    assert begin(record, "c", 0).decision == SNOOZE
    out = settle(record, "slow", "completed")
    assert [s.name for s in out.released] == ["c"]


def test_an_ignore_flag_does_not_excuse_another_failed_dependency() -> None:
    record = make_record(("a", ()), ("x", ()), ("c", ("a", "x"), {"ignore_cancelled": True}))
    settle(record, "a", "cancelled", error="revoked")
    out = settle(record, "x", "discarded", error="E: x")
    assert cascade(out) == ["c"]
    assert record.steps["c"].error == "dependency 'x' was discarded (failure began at 'x')"


def test_finish_lists_failed_steps_in_added_order_not_settle_order() -> None:
    record = make_record(("z", ()), ("m", ()), ("a", ()), ("ok", ()))
    settle(record, "a", "discarded", error="E")
    settle(record, "ok", "completed")
    settle(record, "z", "cancelled", error="revoked")
    out = settle(record, "m", "discarded", error="E")
    assert out.finish is not None
    assert out.finish.failed_steps == ("z", "m", "a")
    assert out.finish.total_count == 4
    assert record.failed_steps() == ["z", "m", "a"]


def test_finish_is_claimed_exactly_once() -> None:
    record = make_record(("a", ()), ("b", ()))
    first = settle(record, "a", "completed")
    second = settle(record, "b", "completed")
    assert first.finish is None
    assert second.finish is not None
    for name in ("a", "b"):
        late = settle(record, name, "completed")
        assert late.finish is None and not late.applied
    assert cancel(record).finish is None


def test_outcome_is_completed_only_when_every_step_completed() -> None:
    record = make_record(("a", ()), ("b", ("a",), {"ignore_discarded": True}))
    settle(record, "a", "discarded", error="E")
    begin(record, "b", 1)
    out = settle(record, "b", "completed")
    assert out.finish is not None
    assert out.finish.outcome == "failed"  # b ran, but a was discarded
    assert out.finish.failed_steps == ("a",)


# --- mark_retrying ------------------------------------------------------------------


def test_mark_retrying_records_the_error_of_a_running_step() -> None:
    record = make_record(("a", ()))
    begin(record, "a", 1)
    out = mark_retrying(record, "a", "ValueError: once")
    assert out.applied and own(out).state == "retryable" and own(out).error == "ValueError: once"
    step = record.steps["a"]
    assert (step.state, step.error, step.attempt) == ("retryable", "ValueError: once", 1)


@pytest.mark.parametrize("state", ["pending", "completed", "retryable"])
def test_mark_retrying_ignores_a_step_that_is_not_running(state: str) -> None:
    record = make_record(("a", ()))
    if state == "completed":
        run(record, "a")
    elif state == "retryable":
        begin(record, "a", 1)
        mark_retrying(record, "a", "first")
    assert not mark_retrying(record, "a", "stale").applied
    assert record.steps["a"].error != "stale"


# --- cancel -------------------------------------------------------------------------


def test_cancel_cancels_pending_steps_and_lets_running_ones_finish() -> None:
    record = make_record(("a", ()), ("queued", ()), ("b", ("a",)))
    begin(record, "a", 1)
    out = cancel(record)
    assert out.applied
    assert record.cancel_requested
    assert [e.step_name for e in out.events] == ["queued", "b"]
    assert out.revoke == [record.steps["queued"].job_id]  # published: revoke it
    for name in ("queued", "b"):
        assert record.steps[name].state == "cancelled"
        assert record.steps[name].error == records.WORKFLOW_CANCELLED
        assert record.steps[name].attempt == 0
    assert record.steps["a"].state == "executing"
    assert out.finish is None
    done = settle(record, "a", "completed")
    assert done.released == []
    assert done.finish is not None
    assert done.finish.outcome == "failed"
    assert done.finish.failed_steps == ("queued", "b")


def test_cancel_finishes_at_once_when_nothing_runs() -> None:
    record = make_record(("a", ()), ("b", ("a",)))
    out = cancel(record)
    assert out.finish is not None
    assert out.finish.outcome == "failed"
    assert out.finish.failed_steps == ("a", "b")


def test_cancel_does_not_release_dependents_of_a_step_still_running() -> None:
    """A dependent of a running step, added pending after cancel (ignore flags), stays
    cancelled: nothing new is published after cancel."""
    record = make_record(("a", ()), ("b", ("a",), {"ignore_cancelled": True}))
    begin(record, "a", 1)
    cancel(record)
    out = settle(record, "a", "completed")
    assert out.released == []
    assert record.steps["b"].state == "cancelled"


def test_cancel_twice_or_after_finish_applies_nothing() -> None:
    record = make_record(("a", ()), ("b", ()))
    begin(record, "a", 1)
    assert cancel(record).applied
    again = cancel(record)
    assert not again.applied and again.events == [] and again.finish is None
    finished = make_record(("a", ()))
    settle(finished, "a", "completed")
    late = cancel(finished)
    assert not late.applied
    assert finished.outcome == "completed"
    assert not finished.cancel_requested


# --- serialisation ------------------------------------------------------------------


def test_workflow_record_round_trips_through_json() -> None:
    record = make_record(("a", ()), ("b", ("a",), {"ignore_cancelled": True}))
    run(record, "a")
    back = WorkflowRecord.from_json(record.to_json())
    assert back == WorkflowRecord.from_json(json.dumps(json.loads(record.to_json())))
    assert back.steps["b"].deps == ("a",)
    assert back.steps["b"].ignore_cancelled is True
    assert back.steps["a"].result == "A"
    assert list(back.steps) == ["a", "b"]
    assert back == record


# --- event numbers (seq) ------------------------------------------------------------


def test_every_event_gets_the_next_number_in_emission_order() -> None:
    """Each transition numbers the events it implies inside the same atomic change: the
    step's own event, then the cascade, then the finish. Transitions that imply no event
    (a skip, a duplicate settle, a stale retry) use no number."""
    record = make_record(("a", ()), ("b", ("a",)), ("c", ("b",)), ("d", ()))
    seen: list[int] = []
    seen.append(own(begin(record, "a", 1)).seq)  # executing
    seen.append(own(mark_retrying(record, "a", "E: once")).seq)  # retryable
    seen.append(own(begin(record, "a", 1)).seq)  # executing again
    gate = begin(record, "b", 0)
    assert gate.decision == SNOOZE
    seen.append(own(gate).seq)  # snoozed
    out = settle(record, "a", "discarded", error="E: again")
    seen.extend(e.seq for e in out.events)  # discarded; b, c cancelled, in cascade order
    assert seen == [1, 2, 3, 4, 5, 6, 7]
    assert record.seq == 7

    assert not settle(record, "a", "completed").applied
    assert begin(record, "a", 1).decision == SKIP
    assert not mark_retrying(record, "b", "stale").applied
    assert record.seq == 7  # none of these is an event

    assert own(begin(record, "d", 1)).seq == 8
    fin = settle(record, "d", "completed")
    assert own(fin).seq == 9 and fin.events[-1].seq == 10
    assert fin.finish is not None and fin.finish.seq == 10
    assert record.seq == 10


def test_cancel_numbers_each_cancelled_step_then_the_finish() -> None:
    record = make_record(("a", ()), ("b", ()), ("c", ("a",)))
    begin(record, "a", 1)
    out = cancel(record)
    assert [(e.step_name, e.seq) for e in out.events] == [("b", 2), ("c", 3)]
    done = settle(record, "a", "completed")
    assert own(done).seq == 4
    assert done.finish is not None and done.finish.seq == 5


def test_event_numbers_survive_the_json_round_trip() -> None:
    record = make_record(("a", ()), ("b", ()))
    begin(record, "a", 1)
    back = WorkflowRecord.from_json(record.to_json())
    assert back.seq == 1
    assert back.steps["a"].seq == 1
    assert own(begin(back, "b", 1)).seq == 2
