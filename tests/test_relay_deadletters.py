"""Dead letters over HTTP: rejected payloads and failed deliveries with their reasons, and retry."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from mlwarden.relay.app import WEBHOOK_PATH, Relay, create_app
from mlwarden.relay.auth import Credentials
from mlwarden.relay.store.base import TRIGGER_UNDELIVERED, Store
from mlwarden.relay.store.sqlite import SQLiteStore

from tests.test_relay_stores import store  # noqa: F401 (the SQLite and Redis store fixture)
from tests.test_relay_support import TOKEN, FakeClock, accept, alert, body, make_config

AUTH = {"Authorization": f"Bearer {TOKEN}"}
PAGE = {"name": "GpuXid", "severity": "critical"}


def test_dead_payloads_are_listed_newest_first_with_their_reason(store: Store) -> None:  # noqa: F811
    store.dead_letter_payload(b'{"alerts": "x"}', "field 'alerts' is missing or not a list", 100.0)
    store.dead_letter_payload(b"\xff not utf-8", "body is not valid JSON", 101.0)
    newest, oldest = store.dead_payloads()
    assert newest.reason == "body is not valid JSON" and newest.received_at == 101.0
    assert oldest.body == b'{"alerts": "x"}' and oldest.id and oldest.id != newest.id


def test_a_retried_dead_trigger_and_its_resolve_go_out_in_order(store: Store) -> None:  # noqa: F811
    config = make_config()
    accept(store, config, body(alert(**PAGE)), 100.0)
    accept(store, config, body(alert(**PAGE, status="resolved")), 101.0)
    [trigger] = store.claim("pd", 101.0, 10, lease=60)
    store.dead_letter([trigger], "HTTP 400 bad routing key")  # the resolve behind it dies with it
    resolve = next(j for j in store.jobs() if j.destination == "pd" and j.notice.kind == "resolved")
    assert resolve.last_error == TRIGGER_UNDELIVERED
    assert store.retry_dead("no-such-job", 200.0) is None
    retried = store.retry_dead(trigger.id, 200.0)
    assert retried is not None and retried.status == "pending" and retried.attempts == 0
    assert store.retry_dead(trigger.id, 200.0) is None  # pending now, not dead
    assert store.retry_dead(resolve.id, 200.0) is not None
    [first] = store.claim("pd", 200.0, 10, lease=60)
    assert first.id == trigger.id
    store.delivered([first])
    [second] = store.claim("pd", 200.0, 10, lease=60)
    assert second.id == resolve.id


def test_dead_letters_over_http(tmp_path: Path) -> None:
    relay = Relay(make_config(), SQLiteStore(tmp_path / "relay.db"), Credentials(TOKEN), clock=FakeClock())
    with TestClient(create_app(relay, background=False)) as client:
        assert client.get("/api/v1/dead-letters").status_code == 401
        assert client.post("/api/v1/dead-letters/x/retry").status_code == 401
        assert client.post(WEBHOOK_PATH, content=b'{"alerts": 7}', headers=AUTH).status_code == 400
        client.post(WEBHOOK_PATH, content=body(alert()), headers=AUTH)
        [job] = relay.store.claim("ops", relay.clock(), 10, lease=60)
        relay.store.dead_letter([job], "slack: HTTP 404 no_service")
        dead = client.get("/api/v1/dead-letters", headers=AUTH).json()
        [bad] = dead["payloads"]
        assert bad["body"] == '{"alerts": 7}' and "alerts" in bad["reason"] and not bad["body_truncated"]
        [delivery] = dead["deliveries"]
        assert delivery["id"] == job.id and delivery["reason"] == "slack: HTTP 404 no_service"
        assert client.post("/api/v1/dead-letters/nope/retry", headers=AUTH).status_code == 404
        retried = client.post(f"/api/v1/dead-letters/{job.id}/retry", headers=AUTH)
        assert retried.status_code == 200 and retried.json()["status"] == "pending"
        assert client.get("/api/v1/dead-letters", headers=AUTH).json()["deliveries"] == []
        assert [j["id"] for j in client.get("/api/v1/outbox", headers=AUTH).json()["jobs"]] == [job.id]
