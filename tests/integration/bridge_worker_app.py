"""The Celery app of the broker-bridge end-to-end tests, and the helpers that run it.

``create_app()`` builds the app of one test "cluster" (a broker, a SQLite store, a task
queue, a bridge exchange); the test process builds the same app as its client and as the
listener. Run as a worker (``celery -A bridge_worker_app worker``), the module reads its
configuration from ``BRIDGE_IT_*`` environment variables, set by :class:`Cluster`, and
publishes on the bridge (``baton_bridge = True``): what the test process receives comes
over the broker only.

The Redis "sink" (``BRIDGE_IT_SINK``, on the shared Redis) carries what is not an event:
each worker's readiness and the release of blocked steps. Every name is unique to a run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from celery import Celery, signals
from kombu import Exchange, Queue

import baton_celery

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

STEP = "bridge_it.step"
REDIS_BROKER = "redis://127.0.0.1:6379/10"
AMQP_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
SINK_URL = "redis://127.0.0.1:6379/11"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


def unique(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:10]}"


def create_app(*, broker: str, store: str, queue: str, exchange: str, prefix: str) -> Celery:
    """One cluster's app: the client and its workers build it with the same arguments."""
    transport_options: dict[str, Any] = {}
    if broker.startswith("redis"):
        transport_options["global_keyprefix"] = f"{prefix}:"
    app = Celery(f"bridge_it-{queue}")
    app.conf.update(
        broker_url=broker,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        baton_store=store,
        baton_snooze_delay=0.2,
        baton_bridge=True,
        baton_bridge_exchange=exchange,
        task_ignore_result=True,
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        task_queues=[
            Queue(queue, Exchange(queue, type="direct", auto_delete=True), routing_key=queue)
        ],
        control_exchange=f"{queue}-control",
        worker_prefetch_multiplier=4,
        worker_redirect_stdouts=False,
    )

    @app.task(name=STEP, bind=True, max_retries=3, default_retry_delay=0.1, shared=False)
    def step(
        self: Any, tag: str, name: str, fail_times: int = 0, block: bool = False
    ) -> dict[str, Any]:
        """Fails ``fail_times`` times then passes; with ``block``, waits to be released."""
        db = sink()
        runs = int(db.incr(f"{tag}:calls:{name}"))
        if block and db.blpop([f"{tag}:release:{name}"], timeout=60) is None:
            raise TimeoutError(f"{name} was never released")
        if runs <= fail_times:
            raise self.retry(exc=RuntimeError(f"{name} flaked"), countdown=0.1)
        return {"step": name, "run": runs}

    baton_celery.install(app)
    return app


_sink: tuple[int, redis.Redis] | None = None


def sink() -> redis.Redis:
    """This process's sink client (a new one after a fork)."""
    global _sink
    if _sink is None or _sink[0] != os.getpid():
        _sink = (os.getpid(), redis.Redis.from_url(os.environ["BRIDGE_IT_SINK"]))
    return _sink[1]


def _announce_ready(sender: Any = None, **_: Any) -> None:
    sink().rpush(os.environ["BRIDGE_IT_READY_KEY"], getattr(sender, "hostname", "") or "")


if "BRIDGE_IT_BROKER" in os.environ:
    app = create_app(
        broker=os.environ["BRIDGE_IT_BROKER"],
        store=os.environ["BRIDGE_IT_STORE"],
        queue=os.environ["BRIDGE_IT_QUEUE"],
        exchange=os.environ["BRIDGE_IT_EXCHANGE"],
        prefix=os.environ["BRIDGE_IT_PREFIX"],
    )
    signals.worker_ready.connect(_announce_ready, weak=False)


# --- the test side ------------------------------------------------------------------


class Cluster:
    """A broker, a store, a queue and a bridge exchange unique to one test, the client app
    for them, and the real prefork workers serving them."""

    def __init__(self, broker: str, tmp: Path) -> None:
        self.id = unique("bridge-it")
        self.broker = broker
        self.tmp = tmp
        self.store = "sqlite:///" + str(tmp / f"{self.id}.sqlite3")
        self.queue = f"{self.id}-tasks"
        self.exchange = f"{self.id}-events"
        self.db = redis.Redis.from_url(SINK_URL)
        self.app = create_app(
            broker=broker,
            store=self.store,
            queue=self.queue,
            exchange=self.exchange,
            prefix=self.id,
        )
        self.workers: list[tuple[subprocess.Popen[bytes], Path]] = []

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(HERE), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            "BRIDGE_IT_BROKER": self.broker,
            "BRIDGE_IT_STORE": self.store,
            "BRIDGE_IT_QUEUE": self.queue,
            "BRIDGE_IT_EXCHANGE": self.exchange,
            "BRIDGE_IT_PREFIX": self.id,
            "BRIDGE_IT_SINK": SINK_URL,
        }

    def key(self, *parts: str) -> str:
        return ":".join((self.id, *parts))

    def start_worker(self, concurrency: int = 2) -> None:
        node = unique("bridge-it-worker")
        log_path = self.tmp / f"{node}.log"
        ready_key = self.key("ready", node)
        cmd = [
            sys.executable, "-m", "celery", "-A", "bridge_worker_app", "worker",
            "-P", "prefork", "-c", str(concurrency), "-Q", self.queue, "-n", f"{node}@%h",
            "-l", "INFO", "--without-mingle", "--without-gossip", "--without-heartbeat",
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                cmd, cwd=HERE, env={**self.env(), "BRIDGE_IT_READY_KEY": ready_key},
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self.workers.append((process, log_path))
        deadline = time.monotonic() + READY_TIMEOUT
        while self.db.blpop([ready_key], timeout=1) is None:
            # BLPOP in slices only to notice a worker that died while starting.
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker {node} did not start\n{self.logs()}")

    def logs(self, lines: int = 80) -> str:
        out = []
        for _, path in self.workers:
            text = path.read_text(errors="replace") if path.exists() else ""
            out.append(f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(out)

    def release(self, tag: str, name: str) -> None:
        self.db.rpush(f"{tag}:release:{name}", "go")

    def step(self, tag: str, name: str, **options: Any) -> Any:
        return self.app.tasks[STEP].s(tag, name, **options)

    def stop(self) -> None:
        for process, _ in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in self.workers:
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT)

    def cleanup(self) -> None:
        """Delete what this cluster made on the brokers."""
        with contextlib.suppress(Exception), self.app.connection_for_write() as conn:
            channel = conn.default_channel
            channel.queue_delete(self.queue)
            for name in (self.queue, self.exchange):
                channel.exchange_delete(name)
        if self.broker.startswith("redis"):
            broker_db = redis.Redis.from_url(self.broker)
            for key in broker_db.scan_iter(match=f"{self.id}:*", count=1000):
                broker_db.delete(key)
        for key in self.db.scan_iter(match=f"{self.id}*", count=1000):
            self.db.delete(key)
        self.db.close()
        self.app.close()  # the client's producer pool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server of our own on a spare loopback port, which a test may restart.

    Append-only persistence keeps kombu's bindings and queued messages across a restart,
    as a production broker would."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir()
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.dir), "--save", "", "--appendonly", "yes",
            "--appendfsync", "always", "--daemonize", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self.process.stdout is not None
        seen = []
        for line in self.process.stdout:  # readiness from the server's own log line
            seen.append(line)
            if "Ready to accept connections" in line:
                # Keep reading its log, so a full pipe never blocks the server.
                threading.Thread(target=self.process.stdout.read, daemon=True).start()
                return
        raise AssertionError("redis-server did not start:\n" + "".join(seen))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=STOP_TIMEOUT)
            assert self.process.stdout is not None
            self.process.stdout.close()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def running_cluster(broker: str, tmp: Path, workers: int = 1) -> Iterator[Cluster]:
    cluster = Cluster(broker, tmp)
    try:
        for _ in range(workers):
            cluster.start_worker()
        yield cluster
    finally:
        cluster.stop()
        cluster.cleanup()
        baton_celery.uninstall(cluster.app)
