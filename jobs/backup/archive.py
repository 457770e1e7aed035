"""Write a backup archive in one pass over the source files.

Each file is read once, in large chunks: every chunk updates the file's SHA-256 (for the
manifest), goes into a plain tar stream, through the compressor, and the compressed bytes
update the archive's SHA-256 on their way to a temporary file, which is then fsynced and
renamed (:func:`mlwarden.fsutil.atomic_writer`). Nothing is read twice and nothing is
written twice.

Tar headers come from :class:`tarfile.TarInfo` (POSIX pax format, so long names and files
over 8 GiB are fine); the payload is copied by this module rather than by ``tarfile``, whose
stream mode copies in 10 KiB blocks. The result is a plain ``.tar.zst``/``.tar.gz``/``.tar``
that GNU tar extracts (``tar --zstd -xf``).
"""

from __future__ import annotations

import errno
import fnmatch
import gzip
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol
from zlib import adler32

import zstandard
from mlwarden.jobs.backup.dedup import CacheKey, Dedup
from mlwarden.jobs.backup.follow import Follower
from mlwarden.jobs.backup.overlap import Overlap
from mlwarden.jobs.backup.tarstream import CHUNK_BYTES

from mlwarden.catalog import ARCHIVE_EXTENSIONS, CHECKSUMS, FileRecord, HardLinkRecord, LinkRecord, SkippedRecord, new_file_record
from mlwarden.fsutil import StagedFiles, atomic_writer, start_writeback

log = logging.getLogger(__name__)

# zstd level 1, not the CLI's 3: on float weights the higher levels only cost time (the
# mantissa bytes are noise to any compressor); measured in bench/bench_backup.py.
DEFAULT_LEVELS = {"zstd": 1, "gzip": 6, "none": None}
LEVEL_RANGES = {"zstd": (1, 19), "gzip": (1, 9)}
# tarfile's constants, spelled out: tarfile itself (12 ms of a backup's start) is imported only
# for the headers :func:`_header` does not build (long or non-ASCII names, symlinks).
_BLOCK = 512  # tarfile.BLOCKSIZE
_REGTYPE = b"0"  # tarfile.REGTYPE
_POSIX_MAGIC = b"ustar\x0000"  # tarfile.POSIX_MAGIC
_END_OF_ARCHIVE = b"\0" * (2 * _BLOCK)
_PADDING = [b"\0" * n for n in range(_BLOCK)]  # a member's padding to the next block, by length
_OCTAL_11 = 8**11  # what fits an 11-digit octal field of a ustar header
# After the checksum: the type (regular file), no link name, the magic, no owner names.
_USTAR_TAIL = (_REGTYPE + b"\0" * 100 + _POSIX_MAGIC).ljust(_BLOCK - 156, b"\0")
_FIXED_CHECKSUM = 8 * ord(" ") + sum(_USTAR_TAIL)  # the checksum field counts as spaces
# Small members reach the compressor, and compressed bytes the file, in pieces of this size:
# large enough that a call per piece costs nothing, small enough that the verifier following
# the file (mlwarden.jobs.backup.follow) has little left to read when the writer is done.
BATCH_BYTES = 2**20
_USTAR_NUMBERS = b"%07o\0" + b"0000000\0" * 2 + b"%011o\0%011o\0"  # mode, uid and gid 0, size, mtime


class SourceChanged(RuntimeError):
    """A file changed while it was being archived, and again when read once more (something is still writing it)."""


class SourceUnreadable(RuntimeError):
    """Files or directories under the source cannot be read: the backup would miss them."""


class SourceFile(NamedTuple):  # a tuple: one per file, and a frozen dataclass costs more to make
    path: str  # absolute (a str: 20,000 Path objects cost more than reading 20,000 small files)
    relative: str  # '/'-separated, as stored in the archive and the manifest
    size: int
    mtime: float
    mode: int
    key: CacheKey = (0, 0, 0, 0, 0)  # the files cache's key, as the scan saw the file


# What scan() needs per entry, bound once: it runs 20,000 times in a tree of small files, where a
# module attribute, a call of stat.S_IFMT or the NamedTuple's generated __new__ each cost a
# few percent of the scan.
_S_IFMT, _S_IFREG, _S_IRUSR, _S_IMODE = 0o170000, stat.S_IFREG, stat.S_IRUSR, 0o7777  # stat.S_IFMT(m) is m & 0o170000
_NAME = attrgetter("name")
_RELATIVE = itemgetter(1)  # SourceFile.relative
_new_source_file = partial(tuple.__new__, SourceFile)  # SourceFile(*values), without its Python-level __new__


@dataclass(frozen=True)
class Source:
    """What a backup covers: regular files and symlinks (stored as links), plus what it cannot hold."""

    files: list[SourceFile]
    links: list[LinkRecord]
    skipped: list[SkippedRecord]  # FIFOs, sockets, devices


@dataclass(frozen=True)
class ArchiveResult:
    path: Path
    sha256: str
    archive_bytes: int
    files: tuple[FileRecord, ...]
    read_bytes: int
    rewritten: tuple[str, ...] = ()  # stored twice: changed during the first read
    members: tuple[FileRecord, ...] = ()  # what the archive holds (with dedup, a subset of files)


class _Writable(Protocol):
    def write(self, data: bytes | memoryview, /) -> int: ...


_SPECIAL_KINDS = ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
_UNREADABLE_NAMED = 5  # paths named in the error; the log has them all


def excluded(relative: str, patterns: Sequence[str]) -> bool:
    """Whether ``--exclude`` patterns leave ``relative`` out: fnmatch on the relative path
    (``*`` crosses ``/``), and on the base name for a pattern without ``/``."""
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(relative, p) or ("/" not in p and fnmatch.fnmatchcase(name, p)) for p in patterns)


def scan(source: Path, excludes: Sequence[str] = ()) -> Source:
    """Everything under ``source`` except what ``excludes`` leaves out, sorted by path.

    Nothing is dropped silently: a file or directory that cannot be read raises
    :class:`SourceUnreadable` naming it; symlinks (to files or directories) are kept as
    links and never followed, so a link loop cannot make the backup endless; FIFOs, sockets
    and devices are listed as skipped.
    """
    files: list[SourceFile] = []
    links: list[LinkRecord] = []
    skipped: list[SkippedRecord] = []
    unreadable: list[str] = []
    # The owner's read bit is what access() checks for the owner (a POSIX ACL's owner entry
    # is those bits; access() asks as the real uid): one system call a file fewer. Other
    # files are asked about; a security module that still refuses an open fails the run
    # then, naming the file.
    uid = os.getuid()
    pending = [""]
    while pending:
        relative_dir = pending.pop()
        directory = source / relative_dir if relative_dir else source
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=_NAME)
        except OSError as exc:
            unreadable.append(f"{directory} ({exc.strerror})")
            continue
        for child in children:
            relative = f"{relative_dir}/{child.name}" if relative_dir else child.name
            if excludes and excluded(relative, excludes):
                continue
            try:
                info = child.stat(follow_symlinks=False)
                mode = info.st_mode
                file_type = mode & _S_IFMT
                if file_type == _S_IFREG:  # most entries: tested first
                    if not (info.st_uid == uid and mode & _S_IRUSR) and not os.access(child.path, os.R_OK):
                        raise PermissionError(errno.EACCES, "Permission denied")
                    size = info.st_size
                    key = (info.st_dev, info.st_ino, size, info.st_mtime_ns, info.st_ctime_ns)
                    files.append(_new_source_file((child.path, relative, size, info.st_mtime, mode & _S_IMODE, key)))
                elif file_type == stat.S_IFLNK:
                    links.append(LinkRecord(relative, os.readlink(child.path)))
                elif file_type == stat.S_IFDIR:
                    pending.append(relative)
                else:
                    kind = next(k for test, k in _SPECIAL_KINDS if test(info.st_mode))
                    log.warning("not backing up %s: a %s (listed as skipped in the manifest)", child.path, kind)
                    skipped.append(SkippedRecord(relative, kind))
            except FileNotFoundError:
                log.warning("%s was removed during the scan: not backed up", child.path)
            except OSError as exc:
                unreadable.append(f"{child.path} ({exc.strerror})")
    if unreadable:
        for path in unreadable:
            log.error("cannot read %s", path)
        more = f" and {len(unreadable) - _UNREADABLE_NAMED} more" if len(unreadable) > _UNREADABLE_NAMED else ""
        raise SourceUnreadable(
            f"cannot read {', '.join(unreadable[:_UNREADABLE_NAMED])}{more}: fix the permissions, run as a user "
            "who can read them, or leave them out on purpose with --exclude"
        )
    _warn_links_out(source, links)
    return Source(sorted(files, key=_RELATIVE), sorted(links, key=lambda link: link.path), skipped)


def _warn_links_out(source: Path, links: list[LinkRecord]) -> None:
    """A link is stored as a link: what it points to outside the source is not in the backup
    (a Hugging Face cache snapshot, whose files link to ../../blobs, is the usual case)."""
    root = os.path.realpath(source)
    for link in links:
        resolved = os.path.realpath(source / link.path)
        if os.path.commonpath([root, resolved]) != root:
            log.warning(
                "%s is a symlink to %s, outside %s: stored as a link, its target is NOT in this backup", source / link.path, link.target, source
            )


def archive_name(backup_name: str, compression: str) -> str:
    return backup_name + ARCHIVE_EXTENSIONS[compression]


def write_archive(
    source: Source,
    destination: Path,
    compression: str,
    level: int | None,
    threads: int = 0,
    on_progress: Callable[[int], None] = lambda _: None,
    dedup: Dedup | None = None,
    follower: Follower | None = None,
    staged: StagedFiles | None = None,
) -> ArchiveResult:
    """Archive ``source`` into ``destination`` (complete or absent, never partial).

    With ``dedup`` (format 3) only content that no pack holds yet goes in, once: a file the
    files cache knows is not read; a file smaller than a chunk is read, hashed, and written
    only if new; a large one is hashed first only if a pack holds content of its size.

    A file smaller than a chunk is stored only if its ``fstat`` after the read is the scan's
    stat, else read afresh as a large one is (:func:`_store_small`): nothing torn goes in.
    A file that changes while it is read (size, mtime_ns, ctime_ns or inode differ before and
    after) is read once more and stored again under the same name: the archive is written
    in one pass and cannot take the torn copy back, so the manifest lists the file in
    ``rewritten`` and readers skip its first copy (GNU tar simply overwrites it with the
    second). A second change raises :class:`SourceChanged` naming the file.

    With ``follower``, a verifier process reads the archive as it is written (started here,
    once the file exists; the caller asks it for the result and closes it).

    With ``staged`` (``destination`` is in a staging directory), the archive is left for
    ``staged.sync()`` to make durable, with the rest of the backup.
    """
    chosen_level = DEFAULT_LEVELS[compression] if level is None else level
    records: list[FileRecord] = []
    members: list[FileRecord] = []
    rewritten: list[str] = []
    read_bytes = 0
    unreported = 0  # small files' bytes read and not yet passed to on_progress
    with atomic_writer(destination, staged=staged) as raw:
        if follower is not None:
            follower.start(raw)  # before the compressor's threads exist: a fork copies only this one
        sink = _HashingSink(raw, follower)
        with _compressor(sink, compression, chosen_level or 0, threads) as stream:
            out = _Batched(stream)
            for source_file in source.files:
                known = None if dedup is None else dedup.unchanged(source_file.key)
                if known is not None and dedup is not None:
                    records.append(_unread_record(source_file, known, dedup))
                    continue
                small = _store_small(source_file, out, dedup) if source_file.size < CHUNK_BYTES else None
                if small is None:
                    copied = _store_checked(source_file, out, on_progress, dedup)
                    if copied.torn:
                        rewritten.append(source_file.relative)
                    record, written, key = copied.record, copied.written, copied.key
                else:
                    record, written = small
                    key = source_file.key
                    unreported += record.size
                    if unreported >= BATCH_BYTES:  # a call per small file cost as much as its header
                        on_progress(unreported)
                        unreported = 0
                read_bytes += record.size
                if dedup is not None:
                    dedup.read(key, record, written)
                if written:
                    members.append(record)
                records.append(record)
            if unreported:
                on_progress(unreported)
            for link in source.links:
                out.write(_link_header(link))
            out.write(_END_OF_ARCHIVE)
            out.flush()
        if follower is not None:
            follower.done()  # the compressor's last bytes went through the sink as it closed
    return ArchiveResult(
        path=destination,
        sha256=sink.hexdigest(),
        archive_bytes=sink.count,
        files=tuple(records),
        read_bytes=read_bytes,
        rewritten=tuple(rewritten),
        members=tuple(members),
    )


def hard_links(files: Sequence[SourceFile], records: Sequence[FileRecord]) -> tuple[HardLinkRecord, ...]:
    """The files that are hard links to an earlier file (by path) of ``files``, as the scan saw
    them (same device and inode) and as they were read (same content): restored as links.
    ``records`` are what :func:`write_archive` made of ``files``, in the same order."""
    # No two files share an inode in most trees: this set costs a third of the walk below.
    if len({source_file.key[1] for source_file in files}) == len(files):
        return ()
    first: dict[tuple[int, int], FileRecord] = {}
    found = []
    for source_file, record in zip(files, records, strict=True):
        if not source_file.key[1]:  # no inode: not from a scan
            continue
        target = first.setdefault(source_file.key[:2], record)  # device and inode
        if target is not record and (target.sha256, target.size) == (record.sha256, record.size):
            found.append(HardLinkRecord(record.path, target.path))
    return tuple(found)


def _unread_record(source_file: SourceFile, sha: str, dedup: Dedup) -> FileRecord:
    """The record of a file the files cache knows: from the scan's stat, nothing read."""
    return new_file_record(source_file.relative, source_file.size, sha, source_file.mtime, source_file.mode, dedup.pack_of(sha))


def sha256sum_line(digest: str, name: str) -> str:
    """One line of ``sha256sum`` output; names with a backslash or newline are escaped as it does."""
    if "\\" in name or "\n" in name or "\r" in name:
        escaped = name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return f"\\{digest}  {escaped}\n"
    return f"{digest}  {name}\n"


def write_checksums(directory: Path, result: ArchiveResult, staged: StagedFiles, archive: bool = True) -> None:
    """``<archive>.sha256`` (unless ``archive`` is False: a backup that keeps no archive) and
    ``SHA256SUMS``, both for ``sha256sum -c``, into the staging directory ``directory``
    (made durable by ``staged.sync()`` before it is renamed)."""
    if archive:
        staged.write_bytes(result.path.with_name(result.path.name + ".sha256"), sha256sum_line(result.sha256, result.path.name).encode("utf-8"))
    # A name that is not UTF-8 is written as the bytes it has on disk, so `sha256sum -c` finds it.
    staged.write_bytes(directory / CHECKSUMS, _checksum_lines(result.files).encode("utf-8", "surrogateescape"))


def _checksum_lines(records: Sequence[FileRecord]) -> str:
    """:func:`sha256sum_line` of each record. Names that need no escaping (no backslash, no line
    break: what the text shows as a whole) are formatted without a call per file."""
    text = "".join([f"{r.sha256}  {r.path}\n" for r in records])
    if "\\" in text or "\r" in text or text.count("\n") != len(records):
        return "".join(sha256sum_line(r.sha256, r.path) for r in records)
    return text


def _header(relative: str, size: int, mtime: int, mode: int) -> bytes:
    """A regular file's tar header. For a short ASCII name (nearly every file) it is the header
    tarfile's pax format writes (tested byte for byte against it), built here because
    ``TarInfo.tobuf`` costs more than reading a small file; its 148 bytes before the checksum
    add up in one adler32 (:func:`~mlwarden.jobs.backup.tarstream.byte_sum`, inlined: a call
    fewer per file)."""
    if len(relative) <= 100 and relative.isascii() and 0 <= size < _OCTAL_11 and 0 <= mtime < _OCTAL_11:
        head = relative.encode("ascii").ljust(100, b"\0") + _USTAR_NUMBERS % (mode, size, mtime)
        return b"%s%06o\0 %s" % (head, _FIXED_CHECKSUM - 1 + (adler32(head) & 0xFFFF), _USTAR_TAIL)
    import tarfile

    header = tarfile.TarInfo(relative)
    header.size = size
    header.mtime = mtime
    header.mode = mode
    header.type = tarfile.REGTYPE
    header.uname = header.gname = ""
    return header.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _identity(info: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes when a file is written to, truncated, or replaced by a rename."""
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev)


def _link_header(link: LinkRecord) -> bytes:
    import tarfile

    info = tarfile.TarInfo(link.path)
    info.type = tarfile.SYMTYPE
    info.linkname = link.target
    info.mode = 0o777
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


class _Copied(NamedTuple):  # one per file: a tuple costs less to make than a frozen dataclass
    record: FileRecord | None  # None: the file changed while it was read
    written: bool  # a member went into the archive (whole, or torn if record is None)
    key: CacheKey


class _Checked(NamedTuple):
    record: FileRecord
    written: bool
    key: CacheKey
    torn: bool  # a torn copy went in before this whole one (listed in ``rewritten``)


def _store_small(source_file: SourceFile, out: _Batched, dedup: Dedup | None) -> tuple[FileRecord, bool] | None:
    """A file smaller than a chunk, stored as the scan saw it: opened, read whole, then
    ``fstat``'ed; None, with nothing written, when that ``fstat`` is not the scan's (device,
    inode, size, ``mtime_ns``, ``ctime_ns``): :func:`_store_checked` then reads it afresh.

    The scan's stat stands for the one before the read: the inode read is the one the scan
    saw, not written to from the scan until after the read, so the bytes read are its
    content, whole (a chmod moves ``ctime_ns``, so the scan's mode holds too). A rename over
    the path during the read leaves what was read a consistent copy of the file it
    replaced. Four system calls a file (``openat``, ``read``, ``fstat``, ``close``), one
    fewer than :func:`_store_file`, and nothing is written before the check. The record,
    and whether its member went into the archive (with ``dedup``, not if a pack holds it)."""
    size = source_file.size
    fd = os.open(source_file.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, size)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    key = source_file.key
    if len(data) != size or (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns) != key:
        return None
    sha = hashlib.sha256(data).hexdigest()
    pack = None if dedup is None else dedup.pack_of(sha)
    written = pack is None
    if written:
        out.member(_header(source_file.relative, size, int(source_file.mtime), source_file.mode), data, _PADDING[-size % _BLOCK])
        pack = None if dedup is None else dedup.name
    return new_file_record(source_file.relative, size, sha, source_file.mtime, source_file.mode, pack), written


def _store_checked(source_file: SourceFile, out: _Writable, on_progress: Callable[[int], None], dedup: Dedup | None) -> _Checked:
    """:func:`_store_file`, once more if the file changed while it was read (then ``torn``
    if a torn first copy went in); :class:`SourceChanged` if it changed again."""
    copied = _store_file(source_file, out, on_progress, dedup)
    if copied.record is not None:
        return _Checked(copied.record, copied.written, copied.key, False)
    log.warning("%s changed while it was read; reading it once more", source_file.path)
    torn = copied.written
    # A torn first copy in the archive must be followed by a whole one.
    copied = _store_file(source_file, out, on_progress, None if torn else dedup)
    record = copied.record
    if record is None:
        raise SourceChanged(
            f"{source_file.path} changed while it was being archived, twice: something is still "
            "writing it (schedule the backup after checkpoints are written, or --exclude it)"
        )
    if dedup is not None and record.pack is None:  # read again without dedup after a torn copy: this pack holds it
        record = FileRecord(record.path, record.size, record.sha256, record.mtime, record.mode, dedup.name)
    return _Checked(record, copied.written, copied.key, torn)


def _store_file(source_file: SourceFile, out: _Writable, on_progress: Callable[[int], None], dedup: Dedup | None) -> _Copied:
    """Stream one file into the archive as one tar member, hashing it on the way; exactly the
    size in its header goes in (zeros if it shrank). With ``dedup``, content a pack already
    holds is hashed and not written, and the record names the pack that holds it. A None
    record if the file changed meanwhile."""
    fd = os.open(source_file.path, os.O_RDONLY | os.O_CLOEXEC)
    written = True
    try:
        before = os.fstat(fd)
        header = _header(source_file.relative, before.st_size, int(before.st_mtime), stat.S_IMODE(before.st_mode))
        padding = _PADDING[-before.st_size % _BLOCK]
        if before.st_size < CHUNK_BYTES:
            # One read and one write per small file: a helper thread or a separate write for
            # the header would cost more than hashing a few KB here.
            data = _read_exactly(fd, before.st_size)
            sha = hashlib.sha256(data).hexdigest()
            written = dedup is None or dedup.pack_of(sha) is None
            if written:
                out.write(header)
                out.write(data)
                out.write(padding)
            on_progress(len(data))
        else:
            digest = hashlib.sha256()
            if dedup is not None and dedup.may_hold(before.st_size):
                first = _hash_fd(fd, before.st_size)
                written = dedup.pack_of(first.hexdigest()) is None
                if written:
                    os.lseek(fd, 0, os.SEEK_SET)
                else:
                    digest = first
                    on_progress(before.st_size)
            if written:
                out.write(header)
                _copy_large(fd, before.st_size, digest, out, on_progress)
                out.write(padding)
            sha = digest.hexdigest()
        # The path's stat is the open file's own when device and inode match (as _identity
        # checks): an fstat after the read would return the same, one syscall per file more.
        unchanged = _identity(os.stat(source_file.path)) == _identity(before)
    finally:
        os.close(fd)
    key = (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns, before.st_ctime_ns)
    if not unchanged:
        return _Copied(None, written, key)
    pack = None if dedup is None else dedup.name if written else dedup.pack_of(sha)
    return _Copied(FileRecord(source_file.relative, before.st_size, sha, before.st_mtime, stat.S_IMODE(before.st_mode), pack), written, key)


def _read_exactly(fd: int, size: int) -> bytes:
    """``size`` bytes, padded with zeros if the file shrank meanwhile (the tar stays valid;
    the identity check then reports the change)."""
    data = os.read(fd, size)
    if len(data) == size:
        return data
    while len(data) < size and (more := os.read(fd, size - len(data))):
        data += more
    return data.ljust(size, b"\0")


def _hash_fd(fd: int, size: int) -> hashlib._Hash:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    digest = hashlib.sha256()
    remaining = size
    while remaining:
        chunk = _read_exactly(fd, min(CHUNK_BYTES, remaining))
        digest.update(chunk)
        remaining -= len(chunk)
    return digest


def _copy_large(fd: int, size: int, digest: hashlib._Hash, out: _Writable, on_progress: Callable[[int], None]) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    remaining = size
    with Overlap() as overlap:
        while remaining:
            chunk = _read_exactly(fd, min(CHUNK_BYTES, remaining))  # zeros if it shrank: keep the tar valid
            # Hash in a worker thread while this thread compresses: both release the GIL.
            overlap.run(digest.update, chunk)
            out.write(chunk)
            remaining -= len(chunk)
            on_progress(len(chunk))


class _Batched:
    """Small writes gathered into one call of the compressor per ``BATCH_BYTES``: a call per
    small member cost about as much as compressing it. Large writes go through as they are.
    The pieces are kept and joined once per batch: appending each to a ``bytearray``, or a
    small member's header, content and padding to each other, copied and reallocated every
    member's bytes (about 4 µs a small file, more than its SHA-256)."""

    def __init__(self, out: _Writable) -> None:
        self._out = out
        self._pieces: list[bytes] = []
        self._size = 0

    def write(self, data: bytes | memoryview) -> int:
        if len(data) >= BATCH_BYTES:
            self.flush()
            return self._out.write(data)
        self._pieces.append(data if type(data) is bytes else bytes(data))  # kept until the flush: never a view of a buffer reused meanwhile
        self._size += len(data)
        if self._size >= BATCH_BYTES:
            self.flush()
        return len(data)

    def member(self, header: bytes, content: bytes, padding: bytes) -> None:
        """A small member's header, content and padding: one call, not three."""
        self._pieces += (header, content, padding)
        self._size += len(header) + len(content) + len(padding)
        if self._size >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._pieces:
            self._out.write(b"".join(self._pieces))
            self._pieces.clear()
            self._size = 0


class _HashingSink:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO, follower: Follower | None) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self._follower = follower
        self.count = 0

    def write(self, data: bytes | memoryview) -> int:
        self._hash.update(data)
        written = self._raw.write(data)
        self._raw.flush()  # in the file: for the verifier, and for the writeback below
        # Written to disk from now on, not all at the final fsync (45 ms of a 26 MB archive
        # here, seconds for a large one); the fsync stays.
        start_writeback(self._raw.fileno(), self.count, len(data))
        self.count += len(data)
        if self._follower is not None:
            self._follower.advance(self.count)
        return written if written is not None else len(data)

    def flush(self) -> None:
        self._raw.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@contextmanager
def _compressor(sink: _HashingSink, compression: str, level: int, threads: int) -> Iterator[_Writable]:
    """A writer that compresses into ``sink``; the stream is finished when the block ends."""
    if compression == "none":
        yield sink
        return
    if compression == "gzip":
        with gzip.GzipFile(filename="", mode="wb", fileobj=sink, compresslevel=level, mtime=0) as stream:
            yield stream
        return
    # threads=-1: as many zstd workers as cores; the calling thread only feeds and drains.
    compressor = zstandard.ZstdCompressor(level=level, threads=threads or -1, write_checksum=True)
    with compressor.stream_writer(sink, closefd=False, write_size=BATCH_BYTES) as stream:  # type: ignore[arg-type]  # it only calls write() and flush()
        yield stream
