"""sqlite:///path — the embedded default: one file shared by every process of one host."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, Callable, TypeVar

from ..events import Event, event_from_dict
from .base import RecordStore, StoreError, UnknownWorkflow, check_query
from .records import WorkflowRecord
from .transition import Transition, WorkflowSummary

__all__ = ["SQLiteStore"]

T = TypeVar("T")

#: PRAGMA user_version of the schema below; an older file is brought up to it.
SCHEMA_VERSION = 2
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
CREATE TABLE IF NOT EXISTS baton_events (
    workflow_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (workflow_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS baton_annotations (
    workflow_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (workflow_id, key)
) WITHOUT ROWID;
"""
#: Version 2: the index's columns (a workflow at a glance, kept with each transition).
SUMMARY_COLUMNS = {
    "label": "TEXT",
    "created_at": "REAL",
    "state": "TEXT",
    "total": "INTEGER",
    "settled": "INTEGER",
    "failed_steps": "TEXT",
    "seq": "INTEGER",
}


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
            if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                _upgrade(conn)
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

    def release_thread(self) -> None:
        me = threading.current_thread()
        with self._conns_lock:
            mine = [(t, c) for t, c in self._conns if t is me]
            self._conns = [(t, c) for t, c in self._conns if t is not me]
        for _, conn in mine:
            conn.close()
        self._local.conn = None

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
                for table in ("baton_jobs", "baton_events", "baton_annotations"):
                    conn.execute(
                        f"DELETE FROM {table} WHERE workflow_id IN (SELECT id FROM"
                        " baton_workflows WHERE finished_at < ?)",
                        (cutoff,),
                    )
                conn.execute("DELETE FROM baton_workflows WHERE finished_at < ?", (cutoff,))
            try:
                conn.execute(
                    "INSERT INTO baton_workflows (id, record, finished_at, label, created_at,"
                    " state, total, settled, failed_steps, seq)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (record.id, record.to_json(), *_summary_row(record)),
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

    def history(self, workflow_id: str, after: int = 0) -> list[Event]:
        try:
            conn = self._connect()
            rows = conn.execute(
                "SELECT event FROM baton_events WHERE workflow_id = ? AND seq > ? ORDER BY seq",
                (workflow_id, after),
            ).fetchall()
            if not rows:
                _must_exist(conn, workflow_id)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        return [event_from_dict(json.loads(row[0])) for row in rows]

    def workflows(
        self,
        *,
        limit: int = 100,
        before: float | None = None,
        label: str | None = None,
        state: str | None = None,
        active_since: float | None = None,
    ) -> list[WorkflowSummary]:
        check_query(limit, state)
        where, args = ["1"], []
        for clause, value in (
            ("created_at < ?", before),
            ("label = ?", label),
            ("state = ?", state),
            ("(finished_at IS NULL OR finished_at >= ?)", active_since),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        try:
            rows = (
                self._connect()
                .execute(
                    "SELECT id, label, state, created_at, finished_at, total, settled,"
                    " failed_steps, seq FROM baton_workflows WHERE "
                    + " AND ".join(where)
                    + " ORDER BY created_at DESC LIMIT ?",
                    (*args, limit),
                )
                .fetchall()
            )
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        return [_summary(row) for row in rows]

    def annotate(self, workflow_id: str, values: Mapping[str, str]) -> None:
        def put(conn: sqlite3.Connection) -> None:
            _must_exist(conn, workflow_id)
            conn.executemany(
                "INSERT OR REPLACE INTO baton_annotations (workflow_id, key, value)"
                " VALUES (?, ?, ?)",
                [(workflow_id, k, v) for k, v in values.items()],
            )

        self._write(put)

    def annotations(self, workflow_id: str, keys: Iterable[str]) -> dict[str, str]:
        wanted = list(dict.fromkeys(keys))
        try:
            conn = self._connect()
            _must_exist(conn, workflow_id)
            found: dict[str, str] = {}
            for i in range(0, len(wanted), 500):  # SQLite's bound on host parameters
                chunk = wanted[i : i + 500]
                rows = conn.execute(
                    "SELECT key, value FROM baton_annotations WHERE workflow_id = ? AND key IN"
                    f" ({', '.join('?' * len(chunk))})",
                    (workflow_id, *chunk),
                ).fetchall()
                found.update(rows)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {self.path}: {exc}") from exc
        return found

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

    def _transform(
        self, workflow_id: str, change: Callable[[WorkflowRecord], Transition]
    ) -> Transition:
        def apply(conn: sqlite3.Connection) -> Transition:
            row = conn.execute(
                "SELECT record FROM baton_workflows WHERE id = ?", (workflow_id,)
            ).fetchone()
            if row is None:
                raise UnknownWorkflow(workflow_id)
            record = WorkflowRecord.from_json(row[0])
            out = change(record)
            if not out.applied:
                return out
            conn.execute(
                "UPDATE baton_workflows SET record = ?, finished_at = ?, label = ?,"
                " created_at = ?, state = ?, total = ?, settled = ?, failed_steps = ?, seq = ?"
                " WHERE id = ?",
                (record.to_json(), *_summary_row(record), workflow_id),
            )
            conn.executemany(
                "INSERT INTO baton_events (workflow_id, seq, event) VALUES (?, ?, ?)",
                [(workflow_id, e.seq, _encode(e)) for e in out.events],
            )
            return out

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


def _must_exist(conn: sqlite3.Connection, workflow_id: str) -> None:
    if not conn.execute("SELECT 1 FROM baton_workflows WHERE id = ?", (workflow_id,)).fetchone():
        raise UnknownWorkflow(workflow_id)


def _encode(event: Event) -> str:
    return json.dumps(event.to_dict(), separators=(",", ":"), ensure_ascii=False)


def _summary_row(record: WorkflowRecord) -> tuple[Any, ...]:
    """finished_at and the index's columns, in SUMMARY_COLUMNS' order."""
    summary = record.summary()
    return (
        summary.finished_at,
        summary.label,
        summary.created_at,
        summary.state,
        summary.total,
        summary.settled,
        json.dumps(list(summary.failed_steps)),
        summary.seq,
    )


def _summary(row: tuple[Any, ...]) -> WorkflowSummary:
    """A row of the index's columns (in WorkflowSummary's order) as a WorkflowSummary."""
    workflow_id, label, state, created_at, finished_at, total, settled, failed, seq = row
    return WorkflowSummary(
        workflow_id, label, state, created_at, finished_at, total, settled,
        tuple(json.loads(failed)), seq,
    )  # fmt: skip


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a file made by an older version up to :data:`SCHEMA_VERSION`: add the
    index's columns and fill them from each record (their histories start empty)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            conn.execute("ROLLBACK")
            return  # another process did it meanwhile
        present = {row[1] for row in conn.execute("PRAGMA table_info(baton_workflows)")}
        for name, kind in SUMMARY_COLUMNS.items():
            if name not in present:
                conn.execute(f"ALTER TABLE baton_workflows ADD COLUMN {name} {kind}")
        for workflow_id, text in conn.execute("SELECT id, record FROM baton_workflows").fetchall():
            row = _summary_row(WorkflowRecord.from_json(text))
            conn.execute(
                "UPDATE baton_workflows SET finished_at = ?, label = ?, created_at = ?,"
                " state = ?, total = ?, settled = ?, failed_steps = ?, seq = ? WHERE id = ?",
                (*row, workflow_id),
            )
        conn.execute(
            "CREATE INDEX IF NOT EXISTS baton_workflows_created ON baton_workflows (created_at)"
        )
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
