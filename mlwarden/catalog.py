"""The backup catalog: the on-disk format that ``mlwarden backup`` writes and the exporter reads.

Layout under the backup directory::

    BACKUP_DIR/
      <name>/                      one backup; <name> = <source>-<YYYYmmddTHHMMSSZ>
        <name>.tar.zst             the archive (.tar.zst, .tar.gz or .tar): plain tar
        <name>.tar.zst.sha256      `sha256sum -c` line for the archive
        SHA256SUMS                 `sha256sum -c` lines for every file inside the archive
        manifest.json              written last: the commit marker
        status.json                mutable: last verification, off-site copy (optional)

A backup is written in a staging directory, ``.mlwarden-staging-<pid>-<name>``, and renamed
to ``<name>`` once its manifest is written. Work directories are hidden and carry the pid of
the run that made them: ``.drill-<pid>-*`` (a restore drill's scratch), ``.download-<pid>-*``
(a download from S3, private: mode 0700) and, next to a restore's target,
``.<target>.restore-<pid>-*``. Only such directories, once their process is gone, are ever
removed as left over (:func:`stale_staging`). A visible directory without ``manifest.json``
is not a backup, and is never removed: it is reported (an operator's directory, or a backup
whose manifest was deleted, which is still restorable by hand). ``manifest.json`` never
changes once written; what happens to a backup later (verification, upload) goes to
``status.json``, which is rewritten atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlwarden.fsutil import atomic_write_text

FORMAT_VERSION = 2  # 2: links, skipped, excludes, rewritten (1 still reads: they are empty)
MANIFEST = "manifest.json"
STATUS = "status.json"
CHECKSUMS = "SHA256SUMS"
ARCHIVE_EXTENSIONS = {"zstd": ".tar.zst", "gzip": ".tar.gz", "none": ".tar"}
# <source slug>-<UTC start>: what ``backup_name`` makes. Its character set has no separator,
# so a name that matches is one path component and never "." or "..".
_BACKUP_NAME = re.compile(r"[A-Za-z0-9._-]+-\d{8}T\d{6}Z")
BACKUP_STAGING = ".mlwarden-staging-"
DRILL_STAGING = ".drill-"
DOWNLOAD_STAGING = ".download-"
# What a run may leave in the backup directory when it is killed: a backup being written, a
# drill's scratch, a download from S3 (for a drill).
BACKUP_DIR_STAGING = (BACKUP_STAGING, DRILL_STAGING, DOWNLOAD_STAGING)
_PID = re.compile(r"(\d{1,9})-")

log = logging.getLogger(__name__)


class CatalogError(ValueError):
    """A manifest or status file exists but cannot be read as this format."""


def check_backup_name(name: object) -> str:
    """``name`` if it is a backup's name, else CatalogError: names come from manifests and
    buckets that others can write, and become paths and keys."""
    if not isinstance(name, str) or not _BACKUP_NAME.fullmatch(name):
        raise CatalogError(f"not a backup name: {name!r} (expected <source>-<YYYYmmddTHHMMSSZ>)")
    return name


def staging_dir(parent: Path, prefix: str, name: str = "") -> Path:
    """A new work directory ``<prefix><pid>-<name>`` in ``parent``; without ``name`` a random
    one, private (0700). A named one gets the usual mode: a backup's becomes the backup."""
    if name:
        path = parent / f"{prefix}{os.getpid()}-{name}"
        path.mkdir()
        return path
    return Path(tempfile.mkdtemp(dir=parent, prefix=f"{prefix}{os.getpid()}-"))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_staging(parent: Path, prefixes: tuple[str, ...]) -> list[Path]:
    """Work directories in ``parent`` named with one of ``prefixes`` whose process is gone
    (or that carry no pid: made by a version before pids were in the name)."""
    found = []
    try:
        with os.scandir(parent) as it:
            for item in it:
                prefix = next((p for p in prefixes if item.name.startswith(p)), None)
                if prefix is None or not item.is_dir(follow_symlinks=False):
                    continue
                pid = _PID.match(item.name[len(prefix) :])
                if pid is None or not _alive(int(pid.group(1))):
                    found.append(Path(item.path))
    except FileNotFoundError:
        pass
    return sorted(found)


def _load_json(text: str | bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise CatalogError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{what} is not a JSON object")
    return data


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the source directory, '/'-separated
    size: int
    sha256: str
    mtime: float
    mode: int = 0o644


@dataclass(frozen=True)
class LinkRecord:
    """A symbolic link, stored as a link (never followed): restored as a link."""

    path: str  # relative to the source directory, '/'-separated
    target: str  # what the link points at, as read by readlink


@dataclass(frozen=True)
class SkippedRecord:
    """Something in the source that a tar of model files does not hold: a FIFO, a socket, a device."""

    path: str
    kind: str


@dataclass(frozen=True)
class Manifest:
    name: str
    source: str  # absolute path of the backed-up directory
    host: str
    started_at: float  # unix seconds
    finished_at: float
    compression: str  # "zstd" | "gzip" | "none"
    level: int | None
    archive: str  # file name inside the backup's directory
    archive_bytes: int
    archive_sha256: str
    total_bytes: int  # sum of the files' sizes before compression
    files: tuple[FileRecord, ...]
    links: tuple[LinkRecord, ...] = ()
    skipped: tuple[SkippedRecord, ...] = ()
    excludes: tuple[str, ...] = ()  # the --exclude patterns of the run
    rewritten: tuple[str, ...] = ()  # files stored twice: changed during the first read, the later copy counts
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        check_backup_name(self.name)
        extension = ARCHIVE_EXTENSIONS.get(self.compression)
        if extension is None:
            raise CatalogError(f"manifest of {self.name}: unknown compression {self.compression!r}")
        if self.archive != self.name + extension:
            raise CatalogError(f"manifest of {self.name}: archive {self.archive!r} is not {self.name + extension!r}")

    def to_json(self) -> str:
        """Sorted keys, one record a line: readable and greppable, and written by json's C
        encoder (``indent`` would switch to its Python one: 0.6 s for 20,000 files)."""
        lines = []
        for field_ in sorted(dataclasses.fields(self), key=lambda f: f.name):
            value = getattr(self, field_.name)
            if field_.name in ("files", "links", "skipped") and value:
                rows = ",\n".join("  " + json.dumps(vars(record), sort_keys=True) for record in value)
                lines.append(f' "{field_.name}": [\n{rows}\n ]')
            else:
                lines.append(f' "{field_.name}": {json.dumps(value)}')
        return "{\n" + ",\n".join(lines) + "\n}\n"

    @classmethod
    def from_json(cls, text: str | bytes, what: str = "manifest") -> Manifest:
        """Parse a manifest from a catalog or a bucket; anything unexpected is a CatalogError naming ``what``."""
        data = _load_json(text, what)
        try:
            records = ("files", "links", "skipped", "excludes", "rewritten")
            fields = {f.name for f in dataclasses.fields(cls)} - set(records)
            return cls(
                files=tuple(FileRecord(**f) for f in data["files"]),
                links=tuple(LinkRecord(**f) for f in data.get("links", ())),
                skipped=tuple(SkippedRecord(**f) for f in data.get("skipped", ())),
                excludes=tuple(str(p) for p in data.get("excludes", ())),
                rewritten=tuple(str(p) for p in data.get("rewritten", ())),
                **{k: v for k, v in data.items() if k in fields},
            )
        except (KeyError, TypeError) as exc:
            raise CatalogError(f"{what} is missing or has wrong fields: {exc}") from None
        except CatalogError as exc:
            raise CatalogError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class Verification:
    checked_at: float
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class OffsiteCopy:
    uploaded_at: float
    bucket: str
    key: str
    sha256: str
    storage_class: str = "STANDARD"
    verified: bool = False


@dataclass(frozen=True)
class Status:
    verification: Verification | None = None
    offsite: OffsiteCopy | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, what: str = "status") -> Status:
        data = _load_json(text, what)
        try:
            ver = data.get("verification")
            off = data.get("offsite")
            return cls(
                verification=Verification(**ver) if ver else None,
                offsite=OffsiteCopy(**off) if off else None,
            )
        except TypeError as exc:
            raise CatalogError(f"{what} has wrong fields: {exc}") from None


@dataclass(frozen=True)
class BackupEntry:
    directory: Path
    manifest: Manifest
    status: Status = field(default_factory=Status)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def archive_path(self) -> Path:
        return self.directory / self.manifest.archive

    @property
    def verified(self) -> bool | None:
        """True/False after a verification, None when it was never verified."""
        return None if self.status.verification is None else self.status.verification.ok


def _warn_unreadable(directory: Path, exc: Exception) -> None:
    log.warning("skipping unreadable backup %s: %s", directory, exc)


class Catalog:
    """Read and update the backups under one backup directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entries(self, on_unreadable: Callable[[Path, Exception], None] | None = None) -> list[BackupEntry]:
        """Committed backups, oldest first. Unreadable manifests are skipped and handed to
        ``on_unreadable`` (default: a warning; the exporter, which reads the catalog every
        pass, passes its own so it can say it once)."""
        report = on_unreadable or _warn_unreadable
        result = []
        for directory in self._candidate_dirs():
            try:
                entry = self.read(directory)
            except (OSError, ValueError) as exc:
                report(directory, exc)
                continue
            if entry is not None:
                result.append(entry)
        result.sort(key=lambda e: (e.manifest.started_at, e.name))
        return result

    def incomplete(self) -> list[Path]:
        """Visible directories without a manifest: not backups, never removed, reported."""
        return [d for d in self._candidate_dirs() if not (d / MANIFEST).exists()]

    def latest(self) -> BackupEntry | None:
        entries = self.entries()
        return entries[-1] if entries else None

    def get(self, name: str) -> BackupEntry:
        """Backup ``name``; ``latest`` is the newest not marked failed by a verification."""
        if name == "latest":
            entries = self.entries()
            for entry in reversed(entries):
                verification = entry.status.verification
                if verification is None or verification.ok:
                    return entry
                log.warning("skipping backup %s for latest: it failed verification (%s)", entry.name, verification.detail)
            raise CatalogError(f"no backups in {self.root}" if not entries else f"no backup in {self.root} that did not fail verification")
        named = self.read(self.root / check_backup_name(name))
        if named is None:
            raise CatalogError(f"no backup named {name!r} in {self.root}")
        return named

    @staticmethod
    def read(directory: Path) -> BackupEntry | None:
        """The backup in ``directory``, None without a manifest; CatalogError (one line naming
        the file) when its manifest or status cannot be read."""
        manifest_path = directory / MANIFEST
        try:
            manifest = Manifest.from_json(manifest_path.read_bytes(), str(manifest_path))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CatalogError(f"cannot read {manifest_path}: {exc.strerror}") from None
        status_path = directory / STATUS
        try:
            status = Status.from_json(status_path.read_bytes(), str(status_path))
        except FileNotFoundError:
            status = Status()
        except OSError as exc:
            raise CatalogError(f"cannot read {status_path}: {exc.strerror}") from None
        return BackupEntry(directory=directory, manifest=manifest, status=status)

    @staticmethod
    def commit(directory: Path, manifest: Manifest) -> BackupEntry:
        """Write the manifest last, atomically: from now on the backup exists."""
        atomic_write_text(directory / MANIFEST, manifest.to_json())
        return BackupEntry(directory=directory, manifest=manifest)

    @staticmethod
    def update_status(entry: BackupEntry, **changes: Any) -> BackupEntry:
        """Record a verification or an off-site copy (``verification=...``, ``offsite=...``)."""
        status = dataclasses.replace(entry.status, **changes)
        atomic_write_text(entry.directory / STATUS, status.to_json())
        return dataclasses.replace(entry, status=status)

    def _candidate_dirs(self) -> Iterator[Path]:
        try:
            with os.scandir(self.root) as it:
                for item in it:
                    if item.is_dir(follow_symlinks=False) and not item.name.startswith("."):
                        yield Path(item.path)
        except FileNotFoundError:
            return
