"""Severity priority per destination: criticals overtake queued warnings; a warning flood is one digest.

Against SQLite and a real redis-server, Slack and PagerDuty being a local HTTP sink.
"""

from __future__ import annotations

from typing import Any

from mlwarden.relay.app import Relay
from mlwarden.relay.auth import Credentials
from mlwarden.relay.notice import Notice
from mlwarden.relay.store.base import Job, Store

from tests.test_relay_order import deliver_all, sink, sink_config  # noqa: F401 (fixture)
from tests.test_relay_stores import store  # noqa: F401 (fixture)
from tests.test_relay_support import FakeClock, Sink, alert, body


def test_the_store_hands_out_the_most_severe_head_first(store: Store) -> None:  # noqa: F811
    def job(key: str, severity: str, at: float) -> Job:
        return Job("ops", Notice(kind="firing", key=key, alertname=key, severity=severity), created_at=at, due_at=at)

    store.enqueue([job(f"w{i}", "warning", 100.0 + i) for i in range(5)] + [job("info", "info", 99.0)])
    store.enqueue([job("crit", "critical", 200.0), job("emerg", "emergency", 201.0)])
    names = [j.notice.alertname for j in store.claim("ops", 300.0, 3, lease=60)]
    assert names == ["emerg", "crit", "w0"]
    assert [j.notice.alertname for j in store.claim("ops", 300.0, 10, lease=60)][-1] == "info"


def test_a_critical_overtakes_a_warning_flood_and_the_flood_is_one_digest(store: Store, sink: Sink) -> None:  # noqa: F811
    # The case: one notification of 3,000 warnings, then a critical a second later.
    clock = FakeClock()
    relay = Relay(sink_config(sink), store, Credentials("t"), clock=clock)
    flood = body(*[alert(name="DiskAlmostFull", mountpoint=f"/data{i}", instance=f"node{i % 40}:9100")
                   for i in range(3000)], group_key='{}:{alertname="DiskAlmostFull"}')
    deliver_all(relay, clock, [(0, flood), (1.0, body(alert(name="GpuXid", severity="critical"), group_key="page"))])
    slack = sink.delivered("/slack")
    assert len(slack) == 2  # one digest, then the critical: not 150 messages at 1 per second
    assert slack[0]["text"].startswith("Digest: 3,000 notices in 1 group")
    digest_text = "".join(b["text"]["text"] for b in slack[0]["blocks"] if b["type"] == "section")
    assert "DiskAlmostFull ×3,000" in digest_text and "(+35 more)" in digest_text  # 40 machines, 5 shown
    assert "GpuXid" in slack[1]["text"]
    assert relay.store.outbox_stats()[0] == 0


def test_within_pagerdutys_rate_limit_a_critical_goes_before_queued_warnings(store: Store, sink: Sink) -> None:  # noqa: F811
    clock = FakeClock()
    config = sink_config(sink)
    relay = Relay(make_config_for_pd(config), store, Credentials("t"), clock=clock)
    warnings = [(0.0, body(alert(name=f"Warn{i}"), group_key=str(i))) for i in range(6)]
    deliver_all(relay, clock, [*warnings, (0.1, body(alert(name="GpuXid", severity="critical"), group_key="page"))])
    names = [event["payload"]["class"] for event in sink.delivered("/pd")]
    assert names[:2] == ["Warn0", "GpuXid"]  # the one in flight, then the critical
    assert sorted(names) == sorted(["GpuXid", *[f"Warn{i}" for i in range(6)]])


def make_config_for_pd(config: Any) -> Any:
    """``config`` with every alert routed to PagerDuty alone (one event per notice, 2 per second)."""
    from dataclasses import replace

    return replace(config, routes=(replace(config.routes[1], destinations=("pd",)),))
