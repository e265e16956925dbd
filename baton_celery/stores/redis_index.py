"""The Redis store's index of workflows: by creation (every one), unfinished, and by
finish time; the queries on it (:meth:`Store.workflows`, :meth:`Store.summary`, the
backstop's :meth:`Store.live_workflows`) and its upkeep. A part of
:class:`~baton_celery.stores.redis.RedisStore`, kept apart for size."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from .base import StoreError, UnknownWorkflow, check_query, matches
from .records import RUNNING
from .redis_scripts import text
from .transition import WorkflowSummary

__all__ = ["RedisIndex"]

logger = logging.getLogger(__name__)

#: How many index entries one :meth:`RedisIndex.workflows` call reads at the most.
SCAN_LIMIT = 20_000
#: Index entries read per round trip.
SCAN_BATCH = 500


class RedisIndex:
    """The index half of the Redis store (a mixin: the store gives it ``client``,
    ``retention`` and its key helpers)."""

    client: Any
    retention: float

    def _base(self, workflow_id: str) -> str:
        raise NotImplementedError

    def _global(self, key: str) -> str:
        raise NotImplementedError

    def _errors(self) -> Any:
        raise NotImplementedError

    def _retention_ms(self) -> int:
        raise NotImplementedError

    def workflows(
        self,
        *,
        limit: int = 100,
        before: float | None = None,
        label: str | None = None,
        state: str | None = None,
        active_since: float | None = None,
    ) -> list[WorkflowSummary]:
        check_query(limit, state)
        found: list[WorkflowSummary] = []
        for batch in self._candidates(before, state, active_since):
            for summary in self._summaries(batch):
                if matches(summary, before, label, state, active_since):
                    found.append(summary)
            if len(found) >= limit and active_since is None:
                break
        found.sort(key=lambda s: s.created_at, reverse=True)
        return found[:limit]

    def summary(self, workflow_id: str) -> WorkflowSummary:
        found = self._summaries([workflow_id])
        if not found:
            raise UnknownWorkflow(workflow_id)
        return found[0]

    def _candidates(
        self, before: float | None, state: str | None, active_since: float | None
    ) -> Iterator[list[str]]:
        """Ids to look at, in batches: newest first from the index (or the live index for
        running ones); with ``active_since``, every workflow running or finished since."""
        try:
            if active_since is not None:
                # The running ones (newest first), then those finished since, newest first.
                top = "+inf" if before is None else f"({before!r}"
                ids = self.client.zrevrangebyscore(self._global("live"), top, "-inf")
                ids += self.client.zrevrangebyscore(self._global("done"), "+inf", active_since)
                ids = [text(i) for i in dict.fromkeys(ids)][:SCAN_LIMIT]
                for i in range(0, len(ids), SCAN_BATCH):
                    yield ids[i : i + SCAN_BATCH]
                return
            key = self._global("live" if state == RUNNING else "index")
            top = "+inf" if before is None else f"({before!r}"
            for start in range(0, SCAN_LIMIT, SCAN_BATCH):
                ids = self.client.zrevrangebyscore(key, top, "-inf", start=start, num=SCAN_BATCH)
                if not ids:
                    return
                yield [text(i) for i in ids]
        except self._errors() as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc

    def _summaries(self, ids: list[str]) -> list[WorkflowSummary]:
        """Each id's summary, read in one round trip; ids whose keys expired are dropped
        from the index on the way."""
        fields = ("label", "created", "n", "out", "outcome", "fin", "seq")
        try:
            pipe = self.client.pipeline(transaction=False)
            for workflow_id in ids:
                base = self._base(workflow_id)
                pipe.hmget(base + "m", fields)
                pipe.zrange(base + "failed", 0, -1)
            replies = pipe.execute()
        except self._errors() as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc
        out, gone = [], []
        for i, workflow_id in enumerate(ids):
            label, created, n, left, outcome, fin, seq = map(text, replies[2 * i])
            if created is None:
                gone.append(workflow_id)
                continue
            out.append(
                WorkflowSummary(
                    id=workflow_id,
                    label=label,
                    state=outcome or RUNNING,
                    created_at=float(created),
                    finished_at=float(fin) if fin is not None else None,
                    total=int(n),
                    settled=int(n) - int(left),
                    failed_steps=tuple(map(text, replies[2 * i + 1])) if outcome else (),
                    seq=int(seq),
                )
            )
        if gone:
            self._forget(gone)
        return out

    def _forget(self, ids: list[str]) -> None:
        """Drop ids whose keys expired from the indexes (a cleanup: failures are left
        for the next reader)."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in ("index", "done", "live"):
                pipe.zrem(self._global(key), *ids)
            pipe.execute()
        except self._errors() as exc:
            logger.debug("baton_celery: cleaning the workflow index failed: %s", exc)

    def live_workflows(self, before: float | None = None) -> list[str]:
        try:
            ids = self.client.zrangebyscore(
                self._global("live"), "-inf", "+inf" if before is None else f"({before!r}"
            )
        except self._errors() as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc
        return [text(i) for i in ids]

    def unindex(self, workflow_id: str, job_ids: Iterable[str] = ()) -> None:
        """Drop a finished (or vanished) workflow from the live index and let its job index
        entries expire with the retention."""
        self._index_finish(workflow_id, None, job_ids)

    def _index_finish(
        self, workflow_id: str, finished_at: float | None, job_ids: Iterable[str]
    ) -> None:
        """What the finish does to the global keys (inside the script on a single Redis):
        out of the live index, into the finished one, job index entries expiring."""
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(self._global("live"), workflow_id)
            if finished_at is not None:
                pipe.zadd(self._global("done"), {workflow_id: finished_at})
            if self.retention >= 0:
                for job_id in job_ids:
                    pipe.pexpire(self._global(f"job:{job_id}"), self._retention_ms())
            pipe.execute()
        except self._errors() as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc
