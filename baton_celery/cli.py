"""``celery -A proj baton ...``: watch workflows live, print one workflow's status, or
sweep stuck steps.

Installed as a Celery subcommand through the ``celery.commands`` entry point::

    celery -A proj baton watch                 # a live table of workflows and their steps
    celery -A proj baton watch --workflow ID   # one workflow; exits when it finishes
    celery -A proj baton watch --lines         # one line per event (the default in a pipe)
    celery -A proj baton watch --since 10m     # first what happened in the last 10 minutes
    celery -A proj baton status ID             # its steps and outcome, from the store
    celery -A proj baton status ID --events    # and its history, event by event
    celery -A proj baton backstop --every 60   # settle stuck steps, every minute
    celery -A proj baton metrics --port 9808   # Prometheus metrics (baton_celery.metrics)

``watch`` follows the workers' events (they need ``baton_bridge = True``); ``--since``
(a duration such as ``90s``, ``10m``, ``2h``, ``1d``, or an ISO 8601 time with its
offset) starts with the stored events since then. With ``--workflow`` it exits 0 when
the workflow completed and 1 when it failed.
"""

from __future__ import annotations

import queue
import re
import sys
import time
from collections import OrderedDict
from datetime import datetime, timedelta, timezone
from typing import Any

import click

from .backstop import sweep
from .dashboard.cli import dashboard
from .events import Event, StepUpdated, WorkflowFinished
from .install import install
from .listener import listen
from .metrics_command import metrics
from .pubsub import subscribe, subscribe_all, unsubscribe, unsubscribe_all
from .stores import UnknownWorkflow
from .workflow import WorkflowHandle, WorkflowStatus

__all__ = ["baton"]

#: At most this many workflows are shown in the live table (the most recent ones).
TABLE_ROWS = 12
#: The live table is redrawn at most this often (seconds).
REDRAW = 0.1
#: Seconds between reads of the store while watching one workflow.
STORE_CHECK = 1.0
#: Cursor home and clear screen: the table is redrawn in place.
CLEAR = "\x1b[H\x1b[2J"


def _app(ctx: click.Context) -> Any:
    obj = ctx.find_root().obj
    app = getattr(obj, "app", None)
    if app is None:
        raise click.UsageError("no Celery app: run it as `celery -A proj baton ...`")
    install(app)  # harmless when the app module installed baton already
    return app


@click.group(name="baton")
def baton() -> None:
    """baton_celery workflows: live events and status."""


baton.add_command(metrics)  # celery baton metrics: its own module


def _short(text: str | None, width: int) -> str:
    text = text or ""
    return text if len(text) <= width else text[: width - 1] + "…"


def format_event(event: Event) -> str:
    """One line per event, for ``watch --lines``."""
    stamp = event.timestamp.astimezone().strftime("%H:%M:%S.%f")[:-3]
    label = event.workflow_label or "-"
    if isinstance(event, WorkflowFinished):
        failed = ",".join(event.failed_steps) or "-"
        return f"{stamp} {event.workflow_id} {label} FINISHED {event.outcome} failed={failed}"
    line = (
        f"{stamp} {event.workflow_id} {label} {event.step_name} {event.state}"
        f" attempt={event.attempt}"
    )
    return f"{line} error={_short(event.error, 120)!r}" if event.error else line


class Board:
    """What the live table shows: workflows (most recent last) and their steps' states."""

    def __init__(self) -> None:
        self.flows: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def seed(self, status: WorkflowStatus) -> None:
        flow = self._flow(status.workflow_id, status.workflow_label)
        for name, step in status.steps.items():
            flow["steps"].setdefault(name, [step.state, step.attempt, step.error])
        if status.outcome is not None:
            flow["outcome"] = status.outcome

    def _flow(self, workflow_id: str, label: str | None) -> dict[str, Any]:
        flow = self.flows.get(workflow_id)
        if flow is None:
            flow = self.flows[workflow_id] = {"label": label, "steps": {}, "outcome": None}
            while len(self.flows) > TABLE_ROWS:
                self.flows.popitem(last=False)
        return flow

    def apply(self, event: Event) -> None:
        flow = self._flow(event.workflow_id, event.workflow_label)
        if isinstance(event, StepUpdated):
            flow["steps"][event.step_name] = [event.state, event.attempt, event.error]
        else:
            flow["outcome"] = event.outcome

    def render(self) -> str:
        lines = [f"baton_celery — {len(self.flows)} workflow(s)   (Ctrl-C to quit)", ""]
        for workflow_id, flow in self.flows.items():
            outcome = flow["outcome"] or "running"
            lines.append(f"{workflow_id}  {flow['label'] or '-'}  [{outcome}]")
            for name, (state, attempt, error) in flow["steps"].items():
                row = f"    {_short(name, 24):<24} {state:<10} attempt {attempt}"
                lines.append(f"{row}  {_short(error, 60)}" if error else row)
            lines.append("")
        return "\n".join(lines)


DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str | None, now: datetime | None = None) -> datetime | None:
    """``--since``: a duration back from now (``90s``, ``10m``, ``2h``, ``1d``) or an ISO
    8601 time with its offset (``2026-12-03T09:00:00+01:00``, ``...Z``)."""
    if text is None:
        return None
    now = now or datetime.now(timezone.utc)
    match = DURATION.match(text.strip())
    if match:
        return now - timedelta(seconds=float(match[1]) * UNITS[match[2]])
    try:
        stamp = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: give a duration (90s, 10m, 2h, 1d) or an ISO time with its offset"
        ) from None
    if stamp.tzinfo is None:
        raise click.BadParameter(f"{text!r} has no UTC offset (add +00:00 or Z)")
    if stamp > now:
        raise click.BadParameter(f"{text!r} is in the future")
    return stamp


@baton.command()
@click.option("--workflow", "workflow_id", default=None, help="Watch only this workflow.")
@click.option("--lines", is_flag=True, help="One line per event (the default when piped).")
@click.option("--timeout", type=float, default=None, help="Stop after this many seconds.")
@click.option("--since", default=None, help="Start with the stored events since: 10m, 2h, ISO.")
@click.pass_context
def watch(
    ctx: click.Context,
    workflow_id: str | None,
    lines: bool,
    timeout: float | None,
    since: str | None,
) -> None:
    """Show workflows' events live, as they happen on the workers."""
    start = parse_since(since)
    app = _app(ctx)
    lines = lines or not sys.stdout.isatty()
    inbox: queue.Queue[Event] = queue.Queue()

    def receive(_workflow_id: str, event: Event, **_: Any) -> None:
        inbox.put(event)

    board = Board()
    if workflow_id is None:
        subscribe_all(receive)
    else:
        subscribe(workflow_id, receive)
    listener = listen(app, since=start)
    broker = app.connection_for_read().as_uri()  # the password masked
    if listener.ready:
        click.echo(f"baton: listening for events on {broker}", err=True)
    else:
        click.echo(f"baton: cannot reach {broker} yet; still trying", err=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    outcome: str | None = None

    def stored_outcome() -> str | None:
        """The store is the source of truth: a finish whose event was lost (a broker
        restart) still ends the watch."""
        try:
            status = WorkflowHandle(workflow_id, app).status()  # type: ignore[arg-type]
        except UnknownWorkflow:
            return None
        board.seed(status)
        return status.outcome

    def show(event: Event) -> None:
        board.apply(event)
        if lines:
            click.echo(format_event(event))

    try:
        checked = time.monotonic()
        if workflow_id is not None:
            outcome = stored_outcome()
        drawn = 0.0
        while outcome is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            if workflow_id is not None and time.monotonic() - checked >= STORE_CHECK:
                checked = time.monotonic()
                outcome = stored_outcome()
                if outcome is not None:
                    break
            try:
                event = inbox.get(timeout=REDRAW if remaining is None else min(REDRAW, remaining))
            except queue.Empty:
                event = None
            if event is not None:
                show(event)
                if isinstance(event, WorkflowFinished) and event.workflow_id == workflow_id:
                    outcome = event.outcome
            if not lines and time.monotonic() - drawn >= REDRAW:
                click.echo(CLEAR + board.render())
                drawn = time.monotonic()
        while not inbox.empty():  # replayed (--since) or arrived meanwhile
            show(inbox.get_nowait())
        if not lines:
            click.echo(CLEAR + board.render())
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop()
        if workflow_id is None:
            unsubscribe_all(receive)
        else:
            unsubscribe(workflow_id, receive)
    if workflow_id is not None:
        if outcome is None:  # --timeout ran out first
            click.echo(f"workflow {workflow_id} has not finished", err=True)
            ctx.exit(2)
        if lines:
            click.echo(f"workflow {workflow_id} finished: {outcome}")
        ctx.exit(0 if outcome == "completed" else 1)


@baton.command()
@click.argument("workflow_id")
@click.option("--events", is_flag=True, help="Also print its history, one event a line.")
@click.pass_context
def status(ctx: click.Context, workflow_id: str, events: bool) -> None:
    """Print one workflow's steps and outcome (from the store)."""
    app = _app(ctx)
    handle = WorkflowHandle(workflow_id, app)
    try:
        found = handle.status()
        history = handle.events() if events else []
    except UnknownWorkflow:
        click.echo(f"no workflow {workflow_id} in the store", err=True)
        ctx.exit(2)
        return
    click.echo(f"workflow {found.workflow_id}  label: {found.workflow_label or '-'}")
    click.echo(f"outcome: {found.outcome or 'running'}")
    if found.failed_steps:
        click.echo(f"failed steps: {', '.join(found.failed_steps)}")
    click.echo(f"{'step':<24} {'state':<10} {'attempt':>7}  error")
    for name, step in found.steps.items():
        click.echo(f"{_short(name, 24):<24} {step.state:<10} {step.attempt:>7}  {step.error or ''}")
    if events:
        click.echo(f"\nhistory ({len(history)} events):")
        for event in history:
            click.echo(f"{event.seq:>5} {format_event(event)}")


@baton.command()
@click.option(
    "--stuck-after",
    type=float,
    default=None,
    help="Seconds without progress (default: the app's baton_backstop_after, else 3600).",
)
@click.option("--every", type=float, default=None, help="Keep sweeping every N seconds.")
@click.pass_context
def backstop(ctx: click.Context, stuck_after: float | None, every: float | None) -> None:
    """Settle steps a crash left hanging (see baton_celery.backstop)."""
    app = _app(ctx)
    try:
        while True:
            report = sweep(app, stuck_after)
            click.echo(str(report))
            if every is None:
                ctx.exit(1 if report.errors else 0)
            time.sleep(every)  # a periodic schedule, not a synchronisation
    except KeyboardInterrupt:
        ctx.exit(130)


baton.add_command(dashboard)  # the web dashboard: baton_celery/dashboard/
