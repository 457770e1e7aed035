"""Content stored once: which content the backup directory already holds, and the files cache.

The *index* maps each SHA-256 that a pack (a format-3 archive) in the backup directory holds
to that pack: a new backup stores only content missing from it and names the pack for the
rest. Packs marked failed by a verification are left out, so content that may be damaged is
stored again rather than referenced.

The *files cache* (``BACKUP_DIR/.mlwarden-files-cache-<source>.json``, one per source
directory) maps a file's (device, inode, size, ``mtime_ns``, ``ctime_ns``) to its SHA-256, as
restic's and borg's do: a file whose key is unchanged is not read at all. It is only a hint:

- written atomically as a backup commits, with a SHA-256 of its own body: a cache that is
  unreadable, damaged or of another version is dropped with a log line, never trusted. It is
  not fsynced (two fsyncs were the last 40-60 ms of a backup of 20,000 files): a crash can
  leave it damaged (dropped, then) or as an earlier run left it, whose entries are as sound as
  they were then (see the next two points);
- a file whose ``mtime_ns`` or ``ctime_ns`` lies within :data:`CLOCK_GRANULARITY_NS` of the
  scan's start is neither trusted from the cache nor entered into it: file times advance in
  clock ticks, so a file written again within the tick of the read could keep its times;
- a SHA-256 from the cache counts only if a pack still holds that content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

from mlwarden import jsonio
from mlwarden.catalog import Catalog, FileRecord
from mlwarden.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# Coarser than any Linux file system's timestamps (ext4, xfs, btrfs, tmpfs: one kernel tick, a
# few ms; NFS: the server's); FAT's 2 s is not a file system to keep models on.
CLOCK_GRANULARITY_NS = 1_000_000_000
CacheKey = tuple[int, int, int, int, int]  # device, inode, size, mtime_ns, ctime_ns


def cache_path(backup_dir: Path, source: Path) -> Path:
    """One cache per source directory: its base name (readable) and a hash of its path (unique)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", source.name) or "root"
    return backup_dir / f".mlwarden-files-cache-{slug}-{hashlib.sha256(str(source).encode('utf-8', 'surrogateescape')).hexdigest()[:16]}.json"


def load_cache(path: Path) -> dict[CacheKey, str]:
    """The cache's entries; empty (and a log line saying why) when it cannot be trusted."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("dropping the files cache %s: cannot read it (%s); every file is read", path, exc.strerror)
        return {}
    header, _, body = raw.partition(b"\n")
    try:
        meta = json.loads(header)
        if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
            raise ValueError("not a files cache of this version")
        if meta.get("sha256") != hashlib.sha256(body).hexdigest():
            raise ValueError("its content does not match its SHA-256")
        return {(int(d), int(i), int(s), int(m), int(c)): _sha256(h) for d, i, s, m, c, h in json.loads(body)}
    except (ValueError, TypeError) as exc:
        log.warning("dropping the files cache %s: %s; every file is read", path, exc)
        return {}


def save_cache(path: Path, entries: dict[CacheKey, str]) -> None:
    # Compact JSON, by orjson (tested against json.dumps): half the CPU of formatting each entry
    # by hand, in a thread that shares the GIL with the backup's commit.
    body = jsonio.encode([(*key, sha) for key, sha in sorted(entries.items())]).encode()
    header = json.dumps({"version": CACHE_VERSION, "sha256": hashlib.sha256(body).hexdigest()}).encode()
    atomic_write_bytes(path, header + b"\n" + body, mode=0o600, durable=False)


def _sha256(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"{value!r} is not a SHA-256")
    return value


@dataclass
class Dedup:
    """What one backup run knows while it writes its pack.

    Its methods run once per file (20,000 times in a tree of small files): each looks a file's
    key up once, and what the next run's cache holds is sorted out once, at the end
    (:meth:`next_cache`)."""

    name: str  # the backup being made: its pack
    index: dict[str, str]  # SHA-256 -> the earlier pack that holds it
    cache: dict[CacheKey, str]
    scan_started_ns: int
    sizes: set[int] = field(default_factory=set)  # sizes of the indexed content: a cheap "could be stored"
    trusted: dict[CacheKey, str] = field(default_factory=dict)  # the cache's entries this run trusted, not read
    stored_here: set[str] = field(default_factory=set)  # SHA-256s this pack holds so far
    read_here: dict[CacheKey, str] = field(default_factory=dict)  # what this run read: a hard link's other names

    def _recent(self, key: CacheKey) -> bool:
        return max(key[3], key[4]) >= self.scan_started_ns - CLOCK_GRANULARITY_NS

    def unchanged(self, key: CacheKey) -> str | None:
        """The SHA-256 of an unchanged file whose content a pack holds; None: read it. A hard
        link to a file this run already read (same device, inode and times) is not read again."""
        sha = self.read_here.get(key)
        if sha is not None:
            return sha
        sha = self.cache.get(key) if self.cache else None
        if sha is None or self._recent(key) or self.pack_of(sha) is None:
            return None
        self.trusted[key] = sha
        return sha

    def pack_of(self, sha: str) -> str | None:
        """The pack holding ``sha``: this one if already stored in this run, else an earlier one."""
        return self.name if sha in self.stored_here else self.index.get(sha)

    def may_hold(self, size: int) -> bool:
        """Whether an earlier pack holds content of this size: only then is a large file
        hashed before it is stored (a second read), to store it only if it is new."""
        return size in self.sizes

    def read(self, key: CacheKey, record: FileRecord, stored: bool) -> None:
        """A file was read (and ``stored`` in this pack or not): remember it for the next run."""
        if stored:
            self.stored_here.add(record.sha256)
        self.read_here[key] = record.sha256

    def next_cache(self) -> dict[CacheKey, str]:
        """The files cache for the next run: what this one trusted and what it read, but no file
        whose times are recent (see the module's notes)."""
        recent = self.scan_started_ns - CLOCK_GRANULARITY_NS
        entries = dict(self.trusted)
        read = self.read_here
        if read and max(map(itemgetter(3), read)) < recent and max(map(itemgetter(4), read)) < recent:
            entries.update(read)  # none written within the tick (most runs): no test per file
        else:
            entries.update((key, sha) for key, sha in read.items() if key[3] < recent and key[4] < recent)
        return entries


def content_index(catalog: Catalog) -> tuple[dict[str, str], set[int]]:
    """SHA-256 -> a pack holding it, and the sizes held, over every usable pack in ``catalog``."""
    index: dict[str, str] = {}
    sizes: set[int] = set()

    def unreadable(directory: Path, exc: Exception) -> None:
        log.warning("pack %s is unreadable: its content is not referenced (stored again if needed): %s", directory, exc)

    for entry in catalog.packs(on_unreadable=unreadable):
        if entry.verified is False:
            log.warning("pack %s failed verification: its content is not referenced (stored again if needed)", entry.name)
            continue
        for record in entry.manifest.files:
            index[record.sha256] = entry.name  # any pack that holds it will do; the last by name wins
            sizes.add(record.size)
    return index, sizes
