"""The relay's background prune runs off the event loop: a slow prune never stops it answering."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mlwarden import components
from relay.app import WEBHOOK_PATH, Relay, create_app
from relay.auth import Credentials
from relay.store.base import RETENTION_SECONDS, Store
from relay.store.redis import RedisStore
from relay.store.sqlite import SQLiteStore
from tests.test_relay_stores import dead_payload_bodies
from tests.test_relay_support import TOKEN, FakeClock, alert, body, make_config

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def held_prune(store_class: type[Store]) -> type[Store]:
    """``store_class`` whose prune, once started, waits for ``release`` before it prunes."""

    class HeldPrune(store_class):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.started, self.release, self.finished = threading.Event(), threading.Event(), threading.Event()

        def prune(self, now: float) -> None:
            self.started.set()
            self.release.wait()
            super().prune(now)
            self.finished.set()

    return HeldPrune


@pytest.fixture(params=["sqlite", "redis"])
def held_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        store = held_prune(SQLiteStore)(tmp_path / "relay.db")
    else:
        server: components.Component = request.getfixturevalue("redis_server")
        store = held_prune(RedisStore)(f"redis://127.0.0.1:{server.port}/0")
    yield store
    store.close()


def test_the_relay_answers_while_a_prune_is_running(held_store: Any) -> None:
    clock = FakeClock()
    held_store.dead_letter_payload(b"old", "bad JSON", clock() - RETENTION_SECONDS - 1)
    relay = Relay(make_config(), held_store, Credentials(TOKEN), clock=clock)
    # Only breaks a deadlock: a prune on the event loop would hold every answer until this fires,
    # and then each answer would come after the prune finished, failing the test, not hanging it.
    deadlock_breaker = threading.Timer(20, held_store.release.set)
    deadlock_breaker.start()
    with TestClient(create_app(relay)) as client:  # background tasks on: the prune starts at once
        try:
            assert held_store.started.wait(30)
            assert client.get("/healthz").json() == {"status": "ok"}
            assert client.get("/readyz").json() == {"status": "ready"}
            heartbeat = body(alert(name="Watchdog", severity="none"))  # queues no delivery: nothing leaves the host
            assert client.post(WEBHOOK_PATH, content=heartbeat, headers=AUTH).json() == {"status": "accepted", "jobs": 0}
            assert client.get("/api/v1/outbox", headers=AUTH).json()["depth"] == 0
            assert not held_store.finished.is_set(), "answered only after the prune"
            assert dead_payload_bodies(held_store) == [b"old"]
        finally:
            deadlock_breaker.cancel()
            held_store.release.set()
        assert held_store.finished.wait(30)
    assert dead_payload_bodies(held_store) == []
