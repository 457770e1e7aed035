"""Verify an archive while it is being written, on the second core.

A backup's verification reads the archive back, decompresses it and hashes every member:
for many small files that is as much Python per file as writing them, and it ran after the
write, on the one core the writer had used. :class:`Follower` forks a process when the
archive's temporary file exists; the writer tells it (through a pipe) how many bytes are in
the file so far, and it reads those bytes from the file itself (a descriptor of its own,
not the writer's buffers), hashes them, decompresses them and hashes each member, while the
writer goes on. What it found (each member's header and SHA-256, the archive's SHA-256 and
size) comes back at the end and is checked against the manifest with the same checks as a
verification after the fact (:class:`~mlwarden.jobs.backup.tarstream.MemberCheck`).

The bytes read are the file's, as a later read would find them in the page cache; a byte the
writer did not mean to write (or did not write) changes the archive's hash, which is checked
against the writer's own. The child never touches the backup directory: when the writer
stops (an error, a signal, kill -9), the pipe closes and the child exits; :meth:`close`
kills and reaps it if it is still there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import struct
import traceback
from typing import BinaryIO, NamedTuple

from mlwarden.jobs.backup.fork import fork_with_pipes
from mlwarden.jobs.backup.overlap import Overlap
from mlwarden.jobs.backup.tarstream import (
    DAMAGE,
    REGULAR,
    ArchiveError,
    HashingReader,
    Header,
    MemberCheck,
    check_manifest_paths,
    decompressed,
    read_members,
)
from mlwarden.jobs.backup.verify import VerifyResult, member_sha256

from mlwarden.catalog import BackupEntry, FileRecord, Manifest

log = logging.getLogger(__name__)

_COUNT = struct.Struct("<q")  # bytes in the file so far; _DONE after the last count
_DONE = -1

# A member's header fields (name, type, size, link target) and its content's SHA-256 (None: not
# a regular file): plain values, which cross the pipe faster than Header tuples.
Found = tuple[str, bytes, int, str, str | None]


class Columns(NamedTuple):
    """Members as five columns: the names, link targets and SHA-256s ("" for none) each joined
    by NUL, the types one byte each, the sizes. What a verifier found crosses the pipe in this
    form and is compared with the manifest's in it: a few strings to pickle, unpickle and compare
    instead of 20,000 tuples (their transfer and the comparison cost the parent 40-50 ms of a
    20,000-file backup, after its write). No name holds a NUL (the manifest's are checked; the
    verifier sends a list when one it found does): equal columns are equal lists."""

    names: str
    types: bytes
    sizes: list[int]
    links: str
    digests: str

    @classmethod
    def of(cls, found: list[Found]) -> Columns | None:
        """``found`` as columns; None if a name or link target holds a NUL (joined, it would be ambiguous)."""
        names = "\0".join([member[0] for member in found])
        links = "\0".join([member[3] for member in found])
        separators = max(len(found) - 1, 0)
        if names.count("\0") != separators or links.count("\0") != separators:
            return None
        digests = "\0".join([member[4] or "" for member in found])
        return cls(names, b"".join([member[1] for member in found]), [member[2] for member in found], links, digests)

    def members(self) -> list[Found]:
        """The members again, as the verifier found them (a digest "" is None: no regular file's is empty)."""
        if not self.types:
            return []
        kinds = [self.types[i : i + 1] for i in range(len(self.types))]
        digests = [digest or None for digest in self.digests.split("\0")]
        return list(zip(self.names.split("\0"), kinds, self.sizes, self.links.split("\0"), digests, strict=True))


class Follower:
    """The verifier process of one archive: :meth:`start` once its file exists, :meth:`advance`
    after each write, :meth:`done` when it is complete, then :meth:`result`; :meth:`close`
    always (a ``with`` block does it)."""

    def __init__(self, compression: str) -> None:
        self._compression = compression
        self._pid: int | None = None
        self._to_child = -1
        self._from_child = -1
        # What the verifier found goes into memory of its own (a memfd), and only its length through
        # the pipe: the verifier ends as soon as it is done, instead of waiting, with its result in a
        # pipe of 64 KiB, for the writer to read it after the commit (then 15-30 ms of a 20,000-file
        # backup went on the transfer and on the verifier's exit).
        self._findings = -1

    def start(self, handle: BinaryIO) -> None:
        """Fork the verifier; ``handle`` is the archive's file, opened for writing and still empty."""

        def keep(pid: int, to_child: int, from_child: int) -> None:
            self._pid, self._to_child, self._from_child = pid, to_child, from_child

        self._findings = findings = os.memfd_create("mlwarden-verifier", os.MFD_CLOEXEC)
        fork_with_pipes(lambda counts, results: _child(handle.fileno(), self._compression, counts, results, findings), keep)

    def advance(self, count: int) -> None:
        """The file now holds ``count`` bytes, written and flushed."""
        self._tell(count)

    def done(self) -> None:
        """Nothing more will be written."""
        self._tell(_DONE)
        os.close(self._to_child)
        self._to_child = -1

    def _tell(self, count: int) -> None:
        with contextlib.suppress(BrokenPipeError):  # the verifier died: result() says so; the writer goes on
            os.write(self._to_child, _COUNT.pack(count))

    def result(self, entry: BackupEntry) -> VerifyResult | None:
        """The finished archive, checked against ``entry``'s manifest: what
        :func:`~mlwarden.jobs.backup.verify.verify_archive` would say of it. None if the
        verifier died (killed by the OOM killer, say): the archive is then to be verified
        after the fact."""
        manifest = entry.stored().manifest  # format 3: the archive holds the backup's pack
        expected = _as_written(manifest)  # while the verifier finishes: only the manifest is needed
        message = os.read(self._from_child, _COUNT.size)  # 8 bytes: one write, atomic in a pipe; b"" if it died
        length = _COUNT.unpack(message)[0] if len(message) == _COUNT.size else 0
        findings = os.pread(self._findings, length, 0) if length else b""
        status = self._reap()
        if not findings or len(findings) != length:
            log.warning("the verifier process of %s ended without a result (wait status %d): verifying the archive again", entry.name, status)
            return None
        found, damage, sha256, size = pickle.loads(findings)
        return _checked(manifest, expected, found, damage, sha256, size)

    def close(self) -> None:
        if self._to_child >= 0:
            os.close(self._to_child)  # the child sees the end of the pipe without _DONE and stops
            self._to_child = -1
        if self._pid is not None:
            os.kill(self._pid, signal.SIGKILL)  # it may be hashing a large chunk: no need to wait for it
        self._reap()

    def _reap(self) -> int:
        """The child's wait status, once it has exited."""
        if self._from_child >= 0:
            os.close(self._from_child)
            self._from_child = -1
        if self._findings >= 0:
            os.close(self._findings)
            self._findings = -1
        status = 0
        if self._pid is not None:
            status = os.waitpid(self._pid, 0)[1]
            self._pid = None
        return status

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checked(
    manifest: Manifest, expected: Columns | None, found: Columns | list[Found], damage: str | None, sha256: str, size: int
) -> VerifyResult:
    files = 0
    try:
        if damage is None and expected == found:
            files = len(manifest.files)
        else:  # member by member, for the message that says what is wrong
            check = MemberCheck(manifest)
            for name, kind, member_size, linkname, digest in found.members() if isinstance(found, Columns) else found:
                record = check.member(Header(name, kind, member_size, linkname))
                if isinstance(record, FileRecord):
                    if digest != record.sha256:
                        raise ArchiveError(f"{record.path}: content does not match its SHA-256 in the manifest")
                    files += 1
            if damage is not None:
                raise ArchiveError(damage)
            check.finish()
    except ArchiveError as exc:
        return VerifyResult(False, str(exc), files, size)
    if sha256 != manifest.archive_sha256 or size != manifest.archive_bytes:
        return VerifyResult(False, "archive SHA-256 or size does not match the manifest", files, size)
    return VerifyResult(True, f"{files} files and the archive hash match the manifest", files, size)


def _as_written(manifest: Manifest) -> Columns | None:
    """What the verifier finds in an archive that holds exactly the manifest's files (each once,
    with its size and SHA-256) then its links, in the order the writer wrote them; None when
    that comparison cannot stand for the checks (a file stored twice, changed while it was
    read; a path :class:`MemberCheck` refuses). When what was found is this, every member
    passes its checks, and one comparison of a few columns costs less than checking 20,000
    members one by one; otherwise they are checked member by member, for the message."""
    if manifest.rewritten:
        return None
    try:
        check_manifest_paths(manifest)  # what MemberCheck(manifest) checks of the manifest: safe, listed once, none under a symlink
    except ArchiveError:
        return None
    files, links = manifest.files, manifest.links
    return Columns(
        names="\0".join([r.path for r in files] + [link.path for link in links]),
        types=b"0" * len(files) + b"2" * len(links),
        sizes=[r.size for r in files] + [0] * len(links),
        links="\0".join([""] * len(files) + [link.target for link in links]),
        digests="\0".join([r.sha256 for r in files] + [""] * len(links)),
    )


class _Following:
    """The archive's bytes as the writer announces them: a read waits for the next count."""

    def __init__(self, fd: int, counts: int) -> None:
        self._fd = fd
        self._counts = counts
        self._offset = 0
        self._available = 0
        self.done = False

    def read(self, size: int = -1) -> bytes:
        while self._offset == self._available:
            if self.done:
                return b""
            self.next_count()
        want = self._available - self._offset if size < 0 else min(size, self._available - self._offset)
        data = os.pread(self._fd, want, self._offset)
        if not data:
            raise ArchiveError(f"archive is damaged: it has {self._offset} bytes, the writer wrote {self._available}")
        self._offset += len(data)
        return data

    def next_count(self) -> None:
        """Wait for the writer's next count; _WriterGone if it stopped before it was done."""
        message = b""
        while len(message) < _COUNT.size:
            more = os.read(self._counts, _COUNT.size - len(message))
            if not more:
                raise _WriterGone
            message += more
        (count,) = _COUNT.unpack(message)
        if count == _DONE:
            self.done = True
        else:
            self._available = count


class _WriterGone(Exception):
    """The writer stopped before the archive was complete: nothing to verify."""


def _child(fd: int, compression: str, counts: int, results: int, findings: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole group; the writer decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # A descriptor of its own, opened for reading: the writer's may be write-only.
    own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    following = _Following(own, counts)
    found: list[Found] = []
    damage = None
    with Overlap() as overlap:
        reader = HashingReader(following, overlap)
        try:
            with decompressed(reader, compression) as stream:
                for header, data in read_members(stream):
                    found.append((*header, member_sha256(data, header.size) if header.type in REGULAR else None))
            reader.drain()
        except ArchiveError as exc:
            damage = str(exc)
        except DAMAGE as exc:
            damage = f"archive is damaged: {exc}"
        except _WriterGone:
            return 1
        except Exception:  # anything else fails the verification, and the parent reports it
            damage = "the verifier failed: " + traceback.format_exc(limit=-1).strip().splitlines()[-1]
        sha256 = reader.hexdigest()
    try:
        while not following.done:  # after damage: the writer must never wait on a full pipe
            following.next_count()
    except _WriterGone:
        return 1
    message = pickle.dumps((Columns.of(found) or found, damage, sha256, reader.count))
    with os.fdopen(findings, "wb", closefd=False) as out:
        out.write(message)
    os.write(results, _COUNT.pack(len(message)))
    return 0
