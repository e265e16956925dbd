"""What the OpenTelemetry (:mod:`baton_celery.otel`) and Prometheus
(:mod:`baton_celery.metrics`) instrumentation share: one connection to this process's
events per kind of instrumentation, the static shape of a workflow (cached), bounded
per-process memories, and turning both on from an app's ``baton_otel`` /
``baton_metrics`` settings.

Nothing here is connected to anything until an app turns one of them on.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import sys
import threading
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from . import pubsub
from .events import Event
from .guard import log_failure
from .runtime import Runtime, runtime_for
from .stores import UnknownWorkflow

__all__ = [
    "SHAPES",
    "Bounded",
    "Observer",
    "Shape",
    "Shapes",
    "switch_off",
    "switch_on_configured",
]

logger = logging.getLogger(__name__)

MISSING_EXTRA = "baton_celery: %s is on but %s is not installed (pip install 'baton_celery[%s]')"

K = TypeVar("K")
V = TypeVar("V")


class Bounded(Generic[K, V]):
    """A dict that forgets its oldest entries beyond ``size`` (thread-safe): what one
    process remembers between two events of the same step never grows without bound,
    whatever happens to the steps it saw start (a lost worker, a revoke elsewhere)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: collections.OrderedDict[K, V] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def pop(self, key: K) -> V | None:
        with self._lock:
            return self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@dataclasses.dataclass(frozen=True)
class Shape:
    """What never changes about a stored workflow, and the app whose store holds it."""

    runtime: Runtime
    created_at: float  # Unix time
    deps: Mapping[str, tuple[str, ...]]  # each step's dependencies
    needed: frozenset[str]  # the steps some other step depends on


class Shapes:
    """Workflow shapes by id, read from the store once per process (most recent first)."""

    def __init__(self, size: int = 1024) -> None:
        self._cache: Bounded[str, Shape] = Bounded(size)

    def get(self, workflow_id: str, runtimes: list[Runtime]) -> Shape | None:
        """The workflow's shape, from the first of ``runtimes`` whose store knows it;
        None when none does. A store error propagates (the caller's guard logs it)."""
        shape = self._cache.get(workflow_id)
        if shape is not None:
            return shape
        for runtime in runtimes:
            try:
                record = runtime.store.load(workflow_id)
            except UnknownWorkflow:
                continue
            deps = {s.name: tuple(s.deps) for s in record.steps.values()}
            needed = frozenset(d for names in deps.values() for d in names)
            shape = Shape(runtime, record.created_at, deps, needed)
            self._cache.put(workflow_id, shape)
            return shape
        return None

    def clear(self) -> None:
        self._cache.clear()


#: The shapes every kind of instrumentation reads (one load per workflow and process).
SHAPES = Shapes()


class Observer:
    """One kind of instrumentation. While at least one app is observed it receives every
    event made in this process (not those a bridge listener hears from others) and every
    workflow started here by an observed app; each call runs under the guard: a failure
    is logged, rate-limited, and never reaches the task or the caller."""

    name = "instrumentation"

    def __init__(self) -> None:
        self._apps: list[Any] = []
        self._lock = threading.Lock()

    @property
    def apps(self) -> list[Any]:
        return list(self._apps)

    def observes(self, app: Any) -> bool:
        return any(a is app for a in self._apps)

    def runtimes(self) -> list[Runtime]:
        found = (runtime_for(app) for app in self._apps)
        return [r for r in found if r is not None]

    def add(self, app: Any) -> bool:
        """Observe ``app``; False when it already was (twice is harmless)."""
        with self._lock:
            if self.observes(app):
                return False
            self._apps.append(app)
            if len(self._apps) == 1:
                # Events made here only: one heard from another process through a
                # listener was recorded where it happened.
                pubsub.event_made.connect(self._on_event, weak=False)
                pubsub.workflow_created.connect(self._on_created, weak=False)
        return True

    def remove(self, app: Any) -> bool:
        """Stop observing ``app``; everything is disconnected with the last one."""
        with self._lock:
            if not self.observes(app):
                return False
            self._apps = [a for a in self._apps if a is not app]
            if not self._apps:
                pubsub.event_made.disconnect(self._on_event)
                pubsub.workflow_created.disconnect(self._on_created)
                self.forget()
        return True

    def _on_event(self, workflow_id: str, event: Event | None = None, **_: Any) -> None:
        if event is None:
            return
        try:
            self.observe(event)
        except Exception as exc:
            log_failure(f"{self.name} of an event", exc, workflow_id)

    def _on_created(self, workflow_id: str, app: Any = None, label: Any = None, **_: Any) -> None:
        if not self.observes(app):
            return
        try:
            self.created(app, workflow_id, label)
        except Exception as exc:
            log_failure(f"{self.name} of a workflow's start", exc, workflow_id)

    # --- for subclasses ---------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """An event made in this process."""

    def created(self, app: Any, workflow_id: str, label: str | None) -> None:
        """A workflow of an observed app was just stored, in this process."""

    def forget(self) -> None:
        """Drop what this process remembers (the last app stopped being observed)."""


# --- turning them on from the configuration --------------------------------------------


def switch_on_configured(app: Any) -> None:
    """Turn on what the app's ``baton_otel`` / ``baton_metrics`` ask for: now when its
    configuration is loaded, else once Celery loads it (install never loads it)."""
    if app.configured:
        _switch_on(app)
    else:
        app.on_after_configure.connect(_on_after_configure, weak=False)


def _on_after_configure(sender: Any = None, **_: Any) -> None:
    if sender is not None and runtime_for(sender) is not None:
        _switch_on(sender)


def _switch_on(app: Any) -> None:
    runtime = runtime_for(app)
    if runtime is None:
        return
    config = runtime.config
    if config.otel:
        try:
            from . import otel
        except ImportError:
            logger.error(MISSING_EXTRA, "baton_otel", "opentelemetry-api", "otel")
        else:
            otel.instrument(app)
    if config.metrics:
        try:
            from . import metrics
        except ImportError:
            logger.error(MISSING_EXTRA, "baton_metrics", "prometheus-client", "prometheus")
        else:
            metrics.instrument(app)


def switch_off(app: Any) -> None:
    """Stop observing ``app`` (what :func:`baton_celery.uninstall` does)."""
    app.on_after_configure.disconnect(_on_after_configure)
    for name in ("baton_celery.otel", "baton_celery.metrics"):
        module = sys.modules.get(name)
        if module is not None:
            module.uninstrument(app)
