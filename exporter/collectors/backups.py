"""The ``backups`` collector: the state of the backup catalog that ``mlwarden backup`` writes.

It reads :class:`mlwarden.catalog.Catalog` and never writes. A backup directory that does
not exist yet reports zero backups (so "no backup" alerts fire on a fresh machine).

A backup whose manifest (or status) cannot be read counts in ``mlwarden_backup_incomplete``
on every pass, but is logged once: again only when its files change, or when it was readable
in between and broke again. The catalog is read every ``--artifacts-interval``; a warning
each time would bury the one that matters.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from mlwarden.exporter.collectors.base import Collected, Collector, CollectorContext, CollectorSpec, register
from mlwarden.exporter.exposition import Family, gauge

from mlwarden.settings import setting

if TYPE_CHECKING:
    from mlwarden.catalog import Catalog

# mlwarden.catalog and mlwarden.fsutil are imported where they are used: with what they import (orjson, tempfile,
# datetime, uuid, ...) they are 0.8 MiB of resident memory that an exporter without --backup-dir never needs.

log = logging.getLogger(__name__)

FileIdentity = tuple[int, int, int, int] | None  # inode, size, mtime, ctime; None when missing
# What an unreadable backup looked like when it was logged: the error, and its manifest's and status's identity.
Fingerprint = tuple[str, FileIdentity, FileIdentity]


def _file_identity(path: Path) -> FileIdentity:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # ctime: a chmod that fixes (or breaks) it


def _fingerprint(directory: Path, exc: Exception) -> Fingerprint:
    from mlwarden.catalog import MANIFEST, STATUS

    return (str(exc), _file_identity(directory / MANIFEST), _file_identity(directory / STATUS))


class BackupsCollector(Collector):
    name = "backups"

    def __init__(self, backup_dir: Path, interval: float, timeout: float) -> None:
        self.backup_dir = backup_dir
        self.interval = interval
        self.timeout = timeout
        self._logged_unreadable: dict[Path, Fingerprint] = {}

    def collect(self) -> Collected:
        from mlwarden.catalog import BACKUP_DIR_STAGING, Catalog, stale_staging
        from mlwarden.fsutil import tree_usage

        catalog = Catalog(self.backup_dir)
        unreadable: dict[Path, Exception] = {}
        entries = catalog.entries(on_unreadable=unreadable.__setitem__)
        stored_bytes = sum(e.manifest.archive_bytes for e in entries) + self._kept_pack_bytes(catalog, unreadable)
        self._log_unreadable(unreadable)
        incomplete = catalog.incomplete()
        labels = [str(self.backup_dir)]

        def family(name: str, text: str) -> Family:
            return gauge(name, text, labels=["backup_dir"])

        count = family("mlwarden_backups", "Committed backups in the backup directory.")
        newest = family("mlwarden_backup_newest_timestamp_seconds", "When the newest backup finished (Unix time).")
        size = family("mlwarden_backup_size_bytes",
                      "Bytes of every archive in the backup directory: each backup's, and the packs of pruned backups that kept ones still need.")
        verified = family("mlwarden_backup_newest_verified",
                          "1 when the newest backup's last verification passed, 0 when it failed; absent if never verified.")
        offsite = family("mlwarden_backup_newest_offsite", "1 when the newest backup has an off-site copy, else 0.")
        partial = family(
            "mlwarden_backup_incomplete",
            "Directories in the backup directory without a readable manifest (never removed by mlwarden: someone's "
            "directory, a deleted manifest, corrupt or unreadable catalog files).",
        )
        stale = family(
            "mlwarden_backup_stale_staging_bytes",
            "Bytes in work directories that killed backups, drills or downloads left behind (the next backup or drill removes them).",
        )
        stale.add_metric(labels, sum(tree_usage(directory)[0] for directory in stale_staging(self.backup_dir, BACKUP_DIR_STAGING)))
        damaged = gauge(
            "mlwarden_backup_damaged", "1 for a backup whose last verification failed (kept for inspection; restore latest skips it), else 0.",
            labels=["backup_dir", "backup"],
        )
        for entry in entries:
            damaged.add_metric([*labels, entry.name], 1 if entry.verified is False else 0)
        count.add_metric(labels, len(entries))
        size.add_metric(labels, stored_bytes)
        partial.add_metric(labels, len(incomplete) + len(unreadable))
        if entries:
            latest = entries[-1]
            newest.add_metric(labels, latest.manifest.finished_at)
            offsite.add_metric(labels, 1 if latest.status.offsite is not None else 0)
            if latest.verified is not None:
                verified.add_metric(labels, 1 if latest.verified else 0)
        return Collected([count, newest, size, verified, offsite, partial, damaged, stale])

    @staticmethod
    def _kept_pack_bytes(catalog: Catalog, unreadable: dict[Path, Exception]) -> int:
        """Archives of pruned backups that stay while a kept backup's content lives in them (format 3).

        Sized by a stat of the archive, not by reading its pack.json: this runs every artifacts
        pass, and a big model's pack list is megabytes of JSON."""
        from mlwarden.catalog import ARCHIVE_EXTENSIONS

        total = 0
        for directory in catalog.pack_only():
            for extension in ARCHIVE_EXTENSIONS.values():
                try:
                    total += (directory / (directory.name + extension)).stat().st_size
                    break
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    unreadable[directory] = exc
                    break
        return total

    def _log_unreadable(self, unreadable: dict[Path, Exception]) -> None:
        """Warn about each unreadable backup once per distinct state; forget those readable (or gone) now."""
        seen = {directory: _fingerprint(directory, exc) for directory, exc in unreadable.items()}
        for directory, fingerprint in sorted(seen.items()):
            if self._logged_unreadable.get(directory) != fingerprint:
                log.warning("backup %s is unreadable (counted in mlwarden_backup_incomplete): %s", directory, unreadable[directory])
        self._logged_unreadable = seen


@dataclasses.dataclass(frozen=True)
class BackupsSettings:
    backup_dir: Path | None = setting(None, env=("BACKUP_DIR",), help="backup directory whose catalog the backups collector reads")


def _build(settings: BackupsSettings, context: CollectorContext) -> Collector | None:
    if settings.backup_dir is None:
        return None
    return BackupsCollector(settings.backup_dir, context.slow_interval, context.slow_interval)


register(CollectorSpec(
    "backups", "the backup catalog's state, damage and staging (runs when --backup-dir is set)", _build, BackupsSettings,
))
