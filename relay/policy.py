"""Cooldown and escalation as pure functions of (state, alert, now, route): no clock, no I/O.

Per alert key the relay keeps a :class:`KeyState` for the current firing episode. Each time
the alert arrives firing, :func:`decide` says whether to notify (first sighting, cooldown
over, severity changed or escalation level rose) or to suppress, and what the state
becomes. Escalation raises the level from 0 to 1 when the key was seen ``after_repeats``
times within ``within``, or has been firing for longer than ``after_firing``; severities
listed in ``page_immediately`` start at level 1. Level 1 adds the escalation destinations.
A resolved alert clears the state and tells every destination that was told it fired.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from mlwarden.relay.config import SEVERITIES, Escalation, Route
from mlwarden.relay.payload import Alert


@dataclass(frozen=True, slots=True)
class KeyState:
    key: str
    severity: str
    first_seen: float  # start of this firing episode
    last_seen: float
    last_notified: float | None = None
    notifications: int = 0  # sent in this episode
    occurrences: tuple[float, ...] = ()  # sightings within the escalation window
    level: int = 0
    told: tuple[str, ...] = ()  # destinations notified in this episode: they get the resolution

    def to_dict(self) -> dict[str, Any]:
        return {  # spelled out: dataclasses.asdict deep-copies, and this runs for every alert at intake
            "key": self.key, "severity": self.severity, "first_seen": self.first_seen, "last_seen": self.last_seen,
            "last_notified": self.last_notified, "notifications": self.notifications,
            "occurrences": list(self.occurrences), "level": self.level, "told": list(self.told),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyState:
        return cls(**{**data, "occurrences": tuple(data["occurrences"]), "told": tuple(data["told"])})


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # "notify" | "suppress" | "resolve"
    state: KeyState | None  # None: the key's state is cleared
    destinations: tuple[str, ...]
    severity: str
    level: int
    escalated: bool  # the level rose with this sighting


def alert_key(alert: Alert, route: Route) -> str:
    """The alert's fingerprint, or ``name=value`` of the route's key labels."""
    if not route.key_labels:
        return alert.fingerprint
    return ",".join(f"{name}={alert.labels.get(name, '')}" for name in route.key_labels)


def severity_of(alert: Alert, default: str) -> str:
    severity = alert.labels.get("severity", "").lower()
    return severity if severity in SEVERITIES else default


def cooldown_for(state: KeyState, severity: str, route: Route) -> float:
    """How long after the last notification the next one may go out."""
    if route.escalating_cooldown and state.notifications > 0:
        steps = route.escalating_cooldown
        return steps[min(state.notifications - 1, len(steps) - 1)]
    return route.cooldown[severity]


def escalation_level(occurrences: int, firing_for: float, severity: str, escalation: Escalation) -> int:
    if severity in escalation.page_immediately:
        return 1
    if occurrences >= escalation.after_repeats:
        return 1
    if escalation.after_firing is not None and firing_for >= escalation.after_firing:
        return 1
    return 0


def decide(state: KeyState | None, alert: Alert, key: str, now: float, route: Route, default_severity: str) -> Decision:
    severity = severity_of(alert, default_severity)
    if alert.status == "resolved":
        # Only those told of the alert hear of its end. Without a state nobody was (it was
        # never notified, or its resolution went out already: Alertmanager repeats resolved
        # alerts in its group notifications for a while), so nothing is sent.
        told = state.told if state is not None else ()
        return Decision("resolve", None, told, severity, state.level if state else 0, False)

    previous = state or KeyState(key=key, severity=severity, first_seen=now, last_seen=now)
    window = route.escalation.within
    occurrences = tuple(t for t in previous.occurrences if now - t < window) + (now,)
    computed = escalation_level(len(occurrences), now - previous.first_seen, severity, route.escalation)
    level = max(previous.level, computed)
    escalated = state is not None and level > state.level
    destinations = route.destinations + (route.escalation.destinations if level >= 1 else ())
    destinations = tuple(dict.fromkeys(destinations))  # keep order, drop repeats
    due = (
        state is None
        or state.last_notified is None
        or escalated
        or severity != state.severity
        or now - state.last_notified >= cooldown_for(state, severity, route)
    )
    if not due:
        suppressed = replace(previous, last_seen=now, occurrences=occurrences, level=level)
        return Decision("suppress", suppressed, (), severity, level, False)
    notified = replace(
        previous,
        severity=severity,
        last_seen=now,
        occurrences=occurrences,
        level=level,
        last_notified=now,
        notifications=previous.notifications + 1,
        told=tuple(dict.fromkeys(previous.told + destinations)),
    )
    return Decision("notify", notified, destinations, severity, level, escalated)
