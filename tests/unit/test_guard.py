"""The guard: failures never raise, and a repeated failure is logged as a count."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from baton_celery import guard


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    guard.reset()
    yield
    guard.reset()


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "baton_celery"]


def test_guarded_swallows_and_logs_the_first_failure_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="baton_celery"), guard.guarded("a hook", "t-1"):
        raise ValueError("boom")
    [record] = _records(caplog)
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert "a hook failed (t-1)" in record.getMessage()


def test_a_rate_limited_log_counts_what_it_did_not_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    log = logging.getLogger("baton_celery.test_rate_limited")
    limited = guard.RateLimitedLog(log, every=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, log.name):
        for second in range(25):  # one failure a second
            now[0] = float(second)
            try:
                raise ConnectionError("down")
            except ConnectionError:
                limited("broker %s failed", "x")
        now[0] = 100.0  # a quiet minute later, a new failure
        try:
            raise ConnectionError("down again")
        except ConnectionError:
            limited("broker %s failed", "x")
    lines = [(r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert lines == [
        ("broker x failed", True),  # 0 s: the first, with its traceback
        ("broker x failed (10 times in the last 10 s)", False),  # 10 s: 1-10
        ("broker x failed (10 times in the last 10 s)", False),  # 20 s: 11-20
        ("broker x failed (5 times in the last 80 s)", False),  # 100 s: 21-24, and this one
    ]


def test_a_repeated_failure_is_counted_not_logged_each_time(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with caplog.at_level(logging.ERROR, logger="baton_celery"):
        for _ in range(100):
            with guard.guarded("store"):
                raise ConnectionError("down")
    assert len(_records(caplog)) == 1  # 99 more within the interval: not logged

    monkeypatch.setattr(guard, "LOG_EVERY", 0.0)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="baton_celery"), guard.guarded("store"):
        raise ConnectionError("still down")
    [summary] = _records(caplog)
    assert summary.exc_info is None
    assert "store failed" in summary.getMessage()
    assert "(100 times in the last" in summary.getMessage()


def test_different_failures_are_each_logged_in_full(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="baton_celery"):
        for where, exc in [("a", ValueError()), ("a", KeyError()), ("b", ValueError())]:
            with guard.guarded(where):
                raise exc
    assert [r.exc_info is not None for r in _records(caplog)] == [True, True, True]


def test_guarded_lets_base_exceptions_through() -> None:
    """SystemExit / KeyboardInterrupt are the worker's to handle, not baton's."""
    with pytest.raises(KeyboardInterrupt), guard.guarded("x"):
        raise KeyboardInterrupt
