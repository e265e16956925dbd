"""Since when this worker receives revokes: the fast path's precondition.

A step's message may skip the store's gate only if a cancel of its workflow could not
have gone unseen here: Celery's revoke reaches a worker only while its consumer (and its
remote-control box) is connected, and the worker then refuses the revoked message before
any task code runs. :class:`ReceivesRevokes`, a step of the consumer's blueprint started
after the remote-control one, records when that began; the consumer stops it when it
loses the broker, and starts it again once reconnected. So a message published before
that moment (before the worker started, or during an outage) asks the gate.

The moment is kept in memory shared with the prefork pool's processes: the steps are
made in the worker's main process before the pool forks, and started after.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from celery import bootsteps

__all__ = ["ReceivesRevokes", "since"]

_since: Any = None  # a shared double: Unix time, 0.0 while not receiving


class ReceivesRevokes(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
    """Consumer step: marks since when the worker's remote control is up."""

    requires = ("celery.worker.consumer.control:Control",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        global _since
        if _since is None:
            _since = multiprocessing.RawValue("d", 0.0)
        _since.value = 0.0
        super().__init__(parent, **kwargs)

    def start(self, parent: Any) -> None:
        # Without remote control (worker_enable_remote_control = False) revokes never
        # arrive: the fast path stays off.
        if parent.app.conf.worker_enable_remote_control:
            _since.value = time.time()

    def stop(self, parent: Any) -> None:
        _since.value = 0.0

    shutdown = stop


def since() -> float | None:
    """Since when this process's worker receives revokes, or None (not a worker, or cut
    off from its broker)."""
    value = _since
    return value.value or None if value is not None else None
