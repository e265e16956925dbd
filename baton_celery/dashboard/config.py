"""The dashboard's settings, read from the Celery app's ``baton_dashboard_*`` keys."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["DashboardConfig"]

BAD_SETTING = "baton_dashboard_{}: {}"


@dataclasses.dataclass(frozen=True)
class DashboardConfig:
    """What ``app.conf.baton_dashboard_<name>`` sets (see docs/dashboard.md)."""

    host: str = "127.0.0.1"  # the address `celery baton dashboard` binds to
    port: int = 5566  # and its port (0: any free port)
    prefix: str = ""  # serve under this path (e.g. "/baton" behind a proxy)
    token: str | None = None  # a bearer token every request must carry
    basic_auth: str | None = None  # "user:password" for HTTP basic auth
    allow_cancel: bool = False  # show a cancel button and accept its POST
    page_size: int = 50  # workflows per index page
    threads: int = 80  # the server's worker threads: each open live page holds one
    max_streams: int = 64  # open live pages at once; more get 503 until one closes
    heartbeat: float = 15.0  # seconds between keep-alives on a quiet live stream
    stream_queue: int = 10000  # events buffered per live page before it must resync

    @classmethod
    def from_app(cls, app: Any, **overrides: Any) -> DashboardConfig:
        """The app's settings, then ``overrides`` (those not None) on top; checked."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            value = overrides.get(field.name)
            if value is None:
                value = app.conf.get(f"baton_dashboard_{field.name}")
            if value is not None:
                values[field.name] = _coerce(field.name, field.default, value)
        return cls(**values).checked()

    def checked(self) -> DashboardConfig:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(BAD_SETTING.format(name, why))

        if not 0 <= self.port <= 65535:
            raise bad("port", f"must be 0-65535, got {self.port}")
        if self.prefix and (not self.prefix.startswith("/") or self.prefix.endswith("/")):
            raise bad("prefix", f"must start with / and not end with one, got {self.prefix!r}")
        if self.basic_auth is not None and ":" not in self.basic_auth:
            raise bad("basic_auth", "must be 'user:password'")
        if self.token is not None and len(self.token) < 8:
            raise bad("token", "must be at least 8 characters")
        if not 1 <= self.page_size <= 1000:
            raise bad("page_size", f"must be 1-1000, got {self.page_size}")
        if self.threads < 4:
            raise bad("threads", f"must be at least 4, got {self.threads}")
        if not 1 <= self.max_streams <= self.threads - 2:
            raise bad("max_streams", f"must be 1 to threads - 2 ({self.threads - 2})")
        if not 0.05 <= self.heartbeat <= 300:
            raise bad("heartbeat", f"must be 0.05-300 seconds, got {self.heartbeat}")
        if self.stream_queue < 10:
            raise bad("stream_queue", f"must be at least 10, got {self.stream_queue}")
        return self


def _coerce(name: str, default: Any, value: Any) -> Any:
    """A setting in its field's type; strings (from environment variables) are parsed."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.strip().lower() not in ("", "0", "false", "no", "off")
            return bool(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(BAD_SETTING.format(name, f"cannot use {value!r}")) from None
