"""The dashboard as a whole WSGI app, and mounted under a prefix of any other WSGI app."""

from __future__ import annotations

from typing import Any

from flask import Flask
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from .blueprint import Dashboard
from .config import DashboardConfig

__all__ = ["create_app", "mount"]


def create_app(
    celery_app: Any, config: DashboardConfig | None = None, *, listen: bool = True
) -> Flask:
    """A Flask app serving the dashboard of ``celery_app`` (at ``config.prefix``); its
    :class:`Dashboard` is ``app.extensions["baton_dashboard"]``."""
    dashboard = Dashboard(celery_app, config, listen=listen)
    app = Flask(__name__, static_folder=None)  # the blueprint serves its own files
    app.register_blueprint(dashboard.blueprint, url_prefix=dashboard.config.prefix or None)
    app.extensions["baton_dashboard"] = dashboard
    # Routing errors (no such page, a method other than GET) never reach a blueprint's
    # handlers: the app answers them the dashboard's way.
    app.register_error_handler(HTTPException, dashboard.error)
    app.after_request(dashboard.secure)
    return app


def mount(wsgi_app: Any, prefix: str, celery_app: Any, **options: Any) -> DispatcherMiddleware:
    """``wsgi_app`` with the dashboard of ``celery_app`` answering under ``prefix``
    (e.g. "/baton"); ``options`` go to :func:`create_app`."""
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"prefix must start with / and not end with one, got {prefix!r}")
    return DispatcherMiddleware(wsgi_app, {prefix: create_app(celery_app, **options)})
