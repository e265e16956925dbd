"""The one guard around everything baton does inside a user's task, and the one way it
logs a failure that may repeat.

A failure of baton, of its store, its broker or a receiver must never reach the task,
and an outage must not flood the worker's log: the first failure of a kind is logged
with its traceback, the same failure again at most once per :data:`LOG_EVERY` seconds,
as one line that counts the times since.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Callable

__all__ = ["LOG_EVERY", "RateLimitedLog", "guarded", "log_failure"]

logger = logging.getLogger("baton_celery")

#: Seconds between two log lines of the same repeated failure.
LOG_EVERY = 60.0

FAILED = "baton_celery: %s failed (%s); the task itself is unaffected"
REPEATED = " (%d times in the last %.0f s)"


class RateLimitedLog:
    """One kind of failure that may repeat on every task or event: logged the first time
    with its traceback, then at most once per ``every`` seconds (default
    :data:`LOG_EVERY`) as one line counting the times since, without a traceback. Call
    it from the ``except`` block: ``log(MESSAGE, *args)``."""

    def __init__(
        self,
        log: logging.Logger = logger,
        level: int = logging.ERROR,
        *,
        traceback: bool = True,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log, self.level, self.traceback = log, level, traceback
        self.every, self.clock = every, clock
        self._last: float | None = None
        self._count = 0  # times it happened since the last line
        self._lock = threading.Lock()

    def __call__(self, message: str, *args: object) -> None:
        every = LOG_EVERY if self.every is None else self.every
        with self._lock:
            now = self.clock()
            self._count += 1
            if self._last is not None and now - self._last < every:
                return
            first = self._last is None or self._count == 1  # the first, or first in a while
            count, since = self._count, (0.0 if self._last is None else now - self._last)
            self._last, self._count = now, 0
        if first:
            self.log.log(self.level, message, *args, exc_info=self.traceback)
        else:
            self.log.log(self.level, message + REPEATED, *args, count, since)


# (where, exception type) -> its log
_logs: dict[tuple[str, type[BaseException]], RateLimitedLog] = {}
_logs_lock = threading.Lock()


def log_failure(where: str, exc: BaseException, context: object = None) -> None:
    """Log, rate-limited, that ``where`` failed with ``exc`` (call it from the ``except``
    block); ``context`` names what it was doing (a task id, a workflow id)."""
    key = (where, type(exc))
    log = _logs.get(key)
    if log is None:
        with _logs_lock:
            log = _logs.setdefault(key, RateLimitedLog())
    log(FAILED, where, context)


@contextlib.contextmanager
def guarded(where: str, context: object = None) -> Iterator[None]:
    """Run the block; an exception is logged by :func:`log_failure`, never raised."""
    try:
        yield
    except Exception as exc:
        log_failure(where, exc, context)


def reset() -> None:
    """Forget every failure seen (tests use it)."""
    with _logs_lock:
        _logs.clear()
