"""Escalation per key and notification, bounded key state, escalation chains, and acknowledgements.

Store-level parts run against SQLite and a real redis-server; the HTTP parts use the app with SQLite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi.testclient import TestClient
from mlwarden.relay import config as relay_config
from mlwarden.relay.app import Relay, create_app
from mlwarden.relay.auth import Credentials
from mlwarden.relay.store.base import Store
from mlwarden.relay.store.sqlite import SQLiteStore

from tests.test_relay_stores import store  # noqa: F401 (the SQLite and Redis store fixture)
from tests.test_relay_support import ENV, TOKEN, FakeClock, accept, alert, body, config_dict

AUTH = {"Authorization": f"Bearer {TOKEN}"}
DISK = {"name": "DiskAlmostFull", "instance": "node1:9100"}


def disk_config(**escalation: Any) -> relay_config.RelayConfig:
    escalation = escalation or {"after_repeats": 5, "within": "1h", "destinations": ["oncall", "pd"]}
    return relay_config.parse(config_dict(
        routes=[{"key_labels": ["alertname", "instance"], "destinations": ["ops"], "escalation": escalation}],
    ), ENV)


def five_mounts(status: str = "firing", group_key: str = "g") -> bytes:
    return body(*[alert(**DISK, mountpoint=f"/data{i}", status=status) for i in range(5)], group_key=group_key)


def test_one_notification_of_five_alerts_of_one_key_is_one_sighting_and_one_notice(store: Store) -> None:  # noqa: F811
    result = accept(store, disk_config(), five_mounts(), 100.0)
    assert [j.destination for j in result.jobs] == ["ops"]  # not paged: one sighting, not five
    [job] = store.jobs()
    assert job.notice.alerts == 5 and job.notice.occurrences == 1
    assert [m["mountpoint"] for m in job.notice.members] == [f"/data{i}" for i in range(5)]
    [state] = store.key_states()
    assert state.seen == 1 and state.level == 0


def test_key_state_is_bounded_however_often_the_key_is_seen(store: Store) -> None:  # noqa: F811
    config = disk_config(after_repeats=10_000, within="1h", destinations=["pd"])
    sizes = []
    for n in range(300):
        accept(store, config, five_mounts(group_key=f"g{n}"), 100.0 + n)  # new group keys: not HA duplicates
        if n in (1, 299):
            [state] = store.key_states()
            sizes.append(len(json.dumps(state.to_dict())))
    assert state.seen == 300 and state.window_count == 300
    assert sizes[1] - sizes[0] <= 4  # a few more digits, not a list of 300 sightings


def test_the_window_is_fixed_and_starts_again_when_it_ends(store: Store) -> None:  # noqa: F811
    config = disk_config(after_repeats=3, within="10m", destinations=["pd"])
    for n, at in enumerate((0.0, 300.0, 700.0)):  # the third is in a new window
        accept(store, config, five_mounts(group_key=f"g{n}"), 1000.0 + at)
    [state] = store.key_states()
    assert state.level == 0 and state.window_count == 1 and state.window_start == 1700.0
    accept(store, config, five_mounts(group_key="g3"), 1800.0)
    accept(store, config, five_mounts(group_key="g4"), 1900.0)
    assert store.key_states()[0].level == 1


def chain() -> relay_config.RelayConfig:
    return disk_config(within="1h", levels=[
        {"destinations": ["oncall"], "after_repeats": 3},
        {"destinations": ["pd"], "after_firing": "2h"},
    ])


def test_an_escalation_chain_climbs_level_by_level(store: Store) -> None:  # noqa: F811
    config = chain()
    seen = []
    for n, at in enumerate((0, 60, 120, 2 * 3600)):
        result = accept(store, config, five_mounts(group_key=f"g{n}"), 1000.0 + at)
        seen.append(sorted({j.destination for j in result.jobs}))
    # First notice; then in cooldown (warning: 1h); the third sighting reaches level 1 (on-call);
    # firing for 2 h reaches level 2 (PagerDuty, with the levels below).
    assert seen == [["ops"], [], ["oncall", "ops"], ["oncall", "ops", "pd"]]
    assert store.key_states()[0].level == 2


def test_chain_config_errors_name_the_level() -> None:
    import pytest

    with pytest.raises(relay_config.ConfigError, match=r"escalation.levels\[0\]: a level needs destinations"):
        disk_config(levels=[{"destinations": ["pd"]}])
    with pytest.raises(relay_config.ConfigError, match="give it in each of levels"):
        disk_config(after_repeats=3, levels=[{"destinations": ["pd"], "after_repeats": 2}])


def test_an_acknowledged_key_stops_escalating_until_it_resolves(store: Store) -> None:  # noqa: F811
    config = chain()
    accept(store, config, five_mounts(group_key="g0"), 1000.0)
    [state] = store.key_states()
    acked = store.acknowledge(state.key, "alice", "replacing the disk", 1010.0)
    assert acked is not None and acked.acked_by == "alice" and acked.acked_at == 1010.0
    for n in range(1, 5):
        result = accept(store, config, five_mounts(group_key=f"g{n}"), 1000.0 + 3 * 3600 * n)
        assert {j.destination for j in result.jobs} <= {"ops"}  # still notified, never escalated
    [state] = store.key_states()
    assert state.level == 0 and state.acked_by == "alice" and state.ack_comment == "replacing the disk"
    accept(store, config, five_mounts(status="resolved", group_key="end"), 50_000.0)
    assert store.acknowledge(state.key, "bob", "", 50_001.0) is None  # resolved: nothing to acknowledge
    accept(store, config, five_mounts(group_key="again"), 60_000.0)
    accept(store, config, five_mounts(group_key="again2"), 60_060.0)
    accept(store, config, five_mounts(group_key="again3"), 60_120.0)
    assert store.key_states()[0].acked_at is None and store.key_states()[0].level == 1  # a new episode escalates


def test_ack_over_http_and_the_state_page_form(tmp_path: Path) -> None:
    relay = Relay(chain(), SQLiteStore(tmp_path / "relay.db"), Credentials(TOKEN), clock=FakeClock())
    with TestClient(create_app(relay, background=False)) as client:
        client.post("/webhook/alertmanager", content=five_mounts(), headers=AUTH)
        [state] = client.get("/api/v1/state", headers=AUTH).json()["keys"]
        key = quote(state["key"], safe="")
        page = client.get("/state", headers=AUTH)
        assert page.status_code == 200 and f'action="/api/v1/keys/{key}/ack"' in page.text
        assert "alertname=DiskAlmostFull, instance=node1:9100" in page.text
        assert client.post(f"/api/v1/keys/{key}/ack", json={"by": "alice"}).status_code == 401
        assert client.post(f"/api/v1/keys/{key}/ack", json={}, headers=AUTH).status_code == 400
        assert client.post("/api/v1/keys/nope/ack", json={"by": "alice"}, headers=AUTH).status_code == 404
        form = client.post(f"/api/v1/keys/{key}/ack", content="by=alice&comment=on+it", headers={
            **AUTH, "Content-Type": "application/x-www-form-urlencoded"}, follow_redirects=False)
        assert form.status_code == 303 and form.headers["location"] == "/state"
        [state] = client.get("/api/v1/state", headers=AUTH).json()["keys"]
        assert state["acked_by"] == "alice" and state["ack_comment"] == "on it"
        forged = client.post(f"/api/v1/keys/{key}/ack", content="by=mallory", headers={
            **AUTH, "Content-Type": "application/x-www-form-urlencoded", "Origin": "https://evil.example"})
        assert forged.status_code == 403  # another site's form, riding on the browser's credentials
        page = client.get("/state", headers=AUTH).text
        assert "by alice at" in page and "on it" in page and "<form" not in page


def test_label_sets_that_joined_alike_get_different_keys(store: Store) -> None:  # noqa: F811
    # The pair: "instance=n1,gpu=3" + ",gpu=" and "instance=n1" + ",gpu=3,gpu=" were one key.
    config = relay_config.parse(config_dict(routes=[{"key_labels": ["instance", "gpu"], "destinations": ["ops"]}]), ENV)
    first = alert(name="A", instance="n1,gpu=3")
    del first["labels"]["gpu"]
    second = alert(name="A", instance="n1", gpu="3,gpu=")
    accept(store, config, body(first, group_key="1"), 100.0)
    result = accept(store, config, body(second, group_key="2"), 101.0)
    assert [j.destination for j in result.jobs] == ["ops"]  # its own key: notified, not in the other's cooldown
    states = store.key_states()
    assert len({s.key for s in states}) == 2
    assert sorted(s.labels["instance"] for s in states) == ["n1", "n1,gpu=3"]
