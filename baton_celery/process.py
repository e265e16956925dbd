"""A token naming this process (a new one after a fork), carried by the events it sends
so that a process that also listens does not deliver its own events twice."""

from __future__ import annotations

import os
import uuid

__all__ = ["process_token"]

_token: tuple[int, str] | None = None


def process_token() -> str:
    """A token unique to this process (a new one after a fork)."""
    global _token
    pid = os.getpid()
    if _token is None or _token[0] != pid:
        _token = (pid, f"{uuid.uuid4().hex[:16]}-{pid}")
    return _token[1]
