"""Stores: where workflow state lives. One factory turns a URL into a backend."""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import unquote, urlsplit

from .base import RecordStore, Store, StoreError, UnknownWorkflow

__all__ = ["RecordStore", "Store", "StoreError", "UnknownWorkflow", "store_from_url"]

# scheme -> "module:Class", imported only when used.
BACKENDS = {
    "memory": "baton_celery.stores.memory:MemoryStore",
    "sqlite": "baton_celery.stores.sqlite:SQLiteStore",
    "redis": "baton_celery.stores.redis:RedisStore",
    "rediss": "baton_celery.stores.redis:RedisStore",
    "unix": "baton_celery.stores.redis:RedisStore",
    "redis+cluster": "baton_celery.stores.redis:RedisStore",
    "rediss+cluster": "baton_celery.stores.redis:RedisStore",
}


def _backend(scheme: str) -> Any:
    try:
        target = BACKENDS[scheme]
    except KeyError:
        known = ", ".join(f"{s}://" for s in sorted(BACKENDS))
        raise ValueError(f"unknown baton store scheme {scheme!r}: use one of {known}") from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _is_redis_client(value: Any) -> bool:
    """A ``redis.Redis`` or ``RedisCluster``, or a subclass's instance (without importing
    redis: a value cannot be one before redis was imported)."""
    import sys

    redis = sys.modules.get("redis")
    if redis is None:
        return False
    return isinstance(value, (redis.Redis, getattr(redis, "RedisCluster", redis.Redis)))


def store_from_url(url: str, **options: Any) -> Store:
    """Build a store from a URL: ``memory://``, ``sqlite:///path/to/file.sqlite3``
    (``sqlite:////abs/path`` style absolute paths and ``sqlite:///relative`` both work),
    ``redis://host:port/db``, ``rediss://...``, ``unix:///path/redis.sock?db=0`` or
    ``redis+cluster://host:port[,host:port...]`` (``?key_prefix=`` namespaces the keys).
    A ready ``redis.Redis`` or ``RedisCluster`` client is accepted instead of a URL.
    ``options`` are passed to the backend (e.g. ``timeout``, ``retention``)."""
    if _is_redis_client(url):
        from .redis import RedisStore

        return RedisStore(
            url, retention=options.get("retention", 86400.0), timeout=options.get("timeout", 5.0)
        )
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(
            f"baton store must be a URL such as 'sqlite:///baton.sqlite3', got {url!r}"
        )
    parts = urlsplit(url)
    cls = _backend(parts.scheme)
    if parts.scheme == "memory":
        store: Store = cls()  # nothing to configure: options only matter to other backends
        return store
    if cls.__name__ == "RedisStore":
        store = cls.from_url(url, **options)
        return store
    path = unquote(parts.path)
    if parts.netloc:
        raise ValueError(f"sqlite store URL takes no host: {url!r} (use sqlite:///path)")
    # sqlite:///rel/file -> "rel/file"; sqlite:////abs/file -> "/abs/file"
    path = path[1:] if path.startswith("/") else path
    if not path:
        raise ValueError(f"sqlite store URL needs a file path: {url!r}")
    store = cls(path, **options)
    return store
