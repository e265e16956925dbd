"""The Redis clients a RedisStore runs on: one made from a store URL, or a ready client,
replaced by a copy with the store's timeout and retry when it has no timeout of its own."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .base import StoreError

__all__ = ["client_from_url", "is_cluster", "with_timeout"]

logger = logging.getLogger(__name__)

UNBOUNDED = (
    "baton_celery: the Redis client given as the store has no socket_timeout and its %s "
    "cannot be copied with one: a hung Redis would block the task hooks; give the client "
    "a socket_timeout"
)


def _redis() -> Any:
    try:
        import redis
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the redis store needs the redis package: pip install 'baton_celery[redis]'"
        ) from None
    return redis


def _store_policy(timeout: float) -> dict[str, Any]:
    """How the store's connections behave: every socket operation bounded by ``timeout``,
    and a call retried once, on a connection error only (a pooled connection that a Redis
    restart closed): a timeout is not retried, the script may have run."""
    redis = _redis()
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    retry = Retry(
        ExponentialBackoff(cap=0.5, base=0.05), 1, supported_errors=(redis.ConnectionError,)
    )
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": retry}


def client_from_url(url: str, timeout: float, **options: Any) -> tuple[Any, str]:
    """The client for a store URL (``redis://``, ``rediss://``, ``unix://``,
    ``redis+cluster://host:port,...``), and the URL's ``key_prefix`` (default ``baton``).
    ``timeout`` bounds every socket operation; ``options`` go to the client."""
    redis = _redis()
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    key_prefix = query.pop("key_prefix", "baton")
    url = urlunsplit(parts._replace(query=urlencode(query)))
    common: dict[str, Any] = {**_store_policy(timeout), "decode_responses": True, **options}
    if not parts.scheme.endswith("+cluster"):
        return redis.Redis.from_url(url, **common), key_prefix
    from redis.cluster import ClusterNode, RedisCluster

    nodes = []
    for hostport in (parts.netloc.rpartition("@")[2] or "127.0.0.1:6379").split(","):
        host, _, port = hostport.rpartition(":")
        nodes.append(ClusterNode(host or "127.0.0.1", int(port or 6379)))  # type: ignore[no-untyped-call]
    auth = parts.netloc.rpartition("@")[0]
    if auth:
        user, _, password = auth.rpartition(":")
        common.setdefault("password", password or None)
        common.setdefault("username", user or None)
    if parts.scheme.startswith("rediss"):
        common.setdefault("ssl", True)
    try:
        return RedisCluster(startup_nodes=nodes, **common), key_prefix
    except redis.RedisError as exc:
        raise StoreError(f"redis cluster store {url}: {exc}") from exc


def is_cluster(client: Any) -> bool:
    try:
        from redis.cluster import RedisCluster
    except ImportError:  # pragma: no cover
        return False
    return isinstance(client, RedisCluster)


def with_timeout(client: Any, timeout: float) -> Any:
    """``client`` itself when its sockets time out (it has a ``socket_timeout``);
    otherwise a new client to the same server(s), with the same connection settings but
    the store's ``timeout`` and retry (:func:`_store_policy`), as a client made from a URL
    has them: without a timeout, a hung Redis would block every task hook forever. The
    given client is left as it is."""
    if is_cluster(client):
        return _cluster_with_timeout(client, timeout)
    redis = _redis()
    pool = client.connection_pool
    if pool.connection_kwargs.get("socket_timeout") is not None:
        return client
    if type(pool) not in (redis.ConnectionPool, redis.BlockingConnectionPool):
        logger.warning(UNBOUNDED, type(pool).__name__)  # e.g. Sentinel's: it needs more
        return client
    settings = _bounded(_settings(pool.connection_kwargs), timeout)
    settings.update(retry_on_error=[], retry_on_timeout=False)  # the store's retry alone
    copy = redis.ConnectionPool(
        connection_class=pool.connection_class, max_connections=pool.max_connections, **settings
    )
    return redis.Redis(connection_pool=copy)


def _settings(connection_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A pool's connection settings without what the pool adds by itself (a new pool
    adds its own: some versions keep handlers that belong to their pool there)."""
    redis = _redis()
    own = redis.ConnectionPool().connection_kwargs
    return {k: v for k, v in connection_kwargs.items() if k not in own}


def _bounded(settings: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``settings`` with the store's policy (a connect timeout of their own is kept)."""
    return {
        **settings,
        **_store_policy(timeout),
        "socket_connect_timeout": settings.get("socket_connect_timeout") or timeout,
    }


def _cluster_with_timeout(client: Any, timeout: float) -> Any:
    """A RedisCluster's copy: the same nodes, their settings (the client's connection
    kwargs) and its address remapping; its other cluster options take their defaults."""
    redis = _redis()
    from redis.cluster import REDIS_ALLOWED_KEYS, ClusterNode, RedisCluster

    node = client.get_default_node()
    node_settings = node.redis_connection.connection_pool.connection_kwargs
    if node_settings.get("socket_timeout") is not None:
        return client
    settings = {
        k: v
        for k, v in client.get_connection_kwargs().items()
        # the copy's own on_connect runs the user's function, as the client's did
        if k in REDIS_ALLOWED_KEYS and k != "redis_connect_func"
    }
    extra: dict[str, Any] = {}
    if getattr(client, "user_on_connect_func", None) is not None:
        extra["redis_connect_func"] = client.user_on_connect_func
    if getattr(client.nodes_manager, "address_remap", None) is not None:
        extra["address_remap"] = client.nodes_manager.address_remap
    nodes = [ClusterNode(n.host, n.port) for n in client.get_nodes()]  # type: ignore[no-untyped-call]
    try:
        return RedisCluster(startup_nodes=nodes, **_bounded(settings, timeout), **extra)
    except redis.RedisError as exc:
        raise StoreError(f"redis cluster store: {type(exc).__name__}: {exc}") from exc
