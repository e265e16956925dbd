"""``celery -A proj baton dashboard``: serve the dashboard of the app's workflows.

Needs the ``dashboard`` extra (``pip install 'baton_celery[dashboard]'``); this module
imports Flask and waitress only when the command runs, so the other ``baton`` commands
work without them.
"""

from __future__ import annotations

from typing import Any

import click

__all__ = ["dashboard"]

MISSING = "the dashboard needs Flask and waitress: pip install 'baton_celery[dashboard]' ({})"
SERVING = "baton dashboard: serving {} (Ctrl-C to stop)"


@click.command()
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default 5566; 0: any free one).")
@click.option("--prefix", default=None, help="Serve under this path, e.g. /baton.")
@click.pass_context
def dashboard(ctx: click.Context, host: str | None, port: int | None, prefix: str | None) -> None:
    """Serve the live web dashboard of this app's workflows."""
    obj = ctx.find_root().obj
    app: Any = getattr(obj, "app", None)
    if app is None:
        raise click.UsageError("no Celery app: run it as `celery -A proj baton dashboard`")
    try:
        from .config import DashboardConfig
        from .server import make_server
    except ImportError as exc:
        raise click.ClickException(MISSING.format(exc)) from None
    try:
        config = DashboardConfig.from_app(app, host=host, port=port, prefix=prefix)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        server = make_server(app, config)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {config.host}:{config.port}: {exc}") from None
    server.stop_on_signals()
    click.echo(SERVING.format(server.url), err=True)
    server.run()
