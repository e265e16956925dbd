"""Transitions sent to Redis without waiting for their replies (``Store.run_unanswered``):
a connection of their own in each process, whose replies are read together, by the send
that finds :data:`READ_AFTER` of them waiting (one read of the socket for them all), and
whenever :meth:`Unanswered.collect` is called (the fast path's watchdog, every tick; a
pool process on its way out).

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

__all__ = ["Answer", "Sent", "Unanswered", "packed"]


class Sent(NamedTuple):
    """A transition sent without waiting: what repeating it and handing on its reply take."""

    workflow_id: str
    step: str
    args: tuple[Any, ...]  # the script's own arguments
    answered: Callable[[Transition], None]


#: A send reads the waiting replies once this many are waiting.
READ_AFTER = 16

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
        caller runs it the usual way), and the earlier replies when it read them first."""
        import redis

        with self._lock:
            answers = self._read(READ_AFTER)
            try:
                # No health check: it would read a PING's reply among the waiting ones.
                self._connection.send_packed_command([packed(command)], check_health=False)
            except redis.RedisError as exc:
                # The replies still waiting on the connection are lost with it.
                self._connection.disconnect()
                answers.extend((waiting, exc) for waiting in self._sent)
                self._sent.clear()
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

    def _read(self, waiting: int = 1) -> list[Answer]:
        """The replies of the transitions sent so far, if ``waiting`` or more wait."""
        import redis

        if self._pid != os.getpid():
            # New, or forked: a parent's connection and what it sent are not this
            # process's (redis-py never shuts down a socket another process made).
            self._pid, self._connection = os.getpid(), self._pool.make_connection()
            self._sent.clear()
        if len(self._sent) < waiting:
            return []
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


def packed(command: Sequence[str | int]) -> bytes:
    """``command`` in Redis's wire protocol (RESP), as redis-py would send it, in about a
    quarter of the time its general packer takes for a transition's ~20 arguments."""
    encoded = [str(arg).encode() for arg in command]
    return b"*%d\r\n" % len(encoded) + b"".join(
        [b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in encoded]
    )
