"""Transitions sent to Redis without waiting for their replies (``Store.run_unanswered``):
a connection of their own in each process, whose replies are read together, by the send
that finds :data:`READ_AFTER` of them waiting (one read of the socket for them all), and
whenever :meth:`Unanswered.collect` is called (the fast path's watchdog, every tick; a
pool process on its way out). A transition whose caller waits for its reply may use the
same connection (:meth:`Unanswered.call`): it then reads the replies through its own.

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
    """A transition sent on the store's own connection: what repeating it and handing on
    its reply take."""

    workflow_id: str
    step: str | None  # None: a transition of the whole workflow (a cancel)
    args: tuple[Any, ...]  # the script's own arguments
    answered: Callable[[Transition], None]


#: A send reads the waiting replies once this many are waiting.
READ_AFTER = 16

#: A sent transition and its reply, or the exception reading the reply raised.
Answer = tuple[Sent, Any]


class Unanswered:
    """One connection (made from ``pool``, outside it) for the transitions sent without
    waiting (and, once it is open, the ones a caller waits for: :meth:`call`), and the
    transitions whose replies are still on it. Thread-safe.

    A transition whose reply can no longer be read on the connection is handed back as
    lost (with the exception that lost it), to be sent again: one whose send or read an
    exception cut short (a soft time limit in the task's thread) too, since the
    connection is then dropped with every reply still on it."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._connection: Any = None
        self._sent: deque[Sent] = deque()
        self._answers: list[Answer] = []  # read, or lost, and not yet handed back
        #: Whether :meth:`call` may open the connection (a worker's process); else only
        #: a process that sent something without waiting has it open.
        self.opens_on_call = False

    def send(self, command: Sequence[Any], sent: Sent) -> list[Answer]:
        """Send ``command`` (``sent`` awaits its reply); the earlier replies when it read
        them first. If it could not be sent, ``sent`` is among them, as lost."""
        with self._here():
            return self._send(packed(command), sent)

    def call(self, command: Sequence[Any], sent: Sent) -> list[Answer] | None:
        """Send ``command`` and read the replies through its own, all before the lock is
        let go (read by another thread, its reply would reach its sender too late): the
        replies, ``sent``'s among them (or lost). None, and nothing sent, when the
        connection is not open and :attr:`opens_on_call` is off (a web app's cancels,
        the backstop: they keep to the client's pool), or when another thread holds it:
        a thread does not wait here for another's round trip. A send or read cut short
        by another exception drops ``sent`` with the connection: its caller has it."""
        payload = packed(command)
        lock = self._here()
        if not lock.acquire(blocking=False):
            return None
        try:
            if self._connection is None and not self.opens_on_call:
                return None
            return self._send(payload, sent, awaited=True)
        finally:
            lock.release()

    def hand_back(self, answers: list[Answer]) -> None:
        """Keep ``answers`` for whoever reads the connection next (the watchdog's tick)."""
        with self._here():
            self._answers.extend(answers)

    def _send(self, payload: bytes, sent: Sent, awaited: bool = False) -> list[Answer]:
        try:
            self._read(READ_AFTER)
            self._sent.append(sent)  # before the send: a send cut short is accounted for
            # No health check: it would read a PING's reply among the waiting ones.
            self._connection.send_packed_command([payload], check_health=False)
            if awaited:
                self._read()
        except BaseException as exc:
            queued = any(waiting is sent for waiting in self._sent)
            lost = self._failed(exc)
            if not queued:  # no connection to be had: not sent either
                self._answers.append((sent, lost))
            if lost is not exc:
                if awaited:  # its caller has the exception: nobody else sends it again
                    self._answers = [a for a in self._answers if a[0] is not sent]
                raise
        return self._handed()

    def collect(self) -> list[Answer]:
        """The replies of every transition sent so far (each read within the store's
        timeout, the connection's)."""
        with self._here():
            try:
                self._read()
            except BaseException as exc:  # no connection to be had, or cut short
                if self._failed(exc) is not exc:
                    raise
            return self._handed()

    def waiting(self) -> int:
        """How many replies are still to be read."""
        with self._here():
            return len(self._sent)

    def disconnect(self) -> None:
        """Close the connection when nothing waits on it (the next send reconnects)."""
        with self._here():
            if not self._sent and self._connection is not None:
                self._connection.disconnect()

    def _here(self) -> threading.Lock:
        """The lock, after a fork made anew with the rest: a parent's connection, what it
        sent and a lock another of its threads held are not this process's (redis-py
        never shuts down a socket another process made)."""
        if self._pid != os.getpid():
            self._pid, self._lock, self._connection = os.getpid(), threading.Lock(), None
            self._sent.clear()
            self._answers.clear()
        return self._lock

    def _read(self, waiting: int = 1) -> None:
        """Read the replies of the transitions sent so far, if ``waiting`` or more wait.
        A ``sent`` leaves the queue only with its reply read."""
        import redis

        if self._connection is None:
            self._connection = self._pool.make_connection()
        if len(self._sent) < waiting:
            return
        while self._sent:
            try:
                reply = self._connection.read_response()
            except redis.ResponseError as exc:  # the command's own error: read on
                reply = exc
            except redis.RedisError as exc:
                # Lost with the connection (redis-py disconnected it): so are the others.
                self._drop(exc)
                return
            self._answers.append((self._sent.popleft(), reply))

    def _failed(self, exc: BaseException) -> Exception:
        """After ``exc`` ended a send or a read: drop the connection; what lost the
        transitions on it (``exc`` itself when it is Redis's; the caller re-raises any
        other, such as a soft time limit)."""
        import redis

        if isinstance(exc, redis.RedisError):
            lost: Exception = exc
        else:
            lost = redis.ConnectionError(f"interrupted by {exc!r}")
        self._drop(lost)
        return lost

    def _drop(self, lost: Exception) -> None:
        """Close the connection; every transition still waiting on it is lost."""
        if self._connection is not None:
            self._connection.disconnect()
        self._answers.extend((waiting, lost) for waiting in self._sent)
        self._sent.clear()

    def _handed(self) -> list[Answer]:
        answers, self._answers = self._answers, []
        return answers


def packed(command: Sequence[str | int | float | bytes]) -> bytes:
    """``command`` in Redis's wire protocol (RESP), as redis-py would send it, in about a
    quarter of the time its general packer takes for a transition's ~20 arguments."""
    encoded = [arg if isinstance(arg, bytes) else str(arg).encode() for arg in command]
    return b"*%d\r\n" % len(encoded) + b"".join(
        [b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in encoded]
    )
