"""``celery -A proj baton metrics``: serve the workflows' Prometheus metrics over HTTP.

::

    PROMETHEUS_MULTIPROC_DIR=/run/baton-metrics celery -A proj baton metrics --port 9808

Serves ``/metrics`` (see :mod:`baton_celery.metrics`): every process's counts from the
multiprocess directory the workers write to (``PROMETHEUS_MULTIPROC_DIR``, the same on
the same host), and the running workflows read from the store at each scrape.
``--port 0`` picks a free port; the address is printed once the server listens.
"""

from __future__ import annotations

import os
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import click

__all__ = ["metrics"]

LISTENING = "baton: serving metrics on http://{host}:{port}/metrics"
NO_MULTIPROC = (
    "baton: {env} is not set: serving only the running workflows (from the store); the "
    "workers' counts need {env} set to the same directory for them and for this command"
)


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(WSGIServer):
    # A restart may bind the port again at once.
    allow_reuse_address = True


@click.command(name="metrics")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=9808, show_default=True, help="0: a free port.")
@click.pass_context
def metrics(ctx: click.Context, host: str, port: int) -> None:
    """Serve the workflows' Prometheus metrics on /metrics."""
    try:
        from . import metrics as prometheus
    except ImportError as exc:
        raise click.UsageError(
            f"prometheus-client is not installed ({exc}): pip install 'baton_celery[prometheus]'"
        ) from exc
    from .install import install

    app = getattr(ctx.find_root().obj, "app", None)
    if app is None:
        raise click.UsageError("no Celery app: run it as `celery -A proj baton metrics`")
    install(app)
    if not os.environ.get(prometheus.MULTIPROC_ENV):
        click.echo(NO_MULTIPROC.format(env=prometheus.MULTIPROC_ENV), err=True)
    server = make_server(
        host, port, prometheus.wsgi_app(app), server_class=_Server, handler_class=_QuietHandler
    )
    click.echo(LISTENING.format(host=host, port=server.server_port), err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
