"""Disk usage of the configured paths against warning and critical thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from mlwarden.jobs.health.result import Result, Status

from mlwarden.fsutil import disk_space
from mlwarden.terminal import human_bytes


class DiskSettings(Protocol):
    disk_path: list[Path]
    disk_warning: float
    disk_critical: float


def used_ratio(path: Path) -> tuple[float, int]:
    """The share of the filesystem in use as ``df`` counts it (reserved blocks excluded), and bytes free."""
    space = disk_space(path)
    return space.used_ratio, space.available


def check(settings: DiskSettings) -> list[Result]:
    results = []
    for path in settings.disk_path or [Path("/")]:
        name = f"disk:{path}"
        try:
            ratio, free = used_ratio(path)
        except OSError as exc:
            results.append(Result(name, Status.CRITICAL, f"cannot read {path}: {exc.strerror}"))
            continue
        if ratio >= settings.disk_critical:
            status = Status.CRITICAL
        elif ratio >= settings.disk_warning:
            status = Status.WARNING
        else:
            status = Status.OK
        summary = f"{ratio:.0%} used, {human_bytes(free)} free"
        results.append(Result(name, status, summary, {"path": str(path), "used_ratio": ratio, "free_bytes": free}))
    return results
