"""Redis servers of the tests' own, on spare loopback ports: a standalone one that a test
may stop and restart, and a three-node Redis Cluster. The shared Redis on 6379 is never
restarted; tests use a dedicated db and unique key prefixes there.

Used by the unit tests (the store contract runs on a real cluster) and by the fault tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import redis

__all__ = [
    "SHARED_REDIS_URL",
    "LocalCluster",
    "LocalRedis",
    "SilentRedis",
    "delete_session_keys",
    "shared_redis_url",
    "spare_port",
    "unique_prefix",
    "unit_cluster",
]

#: The shared server, a db of the tests' own (never flushed: keys carry a unique prefix).
SHARED_REDIS_URL = "redis://127.0.0.1:6379/11"
START_TIMEOUT = 20.0


#: Every key prefix this process hands out starts with this: a session deletes its own.
SESSION_PREFIX = f"baton-test-{uuid.uuid4().hex[:8]}"


def shared_redis_url(prefix: str | None = None) -> str:
    """A store URL on the shared Redis with a key prefix unique to the caller."""
    return f"{SHARED_REDIS_URL}?key_prefix={prefix or unique_prefix()}"


def unique_prefix() -> str:
    return f"{SESSION_PREFIX}-{uuid.uuid4().hex[:10]}"


def delete_session_keys() -> None:
    """Delete what this session's stores left on the shared Redis (its prefixes only)."""
    client = redis.Redis.from_url(SHARED_REDIS_URL, socket_timeout=30)
    for key in client.scan_iter(match=f"{SESSION_PREFIX}-*", count=1000):
        client.delete(key)
    client.close()


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def spare_port(taken: set[int] | None = None) -> int:
    """A free loopback port whose cluster bus port (+10000) is free too."""
    taken = taken or set()
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        port = 20000 + port % 20000  # keep port + 10000 below 65536
        if port not in taken and _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no spare loopback port pair found")


def _die_with_parent() -> None:
    """In the child, before exec: be killed when the test process dies (Linux), so a
    killed test run leaves no redis-server behind."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


PR_SET_PDEATHSIG = 1


def _wait_until(check: object, what: str, timeout: float = START_TIMEOUT) -> None:
    """Poll ``check()`` (a readiness probe, not a sleep-as-synchronisation) to a deadline."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


class LocalRedis:
    """One redis-server process of the test's own, with an append-only file so that a
    restart keeps the data (``stop()`` shuts it down cleanly, ``kill()`` does not)."""

    def __init__(self, directory: Path | None = None, *, port: int | None = None) -> None:
        self.port = port or spare_port()
        self.dir = directory or Path(tempfile.mkdtemp(prefix=f"baton-redis-{self.port}-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def start(self) -> LocalRedis:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        probe = self.client()
        _wait_until(probe.ping, f"redis-server on port {self.port}")
        probe.close()
        return self

    def stop(self) -> None:
        """Shut down cleanly (the data is kept for the next start)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SilentRedis:
    """A hung Redis: a TCP server on a spare loopback port that accepts connections and
    never answers. It closes each connection after ``hold`` seconds (a client without a
    timeout then fails late rather than never) and all of them when it stops: use it as a
    context manager, its thread ends on exit."""

    def __init__(self, hold: float = 5.0) -> None:
        self.hold = hold
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # so that the loop sees the stop flag
        self.port = int(self._listener.getsockname()[1])
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name=f"silent-redis-{self.port}", daemon=True
        )

    def __enter__(self) -> SilentRedis:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the silent server's thread did not stop"

    def _serve(self) -> None:
        held: list[tuple[socket.socket, float]] = []
        try:
            while not self._stopping.is_set():
                try:
                    conn, _ = self._listener.accept()
                    held.append((conn, time.monotonic() + self.hold))
                except socket.timeout:
                    pass
                now = time.monotonic()
                for conn, until in held:
                    if until <= now:
                        conn.close()
                held = [(conn, until) for conn, until in held if until > now]
        finally:
            for conn, _ in held:
                conn.close()
            self._listener.close()


class LocalCluster:
    """A three-master Redis Cluster on loopback ports, made with ``redis-cli --cluster``."""

    def __init__(self, nodes: int = 3) -> None:
        ports: set[int] = set()
        while len(ports) < nodes:
            ports.add(spare_port(ports))
        self.ports = sorted(ports)
        self.dir = Path(tempfile.gettempdir()) / f"baton-cluster-{uuid.uuid4().hex[:10]}"
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> LocalCluster:
        self.dir.mkdir()
        for port in self.ports:
            node_dir = self.dir / str(port)
            node_dir.mkdir()
            cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                   "--dir", str(node_dir), "--cluster-enabled", "yes",
                   "--cluster-config-file", "nodes.conf", "--save", "",
                   "--appendonly", "no", "--protected-mode", "no"]  # fmt: skip
            self.processes.append(
                subprocess.Popen(
                    cmd,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent,
                )
            )
        for port in self.ports:
            probe = redis.Redis(port=port, socket_timeout=5)
            _wait_until(probe.ping, f"cluster node on port {port}")
            probe.close()
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        if created.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout!r}")
        for port in self.ports:
            probe = redis.Redis(port=port, socket_timeout=5, decode_responses=True)
            _wait_until(
                lambda p=probe: p.cluster("info")["cluster_state"] == "ok",  # type: ignore[misc]
                f"cluster state ok on port {port}",
            )
            probe.close()
        return self

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait(timeout=30)
        self.processes.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


@functools.cache
def unit_cluster() -> LocalCluster:
    """The cluster of a unit-test session: its ports (so its URL) are fixed on first call;
    tests/unit/conftest.py starts it when a collected test needs it."""
    return LocalCluster()
