"""The dashboard's routes, as a Flask blueprint a host app can mount.

Pages: ``/`` (the index) and ``/workflows/<id>`` (one workflow). JSON:
``/api/workflows`` and ``/api/workflows/<id>``, the data the pages start from. Live
streams (server-sent events): ``/api/stream`` and ``/api/workflows/<id>/stream``.

Everything answers GET and HEAD only, any other method 405, except
``POST /api/workflows/<id>/cancel`` when ``baton_dashboard_allow_cancel`` is on (it
then also needs the header ``X-Baton-Dashboard: cancel``, which a page of another site
cannot send).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable
from urllib.parse import urlencode

from flask import (
    Blueprint,
    Response,
    abort,
    jsonify,
    redirect,
    render_template,
    request,
    send_from_directory,
    url_for,
)
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.wrappers import Response as BaseResponse

from ..install import install
from ..stores import Store, StoreError, UnknownWorkflow
from ..stores.base import MAX_PAGE
from ..workflow import WorkflowHandle
from . import auth
from .config import DashboardConfig
from .hub import Hub, Subscription
from .streams import MAX_CATCH_UP, SINCE_MARGIN, index_stream, workflow_stream
from .views import BadQuery, IndexQuery, number, workflow_detail

__all__ = ["CANCEL_HEADER", "Dashboard"]

logger = logging.getLogger(__name__)

#: The header a cancel request must carry (browsers send it only from the dashboard's
#: own pages: a custom header makes a cross-site request fail its CORS preflight).
CANCEL_HEADER = ("X-Baton-Dashboard", "cancel")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
#: Seconds a browser may keep the dashboard's JS and CSS without asking again.
STATIC_MAX_AGE = 300
NO_STORE = "baton_celery dashboard: the store failed: %s"
TOO_MANY = "too many open live pages ({}); try again shortly"

#: Sent with every response: only the dashboard's own files run (so even a text that
#: slipped through unescaped could not run a script), and no other site frames it.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Dashboard:
    """A dashboard of one Celery app: its settings, its live :class:`Hub` and its
    :attr:`blueprint`.

    ``listen=False``: no broker listener; live pages then get this process's own events
    and, every heartbeat, what the store has. The hub starts on the first live page (or
    :meth:`start`); :meth:`close` stops it.
    """

    def __init__(
        self, celery_app: Any, config: DashboardConfig | None = None, *, listen: bool = True
    ) -> None:
        self.celery_app = celery_app
        self.config = config or DashboardConfig.from_app(celery_app)
        self.store: Store = install(celery_app).store
        self.hub = Hub(celery_app, self.store, stream_queue=self.config.stream_queue)
        self._listen = listen
        self._started = False
        self._start_lock = threading.Lock()
        self.blueprint = self._blueprint()

    def start(self) -> Dashboard:
        with self._start_lock:
            if not self._started:
                self.hub.start(listen_to_broker=self._listen)
                self._started = True
        return self

    def close(self) -> None:
        self.hub.close()

    # --- the blueprint ------------------------------------------------------------

    def _blueprint(self) -> Blueprint:
        # Its files are served by a route of its own, so that they too answer GET only.
        bp = Blueprint("baton_dashboard", __name__, template_folder="templates")

        def get(rule: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
            # Only GET (and HEAD, which Flask adds); OPTIONS too answers 405.
            return bp.route(rule, methods=["GET"], provide_automatic_options=False)

        bp.before_request(self._authenticate)
        bp.after_request(self.secure)
        bp.register_error_handler(HTTPException, self.error)
        bp.register_error_handler(BadQuery, lambda exc: self.error(exc, 400))
        bp.register_error_handler(StoreError, self._store_failed)
        get("/static/<path:filename>")(self.static)
        get("/")(self.index)
        get("/workflows/<workflow_id>")(self.workflow)
        get("/api/workflows")(self.api_workflows)
        get("/api/workflows/<workflow_id>")(self.api_workflow)
        get("/api/stream")(self.index_events)
        get("/api/workflows/<workflow_id>/stream")(self.workflow_events)
        bp.route(
            "/api/workflows/<workflow_id>/cancel", methods=["POST"], provide_automatic_options=False
        )(self.cancel)
        return bp

    def _authenticate(self) -> BaseResponse | None:
        verdict = auth.check(
            self.config,
            request.headers.get("Authorization"),
            request.cookies.get(auth.COOKIE),
            request.args.get("token"),
        )
        if not verdict.ok:
            response = self._plain("authentication required", 401)
            response.headers["WWW-Authenticate"] = verdict.challenge
            return response
        if verdict.set_cookie and self.config.token is not None:
            # Drop the token from the address (history, logs), keep it in the cookie.
            args = {k: v for k, v in request.args.items() if k != "token"}
            target = request.path + (f"?{urlencode(args)}" if args else "")
            moved = redirect(target, code=303)
            moved.set_cookie(
                auth.COOKIE,
                auth.cookie_value(self.config.token),
                httponly=True,
                samesite="Strict",
                path=url_for("baton_dashboard.index"),
            )
            return moved
        return None

    def secure(self, response: Response) -> Response:
        """Add :data:`SECURITY_HEADERS` to a response."""
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def _wants_json(self) -> bool:
        return "/api/" in request.path

    def _plain(self, message: str, status: int) -> Response:
        if self._wants_json():
            response = jsonify(error=message)
            response.status_code = status
            return response
        return Response(message + "\n", status, mimetype="text/plain")

    def error(self, exc: Exception, status: int | None = None) -> Response:
        """The dashboard's error response: JSON under /api/, else a small page."""
        if isinstance(exc, HTTPException):
            if exc.response is not None:  # abort(response): already made
                return exc.response  # type: ignore[return-value]
            code = exc.code or 500
            message = exc.description or exc.name
            if self._wants_json() or code not in (400, 404):
                response = self._plain(message, code)
            else:
                page = render_template("baton_error.html", code=code, message=message)
                response = Response(page, code)
            if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
                response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
            return response
        code = status or 500
        if self._wants_json():
            return self._plain(str(exc), code)
        return Response(render_template("baton_error.html", code=code, message=str(exc)), code)

    def _store_failed(self, exc: StoreError) -> Response:
        logger.warning(NO_STORE, exc)
        return self._plain("the store cannot be read right now; try again", 503)

    # --- pages and data -----------------------------------------------------------

    def static(self, filename: str) -> Response:
        return send_from_directory(STATIC, filename, max_age=STATIC_MAX_AGE)

    def _query(self) -> IndexQuery:
        return IndexQuery.from_args(request.args, self.config.page_size)

    def _page_of_workflows(self, query: IndexQuery) -> dict[str, Any]:
        now = time.time()
        found = self.store.workflows(
            limit=query.limit, before=query.before, label=query.label, state=query.state
        )
        more = len(found) == query.limit
        return {
            "workflows": [s.to_dict() for s in found],
            "next_before": found[-1].created_at if more else None,
            "now": now,
        }

    def _detail(self, workflow_id: str) -> dict[str, Any]:
        try:
            record = self.store.load(workflow_id)
            history = self.store.history(workflow_id)
        except UnknownWorkflow:
            abort(404, f"no workflow {workflow_id} in the store")
        return workflow_detail(record, history)

    def index(self) -> str:
        query = self._query()
        data = self._page_of_workflows(query)
        older = None
        if data["next_before"] is not None:
            older = url_for(".index", **query.params(before=data["next_before"]))
        # A full page shows workflows down to its oldest one: older ones are not its own.
        oldest = data["next_before"]
        stream_args: dict[str, Any] = {
            **query.params(state=None),
            "since": data["now"] - SINCE_MARGIN,
        }
        if oldest is not None:
            stream_args["oldest"] = oldest
        stream = url_for(".index_events", **stream_args)
        return render_template(
            "baton_index.html",
            query=query,
            data=data,
            older=older,
            newest=url_for(".index", **query.params(before=None)) if query.before else None,
            live={
                "stream": stream,
                "workflow_url": url_for(".workflow", workflow_id="WORKFLOW_ID"),
                "first_page": query.before is None,
                "oldest": oldest,
                "state": query.state,
                "label": query.label,
            },
        )

    def workflow(self, workflow_id: str) -> str:
        detail = self._detail(workflow_id)
        return render_template(
            "baton_workflow.html",
            detail=detail,
            live={
                "stream": url_for(".workflow_events", workflow_id=workflow_id),
                "cancel": url_for(".cancel", workflow_id=workflow_id)
                if self.config.allow_cancel
                else None,
                "cancel_header": list(CANCEL_HEADER),
            },
        )

    def api_workflows(self) -> Response:
        return jsonify(self._page_of_workflows(self._query()))

    def api_workflow(self, workflow_id: str) -> Response:
        return jsonify(self._detail(workflow_id))

    # --- live streams ---------------------------------------------------------------

    def _stream_response(self, body: Any, close: Callable[[], None]) -> Response:
        response = Response(body, mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
        response.call_on_close(close)
        return response

    def _subscribe(self, workflow_id: str | None) -> Subscription:
        """A live inbox for a new stream, or 503 when ``max_streams`` are open."""
        self.start()
        page = self.hub.subscribe(workflow_id, limit=self.config.max_streams)
        if page is None:
            response = self._plain(TOO_MANY.format(self.config.max_streams), 503)
            response.headers["Retry-After"] = "10"
            abort(response)
        return page

    def index_events(self) -> Response:
        query = self._query()
        # A client says where it was; never further back than a reconnect needs (the
        # index's catch-up is a bounded query, but a bounded query of recent ones).
        since = max(
            _position("since", float, time.time() - SINCE_MARGIN), time.time() - MAX_CATCH_UP
        )
        oldest = number(request.args, "oldest", float, None)
        page = self._subscribe(None)  # first: nothing after the replay is missed
        try:
            found = self.store.workflows(
                limit=MAX_PAGE, before=query.before, label=query.label, active_since=since
            )
            first = [s for s in found if oldest is None or s.created_at >= oldest]
        except BaseException:
            page.close()
            raise
        body = index_stream(
            page, first, label=query.label, since=since, heartbeat=self.config.heartbeat
        )
        return self._stream_response(body, page.close)

    def workflow_events(self, workflow_id: str) -> Response:
        after = _position("after", int, 0)
        page = self._subscribe(workflow_id)  # first: nothing after the history is missed
        try:
            first = self.store.history(workflow_id, after)
        except UnknownWorkflow:
            page.close()
            abort(404, f"no workflow {workflow_id} in the store")
        except BaseException:
            page.close()
            raise
        body = workflow_stream(self.store, page, workflow_id, after, first, self.config.heartbeat)
        return self._stream_response(body, page.close)

    def cancel(self, workflow_id: str) -> Response:
        if not self.config.allow_cancel:
            abort(405)
        if request.headers.get(CANCEL_HEADER[0]) != CANCEL_HEADER[1]:
            abort(400, f"a cancel needs the header {CANCEL_HEADER[0]}: {CANCEL_HEADER[1]}")
        try:
            WorkflowHandle(workflow_id, self.celery_app).cancel()
        except UnknownWorkflow:
            abort(404, f"no workflow {workflow_id} in the store")
        return jsonify(cancelled=workflow_id)


def _position(name: str, kind: type, default: Any) -> Any:
    """Where a stream starts: the ``Last-Event-ID`` a reconnecting browser sends, else the
    query's ``name`` (the page's snapshot), else ``default``."""
    resumed = request.headers.get("Last-Event-ID")
    if resumed:
        return number({"Last-Event-ID": resumed}, "Last-Event-ID", kind, default)
    return number(request.args, name, kind, default)
