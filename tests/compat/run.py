"""The compatibility gate: Celery's own tests, once as they are and once with baton_celery
installed into every Celery app they create; a test that passes without baton and fails
with it fails the gate.

    python tests/compat/run.py unit            # tox -e compat
    python tests/compat/run.py integration     # tox -e compat-integration (Redis)

It downloads the source distribution of the installed Celery release from PyPI (it ships
``t/``), installs the test requirements that release pins (a chosen few, see
``REQUIREMENTS``), runs the suite's files twice with the same pytest options (the
release's own pytest configuration, ``compat_plugin`` recording each test's outcome),
reruns the tests that regressed alone in both modes, prints a table of those that fail
with baton again and pass without, and exits 1 if there is any. Tests that fail in both
passes are counted and ignored; a regression that does not come back on the rerun (a
flaky or order-dependent test) is shown but not counted (``--no-rerun`` counts them all).

Options: ``--workdir DIR`` (default: a new temporary directory), ``--findings FILE`` (also
write the regressions with their tracebacks as Markdown), ``--no-install`` (the
requirements are already there), ``--only baseline|baton`` (one pass, no comparison),
``-n N`` (xdist workers; 0 for none), ``--redis URL`` (integration: that server instead
of a private one), and after ``--`` more pytest arguments for both
passes (``-- -k trace``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent

#: The suites: Celery test paths (relative to the sdist) and their own pytest options.
SUITES: dict[str, dict[str, Any]] = {
    "unit": {
        "paths": ["t/unit/tasks", "t/unit/app", "t/unit/worker"],
        "workers": 2,
        "options": [],
    },
    "integration": {
        "paths": ["t/integration/test_tasks.py", "t/integration/test_canvas.py"],
        # One session worker per pytest process: the suite is not made for xdist.
        "workers": 0,
        "options": ["--timeout=300"],
    },
}

#: What the tests of tasks, app, worker and the integration suite import or need, at the
#: versions the release's requirements/ pin: pytest and its plugins, freezegun, pydantic
#: (test_app and the integration tasks import it), kombu[redis] (the Redis client). Others
#: (moto, boto3, pymongo, gevent, ...) are skipped when missing.
REQUIREMENTS = {
    "pytest",
    "pytest-rerunfailures",
    "pytest-subtests",
    "pytest-timeout",
    "pytest-click",
    "pytest-order",
    "freezegun",
    "pydantic",
    "kombu",
}
REQUIREMENT_FILES = [
    "requirements/test.txt",
    "requirements/extras/pydantic.txt",
    "requirements/extras/redis.txt",
]
#: Ours, not the release's: the unit passes run on 2 processes.
EXTRA_REQUIREMENTS = ["pytest-xdist>=3.5,<4"]

#: The integration suite's broker and result backend: two databases of a Redis server of
#: its own, started for each pass (the suite checks the server's PUBSUB CHANNELS and its
#: helpers use db 0, so a shared server's other users would disturb it), or of the server
#: given with --redis.
REDIS_BROKER_DB = 14
REDIS_BACKEND_DB = 15
REDIS_START_TIMEOUT = 20.0

BAD = ("failed", "error")


def log(message: str) -> None:
    print(f"compat: {message}", flush=True)


# --- preparing Celery's tests -------------------------------------------------------------


def celery_version() -> str:
    return metadata.version("celery")


def fetch_sdist(version: str, workdir: Path) -> Path:
    """Download and unpack celery-<version>'s sdist; return its directory. The sdist's own
    ``celery/`` package is removed so the tests import the installed Celery."""
    target = workdir / f"celery-{version}"
    if (target / "t").is_dir():
        return target
    download = workdir / "download"
    download.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    pip += ["--no-binary", ":all:", "--dest", str(download), f"celery=={version}"]
    subprocess.run(pip, check=True)
    (archive,) = download.glob(f"celery-{version}.tar.gz")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"celery-{version}/")]
        if sys.version_info >= (3, 12):
            tar.extractall(workdir, members=members, filter="data")
        else:
            tar.extractall(workdir, members=members)
    shutil.rmtree(target / "celery")
    return target


def pinned_requirements(sdist: Path, names: set[str]) -> list[str]:
    """The release's own requirement lines for ``names`` (its pins, markers dropped)."""
    found: dict[str, str] = {}
    for relative in REQUIREMENT_FILES:
        path = sdist / relative
        if not path.exists():
            continue
        for raw in path.read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            match = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?", line)
            if match is None:
                continue
            name = match.group(1).lower().replace("_", "-")
            if name in names and name not in found:
                found[name] = line.split(";", 1)[0].strip()
    missing = names - set(found)
    if missing:
        raise SystemExit(f"compat: {sdist.name}'s requirements do not name {sorted(missing)}")
    return sorted(found.values())


def install_requirements(requirements: list[str]) -> None:
    log("installing " + " ".join(requirements))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *requirements], check=True)


# --- the two passes -----------------------------------------------------------------------


@dataclass
class Pass:
    name: str
    record: Path
    seconds: float = 0.0
    exit_code: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)


def pytest_command(suite: str, workers: int, extra: list[str], tests: list[str]) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rN"]
    command += ["-p", "celery.contrib.pytest", "-p", "compat_plugin"]
    if workers:
        command += ["-n", str(workers)]
    return command + SUITES[suite]["options"] + extra + tests


def suite_environment(redis_url: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if redis_url is not None:
        server = urlsplit(redis_url)
        base = redis_url.rstrip("/")
        env["TEST_BROKER"] = f"{base}/{REDIS_BROKER_DB}"
        env["TEST_BACKEND"] = f"{base}/{REDIS_BACKEND_DB}"
        env["REDIS_HOST"], env["REDIS_PORT"] = (
            server.hostname or "127.0.0.1",
            str(server.port or 6379),
        )
    return env


def spare_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def private_redis(workdir: Path) -> Iterator[str]:
    """A throwaway Redis server on a spare loopback port, no persistence."""
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("compat: redis-server is not installed (or pass --redis URL)")
    port = spare_port()
    command = [server, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    command += ["--appendonly", "no", "--dir", str(workdir)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while not redis_ping(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"compat: redis-server did not start on port {port}")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_pass(
    name: str, args: argparse.Namespace, sdist: Path, workers: int, tests: list[str] | None = None
) -> Pass:
    """One pytest run: ``name`` is "baseline" or "baton", with "-rerun" for the rerun of
    the given ``tests`` (by default: the suite's paths)."""
    suite, workdir = args.suite, args.workdir
    result = Pass(name, workdir / f"{suite}-{name}.json")
    result.record.unlink(missing_ok=True)
    command = pytest_command(suite, workers, args.pytest_args, tests or SUITES[suite]["paths"])
    command.append(f"--compat-record={result.record}")
    if name.startswith("baton"):
        command.append("--compat-baton")
        if suite == "integration":  # a prefork worker: its processes share a SQLite file
            store = workdir / "baton-store.sqlite3"
            store.unlink(missing_ok=True)
            command.append(f"--compat-baton-store=sqlite:///{store}")
    output = workdir / f"{suite}-{name}.log"
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        redis_url = args.redis
        if suite == "integration" and redis_url is None:
            redis_url = stack.enter_context(private_redis(workdir))
        on_redis = f" (Redis {redis_url})" if redis_url else ""
        ids = set(tests or ())
        shown = [arg for arg in command[1:] if arg not in ids]
        shown += [f"<{len(ids)} test ids>"] if ids else []
        log(f"{name} pass: {' '.join(shown)}{on_redis}")
        with output.open("w") as out:
            process = subprocess.run(
                command,
                cwd=sdist,
                env=suite_environment(redis_url if suite == "integration" else None),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
    result.seconds = time.monotonic() - started
    result.exit_code = process.returncode
    tail = output.read_text(errors="replace").splitlines()[-1:]
    log(f"{name} pass: {tail[0] if tail else ''} ({result.seconds:.0f} s, log: {output})")
    if not result.record.exists():
        raise SystemExit(f"compat: the {name} pass recorded nothing (exit {process.returncode})")
    data = json.loads(result.record.read_text())
    result.meta, result.tests = data["meta"], data["tests"]
    return result


def check_pass(result: Pass, sdist: Path) -> None:
    """Refuse a comparison that would prove nothing."""
    celery_file = Path(result.meta["celery_file"]).resolve()
    if sdist.resolve() in celery_file.parents:
        raise SystemExit(f"compat: the {result.name} pass imported Celery from the sdist")
    if not result.tests:
        raise SystemExit(f"compat: the {result.name} pass ran no test")
    if result.name.startswith("baton") and not result.meta.get("baton_installs"):
        raise SystemExit("compat: the baton pass installed baton into no app")


# --- the comparison -----------------------------------------------------------------------


@dataclass
class Comparison:
    """Test ids, by what the two passes (and the rerun of the regressions) said."""

    regressed: list[str] = field(default_factory=list)  # passed without baton, failed with
    missing: list[str] = field(default_factory=list)  # passed without baton, not run with
    both: list[str] = field(default_factory=list)  # failed in both passes: ignored
    not_reproduced: list[str] = field(default_factory=list)  # regressed, then not on rerun

    @property
    def failing(self) -> bool:
        return bool(self.regressed or self.missing)


def counts(tests: dict[str, dict[str, Any]]) -> str:
    tally: dict[str, int] = {}
    for entry in tests.values():
        tally[entry["outcome"]] = tally.get(entry["outcome"], 0) + 1
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(tally.items()))


def outcome(result: Pass, test_id: str) -> str | None:
    entry = result.tests.get(test_id)
    return None if entry is None else str(entry["outcome"])


def compare(baseline: Pass, baton: Pass) -> Comparison:
    comparison = Comparison()
    for test_id in sorted(baseline.tests):
        before, after = outcome(baseline, test_id), outcome(baton, test_id)
        if before in BAD and after in BAD:
            comparison.both.append(test_id)
        elif before == "passed" and after is None:
            comparison.missing.append(test_id)
        elif before == "passed" and after in BAD:
            comparison.regressed.append(test_id)
    return comparison


def confirm(comparison: Comparison, baseline_rerun: Pass, baton_rerun: Pass) -> None:
    """A regression counts when the rerun of those tests alone says so again: it fails
    with baton and passes without. One that does not (a flaky test, or one that only
    fails after some other test) is kept apart, shown, and not counted."""
    confirmed = []
    for test_id in comparison.regressed:
        again = (
            outcome(baton_rerun, test_id) in BAD and outcome(baseline_rerun, test_id) == "passed"
        )
        (confirmed if again else comparison.not_reproduced).append(test_id)
    comparison.regressed = confirmed


def one_line(entry: dict[str, Any]) -> str:
    message = re.sub(r" at 0x[0-9a-f]+", "", entry["message"])  # object addresses: noise
    return message[:160]


def table(rows: list[tuple[str, str, str]]) -> str:
    headers = ("test (passes without baton)", "with baton", "error")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:2])]
    lines = [f"{headers[0]:<{widths[0]}}  {headers[1]:<{widths[1]}}  {headers[2]}"]
    lines.append(f"{'-' * widths[0]}  {'-' * widths[1]}  {'-' * len(headers[2])}")
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def rows_for(test_ids: list[str], baton: Pass) -> list[tuple[str, str, str]]:
    rows = []
    for test_id in test_ids:
        entry = baton.tests[test_id]
        where = "" if entry["where"] == "call" else f" ({entry['where']})"
        rows.append((test_id, entry["outcome"] + where, one_line(entry)))
    return rows


def report(suite: str, baseline: Pass, baton: Pass, comparison: Comparison) -> str:
    lines = [
        f"Celery {baton.meta['celery']} ({suite}), Python {baton.meta['python']}",
        f"  without baton: {counts(baseline.tests)} in {baseline.seconds:.0f} s",
        f"  with baton:    {counts(baton.tests)} in {baton.seconds:.0f} s "
        f"(baton installed into {baton.meta['baton_installs']} apps)",
        f"  failing in both passes (ignored): {len(comparison.both)}",
    ]
    rows = rows_for(comparison.regressed, baton)
    rows += [(test_id, "not run", "") for test_id in comparison.missing]
    if rows:
        lines += ["", f"{len(rows)} test(s) pass without baton and fail with it:", ""]
        lines.append(table(rows))
    else:
        lines += ["", "No test that passes without baton fails with it."]
    if comparison.not_reproduced:
        lines += [
            "",
            f"{len(comparison.not_reproduced)} more failed with baton in the full run but not "
            "when rerun alone (not counted):",
            "",
            table(rows_for(comparison.not_reproduced, baton)),
        ]
    return "\n".join(lines)


def findings_markdown(suite: str, summary: str, baton: Pass, comparison: Comparison) -> str:
    parts = [
        f"# Compatibility gate findings: Celery's {suite} tests with baton_celery",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} by tests/compat/run.py {suite}.",
        "",
        "```",
        summary,
        "```",
    ]
    for test_id in comparison.regressed + comparison.not_reproduced:
        entry = baton.tests[test_id]
        note = " (not reproduced when rerun alone)" if test_id in comparison.not_reproduced else ""
        parts += ["", f"## {test_id}{note}", "", f"{entry['outcome']} in {entry['where']}:"]
        parts += [f"`{entry['message']}`", "", "```", entry["text"].rstrip(), "```"]
    if comparison.missing:
        parts += ["", "## Not run in the baton pass", ""]
        parts += [f"- {test_id}" for test_id in comparison.missing]
    return "\n".join(parts) + "\n"


# --- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="after --: more pytest arguments"
    )
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--workdir", type=Path, help="where the sdist and the records go")
    parser.add_argument("--findings", type=Path, help="also write the regressions here (.md)")
    parser.add_argument("--no-install", action="store_true", help="skip the pip install")
    parser.add_argument("--no-rerun", action="store_true", help="count regressions unconfirmed")
    parser.add_argument("--only", choices=("baseline", "baton"), help="one pass, no compare")
    parser.add_argument("--redis", help="integration: use this server (redis://host:port)")
    parser.add_argument("-n", "--workers", type=int, help="xdist workers (0: none)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.pytest_args = argv[split + 1 :]  # after --: more pytest arguments, for every pass

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="baton-compat-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args.workdir = workdir
    version = celery_version()
    log(f"Celery {version}; work dir {workdir}")
    sdist = fetch_sdist(version, workdir)
    if not args.no_install:
        install_requirements(pinned_requirements(sdist, REQUIREMENTS) + EXTRA_REQUIREMENTS)
    workers = SUITES[args.suite]["workers"] if args.workers is None else args.workers

    names = [args.only] if args.only else ["baseline", "baton"]
    passes = {}
    for name in names:
        passes[name] = run_pass(name, args, sdist, workers)
        check_pass(passes[name], sdist)
    if args.only:
        log(f"{args.only}: {counts(passes[args.only].tests)}")
        return 0

    baseline, baton = passes["baseline"], passes["baton"]
    comparison = compare(baseline, baton)
    if comparison.regressed and not args.no_rerun:
        log(f"rerunning the {len(comparison.regressed)} regressed test(s) alone, in both modes")
        reruns = [
            run_pass(f"{name}-rerun", args, sdist, 0, comparison.regressed)
            for name in ("baseline", "baton")
        ]
        confirm(comparison, *reruns)
    summary = report(args.suite, baseline, baton, comparison)
    print("\n" + summary + "\n", flush=True)
    if args.findings:
        args.findings.write_text(findings_markdown(args.suite, summary, baton, comparison))
        log(f"findings written to {args.findings}")
    return 1 if comparison.failing else 0


if __name__ == "__main__":
    sys.exit(main())
