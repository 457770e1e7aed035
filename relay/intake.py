"""From one parsed webhook to state changes and delivery jobs: a pure plan, no I/O.

The store runs :func:`plan` inside its intake transaction with the current states of the
notification's keys, so the relay acknowledges a webhook only once the plan is stored.
"""

from __future__ import annotations

from collections.abc import Mapping

from mlwarden.relay.config import RelayConfig
from mlwarden.relay.notice import FIRING, RESOLVED, Notice
from mlwarden.relay.payload import Alert, Notification
from mlwarden.relay.policy import Decision, KeyState, alert_key, decide
from mlwarden.relay.store.base import IntakeResult, Job


def is_heartbeat(alert: Alert, config: RelayConfig) -> bool:
    return config.watchdog is not None and alert.labels.get("alertname") == config.watchdog.alertname


def dedup_window(notification: Notification, config: RelayConfig) -> float:
    """How long a repeat of this notification counts as an HA duplicate.

    A heartbeat-only notification (the Watchdog route) is never a duplicate: Alertmanager
    repeats it every minute or so, usually well inside the window, and each copy, from
    whichever peer, is proof that the pipeline works. Dropping them would let the watchdog
    go late while the pipeline is fine; storing them twice only refreshes last-seen.
    """
    if notification.alerts and all(is_heartbeat(alert, config) for alert in notification.alerts):
        return 0.0
    return config.dedup_window


def keys_of(notification: Notification, config: RelayConfig) -> list[str]:
    """The keys whose state :func:`plan` needs."""
    keys = []
    for alert in notification.alerts:
        route = config.route_for(alert.labels)
        if route is not None and not is_heartbeat(alert, config):
            keys.append(alert_key(alert, route))
    return keys


def plan(notification: Notification, states: Mapping[str, KeyState], now: float, config: RelayConfig) -> IntakeResult:
    current: dict[str, KeyState | None] = dict(states)
    changed: dict[str, KeyState | None] = {}
    jobs: list[Job] = []
    decisions: list[Decision] = []
    heartbeat = any(is_heartbeat(alert, config) and alert.status == "firing" for alert in notification.alerts)
    keyed = [  # an alert that no route matches is dropped: nobody asked for it
        (alert, route, alert_key(alert, route))
        for alert in notification.alerts
        if not is_heartbeat(alert, config) and (route := config.route_for(alert.labels)) is not None
    ]
    # With route key_labels, several alerts can share a key (one per job, or per disk path, on
    # one machine): the key has ended only when none of them fires.
    firing_keys = {key for alert, _, key in keyed if alert.status == "firing"}
    for alert, route, key in keyed:
        if alert.status == "resolved" and key in firing_keys:
            continue
        decision = decide(current.get(key), alert, key, now, route, config.default_severity)
        current[key] = changed[key] = decision.state
        decisions.append(decision)
        notice = _notice(alert, key, decision, notification)
        jobs += [Job(destination, notice, created_at=now, due_at=now) for destination in decision.destinations]
    return IntakeResult(states=changed, jobs=jobs, heartbeat=heartbeat, decisions=decisions)


def _notice(alert: Alert, key: str, decision: Decision, notification: Notification) -> Notice:
    return Notice(
        kind=RESOLVED if decision.action == "resolve" else FIRING,
        key=key,
        alertname=alert.labels.get("alertname", "alert"),
        severity=decision.severity,
        level=decision.level,
        labels=alert.labels,
        annotations=alert.annotations,
        starts_at=alert.starts_at,
        generator_url=alert.generator_url,
        occurrences=len(decision.state.occurrences) if decision.state else 0,
        reason=notification.notification_reason,
        group=notification.group_key,
    )
