"""Connecting baton to a Celery app, and undoing it.

:func:`install` does four things, and :func:`uninstall` undoes each of them: it keeps
the app's runtime (configuration and store), puts baton's task annotations in front of
the app's own (the wrapped ``before_start`` and ``retry``, see :mod:`task_wrappers`),
adds a step to its workers' consumer (:mod:`revokes`), and connects the signal receivers
of :mod:`hooks` (process-wide, once for every app).
"""

from __future__ import annotations

from typing import Any

from celery import signals

from . import _observe, bridge
from .config import Config
from .guard import guarded
from .hooks import RECEIVERS
from .revokes import ReceivesRevokes
from .runtime import Runtime, installed_apps, register, runtime_for, unregister
from .task_wrappers import TaskAnnotations, unwrap_task_class, wrap_task_class

__all__ = ["install", "uninstall"]

# Celery caches the app's prepared task annotations under this attribute (a
# cached_property); baton's stand-in takes its place, and reads the user's setting live.
ANNOTATIONS_ATTR = "annotations"


def _dispatch_uid(receiver: Any) -> str:
    return f"baton_celery.{receiver.__name__}"


def _connect_receivers() -> None:
    # Celery's signals are process-wide: connect once (dispatch_uid) and strongly
    # (weak=False); the receivers find each app's runtime through sender.app.
    for name, receiver in RECEIVERS:
        getattr(signals, name).connect(receiver, weak=False, dispatch_uid=_dispatch_uid(receiver))


def _disconnect_receivers() -> None:
    for name, receiver in RECEIVERS:
        getattr(signals, name).disconnect(receiver, dispatch_uid=_dispatch_uid(receiver))


def _bound_task_classes(app: Any) -> list[type]:
    return [type(task) for task in app.tasks.values()] if app.finalized else []


def install(app: Any) -> Runtime:
    """Connect baton_celery to a Celery app.

    Its ``baton_*`` settings are read now when the app is already configured (a setting
    changed later is taken up, with a warning, when the app's store is first used in a
    process), else when baton first needs them: install never loads a pending
    configuration, so ``config_from_object()`` after it stays lazy.

    Installing twice is harmless, and each app in a process keeps its own configuration.
    """
    runtime = runtime_for(app)
    if runtime is not None:
        return runtime
    runtime = Runtime(app, Config.from_app(app) if app.configured else None)
    # Task classes bound from now on get the wrappers through the annotations; those
    # already bound (the app was finalized before install) get them here.
    app.__dict__[ANNOTATIONS_ATTR] = [TaskAnnotations(app)]
    for cls in _bound_task_classes(app):
        wrap_task_class(cls)
    register(app, runtime)
    app.steps["consumer"].add(ReceivesRevokes)  # for workers made from now on
    _connect_receivers()
    _observe.switch_on_configured(app)  # baton_otel / baton_metrics: nothing when off
    return runtime


def uninstall(app: Any) -> None:
    """Undo :func:`install` for this app: its task classes get their own methods back,
    its bridge publisher and store are closed, and the receivers are disconnected once no
    app has baton installed."""
    if runtime_for(app) is not None:
        with guarded("turning off instrumentation"):
            _observe.switch_off(app)
    runtime = unregister(app)
    if runtime is None:
        return
    if isinstance(app.__dict__.get(ANNOTATIONS_ATTR), list) and any(
        isinstance(a, TaskAnnotations) for a in app.__dict__[ANNOTATIONS_ATTR]
    ):
        del app.__dict__[ANNOTATIONS_ATTR]  # Celery prepares the user's own again
    for cls in _bound_task_classes(app):
        unwrap_task_class(cls)
    app.steps["consumer"].discard(ReceivesRevokes)
    with guarded("closing the bridge publisher"):
        bridge.close(runtime)
    with guarded("closing the store"):
        runtime.close()
    if not installed_apps():
        _disconnect_receivers()
