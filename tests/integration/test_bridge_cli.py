"""End-to-end: ``celery -A app baton watch`` / ``status`` as real subprocesses, with real
prefork workers on Redis publishing on the bridge."""

from __future__ import annotations

import configparser
import os
import queue
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Callable

import pytest
from harness import HERE, ROOT, SINK_URL, Cluster, unique

from baton_celery import Workflow

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def entry_points(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A distribution on PYTHONPATH declaring setup.cfg's own ``celery.commands`` entry
    point, so ``celery ... baton`` resolves as it does once the package is installed."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    commands = cfg["options.entry_points"]["celery.commands"].strip()
    where = tmp_path_factory.mktemp("entry-points")
    dist = where / "baton_celery_cli_test-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: baton-celery-cli-test\nVersion: 0\n"
    )
    (dist / "entry_points.txt").write_text(f"[celery.commands]\n{commands}\n")
    return where


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster("cli", "redis", bridge=True)


def celery(cluster: Cluster, entry_points: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of ``celery -A worker_app baton ARGS``."""
    env = cluster.env()
    env["PYTHONPATH"] = os.pathsep.join([str(entry_points), env["PYTHONPATH"]])
    return [sys.executable, "-m", "celery", "-A", "worker_app", "baton", *args], env


class Lines:
    """A subprocess's stream read line by line into a queue, waited on with a bound."""

    def __init__(self, stream: object) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.put(line.rstrip("\n"))
        self.lines.put("\0eof")

    def until(self, text: str, timeout: float = TIMEOUT) -> str:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line with {text!r}; saw {self.seen}") from None
            if line == "\0eof":
                raise AssertionError(f"stream ended before {text!r}; saw {self.seen}")
            self.seen.append(line)
            if text in line:
                return line


def test_watch_lines_then_status(cluster: Cluster, entry_points: Path) -> None:
    workflow_id = str(uuid.uuid4())
    steps = cluster.steps()
    cmd, env = celery(cluster, entry_points, "watch", "--lines", "--workflow", workflow_id)
    watch = subprocess.Popen(
        cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = Lines(watch.stdout), Lines(watch.stderr)
        err.until("baton: listening for events on")
        (
            Workflow(label="cli", workflow_id=workflow_id)
            .add("extract", steps.s("extract"))
            .add("load", steps.s("load", fail_times=1), deps=["extract"])
            .apply_async(app=cluster.app)
        )
        out.until("FINISHED completed")
        out.until(f"workflow {workflow_id} finished: completed")
        assert watch.wait(timeout=TIMEOUT) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        for stream in (watch.stdout, watch.stderr):
            if stream is not None:
                stream.close()
    events = [
        line.split()[3:5]
        for line in out.seen
        if line.split()[1:2] == [workflow_id] and not line.startswith("workflow ")
    ]
    assert events == [
        ["extract", "executing"],
        ["extract", "completed"],
        ["load", "executing"],
        ["load", "retryable"],
        ["load", "executing"],
        ["load", "completed"],
        ["FINISHED", "completed"],
    ]

    cmd, env = celery(cluster, entry_points, "status", workflow_id)
    done = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert "outcome: completed" in done.stdout
    assert [line.split()[:3] for line in done.stdout.splitlines()[-2:]] == [
        ["extract", "completed", "1"],
        ["load", "completed", "2"],
    ]

    cmd, env = celery(cluster, entry_points, "status", workflow_id, "--events")
    done = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    history = done.stdout.split("history (7 events):\n")[1].splitlines()
    assert [line.split()[4:6] for line in history] == events

    # A watch started after the run: --since replays it, and it ends at once.
    args = ("watch", "--lines", "--since", "10m", "--workflow", workflow_id)
    cmd, env = celery(cluster, entry_points, *args)
    done = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    replayed = [line.split()[3:5] for line in done.stdout.splitlines()[:-1]]
    assert replayed == events

    cmd, env = celery(cluster, entry_points, "status", "no-such-workflow")
    missing = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "no workflow no-such-workflow" in missing.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_watch_table_on_a_terminal(cluster: Cluster, entry_points: Path, tmp_path: Path) -> None:
    """The live table, in a real terminal (tmux), updated in place."""
    workflow_id = str(uuid.uuid4())
    steps = cluster.steps()
    cmd, env = celery(cluster, entry_points, "watch", "--workflow", workflow_id)
    session = unique("baton-watch")
    done_key = steps.key("watch-exit")
    # The pane's command reports its exit through the sink (BLPOP: no polling).
    script = (
        " ".join(f"'{part}'" for part in cmd)
        + f"; redis-cli -u '{SINK_URL}' rpush '{done_key}' $? > /dev/null; sleep 600"
    )
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40", script],
        cwd=HERE, env=env, check=True,
    )  # fmt: skip
    try:
        (
            Workflow(label="table", workflow_id=workflow_id)
            .add("first", steps.s("first"))
            .add("second", steps.s("second"), deps=["first"])
            .apply_async(app=cluster.app)
        )
        popped = cluster.db.blpop([done_key], timeout=TIMEOUT)
        screen = subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
        ).stdout
        assert popped is not None, screen
        assert popped[1] == b"0", screen
        assert f"{workflow_id}  table  [completed]" in screen
        rows = [line.split()[:2] for line in screen.splitlines() if line.startswith("    ")]
        assert rows == [["first", "completed"], ["second", "completed"]], screen
        assert screen.count("baton_celery —") == 1, "redrawn in place, not scrolled"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
