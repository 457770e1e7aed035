"""Alert keys: which alerts share cooldown, escalation and an ack (and a PagerDuty incident).

A key is a hash of the JSON of its (name, value) pairs, sorted: JSON quotes and escapes
every name and value, so two different label sets can never encode alike (joining
``name=value`` with commas let ``{instance: "n1,gpu=3"}`` and ``{instance: "n1", gpu:
"3,gpu="}`` share a key, its cooldown and its incident). The labels themselves are kept
in the key's state for people to read.
"""

from __future__ import annotations

import hashlib
import json

from mlwarden.relay.config import Route
from mlwarden.relay.payload import Alert


def key_labels(alert: Alert, route: Route) -> dict[str, str]:
    """The labels that make the key: the route's key_labels, or all of them."""
    if not route.key_labels:
        return dict(alert.labels)
    return {name: alert.labels.get(name, "") for name in route.key_labels}


def alert_key(alert: Alert, route: Route) -> str:
    """The alert's fingerprint (Alertmanager's hash of all its labels) without key_labels."""
    if not route.key_labels:
        return alert.fingerprint
    canonical = json.dumps(sorted(key_labels(alert, route).items()), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
