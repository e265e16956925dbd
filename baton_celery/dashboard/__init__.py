"""A live web dashboard of baton_celery workflows: every workflow, and one workflow's
graph, timeline and history, following the workers' events as they happen.

Needs the ``dashboard`` extra: ``pip install 'baton_celery[dashboard]'`` (Flask and
waitress). The workers publish their events on the broker (``baton_bridge = True``);
then, from the command line::

    celery -A proj baton dashboard               # http://127.0.0.1:5566/
    celery -A proj baton dashboard --host 0.0.0.0 --port 8080

or mounted into a Flask app of your own, under a prefix::

    from baton_celery.dashboard import Dashboard

    dashboard = Dashboard(celery_app)            # reads app.conf.baton_dashboard_*
    flask_app.register_blueprint(dashboard.blueprint, url_prefix="/baton")

or under a prefix of any WSGI app: ``mount(wsgi_app, "/baton", celery_app)``.
``create_app(celery_app)`` is the dashboard as a Flask app of its own. See
docs/dashboard.md for the pages, the JSON API and the settings.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app, mount
    from .blueprint import Dashboard
    from .config import DashboardConfig
    from .server import Server, make_server

__all__ = ["Dashboard", "DashboardConfig", "Server", "create_app", "make_server", "mount"]

# Imported on first use: `celery baton ...` loads this package for its subcommand, and
# must work without Flask installed.
_WHERE = {
    "Dashboard": ".blueprint",
    "DashboardConfig": ".config",
    "Server": ".server",
    "create_app": ".app",
    "make_server": ".server",
    "mount": ".app",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
