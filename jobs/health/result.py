"""What every health check returns."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Status(enum.StrEnum):
    OK = "ok"
    WARNING = "warning"  # worth a look; the machine still counts as healthy
    CRITICAL = "critical"  # the machine is not healthy; exit status 1


@dataclass(frozen=True)
class Result:
    check: str  # e.g. "disk:/data", "gpu:0", "service:exporter", "backups:/var/backups/models"
    status: Status
    summary: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status is not Status.CRITICAL

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "status": self.status.value, "summary": self.summary, **self.data}
