"""Settles sent to Redis without waiting for their replies (``Store.run_unanswered``):
the replies are read in order, by the next send, the watchdog's tick or a pool process
on its way out; one lost with its connection (a Redis restart) is sent again. On real
Redis servers: the shared one, and one of the test's own that it restarts."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, signals
from celery.exceptions import SoftTimeLimitExceeded
from redis_servers import SHARED_REDIS_URL, LocalRedis, shared_redis_url, unique_prefix

import baton_celery
from baton_celery import running
from baton_celery.events import StepUpdated
from baton_celery.stores import StoreError, UnknownWorkflow, store_from_url
from baton_celery.stores.records import StepRecord, Transition, WorkflowRecord
from baton_celery.stores.redis import RedisStore
from baton_celery.stores.redis_unanswered import packed


def flat(*names: str) -> WorkflowRecord:
    wid = uuid.uuid4().hex
    steps = {
        n: StepRecord(name=n, task=f"t.{n}", job_id=f"{wid}:{n}", signature={}, dispatch=1)
        for n in names
    }
    return WorkflowRecord(id=wid, label=None, steps=steps, created_at=0.0)


def redis_store(url: str) -> RedisStore:
    store = store_from_url(url)
    assert isinstance(store, RedisStore)
    return store


def started(store: RedisStore, *names: str) -> WorkflowRecord:
    """A workflow of step ``a`` and ``names``, with ``a`` settled: the run script has run
    once on this store, so the next settles can go without waiting."""
    record = flat("a", *names)
    store.create(record)
    store.run(record.id, "a", 1, 0.0, "completed")
    return record


def settled(out: Transition) -> list[tuple[str, str]]:
    return [(e.step_name, e.state) for e in out.events if isinstance(e, StepUpdated)]


def ran(*names: str) -> list[list[tuple[str, str]]]:
    """What the replies of these steps' settles say, in order: each ran and completed."""
    return [[(n, "executing"), (n, "completed")] for n in names]


@pytest.fixture
def own() -> Iterator[RedisStore]:
    """A store on the shared Redis."""
    store = redis_store(shared_redis_url())
    yield store
    store.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalRedis]:
    """A Redis server of the test's own, to restart, kill or pause."""
    server = LocalRedis(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def store(server: LocalRedis) -> Iterator[RedisStore]:
    """A store on the test's own Redis server."""
    store = redis_store(f"{server.url}?key_prefix=unanswered")
    yield store
    store.close()


def test_a_settle_sent_before_a_restart_is_sent_again(
    server: LocalRedis, store: RedisStore
) -> None:
    """Redis restarts (its connections closed, its scripts gone) while a settle's reply
    waits: the settle is sent again and applies once; the next ones go out as before."""
    record = started(store, "b", "c", "d")
    answers: list[Transition] = []
    store.run_unanswered(answers.append, record.id, "b", 1, 0.0, "completed")
    assert store._unanswered is not None and store._unanswered.waiting() == 1
    server.stop()
    server.start()
    store.run_unanswered(answers.append, record.id, "c", 1, 0.0, "completed")
    store.run_unanswered(answers.append, record.id, "d", 1, 0.0, "completed")
    store.collect()
    steps = store.load(record.id).steps
    assert {n: s.state for n, s in steps.items()} == dict.fromkeys("abcd", "completed")
    # b applied before the restart: its reply, lost with the connection, is not
    # known (its second sending changed nothing and is not handed on), or it was
    # read in time. Each settle applied once, and the replies come in order.
    got = [settled(out) for out in answers]
    assert got[-2:] == ran("c", "d")
    assert got[:-2] in ([], ran("b"))
    assert [e.seq for e in store.history(record.id)] == list(range(1, 10))


def test_a_settle_whose_reply_never_came_is_sent_again(
    server: LocalRedis, store: RedisStore
) -> None:
    """Redis dies with a settle queued and not run (its clients paused): the reply is
    lost with the connection, the settle is sent again and applies once."""
    record = started(store, "b", "c")
    answers: list[Transition] = []
    store.run_unanswered(answers.append, record.id, "b", 1, 0.0, "completed")
    store.collect()  # b's connection is up and its reply read
    server.client().client_pause(10_000, all=True)
    store.run_unanswered(answers.append, record.id, "c", 1, 0.0, "completed")
    server.kill()
    server.start()
    store.collect()
    assert store.load(record.id).steps["c"].state == "completed"
    assert [settled(out) for out in answers] == ran("b", "c")
    assert [e.seq for e in store.history(record.id)] == list(range(1, 8))


def test_a_settle_refused_for_a_lost_script_is_sent_again(store: RedisStore) -> None:
    """Redis forgot the script (SCRIPT FLUSH, as after a restart): the settle sent
    without waiting is refused, then sent again with the script, and applies once."""
    record = started(store, "b", "c")
    store.client.script_flush()
    answers: list[Transition] = []
    store.run_unanswered(answers.append, record.id, "b", 1, 0.0, "completed")
    store.run_unanswered(answers.append, record.id, "c", 1, 0.0, "completed")
    store.collect()
    assert [settled(out) for out in answers] == ran("b", "c")
    assert [e.seq for e in store.history(record.id)] == list(range(1, 8))


def _cut_short(signum: int, frame: Any) -> None:
    raise SoftTimeLimitExceeded("soft time limit")


def test_a_settle_whose_read_was_cut_short_is_sent_again(
    server: LocalRedis, store: RedisStore
) -> None:
    """A soft time limit lands while the task's thread reads a reply (Redis is slow: its
    clients paused): the connection goes with every reply on it, the settles waiting
    there are sent again, each applies once, and later replies are not mismatched."""
    unanswered = store._unanswered
    assert unanswered is not None
    record = started(store, "b", "c", "d")
    answers: list[Transition] = []
    store.run_unanswered(answers.append, record.id, "b", 1, 0.0, "completed")
    store.collect()  # b's connection is up and its reply read
    server.client().client_pause(1500, all=True)
    store.run_unanswered(answers.append, record.id, "c", 1, 0.0, "completed")
    previous = signal.signal(signal.SIGALRM, _cut_short)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(SoftTimeLimitExceeded):
            unanswered.collect()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert unanswered.waiting() == 0
    store.collect()  # c is handed back as lost and sent again (after the pause)
    store.run_unanswered(answers.append, record.id, "d", 1, 0.0, "completed")
    store.collect()
    assert [settled(out) for out in answers] == ran("b", "c", "d")
    assert answers[-1].finish is not None
    assert [e.seq for e in store.history(record.id)] == list(range(1, 10))


def test_a_settle_that_cannot_be_sent_is_logged_and_never_raises(
    server: LocalRedis, store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis is gone: a settle sent without waiting fails to go out, is tried once the
    usual way, and is logged (the backstop settles the step); the task sees nothing."""
    record = started(store, "b", "c")
    server.stop()
    answers: list[Transition] = []
    with caplog.at_level(logging.WARNING, logger="baton_celery"):
        store.run_unanswered(answers.append, record.id, "b", 1, 0.0, "completed")
    assert answers == []
    assert store._unanswered is not None and store._unanswered.waiting() == 0
    [warning] = [r.getMessage() for r in caplog.records if "sent without" in r.getMessage()]
    assert "'b'" in warning and record.id in warning and "backstop" in warning


def test_a_settle_without_a_connection_of_its_own_goes_the_usual_way() -> None:
    """A ready client whose pool is full (one connection, the store's): the settle
    cannot have a connection of its own, so it is sent the usual way, and answered."""
    client = redis.Redis.from_url(SHARED_REDIS_URL, max_connections=1, socket_timeout=5)
    store = RedisStore(client, key_prefix=unique_prefix())
    try:
        record = started(store, "b")
        answers: list[Transition] = []
        store.run_unanswered(answers.append, record.id, "b", 1, 0.0, "completed")
        assert [settled(out) for out in answers] == ran("b")
        assert answers[0].finish is not None
    finally:
        store.close()
        client.close()


def test_packed_commands_are_what_redis_py_would_send() -> None:
    command = ("EVALSHA", "f00d", 1, "baton:{w}:m", "étape ✓", b"\xff\x00 raw", 7, 0.125, "")
    assert packed(command) == b"".join(redis.Connection().pack_command(*command))


def test_a_settle_sent_without_waiting_keeps_every_character(own: RedisStore) -> None:
    """The settle goes out packed by the store itself (not redis-py's packer): names,
    results and errors beyond ASCII arrive as they were, and the reply is the usual one."""
    record = started(own, "étape ✓", "b")
    answers: list[Transition] = []
    own.run_unanswered(answers.append, record.id, "étape ✓", 1, 0.25, "discarded",
                       error="échec — ✗ 失败")  # fmt: skip
    own.run_unanswered(answers.append, record.id, "b", 7, 0.0, "completed",
                       has_result=True, result={"clé": ["ü", 1.5]})  # fmt: skip
    own.collect()
    steps = own.load(record.id).steps
    assert steps["étape ✓"].state == "discarded"
    assert steps["étape ✓"].error == "échec — ✗ 失败"
    assert steps["b"].dispatch == 7
    assert own.results(record.id, ["b"])["b"] == {"clé": ["ü", 1.5]}
    assert [settled(out) for out in answers] == [
        [("étape ✓", "executing"), ("étape ✓", "discarded")],
        *ran("b"),
    ]


def _child_collects(store: RedisStore, out: Any) -> None:
    answers: list[Any] = store._unanswered.collect() if store._unanswered else []
    out.put(len(answers))


def forked_child_collects(store: RedisStore) -> None:
    """A child forked now reads no reply of its parent's, and exits."""
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_child_collects, args=(store, out))
    child.start()
    assert out.get(timeout=20) == 0
    child.join(20)
    assert child.exitcode == 0


def test_a_forked_child_does_not_read_its_parents_replies(own: RedisStore) -> None:
    record = started(own, "b")
    answers: list[Transition] = []
    own.run_unanswered(answers.append, record.id, "b", 1, 0.0, "completed")
    forked_child_collects(own)
    own.collect()
    assert [settled(a) for a in answers] == ran("b")


def test_a_child_forked_while_another_thread_read_makes_its_own_lock(own: RedisStore) -> None:
    """A task forks while the watchdog's thread holds the lock (reading replies): the
    child's exit hook must not wait for a lock no thread of its own will release."""
    unanswered = own._unanswered
    assert unanswered is not None
    unanswered._here().acquire()  # another thread of the parent, mid-read
    try:
        forked_child_collects(own)
    finally:
        unanswered._here().release()


@pytest.fixture
def installed() -> Any:
    app = Celery(f"unanswered-{uuid.uuid4().hex[:8]}", set_as_current=False)
    app.conf.baton_store = shared_redis_url()
    runtime = baton_celery.install(app)
    yield runtime
    baton_celery.uninstall(app)


def test_the_watchdog_and_a_process_on_its_way_out_read_the_replies(installed: Any) -> None:
    store = installed.store
    record = started(store, "b", "c")
    read = threading.Event()
    answers: list[Transition] = []

    def answered(out: Transition) -> None:
        answers.append(out)
        read.set()

    # The watchdog's tick (it runs once a fast-path run started in this process).
    store.run_unanswered(answered, record.id, "b", 1, 0.0, "completed")
    running.collect_later(store)
    run = running.start(running.StepRef(installed, record.id, "x", 1))
    running.close(run)
    assert read.wait(10), "the watchdog did not read the reply"
    # A pool process on its way out (Celery's worker_process_shutdown, in that process).
    store.run_unanswered(answers.append, record.id, "c", 1, 0.0, "completed")
    signals.worker_process_shutdown.send(sender=None, pid=0, exitcode=0)
    assert store._unanswered.waiting() == 0
    assert [settled(a)[-1] for a in answers] == [("b", "completed"), ("c", "completed")]
    assert answers[-1].finish is not None


# --- a run whose reply its sender waits for (a step with dependents) ------------------


def sequence(store: RedisStore) -> WorkflowRecord:
    """``a`` settled (the run script loaded) and ``y`` settled without waiting (the
    store's own connection open), then ``b`` → ``c``, and a leaf ``x``."""
    wid = uuid.uuid4().hex

    def step(name: str, *deps: str) -> StepRecord:
        return StepRecord(name=name, task=f"t.{name}", job_id=f"{wid}:{name}", signature={},
                          deps=deps, dispatch=0 if deps else 1)  # fmt: skip

    record = WorkflowRecord(id=wid, label=None, created_at=0.0, steps={
        "a": step("a"), "b": step("b"), "c": step("c", "b"), "x": step("x"),
        "y": step("y")})  # fmt: skip
    store.create(record)
    store.run(record.id, "a", 1, 0.0, "completed")
    store.run_unanswered(lambda out: None, record.id, "y", 1, 0.0, "completed")
    store.collect()
    return record


def test_a_waited_run_goes_on_the_stores_own_connection_after_the_unanswered(
    own: RedisStore,
) -> None:
    """A run that waits goes out after the settles sent without waiting, on the same
    connection: their replies are read with its own and handed on first."""
    record = sequence(own)
    answers: list[Transition] = []
    own.run_unanswered(answers.append, record.id, "x", 1, 0.0, "completed")
    out = own.run(record.id, "b", 1, 0.0, "completed")
    assert [settled(a) for a in answers] == ran("x")
    assert settled(out) == ran("b")[0]
    assert [(r.name, r.dispatch, r.leaf) for r in out.released] == [("c", 1, True)]
    assert own._unanswered is not None and own._unanswered.waiting() == 0


def test_a_waited_run_refused_for_a_lost_script_hands_on_the_second(
    store: RedisStore,
) -> None:
    """Redis forgot the script: the run is sent again the usual way, and its caller gets
    that reply, the step it released with it."""
    record = sequence(store)
    store.client.script_flush()
    out = store.run(record.id, "b", 1, 0.0, "completed")
    assert settled(out) == ran("b")[0]
    assert [r.name for r in out.released] == ["c"]


def test_a_waited_run_sent_again_hands_on_what_changed_nothing(store: RedisStore) -> None:
    """The second sending of a run that waits is handed on even when it changed nothing
    (a settle sent without waiting would be dropped then): its caller needs an answer,
    here that the step had already settled."""
    record = sequence(store)
    store.run(record.id, "b", 1, 0.0, "completed")
    store.client.script_flush()
    out = store.run(record.id, "b", 1, 0.0, "completed")
    assert not out.applied and out.released == [] and list(out.events) == []


def test_a_waited_run_that_cannot_be_sent_raises_a_store_error(
    server: LocalRedis, store: RedisStore
) -> None:
    record = sequence(store)
    server.stop()
    with pytest.raises(StoreError, match="ConnectionError"):
        store.run(record.id, "b", 1, 0.0, "completed")


def test_a_waited_run_of_an_unknown_workflow_says_so(own: RedisStore) -> None:
    """On the store's own connection as through redis-py: an unknown workflow (or one
    past its retention) is UnknownWorkflow, an unknown step a KeyError."""
    record = sequence(own)
    with pytest.raises(UnknownWorkflow):
        own.run(uuid.uuid4().hex, "b", 1, 0.0, "completed")
    with pytest.raises(KeyError):
        own.run(record.id, "nope", 1, 0.0, "completed")


def test_a_waited_run_does_not_wait_for_another_threads_round_trip(own: RedisStore) -> None:
    """Another thread holds the store's own connection (its run's reply on the way): the
    run goes through redis-py's pool at once instead of queueing behind it."""
    record = sequence(own)
    unanswered = own._unanswered
    assert unanswered is not None
    answers: list[Transition] = []
    own.run_unanswered(answers.append, record.id, "x", 1, 0.0, "completed")
    outs: list[Transition] = []
    with unanswered._here():  # the other thread, mid-call
        task = threading.Thread(
            target=lambda: outs.append(own.run(record.id, "b", 1, 0.0, "completed"))
        )
        task.start()
        task.join(10)
        assert not task.is_alive(), "the run waited for the other thread's round trip"
    assert [r.name for r in outs[0].released] == ["c"]
    assert answers == [] and unanswered.waiting() == 1  # x's reply is still to be read
    own.collect()
    assert [settled(a) for a in answers] == ran("x")


def test_a_waited_run_cut_short_leaves_nothing_for_another_to_send(
    server: LocalRedis, store: RedisStore
) -> None:
    """A soft time limit lands while the task's thread waits for its run's reply: the
    exception reaches the task's thread, and the run is not handed to whoever reads the
    connection next (its released steps would be lost there)."""
    unanswered = store._unanswered
    assert unanswered is not None
    record = sequence(store)
    server.client().client_pause(1500, all=True)
    previous = signal.signal(signal.SIGALRM, _cut_short)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(SoftTimeLimitExceeded):
            store.run(record.id, "b", 1, 0.0, "completed")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert unanswered.waiting() == 0
    assert unanswered.collect() == []


def test_every_transition_once_loaded_goes_after_the_unanswered(own: RedisStore) -> None:
    """A begin (like every transition, once its script ran here) goes on the store's own
    connection after the settles sent without waiting, so Redis runs them in that order:
    here the begin of a step that a settle sent before it released finds it released."""
    record = sequence(own)
    own.begin(record.id, "x", 1)  # the begin script has run once here
    answers: list[Transition] = []
    own.run_unanswered(answers.append, record.id, "b", 1, 0.0, "completed")
    out = own.begin(record.id, "c", 1)
    assert [settled(a) for a in answers] == ran("b")
    assert out.decision == "run" and settled(out) == [("c", "executing")]
    assert own._unanswered is not None and own._unanswered.waiting() == 0


TRANSITIONS = {
    "begin": lambda store, wid: store.begin(wid, "x", 1),
    "retrying": lambda store, wid: store.retrying(wid, "x", "E: x"),
    "settle": lambda store, wid: store.settle(wid, "x", "discarded", error="E: x"),
    "cancel": lambda store, wid: store.cancel(wid),
}


def loaded_everywhere(store: RedisStore) -> WorkflowRecord:
    """A workflow whose step ``x`` is executing, on a store whose own connection is open
    and which has run every transition script once."""
    other = sequence(store)
    store.begin(other.id, "x", 1)
    store.retrying(other.id, "x", None)
    store.settle(other.id, "x", "completed")
    store.cancel(other.id)
    record = sequence(store)
    store.begin(record.id, "x", 1)
    return record


@pytest.mark.parametrize("name", list(TRANSITIONS))
def test_a_transition_refused_for_a_lost_script_applies_once(store: RedisStore, name: str) -> None:
    """On the store's own connection, Redis having forgotten the script: sent again the
    usual way, applied once, and its reply is the caller's."""
    record = loaded_everywhere(store)
    before = len(store.history(record.id))
    store.client.script_flush()
    out = TRANSITIONS[name](store, record.id)
    assert out.applied
    history = store.history(record.id)
    assert [e.seq for e in history] == list(range(1, len(history) + 1))
    assert len(history) == before + len(out.events)


@pytest.mark.parametrize("name", list(TRANSITIONS))
def test_a_transition_of_an_unknown_workflow_says_so(own: RedisStore, name: str) -> None:
    loaded_everywhere(own)
    with pytest.raises(UnknownWorkflow):
        TRANSITIONS[name](own, uuid.uuid4().hex)


def test_a_transition_in_a_process_that_sends_nothing_unanswered_keeps_to_the_pool(
    own: RedisStore,
) -> None:
    """A process that never sent a settle without waiting (a web app's cancels, the
    backstop) opens no connection of the store's own: its transitions go through the
    client's pool, with its health checks and retry policy."""
    record = flat("a", "b")
    own.create(record)
    for name in "ab":
        own.run(record.id, name, 1, 0.0, "completed")
    assert own._unanswered is not None and own._unanswered._connection is None


def test_a_workers_transitions_open_the_stores_own_connection(own: RedisStore) -> None:
    """In a worker (worker_init tells the store it serves tasks, before the pool forks),
    a transition opens the store's own connection once its script ran: a worker that
    runs only steps with dependents, or gated ones, takes that path too."""
    own.serves_tasks()
    record = flat("a", "b")
    own.create(record)
    own.run(record.id, "a", 1, 0.0, "completed")  # through the pool: EVAL loads the script
    assert own._unanswered is not None and own._unanswered._connection is None
    out = own.run(record.id, "b", 1, 0.0, "completed")
    assert own._unanswered._connection is not None
    assert out.finish is not None and settled(out) == ran("b")[0]


def test_worker_init_tells_the_store_it_serves_tasks(installed: Any) -> None:
    signals.worker_init.send(
        sender=type("Worker", (), {"app": installed.app, "pool_cls": "prefork"})()
    )
    assert installed.store._unanswered.opens_on_call
