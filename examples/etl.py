"""The main job: run an ETL workflow twice on a real Celery worker and watch it.

    python examples/etl.py

It starts ``celery worker`` (prefork, 2 processes) on the example app, then builds two
workflows of the same shape::

    extract_orders ─┐
                    ├─> enrich (fails once, retries) ─> validate ─> load ─> report
    extract_users ──┘

The second run's ``validate`` fails for good, so ``load`` and ``report`` are cancelled and
the workflow finishes "failed". The worker prints every event as it happens.
"""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from etl_app import enrich, extract, load, report, validate  # noqa: E402

from baton_celery import Workflow, WorkflowFinished  # noqa: E402


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


def main() -> int:
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
    try:
        outcomes: list[WorkflowFinished] = []
        for label, strict in (("nightly-etl", False), ("nightly-etl-bad-data", True)):
            handle = etl(label, strict).apply_async()
            print(f"started workflow {label} ({handle.id})", flush=True)
            finished = handle.wait(timeout=60)
            outcomes.append(finished)
            status = handle.status()
            print(f"{label}: {finished.outcome}; steps:", flush=True)
            for name, step in status.steps.items():
                print(f"    {name:<15} {step.state:<10} attempts={step.attempt}", flush=True)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    ok = [f.outcome for f in outcomes] == ["completed", "failed"]
    print("example finished as expected" if ok else f"unexpected outcomes: {outcomes}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
