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

import gzip
import hashlib
import logging
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

from mlwarden.jobs.backup.overlap import Overlap
from mlwarden.jobs.backup.tarstream import CHUNK_BYTES
from mlwarden.catalog import ARCHIVE_EXTENSIONS, CHECKSUMS, FileRecord
from mlwarden.fsutil import atomic_write_text, atomic_writer

log = logging.getLogger(__name__)

# zstd level 1, not the CLI's 3: on float weights the higher levels only cost time (the
# mantissa bytes are noise to any compressor); measured in bench/bench_backup.py.
DEFAULT_LEVELS = {"zstd": 1, "gzip": 6, "none": None}
LEVEL_RANGES = {"zstd": (1, 19), "gzip": (1, 9)}
_BLOCK = tarfile.BLOCKSIZE
_END_OF_ARCHIVE = b"\0" * (2 * _BLOCK)


class SourceChanged(RuntimeError):
    """A file changed size while it was being archived (something is still writing it)."""


@dataclass(frozen=True)
class SourceFile:
    path: Path  # absolute
    relative: str  # '/'-separated, as stored in the archive and the manifest
    size: int
    mtime: float
    mode: int


@dataclass(frozen=True)
class ArchiveResult:
    path: Path
    sha256: str
    archive_bytes: int
    files: tuple[FileRecord, ...]
    read_bytes: int


class _Writable(Protocol):
    def write(self, data: bytes | memoryview, /) -> int: ...


def scan(source: Path) -> list[SourceFile]:
    """The regular files under ``source``, sorted by path.

    Symlinks to files are followed (the content is what must survive); symlinked
    directories are not descended into, so a link loop cannot make the backup endless.
    """
    found: list[SourceFile] = []
    for root, dirs, names in os.walk(source):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            try:
                info = path.stat()
            except FileNotFoundError:
                log.warning("skipping %s: broken symlink or removed during the scan", path)
                continue
            if not stat.S_ISREG(info.st_mode):
                log.warning("skipping %s: not a regular file", path)
                continue
            relative = path.relative_to(source).as_posix()
            found.append(SourceFile(path, relative, info.st_size, info.st_mtime, stat.S_IMODE(info.st_mode)))
    found.sort(key=lambda f: f.relative)
    return found


def archive_name(backup_name: str, compression: str) -> str:
    return backup_name + ARCHIVE_EXTENSIONS[compression]


def write_archive(
    files: list[SourceFile],
    destination: Path,
    compression: str,
    level: int | None,
    threads: int = 0,
    on_progress: Callable[[int], None] = lambda _: None,
) -> ArchiveResult:
    """Archive ``files`` into ``destination`` (complete or absent, never partial)."""
    chosen_level = DEFAULT_LEVELS[compression] if level is None else level
    records: list[FileRecord] = []
    with atomic_writer(destination) as raw:
        sink = _HashingSink(raw)
        with _compressor(sink, compression, chosen_level or 0, threads) as out:
            for source_file in files:
                out.write(_header(source_file))
                records.append(_copy_file(source_file, out, on_progress))
                padding = -source_file.size % _BLOCK
                if padding:
                    out.write(b"\0" * padding)
            out.write(_END_OF_ARCHIVE)
    return ArchiveResult(
        path=destination,
        sha256=sink.hexdigest(),
        archive_bytes=sink.count,
        files=tuple(records),
        read_bytes=sum(r.size for r in records),
    )


def sha256sum_line(digest: str, name: str) -> str:
    """One line of ``sha256sum`` output; names with a backslash or newline are escaped as it does."""
    if "\\" in name or "\n" in name or "\r" in name:
        escaped = name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return f"\\{digest}  {escaped}\n"
    return f"{digest}  {name}\n"


def write_checksums(directory: Path, result: ArchiveResult) -> None:
    """``<archive>.sha256`` and ``SHA256SUMS``, both for ``sha256sum -c``, written atomically."""
    atomic_write_text(result.path.with_name(result.path.name + ".sha256"), sha256sum_line(result.sha256, result.path.name))
    atomic_write_text(directory / CHECKSUMS, "".join(sha256sum_line(r.sha256, r.path) for r in result.files))


def _header(source_file: SourceFile) -> bytes:
    info = tarfile.TarInfo(source_file.relative)
    info.size = source_file.size
    info.mtime = int(source_file.mtime)
    info.mode = source_file.mode
    info.type = tarfile.REGTYPE
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _copy_file(source_file: SourceFile, out: _Writable, on_progress: Callable[[int], None]) -> FileRecord:
    """Stream one file into the archive, hashing it on the way; exactly ``size`` bytes go in."""
    digest = hashlib.sha256()
    remaining = source_file.size
    with open(source_file.path, "rb", buffering=0) as handle, Overlap() as overlap:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while remaining:
            chunk = handle.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                raise SourceChanged(f"{source_file.path} shrank while it was being archived")
            # Hash in a worker thread while this thread compresses: both release the GIL.
            overlap.run(digest.update, chunk)
            out.write(chunk)
            remaining -= len(chunk)
            on_progress(len(chunk))
    if os.stat(source_file.path).st_size != source_file.size:
        raise SourceChanged(f"{source_file.path} changed size while it was being archived")
    return FileRecord(
        path=source_file.relative,
        size=source_file.size,
        sha256=digest.hexdigest(),
        mtime=source_file.mtime,
        mode=source_file.mode,
    )


class _HashingSink:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes | memoryview) -> int:
        self._hash.update(data)
        written = self._raw.write(data)
        self.count += len(data)
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
        with gzip.GzipFile(filename="", mode="wb", fileobj=sink, compresslevel=level, mtime=0) as stream:  # type: ignore[arg-type]
            yield stream
        return
    # threads=-1: as many zstd workers as cores; the calling thread only feeds and drains.
    compressor = zstandard.ZstdCompressor(level=level, threads=threads or -1, write_checksum=True)
    with compressor.stream_writer(sink, closefd=False, write_size=CHUNK_BYTES) as stream:
        yield stream
