"""The workflow identity a step's message carries in its ``baton`` header.

Only immutable identifiers travel with the message; everything mutable lives in the store.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

__all__ = ["HEADER", "StepIdentity", "identity_of"]

logger = logging.getLogger(__name__)

HEADER = "baton"
MALFORMED = "baton_celery: task %s has a malformed %r header (%r); running it as a plain task"


class StepIdentity(NamedTuple):
    workflow_id: str
    workflow_label: str | None
    step: str
    dispatch: int  # which publication of the step this message is
    # When baton published this message (Unix time): for queue-wait metrics. Celery's
    # retries keep the header, so it is the time of the step's publication, not a retry's.
    published_at: float | None = None
    # No step depends on it: its settle needs no reply (see hooks.settle_run).
    leaf: bool = False

    def header(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "workflow_id": self.workflow_id,
            "workflow_label": self.workflow_label,
            "step": self.step,
            "dispatch": self.dispatch,
        }
        if self.published_at is not None:
            data["published_at"] = self.published_at
        if self.leaf:
            data["leaf"] = True
        return data


def identity_of(request: Any) -> StepIdentity | None:
    """The step identity of a Celery request, or None for a task that is not a step.

    Custom headers become request attributes in the worker (Celery >= 5.3), and the
    Context that task_revoked receives keeps them too, so this is one getattr on the hot
    path of every task. A malformed header is logged and the task runs as a plain one.
    """
    raw = getattr(request, HEADER, None)
    if raw is None:
        headers = getattr(request, "headers", None)
        raw = headers.get(HEADER) if isinstance(headers, dict) else None
        if raw is None:
            return None
    try:
        published = raw.get("published_at")
        if isinstance(published, bool) or not isinstance(published, (int, float)):
            published = None  # optional: a bad value is only left out
        ident = StepIdentity(
            raw["workflow_id"],
            raw.get("workflow_label"),
            raw["step"],
            raw.get("dispatch", 0),
            published,
            raw.get("leaf") is True,
        )
        valid = (
            isinstance(ident.workflow_id, str)
            and isinstance(ident.step, str)
            and isinstance(ident.workflow_label, (str, type(None)))
            and isinstance(ident.dispatch, int)
            and not isinstance(ident.dispatch, bool)
        )
    except (TypeError, KeyError, AttributeError):
        valid = False
    if not valid:
        logger.warning(MALFORMED, getattr(request, "id", None), HEADER, raw)
        return None
    return ident
