"""redis:// — workflows in Redis (or a Redis Cluster), shared by every worker of every host:
the store itself, built from a URL or a ready client. Its Lua scripts, and the encoding of
what they take and return, are in :mod:`.redis_scripts`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..events import Event
from .base import Store, StoreError, UnknownWorkflow
from .records import RUN, SKIP, SNOOZE, TERMINAL, Transition, WorkflowRecord, WorkflowSummary
from .redis_clients import client_from_url, is_cluster, with_timeout
from .redis_scripts import (
    SCRIPTS,
    decode_transition,
    encode_workflow,
    evaluate,
    flag,
    step_record,
    text,
)

__all__ = ["RedisStore"]

logger = logging.getLogger(__name__)

SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
CLEANUP_FAILED = (
    "baton_celery: workflow %s finished, but its index entries could not be cleaned up "
    "(%s); the backstop sweep will retry"
)


class RedisStore(Store):
    """Workflows in Redis: one Lua script per transition, keys per step, hash-tagged per
    workflow so that it runs on Redis Cluster too.

    Build it from a URL (``redis://host:6379/0``, ``rediss://...``, ``unix:///path?db=1``,
    ``redis+cluster://host1:7000,host2:7001``) or from a ready ``redis.Redis`` /
    ``redis.cluster.RedisCluster`` client. ``key_prefix`` (URL query ``key_prefix=``)
    namespaces every key; ``timeout`` bounds every socket operation; ``retention`` is how
    long a finished workflow's keys are kept (seconds; negative: forever). A ready client
    that has a ``socket_timeout`` keeps it; one without is used through a copy with
    ``timeout`` (the store closes the copy's idle connections, never the client's).

    A call of a client made from a URL that fails on the connection is retried once (a
    connection closed by a Redis restart); a timed-out reply is not, since the script may
    have run. A ready client keeps its own retry policy.

    A workflow is not one blob but a few small keys, so a transition reads and writes only
    the step it is about, the dependents it releases or cancels, and two counters::

        baton:{<workflow id>}:meta        hash: label, created, cancel, seq, out, n, outcome, fin
        baton:{<workflow id>}:steps       list: step names, in the order they were added
        baton:{<workflow id>}:jobs        list: their Celery task ids, same order
        baton:{<workflow id>}:failed      sorted set: failed steps, scored by position
        baton:{<workflow id>}:s:<step>    hash: one step (state, attempt, seq, deps, ...)
        baton:live                        sorted set: unfinished workflows by creation time
        baton:job:<task id>               string: [workflow id, step], for ``locate``

    ``out`` counts the steps that have not settled (the finish is claimed when it reaches
    0) and each step's ``rem`` the dependencies it still waits for (released at 0). Every
    key of one workflow carries the hash tag ``{<workflow id>}``: a script never crosses a
    cluster slot. The two global keys are written next to the scripts (inside them on a
    single Redis, in the same call on a cluster). Once a workflow finished, all its keys
    expire after the retention.
    """

    shared_across_processes = True

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str = "baton",
        retention: float = 86400.0,
        timeout: float | None = None,
        owns_client: bool = False,
    ) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError(f"key_prefix must not contain braces: {key_prefix!r}")
        if timeout is not None:
            bounded = with_timeout(client, timeout)
            if bounded is not client:  # a copy, with the store's timeout: this store's
                client, owns_client = bounded, True
        self.client = client
        self.key_prefix = key_prefix
        self.retention = retention
        self.timeout = timeout
        self._owns_client = owns_client
        self.cluster = is_cluster(client)
        self._loaded: set[str] = set()  # the scripts this store's client has run once

    # --- construction ----------------------------------------------------------------

    @classmethod
    def from_url(
        cls, url: str, *, timeout: float = 5.0, retention: float = 86400.0, **options: Any
    ) -> RedisStore:
        client, key_prefix = client_from_url(url, timeout, **options)
        return cls(
            client, key_prefix=key_prefix, retention=retention, timeout=timeout, owns_client=True
        )

    def close(self) -> None:
        """Disconnect the idle connections of a client this store made (not one passed
        in). Connections other threads are using stay open; the store remains usable."""
        if not self._owns_client:
            return
        if self.cluster:
            nodes = self.client.get_nodes()
            pools = [n.redis_connection.connection_pool for n in nodes if n.redis_connection]
        else:
            pools = [self.client.connection_pool]
        for pool in pools:
            pool.disconnect(inuse_connections=False)

    # --- keys and calls --------------------------------------------------------------

    def _base(self, workflow_id: str) -> str:
        return f"{self.key_prefix}:{{{workflow_id}}}:"

    def _global(self, key: str) -> str:
        return f"{self.key_prefix}:{key}"

    def _call(self, script: str, workflow_id: str, *args: Any) -> Any:
        """Run one script (``lua/<script>.lua``) for one workflow."""
        import redis

        base = self._base(workflow_id)
        argv = (
            base,
            repr(time.time()),
            self._retention_ms(),
            "" if self.cluster else self._global(""),
            workflow_id,
            *args,
        )
        try:
            return evaluate(self.client, SCRIPTS[script], self._loaded, base + "meta", *argv)
        except redis.RedisError as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc

    def _checked(self, reply: Any, workflow_id: str, step: str | None = None) -> Any:
        if isinstance(reply, (str, bytes)):  # the transitions answer in one JSON string
            reply = json.loads(reply)
        status = text(reply[0])
        if status == "unknown":
            raise UnknownWorkflow(workflow_id)
        if status == "nostep":
            raise KeyError(step)
        return reply

    def _retention_ms(self) -> int:
        return -1 if self.retention < 0 else max(1, math.ceil(self.retention * 1000))

    # --- the contract ----------------------------------------------------------------

    def create(self, record: WorkflowRecord) -> None:
        import redis

        meta, steps = encode_workflow(record)
        base = self._base(record.id)
        argv = [base, "", "", "" if self.cluster else self._global(""), record.id,
                repr(record.created_at), meta, *steps]  # fmt: skip
        live = self._global("live")
        try:
            if self.cluster:
                # Index first: an entry whose workflow never got stored is dropped by the
                # backstop; a stored workflow missing from the index would never be swept.
                self.client.zadd(live, {record.id: record.created_at}, nx=True)
            created = evaluate(self.client, SCRIPTS["create"], self._loaded, base + "meta", *argv)
            if not created:
                raise ValueError(f"workflow {record.id!r} already exists")
            if self.cluster:
                pipe = self.client.pipeline(transaction=False)
                for step in record.steps.values():
                    pipe.set(self._global(f"job:{step.job_id}"), json.dumps([record.id, step.name]))
                pipe.execute()
        except redis.RedisError as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc

    def load(self, workflow_id: str) -> WorkflowRecord:
        reply = self._checked(self._call("load", workflow_id), workflow_id)
        flat = [text(v) for v in reply[1]]
        meta = dict(zip(flat[0::2], flat[1::2]))
        steps = [step_record(values) for values in reply[2]]
        return WorkflowRecord(
            id=workflow_id,
            label=meta.get("label"),
            steps={s.name: s for s in steps},
            created_at=float(meta["created"]),
            cancel_requested=meta.get("cancel") == "1",
            outcome=meta.get("outcome"),
            finished_at=float(meta["fin"]) if "fin" in meta else None,
            seq=int(meta["seq"]),
        )

    def locate(self, job_id: str) -> tuple[str, str] | None:
        import redis

        try:
            raw = self.client.get(self._global(f"job:{job_id}"))
        except redis.RedisError as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc
        if raw is None:
            return None
        workflow_id, step = json.loads(raw)
        return workflow_id, step

    def begin(self, workflow_id: str, step: str, dispatch: int) -> Transition:
        reply = self._checked(self._call("begin", workflow_id, step, dispatch), workflow_id, step)
        out = self._transition(workflow_id, reply[1])
        out.decision = {"run": RUN, "snooze": SNOOZE, "skip": SKIP}[text(reply[0])]
        return out

    def retrying(self, workflow_id: str, step: str, error: str | None) -> Transition:
        reply = self._checked(
            self._call("retrying", workflow_id, step, flag(error is not None), error or ""),
            workflow_id,
            step,
        )
        return self._transition(workflow_id, reply[1])

    def settle(
        self,
        workflow_id: str,
        step: str,
        state: str,
        *,
        has_result: bool = False,
        result: Any = None,
        error: str | None = None,
    ) -> Transition:
        return self._settle(workflow_id, step, state, has_result, result, error, "")

    def settle_stuck(self, workflow_id: str, step: str, seq: int, error: str) -> Transition:
        return self._settle(workflow_id, step, "discarded", False, None, error, str(seq))

    def _settle(
        self,
        workflow_id: str,
        step: str,
        state: str,
        has_result: bool,
        result: Any,
        error: str | None,
        expect_seq: str,
    ) -> Transition:
        if state not in TERMINAL:
            raise ValueError(f"not a terminal state: {state!r}")
        encoded = "" if result is None else json.dumps(result)
        args = (state, flag(has_result), flag(result is not None), encoded,
                flag(error is not None), error or "", expect_seq)  # fmt: skip
        reply = self._checked(self._call("settle", workflow_id, step, *args), workflow_id, step)
        return self._transition(workflow_id, reply[1])

    def cancel(self, workflow_id: str) -> Transition:
        reply = self._checked(self._call("cancel", workflow_id), workflow_id)
        return self._transition(workflow_id, reply[1])

    def results(self, workflow_id: str, names: Iterable[str]) -> dict[str, Any]:
        wanted = list(names)
        reply = self._checked(self._call("results", workflow_id, *wanted), workflow_id)
        out = {}
        for name, (state, has_result, result) in zip(wanted, reply[1]):
            if text(state) == "completed" and text(has_result) == "1":
                out[name] = None if result is None else json.loads(result)
        return out

    def dependency_results(self, workflow_id: str, step: str) -> dict[str, Any]:
        reply = self._call("dependency_results", workflow_id, step)
        pairs = self._checked(reply, workflow_id, step)[1]
        return {name: None if text(res) is None else json.loads(res) for name, res in pairs}

    def history(self, workflow_id: str, after: int = 0) -> list[Event]:
        raise NotImplementedError("the Redis store's history comes with its next scripts")

    def workflows(
        self,
        *,
        limit: int = 100,
        before: float | None = None,
        label: str | None = None,
        state: str | None = None,
        active_since: float | None = None,
    ) -> list[WorkflowSummary]:
        raise NotImplementedError("the Redis store's index comes with its next scripts")

    def annotate(self, workflow_id: str, values: Mapping[str, str]) -> None:
        raise NotImplementedError("the Redis store's annotations come with its next scripts")

    def annotations(self, workflow_id: str, keys: Iterable[str]) -> dict[str, str]:
        raise NotImplementedError("the Redis store's annotations come with its next scripts")

    def live_workflows(self, before: float | None = None) -> list[str]:
        import redis

        try:
            ids = self.client.zrangebyscore(
                self._global("live"), "-inf", "+inf" if before is None else f"({before!r}"
            )
        except redis.RedisError as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc
        return [text(i) for i in ids]

    def unindex(self, workflow_id: str, job_ids: Iterable[str] = ()) -> None:
        """Drop a finished (or vanished) workflow from the live index and let its job index
        entries expire with the retention."""
        import redis

        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(self._global("live"), workflow_id)
            for job_id in job_ids:
                key = self._global(f"job:{job_id}")
                if self.retention < 0:
                    continue
                pipe.pexpire(key, self._retention_ms())
            pipe.execute()
        except redis.RedisError as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc

    # --- replies -----------------------------------------------------------------------

    def _transition(self, workflow_id: str, raw: Sequence[Any]) -> Transition:
        out, jobs = decode_transition(workflow_id, raw)
        if out.finish is not None and self.cluster:
            try:
                self.unindex(workflow_id, jobs)
            except StoreError as exc:
                # The finish is committed and must still be announced.
                logger.warning(CLEANUP_FAILED, workflow_id, exc)
        return out
