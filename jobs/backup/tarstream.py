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
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

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


Member = tuple[FileRecord, "MemberData"] | tuple[LinkRecord, None]

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)  # the end of the archive
_MAX_PAX = 2**20  # a path and a link target; anything larger is damage, not a name to hold in memory
_REGULAR = (b"0", b"\0", b"7")  # 7: contiguous file, a regular file to every reader
_NOT_RESTORED = {b"1": "hard link", b"3": "character device", b"4": "block device", b"6": "fifo"}


class _Blocks:
    """The decompressed tar stream, read in large chunks and handed out by offset.

    tarfile's stream reader keeps one buffer and slices off what it returns, copying the
    rest of its 8 MiB buffer on every read: about 1.7 ms per small file. Here a chunk is
    read once and only the bytes asked for are copied out.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._chunk = memoryview(b"")
        self._pos = 0

    def _refill(self) -> bool:
        """A new chunk if the current one is used up; False at the end of the stream."""
        if self._pos == len(self._chunk):
            self._chunk = memoryview(self._stream.read(CHUNK_BYTES))
            self._pos = 0
        return self._pos < len(self._chunk)

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes (fewer at a chunk's end); b"" only at the end of the stream."""
        if not self._refill():
            return b""
        data = bytes(self._chunk[self._pos : self._pos + size])
        self._pos += len(data)
        return data

    def read_exact(self, size: int, what: str) -> bytes:
        parts = []
        while size:
            data = self.read(size)
            if not data:
                raise ArchiveError(f"archive is damaged: it ends inside {what}")
            parts.append(data)
            size -= len(data)
        return b"".join(parts)

    def skip(self, size: int, what: str) -> None:
        while size:
            if not self._refill():
                raise ArchiveError(f"archive is damaged: it ends inside {what}")
            step = min(size, len(self._chunk) - self._pos)
            self._pos += step
            size -= step


class MemberData:
    """A member's content: ``read`` until it returns b""."""

    __slots__ = ("_blocks", "_name", "remaining")

    def __init__(self, blocks: _Blocks, name: str, size: int) -> None:
        self._blocks = blocks
        self._name = name
        self.remaining = size

    def read(self, size: int = CHUNK_BYTES) -> bytes:
        if not self.remaining:
            return b""
        data = self._blocks.read(min(size, self.remaining))
        if not data:
            raise ArchiveError(f"archive is damaged: it ends inside {self._name!r}")
        self.remaining -= len(data)
        return data

    def finish(self) -> None:
        """Skip what the reader left unread, and the padding to the next header."""
        self._blocks.skip(self.remaining, repr(self._name))
        self.remaining = 0


class _Header(NamedTuple):  # a tuple: 20,000 frozen dataclasses cost more than their headers' parsing
    name: str
    type: bytes
    size: int
    linkname: str


def _number(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for sizes over 8 GiB without pax
        return int.from_bytes(field[1:], "big") if field[0] == 0x80 else -1
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ArchiveError(f"archive is damaged: bad {what} field in a tar header") from None


def _checksum_matches(block: bytes) -> bool:
    """The header's sum with its checksum field as spaces, unsigned, or signed as old tars wrote it."""
    stored = _number(block[148:156], "checksum")
    if stored == sum(block) - sum(block[148:156]) + 8 * 32:
        return True
    return stored == sum(struct.unpack("148b", block[:148])) + sum(struct.unpack("356b", block[156:])) + 8 * 32


def _pax_size(text: str) -> int:
    if not text.isdigit():
        raise ArchiveError(f"archive is damaged: pax size {text!r}")
    return int(text)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    """Records ``"<length> <key>=<value>\\n"``; values are UTF-8 (raw bytes for names that are not: surrogateescape)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ArchiveError("archive is damaged: bad pax header") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise ArchiveError("archive is damaged: bad pax header")
        key, value = record[:-1].split(b"=", 1)
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _headers(blocks: _Blocks) -> Iterator[tuple[_Header, MemberData]]:
    """Each member's header (pax records applied) and content, up to the end-of-archive block."""
    pax: dict[str, str] = {}
    while True:
        block = blocks.read(_BLOCK)
        if not block:
            return  # no end-of-archive block: tarfile and GNU tar accept that too
        if len(block) < _BLOCK:
            block += blocks.read_exact(_BLOCK - len(block), "a tar header")
        if block == _ZERO_BLOCK:
            return
        if not _checksum_matches(block):
            raise ArchiveError("archive is damaged: a tar header's checksum does not match")
        kind = block[156:157]
        size = _pax_size(pax["size"]) if "size" in pax else _number(block[124:136], "size")
        if size < 0:
            raise ArchiveError("archive is damaged: negative size in a tar header")
        name = _text(block[0:100])
        if block[257:263] == b"ustar\0" and block[345] != 0:
            name = _text(block[345:500]) + "/" + name
        header = _Header(pax.get("path", name), kind, size, pax.get("linkpath", _text(block[157:257])))
        data = MemberData(blocks, header.name, size)
        if kind == b"x":
            if size > _MAX_PAX:
                raise ArchiveError(f"archive is damaged: a pax header of {size} bytes")
            pax = _pax(blocks.read_exact(size, "a pax header"))
            blocks.skip(-size % _BLOCK, "a pax header")
            continue
        if kind not in (*_REGULAR, b"2", b"5", *_NOT_RESTORED):
            raise ArchiveError(f"refusing {header.name!r}: unsupported tar member type {kind!r}")
        pax = {}
        yield header, data
        data.finish()
        blocks.skip(-size % _BLOCK, repr(header.name))


@contextmanager
def members(archive: Path, manifest: Manifest, digest: ArchiveDigest) -> Iterator[Iterator[Member]]:
    """Yield an iterator of (manifest record, member data) for each file in the archive, and
    of (link record, None) for each symlink.

    The caller reads each member's data (or not) before advancing. When the block ends
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

                def checked() -> Iterator[Member]:
                    for header, data in _headers(_Blocks(stream)):
                        if header.type in _REGULAR and header.name in torn:
                            torn.discard(header.name)  # changed while it was archived; the next copy counts
                            continue
                        record = _check_member(header, expected, seen)
                        if isinstance(record, LinkRecord):
                            yield record, None
                        elif record is not None:
                            yield record, data

                yield checked()
                reader.drain()  # the end-of-archive padding and compression trailer count too
        except (zstandard.ZstdError, zlib.error, gzip.BadGzipFile, EOFError) as exc:
            # Damage in the archive; a real I/O error (OSError with an errno) propagates as is.
            raise ArchiveError(f"archive is damaged: {exc}") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise ArchiveError(f"{len(missing)} file(s) of the manifest are missing from the archive, e.g. {missing[0]!r}")
    digest.sha256 = reader.hexdigest()
    digest.size = reader.count


def _check_member(header: _Header, expected: dict[str, FileRecord | LinkRecord], seen: set[str]) -> FileRecord | LinkRecord | None:
    name = check_name(header.name)
    if header.type == b"5":
        return None
    record = expected.get(name)
    if header.type == b"2":
        if not isinstance(record, LinkRecord) or record.target != header.linkname:
            raise ArchiveError(f"refusing link {header.name!r}: only regular files and the symlinks the manifest lists are restored")
    elif header.type not in _REGULAR:
        raise ArchiveError(f"refusing {header.name!r}: only regular files and symlinks are restored, not a {_NOT_RESTORED[header.type]}")
    elif not isinstance(record, FileRecord):
        raise ArchiveError(f"refusing {header.name!r}: not listed in the manifest")
    elif header.size != record.size:
        raise ArchiveError(f"{name}: {header.size} bytes in the archive, {record.size} in the manifest")
    if name in seen:
        raise ArchiveError(f"refusing {header.name!r}: appears twice in the archive")
    seen.add(name)
    return record
