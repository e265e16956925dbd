"""Serving the dashboard with waitress, a production WSGI server that streams.

Each open live page holds one of the server's threads for as long as it stays open (a
server-sent-events stream is a long response), so the server gets
``baton_dashboard_threads`` threads and the dashboard admits at most
``baton_dashboard_max_streams`` streams, leaving threads for pages and the API. waitress
writes each chunk of a response as the app yields it (its ``send_bytes`` setting, now
deprecated, defaults to 1 byte), so every event reaches the browser when it happens:
tests/dashboard/test_server.py checks it on the wire.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

from waitress import wasyncore
from waitress.server import create_server

from .app import create_app
from .blueprint import Dashboard
from .config import DashboardConfig

__all__ = ["Server", "make_server"]

logger = logging.getLogger(__name__)

#: Seconds an idle keep-alive connection stays open (not a live stream: that one is busy).
IDLE_TIMEOUT = 60
#: Seconds the server waits for its threads at exit.
STOP_TIMEOUT = 5.0


class Server:
    """A running dashboard: ``url`` once bound; :meth:`run` serves until :meth:`stop`."""

    def __init__(self, wsgi: Any, dashboard: Dashboard, config: DashboardConfig) -> None:
        self.dashboard = dashboard
        self._stopped = False
        self._stop_lock = threading.Lock()
        self._waitress = create_server(
            wsgi,
            host=config.host,
            port=config.port,
            threads=config.threads,
            # Open pages' streams, their browsers' other keep-alive connections, API users.
            connection_limit=config.threads * 4,
            channel_timeout=IDLE_TIMEOUT,
            ident="baton_celery",
            clear_untrusted_proxy_headers=True,
        )
        host, port = self._waitress.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}{config.prefix}/"

    def run(self) -> None:
        """Serve until :meth:`stop` (from another thread) or SIGTERM / SIGINT, once
        :meth:`stop_on_signals` set them up."""
        self.dashboard.start()
        try:
            self._waitress.run()  # returns on SystemExit / KeyboardInterrupt too
        finally:
            self.dashboard.close()
            self._waitress.task_dispatcher.shutdown(timeout=STOP_TIMEOUT)
            wasyncore.close_all(self._waitress._map)

    def stop(self) -> None:
        """End the open streams (freeing their threads), then the server's loop: it
        closes every socket in its own thread, and :meth:`run` returns. Idempotent."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.dashboard.close()
        self._waitress.task_dispatcher.shutdown(timeout=STOP_TIMEOUT)  # the streams' ends sent
        self._waitress.trigger.pull_trigger(lambda: wasyncore.close_all(self._waitress._map))

    def stop_on_signals(self) -> None:
        """SIGTERM and SIGINT stop the server (call from the thread that runs it: the
        main one)."""

        def handler(signum: int, _frame: Any) -> None:
            logger.info("baton_celery dashboard: signal %d, stopping", signum)
            self.dashboard.close()  # the open streams end now, not after a heartbeat
            raise SystemExit(0)  # out of the server's loop, in this thread

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, handler)


def make_server(
    celery_app: Any,
    config: DashboardConfig | None = None,
    *,
    listen: bool = True,
    wrap: Callable[[Any], Any] | None = None,
) -> Server:
    """A bound (not yet serving) dashboard server for ``celery_app``; ``listen`` and
    ``wrap`` (a middleware around its WSGI app) as for :func:`create_app`."""
    config = config or DashboardConfig.from_app(celery_app)
    app = create_app(celery_app, config, listen=listen)
    dashboard: Dashboard = app.extensions["baton_dashboard"]
    return Server(wrap(app) if wrap else app, dashboard, config)
