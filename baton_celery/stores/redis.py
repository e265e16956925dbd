"""redis:// — workflows in Redis (or a Redis Cluster), shared by every worker of every host:
the store itself, built from a URL or a ready client. Its Lua scripts, and the encoding of
what they take and return, are in :mod:`.redis_scripts`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, Callable

from ..events import Event
from ..guard import RateLimitedLog
from ..process import process_token
from .base import Store, StoreError, UnknownWorkflow
from .records import RUN, TERMINAL, WorkflowRecord
from .redis_clients import client_from_url, is_cluster, with_timeout
from .redis_index import RedisIndex
from .redis_scripts import (
    SCRIPTS,
    decode_event,
    decode_record,
    decode_transition,
    encode_workflow,
    evaluate,
    flag,
    text,
)
from .redis_unanswered import Answer, Sent, Unanswered
from .transition import Transition

__all__ = ["RedisStore"]

logger = logging.getLogger(__name__)

SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
UNANSWERED_FAILED = (
    "baton_celery: the settle of step %r (workflow %s), sent without waiting for its "
    "reply, failed (%s); the backstop will settle the step"
)
_unanswered_failed = RateLimitedLog(logger, logging.WARNING, traceback=False)
CLEANUP_FAILED = (
    "baton_celery: workflow %s finished, but its index entries could not be updated "
    "(%s); the backstop sweep will retry"
)


class RedisStore(RedisIndex, Store):
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
    have run. A ready client keeps its own retry policy, but for the transitions that go on
    the store's own connection in a worker's processes (see :meth:`_transition`).

    A workflow is not one blob but a few small keys, so a transition reads and writes only
    the step it is about, the dependents it releases or cancels, and the counters::

        baton:{<id>}:m          hash: label, created, cancel, seq, out, n, outcome, fin, upd
        baton:{<id>}:s:<step>   hash: one step's small fields (STEP_FIELDS)
        baton:{<id>}:sig        hash: step -> its signature (JSON)
        baton:{<id>}:deps       hash: step -> its dependencies (JSON list), when it has any
        baton:{<id>}:kids       hash: step -> its dependents (JSON list), when it has any
        baton:{<id>}:res        hash: step -> its result (JSON), when stored
        baton:{<id>}:steps      list: step names, in the order they were added
        baton:{<id>}:jobs       list: their Celery task ids, same order
        baton:{<id>}:failed     sorted set: failed steps, scored by position
        baton:{<id>}:ev         list: the history, one event per entry, in order
        baton:{<id>}:ann        hash: annotations
        baton:index             sorted set: every workflow, by creation time
        baton:live              sorted set: unfinished workflows, by creation time
        baton:done              sorted set: finished workflows, by finish time
        baton:job:<task id>     string: [workflow id, step], for ``locate``

    ``out`` counts the steps that have not settled (the finish is claimed when it reaches
    0) and each step's ``rem`` the dependencies it still waits for (released at 0). Every
    key of one workflow carries the hash tag ``{<workflow id>}``: a script never crosses a
    cluster slot. The global keys are written inside the scripts on a single Redis, next
    to them on a cluster. Once a workflow finished, all its keys expire after the
    retention, and the index forgets it.

    With :attr:`channel` set, each transition also publishes the events it made there
    (one message per transition, from inside the script: no second round trip): the
    store's live feed, which :mod:`baton_celery.listener` follows.
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
        self._unanswered = Unanswered(client.connection_pool) if not self.cluster else None
        # The transitions publish their events on ``channel`` once it is set to this.
        self.feed_channel = f"{key_prefix}:events"

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
        self.collect()
        if self._unanswered is not None:
            self._unanswered.disconnect()
        if not self._owns_client:
            return
        for pool in self._pools():
            pool.disconnect(inuse_connections=False)

    def _pools(self) -> list[Any]:
        if not self.cluster:
            return [self.client.connection_pool]
        nodes = self.client.get_nodes()
        return [n.redis_connection.connection_pool for n in nodes if n.redis_connection]

    # --- keys and calls --------------------------------------------------------------

    def _base(self, workflow_id: str) -> str:
        return f"{self.key_prefix}:{{{workflow_id}}}:"

    def _global(self, key: str) -> str:
        return f"{self.key_prefix}:{key}"

    def _errors(self) -> Any:
        import redis

        return redis.RedisError

    def _run(self, script: str, workflow_id: str, *args: Any) -> Any:
        """Run one script (``lua/<script>.lua``) for one workflow; errors as StoreError."""
        base = self._base(workflow_id)
        try:
            return evaluate(self.client, SCRIPTS[script], self._loaded, base + "m", base, *args)
        except self._errors() as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc

    def _prelude_args(self, workflow_id: str) -> tuple[Any, ...]:
        """The arguments every transition script takes first (see ``prelude.lua``)."""
        glob = "" if self.cluster else self._global("")
        token = process_token() if self.channel else ""
        return glob, workflow_id, self._retention_ms(), self.channel, token

    def _transition(
        self, script: str, workflow_id: str, step: str | None, *args: Any
    ) -> Transition:
        """Run a transition script; its reply as a Transition (index kept on a cluster).

        In a worker's process (``serves_tasks``) or one that sends settles without
        waiting, once the script ran here: on their connection, when no other thread of
        the process has it, packed by the store: ~30 us less of the client's time than
        redis-py's general path (bench/bench_hooks.py). There, neither redis-py's health
        check nor a ready client's own retry policy applies (see :meth:`_awaited`)."""
        unanswered = self._unanswered
        if unanswered is not None and script in self._loaded:
            sent = Sent(workflow_id, step, args, _taken_by_caller)
            answers = unanswered.call(self._command(script, workflow_id, args), sent)
            if answers is not None:  # None: not open here, or another thread has it
                earlier = [a for a in answers if a[0] is not sent]
                reply = next(r for s, r in answers if s is sent)
                if isinstance(reply, Exception):
                    # The connection failed: the caller waits for its own transition
                    # only; the watchdog's next tick sends the lost earlier ones again.
                    unanswered.hand_back(earlier)
                    return self._awaited(script, sent, reply)
                try:
                    return self._awaited(script, sent, reply)
                finally:
                    self._answer(earlier)
        return self._usual(script, workflow_id, step, *args)

    def _usual(self, script: str, workflow_id: str, step: str | None, *args: Any) -> Transition:
        """A transition through redis-py's pool (EVAL when the script is not loaded)."""
        reply = self._run(script, workflow_id, *self._prelude_args(workflow_id), *args)
        return self._decoded(workflow_id, step, reply)

    def _awaited(self, script: str, sent: Sent, reply: Any) -> Transition:
        """A waited-for transition's reply as a Transition. Sent again the usual way only
        when it surely did not run: Redis lost the script, or the connection failed (as
        the store's retry does); after a timeout it may have run, and is not."""
        import redis

        if isinstance(reply, (redis.exceptions.NoScriptError, redis.ConnectionError)):
            return self._usual(script, sent.workflow_id, sent.step, *sent.args)
        if isinstance(reply, Exception):
            raise StoreError(f"redis store: {type(reply).__name__}: {reply}") from reply
        return self._decoded(sent.workflow_id, sent.step, reply)

    def _command(self, script: str, workflow_id: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
        base = self._base(workflow_id)
        return ("EVALSHA", SCRIPTS[script].sha, 1, base + "m", base,
                *self._prelude_args(workflow_id), *args)  # fmt: skip

    def _decoded(self, workflow_id: str, step: str | None, reply: Any) -> Transition:
        out, jobs = decode_transition(workflow_id, self._checked(reply, workflow_id, step))
        if out.finish is not None and self.cluster:
            try:
                self._index_finish(workflow_id, out.finish.finished_at, jobs)
            except StoreError as exc:
                # The finish is committed and must still be announced.
                logger.warning(CLEANUP_FAILED, workflow_id, exc)
        return out

    def _checked(self, reply: Any, workflow_id: str, step: str | None = None) -> Any:
        status = text(reply[0]) if isinstance(reply, list) and reply else None
        if status == "unknown":
            raise UnknownWorkflow(workflow_id)
        if status == "nostep":
            raise KeyError(step)
        return reply

    def _retention_ms(self) -> int:
        return -1 if self.retention < 0 else max(1, math.ceil(self.retention * 1000))

    # --- the contract: writing -------------------------------------------------------

    def create(self, record: WorkflowRecord) -> None:
        meta, steps = encode_workflow(record)
        glob = "" if self.cluster else self._global("")
        try:
            if self.cluster:
                # Index first: an entry whose workflow never got stored is dropped by the
                # backstop; a stored workflow missing from the index would never be swept.
                pipe = self.client.pipeline(transaction=False)
                pipe.zadd(self._global("live"), {record.id: record.created_at}, nx=True)
                pipe.zadd(self._global("index"), {record.id: record.created_at}, nx=True)
                pipe.execute()
            created = self._run(
                "create", record.id, glob, record.id, repr(record.created_at), meta, *steps
            )
            if not created:
                raise ValueError(f"workflow {record.id!r} already exists")
            if self.cluster:
                pipe = self.client.pipeline(transaction=False)
                for step in record.steps.values():
                    pipe.set(self._global(f"job:{step.job_id}"), json.dumps([record.id, step.name]))
                pipe.execute()
        except self._errors() as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc

    def begin(self, workflow_id: str, step: str, dispatch: int, ran_for: float = 0.0) -> Transition:
        return self._transition("begin", workflow_id, step, step, dispatch, repr(max(0.0, ran_for)))

    def run(
        self,
        workflow_id: str,
        step: str,
        dispatch: int,
        ran_for: float,
        state: str,
        *,
        has_result: bool = False,
        result: Any = None,
        error: str | None = None,
    ) -> Transition:
        args = _run_args(step, dispatch, ran_for, state, has_result, result, error)
        return self._transition("run", workflow_id, step, *args)

    def run_unanswered(
        self,
        answered: Callable[[Transition], None],
        workflow_id: str,
        step: str,
        dispatch: int,
        ran_for: float,
        state: str,
        *,
        has_result: bool = False,
        result: Any = None,
        error: str | None = None,
    ) -> None:
        args = _run_args(step, dispatch, ran_for, state, has_result, result, error)
        # Not on a cluster (a client routes by key, and updates the index on a finish),
        # nor before the script ran once here (EVAL loads it: EVALSHA may then be sent).
        if self._unanswered is None or "run" not in self._loaded:
            answered(self._transition("run", workflow_id, step, *args))
            return
        sent = Sent(workflow_id, step, args, answered)
        self._answer(self._unanswered.send(self._command("run", workflow_id, args), sent))

    def serves_tasks(self) -> None:
        if self._unanswered is not None:
            self._unanswered.opens_on_call = True

    def collect(self) -> None:
        if self._unanswered is not None:
            self._answer(self._unanswered.collect())

    def _answer(self, answers: list[Answer]) -> None:
        """Hand on each reply of a transition sent without waiting. One that was lost, or
        refused because Redis lost the script (restarted), is sent again the usual way;
        when the first had applied, the second changes nothing and is not handed on.
        Once a second send fails (Redis is away), the rest are not tried: a task waits
        at most one failed send here. Never raises: a failure is logged, rate-limited,
        and the backstop settles that step."""
        import redis

        away: Exception | None = None
        for sent, reply in answers:
            try:
                if isinstance(reply, redis.ResponseError) and not isinstance(
                    reply, redis.exceptions.NoScriptError
                ):
                    raise StoreError(f"redis store: {type(reply).__name__}: {reply}")
                if isinstance(reply, Exception):
                    if away is not None:
                        raise away
                    try:
                        out = self._usual("run", sent.workflow_id, sent.step, *sent.args)
                    except StoreError as exc:
                        if isinstance(exc.__cause__, (redis.ConnectionError, redis.TimeoutError)):
                            away = exc
                        raise
                    if not out.applied and out.decision != RUN:
                        continue  # the first had applied (or a cancel came first: no matter)
                else:
                    out = self._decoded(sent.workflow_id, sent.step, reply)
                sent.answered(out)
            except Exception as exc:
                _unanswered_failed(UNANSWERED_FAILED, sent.step, sent.workflow_id, exc)

    def retrying(self, workflow_id: str, step: str, error: str | None) -> Transition:
        args = (step, flag(error is not None), error or "")
        return self._transition("retrying", workflow_id, step, *args)

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
        args = (step, state, flag(has_result), flag(result is not None), encoded,
                flag(error is not None), error or "", expect_seq)  # fmt: skip
        return self._transition("settle", workflow_id, step, *args)

    def cancel(self, workflow_id: str) -> Transition:
        return self._transition("cancel", workflow_id, None)

    def annotate(self, workflow_id: str, values: Mapping[str, str]) -> None:
        pairs = [item for kv in values.items() for item in kv]
        if pairs and not self._run("annotate", workflow_id, *pairs):
            raise UnknownWorkflow(workflow_id)

    # --- the contract: reading -------------------------------------------------------

    def load(self, workflow_id: str) -> WorkflowRecord:
        return decode_record(
            workflow_id, self._checked(self._run("load", workflow_id), workflow_id)
        )

    def locate(self, job_id: str) -> tuple[str, str] | None:
        try:
            raw = self.client.get(self._global(f"job:{job_id}"))
        except self._errors() as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc
        if raw is None:
            return None
        workflow_id, step = json.loads(raw)
        return workflow_id, step

    def results(self, workflow_id: str, names: Iterable[str]) -> dict[str, Any]:
        wanted = list(names)
        reply = self._checked(self._run("results", workflow_id, *wanted), workflow_id)
        out = {}
        for name, (state, has_result, result) in zip(wanted, reply[1]):
            if text(state) == "completed" and text(has_result) == "1":
                out[name] = None if result is None else json.loads(result)
        return out

    def dependency_results(self, workflow_id: str, step: str) -> dict[str, Any]:
        pairs = self._checked(self._run("dependency_results", workflow_id, step), workflow_id, step)
        return {text(name): None if res is None else json.loads(res) for name, res in pairs[1]}

    def history(self, workflow_id: str, after: int = 0) -> list[Event]:
        base = self._base(workflow_id)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hmget(base + "m", "created", "label")
            pipe.lrange(base + "ev", max(0, after), -1)  # event n is entry n - 1
            (created, label), raw = pipe.execute()
        except self._errors() as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc
        if created is None:
            raise UnknownWorkflow(workflow_id)
        label = text(label)
        return [decode_event(workflow_id, label, e) for e in raw]

    def annotations(self, workflow_id: str, keys: Iterable[str]) -> dict[str, str]:
        wanted = list(dict.fromkeys(keys))
        base = self._base(workflow_id)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.exists(base + "m")
            if wanted:
                pipe.hmget(base + "ann", wanted)
            exists, *values = pipe.execute()
        except self._errors() as exc:
            raise StoreError(f"redis store: {type(exc).__name__}: {exc}") from exc
        if not exists:
            raise UnknownWorkflow(workflow_id)
        found = zip(wanted, values[0]) if values else ()
        return {k: text(v) for k, v in found if v is not None}


def _taken_by_caller(out: Transition) -> None:
    """The ``answered`` of a transition whose caller takes its reply itself (never
    called: :meth:`RedisStore._transition` reads that reply)."""


def _run_args(
    step: str,
    dispatch: int,
    ran_for: float,
    state: str,
    has_result: bool,
    result: Any,
    error: str | None,
) -> tuple[Any, ...]:
    """``run.lua``'s own arguments."""
    if state not in TERMINAL:
        raise ValueError(f"not a terminal state: {state!r}")
    encoded = "" if result is None else json.dumps(result)
    return (step, state, flag(has_result), flag(result is not None), encoded,
            flag(error is not None), error or "", dispatch, repr(max(0.0, ran_for)))  # fmt: skip
