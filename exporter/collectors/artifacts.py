"""The ``artifacts`` collector: size and file count of each experiments directory, and its
filesystem's free and total bytes.

Walking a large tree is slow, so it runs at its own, slower interval in its own thread;
a scrape only ever sees the last finished walk. Symlinks are not followed (a link to
``/`` must not make the walk endless or count the same bytes twice).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from mlwarden.exporter.collectors.base import Collected, Collector, CollectorContext, CollectorSpec, register
from mlwarden.exporter.exposition import gauge

from mlwarden.settings import setting

log = logging.getLogger(__name__)


class ArtifactsCollector(Collector):
    name = "artifacts"

    def __init__(self, directories: list[Path], interval: float, timeout: float) -> None:
        self.directories = directories
        self.interval = interval
        self.timeout = timeout
        self._unreadable: set[Path] = set()  # logged once, not on every pass

    def collect(self) -> Collected:
        # here, not at the top: the exporter loads this module whether or not it has a directory to walk, and
        # mlwarden.fsutil's imports (tempfile, ...) are resident memory it otherwise never needs
        from mlwarden.fsutil import disk_space, tree_usage

        labels = ["directory"]
        size = gauge("mlwarden_artifacts_size_bytes", "Bytes of regular files under the directory (symlinks not followed).", labels=labels)
        files = gauge("mlwarden_artifacts_files", "Regular files under the directory.", labels=labels)
        free = gauge("mlwarden_artifacts_filesystem_free_bytes", "Bytes available to unprivileged users on the directory's filesystem.",
            labels=labels)
        fs_size = gauge("mlwarden_artifacts_filesystem_size_bytes", "Size of the directory's filesystem, in bytes.", labels=labels)
        success = True
        for directory in self.directories:
            try:
                space = disk_space(directory)
            except OSError as exc:
                if directory not in self._unreadable:
                    log.warning("artifacts directory %s: %s", directory, exc.strerror)
                    self._unreadable.add(directory)
                success = False
                continue
            self._unreadable.discard(directory)
            used, count = tree_usage(directory)
            label = [str(directory)]
            size.add_metric(label, used)
            files.add_metric(label, count)
            free.add_metric(label, space.available)
            fs_size.add_metric(label, space.size)
        return Collected([size, files, free, fs_size], success=success)


@dataclasses.dataclass(frozen=True)
class ArtifactsSettings:
    experiments_dir: list[Path] = setting(
        default_factory=list, env=("EXPERIMENTS_DIR",), metavar="DIR",
        help="experiments/artifact directory measured by the artifacts collector",
    )


def _build(settings: ArtifactsSettings, context: CollectorContext) -> Collector | None:
    if not settings.experiments_dir:
        return None
    return ArtifactsCollector(list(settings.experiments_dir), context.slow_interval, context.slow_interval)


register(CollectorSpec(
    "artifacts", "the size of each experiments directory and its filesystem (runs when --experiments-dir is set)",
    _build, ArtifactsSettings,
))
