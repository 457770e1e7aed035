"""The ``backups`` collector: the state of the backup catalog that ``mlwarden backup`` writes.

It reads :class:`mlwarden.catalog.Catalog` and never writes. A backup directory that does
not exist yet reports zero backups (so "no backup" alerts fire on a fresh machine).
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

from exporter.collectors.base import Collected, Collector
from mlwarden.catalog import Catalog


class BackupsCollector(Collector):
    name = "backups"

    def __init__(self, backup_dir: Path, interval: float, timeout: float) -> None:
        self.backup_dir = backup_dir
        self.interval = interval
        self.timeout = timeout

    def collect(self) -> Collected:
        catalog = Catalog(self.backup_dir)
        entries = catalog.entries()
        incomplete = catalog.incomplete()
        labels = [str(self.backup_dir)]

        def gauge(name: str, text: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, labels=["backup_dir"])

        count = gauge("mlwarden_backups", "Committed backups in the backup directory.")
        newest = gauge("mlwarden_backup_newest_timestamp_seconds", "When the newest backup finished (Unix time).")
        size = gauge("mlwarden_backup_size_bytes", "Total size of all backup archives, in bytes.")
        verified = gauge("mlwarden_backup_newest_verified", "1 when the newest backup's last verification passed, 0 when it failed; absent if never verified.")
        offsite = gauge("mlwarden_backup_newest_offsite", "1 when the newest backup has an off-site copy, else 0.")
        partial = gauge("mlwarden_backup_incomplete", "Backup directories without a manifest (interrupted runs).")
        count.add_metric(labels, len(entries))
        size.add_metric(labels, sum(e.manifest.archive_bytes for e in entries))
        partial.add_metric(labels, len(incomplete))
        if entries:
            latest = entries[-1]
            newest.add_metric(labels, latest.manifest.finished_at)
            offsite.add_metric(labels, 1 if latest.status.offsite is not None else 0)
            if latest.verified is not None:
                verified.add_metric(labels, 1 if latest.verified else 0)
        return Collected([count, newest, size, verified, offsite, partial])
