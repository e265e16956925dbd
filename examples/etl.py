"""The main job: run an ETL workflow twice on a real Celery worker and watch it.

    python examples/etl.py

It starts ``celery worker`` (prefork, 2 processes) on the example app, then builds two
workflows of the same shape::

    extract_orders ─┐
                    ├─> enrich (fails once, retries) ─> validate ─> load ─> report
    extract_users ──┘

The second run's ``validate`` fails for good, so ``load`` and ``report`` are cancelled and
the workflow finishes "failed". The events happen in the worker's processes; this process
receives them over the broker (``baton_celery.listen``) and prints each as it arrives.
"""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from etl_app import app, enrich, extract, load, report, validate  # noqa: E402

import baton_celery  # noqa: E402
from baton_celery import Event, StepUpdated, Workflow, WorkflowFinished  # noqa: E402


def etl(label: str, strict: bool) -> Workflow:
    return (
        Workflow(label=label)
        .add("extract_orders", extract.s("orders"))
        .add("extract_users", extract.s("users"))
        .add("enrich", enrich.s(), deps=["extract_orders", "extract_users"])
        .add("validate", validate.s(strict), deps=["enrich"])
        .add("load", load.s("warehouse.orders"), deps=["validate", "enrich"])
        .add("report", report.s(), deps=["load"])
    )


def say(text: str) -> None:
    """One write per line: the listener's thread prints too."""
    sys.stdout.write(text + "\n")


def print_event(workflow_id: str, event: Event) -> None:
    """A receiver: each event as it arrives from the workers."""
    where = f"[{event.workflow_label} {workflow_id[:8]}]"
    if isinstance(event, StepUpdated):
        detail = f"  ({event.error})" if event.error else ""
        say(f"{where} {event.step_name:<15} {event.state:<10} attempt={event.attempt}{detail}")
    else:
        failed = f" failed_steps={list(event.failed_steps)}" if event.failed_steps else ""
        say(f"{where} FINISHED {event.outcome}{failed}")


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "etl_app",
            "--quiet",
            "worker",
            "-P",
            "prefork",
            "-c",
            "2",
            "--loglevel=WARNING",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
        ],
        cwd=HERE,
    )
    baton_celery.subscribe_all(print_event)
    outcomes: list[WorkflowFinished] = []
    try:
        with baton_celery.listen(app):  # returns once its subscription is live
            for label, strict in (("nightly-etl", False), ("nightly-etl-bad-data", True)):
                handle = etl(label, strict).apply_async()
                say(f"started workflow {label} ({handle.id})")
                outcomes.append(handle.wait(timeout=60))  # woken by the live finish
                say(f"{label}: {outcomes[-1].outcome}; steps, as the store has them:")
                for name, step in handle.status().steps.items():
                    say(f"    {name:<15} {step.state:<10} attempts={step.attempt}")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    ok = [f.outcome for f in outcomes] == ["completed", "failed"]
    print("example finished as expected" if ok else f"unexpected outcomes: {outcomes}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
