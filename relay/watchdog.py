"""The Watchdog heartbeat of the alerting pipeline, as a small state machine (like healthchecks.io).

Alertmanager's always-firing ``Watchdog`` alert proves that Prometheus, the rules,
Alertmanager and the network all work. States: ``new`` (never seen), ``up`` (seen within
``period``), ``late`` (within ``period + grace``), ``down`` (beyond). A heartbeat that has
never arrived is ``new`` only for ``period + grace`` after the relay started watching, then
``down``: a pipeline that never delivered is as broken as one that stopped. Going down, and
coming back from down, is announced to the watchdog's destinations through the outbox.
"""

from __future__ import annotations

import logging

from mlwarden.relay.config import Watchdog
from mlwarden.relay.notice import PIPELINE_DOWN, PIPELINE_UP, Notice
from mlwarden.relay.store.base import Job, Store

NEW, UP, LATE, DOWN = "new", "up", "late", "down"
STATES = (NEW, UP, LATE, DOWN)

log = logging.getLogger(__name__)


def heartbeat_state(last_seen: float | None, now: float, period: float, grace: float, since: float) -> str:
    """The state at ``now``; ``since`` is when this relay started watching."""
    if last_seen is None:
        return NEW if now - since <= period + grace else DOWN
    silence = now - last_seen
    if silence <= period:
        return UP
    return LATE if silence <= period + grace else DOWN


def announcement(previous: str, current: str) -> str | None:
    """The notice kind to send for a transition, if it is worth telling people."""
    if current == DOWN and previous != DOWN:
        return PIPELINE_DOWN
    if current == UP and previous == DOWN:
        return PIPELINE_UP
    return None


def check(store: Store, watchdog: Watchdog, now: float, since: float) -> str:
    """Record the current state; enqueue the announcement of a transition (once, across replicas)."""
    last_seen, recorded = store.watchdog()
    current = heartbeat_state(last_seen, now, watchdog.period, watchdog.grace, since)
    if current != recorded:
        kind = announcement(recorded, current)
        jobs = []
        if kind is not None:
            notice = Notice(kind=kind, key="watchdog", alertname=watchdog.alertname, severity="critical")
            jobs = [Job(d, notice, created_at=now, due_at=now) for d in watchdog.destinations]
        if store.announce_watchdog(recorded, current, jobs) and kind is not None:
            log.warning("alerting pipeline heartbeat: %s -> %s; notifying %s", recorded, current,
                        ", ".join(watchdog.destinations))
    return current
