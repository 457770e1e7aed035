"""From one parsed webhook to state changes and delivery jobs: a pure plan, no I/O.

The store runs :func:`plan` inside its intake transaction with the current states of the
notification's keys, so the relay acknowledges a webhook only once the plan is stored.
"""

from __future__ import annotations

from collections.abc import Mapping

from mlwarden.relay.config import SEVERITIES, RelayConfig, Route
from mlwarden.relay.dedup import notification_digest
from mlwarden.relay.keys import alert_key, key_labels
from mlwarden.relay.notice import FIRING, RESOLVED, Notice
from mlwarden.relay.payload import Alert, Notification
from mlwarden.relay.policy import Decision, KeyState, decide, severity_of
from mlwarden.relay.store.base import IntakeRequest, IntakeResult, Job

MAX_MEMBERS_KEPT = 50  # alerts of one key a notice lists; the count covers the rest


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


Members = dict[str, tuple[Route, list[Alert]]]


def members_of(notification: Notification, config: RelayConfig) -> Members:
    """The notification's routed alerts by key (with their route), heartbeats left out.

    With route key_labels, several alerts can share a key (one per disk path on one machine):
    together they are one sighting of the key, one decision and one notice. An alert that no
    route matches is dropped: nobody asked for it.
    """
    members: Members = {}
    for alert in notification.alerts:
        if is_heartbeat(alert, config) or (route := config.route_for(alert.labels)) is None:
            continue
        members.setdefault(alert_key(alert, route), (route, []))[1].append(alert)
    return members


def keys_of(notification: Notification, config: RelayConfig) -> list[str]:
    """The keys whose state :func:`plan` needs."""
    return list(members_of(notification, config))


def request(notification: Notification, body: bytes, now: float, config: RelayConfig) -> IntakeRequest:
    """What the store needs to take one webhook in, its alerts routed once for keys and plan alike."""
    members = members_of(notification, config)
    return IntakeRequest(
        notification_digest(notification), body, list(members), now, dedup_window(notification, config),
        lambda states: plan(notification, states, now, config, members),
    )


def plan(
    notification: Notification, states: Mapping[str, KeyState], now: float, config: RelayConfig,
    members: Members | None = None,
) -> IntakeResult:
    """The state changes, jobs and decisions of one notification (``members``: its
    :func:`members_of`, when the caller has them already)."""
    changed: dict[str, KeyState | None] = {}
    jobs: list[Job] = []
    decisions: list[Decision] = []
    heartbeat = any(is_heartbeat(alert, config) and alert.status == "firing" for alert in notification.alerts)
    if members is None:
        members = members_of(notification, config)
    for key, (route, alerts) in members.items():
        alert = _representative(alerts, config.default_severity)
        state = states.get(key)
        labels = key_labels(alert, route) if state is None else None  # kept in a new state only
        decision = decide(state, alert, key, now, route, config.default_severity, labels)
        changed[key] = decision.state
        decisions.append(decision)
        if decision.destinations:
            same = alerts if len(alerts) == 1 else [a for a in alerts if a.status == alert.status]
            notice = _notice(alert, same, key, decision, notification)
            jobs += [Job(destination, notice, created_at=now, due_at=now) for destination in decision.destinations]
    return IntakeResult(states=changed, jobs=jobs, heartbeat=heartbeat, decisions=decisions)


def _representative(alerts: list[Alert], default_severity: str) -> Alert:
    """The alert that stands for its key: the most severe firing one, else the first resolved one."""
    if len(alerts) == 1:
        return alerts[0]
    firing = [a for a in alerts if a.status == "firing"]
    if not firing:
        return alerts[0]
    return max(firing, key=lambda a: SEVERITIES.index(severity_of(a, default_severity)))


def distinguishing(alerts: list[Alert]) -> tuple[dict[str, str], ...]:
    """For alerts sharing a key, each one's labels that are not the same in all of them."""
    if len(alerts) < 2:
        return ()
    names = sorted({name for a in alerts for name in a.labels})
    varying = [n for n in names if len({a.labels.get(n, "") for a in alerts}) > 1]
    return tuple({n: a.labels.get(n, "") for n in varying} for a in alerts[:MAX_MEMBERS_KEPT])


def _notice(alert: Alert, alerts: list[Alert], key: str, decision: Decision, notification: Notification) -> Notice:
    if len(alerts) == 1:
        starts_at, ends_at = alert.starts_at, alert.ends_at
    else:
        starts_at = min((a.starts_at for a in alerts if a.starts_at), default=alert.starts_at)
        ends_at = max(a.ends_at for a in alerts)
    return Notice(
        kind=RESOLVED if decision.action == "resolve" else FIRING,
        key=key,
        alertname=alert.labels.get("alertname", "alert"),
        severity=decision.severity,
        level=decision.level,
        labels=alert.labels,
        annotations=alert.annotations,
        starts_at=starts_at,
        ends_at=ends_at,
        generator_url=alert.generator_url,
        occurrences=decision.state.seen if decision.state else 0,
        reason=notification.notification_reason,
        group=notification.group_key,
        alerts=len(alerts),
        members=distinguishing(alerts),
        omitted=notification.omitted_alerts,
    )
