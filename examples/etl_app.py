"""The example's Celery app: an ETL workflow's tasks, on the embedded default setup.

No server is needed: the broker is kombu's filesystem transport (messages are files in
a folder) and baton's store is a SQLite file. The workers publish their events on the
broker (``baton_bridge``); ``examples/etl.py`` listens to them. Run a worker with::

    celery -A etl_app worker -P prefork -c 2

``examples/etl.py`` does that for you, then starts the workflows.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from celery import Celery

import baton_celery

HERE = os.path.join(tempfile.gettempdir(), "baton_celery-example")
QUEUE_DIR = os.path.join(HERE, "queue")
os.makedirs(QUEUE_DIR, exist_ok=True)

app = Celery("baton_example")
app.conf.update(
    broker_url="filesystem://localhost/",  # the host is ignored; naming it silences a warning
    broker_transport_options={
        "data_folder_in": QUEUE_DIR,
        "data_folder_out": QUEUE_DIR,
        "control_folder": os.path.join(HERE, "control"),
        "polling_interval": 0.05,
    },
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,  # baton keeps the results its steps need in its own store
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,  # print() from the event receiver goes straight to stdout
    baton_store="sqlite:///" + os.path.join(HERE, "baton.sqlite3"),
    baton_bridge=True,  # workers publish every event on the broker, for listen() elsewhere
)
baton_celery.install(app)


@app.task
def extract(source: str) -> list[dict[str, Any]]:
    time.sleep(0.2)  # pretend to call an API
    return [{"source": source, "id": i, "amount": 10 * i} for i in range(1, 4)]


@app.task(bind=True, max_retries=3, default_retry_delay=0.3)
def enrich(self: Any) -> int:
    """Fails on its first attempt (a flaky API), then succeeds on the retry."""
    if self.request.retries == 0:
        raise self.retry(exc=ConnectionError("currency API timed out"))
    rows = baton_celery.dependency_results()
    return sum(len(r) for r in rows.values())


@app.task
def validate(strict: bool = False) -> bool:
    if strict:
        raise ValueError("3 rows have a negative amount")
    return True


@app.task
def load(table: str) -> str:
    inputs = baton_celery.dependency_results()
    return f"loaded {sorted(inputs)} into {table}"


@app.task
def report() -> str:
    return "report sent"
