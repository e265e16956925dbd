"""The Redis store beyond the shared contract: it must apply exactly the transitions of
:mod:`baton_celery.stores.records` (same decisions, same cascade, same event numbers), on a
single Redis and on a real three-node cluster; keep every key of a workflow in one slot;
expire them after the retention once finished; and fail fast when Redis is away."""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
import redis
from celery import Celery
from redis.cluster import RedisCluster
from redis_servers import (
    LocalRedis,
    SilentRedis,
    shared_redis_url,
    spare_port,
    unique_prefix,
    unit_cluster,
)

import baton_celery
from baton_celery.events import StepUpdated, WorkflowFinished
from baton_celery.stores import Store, StoreError, UnknownWorkflow, store_from_url
from baton_celery.stores.memory import MemoryStore
from baton_celery.stores.records import StepRecord, Transition, WorkflowRecord
from baton_celery.stores.redis import RedisStore
from baton_celery.stores.redis_scripts import SCRIPTS, STEP_FIELDS, TRANSITIONS, text

BACKENDS = ["single", "cluster"]
EPOCH = datetime.fromtimestamp(0, timezone.utc)


@pytest.fixture(params=BACKENDS)
def redis_store(request: pytest.FixtureRequest) -> Iterator[RedisStore]:
    prefix = unique_prefix()
    if request.param == "single":
        url = shared_redis_url(prefix)
    else:
        url = f"{unit_cluster().url}?key_prefix={prefix}"
    store = store_from_url(url, timeout=5.0, retention=60.0)
    assert isinstance(store, RedisStore)
    yield store
    _delete_prefix(store, prefix)
    store.close()


def _delete_prefix(store: RedisStore, prefix: str) -> None:
    if store.cluster:
        return  # the cluster is the test session's own and goes away with it
    for key in store.client.scan_iter(match=f"{prefix}:*", count=1000):
        store.client.delete(key)


# --- the same transitions as records.py ----------------------------------------------

NAMES = ["extract", "it's", 'say "hi"', "naïve", "a\\b", "tab\there", "x", "y", "z", "w"]


def random_record(rng: random.Random, size: int) -> WorkflowRecord:
    wid = f"wf-{uuid.uuid4()}"
    names = (NAMES + [f"s{i}" for i in range(size)])[:size]
    rng.shuffle(names)
    steps = {}
    for i, name in enumerate(names):
        deps = tuple(rng.sample(names[:i], k=min(i, rng.choice([0, 1, 1, 2, 3]))))
        if deps and rng.random() < 0.1:
            deps = (*deps, deps[0])  # a duplicate dependency
        steps[name] = StepRecord(
            name=name,
            task=f"tasks.{i}",
            job_id=f"{wid}/{i}",
            signature={"task": f"tasks.{i}", "args": [i, name], "kwargs": {}, "options": {}},
            deps=deps,
            ignore_cancelled=rng.random() < 0.2,
            ignore_discarded=rng.random() < 0.2,
            dispatch=0 if deps and rng.random() > 0.05 else 1,  # some published early
        )
    return WorkflowRecord(wid, rng.choice([None, "diff", "ł"]), steps)


def view(value: Any) -> Any:
    """What a transition returned, without wall-clock times (they differ by design)."""
    if isinstance(value, StepRecord):
        data = dataclasses.asdict(value)
        data.pop("updated_at")
        return data
    if isinstance(value, (StepUpdated, WorkflowFinished)):
        return dataclasses.replace(value, timestamp=EPOCH)
    if isinstance(value, Transition):
        finish = value.finish
        return (
            value.decision,
            value.dispatch,
            value.workflow_id,
            value.workflow_label,
            value.applied,
            [view(e) for e in value.events],
            value.released,
            value.revoke,
            None
            if finish is None
            else (finish.outcome, finish.failed_steps, finish.total_count, finish.seq),
        )
    if isinstance(value, WorkflowRecord):
        return (
            value.id,
            value.label,
            {n: view(s) for n, s in value.steps.items()},
            value.created_at,
            value.cancel_requested,
            value.outcome,
            value.finished_at is not None,
            value.seq,
        )
    return value


def apply(store: Store, op: tuple[Any, ...]) -> Any:
    kind, wid, *args = op
    try:
        if kind == "begin":
            return view(store.begin(wid, args[0], args[1]))
        if kind == "retrying":
            return view(store.retrying(wid, args[0], args[1]))
        if kind == "settle":
            name, state, result, error = args
            return view(
                store.settle(wid, name, state, has_result=result is not None, result=result,
                             error=error)
            )  # fmt: skip
        if kind == "stuck":
            return view(store.settle_stuck(wid, args[0], args[1], "stuck"))
        if kind == "cancel":
            return view(store.cancel(wid))
    except KeyError as exc:
        return ("KeyError", type(exc).__name__)
    raise AssertionError(op)


def random_op(rng: random.Random, record: WorkflowRecord) -> tuple[Any, ...]:
    name = rng.choice(list(record.steps))
    step = record.steps[name]
    roll = rng.random()
    if roll < 0.45:
        dispatch = max(step.dispatch, 1) if rng.random() < 0.85 else step.dispatch - 1
        return ("begin", record.id, name, dispatch)
    if roll < 0.55:
        return ("retrying", record.id, name, rng.choice([None, "E: retry"]))
    if roll < 0.9:
        state = rng.choice(["completed", "completed", "completed", "discarded", "cancelled"])
        result = rng.choice([None, 0, {"rows": [1, "é"]}]) if state == "completed" else None
        return ("settle", record.id, name, state, result, rng.choice([None, "E: x"]))
    if roll < 0.97:
        return ("stuck", record.id, name, step.seq if rng.random() < 0.7 else step.seq + 1)
    return ("cancel", record.id)


@pytest.mark.parametrize("seed", range(12))
def test_same_transitions_and_event_numbers_as_records(redis_store: RedisStore, seed: int) -> None:
    rng = random.Random(seed)
    memory = MemoryStore()
    for _ in range(4):
        record = random_record(rng, rng.choice([1, 3, 6, 10]))
        memory.create(record)
        redis_store.create(record)
        assert view(redis_store.load(record.id)) == view(memory.load(record.id))
        for _ in range(60):
            current = memory.load(record.id)
            op = random_op(rng, current)
            expected = apply(memory, op)
            assert apply(redis_store, op) == expected, op
            assert view(redis_store.load(record.id)) == view(memory.load(record.id)), op
            if current.finished:
                break
        names = list(record.steps)
        assert redis_store.results(record.id, names) == memory.results(record.id, names)


def test_every_event_number_is_used_once_in_order(redis_store: RedisStore) -> None:
    """A fan-out into a fan-in: the step events and the finish are numbered 1..n."""
    steps = {"root": StepRecord("root", "t", "j-root", {}, dispatch=1)}
    for i in range(5):
        steps[f"mid{i}"] = StepRecord(f"mid{i}", "t", f"j-mid{i}", {}, deps=("root",))
    steps["last"] = StepRecord("last", "t", "j-last", {}, deps=tuple(f"mid{i}" for i in range(5)))
    record = WorkflowRecord(f"wf-{uuid.uuid4()}", None, steps)
    redis_store.create(record)
    seqs = [e.seq for e in redis_store.begin(record.id, "root", 1).events]
    out = redis_store.settle(record.id, "root", "completed")
    seqs += [e.seq for e in out.events]
    assert [s.name for s in out.released] == [f"mid{i}" for i in range(5)]
    for i in range(5):
        seqs += [e.seq for e in redis_store.begin(record.id, f"mid{i}", 1).events]
    first = redis_store.settle(record.id, "mid0", "discarded", error="E")
    assert [(e.step_name, e.state) for e in first.events] == [
        ("mid0", "discarded"), ("last", "cancelled")
    ]  # fmt: skip
    seqs += [e.seq for e in first.events]
    for i in range(1, 4):
        seqs += [e.seq for e in redis_store.settle(record.id, f"mid{i}", "discarded").events]
    last = redis_store.settle(record.id, "mid4", "completed")
    assert last.finish is not None
    seqs += [e.seq for e in last.events]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) == 14
    assert redis_store.history(record.id)[-1].seq == 14
    assert redis_store.load(record.id).steps["last"].error == (
        "dependency 'mid0' was discarded (failure began at 'mid0')"
    )
    assert last.finish.failed_steps == ("mid0", "mid1", "mid2", "mid3", "last")


# --- keys ----------------------------------------------------------------------------


def flat_record(n: int) -> WorkflowRecord:
    wid = f"wf-{uuid.uuid4()}"
    return WorkflowRecord(
        wid, "flat", {f"s{i}": StepRecord(f"s{i}", "t", f"{wid}/{i}", {}, dispatch=1)
                      for i in range(n)},
    )  # fmt: skip


def workflow_keys(store: RedisStore, workflow_id: str) -> list[str]:
    pattern = f"{store.key_prefix}:{{{workflow_id}}}:*"
    if store.cluster:
        return [str(k) for k in store.client.scan_iter(match=pattern, target_nodes="all")]
    return [str(k) for k in store.client.scan_iter(match=pattern)]


def test_keys_share_one_slot_and_expire_only_once_finished(redis_store: RedisStore) -> None:
    record = flat_record(4)
    redis_store.create(record)
    keys = workflow_keys(redis_store, record.id)
    # the step hashes, meta, signatures, steps, jobs (no dependencies, no failure yet)
    assert len(keys) == 4 + 4
    if redis_store.cluster:
        assert len({redis_store.client.keyslot(k) for k in keys}) == 1
    assert all(redis_store.client.ttl(k) == -1 for k in keys)  # live: kept
    assert redis_store.live_workflows() == [record.id]
    for i in range(3):
        redis_store.settle(record.id, f"s{i}", "completed")
    assert all(redis_store.client.ttl(k) == -1 for k in keys)
    out = redis_store.settle(record.id, "s3", "discarded", error="E")
    assert out.finish is not None
    keys = workflow_keys(redis_store, record.id)
    assert len(keys) == 4 + 6  # and the failed set, the history
    assert {k.rsplit(":", 1)[1] for k in keys} >= {"m", "sig", "steps", "jobs", "failed", "ev"}
    assert all(0 < redis_store.client.ttl(k) <= 60 for k in keys)
    job = redis_store._global(f"job:{record.steps['s0'].job_id}")
    assert 0 < redis_store.client.ttl(job) <= 60
    assert redis_store.live_workflows() == []
    assert redis_store.locate(record.steps["s2"].job_id) == (record.id, "s2")


def test_a_step_hash_holds_the_fields_the_scripts_know(redis_store: RedisStore) -> None:
    """The Lua field positions are made from STEP_FIELDS: the hash that create writes
    must hold those fields and no other (an error, an origin once it has one)."""
    wid = f"wf-{uuid.uuid4()}"
    step = StepRecord("a", "t", f"{wid}/a", {}, has_result=True, result=[1], error="E",
                      origin="a", state="completed")  # fmt: skip
    redis_store.create(WorkflowRecord(wid, None, {"a": step}))
    fields = redis_store.client.hkeys(f"{redis_store._base(wid)}s:a")
    assert sorted(text(f) for f in fields) == sorted(STEP_FIELDS)
    loaded = redis_store.load(wid).steps["a"]
    assert (loaded.result, loaded.error, loaded.origin) == ([1], "E", "a")
    assert set(TRANSITIONS) <= set(SCRIPTS)


def test_retention_removes_a_finished_workflow(redis_store: RedisStore) -> None:
    redis_store.retention = 0.05
    record = flat_record(2)
    redis_store.create(record)
    redis_store.settle(record.id, "s0", "completed")
    live = flat_record(1)
    redis_store.create(live)
    assert redis_store.settle(record.id, "s1", "completed").finish is not None
    deadline = time.monotonic() + 10
    while workflow_keys(redis_store, record.id) and time.monotonic() < deadline:
        time.sleep(0.02)  # waiting for Redis's own expiry, nothing else to wait on
    assert workflow_keys(redis_store, record.id) == []
    with pytest.raises(UnknownWorkflow):
        redis_store.load(record.id)
    with pytest.raises(UnknownWorkflow):
        redis_store.history(record.id)  # the history expired with it
    assert record.id not in {s.id for s in redis_store.workflows(label="flat")}
    assert redis_store.locate(record.steps["s0"].job_id) is None
    assert redis_store.load(live.id).steps["s0"].state == "pending"  # not finished: kept


def test_live_workflows_before_a_time(redis_store: RedisStore) -> None:
    old, new = flat_record(1), flat_record(1)
    old.created_at = time.time() - 600
    redis_store.create(old)
    redis_store.create(new)
    assert redis_store.live_workflows() == [old.id, new.id]
    assert redis_store.live_workflows(before=time.time() - 60) == [old.id]


def test_settle_stuck_loses_to_progress(redis_store: RedisStore) -> None:
    record = flat_record(2)
    redis_store.create(record)
    seen = redis_store.begin(record.id, "s0", 1).events[0].seq
    redis_store.retrying(record.id, "s0", "E")  # progress since the sweep looked
    assert not redis_store.settle_stuck(record.id, "s0", seen, "stuck").applied
    step = redis_store.load(record.id).steps["s0"]
    out = redis_store.settle_stuck(record.id, "s0", step.seq, "no progress")
    [event] = out.events
    assert out.applied and isinstance(event, StepUpdated)
    assert (event.state, event.error) == ("discarded", "no progress")


# --- connections ---------------------------------------------------------------------


def test_unreachable_redis_raises_store_error_within_the_timeout() -> None:
    store = store_from_url(f"redis://127.0.0.1:{spare_port()}/0", timeout=0.5)
    started = time.monotonic()
    for call in (lambda: store.load("x"), lambda: store.begin("x", "a", 1),
                 lambda: store.create(flat_record(1)), lambda: store.locate("j")):  # fmt: skip
        with pytest.raises(StoreError):
            call()
    assert time.monotonic() - started < 10


def test_a_restarted_redis_is_used_again(tmp_path: Any) -> None:
    server = LocalRedis(tmp_path).start()
    try:
        store = store_from_url(server.url, timeout=2.0)
        record = flat_record(2)
        store.create(record)
        assert store.begin(record.id, "s0", 1).decision == "run"
        server.stop()
        with pytest.raises(StoreError):
            store.settle(record.id, "s0", "completed")
        server.start()
        # The pooled connection died with the old server: retried once, transparently.
        assert store.settle(record.id, "s0", "completed").applied
        assert store.settle(record.id, "s1", "completed").finish is not None
        store.close()
    finally:
        server.remove()


def test_a_ready_client_without_a_socket_timeout_gets_the_store_timeout() -> None:
    """A hung Redis must not block a hook forever: a ready client with no socket timeout
    of its own is used with the store's."""
    with SilentRedis() as server:
        client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=None)
        store = store_from_url(client, timeout=0.5)  # type: ignore[arg-type]
        started = time.monotonic()
        with pytest.raises(StoreError):
            store.load("x")
        assert time.monotonic() - started < 3
        store.close()
        client.close()


def ready_client(backend: str, **options: Any) -> Any:
    """A client made by the user (bytes replies), to the shared Redis or the cluster."""
    if backend == "single":
        return redis.Redis(host="127.0.0.1", port=6379, db=11, **options)
    return RedisCluster(host="127.0.0.1", port=unit_cluster().ports[0], **options)


def socket_timeouts(client: Any) -> set[float | None]:
    if isinstance(client, RedisCluster):
        pools = [n.redis_connection.connection_pool for n in client.get_nodes()]  # type: ignore[no-untyped-call]
    else:
        pools = [client.connection_pool]
    return {pool.connection_kwargs.get("socket_timeout") for pool in pools}


def use_ready_client_store(store: RedisStore) -> None:
    prefix = unique_prefix()
    store.key_prefix = prefix
    record = flat_record(1)
    store.create(record)
    assert store.load(record.id).steps["s0"].job_id == record.steps["s0"].job_id
    assert store.settle(record.id, "s0", "completed", has_result=True, result=[1]).finish
    assert store.results(record.id, ["s0"]) == {"s0": [1]}
    _delete_prefix(store, prefix)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_ready_client_with_a_timeout_is_the_stores_client(backend: str) -> None:
    client = ready_client(backend, socket_timeout=2.0)
    store = store_from_url(client, timeout=0.5)  # type: ignore[arg-type]
    assert isinstance(store, RedisStore) and store.client is client
    use_ready_client_store(store)
    store.close()  # not ours: left open
    assert client.ping()
    client.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_ready_client_without_a_timeout_is_copied_with_the_stores(backend: str) -> None:
    client = ready_client(backend, socket_timeout=None)
    store = store_from_url(client, timeout=0.5)  # type: ignore[arg-type]
    assert isinstance(store, RedisStore) and type(store.client) is type(client)
    assert store.client is not client and store.cluster == (backend == "cluster")
    assert socket_timeouts(store.client) == {0.5}
    assert socket_timeouts(client) == {None}  # the given client is left as it is
    use_ready_client_store(store)
    store.close()
    assert client.ping()
    client.close()


class UsersRedis(redis.Redis):
    """A client class of the user's own, defined outside the redis package."""


def test_a_ready_client_of_a_subclass_is_accepted() -> None:
    client = UsersRedis(host="127.0.0.1", port=6379, db=11, socket_timeout=2.0)
    store = store_from_url(client)  # type: ignore[arg-type]
    assert isinstance(store, RedisStore) and store.client is client
    use_ready_client_store(store)
    client.close()


def test_a_ready_client_in_the_app_config() -> None:
    client = redis.Redis.from_url("redis://127.0.0.1:6379/11", decode_responses=True)
    app = Celery(f"redis-client-{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.baton_store = client
    app.conf.baton_store_timeout = 0.5
    runtime = baton_celery.install(app)
    try:
        store = runtime.store
        assert isinstance(store, RedisStore) and socket_timeouts(store.client) == {0.5}
        assert store.client.ping()
    finally:
        baton_celery.uninstall(app)
    client.close()


def test_key_prefix_must_not_hold_a_hash_tag() -> None:
    with pytest.raises(ValueError, match="braces"):
        store_from_url("redis://127.0.0.1:6379/11?key_prefix=a{b}")


def test_dependency_results_reads_only_the_steps_dependencies(redis_store: RedisStore) -> None:
    memory = MemoryStore()
    wid = f"wf-{uuid.uuid4()}"
    steps = {
        "a": StepRecord("a", "t", f"{wid}/a", {}, dispatch=1),
        "none": StepRecord("none", "t", f"{wid}/n", {}, dispatch=1),
        "bad": StepRecord("bad", "t", f"{wid}/b", {}, dispatch=1),
        "other": StepRecord("other", "t", f"{wid}/o", {}, dispatch=1),
        "last": StepRecord("last", "t", f"{wid}/l", {}, deps=("a", "none", "bad", "a")),
    }
    for store in (memory, redis_store):
        store.create(
            WorkflowRecord(wid, None, {n: dataclasses.replace(s) for n, s in steps.items()})
        )
        store.settle(wid, "a", "completed", has_result=True, result={"rows": [1]})
        store.settle(wid, "none", "completed")
        store.settle(wid, "bad", "discarded", error="E")
        store.settle(wid, "other", "completed", has_result=True, result="not a dependency")
    expected = {"a": {"rows": [1]}, "none": None}
    assert memory.dependency_results(wid, "last") == expected
    assert redis_store.dependency_results(wid, "last") == expected
    assert redis_store.dependency_results(wid, "a") == {}


def test_a_transition_too_big_for_the_channel_is_read_from_the_store() -> None:
    """A cancel of a big workflow makes one channel message with every cancelled step:
    over the listener's size bound, it is dropped, and the workflow's events are read
    from the store instead (none lost, none twice)."""
    from baton_celery.testing import EventLog

    prefix = unique_prefix()
    app = Celery(f"big-{prefix}", set_as_current=False)
    app.conf.update(broker_url="memory://", baton_store=shared_redis_url(prefix), baton_bridge=True)
    runtime = baton_celery.install(app)
    try:
        record = flat_record(60)
        runtime.store.create(record)
        got = EventLog()
        with baton_celery.listen(app, deliver=got.add, max_message=2000) as listener:
            assert listener.ready
            handle = baton_celery.WorkflowHandle(record.id, app)
            handle.cancel()
            got.wait_finished(timeout=10)
            assert listener.malformed == 1
        assert list(got) == handle.events() and len(got) == 61
    finally:
        baton_celery.uninstall(app)


def test_active_since_keeps_the_running_and_the_newest_finished_within_its_bound(
    redis_store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its bound, the activity query keeps what a replay needs most: every running
    workflow, then the most recently finished."""
    import baton_celery.stores.redis_index as module

    label = f"bound-{uuid.uuid4().hex[:6]}"
    finished, running = [], flat_record(1)
    for _ in range(4):
        record = flat_record(1)
        record.label = label
        redis_store.create(record)
        redis_store.settle(record.id, "s0", "completed")
        finished.append(record.id)
    running.label = label
    redis_store.create(running)
    monkeypatch.setattr(module, "SCAN_LIMIT", 3)
    since = redis_store.summary(finished[0]).finished_at
    assert since is not None
    found = {s.id for s in redis_store.workflows(label=label, active_since=since)}
    assert found == {running.id, finished[3], finished[2]}
