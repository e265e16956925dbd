"""What baton keeps per installed Celery app: its configuration and its store."""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from typing import Any

from .config import Config
from .events import cut_error
from .stores import Store, store_from_url

logger = logging.getLogger(__name__)

CHANGED_AFTER_INSTALL = (
    "baton_celery: %s changed after install(app); using the new value%s. Set baton_* "
    "settings before calling install(app)."
)

__all__ = ["Runtime", "runtime_for"]

#: Seconds after its publication a step's message may still take the fast path (see
#: ``Runtime.fresh_for``).
FRESH_FOR = 60.0

_runtimes: weakref.WeakKeyDictionary[Any, Runtime] = weakref.WeakKeyDictionary()


class Runtime:
    """An installed app's baton state. The store is built on first use, so each process
    (including each prefork child, after the fork) builds its own connections."""

    def __init__(self, app: Any, config: Config | None = None) -> None:
        self.app = app
        # None until the app's configuration is loaded: reading app.conf earlier would
        # load it (Celery's PendingConfiguration), making config_from_object() eager and
        # dropping defaults added later. See install().
        self._config = config
        self._store: Store | None = None
        self._fast_path: bool | None = None
        self._fresh_for: float | None = None
        self._lock = threading.Lock()

    @property
    def config(self) -> Config:
        config = self._config
        if config is None:
            config = self._config = Config.from_app(self.app)
        return config

    @property
    def store(self) -> Store:
        store = self._store
        if store is None:
            with self._lock:
                if self._store is None:
                    self._take_up_late_settings()
                    configured: Any = self.app.conf.get("baton_store")
                    if isinstance(configured, Store):
                        store = configured
                    else:
                        store = store_from_url(
                            self.config.store,
                            timeout=self.config.store_timeout,
                            retention=self.config.retention,
                        )
                    if self.config.bridge and store.feed_channel:
                        # A store that can publish its events itself (Redis) is the
                        # bridge: no broker publish per event.
                        store.channel = store.feed_channel
                    self._store = store
                store = self._store
        return store

    def _take_up_late_settings(self) -> None:
        """Settings are read at install; one changed before the store's first use in this
        process (e.g. ``baton_bridge = True`` set after ``install(app)``) is taken up
        here, loudly, rather than silently ignored."""
        if self._config is None:
            return  # read now, on first use: nothing to compare with
        current = Config.from_app(self.app)
        changed = [
            f.name
            for f in dataclasses.fields(Config)
            if getattr(current, f.name) != getattr(self.config, f.name)
        ]
        if changed:
            names = ", ".join(f"baton_{n}" for n in changed)
            logger.warning(CHANGED_AFTER_INSTALL, names, "s" if len(changed) > 1 else "")
            self._config = current

    @property
    def fast_path(self) -> bool:
        """Whether a step's first delivery may skip the store's gate (``baton_fast_begin``,
        see ``hooks._gate_known``): the option is on and the broker flags redeliveries."""
        known = self._fast_path
        if known is None:
            known = self._fast_path = self.config.fast_begin and _flags_redeliveries(self.app)
        return known

    @property
    def fresh_for(self) -> float:
        """Seconds after its publication a message takes the fast path: below the
        backstop's threshold (it may have discarded an older step) and half a Redis
        broker's visibility timeout (past it, a copy may have been restored)."""
        known = self._fresh_for
        if known is None:
            conf = self.app.conf
            limits = [FRESH_FOR, float(conf.get("baton_backstop_after") or 3600.0) / 2]
            visibility = (conf.get("broker_transport_options") or {}).get("visibility_timeout")
            if visibility:
                limits.append(float(visibility) / 2)
            known = self._fresh_for = min(limits)
        return known

    @property
    def broker_bridge(self) -> bool:
        """Whether events go to the broker bridge: the bridge is on and the store does
        not publish them itself."""
        return self.config.bridge and not self.store.channel

    def close(self) -> None:
        """Close the store's connections, if this process opened any."""
        store, self._store = self._store, None
        if store is not None:
            store.close()

    def error_text(self, exc: BaseException | str | None) -> str | None:
        """``"ValueError: boom"``, cut to ``baton_max_error_length`` characters."""
        if exc is None:
            return None
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        try:
            text.encode()
        except UnicodeEncodeError:  # lone surrogates (a path decoded with surrogateescape)
            text = text.encode("utf-8", "backslashreplace").decode()
        return cut_error(text, self.config.max_error_length)


#: Brokers whose redelivered messages say so (``delivery_info["redelivered"]``): AMQP
#: natively, kombu's Redis transport when it restores unacked messages. (Its virtual
#: in-process transports mark the message itself, not its delivery_info.)
REDELIVERY_FLAGGED = frozenset(
    {"amqp", "pyamqp", "amqps", "librabbitmq", "redis", "rediss", "sentinel"}
)


def _flags_redeliveries(app: Any) -> bool:
    try:
        return str(app.connection_for_read().transport_cls) in REDELIVERY_FLAGGED
    except Exception:  # an unknown transport: ask the store every time
        return False


def runtime_for(app: Any) -> Runtime | None:
    """The runtime of an installed app, or None when baton is not installed on it."""
    return _runtimes.get(app)


def register(app: Any, runtime: Runtime) -> None:
    _runtimes[app] = runtime


def unregister(app: Any) -> Runtime | None:
    return _runtimes.pop(app, None)


def installed_apps() -> list[Any]:
    return list(_runtimes.keys())
