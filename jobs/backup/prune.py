"""Delete backups without taking content that a kept backup needs (format 3), safe at every step.

A format-3 backup's archive is a *pack* that later backups may name for their content. To
delete such a backup, its ``manifest.json`` is renamed to ``manifest.pruned.json`` (one
atomic rename: from then on it is no longer a backup, only a pack); then every pruned pack
that no remaining manifest names is renamed to a staging name and removed. A pack is thus
removed only after the last manifest that names it is gone, and a ``kill -9`` at any point
leaves either a backup (intact), a pruned pack (removed by the next run once unreferenced) or
a staging directory (removed by the next run); every kept backup stays restorable.

A format-2 backup holds all of its content, and a format-3 backup that stored nothing new
holds none (no pack of its own): either is renamed to a staging name and removed whole.
Nothing is removed while any manifest in the directory cannot be read: it might name the pack.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from mlwarden.catalog import BACKUP_STAGING, MANIFEST, PRUNED, BackupEntry, Catalog
from mlwarden.fsutil import fsync_dir

log = logging.getLogger(__name__)


def delete_backups(catalog: Catalog, doomed: list[BackupEntry]) -> list[str]:
    """Delete ``doomed`` (their packs only once unreferenced); returns the packs removed."""
    for entry in doomed:
        if entry.pack is None:
            remove_directory(entry.directory)
            continue
        os.rename(entry.directory / MANIFEST, entry.directory / PRUNED)  # the backup is gone; its pack stays for now
        fsync_dir(entry.directory)
    return collect_garbage(catalog)


def collect_garbage(catalog: Catalog) -> list[str]:
    """Remove the pruned packs that no backup in ``catalog`` names any more."""
    pruned = catalog.pack_only()
    if not pruned:
        return []  # nothing to remove: no need to read every manifest (a run's cost would grow with the catalog)
    unreadable: list[str] = []
    entries = catalog.entries(on_unreadable=lambda directory, exc: unreadable.append(f"{directory.name}: {exc}"))
    if unreadable:
        log.warning("not removing unreferenced packs: %d manifest(s) cannot be read and might name them (%s)", len(unreadable), unreadable[0])
        return []
    referenced = {name for entry in entries for name in entry.manifest.packs}
    removed = []
    for directory in pruned:
        if directory.name in referenced:
            continue
        log.info("removing pack %s: no backup names it any more", directory.name)
        remove_directory(directory)
        removed.append(directory.name)
    return removed


def remove_directory(directory: Path) -> None:
    # Renamed to a staging name first: if the deletion is interrupted, what is left is a
    # staging directory (removed by the next run), never a backup or pack with missing files.
    doomed = directory.with_name(f"{BACKUP_STAGING}{os.getpid()}-{directory.name}")
    os.rename(directory, doomed)
    shutil.rmtree(doomed)
