"""The exactly-once finish under a real race: 200 workflows on two prefork workers of two
pool processes each (four processes settling steps against one SQLite store).

Half the workflows are a 20-way fan-out into one final step; the other half are 20
parallel steps and nothing after them, so their last steps settle at nearly the same
instant in different processes and race for the finish claim.
"""

from __future__ import annotations

import collections
import time
from datetime import datetime
from typing import Any, Callable

from harness import Cluster, finishes, states, step_events
from worker_app import TOUCH

from baton_celery import Workflow

PER_KIND = 100
WIDTH = 20
FINISH_TIMEOUT = 100.0


def test_200_workflows_finish_exactly_once(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster("race", "redis", workers=2)  # four pool processes racing
    assert len(cluster.workers) == 2
    touch = cluster.app.tasks[TOUCH]
    started = time.monotonic()

    kinds: dict[str, str] = {}
    handles = []
    for i in range(PER_KIND):
        fan, parallel = Workflow(label=f"race-fan-{i}"), Workflow(label=f"race-par-{i}")
        for j in range(WIDTH):
            fan.add(f"s{j}", touch.s())
            parallel.add(f"p{j}", touch.s())
        fan.add("final", touch.s(), deps=[f"s{j}" for j in range(WIDTH)])
        for kind, workflow in (("fan", fan), ("parallel", parallel)):
            handle = workflow.apply_async()
            kinds[handle.id] = kind
            handles.append(handle)
    submitted = time.monotonic()
    assert len(kinds) == 2 * PER_KIND

    # Every WorkflowFinished the workers send also goes to one list for this cluster.
    cluster.finished().wait(
        lambda items: len(items) >= len(kinds),
        FINISH_TIMEOUT,
        f"{len(kinds)} WorkflowFinished events",
        cluster.diagnose,
    )
    all_finished = time.monotonic()

    # Barrier: every step's message has run (task_postrun is sent after all of baton's
    # hooks for that run, in the same process), so no event can still be on its way.
    jobs: dict[str, tuple[str, str]] = {}
    for handle in handles:
        for name, step in handle.status().steps.items():
            jobs[step.job_id] = (handle.id, name)
    assert len(jobs) == PER_KIND * (2 * WIDTH + 1)
    cluster.wait_postruns(lambda runs: len(runs) >= len(jobs), "a postrun for every step")
    cluster.quiesce()
    finished = cluster.finished().drain()

    # Exactly one WorkflowFinished per workflow, all completed.
    per_workflow = collections.Counter(e["workflow_id"] for e in finished)
    assert len(finished) == len(kinds), f"{len(finished)} finishes for {len(kinds)} workflows"
    assert set(per_workflow) == set(kinds)
    assert max(per_workflow.values()) == 1
    assert {(e["outcome"], tuple(e["failed_steps"])) for e in finished} == {("completed", ())}

    # Every step ran once and settled once.
    runs = cluster.postruns().items
    assert len(runs) == len(jobs), "a step's message was delivered more than once"
    assert {task_id for task_id, *_ in runs} == set(jobs)
    assert {state for _, state, *_ in runs} == {"SUCCESS"}

    finish_sources = collections.Counter()
    settled_by_several = 0
    photo_finishes = 0
    for handle in handles:
        events = cluster.events(handle.id).drain()
        (finish,) = finishes(events)
        assert finish["workflow_id"] == handle.id
        status = handle.status()
        assert status.outcome == "completed"
        for name, step in status.steps.items():
            assert (step.state, step.attempt) == ("completed", 1), (handle.id, name, step)
            assert states(events, name) == ["executing", "completed"], (handle.id, name)
        completed = [e for e in step_events(events) if e["state"] == "completed"]
        assert len(completed) == len(status.steps)
        finish_sources[finish["source"]] += 1
        if kinds[handle.id] == "parallel":
            settled_by_several += len({e["source"] for e in completed}) > 1
            photo_finishes += _last_two_within(completed, seconds=0.05)

    # The race was real: both workers' processes claimed finishes.
    nodes = {source.split("/")[0] for source in finish_sources}
    assert nodes == {w.node for w in cluster.workers}, finish_sources
    assert settled_by_several > PER_KIND // 2, settled_by_several

    done = time.monotonic()
    print(
        f"\nrace: {len(kinds)} workflows, {len(jobs)} steps on 2 workers x 2 processes; "
        f"submitted in {submitted - started:.1f} s, all finished after "
        f"{all_finished - started:.1f} s, checked after {done - started:.1f} s; "
        f"finishes claimed per process: {dict(sorted(finish_sources.items()))}; "
        f"parallel workflows whose steps settled in >1 process: {settled_by_several}/"
        f"{PER_KIND}; last two steps within 50 ms: {photo_finishes}/{PER_KIND}"
    )


def _last_two_within(completed: list[dict[str, Any]], seconds: float) -> bool:
    stamps = sorted(datetime.fromisoformat(e["timestamp"]) for e in completed)
    return (stamps[-1] - stamps[-2]).total_seconds() <= seconds
