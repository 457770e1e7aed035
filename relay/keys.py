"""Alert keys: which alerts share cooldown, escalation and an ack (and a PagerDuty incident)."""

from __future__ import annotations

from mlwarden.relay.config import Route
from mlwarden.relay.payload import Alert


def key_labels(alert: Alert, route: Route) -> dict[str, str]:
    """The labels that make the key: the route's key_labels, or all of them."""
    if not route.key_labels:
        return dict(alert.labels)
    return {name: alert.labels.get(name, "") for name in route.key_labels}


def alert_key(alert: Alert, route: Route) -> str:
    """The alert's fingerprint, or ``name=value`` of the route's key labels."""
    if not route.key_labels:
        return alert.fingerprint
    return ",".join(f"{name}={value}" for name, value in key_labels(alert, route).items())
