"""Per-app configuration, read from ``app.conf`` (``baton_*`` keys)."""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from typing import Any

__all__ = ["Config", "default_store_url"]


def default_store_url(app: Any) -> str:
    """A SQLite file in the temp dir, named after the app: the client and the workers of
    one host find the same file without any configuration."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", app.main or "default")
    return "sqlite:///" + os.path.join(tempfile.gettempdir(), f"baton_celery-{name}.sqlite3")


def _flag(value: Any) -> bool:
    """A boolean setting; strings such as "false" / "0" / "off" (from env vars) are False."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


@dataclasses.dataclass(frozen=True)
class Config:
    store: str  # baton_store: a store URL
    store_timeout: float = 5.0  # baton_store_timeout: seconds a store call may wait
    retention: float = 86400.0  # baton_retention: seconds a finished workflow is kept
    snooze_delay: float = 1.0  # baton_snooze_delay: seconds before a snoozed step retries
    max_error_length: int = 2000  # baton_max_error_length: events' error strings are cut here
    store_results: bool = True  # baton_store_results: keep results for dependency_results()
    # baton_fast_begin: a fresh first delivery runs without asking the store's gate, its
    # begin sent with its settle (see hooks._gate_known)
    fast_begin: bool = True
    # baton_running_after: seconds after which such a step's begin is sent anyway, so
    # that it shows as executing (see running.py)
    running_after: float = 0.5
    # The broker bridge (baton_celery.bridge / baton_celery.listener):
    bridge: bool = False  # baton_bridge: also publish every event on the broker
    bridge_exchange: str = "baton_celery.events"  # baton_bridge_exchange: the fanout's name
    bridge_background: bool = False  # baton_bridge_background: publish from a thread
    bridge_queue_size: int = 10000  # baton_bridge_queue_size: events queued per process
    bridge_publish_retries: int = 2  # baton_bridge_publish_retries: per publish
    bridge_flush_timeout: float = 2.0  # baton_bridge_flush_timeout: at process exit
    bridge_reorder_window: float = 2.0  # baton_bridge_reorder_window: a listener holds a gap
    bridge_max_message: int = 65536  # baton_bridge_max_message: bytes; larger are dropped
    # Instrumentation, off unless asked for (baton_celery.otel / baton_celery.metrics):
    otel: bool = False  # baton_otel: OpenTelemetry spans of workflows and step attempts
    metrics: bool = False  # baton_metrics: Prometheus metrics of steps and workflows

    @classmethod
    def from_app(cls, app: Any) -> Config:
        conf = app.conf

        def get(key: str, default: Any) -> Any:
            value = conf.get(f"baton_{key}")
            return default if value is None else value

        config = cls(
            store=get("store", None) or default_store_url(app),
            store_timeout=float(get("store_timeout", cls.store_timeout)),
            retention=float(get("retention", cls.retention)),
            snooze_delay=float(get("snooze_delay", cls.snooze_delay)),
            max_error_length=int(get("max_error_length", cls.max_error_length)),
            store_results=_flag(get("store_results", cls.store_results)),
            fast_begin=_flag(get("fast_begin", cls.fast_begin)),
            running_after=float(get("running_after", cls.running_after)),
            bridge=_flag(get("bridge", cls.bridge)),
            bridge_exchange=str(get("bridge_exchange", cls.bridge_exchange)),
            bridge_background=_flag(get("bridge_background", cls.bridge_background)),
            bridge_queue_size=int(get("bridge_queue_size", cls.bridge_queue_size)),
            bridge_publish_retries=int(get("bridge_publish_retries", cls.bridge_publish_retries)),
            bridge_flush_timeout=float(get("bridge_flush_timeout", cls.bridge_flush_timeout)),
            bridge_reorder_window=float(get("bridge_reorder_window", cls.bridge_reorder_window)),
            bridge_max_message=int(get("bridge_max_message", cls.bridge_max_message)),
            otel=_flag(get("otel", cls.otel)),
            metrics=_flag(get("metrics", cls.metrics)),
        )
        if config.max_error_length < 20:
            raise ValueError("baton_max_error_length must be at least 20")
        return config
