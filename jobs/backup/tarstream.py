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
from typing import NamedTuple, Protocol

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


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class HashingReader:
    """A read-only file that hashes and counts every byte read through it."""

    def __init__(self, raw: _Readable, overlap: Overlap) -> None:
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


_NOT_CANONICAL = frozenset(("", ".", ".."))  # path components that normalizing would change or that climb


def check_name(name: str) -> str:
    """The member name if it is a safe relative path, else ArchiveError."""
    if name and name[0] != "/" and "\0" not in name and _NOT_CANONICAL.isdisjoint(name.split("/")):
        return name  # relative and already normal, as every name this project writes: checked in a split
    normalized = posixpath.normpath(name)
    if not name or name.startswith("/") or normalized.startswith("/"):
        raise ArchiveError(f"refusing absolute path {name!r}")
    if normalized == ".." or normalized.startswith("../") or ".." in name.split("/"):
        raise ArchiveError(f"refusing path with '..': {name!r}")
    if "\0" in name:
        raise ArchiveError(f"refusing path with a NUL byte: {name!r}")
    return normalized


@contextmanager
def decompressed(reader: HashingReader, compression: str) -> Iterator[_Readable]:
    if compression == "zstd":
        # Both only call read(); their stubs ask for a whole file object (zstd: IO[bytes], gzip: seek too).
        with zstandard.ZstdDecompressor().stream_reader(reader, read_size=CHUNK_BYTES, closefd=False) as stream:  # type: ignore[arg-type]  # read() only
            yield stream
    elif compression == "gzip":
        with gzip.GzipFile(fileobj=reader, mode="rb") as stream:  # type: ignore[call-overload]  # read() only, no seek
            yield stream
    elif compression == "none":
        yield reader
    else:
        raise ArchiveError(f"unknown compression {compression!r}")


def _plain(names: list[str]) -> bool:
    """Whether :func:`check_name` returns every one of ``names`` as it is (relative, already
    normal, no NUL), tested on all of them at once: a call per name cost 11 ms of a 20,000-file
    backup's verification. Joined by '/' between a leading and a trailing one, every name's
    components lie between slashes, so an empty one (an empty name, a leading, trailing or
    doubled '/') shows as '//' and a '.' or '..' as '/./' or '/../'."""
    joined = "/" + "/".join(names) + "/"
    return "\0" not in joined and "//" not in joined and "/./" not in joined and "/../" not in joined


def check_manifest_paths(manifest: Manifest) -> None:
    """Every path is safe, listed once, and none lies under a symlink (writing it would follow the link)."""
    links = {check_name(link.path) for link in manifest.links}
    names = [record.path for record in manifest.files]
    paths = (names if _plain(names) else [check_name(name) for name in names]) + sorted(links)
    if len(set(paths)) != len(paths):
        raise ArchiveError("the manifest lists a path twice")
    if not links:
        return
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in links:
                raise ArchiveError(f"refusing {path!r}: it lies under a symlink of the manifest")


Member = tuple[FileRecord, "MemberData"] | tuple[LinkRecord, None]

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)  # the end of the archive
_MAX_PAX = 2**20  # a path and a link target; anything larger is damage, not a name to hold in memory
REGULAR = (b"0", b"\0", b"7")  # 7: contiguous file, a regular file to every reader
_NOT_RESTORED = {b"1": "hard link", b"3": "character device", b"4": "block device", b"6": "fifo"}
_KNOWN_TYPES = frozenset((*REGULAR, b"2", b"5", *_NOT_RESTORED))
_SPACES_CHECKSUM = 8 * ord(" ")  # the checksum field counts as eight spaces in its own sum


class _Blocks:
    """The decompressed tar stream, read in large chunks and handed out by offset.

    tarfile's stream reader keeps one buffer and slices off what it returns, copying the
    rest of its 8 MiB buffer on every read: about 1.7 ms per small file. Here a chunk is
    read once and only the bytes asked for are copied out; :func:`_headers` takes a header
    and a small member's content straight from ``chunk`` at ``pos``.
    """

    __slots__ = ("_stream", "chunk", "pos")

    def __init__(self, stream: _Readable) -> None:
        self._stream = stream
        self.chunk = b""
        self.pos = 0

    def _refill(self) -> bool:
        """A new chunk if the current one is used up; False at the end of the stream."""
        if self.pos == len(self.chunk):
            self.chunk = self._stream.read(CHUNK_BYTES)
            self.pos = 0
        return self.pos < len(self.chunk)

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes (fewer at a chunk's end); b"" only at the end of the stream."""
        if not self._refill():
            return b""
        pos = self.pos
        data = self.chunk[pos : pos + size]
        self.pos = pos + len(data)
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
            step = min(size, len(self.chunk) - self.pos)
            self.pos += step
            size -= step


class MemberData:
    """A member's content: ``read`` until it returns b"".

    A member that lies whole in the current chunk (every small file) is cut out of it
    once, before the caller sees it; only a larger one is read from the stream as the
    caller asks for it.
    """

    __slots__ = ("_blocks", "_held", "_name", "remaining")

    def __init__(self, blocks: _Blocks, name: str, size: int, held: bytes = b"") -> None:
        self._blocks = blocks
        self._name = name
        self._held = held  # the whole content, already taken from the stream
        self.remaining = size - len(held)  # still in the stream

    def read(self, size: int = CHUNK_BYTES) -> bytes:
        held = self._held
        if held:
            if size >= len(held):
                self._held = b""
                return held
            self._held = held[size:]
            return held[:size]
        if not self.remaining:
            return b""
        data = self._blocks.read(min(size, self.remaining))
        if not data:
            raise ArchiveError(f"archive is damaged: it ends inside {self._name!r}")
        self.remaining -= len(data)
        return data

    def finish(self) -> None:
        """Skip what the reader left unread, and the padding to the next header."""
        self._held = b""
        self._blocks.skip(self.remaining, repr(self._name))
        self.remaining = 0


class Header(NamedTuple):  # a tuple: 20,000 frozen dataclasses cost more than their headers' parsing
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


def _octal(block: bytes, start: int, end: int, what: str) -> int:
    """The field ``block[start:end + 1]``, parsed as :func:`_number` does, with a shortcut for
    the usual form: octal digits up to ``end``, then a NUL or a space."""
    if block[end] in (0, 32):
        try:
            return int(block[start:end], 8)
        except ValueError:
            pass  # a NUL earlier, only spaces, base-256: the general parser decides
    return _number(block[start : end + 1], what)


def byte_sum(data: bytes) -> int:
    """``sum(data)``, in C: Adler-32's low half is 1 + the sum of the bytes modulo 65521, and no
    256 bytes add up to that much, so each 256-byte piece's sum comes out exact. Summing a
    header in Python cost more than the rest of a small member's header together."""
    if len(data) <= 256:
        return (zlib.adler32(data) & 0xFFFF) - 1
    return (zlib.adler32(data[:256]) & 0xFFFF) - 1 + byte_sum(data[256:])


def _checksum_matches(block: bytes) -> bool:
    """The header's sum with its checksum field as spaces, unsigned, or signed as old tars wrote it."""
    stored = _octal(block, 148, 154, "checksum")
    unsigned = byte_sum(block) - sum(block[148:156]) + _SPACES_CHECKSUM
    if stored == unsigned:
        return True
    signed: int = sum(struct.unpack("148b", block[:148])) + sum(struct.unpack("356b", block[156:])) + _SPACES_CHECKSUM
    return stored == signed


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


def _next_header(blocks: _Blocks) -> bytes:
    """The next 512-byte block: taken from the current chunk when it is there whole (nearly
    always), else assembled across chunks; b"" at the end of the stream."""
    pos = blocks.pos
    end = pos + _BLOCK
    if end <= len(blocks.chunk):
        blocks.pos = end
        return blocks.chunk[pos:end]
    block = blocks.read(_BLOCK)
    if block and len(block) < _BLOCK:
        block += blocks.read_exact(_BLOCK - len(block), "a tar header")
    return block


def _headers(blocks: _Blocks) -> Iterator[tuple[Header, MemberData]]:
    """Each member's header (pax records applied) and content, up to the end-of-archive block.

    This loop runs once per file, so it is written for the common case: the header and a
    small member lie in the current chunk, and the member's content and padding are taken
    from it before the caller sees the member (what the caller leaves unread is dropped)."""
    pax: dict[str, str] = {}
    while True:
        block = _next_header(blocks)
        if not block or block == _ZERO_BLOCK:
            return  # no end-of-archive block: tarfile and GNU tar accept that too
        if not _checksum_matches(block):
            raise ArchiveError("archive is damaged: a tar header's checksum does not match")
        kind = block[156:157]
        size = _pax_size(pax["size"]) if "size" in pax else _octal(block, 124, 135, "size")
        if size < 0:
            raise ArchiveError("archive is damaged: negative size in a tar header")
        if kind == b"x":
            if size > _MAX_PAX:
                raise ArchiveError(f"archive is damaged: a pax header of {size} bytes")
            pax = _pax(blocks.read_exact(size, "a pax header"))
            blocks.skip(-size % _BLOCK, "a pax header")
            continue
        name = _text(block[0:100])
        if block[257:263] == b"ustar\0" and block[345] != 0:
            name = _text(block[345:500]) + "/" + name
        if pax:
            header = Header(pax.get("path", name), kind, size, pax.get("linkpath", _text(block[157:257])))
            pax = {}
        else:
            header = Header(name, kind, size, _text(block[157:257]) if kind == b"2" else "")
        if kind not in _KNOWN_TYPES:
            raise ArchiveError(f"refusing {header.name!r}: unsupported tar member type {kind!r}")
        start = blocks.pos
        end = start + size + (-size % _BLOCK)
        if end <= len(blocks.chunk):  # content and padding are here: no further reads
            blocks.pos = end
            yield header, MemberData(blocks, header.name, size, blocks.chunk[start : start + size])
            continue
        data = MemberData(blocks, header.name, size)
        yield header, data
        data.finish()
        blocks.skip(-size % _BLOCK, repr(header.name))


class MemberCheck:
    """The checks every member of an archive passes, against one manifest: :func:`members`
    makes them as it reads, a verifier that followed the archive while it was written makes
    them on what it found (:mod:`mlwarden.jobs.backup.follow`)."""

    def __init__(self, manifest: Manifest) -> None:
        check_manifest_paths(manifest)
        self._expected: dict[str, FileRecord | LinkRecord] = {record.path: record for record in manifest.files}
        self._expected.update((link.path, link) for link in manifest.links)
        self._seen: set[str] = set()
        self._torn = {path for path in manifest.rewritten if isinstance(self._expected.get(path), FileRecord)}  # first copies to skip

    def member(self, header: Header) -> FileRecord | LinkRecord | None:
        """The manifest's record of this member; None for what readers pass over (a directory,
        the torn first copy of a file that changed while it was archived); ArchiveError if refused."""
        if self._torn and header.type in REGULAR and header.name in self._torn:
            self._torn.discard(header.name)  # the next copy counts
            return None
        return _check_member(header, self._expected, self._seen)

    def finish(self) -> None:
        """After the last member: ArchiveError if the manifest lists what the archive lacks."""
        missing = sorted(set(self._expected) - self._seen)
        if missing:
            raise ArchiveError(f"{len(missing)} file(s) of the manifest are missing from the archive, e.g. {missing[0]!r}")


def read_members(stream: _Readable) -> Iterator[tuple[Header, MemberData]]:
    """Each member of a decompressed tar stream, unchecked (see :class:`MemberCheck`)."""
    return _headers(_Blocks(stream))


DAMAGE = (zstandard.ZstdError, zlib.error, gzip.BadGzipFile, EOFError)  # what damage in the compressed stream raises


@contextmanager
def members(archive: Path, manifest: Manifest, digest: ArchiveDigest) -> Iterator[Iterator[Member]]:
    """Yield an iterator of (manifest record, member data) for each file in the archive, and
    of (link record, None) for each symlink.

    The caller reads each member's data (or not) before advancing. When the block ends
    normally, the whole archive has been read and ``digest`` holds its hash and size; any
    damage or refused member raises :class:`ArchiveError`.
    """
    check = MemberCheck(manifest)
    with open(archive, "rb", buffering=0) as raw, Overlap() as overlap:
        reader = HashingReader(raw, overlap)
        try:
            with decompressed(reader, manifest.compression) as stream:

                def checked() -> Iterator[Member]:
                    for header, data in read_members(stream):
                        record = check.member(header)
                        if isinstance(record, LinkRecord):
                            yield record, None
                        elif record is not None:
                            yield record, data

                yield checked()
                reader.drain()  # the end-of-archive padding and compression trailer count too
        except DAMAGE as exc:
            # Damage in the archive; a real I/O error (OSError with an errno) propagates as is.
            raise ArchiveError(f"archive is damaged: {exc}") from None
    check.finish()
    digest.sha256 = reader.hexdigest()
    digest.size = reader.count


def _check_member(header: Header, expected: dict[str, FileRecord | LinkRecord], seen: set[str]) -> FileRecord | LinkRecord | None:
    name = check_name(header.name)
    if header.type == b"5":
        return None
    record = expected.get(name)
    if header.type == b"2":
        if not isinstance(record, LinkRecord) or record.target != header.linkname:
            raise ArchiveError(f"refusing link {header.name!r}: only regular files and the symlinks the manifest lists are restored")
    elif header.type not in REGULAR:
        raise ArchiveError(f"refusing {header.name!r}: only regular files and symlinks are restored, not a {_NOT_RESTORED[header.type]}")
    elif not isinstance(record, FileRecord):
        raise ArchiveError(f"refusing {header.name!r}: not listed in the manifest")
    elif header.size != record.size:
        raise ArchiveError(f"{name}: {header.size} bytes in the archive, {record.size} in the manifest")
    if name in seen:
        raise ArchiveError(f"refusing {header.name!r}: appears twice in the archive")
    seen.add(name)
    return record
