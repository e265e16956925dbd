"""End-to-end scenarios: workflows run by a real prefork worker (-c 2) on Redis and on
RabbitMQ, observed through the events the worker forwards to the sink, through
``handle.status()`` / ``handle.wait()`` in the test process, and through task_postrun.

Exactly-once claims are checked after a barrier, never after a pause: every message a
worker's pool process took has a task_postrun record, and task_postrun is sent after all
the baton hooks of that run, in the same process, over the same sink connection. Events
of the worker's main process (task_revoked) are fenced with a control ping.
"""

from __future__ import annotations

from typing import Any

from harness import (
    Cluster,
    Steps,
    by_task,
    finishes,
    has_finish,
    index_of,
    states,
    step_events,
    terminal,
)
from worker_app import STEP

from baton_celery import Workflow, WorkflowHandle
from baton_celery.identity import HEADER

WAIT = 30.0


def settle_barrier(
    cluster: Cluster, expected: dict[str, list[str]], what: str = "postruns"
) -> dict[str, list[str]]:
    """Wait until each job id has exactly the expected task_postrun states (and return
    all of them), then fence the worker's main process."""

    def done(runs: dict[str, list[str]]) -> bool:
        return all(len(runs.get(job, [])) >= len(want) for job, want in expected.items())

    runs = cluster.wait_postruns(done, what)
    for job, want in expected.items():
        got = runs.get(job, [])
        assert got == want, f"task_postrun states of {job}: {got} != {want}"
    cluster.quiesce()
    return runs


def assert_one_finish(events: list[dict[str, Any]], handle: Any, outcome: str, failed: tuple):
    done = finishes(events)
    assert len(done) == 1, f"expected exactly one WorkflowFinished, got {done}"
    event = done[0]
    assert event["workflow_id"] == handle.id
    assert event["outcome"] == outcome
    assert tuple(event["failed_steps"]) == failed
    # The finish event and what .wait() reads back from the store are the same finish.
    stored = handle.wait(timeout=1)
    assert stored.outcome == outcome and stored.failed_steps == failed
    assert stored.timestamp.isoformat() == event["timestamp"]
    return event


def jobs_of(handle: Any) -> dict[str, str]:
    return {name: s.job_id for name, s in handle.status().steps.items()}


def assert_event_fields(events: list[dict[str, Any]], handle: Any, label: str | None) -> None:
    jobs = jobs_of(handle)
    for e in step_events(events):
        assert e["workflow_id"] == handle.id
        assert e["workflow_label"] == label
        assert e["worker"] == STEP
        assert e["job_id"] == jobs[e["step_name"]]
        assert e["timestamp"].endswith("+00:00"), e


# --- success ---------------------------------------------------------------------


def test_fan_out_fan_in_completes(cluster: Cluster, steps: Steps) -> None:
    handle = (
        Workflow(label="it-success")
        .add("extract", steps.s("extract"))
        .add("left", steps.s("left"), deps=["extract"])
        .add("right", steps.s("right"), deps=["extract"])
        .add("merge", steps.s("merge"), deps=["left", "right"])
        .apply_async()
    )
    finished = handle.wait(timeout=WAIT)
    assert finished.outcome == "completed"
    assert finished.failed_steps == ()
    assert finished.workflow_label == "it-success"

    jobs = jobs_of(handle)
    settle_barrier(cluster, {job: ["SUCCESS"] for job in jobs.values()})
    events = cluster.events_until_finish(handle.id)
    assert_one_finish(events, handle, "completed", ())
    assert_event_fields(events, handle, "it-success")

    for name in jobs:
        assert states(events, name) == ["executing", "completed"], name
        executing, completed = step_events(events, name)
        assert (executing["attempt"], completed["attempt"]) == (1, 1)
        assert completed["has_result"] is True and completed["error"] is None
        assert steps.calls(name) == 1
    # A dependent starts after its dependencies completed. In the sink's order that is
    # certain only along one causal chain: the process that settles a step's last
    # dependency sends that dependency's completed event, then publishes the step. (The
    # other dependency of a fan-in may announce its completion from another process a
    # little later; dependency_results() below shows it had completed.)
    extract_done = index_of(events, "extract", "completed")
    assert index_of(events, "left", "executing") > extract_done
    assert index_of(events, "right", "executing") > extract_done
    merge_start = index_of(events, "merge", "executing")
    assert merge_start > min(
        index_of(events, "left", "completed"), index_of(events, "right", "completed")
    )

    # dependency_results(): the declared dependencies' results, and only those.
    assert steps.deps_seen("extract") == [{}]
    assert steps.deps_seen("left") == [{"extract": {"step": "extract", "run": 1}}]
    assert steps.deps_seen("merge") == [
        {"left": {"step": "left", "run": 1}, "right": {"step": "right", "run": 1}}
    ]

    # status(), also from a handle rebuilt from the id alone.
    for status in (handle.status(), WorkflowHandle(handle.id, cluster.app).status()):
        assert status.finished and status.outcome == "completed"
        assert list(status.steps) == ["extract", "left", "right", "merge"]
        for step in status.steps.values():
            assert (step.state, step.attempt, step.has_result, step.error) == (
                "completed", 1, True, None,
            )  # fmt: skip


# --- retries ---------------------------------------------------------------------


def test_retry_then_success(cluster: Cluster, steps: Steps) -> None:
    handle = (
        Workflow(label="it-retry")
        # A countdown long enough that the retry hook has run before the next attempt
        # (the opposite order is test_retry_hook_late_after_next_attempt_began).
        .add("flaky", steps.s("flaky", fail_times=1, retry_countdown=0.5))
        .add("after", steps.s("after"), deps=["flaky"])
        .apply_async()
    )
    assert handle.wait(timeout=WAIT).outcome == "completed"
    jobs = jobs_of(handle)
    settle_barrier(cluster, {jobs["flaky"]: ["RETRY", "SUCCESS"], jobs["after"]: ["SUCCESS"]})
    events = cluster.events_until_finish(handle.id)
    assert_one_finish(events, handle, "completed", ())
    assert_event_fields(events, handle, "it-retry")

    flaky = step_events(events, "flaky")
    assert [(e["state"], e["attempt"]) for e in flaky] == [
        ("executing", 1), ("retryable", 1), ("executing", 2), ("completed", 2),
    ]  # fmt: skip
    assert flaky[1]["error"] == "RuntimeError: flaky flaked"
    assert flaky[2]["error"] is None and flaky[3]["error"] is None
    assert states(events, "after") == ["executing", "completed"]
    assert index_of(events, "after", "executing") > index_of(events, "flaky", "completed")
    assert steps.calls("flaky") == 2 and steps.calls("after") == 1
    assert steps.deps_seen("after") == [{"flaky": {"step": "flaky", "run": 2}}]

    status = handle.status()
    assert status.steps["flaky"].state == "completed" and status.steps["flaky"].attempt == 2
    assert status.steps["after"].attempt == 1


def test_retry_hook_late_after_next_attempt_began(cluster: Cluster, steps: Steps) -> None:
    """Celery publishes a retry before it sends task_retry: with a short countdown the
    next attempt can begin in the other pool process before the failed attempt's
    task_retry receivers ran (a loaded machine, a GC pause). The worker app forces that
    interleaving by holding the failed attempt's task_retry until the test releases it."""
    handle = (
        Workflow(label="it-retry-late")
        .add("flaky", steps.s("flaky", fail_times=1, block=True, hold_retry_hook=True))
        .apply_async()
    )
    job = jobs_of(handle)["flaky"]
    steps.wait_started("flaky")  # attempt 1
    steps.release("flaky")  # attempt 1 fails: Celery publishes attempt 2, then task_retry
    held = cluster.db.blpop([steps.key("retry-held", "flaky")], timeout=WAIT)
    assert held is not None, "attempt 1's task_retry was never held"
    steps.wait_started("flaky")  # attempt 2 runs, in the other pool process
    cluster.db.rpush(steps.key("retry-release", "flaky"), "go")  # attempt 1's task_retry
    cluster.wait_postruns(lambda runs: runs.get(job) == ["RETRY"], "attempt 1's postrun")

    # Attempt 2 is running: its step must say so, whatever attempt 1's late hook did.
    status = handle.status().steps["flaky"]
    assert (status.state, status.attempt) == ("executing", 2), status

    steps.release("flaky")
    assert handle.wait(timeout=WAIT).outcome == "completed"
    settle_barrier(cluster, {job: ["RETRY", "SUCCESS"]})
    events = cluster.events_until_finish(handle.id)
    assert_one_finish(events, handle, "completed", ())
    flaky = step_events(events, "flaky")
    assert [(e["state"], e["attempt"]) for e in flaky] == [
        ("executing", 1), ("retryable", 1), ("executing", 2), ("completed", 2),
    ]  # fmt: skip
    assert flaky[1]["error"] == "RuntimeError: flaky flaked"


def test_retries_exhausted_discards_and_cascades(cluster: Cluster, steps: Steps) -> None:
    handle = (
        Workflow(label="it-exhausted")
        # max_retries=2: three attempts
        .add("source", steps.s("source", fail_times=99, retry_countdown=0.5))
        .add("other", steps.s("other"))
        .add("middle", steps.s("middle"), deps=["source"])
        .add("last", steps.s("last"), deps=["middle"])
        .add("side", steps.s("side"), deps=["other"])
        .apply_async()
    )
    finished = handle.wait(timeout=WAIT)
    assert finished.outcome == "failed"
    assert finished.failed_steps == ("source", "middle", "last")  # in the order added

    jobs = jobs_of(handle)
    settle_barrier(
        cluster,
        {
            jobs["source"]: ["RETRY", "RETRY", "FAILURE"],
            jobs["other"]: ["SUCCESS"],
            jobs["side"]: ["SUCCESS"],
            jobs["middle"]: [],  # never published
            jobs["last"]: [],
        },
    )
    events = cluster.events_until_finish(handle.id)
    assert_one_finish(events, handle, "failed", ("source", "middle", "last"))
    assert_event_fields(events, handle, "it-exhausted")

    source = step_events(events, "source")
    assert [(e["state"], e["attempt"]) for e in source] == [
        ("executing", 1), ("retryable", 1), ("executing", 2), ("retryable", 2),
        ("executing", 3), ("discarded", 3),
    ]  # fmt: skip
    assert source[-1]["error"] == "RuntimeError: source flaked"

    (middle,) = step_events(events, "middle")
    (last,) = step_events(events, "last")
    assert (middle["state"], middle["attempt"], middle["has_result"]) == ("cancelled", 0, False)
    assert (last["state"], last["attempt"]) == ("cancelled", 0)
    # The error names the dependency that caused it and the step where the failure began.
    assert "'source'" in middle["error"] and "was discarded" in middle["error"]
    assert "failure began at 'source'" in middle["error"]
    assert "'middle'" in last["error"] and "was cancelled" in last["error"]
    assert "failure began at 'source'" in last["error"]
    # Ordered: the failure, then the cascade, transitively.
    assert index_of(events, "source", "discarded") < index_of(events, "middle", "cancelled")
    assert index_of(events, "middle", "cancelled") < index_of(events, "last", "cancelled")
    assert states(events, "other") == states(events, "side") == ["executing", "completed"]
    assert steps.calls("source") == 3
    assert steps.calls("middle") == steps.calls("last") == 0

    status = handle.status()
    assert status.outcome == "failed"
    assert status.failed_steps == ("source", "middle", "last")
    assert (status.steps["source"].state, status.steps["source"].attempt) == ("discarded", 3)
    assert status.steps["source"].error == "RuntimeError: source flaked"
    assert (status.steps["middle"].state, status.steps["middle"].attempt) == ("cancelled", 0)
    assert status.steps["last"].state == "cancelled"
    assert status.steps["side"].state == "completed"


# --- ignore flags ----------------------------------------------------------------


def test_ignore_discarded(cluster: Cluster, steps: Steps) -> None:
    handle = (
        Workflow(label="it-ignore-discarded")
        .add("broken", steps.s("broken", fail_forever=True))  # not retried: discarded at once
        .add("tolerant", steps.s("tolerant"), deps=["broken"], ignore_discarded=True)
        .add("strict", steps.s("strict"), deps=["broken"])
        .add("wrong_flag", steps.s("wrong_flag"), deps=["broken"], ignore_cancelled=True)
        .add("after", steps.s("after"), deps=["tolerant"])
        .apply_async()
    )
    failed = ("broken", "strict", "wrong_flag")
    assert handle.wait(timeout=WAIT).failed_steps == failed
    jobs = jobs_of(handle)
    settle_barrier(
        cluster,
        {jobs["broken"]: ["FAILURE"], jobs["tolerant"]: ["SUCCESS"], jobs["after"]: ["SUCCESS"]},
    )
    events = cluster.events_until_finish(handle.id)
    assert_one_finish(events, handle, "failed", failed)

    broken = step_events(events, "broken")
    assert [(e["state"], e["attempt"]) for e in broken] == [("executing", 1), ("discarded", 1)]
    assert broken[-1]["error"] == "ValueError: broken is broken"
    assert states(events, "tolerant") == ["executing", "completed"]
    assert states(events, "after") == ["executing", "completed"]
    assert states(events, "strict") == states(events, "wrong_flag") == ["cancelled"]
    assert "'broken' was discarded" in terminal(events, "wrong_flag")[0]["error"]
    # The discarded dependency counts as satisfied but has no result to read.
    assert steps.deps_seen("tolerant") == [{}]
    assert steps.deps_seen("after") == [{"tolerant": {"step": "tolerant", "run": 1}}]
    assert steps.calls("strict") == steps.calls("wrong_flag") == 0


def test_ignore_cancelled(cluster: Cluster, steps: Steps) -> None:
    handle = (
        Workflow(label="it-ignore-cancelled")
        .add("broken", steps.s("broken", fail_forever=True))
        .add("victim", steps.s("victim"), deps=["broken"])  # cancelled by the cascade
        .add("tolerant", steps.s("tolerant"), deps=["victim"], ignore_cancelled=True)
        .add("strict", steps.s("strict"), deps=["victim"])
        .add("wrong_flag", steps.s("wrong_flag"), deps=["victim"], ignore_discarded=True)
        .add("both", steps.s("both"), deps=["tolerant", "victim"], ignore_cancelled=True)
        .apply_async()
    )
    failed = ("broken", "victim", "strict", "wrong_flag")
    assert handle.wait(timeout=WAIT).failed_steps == failed
    jobs = jobs_of(handle)
    settle_barrier(
        cluster,
        {jobs["broken"]: ["FAILURE"], jobs["tolerant"]: ["SUCCESS"], jobs["both"]: ["SUCCESS"]},
    )
    events = cluster.events_until_finish(handle.id)
    assert_one_finish(events, handle, "failed", failed)

    assert states(events, "victim") == ["cancelled"]
    assert states(events, "tolerant") == ["executing", "completed"]
    assert states(events, "both") == ["executing", "completed"]
    assert states(events, "strict") == states(events, "wrong_flag") == ["cancelled"]
    strict = terminal(events, "strict")[0]["error"]
    assert "'victim' was cancelled" in strict and "failure began at 'broken'" in strict
    assert steps.deps_seen("tolerant") == [{}]
    assert steps.deps_seen("both") == [{"tolerant": {"step": "tolerant", "run": 1}}]
    assert steps.calls("victim") == steps.calls("strict") == steps.calls("wrong_flag") == 0


# --- revoke and cancel -----------------------------------------------------------


def occupy_pool(steps: Steps, count: int) -> None:
    """Keep ``count`` pool processes busy with plain (non-step) blocking tasks."""
    for i in range(count):
        steps.s(f"blocker{i}", block=True).apply_async()
    for i in range(count):
        steps.wait_started(f"blocker{i}")


def test_revoke_queued_step(cluster: Cluster, steps: Steps) -> None:
    occupy_pool(steps, 2)  # both pool processes: the workflow's root stays queued
    handle = (
        Workflow(label="it-revoke")
        .add("queued", steps.s("queued"))
        .add("child", steps.s("child"), deps=["queued"])
        .add("grandchild", steps.s("grandchild"), deps=["child"])
        .apply_async()
    )
    jobs = jobs_of(handle)
    assert handle.status().steps["queued"].state == "pending"
    replies = cluster.app.control.revoke(jobs["queued"], reply=True, timeout=10, limit=1)
    assert replies, "the worker did not acknowledge the revoke"
    steps.release_all()

    finished = handle.wait(timeout=WAIT)
    assert finished.outcome == "failed"
    assert finished.failed_steps == ("queued", "child", "grandchild")
    events = cluster.events_until_finish(handle.id)
    cluster.quiesce()
    events = cluster.events(handle.id).drain()
    assert_one_finish(events, handle, "failed", ("queued", "child", "grandchild"))

    (queued,) = step_events(events, "queued")
    assert (queued["state"], queued["attempt"], queued["error"]) == ("cancelled", 0, "revoked")
    # task_revoked runs in the worker's main process: it settled the step and the finish.
    main = cluster.main_sources()
    assert queued["source"] in main
    assert finishes(events)[0]["source"] in main
    assert states(events, "child") == states(events, "grandchild") == ["cancelled"]
    assert "failure began at 'queued'" in terminal(events, "grandchild")[0]["error"]
    assert steps.calls("queued") == 0
    runs = cluster.wait_postruns(lambda runs: True, "postruns")
    assert jobs["queued"] not in runs  # the body never ran, not even to be skipped


def test_cancel_revokes_queued_and_lets_running_finish(cluster: Cluster, steps: Steps) -> None:
    occupy_pool(steps, 1)  # one pool process left: the workflow's first root takes it
    handle = (
        Workflow(label="it-cancel")
        .add("running", steps.s("running", block=True))
        .add("queued", steps.s("queued"))
        .add("after_running", steps.s("after_running"), deps=["running"])
        .add("after_queued", steps.s("after_queued"), deps=["queued"])
        .apply_async()
    )
    jobs = jobs_of(handle)
    steps.wait_started("running")
    status = handle.status()
    assert status.steps["running"].state == "executing"
    assert status.steps["queued"].state == "pending", "the second root was not left queued"
    assert steps.calls("queued") == 0

    handle.cancel()
    cluster.quiesce()  # the worker has handled the revoke before the queued step can run
    # Not-started steps are cancelled at once, by the process that cancels.
    early = cluster.events(handle.id).wait(
        lambda ev: len([e for e in step_events(ev) if e["state"] == "cancelled"]) == 3,
        WAIT,
        "three cancelled events",
    )
    assert not has_finish(early), "finished while a step was still running"
    assert handle.status().outcome is None

    steps.release_all()
    failed = ("queued", "after_running", "after_queued")
    assert handle.wait(timeout=WAIT).failed_steps == failed
    settle_barrier(cluster, {jobs["running"]: ["SUCCESS"], jobs["queued"]: []})
    events = cluster.events_until_finish(handle.id)
    assert_one_finish(events, handle, "failed", failed)

    assert states(events, "running") == ["executing", "completed"]
    for name in failed:
        (event,) = step_events(events, name)
        assert (event["state"], event["attempt"], event["error"]) == (
            "cancelled", 0, "workflow cancelled",
        )  # fmt: skip
        assert event["source"].startswith("client/")
    # The running step finished, but its dependent was not released.
    assert steps.calls("queued") == steps.calls("after_running") == 0
    # The finish was claimed by the worker that settled the running step.
    assert not finishes(events)[0]["source"].startswith("client/")


def test_cancel_terminate_kills_running_step(cluster: Cluster, steps: Steps) -> None:
    handle = (
        Workflow(label="it-terminate")
        .add("running", steps.s("running", block=True, block_timeout=60))
        .add("after", steps.s("after"), deps=["running"])
        .apply_async()
    )
    jobs = jobs_of(handle)
    steps.wait_started("running")
    handle.cancel(terminate=True)

    finished = handle.wait(timeout=WAIT)
    assert finished.outcome == "failed"
    assert finished.failed_steps == ("running", "after")
    events = cluster.events_until_finish(handle.id)
    cluster.quiesce()
    events = cluster.events(handle.id).drain()
    assert_one_finish(events, handle, "failed", ("running", "after"))

    running = step_events(events, "running")
    assert [(e["state"], e["attempt"]) for e in running] == [("executing", 1), ("cancelled", 1)]
    assert running[-1]["error"] == "revoked and terminated (signal 15)"
    assert running[-1]["source"] in cluster.main_sources()
    assert finishes(events)[0]["source"] in cluster.main_sources()
    assert states(events, "after") == ["cancelled"]
    assert step_events(events, "after")[0]["error"] == "workflow cancelled"
    assert steps.calls("running") == 1 and steps.calls("after") == 0
    status = handle.status()
    assert (status.steps["running"].state, status.steps["running"].attempt) == ("cancelled", 1)
    # Killed in its body: it never got to return.
    runs = cluster.wait_postruns(lambda runs: True, "postruns")
    assert "SUCCESS" not in runs.get(jobs["running"], [])
    assert steps.deps_seen("running") == []


# --- gating and duplicates -------------------------------------------------------


def publish_copy(
    steps: Steps, name: str, job_id: str, header: dict[str, Any], **options: Any
) -> None:
    """Publish a step's message by hand: same task, arguments, task id and baton header."""
    steps.s(name, **options).apply_async(task_id=job_id, headers={HEADER: header})


def test_early_delivery_is_snoozed_until_dependency_completes(
    cluster: Cluster, steps: Steps
) -> None:
    handle = (
        Workflow(label="it-snooze")
        .add("slow", steps.s("slow", block=True))
        .add("dependent", steps.s("dependent", block=True), deps=["slow"])
        .apply_async()
    )
    jobs = jobs_of(handle)
    steps.wait_started("slow")
    # Deliver the dependent's message early: by hand, with the header baton itself will
    # put on it when it releases the step.
    header = {"workflow_id": handle.id, "workflow_label": "it-snooze", "step": "dependent",
              "dispatch": 1}  # fmt: skip
    publish_copy(steps, "dependent", jobs["dependent"], header, block=True)

    snoozes = cluster.events(handle.id).wait(
        lambda ev: states(ev, "dependent").count("snoozed") >= 2,
        WAIT,
        "the early copy to be snoozed (and requeued, and snoozed again)",
    )
    assert set(states(snoozes, "dependent")) == {"snoozed"}
    for event in step_events(snoozes, "dependent"):
        assert event["attempt"] == 0  # a snooze uses no attempt
        assert event["job_id"] == jobs["dependent"]
    assert steps.calls("dependent") == 0  # its body did not run
    assert handle.status().steps["dependent"].state == "pending"

    steps.release("slow")  # baton releases the dependent: it runs (and blocks)
    steps.wait_started("dependent")

    # The requeued early copy keeps coming back every snooze delay; once the dependent
    # has been released it must be dropped (IGNORED), not run a second time.
    def copies_ran_out(runs: dict[str, list[str]]) -> bool:
        snoozed = states(cluster.events(handle.id).drain(), "dependent").count("snoozed")
        return runs.get(jobs["dependent"], []).count("IGNORED") == snoozed + 1

    cluster.postruns().wait(
        lambda items: copies_ran_out(by_task(items)),
        10,
        "the snoozed copy to be dropped after the release",
        lambda: f"the dependent's body ran {steps.calls('dependent')} time(s)",
    )
    assert steps.calls("dependent") == 1
    running = handle.status().steps["dependent"]
    assert (running.state, running.attempt) == ("executing", 1)

    steps.release("dependent")
    assert handle.wait(timeout=WAIT).outcome == "completed"
    # The store has the finish before the dependent's task_postrun reaches the sink.
    cluster.wait_postruns(lambda runs: "SUCCESS" in runs.get(jobs["dependent"], []), "its run")
    runs = settle_barrier(cluster, {jobs["slow"]: ["SUCCESS"]})
    events = cluster.events(handle.id).drain()
    assert_one_finish(events, handle, "completed", ())
    assert runs[jobs["dependent"]].count("SUCCESS") == 1
    assert "RETRY" not in runs[jobs["dependent"]]

    assert [s for s in states(events, "dependent") if s != "snoozed"] == [
        "executing", "completed",
    ]  # fmt: skip
    # Snoozed while its dependency ran; executed only after the dependency completed.
    slow_done = index_of(events, "slow", "completed")
    assert index_of(events, "dependent", "snoozed") < slow_done
    assert index_of(events, "dependent", "executing") > slow_done
    assert steps.calls("dependent") == 1
    assert handle.status().steps["dependent"].attempt == 1
    assert steps.deps_seen("dependent") == [{"slow": {"step": "slow", "run": 1}}]


def test_duplicate_delivery_of_completed_steps_does_not_rerun(
    cluster: Cluster, steps: Steps
) -> None:
    handle = (
        Workflow(label="it-duplicate")
        .add("first", steps.s("first"))
        .add("second", steps.s("second"), deps=["first"])
        .apply_async()
    )
    assert handle.wait(timeout=WAIT).outcome == "completed"
    jobs = jobs_of(handle)
    settle_barrier(cluster, {job: ["SUCCESS"] for job in jobs.values()})
    before = list(cluster.events_until_finish(handle.id))

    for name in ("first", "second"):
        header = {"workflow_id": handle.id, "workflow_label": "it-duplicate", "step": name,
                  "dispatch": 1}  # fmt: skip
        publish_copy(steps, name, jobs[name], header)
    # Each copy was delivered and gated: it ended IGNORED, without running its body.
    settle_barrier(cluster, {job: ["SUCCESS", "IGNORED"] for job in jobs.values()})
    events = cluster.events(handle.id).drain()

    assert events == before, "a duplicate delivery sent events"
    assert_one_finish(events, handle, "completed", ())
    assert steps.calls("first") == steps.calls("second") == 1
    for name in jobs:
        assert states(events, name) == ["executing", "completed"]
        assert handle.status().steps[name].attempt == 1


# --- robustness ------------------------------------------------------------------


def test_raising_receiver_does_not_fail_the_task(cluster: Cluster, steps: Steps) -> None:
    # The worker subscribes a receiver that raises on every event of this label, before
    # the receiver that forwards events to the sink.
    handle = (
        Workflow(label="raise-receiver")
        .add("one", steps.s("one"))
        .add("two", steps.s("two"), deps=["one"])
        .apply_async()
    )
    assert handle.wait(timeout=WAIT).outcome == "completed"
    jobs = jobs_of(handle)
    settle_barrier(cluster, {job: ["SUCCESS"] for job in jobs.values()})
    events = cluster.events_until_finish(handle.id)
    assert_one_finish(events, handle, "completed", ())
    for name in jobs:
        assert states(events, name) == ["executing", "completed"]
    assert steps.calls("one") == steps.calls("two") == 1

    log = cluster.log()
    raised = [line for line in log.splitlines() if f"failed ({handle.id})" in line]
    # Each pool process logs the receiver's first failure with its traceback and only
    # counts the next ones (guard.py): one line per process that sent the five events
    # (executing + completed for each step, and the finish), none fatal.
    assert len(raised) == len({e["source"] for e in events}), raised
    assert all("explode" in line and "on workflow:all failed" in line for line in raised)
    assert "RuntimeError: a subscriber bug" in log


def test_malformed_headers_run_as_plain_task(cluster: Cluster, steps: Steps) -> None:
    bad_headers = [
        "not a mapping",
        {"workflow_id": 42, "step": "x"},
        {"step": "no workflow id"},
        {"workflow_id": "w", "step": "x", "dispatch": "one"},
    ]
    task_ids = []
    for i, bad in enumerate(bad_headers):
        result = steps.s(f"plain{i}").apply_async(headers={HEADER: bad})
        task_ids.append(result.id)
    runs = cluster.wait_postruns(
        lambda runs: all(runs.get(t) for t in task_ids), "the plain tasks to run"
    )
    log = cluster.log()
    for i, task_id in enumerate(task_ids):
        assert runs[task_id] == ["SUCCESS"], (task_id, runs[task_id])
        assert steps.calls(f"plain{i}") == 1
        assert steps.deps_seen(f"plain{i}") == ["not a step"]
        warnings = [ln for ln in log.splitlines() if task_id in ln and "malformed" in ln]
        assert warnings, f"no warning about the malformed header of {task_id}"
        assert all("WARNING" in ln and "running it as a plain task" in ln for ln in warnings)
