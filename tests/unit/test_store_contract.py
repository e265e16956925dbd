"""The store contract, one suite for every backend.

Adding a backend (the Redis store is coming) is one line in ``STORE_URLS``: its URL, with
``shared=True`` when every process of a host sees the same state (that adds it to the
multi-process race). In a URL, ``{tmp}`` stands for the test's own tmp_path; a backend
whose URL must be computed (a server's port, a fresh key prefix) gives a function of
tmp_path instead, and a ``name`` for the test ids.
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import queue
import sqlite3
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from redis_servers import shared_redis_url, unique_prefix, unit_cluster  # see conftest.py

from baton_celery.events import StepUpdated, WorkflowFinished
from baton_celery.stores import Store, StoreError, UnknownWorkflow, store_from_url
from baton_celery.stores.records import (
    RUN,
    SKIP,
    SNOOZE,
    StepRecord,
    Transition,
    WorkflowRecord,
)


@dataclasses.dataclass(frozen=True)
class Backend:
    url: str | Callable[[Path], str]  # "{tmp}": the test's tmp_path
    shared: bool  # every process of one host sees the same state
    name: str = ""  # test id; defaults to the URL's scheme

    def make_url(self, tmp: Path) -> str:
        return self.url(tmp) if callable(self.url) else self.url.format(tmp=tmp)

    @property
    def id(self) -> str:
        return self.name or str(self.url).split(":", 1)[0]


# ---- the list: one line per backend --------------------------------------------------
STORE_URLS = [
    Backend("memory://", shared=False),
    Backend("sqlite:///{tmp}/contract.sqlite3", shared=True),
    Backend(lambda tmp: shared_redis_url(), shared=True, name="redis"),
    Backend(lambda tmp: f"{unit_cluster().url}?key_prefix={unique_prefix()}", True, "cluster"),
]
# --------------------------------------------------------------------------------------

SHARED = [b for b in STORE_URLS if b.shared]


def backend_id(backend: Backend) -> str:
    return backend.id


@pytest.fixture(params=STORE_URLS, ids=backend_id)
def backend(request: pytest.FixtureRequest) -> Backend:
    chosen: Backend = request.param
    return chosen


@pytest.fixture
def store_url(backend: Backend, tmp_path: Path) -> str:
    return backend.make_url(tmp_path)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    made = store_from_url(store_url, timeout=5.0)
    yield made
    made.close()


def new_id() -> str:
    return f"wf-{uuid.uuid4()}"


def make_record(
    *steps: tuple[str, tuple[str, ...]], workflow_id: str | None = None
) -> WorkflowRecord:
    wid = workflow_id or new_id()
    made = {
        name: StepRecord(
            name=name,
            task=f"tasks.{name}",
            job_id=f"{wid}:{name}",
            signature={
                "task": f"tasks.{name}",
                "args": [1, "x"],
                "kwargs": {"k": [1, 2]},
                "options": {"queue": "q"},
            },
            deps=deps,
            dispatch=0 if deps else 1,
        )
        for name, deps in steps
    }
    return WorkflowRecord(wid, "contract", made)


def changes(out: Transition) -> list[tuple[str, str, int]]:
    """The step events a transition made: (step, state, attempt), in order."""
    return [(e.step_name, e.state, e.attempt) for e in out.events if isinstance(e, StepUpdated)]


def flat(n: int) -> WorkflowRecord:
    return make_record(*[(f"s{i:02d}", ()) for i in range(n)])


# --- create / load / locate ---------------------------------------------------------


def test_create_then_load_returns_the_same_record(store: Store) -> None:
    record = make_record(("a", ()), ("b", ("a",)), ("c", ("a", "b")))
    store.create(record)
    loaded = store.load(record.id)
    assert loaded == record
    assert list(loaded.steps) == ["a", "b", "c"]
    assert loaded.steps["c"].deps == ("a", "b")
    assert loaded.steps["a"].signature["kwargs"] == {"k": [1, 2]}


def test_load_returns_a_copy(store: Store) -> None:
    record = make_record(("a", ()))
    store.create(record)
    record.steps["a"].state = "completed"  # the caller's object is not the stored one
    loaded = store.load(record.id)
    assert loaded.steps["a"].state == "pending"
    loaded.steps["a"].state = "discarded"
    assert store.load(record.id).steps["a"].state == "pending"


def test_create_refuses_an_existing_id_and_keeps_the_first(store: Store) -> None:
    wid = new_id()
    first = make_record(("a", ()), workflow_id=wid)
    store.create(first)
    second = make_record(("other", ()), workflow_id=wid)
    second.steps["other"].job_id = "job-of-the-refused-record"
    with pytest.raises(ValueError, match="already exists"):
        store.create(second)
    assert list(store.load(wid).steps) == ["a"]
    assert store.locate("job-of-the-refused-record") is None


def test_create_is_all_or_nothing(store: Store) -> None:
    """A record that cannot be stored (here: a value neither JSON nor copyable) leaves
    nothing behind: no workflow, no job index entry."""
    record = make_record(("a", ()), ("b", ("a",)))
    record.steps["b"].signature = {"args": [threading.Lock()]}
    with pytest.raises((TypeError, ValueError, StoreError)):
        store.create(record)
    with pytest.raises(UnknownWorkflow):
        store.load(record.id)
    assert store.locate(record.steps["a"].job_id) is None
    assert store.locate(record.steps["b"].job_id) is None
    store.create(make_record(("a", ()), workflow_id=record.id))  # the id is still free


def test_locate_finds_the_workflow_and_step_of_a_job(store: Store) -> None:
    one = make_record(("a", ()), ("b", ("a",)))
    two = make_record(("a", ()))
    store.create(one)
    store.create(two)
    assert store.locate(one.steps["b"].job_id) == (one.id, "b")
    assert store.locate(two.steps["a"].job_id) == (two.id, "a")
    assert store.locate("no-such-job") is None


@pytest.mark.parametrize(
    "operation",
    ["load", "begin", "retrying", "settle", "cancel", "results"],
)
def test_unknown_workflow_raises_unknown_workflow(store: Store, operation: str) -> None:
    calls: dict[str, Any] = {
        "load": lambda w: store.load(w),
        "begin": lambda w: store.begin(w, "a", 1),
        "retrying": lambda w: store.retrying(w, "a", "E"),
        "settle": lambda w: store.settle(w, "a", "completed"),
        "cancel": lambda w: store.cancel(w),
        "results": lambda w: store.results(w, ["a"]),
    }
    store.create(make_record(("a", ())))  # another workflow exists
    with pytest.raises(UnknownWorkflow) as caught:
        calls[operation]("never-created")
    assert isinstance(caught.value, KeyError)


# --- transitions, persisted ---------------------------------------------------------


def test_transitions_are_persisted(store: Store) -> None:
    record = make_record(("a", ()), ("b", ("a",)))
    store.create(record)
    assert store.begin(record.id, "b", 0).decision == SNOOZE
    gate = store.begin(record.id, "a", 1)
    assert gate.decision == RUN and gate.dispatch == 1
    assert changes(gate) == [("a", "executing", 1)]
    out = store.retrying(record.id, "a", "ValueError: once")
    assert out.applied and changes(out) == [("a", "retryable", 1)]
    assert store.load(record.id).steps["a"].error == "ValueError: once"
    assert changes(store.begin(record.id, "a", 1)) == [("a", "executing", 2)]
    out = store.settle(record.id, "a", "completed", has_result=True, result={"n": [1, 2]})
    assert out.applied
    assert [(s.name, s.job_id, s.dispatch) for s in out.released] == [("b", f"{record.id}:b", 1)]
    assert out.released[0].signature == record.steps["b"].signature
    loaded = store.load(record.id)
    assert loaded.steps["a"].state == "completed"
    assert loaded.steps["a"].attempt == 2
    assert loaded.steps["b"].dispatch == 1
    assert store.begin(record.id, "b", 0).decision == SKIP  # stale dispatch
    assert store.begin(record.id, "b", 1).decision == RUN
    fin = store.settle(record.id, "b", "completed")
    assert fin.finish is not None and fin.finish.outcome == "completed"
    done = store.load(record.id)
    assert done.outcome == "completed"
    assert done.finished_at == fin.finish.finished_at


def test_run_is_a_begin_and_a_settle_in_one_transition(store: Store) -> None:
    """The fast path's transition: both events in one, the executing one stamped when
    the body started (never before the workflow's latest event), the dependents
    released, the finish claimed; a gate that does not say "run" settles nothing."""
    record = make_record(("a", ()), ("b", ("a",)), ("c", ()))
    record.created_at -= 60
    store.create(record)
    out = store.run(record.id, "c", 1, 0.25, "discarded", error="E: c")
    assert out.applied and out.decision == RUN and out.dispatch == 1
    assert changes(out) == [("c", "executing", 1), ("c", "discarded", 1)]
    executing, discarded = out.events
    assert 0.2 <= (discarded.timestamp - executing.timestamp).total_seconds() <= 5.0
    out = store.run(record.id, "a", 1, 3600.0, "completed", has_result=True, result=[7])
    assert changes(out) == [("a", "executing", 1), ("a", "completed", 1)]
    assert out.events[0].timestamp == discarded.timestamp  # not before the latest event
    assert [(s.name, s.leaf) for s in out.released] == [("b", True)]
    assert store.history(record.id)[-2:] == list(out.events)
    assert store.results(record.id, ["a"]) == {"a": [7]}
    assert store.run(record.id, "b", 0, 0.0, "completed").decision == SKIP  # stale copy
    assert not store.run(record.id, "a", 1, 0.0, "completed").applied  # settled already
    latest = store.history(record.id)[-1].timestamp
    gate = store.begin(record.id, "b", 1, 3600.0)  # the watchdog's: the body ran for long
    assert changes(gate) == [("b", "executing", 1)]
    assert gate.events[0].timestamp == latest  # not before the latest event
    fin = store.run(record.id, "b", 1, 0.0, "completed")  # the watchdog's begin was lost
    assert changes(fin) == [("b", "executing", 2), ("b", "completed", 2)]
    assert fin.finish is not None and fin.finish.failed_steps == ("c",)
    assert [e.seq for e in store.history(record.id)] == list(range(1, 9))


def test_a_released_step_says_whether_a_step_depends_on_it(store: Store) -> None:
    """``Released.leaf`` (its message's header): a leaf's settle needs no reply."""
    record = make_record(("a", ()), ("b", ("a",)), ("c", ("b",)), ("d", ("a",)))
    store.create(record)
    out = store.run(record.id, "a", 1, 0.0, "completed")
    assert sorted((s.name, s.leaf) for s in out.released) == [("b", False), ("d", True)]
    out = store.run(record.id, "b", 1, 0.0, "completed")
    assert [(s.name, s.leaf) for s in out.released] == [("c", True)]


def test_run_unanswered_hands_its_reply_on_once(store: Store) -> None:
    """Sent without waiting or not, a run applies once, and its reply reaches
    ``answered`` once: by the next such call, or by ``collect``."""
    record = make_record(("a", ()), ("b", ()), ("c", ()))
    store.create(record)
    store.run(record.id, "a", 1, 0.0, "completed")  # the script ran here once
    answers: list[Transition] = []
    store.run_unanswered(answers.append, record.id, "b", 1, 0.0, "completed")
    store.run_unanswered(answers.append, record.id, "c", 1, 0.0, "discarded", error="E")
    store.collect()
    store.collect()
    assert [changes(out) for out in answers] == [
        [("b", "executing", 1), ("b", "completed", 1)],
        [("c", "executing", 1), ("c", "discarded", 1)],
    ]
    assert answers[1].finish is not None and answers[1].finish.failed_steps == ("c",)
    assert store.load(record.id).outcome == "failed"


def test_a_step_settles_once(store: Store) -> None:
    record = make_record(("a", ()), ("b", ()))
    store.create(record)
    store.begin(record.id, "a", 1)
    assert store.settle(record.id, "a", "discarded", error="E: 1").applied
    again = store.settle(record.id, "a", "completed", has_result=True, result=5)
    assert not again.applied
    assert again.finish is None
    loaded = store.load(record.id).steps["a"]
    assert (loaded.state, loaded.error, loaded.result) == ("discarded", "E: 1", None)


def test_cascade_and_failed_finish_through_the_store(store: Store) -> None:
    record = make_record(("c", ("b",)), ("b", ("a",)), ("a", ()))
    store.create(record)
    store.begin(record.id, "a", 1)
    out = store.settle(record.id, "a", "discarded", error="E")
    assert changes(out) == [("a", "discarded", 1), ("b", "cancelled", 0), ("c", "cancelled", 0)]
    assert out.finish is not None
    assert out.finish.failed_steps == ("c", "b", "a")  # added order
    loaded = store.load(record.id)
    assert loaded.outcome == "failed"
    assert loaded.steps["c"].error == "dependency 'b' was cancelled (failure began at 'a')"


def test_cancel_through_the_store(store: Store) -> None:
    record = make_record(("a", ()), ("b", ("a",)))
    store.create(record)
    store.begin(record.id, "a", 1)
    out = store.cancel(record.id)
    assert out.applied
    assert changes(out) == [("b", "cancelled", 0)]
    assert out.revoke == []  # b was not published yet: nothing to revoke
    assert store.load(record.id).cancel_requested
    assert not store.cancel(record.id).applied
    fin = store.settle(record.id, "a", "completed")
    assert fin.finish is not None and fin.finish.failed_steps == ("b",)


# --- history, index, annotations ---------------------------------------------------


def test_history_is_every_event_the_transitions_made_in_order(store: Store) -> None:
    record = make_record(("a", ()), ("b", ("a",)), ("c", ("b",)), ("d", ()))
    store.create(record)
    made: list[Any] = []
    made += store.begin(record.id, "b", 0).events  # snoozed
    made += store.begin(record.id, "a", 1).events
    made += store.retrying(record.id, "a", "E: once").events
    made += store.begin(record.id, "a", 1).events
    made += store.settle(record.id, "a", "discarded", error="E: twice").events  # b, c cancelled
    assert not store.settle(record.id, "a", "completed").events  # not applied: no event
    made += store.begin(record.id, "d", 1).events
    made += store.settle(record.id, "d", "completed", has_result=True, result=1).events
    history = store.history(record.id)
    assert history == made
    assert [e.seq for e in history] == list(range(1, len(made) + 1))
    assert [(e.step_name, e.state) for e in history if isinstance(e, StepUpdated)] == [
        ("b", "snoozed"), ("a", "executing"), ("a", "retryable"), ("a", "executing"),
        ("a", "discarded"), ("b", "cancelled"), ("c", "cancelled"), ("d", "executing"),
        ("d", "completed"),
    ]  # fmt: skip
    last = history[-1]
    assert isinstance(last, WorkflowFinished) and last.failed_steps == ("a", "b", "c")
    assert all(e.workflow_id == record.id and e.workflow_label == "contract" for e in history)
    stamps = [e.timestamp for e in history]
    assert stamps == sorted(stamps)  # never back in time
    assert store.history(record.id, after=7) == made[7:]
    assert store.history(record.id, after=len(made)) == []
    retried = [e for e in history if isinstance(e, StepUpdated) and e.state == "retryable"]
    assert retried[0].error == "E: once" and retried[0].job_id == f"{record.id}:a"
    assert retried[0].worker == "tasks.a"


def test_history_of_an_unknown_workflow_raises(store: Store) -> None:
    with pytest.raises(UnknownWorkflow):
        store.history(new_id())
    record = flat(1)
    store.create(record)
    assert store.history(record.id) == []  # known, nothing happened yet


def test_a_cascade_reason_is_cut_to_the_workflow_error_limit(store: Store) -> None:
    long = "é" * 80
    record = make_record((long, ()), ("b", (long,)))
    record.error_limit = 40
    store.create(record)
    out = store.settle(record.id, long, "discarded", error="E")
    [cancelled] = [e for e in out.events if isinstance(e, StepUpdated) and e.state == "cancelled"]
    assert cancelled.error is not None and len(cancelled.error) <= 40
    assert cancelled.error.startswith("dependency 'éé") and cancelled.error.endswith("[truncated]")
    assert store.load(record.id).steps["b"].error == cancelled.error


def test_workflows_lists_newest_first_with_filters_and_paging(store: Store) -> None:
    label = f"idx-{uuid.uuid4().hex[:8]}"
    records = []
    for i in range(5):
        record = make_record(("a", ()), ("b", ()))
        record.label = label
        record.created_at = 1_900_000_000.0 + i  # a future beyond every other test's
        store.create(record)
        records.append(record)
    store.settle(records[1].id, "a", "completed")
    store.settle(records[1].id, "b", "discarded", error="E")  # failed
    store.settle(records[3].id, "a", "completed")
    store.settle(records[3].id, "b", "completed")  # completed
    store.settle(records[4].id, "a", "completed")  # running, half done
    newest = store.workflows(label=label)
    assert [s.id for s in newest] == [r.id for r in reversed(records)]
    top = newest[0]
    assert (top.state, top.total, top.settled, top.label) == ("running", 2, 1, label)
    assert top.created_at == records[4].created_at and top.finished_at is None
    failed = next(s for s in newest if s.id == records[1].id)
    assert (failed.state, failed.failed_steps, failed.settled) == ("failed", ("b",), 2)
    assert failed.finished_at is not None and failed.seq == 3
    assert [s.id for s in store.workflows(label=label, limit=2)] == [records[4].id, records[3].id]
    page = store.workflows(label=label, limit=2, before=records[3].created_at)
    assert [s.id for s in page] == [records[2].id, records[1].id]
    assert [s.id for s in store.workflows(label=label, state="failed")] == [records[1].id]
    assert [s.id for s in store.workflows(label=label, state="completed")] == [records[3].id]
    running = store.workflows(label=label, state="running")
    assert [s.id for s in running] == [records[4].id, records[2].id, records[0].id]
    assert store.workflows(label=f"{label}-none") == []
    with pytest.raises(ValueError, match="state"):
        store.workflows(state="done")
    with pytest.raises(ValueError, match="limit"):
        store.workflows(limit=0)


def test_workflows_active_since_keeps_running_and_recently_finished(store: Store) -> None:
    label = f"active-{uuid.uuid4().hex[:8]}"
    old, running = make_record(("a", ())), make_record(("a", ()))
    for record in (old, running):
        record.label = label
        store.create(record)
    store.settle(old.id, "a", "completed")
    finished_at = store.load(old.id).finished_at
    assert finished_at is not None
    since = [s.id for s in store.workflows(label=label, active_since=finished_at)]
    assert sorted(since) == sorted([old.id, running.id])
    later = [s.id for s in store.workflows(label=label, active_since=finished_at + 1)]
    assert later == [running.id]


def test_annotations_are_kept_by_key(store: Store) -> None:
    record = flat(2)
    store.create(record)
    assert store.annotations(record.id, ["x"]) == {}
    store.annotate(record.id, {"x": "1", "y": "two"})
    store.annotate(record.id, {"x": "3"})
    assert store.annotations(record.id, ["x", "y", "z"]) == {"x": "3", "y": "two"}
    with pytest.raises(UnknownWorkflow):
        store.annotate(new_id(), {"x": "1"})
    with pytest.raises(UnknownWorkflow):
        store.annotations(new_id(), ["x"])


def test_results_returns_only_named_steps_that_completed_with_one(store: Store) -> None:
    record = make_record(("a", ()), ("none", ()), ("bad", ()), ("later", ()), ("other", ()))
    store.create(record)
    store.settle(record.id, "a", "completed", has_result=True, result={"rows": [1, 2]})
    store.settle(record.id, "none", "completed", has_result=False)
    store.settle(record.id, "bad", "discarded", error="E")
    store.settle(record.id, "other", "completed", has_result=True, result="not asked")
    assert store.results(record.id, ["a", "none", "bad", "later"]) == {"a": {"rows": [1, 2]}}
    assert store.results(record.id, []) == {}


def test_close_then_use_again(store: Store) -> None:
    record = make_record(("a", ()))
    store.create(record)
    store.close()
    assert store.load(record.id).id == record.id
    store.close()
    assert store.begin(record.id, "a", 1).decision == RUN


def test_shared_across_processes_flag(backend: Backend, store: Store) -> None:
    assert store.shared_across_processes is backend.shared


# --- concurrency --------------------------------------------------------------------


def test_threads_racing_to_settle_last_steps_finish_exactly_once(store: Store) -> None:
    workflows, width, threads = 20, 8, 8
    made = [flat(width) for _ in range(workflows)]
    for record in made:
        store.create(record)
    barrier = threading.Barrier(threads)
    results: queue.Queue[tuple[str, str, bool, bool]] = queue.Queue()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            barrier.wait(10)
            for record in made:
                for i in range(n, width, threads):  # each thread owns some steps...
                    name = f"s{i:02d}"
                    for attempt in range(2):  # ...and settles each twice (duplicates)
                        out = store.settle(
                            record.id, name, "completed", has_result=True, result=attempt
                        )
                        results.put((record.id, name, out.applied, out.finish is not None))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            store.close()

    running = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join(60)
    assert not errors
    assert not any(t.is_alive() for t in running)
    rows = [results.get_nowait() for _ in range(results.qsize())]
    assert len(rows) == workflows * width * 2
    finishes = [wid for wid, _, _, fin in rows if fin]
    assert sorted(finishes) == sorted(r.id for r in made)  # exactly one per workflow
    applied = [(wid, name) for wid, name, ok, _ in rows if ok]
    assert len(applied) == len(set(applied)) == workflows * width  # each step once
    for record in made:
        loaded = store.load(record.id)
        assert loaded.outcome == "completed"
        assert all(s.result == 0 for s in loaded.steps.values())


def _race_in_process(
    url: str,
    workflow_ids: list[str],
    names: list[str],
    barrier: Any,
    out: Any,
) -> None:
    """Runs in a child process: settle the given steps of every workflow, report each
    settlement as (workflow id, step, applied, won the finish)."""
    store = store_from_url(url, timeout=30.0)
    rows = []
    try:
        barrier.wait(60)
        for wid in workflow_ids:
            for name in names:
                settled = store.settle(wid, name, "completed")
                rows.append((wid, name, settled.applied, settled.finish is not None))
        out.put(("ok", os.getpid(), rows))
    except BaseException as exc:
        out.put(("error", os.getpid(), repr(exc)))
    finally:
        store.close()


@pytest.mark.parametrize("backend", SHARED, ids=backend_id, indirect=True)
def test_processes_racing_to_settle_last_steps_finish_exactly_once(
    store: Store, store_url: str
) -> None:
    processes, width, workflows = 4, 8, 20
    made = [flat(width) for _ in range(workflows)]
    for record in made:
        store.create(record)
    # Several processes settle the same workflows' steps at the same moment: two
    # processes per step, so every step is also settled twice (a duplicate).
    names = [f"s{i:02d}" for i in range(width)]
    halves = [names[0::2], names[1::2]]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    out = ctx.Queue()
    ids = [r.id for r in made]
    children = [
        ctx.Process(target=_race_in_process, args=(store_url, ids, halves[n % 2], barrier, out))
        for n in range(processes)
    ]
    for child in children:
        child.start()
    try:
        reports = [out.get(timeout=120) for _ in children]
    finally:
        for child in children:
            child.join(30)
    assert [r for r in reports if r[0] != "ok"] == []
    assert len({pid for _, pid, _ in reports}) == processes
    rows = [row for _, _, batch in reports for row in batch]
    assert len(rows) == workflows * width * 2
    finishes = sorted(wid for wid, _, _, fin in rows if fin)
    assert finishes == sorted(ids)  # exactly one Transition.finish per workflow
    applied = [(wid, name) for wid, name, ok, _ in rows if ok]
    assert len(applied) == len(set(applied)) == workflows * width
    for wid in ids:
        assert store.load(wid).outcome == "completed"


def test_processes_see_each_others_state(tmp_path: Path) -> None:
    """A record created in one process is settled in another and read back here."""
    for backend in SHARED:
        url = backend.make_url(tmp_path / backend.id)
        here = store_from_url(url, timeout=5.0)
        try:
            record = make_record(("only", ()))
            here.create(record)
            ctx = multiprocessing.get_context("spawn")
            barrier = ctx.Barrier(1)
            out = ctx.Queue()
            child = ctx.Process(
                target=_race_in_process, args=(url, [record.id], ["only"], barrier, out)
            )
            child.start()
            status, _, rows = out.get(timeout=60)
            child.join(30)
            assert status == "ok"
            assert rows == [(record.id, "only", True, True)]
            assert here.load(record.id).outcome == "completed"
        finally:
            here.close()


# --- store_from_url -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory", "must be a URL"),
        ("", "must be a URL"),
        (None, "must be a URL"),
        (42, "must be a URL"),
        ("/tmp/baton.sqlite3", "must be a URL"),
        ("mongodb://localhost/x", "unknown baton store scheme 'mongodb'"),
        ("sqllite:///x.sqlite3", "unknown baton store scheme"),
        ("sqlite://host/x.sqlite3", "takes no host"),
        ("sqlite://", "needs a file path"),
        ("sqlite:///", "needs a file path"),
    ],
)
def test_store_from_url_rejects_bad_urls(url: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        store_from_url(url)


def test_unknown_scheme_error_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as caught:
        store_from_url("cassandra://x")
    assert "memory://" in str(caught.value)
    assert "sqlite://" in str(caught.value)


def test_memory_urls_give_independent_stores() -> None:
    one, two = store_from_url("memory://"), store_from_url("memory://")
    record = make_record(("a", ()))
    one.create(record)
    with pytest.raises(UnknownWorkflow):
        two.load(record.id)


def test_sqlite_url_absolute_and_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absolute = tmp_path / "abs" / "deep" / "baton.sqlite3"
    store = store_from_url(f"sqlite:///{absolute}")
    store.create(make_record(("a", ())))
    store.close()
    assert absolute.is_file()  # missing directories are created

    monkeypatch.chdir(tmp_path)
    relative = store_from_url("sqlite:///rel/baton.sqlite3")
    relative.create(make_record(("a", ())))
    relative.close()
    assert (tmp_path / "rel" / "baton.sqlite3").is_file()


def test_sqlite_store_options_are_passed(tmp_path: Path) -> None:
    store = store_from_url(f"sqlite:///{tmp_path}/o.sqlite3", timeout=0.25, retention=60.0)
    assert getattr(store, "timeout", None) == 0.25
    assert getattr(store, "retention", None) == 60.0


# --- sqlite specifics ---------------------------------------------------------------


def test_sqlite_locked_file_raises_store_error_instead_of_hanging(tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite3"
    store = store_from_url(f"sqlite:///{path}", timeout=0.2)
    record = make_record(("a", ()))
    store.create(record)  # the schema exists, the store has its connection
    blocker = sqlite3.connect(str(path), timeout=0.2, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        for transition in (
            lambda: store.begin(record.id, "a", 1),
            lambda: store.settle(record.id, "a", "completed"),
            lambda: store.cancel(record.id),
            lambda: store.create(make_record(("x", ()))),
        ):
            started = time.monotonic()
            with pytest.raises(StoreError, match="locked"):
                transition()
            assert time.monotonic() - started < 3.0
        # Reads are not blocked by a writer (WAL).
        assert store.load(record.id).steps["a"].state == "pending"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # Nothing half-applied: the store works again once the lock is gone.
    assert store.begin(record.id, "a", 1).decision == RUN
    store.close()


def test_sqlite_lock_released_within_the_timeout_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "wait.sqlite3"
    store = store_from_url(f"sqlite:///{path}", timeout=10.0)
    record = make_record(("a", ()))
    store.create(record)
    blocker = sqlite3.connect(str(path), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    locked = threading.Event()
    result: list[str] = []

    def settle() -> None:
        locked.set()
        result.append(store.begin(record.id, "a", 1).decision)
        store.close()

    thread = threading.Thread(target=settle)
    thread.start()
    locked.wait(5)
    blocker.execute("ROLLBACK")
    blocker.close()
    thread.join(15)
    assert result == [RUN]
    store.close()


def test_sqlite_unusable_path_raises_store_error(tmp_path: Path) -> None:
    """A store that cannot be opened is a StoreError, as the Store contract says."""
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("not a directory")
    store = store_from_url(f"sqlite:///{not_a_dir}/baton.sqlite3", timeout=0.2)
    with pytest.raises(StoreError):
        store.create(make_record(("a", ())))
    with pytest.raises(StoreError):
        store.load("anything")


def test_sqlite_directory_as_file_raises_store_error(tmp_path: Path) -> None:
    store = store_from_url(f"sqlite:///{tmp_path}", timeout=0.2)
    with pytest.raises(StoreError):
        store.create(make_record(("a", ())))


def test_sqlite_connections_of_other_threads_do_not_leak(tmp_path: Path) -> None:
    """Each thread that uses the store opens its own connection (Celery's consumer and
    timer threads, a threads pool). Once close() was called, none may be left for the
    garbage collector: Python 3.13 warns ("unclosed database") for every one of them."""
    store = store_from_url(f"sqlite:///{tmp_path}/threads.sqlite3")
    record = make_record(("a", ()))
    store.create(record)

    def use() -> None:
        store.load(record.id)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(3):
            thread = threading.Thread(target=use)
            thread.start()
            thread.join(10)
        store.close()
        gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == []


def test_sqlite_retention_prunes_finished_workflows(tmp_path: Path) -> None:
    store = store_from_url(f"sqlite:///{tmp_path}/r.sqlite3", retention=0.0)
    done = make_record(("a", ()))
    open_ = make_record(("a", ()))
    store.create(done)
    store.create(open_)
    store.settle(done.id, "a", "completed")
    store.create(make_record(("a", ())))  # creating prunes what finished before now
    with pytest.raises(UnknownWorkflow):
        store.load(done.id)
    assert store.locate(done.steps["a"].job_id) is None
    with pytest.raises(UnknownWorkflow):
        store.history(done.id)  # its history went with it
    assert store.load(open_.id).id == open_.id  # unfinished workflows are kept
    assert done.id not in {s.id for s in store.workflows(label="contract")}
    store.close()


def test_sqlite_file_of_an_older_version_is_upgraded_in_place(tmp_path: Path) -> None:
    """A file made before the history and the index: its workflows are listed, loaded
    and moved on; their histories start with what happens from now on."""
    path = tmp_path / "old.sqlite3"
    old = make_record(("a", ()), ("b", ("a",)))
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE baton_workflows (id TEXT PRIMARY KEY, record TEXT NOT NULL,"
            " finished_at REAL);"
            "CREATE TABLE baton_jobs (job_id TEXT PRIMARY KEY, workflow_id TEXT NOT NULL,"
            " step TEXT NOT NULL);"
        )
        conn.execute("INSERT INTO baton_workflows (id, record) VALUES (?, ?)",
                     (old.id, old.to_json()))  # fmt: skip
    conn.close()
    store = store_from_url(f"sqlite:///{path}")
    try:
        [listed] = store.workflows(label="contract")
        assert (listed.id, listed.state, listed.total, listed.settled) == (old.id, "running", 2, 0)
        assert store.history(old.id) == []
        store.begin(old.id, "a", 1)
        out = store.settle(old.id, "a", "completed")
        assert [e.seq for e in store.history(old.id)] == [1, 2] and out.released
        assert store.summary(old.id).settled == 1
    finally:
        store.close()
