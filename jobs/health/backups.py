"""Backup freshness from the catalog: the newest backup is recent enough and verified; and what killed runs left.

A killed backup, drill or download leaves its work directory in the backup directory; the
next backup or drill removes it. One left for longer than ``--backup-max-age`` means none has
run since, and it holds disk space: a warning, as the exporter's ``BackupStaleStaging`` alert
says after the same 26 hours by default.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from mlwarden.jobs.health.result import Result, Status

from mlwarden.catalog import BACKUP_DIR_STAGING, Catalog, stale_staging
from mlwarden.fsutil import tree_usage
from mlwarden.terminal import human_bytes


class BackupSettings(Protocol):
    backup_dir: list[Path]
    backup_max_age: float


def check(settings: BackupSettings) -> list[Result]:
    return [_one(Path(directory), settings.backup_max_age) for directory in settings.backup_dir]


def check_staging(settings: BackupSettings) -> list[Result]:
    return [_staging(Path(directory), settings.backup_max_age) for directory in settings.backup_dir]


def _staging(directory: Path, max_age: float) -> Result:
    name = f"backup-staging:{directory}"
    left = stale_staging(directory, BACKUP_DIR_STAGING)
    if not left:
        return Result(name, Status.OK, "no work directories left by killed runs")
    now = time.time()
    # A directory's mtime is when the killed run last added to it: close to when it died.
    oldest = max(now - _mtime(path, now) for path in left)
    size = sum(tree_usage(path)[0] for path in left)
    data = {"directories": [path.name for path in left], "bytes": size, "oldest_age_seconds": round(oldest)}
    what = f"{len(left)} work director{'y' if len(left) == 1 else 'ies'} of killed backups, drills or downloads ({human_bytes(size)})"
    if oldest > max_age:
        return Result(name, Status.WARNING, f"{what} left {oldest / 3600:.1f} h ago (limit {max_age / 3600:g} h): "
                      "no backup or drill has run since to remove them", data)
    return Result(name, Status.OK, f"{what}: the next backup or drill removes them", data)


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by a backup that started
        return default


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
