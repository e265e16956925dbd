"""The step identity carried in a message's ``baton`` header."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
from celery.app.task import Context

from baton_celery.identity import HEADER, StepIdentity, identity_of

GOOD = {"workflow_id": "wf-1", "workflow_label": "etl", "step": "load", "dispatch": 2}


def test_header_name() -> None:
    assert HEADER == "baton"


def test_header_round_trip() -> None:
    ident = StepIdentity("wf-1", "etl", "load", 2)
    assert ident.header() == GOOD
    assert identity_of(SimpleNamespace(baton=ident.header())) == ident


def test_identity_from_a_request_attribute() -> None:
    assert identity_of(SimpleNamespace(id="t1", baton=dict(GOOD))) == StepIdentity(
        "wf-1", "etl", "load", 2
    )


def test_identity_from_the_request_headers() -> None:
    request = SimpleNamespace(id="t1", headers={"baton": dict(GOOD), "other": 1})
    assert identity_of(request) == StepIdentity("wf-1", "etl", "load", 2)


def test_identity_from_a_celery_context() -> None:
    """task_revoked receives a Context built from the message."""
    assert identity_of(Context(id="t1", baton=dict(GOOD))) == StepIdentity("wf-1", "etl", "load", 2)
    assert identity_of(Context(id="t2", headers={"baton": dict(GOOD)})) is not None


def test_label_is_optional_and_dispatch_defaults_to_zero() -> None:
    ident = identity_of(SimpleNamespace(baton={"workflow_id": "w", "step": "s"}))
    assert ident == StepIdentity("w", None, "s", 0)


@pytest.mark.parametrize(
    "request_",
    [
        SimpleNamespace(id="plain"),
        SimpleNamespace(id="plain", headers=None),
        SimpleNamespace(id="plain", headers={"other": "x"}),
        SimpleNamespace(id="plain", headers=[("baton", GOOD)]),
        Context(id="plain"),
        None,
    ],
    ids=["no-attr", "headers-none", "other-headers", "headers-not-a-dict", "context", "none"],
)
def test_a_task_without_the_header_is_not_a_step_and_logs_nothing(
    request_: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="baton_celery"):
        assert identity_of(request_) is None
    assert caplog.records == []


@pytest.mark.parametrize(
    "raw",
    [
        "garbage",
        42,
        ["wf-1", "load"],
        {},
        {"workflow_id": "wf-1"},
        {"step": "load"},
        {"workflow_id": 1, "step": "load"},
        {"workflow_id": "wf-1", "step": None},
        {"workflow_id": "wf-1", "step": "load", "workflow_label": 3},
        {"workflow_id": "wf-1", "step": "load", "dispatch": "1"},
        {"workflow_id": "wf-1", "step": "load", "dispatch": None},
        {"workflow_id": "wf-1", "step": "load", "dispatch": True},
    ],
)
def test_a_malformed_header_is_logged_and_treated_as_a_plain_task(
    raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="baton_celery.identity"):
        assert identity_of(SimpleNamespace(id="task-7", baton=raw)) is None
    warnings = [r for r in caplog.records if r.name == "baton_celery.identity"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    message = warnings[0].getMessage()
    assert "task-7" in message
    assert "malformed" in message


def test_a_malformed_header_in_the_headers_dict_is_logged_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="baton_celery.identity"):
        assert identity_of(SimpleNamespace(id="t9", headers={"baton": "x"})) is None
    assert len(caplog.records) == 1
