"""sqlite:///path — the embedded default: one file shared by every process of one host."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Callable, TypeVar

from .base import RecordStore, StoreError, UnknownWorkflow
from .records import WorkflowRecord

__all__ = ["SQLiteStore"]

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS baton_workflows (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS baton_workflows_finished ON baton_workflows (finished_at);
CREATE TABLE IF NOT EXISTS baton_jobs (
    job_id TEXT PRIMARY KEY,
    workflow_id TEXT NOT NULL,
    step TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS baton_jobs_workflow ON baton_jobs (workflow_id);
"""


class SQLiteStore(RecordStore):
    """Workflows as JSON records in a SQLite file, one ``BEGIN IMMEDIATE`` transaction per
    transition: the write lock serialises racing workers, so exactly one wins a finish.

    Each process (and thread) opens its own connection: a connection must not cross a
    ``fork()``, which is how prefork pool children are made. ``timeout`` bounds how long a
    transition waits for the write lock before raising :class:`StoreError`.
    """

    def __init__(self, path: str, *, timeout: float = 5.0, retention: float = 86400.0) -> None:
        self.path = path
        self.timeout = timeout
        self.retention = retention
        self._local = threading.local()
        # The connections this process opened, with their threads: close() closes the
        # caller's and those of threads that have ended (Python 3.13 warns about any left
        # to the garbage collector). Inherited ones are dropped, not closed, after a fork.
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._conns_pid = os.getpid()
        self._conns_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        conn = None
        try:
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            if conn is not None:
                conn.close()
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        with self._conns_lock:
            if self._conns_pid != os.getpid():  # inherited through fork(): not ours to close
                self._conns, self._conns_pid = [], os.getpid()
            self._conns.append((threading.current_thread(), conn))
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        """Close this thread's connection and those of threads that have ended; another
        live thread's connection may be in use, so it stays open."""
        me = threading.current_thread()
        with self._conns_lock:
            if self._conns_pid != os.getpid():
                self._conns, self._conns_pid = [], os.getpid()
            done = [(t, c) for t, c in self._conns if t is me or not t.is_alive()]
            self._conns = [(t, c) for t, c in self._conns if (t, c) not in done]
        for _, conn in done:
            conn.close()
        self._local.conn = None

    def create(self, record: WorkflowRecord) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            if self.retention >= 0:
                cutoff = time.time() - self.retention
                conn.execute(
                    "DELETE FROM baton_jobs WHERE workflow_id IN (SELECT id FROM"
                    " baton_workflows WHERE finished_at < ?)",
                    (cutoff,),
                )
                conn.execute("DELETE FROM baton_workflows WHERE finished_at < ?", (cutoff,))
            try:
                conn.execute(
                    "INSERT INTO baton_workflows (id, record) VALUES (?, ?)",
                    (record.id, record.to_json()),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"workflow {record.id!r} already exists") from None
            conn.executemany(
                "INSERT OR REPLACE INTO baton_jobs (job_id, workflow_id, step) VALUES (?, ?, ?)",
                [(s.job_id, record.id, s.name) for s in record.steps.values()],
            )

        self._write(insert)

    def load(self, workflow_id: str) -> WorkflowRecord:
        try:
            row = (
                self._connect()
                .execute("SELECT record FROM baton_workflows WHERE id = ?", (workflow_id,))
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        if row is None:
            raise UnknownWorkflow(workflow_id)
        return WorkflowRecord.from_json(row[0])

    def locate(self, job_id: str) -> tuple[str, str] | None:
        try:
            row = (
                self._connect()
                .execute("SELECT workflow_id, step FROM baton_jobs WHERE job_id = ?", (job_id,))
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        return None if row is None else (row[0], row[1])

    def live_workflows(self, before: float | None = None) -> list[str]:
        # ``before`` is not applied: the creation time is inside the JSON record.
        try:
            rows = (
                self._connect()
                .execute("SELECT id FROM baton_workflows WHERE finished_at IS NULL ORDER BY rowid")
                .fetchall()
            )
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        return [row[0] for row in rows]

    def _transform(self, workflow_id: str, change: Callable[[WorkflowRecord], T]) -> T:
        def apply(conn: sqlite3.Connection) -> T:
            row = conn.execute(
                "SELECT record FROM baton_workflows WHERE id = ?", (workflow_id,)
            ).fetchone()
            if row is None:
                raise UnknownWorkflow(workflow_id)
            record = WorkflowRecord.from_json(row[0])
            outcome = change(record)
            conn.execute(
                "UPDATE baton_workflows SET record = ?, finished_at = ? WHERE id = ?",
                (record.to_json(), record.finished_at, workflow_id),
            )
            return outcome

        return self._write(apply)

    def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            conn = self._connect()
            # IMMEDIATE takes the write lock up front: read-modify-write without a race.
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        try:
            outcome = work(conn)
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"sqlite store {self.path}: {exc}") from exc
            raise
        return outcome
