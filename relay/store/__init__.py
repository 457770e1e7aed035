"""Open the store named by a state URL: ``sqlite:///path/relay.db`` or ``redis://host:port/db``."""

from __future__ import annotations

from pathlib import Path

from mlwarden.relay.store.base import Store, StoreError

SQLITE_SCHEME = "sqlite:///"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def check_url(url: str) -> str:
    """``url`` if :func:`open_store` knows its scheme (the CLI checks it before anything starts)."""
    if not url.startswith((SQLITE_SCHEME, *REDIS_SCHEMES)):
        raise ValueError("expected sqlite:///path/relay.db or redis://host:port/db")
    return url


def open_store(url: str) -> Store:
    if check_url(url).startswith(SQLITE_SCHEME):
        from mlwarden.relay.store.sqlite import SQLiteStore

        return SQLiteStore(Path(url.removeprefix("sqlite://")))
    from mlwarden.relay.store.redis import RedisStore

    return RedisStore(url)


__all__ = ["Store", "StoreError", "check_url", "open_store"]
