"""StepUpdated / WorkflowFinished: the fields the issue fixes, immutability, and the JSON
round trip through to_dict() / from_dict() / event_from_dict()."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import baton_celery
from baton_celery.events import (
    STEP_STATES,
    StepUpdated,
    WorkflowFinished,
    event_from_dict,
    utcnow,
)

STEP_FIELDS = [
    "workflow_id",
    "workflow_label",
    "step_name",
    "worker",
    "state",
    "job_id",
    "attempt",
    "has_result",
    "error",
    "timestamp",
    "seq",
]
FINISHED_FIELDS = ["workflow_id", "workflow_label", "outcome", "failed_steps", "timestamp", "seq"]

STAMP = datetime(2026, 11, 24, 12, 30, 15, 123456, tzinfo=timezone.utc)


def step_event(**overrides: Any) -> StepUpdated:
    fields: dict[str, Any] = {
        "workflow_id": "wf-1",
        "workflow_label": "nightly-etl",
        "step_name": "extract",
        "worker": "tasks.extract",
        "state": "completed",
        "job_id": "job-1",
        "attempt": 2,
        "has_result": True,
        "error": None,
        "timestamp": STAMP,
    }
    fields.update(overrides)
    return StepUpdated(**fields)


def finished_event(**overrides: Any) -> WorkflowFinished:
    fields: dict[str, Any] = {
        "workflow_id": "wf-1",
        "workflow_label": "nightly-etl",
        "outcome": "failed",
        "failed_steps": ("transform", "load"),
        "timestamp": STAMP,
    }
    fields.update(overrides)
    return WorkflowFinished(**fields)


def through_json(data: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(json.dumps(data))
    return loaded


# --- fields -------------------------------------------------------------------------


def test_step_updated_has_exactly_the_issue_fields_in_order() -> None:
    assert [f.name for f in dataclasses.fields(StepUpdated)] == STEP_FIELDS


def test_workflow_finished_has_exactly_the_issue_fields_in_order() -> None:
    assert [f.name for f in dataclasses.fields(WorkflowFinished)] == FINISHED_FIELDS


def test_events_carry_no_result_value() -> None:
    names = {f.name for f in dataclasses.fields(StepUpdated)}
    assert "result" not in names
    assert "has_result" in names


def test_step_states_are_the_six_of_the_issue() -> None:
    assert set(STEP_STATES) == {
        "executing",
        "completed",
        "retryable",
        "discarded",
        "cancelled",
        "snoozed",
    }
    assert baton_celery.STEP_STATES is STEP_STATES


def test_public_names_are_importable_from_the_package() -> None:
    assert baton_celery.StepUpdated is StepUpdated
    assert baton_celery.WorkflowFinished is WorkflowFinished
    assert baton_celery.event_from_dict is event_from_dict


# --- frozen -------------------------------------------------------------------------


@pytest.mark.parametrize("field", STEP_FIELDS)
def test_step_updated_is_frozen(field: str) -> None:
    event = step_event()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(event, field, "changed")


@pytest.mark.parametrize("field", FINISHED_FIELDS)
def test_workflow_finished_is_frozen(field: str) -> None:
    event = finished_event()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(event, field, "changed")


def test_workflow_finished_keeps_failed_steps_immutable_and_hashable() -> None:
    steps = ["b", "a"]
    event = finished_event(failed_steps=steps)
    steps.append("c")  # the caller's list must not leak into the frozen event
    assert event.failed_steps == ("b", "a")
    assert isinstance(event.failed_steps, tuple)
    assert hash(event) == hash(finished_event(failed_steps=("b", "a")))


def test_events_compare_by_value() -> None:
    assert step_event() == step_event()
    assert step_event() != step_event(attempt=3)
    assert hash(step_event()) == hash(step_event())


# --- validation ---------------------------------------------------------------------


@pytest.mark.parametrize("state", STEP_STATES)
def test_every_step_state_is_accepted(state: str) -> None:
    assert step_event(state=state).state == state


@pytest.mark.parametrize("state", ["pending", "running", "COMPLETED", "", "failed"])
def test_unknown_step_state_is_rejected(state: str) -> None:
    with pytest.raises(ValueError, match="state"):
        step_event(state=state)


@pytest.mark.parametrize("outcome", ["completed", "failed"])
def test_both_outcomes_are_accepted(outcome: str) -> None:
    assert finished_event(outcome=outcome).outcome == outcome


@pytest.mark.parametrize("outcome", ["cancelled", "discarded", "success", "", "Completed"])
def test_unknown_outcome_is_rejected(outcome: str) -> None:
    with pytest.raises(ValueError, match="outcome"):
        finished_event(outcome=outcome)


# --- JSON round trip ----------------------------------------------------------------


def test_step_updated_round_trips_through_json() -> None:
    event = step_event(error="ValueError: boom", has_result=False, state="discarded")
    data = through_json(event.to_dict())
    assert data["kind"] == "step_updated"
    assert data["timestamp"] == STAMP.isoformat()
    assert StepUpdated.from_dict(data) == event
    assert event_from_dict(data) == event


def test_step_updated_round_trips_none_label_and_job() -> None:
    event = step_event(workflow_label=None, job_id=None, attempt=0, state="cancelled")
    assert StepUpdated.from_dict(through_json(event.to_dict())) == event


def test_step_updated_to_dict_has_every_field_and_kind() -> None:
    data = step_event().to_dict()
    assert set(data) == {*STEP_FIELDS, "kind"}
    assert data["step_name"] == "extract"
    assert data["attempt"] == 2
    assert data["has_result"] is True


def test_workflow_finished_round_trips_through_json() -> None:
    event = finished_event()
    data = through_json(event.to_dict())
    assert data == {
        "kind": "workflow_finished",
        "workflow_id": "wf-1",
        "workflow_label": "nightly-etl",
        "outcome": "failed",
        "failed_steps": ["transform", "load"],
        "timestamp": STAMP.isoformat(),
        "seq": 0,
    }
    assert WorkflowFinished.from_dict(data) == event
    assert event_from_dict(data) == event


def test_completed_workflow_round_trips_with_no_failed_steps() -> None:
    event = finished_event(outcome="completed", failed_steps=(), workflow_label=None)
    back = event_from_dict(through_json(event.to_dict()))
    assert back == event
    assert isinstance(back, WorkflowFinished)
    assert back.failed_steps == ()


def test_round_trip_keeps_the_timestamp_timezone_aware_utc() -> None:
    for event in (step_event(), finished_event()):
        back = event_from_dict(through_json(event.to_dict()))
        assert back.timestamp.tzinfo is not None
        assert back.timestamp.utcoffset() == timedelta(0)
        assert back.timestamp == STAMP


def test_from_dict_normalises_an_offset_timestamp_to_utc() -> None:
    data = through_json(step_event().to_dict())
    data["timestamp"] = "2026-11-24T14:30:15.123456+02:00"
    back = StepUpdated.from_dict(data)
    assert back.timestamp == STAMP
    assert back.timestamp.utcoffset() == timedelta(0)


@pytest.mark.parametrize("stamp", ["2026-11-24T12:30:15", 1764000000, None, "yesterday"])
def test_from_dict_rejects_naive_or_non_iso_timestamps(stamp: Any) -> None:
    data = through_json(finished_event().to_dict())
    data["timestamp"] = stamp
    with pytest.raises(ValueError):
        WorkflowFinished.from_dict(data)


def test_from_dict_rejects_a_bad_state_or_outcome() -> None:
    step = through_json(step_event().to_dict())
    step["state"] = "exploded"
    with pytest.raises(ValueError, match="state"):
        event_from_dict(step)
    fin = through_json(finished_event().to_dict())
    fin["outcome"] = "partial"
    with pytest.raises(ValueError, match="outcome"):
        event_from_dict(fin)


def test_from_dict_needs_every_field() -> None:
    data = through_json(step_event().to_dict())
    del data["attempt"]
    with pytest.raises(KeyError):
        StepUpdated.from_dict(data)


# --- event_from_dict dispatch -------------------------------------------------------


def test_event_from_dict_dispatches_on_kind() -> None:
    assert isinstance(event_from_dict(step_event().to_dict()), StepUpdated)
    assert isinstance(event_from_dict(finished_event().to_dict()), WorkflowFinished)


@pytest.mark.parametrize("kind", [None, "", "step", "WorkflowFinished", 42])
def test_event_from_dict_rejects_an_unknown_kind(kind: Any) -> None:
    data = step_event().to_dict()
    if kind is None:
        del data["kind"]
    else:
        data["kind"] = kind
    with pytest.raises(ValueError, match="not a baton_celery event"):
        event_from_dict(data)


# --- timestamps ---------------------------------------------------------------------


def test_utcnow_is_timezone_aware_utc() -> None:
    now = utcnow()
    assert now.tzinfo is not None
    assert now.utcoffset() == timedelta(0)
    assert abs(now - datetime.now(timezone.utc)) < timedelta(seconds=5)
