"""Large groups: above the body limit the relay keeps the alerts that fit and counts the rest."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi.testclient import TestClient
from mlwarden.relay import oversize, payload
from mlwarden.relay.app import DEFAULT_MAX_BODY_BYTES, WEBHOOK_PATH, Relay, create_app
from mlwarden.relay.auth import Credentials
from mlwarden.relay.cli import RelaySettings
from mlwarden.relay.notifiers.slack import message
from mlwarden.relay.store.sqlite import SQLiteStore

from mlwarden import settings
from tests.test_relay_support import TOKEN, FakeClock, alert, body, make_config

AUTH = {"Authorization": f"Bearer {TOKEN}"}
GROUP = '{}/{team="ml"}:{alertname="DiskAlmostFull"}'


def disks(count: int, **labels: str) -> bytes:
    return body(*[alert(name="DiskAlmostFull", mountpoint=f"/data{i}", **labels) for i in range(count)], group_key=GROUP)


def test_the_default_limit_is_16_mib() -> None:
    assert DEFAULT_MAX_BODY_BYTES == 16 * 1024 * 1024
    parsed = settings.load(RelaySettings, "relay", [], {"MLWARDEN_RELAY_TOKEN": "t"})
    assert parsed.max_body_bytes == DEFAULT_MAX_BODY_BYTES


def test_a_group_over_the_limit_keeps_what_fits_and_counts_the_rest(tmp_path: Path) -> None:
    raw = disks(3000)
    limit = 1024 * 1024
    assert len(raw) > limit  # about 1,930 alerts fit: the notification that got 413
    relay = Relay(make_config(), SQLiteStore(tmp_path / "relay.db"), Credentials(TOKEN), clock=FakeClock(),
                  max_body_bytes=limit)
    with TestClient(create_app(relay, background=False)) as client:
        response = client.post(WEBHOOK_PATH, content=raw, headers=AUTH)
    assert response.status_code == 200
    jobs = relay.store.jobs(limit=5000)
    kept = len(jobs)
    omitted = relay.metrics.registry.get_sample_value("mlwarden_relay_alerts_omitted_total")
    assert 1000 < kept < 3000 and kept + omitted == 3000
    assert {j.notice.omitted for j in jobs} == {3000 - kept}
    assert {j.notice.group for j in jobs} == {GROUP}  # the fields after the alerts survived the cut
    [[stored]] = relay.store._read("SELECT body FROM payloads")  # type: ignore[attr-defined]  # the SQLite store's private reader, to see what it kept
    assert len(stored) <= limit + 1024
    text = json.dumps(message([jobs[0].notice]))
    assert f"{3000 - kept:,} more alert(s) of this group did not fit" in text


def test_the_cut_follows_strings_with_brackets_quotes_and_escapes_across_chunks() -> None:
    tricky = '"}]{[\\\\ \\" ],"alerts":['
    raw = disks(200, note=tricky)
    limit = len(raw) // 3

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 7):  # boundaries fall inside strings and escapes
            yield raw[start : start + 7]

    trimmed = asyncio.run(oversize.read_webhook(chunks(), limit))
    assert trimmed is not None and len(trimmed.body) <= limit + 400
    notification = payload.parse(trimmed.body)
    assert len(notification.alerts) + trimmed.omitted_alerts == 200
    assert notification.alerts[-1].labels["note"] == json.loads(json.dumps(tricky))
    assert notification.group_key == GROUP


def test_a_body_under_the_limit_is_untouched() -> None:
    raw = disks(3)

    async def chunks() -> AsyncIterator[bytes]:
        yield raw

    assert asyncio.run(oversize.read_webhook(chunks(), len(raw))) == oversize.Trimmed(raw)


def test_one_alert_alone_over_the_limit_is_refused(tmp_path: Path) -> None:
    relay = Relay(make_config(), SQLiteStore(tmp_path / "relay.db"), Credentials(TOKEN), clock=FakeClock(),
                  max_body_bytes=10_000)
    huge = body(alert(note="x" * 20_000))
    with TestClient(create_app(relay, background=False)) as client:
        assert client.post(WEBHOOK_PATH, content=huge, headers=AUTH).status_code == 413
