"""The one guard around everything baton does inside a user's task.

A failure of baton, of its store or of a receiver must never reach the task, and an
outage must not flood the worker's log: the first failure of a kind is logged with its
traceback, the same failure again only as a count, at most once per :data:`LOG_EVERY`
seconds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

__all__ = ["LOG_EVERY", "guarded", "log_failure"]

logger = logging.getLogger("baton_celery")

#: Seconds between two log lines of the same repeated failure.
LOG_EVERY = 60.0

FAILED = "baton_celery: %s failed (%s); the task itself is unaffected"
REPEATED = "baton_celery: %s failed %d more time(s) in the last %.0f s (last: %s: %s)"

# (where, exception type) -> [time of the last line, failures not logged since]
_seen: dict[tuple[str, type[BaseException]], list[float]] = {}
_lock = threading.Lock()


def log_failure(where: str, exc: BaseException, context: object = None) -> None:
    """Log that ``where`` failed with ``exc``: with a traceback the first time, then a
    count at most once per :data:`LOG_EVERY` seconds. ``context`` names what it was
    doing (a task id, a workflow id)."""
    key = (where, type(exc))
    now = time.monotonic()
    with _lock:
        entry = _seen.get(key)
        if entry is None:
            _seen[key] = [now, 0]
            first = True
        else:
            entry[1] += 1
            if now - entry[0] < LOG_EVERY:
                return
            first, missed, entry[0], entry[1] = False, int(entry[1]), now, 0
    if first:
        logger.error(FAILED, where, context, exc_info=exc)
    else:
        logger.error(REPEATED, where, missed, LOG_EVERY, type(exc).__name__, exc)


@contextlib.contextmanager
def guarded(where: str, context: object = None) -> Iterator[None]:
    """Run the block; an exception is logged by :func:`log_failure`, never raised."""
    try:
        yield
    except Exception as exc:
        log_failure(where, exc, context)


def reset() -> None:
    """Forget every failure seen (tests use it)."""
    with _lock:
        _seen.clear()
