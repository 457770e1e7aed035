"""Shared builders for the relay tests: configs, Alertmanager-shaped payloads, a fake clock."""

from __future__ import annotations

import json
from typing import Any

from mlwarden.relay import config as relay_config

SLACK_URL = "https://hooks.slack.test/services/T000/B000/XXXX"
ONCALL_URL = "https://hooks.slack.test/services/T000/B000/ONCALL"
PD_URL = "https://events.pagerduty.test/v2/enqueue"
TOKEN = "s3cret-token-for-tests"
ENV = {"SLACK_WEBHOOK_URL": SLACK_URL, "SLACK_ONCALL_URL": ONCALL_URL, "PD_KEY": "routing-key-0123"}


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def config_dict(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "destinations": {
            "ops": {"type": "slack", "webhook_url_env": "SLACK_WEBHOOK_URL"},
            "oncall": {"type": "slack", "webhook_url_env": "SLACK_ONCALL_URL"},
            "pd": {"type": "pagerduty", "routing_key_env": "PD_KEY", "events_url": PD_URL},
        },
        "escalation": {"after_repeats": 3, "within": "1h", "destinations": ["pd"]},
        "routes": [
            {"match": {"team": "ml"}, "key_labels": ["alertname", "instance", "gpu"], "destinations": ["ops"]},
            {"destinations": ["ops"]},
        ],
        "watchdog": {"period": "10s", "grace": "20s", "destinations": ["ops"]},
        "delivery": {"max_attempts": 4, "backoff_initial": "1s", "backoff_max": "8s", "timeout": "2s"},
    }
    doc.update(overrides)
    return doc


def make_config(**overrides: Any) -> relay_config.RelayConfig:
    return relay_config.parse(config_dict(**overrides), ENV)


def alert(name: str = "GpuTemperatureHigh", status: str = "firing", severity: str = "warning", **labels: str) -> dict[str, Any]:
    all_labels = {"alertname": name, "severity": severity, "instance": "node1:9945", "gpu": "0", **labels}
    return {
        "status": status,
        "labels": all_labels,
        "annotations": {"summary": f"{name} on {all_labels['instance']}"},
        "startsAt": "2026-11-28T10:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.test/graph",
        "fingerprint": "fp-" + "-".join(f"{k}={v}" for k, v in sorted(all_labels.items()) if k != "severity"),
    }


def payload(*alerts: dict[str, Any], group_key: str = "{}:{alertname=\"x\"}", receiver: str = "relay", **extra: Any) -> dict[str, Any]:
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return {
        "version": "4", "groupKey": group_key, "truncatedAlerts": 0, "status": status, "receiver": receiver,
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am.test",
        "alerts": list(alerts), **extra,
    }


def body(*alerts: dict[str, Any], **kw: Any) -> bytes:
    return json.dumps(payload(*alerts, **kw)).encode()


def accept(store: Any, config: relay_config.RelayConfig, raw: bytes, now: float) -> Any:
    """Run one webhook body through intake into ``store``, as the app does (None: duplicate)."""
    from mlwarden.relay import intake, payload
    from mlwarden.relay.dedup import notification_digest

    notification = payload.parse(raw)
    return store.intake(
        notification_digest(notification), raw, intake.keys_of(notification, config), now, config.dedup_window,
        lambda states: intake.plan(notification, states, now, config),
    )
