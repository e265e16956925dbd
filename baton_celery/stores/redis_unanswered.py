"""Transitions sent to Redis without waiting for their replies (``Store.run_unanswered``):
a connection of their own in each process, whose replies are read before its next
send, and whenever :meth:`Unanswered.collect` is called (the fast path's watchdog, every
tick; a pool process on its way out).

Redis runs a connection's commands in the order they were sent and replies in that
order, so the replies waiting on the connection are read first-in, first-out. A reply
lost with its connection (a Redis restart, a timeout) leaves its transition's fate
unknown: the store then sends it again the usual way (a ``run`` is safe to repeat: a
settled step does not settle twice).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

from .transition import Transition

__all__ = ["Answer", "Sent", "Unanswered"]


class Sent(NamedTuple):
    """A transition sent without waiting: what repeating it and handing on its reply take."""

    workflow_id: str
    step: str
    args: tuple[Any, ...]  # the script's own arguments
    answered: Callable[[Transition], None]


#: A sent transition and its reply, or the exception reading the reply raised.
Answer = tuple[Sent, Any]


class Unanswered:
    """One connection (made from ``pool``, outside it) for the transitions sent without
    waiting, and the transitions whose replies are still on it. Thread-safe."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._pid = 0
        self._connection: Any = None
        self._sent: deque[Sent] = deque()

    def send(self, command: Sequence[Any], sent: Sent) -> tuple[bool, list[Answer]]:
        """Send ``command`` (``sent`` awaits its reply): whether it went out (if not, the
        caller runs it the usual way), and the earlier replies, read first."""
        import redis

        with self._lock:
            answers = self._read()
            try:
                # No health check: it would read a PING's reply among the waiting ones.
                self._connection.send_command(*command, check_health=False)
            except redis.RedisError:
                self._connection.disconnect()
                return False, answers
            self._sent.append(sent)
            return True, answers

    def collect(self) -> list[Answer]:
        """The replies of every transition sent so far (each read within the store's
        timeout, the connection's)."""
        with self._lock:
            return self._read()

    def waiting(self) -> int:
        """How many replies are still to be read."""
        with self._lock:
            return len(self._sent) if self._pid == os.getpid() else 0

    def disconnect(self) -> None:
        """Close the connection when nothing waits on it (the next send reconnects)."""
        with self._lock:
            if self._pid == os.getpid() and not self._sent:
                self._connection.disconnect()

    def _read(self) -> list[Answer]:
        import redis

        if self._pid != os.getpid():
            # New, or forked: a parent's connection and what it sent are not this
            # process's (redis-py never shuts down a socket another process made).
            self._pid, self._connection = os.getpid(), self._pool.make_connection()
            self._sent.clear()
        answers: list[Answer] = []
        while self._sent:
            sent = self._sent.popleft()
            try:
                answers.append((sent, self._connection.read_response()))
            except redis.ResponseError as exc:  # the command's own error: read on
                answers.append((sent, exc))
            except redis.RedisError as exc:
                # Lost with the connection (redis-py disconnected it): so are the others.
                answers.append((sent, exc))
                answers.extend((waiting, exc) for waiting in self._sent)
                self._sent.clear()
        return answers
