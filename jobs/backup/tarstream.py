"""Read an archive back, once, with strict checks on every member.

Both verification and restore go through :func:`members`: the raw archive bytes are hashed
as they are read (so the archive's SHA-256 costs no second read), decompressed, and each
tar member is checked before anyone sees it. Stricter than tarfile's ``data`` filter: only
regular files, directories and the symlinks the manifest lists (with the same target) are
accepted (no hard links, devices or fifos), names must be relative without ``..``
components, no name may lie under a symlink, and every file and link must be one the
manifest lists, once. Where a symlink may point is the restore's decision.
"""

from __future__ import annotations

import gzip
import hashlib
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from mlwarden.jobs.backup.overlap import Overlap
from mlwarden.catalog import FileRecord, LinkRecord, Manifest

CHUNK_BYTES = 8 * 2**20  # large reads: fewer syscalls, and hashlib/zstd release the GIL per call


class ArchiveError(ValueError):
    """The archive does not match its manifest, is damaged, or holds a member we refuse."""


@dataclass
class ArchiveDigest:
    """Filled in while an archive is read: its SHA-256 and size once the read is complete."""

    sha256: str = ""
    size: int = 0


class _HashingReader:
    """A read-only file that hashes and counts every byte read through it."""

    def __init__(self, raw: BinaryIO, overlap: Overlap) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self._overlap = overlap
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._overlap.run(self._hash.update, data)
        self.count += len(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(CHUNK_BYTES):
            pass

    def hexdigest(self) -> str:
        self._overlap.wait()
        return self._hash.hexdigest()


def hash_file(path: Path) -> tuple[str, int]:
    """SHA-256 and size of a file, read in large chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def check_name(name: str) -> str:
    """The member name if it is a safe relative path, else ArchiveError."""
    normalized = posixpath.normpath(name)
    if not name or name.startswith("/") or normalized.startswith("/"):
        raise ArchiveError(f"refusing absolute path {name!r}")
    if normalized == ".." or normalized.startswith("../") or ".." in name.split("/"):
        raise ArchiveError(f"refusing path with '..': {name!r}")
    if "\0" in name:
        raise ArchiveError(f"refusing path with a NUL byte: {name!r}")
    return normalized


@contextmanager
def _decompressed(reader: _HashingReader, compression: str) -> Iterator[BinaryIO]:
    if compression == "zstd":
        with zstandard.ZstdDecompressor().stream_reader(reader, read_size=CHUNK_BYTES, closefd=False) as stream:  # type: ignore[arg-type]
            yield stream  # type: ignore[misc]
    elif compression == "gzip":
        with gzip.GzipFile(fileobj=reader, mode="rb") as stream:  # type: ignore[arg-type]
            yield stream  # type: ignore[misc]
    elif compression == "none":
        yield reader  # type: ignore[misc]
    else:
        raise ArchiveError(f"unknown compression {compression!r}")


def _check_manifest_paths(manifest: Manifest) -> None:
    """Every path is safe, listed once, and none lies under a symlink (writing it would follow the link)."""
    links = {check_name(link.path) for link in manifest.links}
    paths = [check_name(record.path) for record in manifest.files] + sorted(links)
    if len(set(paths)) != len(paths):
        raise ArchiveError("the manifest lists a path twice")
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in links:
                raise ArchiveError(f"refusing {path!r}: it lies under a symlink of the manifest")


Member = tuple[FileRecord, BinaryIO] | tuple[LinkRecord, None]


@contextmanager
def members(archive: Path, manifest: Manifest, digest: ArchiveDigest) -> Iterator[Iterator[Member]]:
    """Yield an iterator of (manifest record, member data) for each file in the archive, and
    of (link record, None) for each symlink.

    The caller must read each member's data before advancing. When the block ends
    normally, the whole archive has been read and ``digest`` holds its hash and size; any
    damage or refused member raises :class:`ArchiveError`.
    """
    _check_manifest_paths(manifest)
    expected: dict[str, FileRecord | LinkRecord] = {record.path: record for record in (*manifest.files, *manifest.links)}
    seen: set[str] = set()
    torn = {path for path in manifest.rewritten if isinstance(expected.get(path), FileRecord)}  # first copies to skip
    with open(archive, "rb", buffering=0) as raw, Overlap() as overlap:
        reader = _HashingReader(raw, overlap)  # type: ignore[arg-type]
        try:
            with _decompressed(reader, manifest.compression) as stream:
                with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK_BYTES) as tar:

                    def checked() -> Iterator[Member]:
                        for member in tar:
                            if member.isfile() and member.name in torn:
                                torn.discard(member.name)  # changed while it was archived; the next copy counts
                                continue
                            record = _check_member(member, expected, seen)
                            if isinstance(record, LinkRecord):
                                yield record, None
                            elif record is not None:
                                data = tar.extractfile(member)
                                assert data is not None  # regular file
                                yield record, data  # type: ignore[misc]

                    yield checked()
                reader.drain()  # the end-of-archive padding and compression trailer count too
        except (tarfile.TarError, zstandard.ZstdError, zlib.error, gzip.BadGzipFile, EOFError) as exc:
            # Damage in the archive; a real I/O error (OSError with an errno) propagates as is.
            raise ArchiveError(f"archive is damaged: {exc}") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise ArchiveError(f"{len(missing)} file(s) of the manifest are missing from the archive, e.g. {missing[0]!r}")
    digest.sha256 = reader.hexdigest()
    digest.size = reader.count


def _check_member(member: tarfile.TarInfo, expected: dict[str, FileRecord | LinkRecord], seen: set[str]) -> FileRecord | LinkRecord | None:
    name = check_name(member.name)
    if member.isdir():
        return None
    record = expected.get(name)
    if member.issym():
        if not isinstance(record, LinkRecord) or record.target != member.linkname:
            raise ArchiveError(f"refusing link {member.name!r}: only regular files and the symlinks the manifest lists are restored")
    elif not member.isfile():
        raise ArchiveError(f"refusing {member.name!r}: only regular files and symlinks are restored, not hard links or devices")
    elif not isinstance(record, FileRecord):
        raise ArchiveError(f"refusing {member.name!r}: not listed in the manifest")
    elif member.size != record.size:
        raise ArchiveError(f"{name}: {member.size} bytes in the archive, {record.size} in the manifest")
    if name in seen:
        raise ArchiveError(f"refusing {member.name!r}: appears twice in the archive")
    seen.add(name)
    return record
