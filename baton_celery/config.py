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


@dataclasses.dataclass(frozen=True)
class Config:
    store: str  # baton_store: a store URL
    store_timeout: float = 5.0  # baton_store_timeout: seconds a store call may wait
    retention: float = 86400.0  # baton_retention: seconds a finished workflow is kept
    snooze_delay: float = 1.0  # baton_snooze_delay: seconds before a snoozed step retries
    max_error_length: int = 2000  # baton_max_error_length: events' error strings are cut here
    store_results: bool = True  # baton_store_results: keep results for dependency_results()

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
            store_results=bool(get("store_results", cls.store_results)),
        )
        if config.max_error_length < 20:
            raise ValueError("baton_max_error_length must be at least 20")
        return config
