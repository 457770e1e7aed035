"""Cooldown and escalation as pure functions of (state, alert, now, route): no clock, no I/O.

Per alert key the relay keeps a :class:`KeyState` for the current firing episode. Each
notification that carries the key firing (however many of its alerts share the key) is one
sighting: :func:`decide` says whether to notify (first sighting, cooldown over, severity
changed or escalation level rose) or to suppress, and what the state becomes. The state is
bounded: sightings are counted in a fixed window of ``within`` (a counter and the window's
start), not listed. Escalation is a chain of levels; level n is reached after its
``after_repeats`` sightings within the window or after firing for its ``after_firing``, and
adds the destinations of levels 1..n; severities listed in ``page_immediately`` start at the
top, and those not in ``severities`` (by default: info) never escalate. An acknowledged key
stays at its level until it resolves. A resolved alert clears the state and tells every
destination that was told it fired.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mlwarden.relay.config import SEVERITIES, Escalation, Route
from mlwarden.relay.payload import Alert


@dataclass(slots=True)  # not frozen: see notice.Notice
class KeyState:
    key: str
    severity: str
    first_seen: float  # start of this firing episode
    last_seen: float
    last_notified: float | None = None
    notifications: int = 0  # sent in this episode
    seen: int = 0  # sightings (notifications carrying the key firing) in this episode
    window_start: float = 0.0  # the escalation window's start ...
    window_count: int = 0  # ... and the sightings in it
    level: int = 0
    told: tuple[str, ...] = ()  # destinations notified in this episode: they get the resolution
    labels: Mapping[str, str] = field(default_factory=dict)  # the key's labels, for people
    acked_at: float | None = None  # an acknowledgement stops escalation until the key resolves
    acked_by: str = ""
    ack_comment: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {  # spelled out: dataclasses.asdict deep-copies, and this runs for every alert at intake
            "key": self.key, "severity": self.severity, "first_seen": self.first_seen, "last_seen": self.last_seen,
            "last_notified": self.last_notified, "notifications": self.notifications, "seen": self.seen,
            "window_start": self.window_start, "window_count": self.window_count, "level": self.level,
            "told": list(self.told), "labels": dict(self.labels), "acked_at": self.acked_at,
            "acked_by": self.acked_by, "ack_comment": self.ack_comment,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyState:
        data = dict(data)
        if "occurrences" in data:  # stored by a relay that listed every sighting
            sightings = data.pop("occurrences")
            data.update(seen=len(sightings), window_start=sightings[0] if sightings else data["first_seen"],
                        window_count=len(sightings))
        return cls(**{**data, "told": tuple(data["told"]), "labels": data.get("labels") or {}})


@dataclass(slots=True)  # not frozen: see notice.Notice
class Decision:
    action: str  # "notify" | "suppress" | "resolve"
    state: KeyState | None  # None: the key's state is cleared
    destinations: tuple[str, ...]
    severity: str
    level: int
    escalated: bool  # the level rose with this sighting


def severity_of(alert: Alert, default: str) -> str:
    severity = alert.labels.get("severity", "").lower()
    return severity if severity in SEVERITIES else default


def cooldown_for(state: KeyState, severity: str, route: Route) -> float:
    """How long after the last notification the next one may go out."""
    if route.escalating_cooldown and state.notifications > 0:
        steps = route.escalating_cooldown
        return steps[min(state.notifications - 1, len(steps) - 1)]
    return route.cooldown[severity]


def escalation_level(repeats: int, firing_for: float, severity: str, escalation: Escalation) -> int:
    """The highest level of the chain whose condition holds (0: none)."""
    if severity not in escalation.severities:
        return 0
    if severity in escalation.page_immediately:
        return len(escalation.levels)
    reached = 0
    for number, level in enumerate(escalation.levels, start=1):
        if (level.after_repeats is not None and repeats >= level.after_repeats) or (
            level.after_firing is not None and firing_for >= level.after_firing
        ):
            reached = number
    return reached


def decide(
    state: KeyState | None, alert: Alert, key: str, now: float, route: Route, default_severity: str,
    key_labels: Mapping[str, str] | None = None,
) -> Decision:
    """One sighting of ``key``: ``alert`` stands for all of the notification's alerts of the key."""
    severity = severity_of(alert, default_severity)
    if alert.status == "resolved":
        # Only those told of the alert hear of its end. Without a state nobody was (it was
        # never notified, or its resolution went out already: Alertmanager repeats resolved
        # alerts in its group notifications for a while), so nothing is sent.
        told = state.told if state is not None else ()
        return Decision("resolve", None, told, severity, state.level if state else 0, False)

    # States are built field by field rather than with dataclasses.replace: this runs for every
    # key of every webhook, and replace costs several times as much.
    escalation = route.escalation
    if state is None:  # the first sighting of this episode: always notified
        level = escalation_level(1, 0.0, severity, escalation)
        first = KeyState(
            key=key, severity=severity, first_seen=now, last_seen=now, last_notified=now, notifications=1, seen=1,
            window_start=now, window_count=1, level=level, told=route.reach[level],
            labels=key_labels if key_labels is not None else {},
        )
        return Decision("notify", first, route.reach[level], severity, level, False)

    if now - state.window_start >= escalation.within:
        window_start, window_count = now, 1
    else:
        window_start, window_count = state.window_start, state.window_count + 1
    level = state.level
    if state.acked_at is None:
        level = max(level, escalation_level(window_count, now - state.first_seen, severity, escalation))
    escalated = level > state.level
    due = (
        state.last_notified is None
        or escalated
        or severity != state.severity
        or now - state.last_notified >= cooldown_for(state, severity, route)
    )
    if not due:
        suppressed = KeyState(
            key=key, severity=state.severity, first_seen=state.first_seen, last_seen=now,
            last_notified=state.last_notified, notifications=state.notifications, seen=state.seen + 1,
            window_start=window_start, window_count=window_count, level=level, told=state.told, labels=state.labels,
            acked_at=state.acked_at, acked_by=state.acked_by, ack_comment=state.ack_comment,
        )
        return Decision("suppress", suppressed, (), severity, level, False)
    destinations = route.reach[level]
    notified = KeyState(
        key=key, severity=severity, first_seen=state.first_seen, last_seen=now, last_notified=now,
        notifications=state.notifications + 1, seen=state.seen + 1, window_start=window_start,
        window_count=window_count, level=level, told=tuple(dict.fromkeys(state.told + destinations)),
        labels=state.labels, acked_at=state.acked_at, acked_by=state.acked_by, ack_comment=state.ack_comment,
    )
    return Decision("notify", notified, destinations, severity, level, escalated)


def acknowledge(state: KeyState, by: str, comment: str, now: float) -> KeyState:
    """``state`` with escalation stopped at its level until the key resolves (a repeat keeps the first ack)."""
    if state.acked_at is not None:
        return state
    return replace(state, acked_at=now, acked_by=by, ack_comment=comment)
