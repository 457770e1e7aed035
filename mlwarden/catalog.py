"""The backup catalog: the on-disk format that ``mlwarden backup`` writes and the exporter reads.

Layout under the backup directory::

    BACKUP_DIR/
      <name>/                      one backup; <name> = <source>-<YYYYmmddTHHMMSSZ>
        <name>.tar.zst             the archive (.tar.zst, .tar.gz or .tar): plain tar
        <name>.tar.zst.sha256      `sha256sum -c` line for the archive
        SHA256SUMS                 `sha256sum -c` lines for every file of the backup
        pack.json                  format 3: what the archive holds (its members and their hashes)
        manifest.json              written last: the commit marker
        status.json                mutable: last verification, off-site copy (optional)

Format 3 stores content once: a backup's archive (its *pack*) holds only content that no
earlier pack in the backup directory holds, and each file record of its manifest names the
pack that holds its SHA-256. A backup with nothing new to store (no new content, no
symlinks) has no pack of its own: its manifest's ``archive`` is ``""`` (size 0, no hash), its
directory holds ``manifest.json``, ``SHA256SUMS`` and ``status.json`` only, and every file
record names an earlier pack. A pruned backup whose pack is still named by a kept manifest
stays as a directory with ``pack.json`` and its manifest renamed to ``manifest.pruned.json``:
a pack, not a backup, removed once no kept manifest names it.

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
import functools
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_str
from pathlib import Path
from typing import Any

from mlwarden import jsonio
from mlwarden.fsutil import StagedFiles, atomic_write_text

FORMAT_VERSION = 3  # 3: content stored once, in packs; 2: links, skipped, excludes, rewritten (1 and 2 still read)
MANIFEST = "manifest.json"
PACK = "pack.json"
PRUNED = "manifest.pruned.json"  # a pruned backup's manifest, renamed: what is left is a pack
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
    """The JSON object ``text``, read by :func:`mlwarden.jsonio.decode` (orjson: a manifest of
    20,000 files in 31 ms of CPU here instead of 43; the standard library for what orjson refuses,
    so a NaN or a non-UTF-8 file name reads as before and a broken document gets a message that
    says where it broke)."""
    try:
        data = jsonio.decode(text)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise CatalogError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:  # arrays in arrays, thousands deep: a crafted file
        raise CatalogError(f"{what} is not valid JSON: nested too deeply") from None
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
    pack: str | None = None  # format 3: the backup whose archive holds this content


def new_file_record(path: str, size: int, sha256: str, mtime: float, mode: int, pack: str | None) -> FileRecord:
    """``FileRecord(path, size, sha256, mtime, mode, pack)`` for a backup's per-file loop, whose
    values are typed already: its attributes set as one dict, as :func:`_file_records` does,
    without the frozen ``__init__``'s six ``object.__setattr__`` calls (about 1 µs a file)."""
    record = object.__new__(FileRecord)
    object.__setattr__(record, "__dict__", {"path": path, "size": size, "sha256": sha256, "mtime": mtime, "mode": mode, "pack": pack})
    return record


def _file_records(items: object) -> tuple[FileRecord, ...]:
    """The file records of a manifest or pack read by :func:`_load_json`, each checked field
    by field (a manifest from a bucket is anyone's): TypeError otherwise, as from
    ``FileRecord(**f)``, which ``from_json`` turns into a CatalogError naming the file.

    A record of exactly the six fields and types that format 3 writes becomes a FileRecord
    whose attributes are the parsed object itself, without ``FileRecord(**f)`` and its six
    frozen ``__setattr__`` calls (20,000 records: 14 ms of CPU here instead of 45; testing the
    keys with ``len`` and lookups, not a set comparison, saved 5 of those). Anything else
    (format 1 or 2: no pack, maybe no mode; an integer mtime) goes the slow way, checked alike."""
    if type(items) is not list:
        raise TypeError("'files' is not a list")
    new, set_attr, isfinite = object.__new__, object.__setattr__, math.isfinite
    records = []
    for item in items:
        try:
            if (
                type(item) is dict
                and len(item) == 6  # and each of the six looked up: no other key
                and type(item["path"]) is str
                and type(item["sha256"]) is str
                and type(size := item["size"]) is int
                and 0 <= size < 1 << 63  # what an off_t holds; orjson reads a larger one as a float, json as an int
                and type(item["mode"]) is int
                and type(mtime := item["mtime"]) is float
                and isfinite(mtime)
                and type(item["pack"]) is str
            ):
                record = new(FileRecord)
                set_attr(record, "__dict__", item)
                records.append(record)
                continue
        except KeyError:
            pass
        records.append(_checked_file_record(item))
    return tuple(records)


def _checked_file_record(item: Any) -> FileRecord:
    record = FileRecord(**item)  # TypeError: not an object, a field missing or unknown
    mtime, pack = record.mtime, record.pack
    if not (
        type(record.path) is str
        and type(record.sha256) is str
        and type(record.size) is int
        and 0 <= record.size < 1 << 63
        and type(record.mode) is int
        and type(mtime) in (float, int)
        and math.isfinite(mtime)
        and (pack is None or type(pack) is str)
    ):
        raise TypeError(f"a file record has a field of the wrong type or out of range: {_clipped(record)}")
    return record


def _clipped(record: FileRecord) -> str:
    """A bad record for an error line: no line breaks, and not a megabyte of someone's junk."""
    text = repr(record)
    return text if len(text) <= 300 else text[:300] + "..."


def _records_json(obj: object, record_fields: tuple[str, ...], lines_of: dict[int, str] | None = None) -> str:
    """Sorted keys, one record a line: readable and greppable, and written by json's C
    encoder (``indent`` would switch to its Python one: 0.6 s for 20,000 files).
    ``lines_of`` (by ``id``) keeps the lines of records that the next call writes too: a
    backup's pack and manifest share the records of its new files."""
    memo: dict[int, str] = {} if lines_of is None else lines_of
    lines = []
    for field_ in sorted(dataclasses.fields(obj), key=lambda f: f.name):  # type: ignore[arg-type]  # a dataclass instance
        value = getattr(obj, field_.name)
        if field_.name in record_fields and value:
            rows = ",\n  ".join(_record_lines(value, memo))
            lines.append(f' "{field_.name}": [\n  {rows}\n ]')
        else:
            lines.append(f' "{field_.name}": {json.dumps(value)}')
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _record_lines(records: tuple[object, ...], memo: dict[int, str]) -> list[str]:
    """:func:`_record_line` of each record, kept in ``memo`` (by ``id``), looked up and stored by
    C loops (a Python loop over 20,000 records cost 10 ms a call). The mtimes of the file records
    not in it yet are formatted in one call (:func:`mlwarden.jsonio.float_texts`): ``repr()`` of
    each float was a third of the instructions of a record's line."""
    lines: list[str | None] = list(map(memo.get, map(id, records)))
    if None not in lines:
        return lines  # type: ignore[return-value]  # no None in it
    missing = [record for record, line in zip(records, lines, strict=True) if line is None]
    mtimes = jsonio.float_texts([getattr(record, "mtime", None) for record in missing])  # None for other records
    memo.update(zip(map(id, missing), map(_record_line, missing) if mtimes is None else map(_record_line, missing, mtimes), strict=True))
    return list(map(memo.__getitem__, map(id, records)))


def _record_line(record: object, mtime_text: str | None = None) -> str:
    """One record as JSON with sorted keys. A file record, one per file, is formatted here
    (what ``json.dumps(sort_keys=True)`` writes for it, at a fraction of the cost: a manifest
    of 20,000 files is written twice per backup); anything unusual goes through ``json.dumps``.
    The fields are read once and their types tested one by one, and the pack's field is
    formatted once per pack (``pack.json`` and ``manifest.json`` of 20,000 files: 64 ms of
    CPU here, 74 ms when each record built a tuple of its types and its pack's field).
    ``mtime_text``: the mtime's ``repr()``, made already."""
    if type(record) is FileRecord:
        size, mode, mtime, path, sha256, pack = record.size, record.mode, record.mtime, record.path, record.sha256, record.pack
        if (
            type(size) is int
            and type(mode) is int
            and type(mtime) is float
            and math.isfinite(mtime)
            and type(path) is str
            and type(sha256) is str
            and (pack is None or type(pack) is str)
        ):
            return (
                f'{{"mode": {mode}, "mtime": {mtime_text or float.__repr__(mtime)}{"" if pack is None else _pack_field(pack)}, '
                f'"path": {_json_str(path)}, "sha256": {_json_str(sha256)}, "size": {size}}}'
            )
    return json.dumps(_record_dict(record), sort_keys=True)


@functools.lru_cache(maxsize=64)  # a backup's records name a few packs, each thousands of times
def _pack_field(pack: str) -> str:
    return f', "pack": {_json_str(pack)}'


def _record_dict(record: object) -> dict[str, Any]:
    # A format-2 file record has no pack: leave the key out rather than write null.
    return {k: v for k, v in vars(record).items() if not (k == "pack" and v is None)}


def _check_archive_name(name: str, compression: str, archive: str, what: str) -> None:
    extension = ARCHIVE_EXTENSIONS.get(compression)
    if extension is None:
        raise CatalogError(f"{what} of {name}: unknown compression {compression!r}")
    if archive != name + extension:
        raise CatalogError(f"{what} of {name}: archive {archive!r} is not {name + extension!r}")


@dataclass(frozen=True)
class LinkRecord:
    """A symbolic link, stored as a link (never followed): restored as a link."""

    path: str  # relative to the source directory, '/'-separated
    target: str  # what the link points at, as read by readlink


@dataclass(frozen=True)
class HardLinkRecord:
    """A file that was a hard link to another file of the backup (the same inode), each listed
    among the files with the same content: restored as a link to ``target``, which is
    written and verified first. Format 3."""

    path: str  # relative to the source directory, '/'-separated
    target: str  # the first path, sorted, of the same inode: a file record that is no hard link record


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
    archive: str  # file name inside the backup's directory; "" for a format-3 backup with no pack of its own
    archive_bytes: int
    archive_sha256: str
    total_bytes: int  # sum of the files' sizes before compression
    files: tuple[FileRecord, ...]
    links: tuple[LinkRecord, ...] = ()
    skipped: tuple[SkippedRecord, ...] = ()
    excludes: tuple[str, ...] = ()  # the --exclude patterns of the run
    rewritten: tuple[str, ...] = ()  # files stored twice: changed during the first read, the later copy counts
    format_version: int = 2  # what a manifest without the field is read as; new backups are FORMAT_VERSION
    hardlinks: tuple[HardLinkRecord, ...] = ()  # format 3: files that were hard links to another file of the backup

    def __post_init__(self) -> None:
        check_backup_name(self.name)
        if self.has_archive:
            _check_archive_name(self.name, self.compression, self.archive, "manifest")
        else:
            self._check_without_archive()
        if self.format_version >= 3:
            # Each name once (a regex per file record cost more than the rest of a manifest's checks).
            for pack in {record.pack for record in self.files}:
                check_backup_name(pack)  # becomes a directory name, and a key in the bucket
            if self.hardlinks:
                self._check_hardlinks()
        elif any(record.pack is not None for record in self.files) or self.hardlinks:
            raise CatalogError(f"manifest of {self.name}: a format {self.format_version} manifest names a pack or a hard link")

    @property
    def has_archive(self) -> bool:
        """False for a format-3 backup that stored nothing new: its content is all in earlier packs."""
        return self.archive != ""

    def _check_without_archive(self) -> None:
        """A backup without an archive stores nothing: every file lives in an earlier pack, and it
        has no links (a backup's links are members of its own pack)."""
        if self.format_version < 3:
            raise CatalogError(f"manifest of {self.name}: a format {self.format_version} manifest names no archive")
        if self.archive_bytes != 0 or self.archive_sha256 != "" or self.links or any(record.pack == self.name for record in self.files):
            raise CatalogError(f"manifest of {self.name}: no archive of its own, yet it has archive bytes, a hash, links or files in its own pack")

    def _check_hardlinks(self) -> None:
        """Each hard link joins two files of the manifest with the same content, to one that is no link itself."""
        files = {record.path: record for record in self.files}
        linked = {link.path for link in self.hardlinks}
        for link in self.hardlinks:
            path, target = files.get(link.path), files.get(link.target)
            if path is None or target is None or link.target in linked or (path.sha256, path.size) != (target.sha256, target.size):
                raise CatalogError(f"manifest of {self.name}: hard link {link.path!r} -> {link.target!r} does not join two files of the same content")
        if len(linked) != len(self.hardlinks):
            raise CatalogError(f"manifest of {self.name}: a path is listed twice as a hard link")

    @property
    def packs(self) -> tuple[str, ...]:
        """The packs whose archives hold this backup's content (format 3), sorted, its own among
        them when it has one; none before format 3."""
        if self.format_version < 3:
            return ()
        own = {self.name} if self.has_archive else set()
        return tuple(sorted({str(record.pack) for record in self.files} | own))

    def to_json(self, lines_of: dict[int, str] | None = None) -> str:
        return _records_json(self, ("files", "links", "skipped", "hardlinks"), lines_of)

    @classmethod
    def from_json(cls, text: str | bytes, what: str = "manifest") -> Manifest:
        """Parse a manifest from a catalog or a bucket; anything unexpected is a CatalogError naming ``what``."""
        data = _load_json(text, what)
        try:
            records = ("files", "links", "skipped", "excludes", "rewritten", "hardlinks")
            fields = {f.name for f in dataclasses.fields(cls)} - set(records)
            return cls(
                files=_file_records(data["files"]),
                links=tuple(LinkRecord(**f) for f in data.get("links", ())),
                hardlinks=tuple(HardLinkRecord(**f) for f in data.get("hardlinks", ())),
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
class Pack:
    """What a format-3 archive holds (``pack.json``): each member once, under the first path
    that had its content, plus the backup's links. Outlives its backup's manifest while a
    kept backup names it."""

    name: str
    compression: str
    level: int | None
    archive: str
    archive_bytes: int
    archive_sha256: str
    files: tuple[FileRecord, ...]  # the members, each with ``pack`` = this pack's name
    links: tuple[LinkRecord, ...] = ()
    rewritten: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        check_backup_name(self.name)
        _check_archive_name(self.name, self.compression, self.archive, "pack")
        if any(record.pack != self.name for record in self.files):
            raise CatalogError(f"pack {self.name} lists a member of another pack")

    @property
    def new_bytes(self) -> int:
        return sum(record.size for record in self.files)

    def to_json(self, lines_of: dict[int, str] | None = None) -> str:
        return _records_json(self, ("files", "links"), lines_of)

    @classmethod
    def from_json(cls, text: str | bytes, what: str = "pack") -> Pack:
        data = _load_json(text, what)
        try:
            fields = {f.name for f in dataclasses.fields(cls)} - {"files", "links", "rewritten"}
            return cls(
                files=_file_records(data["files"]),
                links=tuple(LinkRecord(**f) for f in data.get("links", ())),
                rewritten=tuple(str(p) for p in data.get("rewritten", ())),
                **{k: v for k, v in data.items() if k in fields},
            )
        except (KeyError, TypeError) as exc:
            raise CatalogError(f"{what} is missing or has wrong fields: {exc}") from None
        except CatalogError as exc:
            raise CatalogError(f"{what}: {exc}") from None

    def as_manifest(self) -> Manifest:
        """The archive seen as a manifest of exactly its members: what the archive reader checks against."""
        return Manifest(
            name=self.name, source="", host="", started_at=0.0, finished_at=0.0, compression=self.compression,
            level=self.level, archive=self.archive, archive_bytes=self.archive_bytes, archive_sha256=self.archive_sha256,
            total_bytes=self.new_bytes, files=self.files, links=self.links, rewritten=self.rewritten, format_version=3,
        )


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
    pack: Pack | None = None  # format 3: what this backup's own archive holds; None before, or without an archive

    def stored(self) -> BackupEntry:
        """This backup as its archive holds it: itself before format 3; its pack from then on
        (what verification reads; the content it shares lives in other packs)."""
        if self.pack is None:
            return self
        return BackupEntry(directory=self.directory, manifest=self.pack.as_manifest(), status=self.status)

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
        """Visible directories without a manifest that are not a pruned backup's pack: never
        removed, reported (someone's directory, or a backup whose manifest was deleted)."""
        return [d for d in self._candidate_dirs() if not (d / MANIFEST).exists() and not (d / PRUNED).exists()]

    def packs(self, on_unreadable: Callable[[Path, Exception], None] | None = None) -> list[BackupEntry]:
        """Every pack (format 3), of a backup or left by a pruned one, as an entry whose
        manifest is the pack's content (:meth:`BackupEntry.stored`), by name."""
        report = on_unreadable or _warn_unreadable
        result = []
        for directory in self._candidate_dirs():
            if not (directory / PACK).exists():
                continue
            try:
                result.append(self.read_pack(directory))
            except (OSError, ValueError) as exc:
                report(directory, exc)
        return sorted(result, key=lambda e: e.name)

    def pack_only(self) -> list[Path]:
        """Packs left by pruned backups (their manifest renamed to PRUNED): removed once no backup names them."""
        return [d for d in self._candidate_dirs() if (d / PRUNED).exists() and not (d / MANIFEST).exists()]

    @staticmethod
    def read_pack(directory: Path) -> BackupEntry:
        """The pack in ``directory`` (CatalogError if it is unreadable or not named as its directory)."""
        pack = _read_pack(directory)
        if pack.name != directory.name:
            raise CatalogError(f"{directory / PACK} names another pack, {pack.name!r}")
        return BackupEntry(directory=directory, manifest=pack.as_manifest(), status=_read_status(directory))

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
        pack = None
        if manifest.format_version >= 3 and manifest.has_archive:
            pack = _read_pack(directory)
            if (pack.name, pack.archive, pack.archive_sha256) != (manifest.name, manifest.archive, manifest.archive_sha256):
                raise CatalogError(f"{directory / PACK} does not describe the archive of {manifest_path}")
        return BackupEntry(directory=directory, manifest=manifest, status=_read_status(directory), pack=pack)

    @staticmethod
    def commit(directory: Path, manifest: Manifest, pack: Pack | None = None, staged: StagedFiles | None = None) -> BackupEntry:
        """Write the pack's index, then the manifest last, atomically: from now on the backup exists.

        With ``staged``, ``directory`` is a staging directory that becomes the backup when it is
        renamed: both files are left for ``staged.sync()``, which the caller runs before that rename."""
        lines: dict[int, str] = {}  # the new files' records are in both: formatted once
        if staged is not None:
            if pack is not None:
                staged.write_bytes(directory / PACK, pack.to_json(lines).encode("utf-8"))
            staged.write_bytes(directory / MANIFEST, manifest.to_json(lines).encode("utf-8"))
        else:
            if pack is not None:
                atomic_write_text(directory / PACK, pack.to_json(lines))
            atomic_write_text(directory / MANIFEST, manifest.to_json(lines))
        return BackupEntry(directory=directory, manifest=manifest, pack=pack)

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


def _read_pack(directory: Path) -> Pack:
    path = directory / PACK
    try:
        return Pack.from_json(path.read_bytes(), str(path))
    except FileNotFoundError:
        raise CatalogError(f"{path} is missing: the backup's archive index") from None
    except OSError as exc:
        raise CatalogError(f"cannot read {path}: {exc.strerror}") from None


def _read_status(directory: Path) -> Status:
    status_path = directory / STATUS
    try:
        return Status.from_json(status_path.read_bytes(), str(status_path))
    except FileNotFoundError:
        return Status()
    except OSError as exc:
        raise CatalogError(f"cannot read {status_path}: {exc.strerror}") from None
