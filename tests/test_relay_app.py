"""The relay's HTTP intake (FastAPI TestClient, real SQLite store): auth, limits, dedup, bad input, views."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from mlwarden.relay import watchdog
from mlwarden.relay.app import DEFAULT_MAX_BODY_BYTES, WEBHOOK_PATH, Relay, create_app
from mlwarden.relay.auth import Credentials
from mlwarden.relay.store.base import StoreError
from mlwarden.relay.store.sqlite import SQLiteStore

from tests.test_relay_support import TOKEN, FakeClock, alert, body, make_config, payload

AUTH = {"Authorization": f"Bearer {TOKEN}"}


class BrokenStore(SQLiteStore):
    def intake_batch(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreError("database or disk is full")


def start(tmp_path: Path, store_class: type[SQLiteStore] = SQLiteStore, **relay_kw: Any) -> tuple[TestClient, Relay]:
    relay = Relay(make_config(), store_class(tmp_path / "relay.db"), Credentials(TOKEN, "am", "basic-pass"),
                  clock=FakeClock(), **relay_kw)
    return TestClient(create_app(relay, background=False)), relay


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[TestClient, Relay]]:
    client, relay = start(tmp_path)
    with client:
        yield client, relay


def outcome(relay: Relay, name: str) -> float:
    return relay.metrics.registry.get_sample_value("mlwarden_relay_webhooks_received_total", {"outcome": name}) or 0.0


def test_accepted_webhook_is_stored_with_its_jobs_before_the_answer(app: tuple[TestClient, Relay]) -> None:
    client, relay = app
    response = client.post(WEBHOOK_PATH, content=body(alert(severity="critical", team="ml")), headers=AUTH)
    assert response.status_code == 200 and response.json() == {"status": "accepted", "jobs": 2}
    outbox = client.get("/api/v1/outbox", headers=AUTH).json()
    assert outbox["depth"] == 2 and {j["destination"] for j in outbox["jobs"]} == {"ops", "pd"}
    [state] = client.get("/api/v1/state", headers=AUTH).json()["keys"]
    assert state["labels"] == {"alertname": "GpuTemperatureHigh", "instance": "node1:9945", "gpu": "0"}
    assert state["level"] == 1


def test_the_webhook_answers_as_a_fastapi_route_would_outside_its_plain_post(app: tuple[TestClient, Relay]) -> None:
    # A POST to the exact path skips FastAPI (see app.RelayApp); the rest still reaches its route.
    client, relay = app
    assert client.get(WEBHOOK_PATH, headers=AUTH).status_code == 405
    response = client.post(WEBHOOK_PATH + "/", content=body(alert()), headers=AUTH, follow_redirects=False)
    assert response.status_code == 307 and response.headers["location"].endswith(WEBHOOK_PATH)
    assert outcome(relay, "accepted") == 0
    assert client.post(WEBHOOK_PATH, content=body(alert()), headers=AUTH).json() == {"status": "accepted", "jobs": 1}
    assert outcome(relay, "accepted") == 1


def test_basic_auth_is_accepted(app: tuple[TestClient, Relay]) -> None:
    client, _ = app
    credentials = base64.b64encode(b"am:basic-pass").decode()
    assert client.post(WEBHOOK_PATH, content=body(alert()), headers={"Authorization": f"Basic {credentials}"}).status_code == 200


def test_ha_duplicate_is_acknowledged_and_not_processed_twice(app: tuple[TestClient, Relay]) -> None:
    client, relay = app
    assert client.post(WEBHOOK_PATH, content=body(alert(), alert(name="B")), headers=AUTH).json()["status"] == "accepted"
    second = client.post(WEBHOOK_PATH, content=body(alert(name="B"), alert()), headers=AUTH)
    assert second.status_code == 200 and second.json() == {"status": "duplicate"}
    assert relay.store.outbox_stats()[0] == 2 and outcome(relay, "duplicate") == 1
    relay.clock.advance(relay.config.dedup_window + 1)  # type: ignore[attr-defined]  # the relay runs on the test's FakeClock
    assert client.post(WEBHOOK_PATH, content=body(alert()), headers=AUTH).json()["status"] == "accepted"


def test_cooldown_suppresses_and_counts(app: tuple[TestClient, Relay]) -> None:
    client, relay = app
    client.post(WEBHOOK_PATH, content=body(alert(), group_key="a"), headers=AUTH)
    assert client.post(WEBHOOK_PATH, content=body(alert(), group_key="b"), headers=AUTH).json()["jobs"] == 0
    assert relay.metrics.registry.get_sample_value(
        "mlwarden_relay_notifications_suppressed_total", {"severity": "warning"}) == 1


def test_resolved_alert_clears_state_and_queues_the_resolution(app: tuple[TestClient, Relay]) -> None:
    client, relay = app
    client.post(WEBHOOK_PATH, content=body(alert()), headers=AUTH)
    response = client.post(WEBHOOK_PATH, content=body(alert(status="resolved")), headers=AUTH)
    assert response.json()["jobs"] == 1
    assert relay.store.key_states() == []
    assert [j.notice.kind for j in relay.store.jobs()] == ["firing", "resolved"]


def test_watchdog_alert_is_a_heartbeat_not_a_notification(app: tuple[TestClient, Relay]) -> None:
    client, relay = app
    response = client.post(WEBHOOK_PATH, content=body(alert(name="Watchdog", severity="none")), headers=AUTH)
    assert response.json()["jobs"] == 0
    assert relay.store.watchdog()[0] == relay.clock()
    metrics = client.get("/metrics").text
    assert 'mlwarden_relay_watchdog_state{state="up"} 1.0' in metrics


def test_watchdog_repeats_inside_the_dedup_window_still_refresh_the_heartbeat(app: tuple[TestClient, Relay]) -> None:
    # Alertmanager repeats the Watchdog every minute; the dedup window (5 min) must not eat those repeats.
    client, relay = app
    heartbeat = body(alert(name="Watchdog", severity="none"), group_key="watchdog")
    assert client.post(WEBHOOK_PATH, content=heartbeat, headers=AUTH).json()["status"] == "accepted"
    relay.clock.advance(60)  # type: ignore[attr-defined]  # the relay runs on the test's FakeClock
    assert relay.config.dedup_window > 60
    assert client.post(WEBHOOK_PATH, content=heartbeat, headers=AUTH).json()["status"] == "accepted"
    assert relay.store.watchdog()[0] == relay.clock()


def test_store_failure_answers_503_so_alertmanager_retries(tmp_path: Path) -> None:
    client, relay = start(tmp_path, BrokenStore)
    with client:
        response = client.post(WEBHOOK_PATH, content=body(alert()), headers=AUTH)
    assert response.status_code == 503 and outcome(relay, "unavailable") == 1


HUGE = body(*[alert(name=f"A{i}") for i in range(10_000)])

BAD_INPUTS: list[tuple[str, bytes, dict[str, str], int]] = [
    ("no token", body(alert()), {}, 401),
    ("wrong token", body(alert()), {"Authorization": "Bearer nope"}, 401),
    ("token prefix", body(alert()), {"Authorization": f"Bearer {TOKEN[:-1]}"}, 401),
    ("wrong basic", body(alert()), {"Authorization": "Basic " + base64.b64encode(b"am:nope").decode()}, 401),
    ("garbage basic", body(alert()), {"Authorization": "Basic !!!"}, 401),
    ("malformed JSON", b'{"alerts": [', AUTH, 400),
    ("not UTF-8", b"\xff\xfe\x00{", AUTH, 400),
    ("empty body", b"", AUTH, 400),
    ("JSON array", b"[1, 2]", AUTH, 400),
    ("alerts not a list", b'{"alerts": {"a": 1}}', AUTH, 400),
    ("missing alerts", b'{"version": "4", "status": "firing"}', AUTH, 400),
    ("label not a string", json.dumps(payload({**alert(), "labels": {"alertname": ["x"]}})).encode(), AUTH, 400),
    ("labels missing", json.dumps(payload({"status": "firing"})).encode(), AUTH, 400),
    ("alert is a number", b'{"alerts": [42]}', AUTH, 400),
    ("deeply nested", b'{"alerts": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", AUTH, 400),
    ("oversized without a single alert", b" " * (DEFAULT_MAX_BODY_BYTES + 1), AUTH, 413),
]


@pytest.mark.parametrize(("name", "raw", "headers", "status"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_the_right_4xx(app: tuple[TestClient, Relay], name: str, raw: bytes, headers: dict[str, str], status: int) -> None:
    client, _ = app
    assert client.post(WEBHOOK_PATH, content=raw, headers=headers).status_code == status


def test_bad_payload_is_dead_lettered_and_counted(app: tuple[TestClient, Relay], tmp_path: Path) -> None:
    client, relay = app
    response = client.post(WEBHOOK_PATH, content=b'{"alerts": "x"}', headers=AUTH)
    assert response.status_code == 400 and "alerts" in response.json()["error"]
    assert relay.metrics.registry.get_sample_value("mlwarden_relay_dead_letters_total", {"reason": "invalid_payload"}) == 1
    assert relay.store._read("SELECT body FROM dead_payloads") == [(b'{"alerts": "x"}',)]  # type: ignore[attr-defined]  # the SQLite store's private reader, to see what it kept


def test_odd_unicode_is_accepted_and_stored(app: tuple[TestClient, Relay]) -> None:
    client, relay = app
    odd = alert(name="Gpu\u202e\u0000\U0001F525\ud800温度", instance="nöde\u200b1")
    raw = json.dumps(payload(odd)).encode()  # ensure_ascii: the lone surrogate travels as \ud800
    assert client.post(WEBHOOK_PATH, content=raw, headers=AUTH).status_code == 200
    assert "温度" in relay.store.jobs()[0].notice.alertname


def test_10000_alerts_in_one_payload_are_accepted_under_the_default_limit(tmp_path: Path) -> None:
    client, relay = start(tmp_path)
    with client:
        response = client.post(WEBHOOK_PATH, content=HUGE, headers=AUTH)
    assert response.status_code == 200 and relay.store.outbox_stats()[0] == 10_000


def test_views_need_credentials_health_and_metrics_do_not(app: tuple[TestClient, Relay]) -> None:
    client, _ = app
    assert client.get("/api/v1/state").status_code == 401
    assert client.get("/api/v1/outbox").status_code == 401
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_metrics_pass_promtool_and_never_show_secrets(app: tuple[TestClient, Relay], promtool: str) -> None:
    client, _ = app
    client.post(WEBHOOK_PATH, content=body(alert()), headers=AUTH)
    client.post(WEBHOOK_PATH, content=b"{", headers=AUTH)
    text = client.get("/metrics").text
    for name in ("mlwarden_relay_webhooks_received_total", "mlwarden_relay_alerts_received_total",
                 "mlwarden_relay_outbox_depth", "mlwarden_relay_outbox_oldest_age_seconds",
                 "mlwarden_relay_watchdog_state", "mlwarden_relay_dead_letters_total"):
        assert name in text
    assert TOKEN not in text and "hooks.slack.test" not in text
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_watchdog_silence_announces_down_once_and_then_recovery(app: tuple[TestClient, Relay]) -> None:
    client, relay = app
    clock: FakeClock = relay.clock  # type: ignore[assignment]  # the relay runs on the test's FakeClock
    heartbeat = alert(name="Watchdog", severity="none")
    assert relay.config.watchdog is not None
    client.post(WEBHOOK_PATH, content=body(heartbeat, group_key="1"), headers=AUTH)
    assert watchdog.check(relay.store, relay.config.watchdog, clock(), relay.watching_since) == "up"
    clock.advance(15)  # period 10s, grace 20s
    assert watchdog.check(relay.store, relay.config.watchdog, clock(), relay.watching_since) == "late"
    clock.advance(20)
    assert watchdog.check(relay.store, relay.config.watchdog, clock(), relay.watching_since) == "down"
    assert watchdog.check(relay.store, relay.config.watchdog, clock(), relay.watching_since) == "down"
    assert [j.notice.kind for j in relay.store.jobs()] == ["pipeline_down"]
    client.post(WEBHOOK_PATH, content=body(heartbeat, group_key="2"), headers=AUTH)
    assert watchdog.check(relay.store, relay.config.watchdog, clock(), relay.watching_since) == "up"
    assert [j.notice.kind for j in relay.store.jobs()] == ["pipeline_down", "pipeline_up"]
    assert 'mlwarden_relay_watchdog_state{state="up"} 1.0' in client.get("/metrics").text


def test_a_heartbeat_that_never_arrives_is_announced_down(app: tuple[TestClient, Relay]) -> None:
    client, relay = app
    clock: FakeClock = relay.clock  # type: ignore[assignment]  # the relay runs on the test's FakeClock
    assert relay.config.watchdog is not None

    def check() -> str:
        assert relay.config.watchdog is not None
        return watchdog.check(relay.store, relay.config.watchdog, clock(), relay.watching_since)

    assert check() == "new"
    clock.advance(30)  # period 10s + grace 20s after the relay started watching: still new
    assert check() == "new" and relay.store.jobs() == []
    clock.advance(1)
    assert check() == "down"
    assert [j.notice.kind for j in relay.store.jobs()] == ["pipeline_down"]
    assert 'mlwarden_relay_watchdog_state{state="down"} 1.0' in client.get("/metrics").text
    client.post(WEBHOOK_PATH, content=body(alert(name="Watchdog", severity="none")), headers=AUTH)
    assert check() == "up"
    assert [j.notice.kind for j in relay.store.jobs()] == ["pipeline_down", "pipeline_up"]
