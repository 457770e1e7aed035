"""Inbound dedup: an HA Alertmanager cluster sends the same notification from each peer.

Two deliveries are the same notification when receiver, group key, status and the set of
(alert fingerprint, alert status) agree. The store remembers the digest for a window and
acknowledges a repeat without processing it again.
"""

from __future__ import annotations

import hashlib

from mlwarden.relay.payload import Notification

from mlwarden import jsonio


def notification_digest(notification: Notification) -> str:
    alerts = sorted((a.fingerprint, a.status) for a in notification.alerts)
    canonical = jsonio.encode([notification.receiver, notification.group_key, notification.status, alerts])
    return hashlib.sha256(canonical.encode()).hexdigest()
