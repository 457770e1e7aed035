"""Open the store named by a state URL: ``sqlite:///path/relay.db`` or ``redis://host:port/db``."""

from __future__ import annotations

from pathlib import Path

from relay.store.base import Store, StoreError


def open_store(url: str) -> Store:
    if url.startswith("sqlite:///"):
        from relay.store.sqlite import SQLiteStore

        return SQLiteStore(Path(url.removeprefix("sqlite://")))
    if url.startswith(("redis://", "rediss://", "unix://")):
        from relay.store.redis import RedisStore

        return RedisStore(url)
    raise ValueError("expected sqlite:///path/relay.db or redis://host:port/db")


__all__ = ["Store", "StoreError", "open_store"]
