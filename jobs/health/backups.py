"""Backup freshness from the catalog: the newest backup is recent enough and verified."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from mlwarden.jobs.health.result import Result, Status

from mlwarden.catalog import Catalog


class BackupSettings(Protocol):
    backup_dir: list[Path]
    backup_max_age: float


def check(settings: BackupSettings) -> list[Result]:
    return [_one(Path(directory), settings.backup_max_age) for directory in settings.backup_dir]


def _one(directory: Path, max_age: float) -> Result:
    name = f"backups:{directory}"
    newest = Catalog(directory).latest()
    if newest is None:
        return Result(name, Status.CRITICAL, f"no backup in {directory}")
    age = time.time() - newest.manifest.finished_at
    data = {"newest": newest.name, "age_seconds": round(age), "verified": newest.verified}
    hours = age / 3600
    if age > max_age:
        return Result(name, Status.CRITICAL, f"newest backup {newest.name} is {hours:.1f} h old (limit {max_age / 3600:g} h)", data)
    if newest.verified is False:
        return Result(name, Status.CRITICAL, f"newest backup {newest.name} failed verification", data)
    if newest.verified is None:
        return Result(name, Status.WARNING, f"newest backup {newest.name} ({hours:.1f} h old) was never verified", data)
    return Result(name, Status.OK, f"newest backup {newest.name} is {hours:.1f} h old and verified", data)
