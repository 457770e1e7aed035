"""What a person is told: one alert (or pipeline event) as it goes to a destination.

A :class:`Notice` is stored with its delivery job, so a job can be delivered after a restart
without the original payload, and the notifiers render it without knowing about policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FIRING = "firing"
RESOLVED = "resolved"
PIPELINE_DOWN = "pipeline_down"
PIPELINE_UP = "pipeline_up"


# Not frozen, and never changed once built all the same (a changed one is a new one, made with
# dataclasses.replace; the SQLite store hands the outbox the very objects intake stored). Intake
# builds this, an Alert, a KeyState, a Decision and a Job for every alert of every webhook:
# frozen, each field is set through object.__setattr__, and building them cost three times as
# much (plan and parse of a webhook of 10 alerts: 0.45 -> 0.3 ms of CPU on a busy host).
@dataclass(slots=True)
class Notice:
    kind: str  # FIRING | RESOLVED | PIPELINE_DOWN | PIPELINE_UP
    key: str
    alertname: str
    severity: str
    level: int = 0  # escalation level
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    starts_at: str = ""
    ends_at: str = ""
    generator_url: str = ""
    occurrences: int = 0
    reason: str = ""  # Alertmanager's notification_reason, when it sends one
    group: str = ""  # Alertmanager's group key: a digest folds a flood per group
    alerts: int = 1  # the notification's alerts of this key (and status) that this notice stands for
    members: tuple[Mapping[str, str], ...] = ()  # with several: each one's labels that tell them apart
    omitted: int = 0  # alerts of the same notification left out to fit the relay's body limit

    @property
    def instance(self) -> str:
        return self.labels.get("instance", "")

    @property
    def gpu(self) -> str:
        return self.labels.get("gpu", "")

    @property
    def summary(self) -> str:
        return self.annotations.get("summary") or self.annotations.get("description") or self.alertname

    def to_dict(self) -> dict[str, Any]:
        # Spelled out: dataclasses.asdict deep-copies, and this runs for every job at intake.
        return {
            "kind": self.kind, "key": self.key, "alertname": self.alertname, "severity": self.severity,
            "level": self.level, "labels": dict(self.labels), "annotations": dict(self.annotations),
            "starts_at": self.starts_at, "ends_at": self.ends_at, "generator_url": self.generator_url, "occurrences": self.occurrences,
            "reason": self.reason, "group": self.group, "alerts": self.alerts,
            "members": [dict(m) for m in self.members], "omitted": self.omitted,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Notice:
        return cls(**{**data, "members": tuple(data.get("members", ()))})
