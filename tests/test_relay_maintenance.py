"""The relay's background prune and watchdog check run off the event loop: a slow store call there
never stops the relay answering."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from mlwarden.relay.app import WEBHOOK_PATH, Relay, create_app
from mlwarden.relay.auth import Credentials
from mlwarden.relay.store.base import RETENTION_SECONDS, Store
from mlwarden.relay.store.redis import RedisStore
from mlwarden.relay.store.sqlite import SQLiteStore

from mlwarden import components
from tests.test_relay_stores import dead_payload_bodies
from tests.test_relay_support import TOKEN, FakeClock, alert, body, make_config

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def held(store_class: type[Store], method: str) -> type[Store]:
    """``store_class`` whose ``method``, once called, waits for ``release`` before it runs."""

    class Held(store_class):  # type: ignore[valid-type, misc]  # a subclass of the store class the test is parametrized with
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.started, self.release, self.finished = threading.Event(), threading.Event(), threading.Event()

    def held_method(self: Any, *args: Any) -> Any:
        self.started.set()
        self.release.wait()
        result = getattr(store_class, method)(self, *args)
        self.finished.set()
        return result

    setattr(Held, method, held_method)
    return Held


def open_held(kind: str, method: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    if kind == "sqlite":
        store = held(SQLiteStore, method)(tmp_path / "relay.db")
    else:
        server: components.Component = request.getfixturevalue("redis_server")
        store = held(RedisStore, method)(f"redis://127.0.0.1:{server.port}/0")
    request.addfinalizer(store.close)
    return store


@contextlib.contextmanager
def serving_while_held(store: Any, clock: FakeClock) -> Iterator[TestClient]:
    """The app with its background tasks, once the held call has started; released on the way out."""
    # Only breaks a deadlock: a held call on the event loop would hold every answer until this
    # fires, and then each answer would come after the call finished, failing the test, not hanging it.
    deadlock_breaker = threading.Timer(20, store.release.set)
    deadlock_breaker.start()
    relay = Relay(make_config(), store, Credentials(TOKEN), clock=clock)
    with TestClient(create_app(relay)) as client:
        try:
            assert store.started.wait(30)
            yield client
        finally:
            deadlock_breaker.cancel()
            store.release.set()
        assert store.finished.wait(30)


def assert_answers(client: TestClient, store: Any) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    heartbeat = body(alert(name="Watchdog", severity="none"))  # queues no delivery: nothing leaves the host
    assert client.post(WEBHOOK_PATH, content=heartbeat, headers=AUTH).json() == {"status": "accepted", "jobs": 0}
    assert client.get("/api/v1/outbox", headers=AUTH).json()["depth"] == 0
    assert not store.finished.is_set(), "answered only after the held call"


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_the_relay_answers_while_a_prune_is_running(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = open_held(kind, "prune", tmp_path, request)
    clock = FakeClock()
    store.dead_letter_payload(b"old", "bad JSON", clock() - RETENTION_SECONDS - 1)
    with serving_while_held(store, clock) as client:  # the prune starts with the app
        assert_answers(client, store)
        assert dead_payload_bodies(store) == [b"old"]
    assert dead_payload_bodies(store) == []


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_the_relay_answers_while_a_watchdog_check_waits_for_the_store(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    store = open_held(kind, "watchdog", tmp_path, request)
    with serving_while_held(store, FakeClock()) as client:  # the first check starts with the app
        assert_answers(client, store)


@pytest.mark.parametrize(("kind", "method"), [("sqlite", "intake_batch"), ("redis", "intake_batch"), ("sqlite", "claim")])
def test_the_relay_answers_while_a_webhook_or_delivery_waits_for_the_store(
    kind: str, method: str, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    store = open_held(kind, method, tmp_path, request)
    deadlock_breaker = threading.Timer(20, store.release.set)  # as in serving_while_held
    deadlock_breaker.start()
    relay = Relay(make_config(), store, Credentials(TOKEN), clock=FakeClock())
    answers: list[Any] = []
    with TestClient(create_app(relay)) as client:
        webhook = threading.Thread(target=lambda: answers.append(
            client.post(WEBHOOK_PATH, content=body(alert(name="Held")), headers=AUTH).json()))
        webhook.start()  # its commit (or, for claim, the delivery it queues) waits for the store
        try:
            assert store.started.wait(30)
            assert client.get("/healthz").json() == {"status": "ok"}
            assert not store.finished.is_set(), "answered only after the held call"
        finally:
            deadlock_breaker.cancel()
            store.release.set()
        webhook.join(30)
    assert answers and answers[0]["status"] == "accepted"
