"""Put a backup back, safely, or prove that it could be: ``mlwarden restore`` and ``--drill``.

The order of a restore is what makes it safe on a bad day:

1. The archive's SHA-256 is checked against the manifest *before* anything is extracted:
   a damaged archive restores nothing.
2. Members are extracted by :mod:`jobs.backup.tarstream` (regular files only, relative
   names, no ``..``, only names the manifest lists) into a temporary directory next to the
   target, each file hashed as it is written and checked against the manifest; then the
   target's filesystem is synced once (``syncfs``), not each file.
3. Only then is the temporary directory renamed to the target. A failed restore leaves the
   target as it was and removes the temporary directory. With ``--force`` the old content
   is renamed aside first; if the new content cannot then take its place, the old content
   is put back, and if even that fails, one log line says where both are.

Symlinks come back as symlinks, created after every file, and only where they resolve
inside the target (an absolute target, or one that leads out, is listed in the log and
left out, unless ``--restore-external-links``). Hard links (format 3) come back as hard
links, made after every file is written and verified, before the symlinks, and only
between two files of the manifest: both inside the target.

Restored files get the archived permission bits without setuid/setgid/sticky, less the
process umask (what GNU tar does for a user other than root); the restored directories get
what ``mkdir`` gives under that umask.

A drill (``--drill``, run by :mod:`jobs.backup.job`) restores into a temporary directory
inside the backup directory (so it has room and is on the same disk) or inside ``--to``,
verifies, times it, deletes it, and pushes
``mlwarden_restore_drill_duration_seconds`` and ``mlwarden_restore_drill_verified_files``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import pickle
import shutil
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mlwarden.jobs.backup.fork import die_with_parent, fork_with_pipes
from mlwarden.jobs.backup.overlap import Overlap
from mlwarden.jobs.backup.s3config import S3Location
from mlwarden.jobs.backup.tarstream import (
    ArchiveDigest,
    ArchiveError,
    MemberData,
    check_manifest_paths,  # the archive reader's own path rules
    hash_file,
    members,
)

from mlwarden.catalog import DOWNLOAD_STAGING, PACK, BackupEntry, Catalog, FileRecord, LinkRecord, Manifest, staging_dir, stale_staging
from mlwarden.fsutil import fsync_dir, start_writeback, sync_filesystem
from mlwarden.interrupts import deferred_interrupts
from mlwarden.terminal import Progress

log = logging.getLogger(__name__)


class RestoreError(RuntimeError):
    """The restore cannot go ahead (target in the way, no such backup); nothing was changed."""


class RestoreStranded(RuntimeError):
    """The swap into the target failed half-way and could not be undone; the message says
    where the previous content and the verified restore are, so nothing may be deleted."""


@dataclass(frozen=True)
class RestoreResult:
    name: str
    target: Path
    files: int
    bytes: int
    seconds: float


def restore_entry(entry: BackupEntry, target: Path, overwrite: bool = False, external_links: bool = False) -> RestoreResult:
    """Restore one local backup into ``target`` (created; must be absent or empty unless ``overwrite``)."""
    started = time.monotonic()
    target = target.absolute()
    check_target(target, overwrite)
    manifest = entry.manifest
    packs = _packs(entry)
    for pack in [entry] if packs is None else packs:
        actual, size = hash_file(pack.archive_path)
        if actual != pack.manifest.archive_sha256 or size != pack.manifest.archive_bytes:
            raise ArchiveError(f"archive {pack.archive_path} does not match its manifest's SHA-256: it is damaged; nothing was extracted")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_staging(target.parent, (_restore_prefix(target),)):
        log.warning("removing %s: left behind by a restore to %s that was killed", stale, target)
        shutil.rmtree(stale)
    staging: Path | None = None
    try:
        with deferred_interrupts():  # SIGTERM between the mkdir and the assignment would strand the directory
            staging = staging_dir(target.parent, _restore_prefix(target))
        umask = _process_umask()
        files = _extract(entry, staging, umask, external_links) if packs is None else _extract_packs(entry, packs, staging, umask, external_links)
        _swap_into_place(staging, target, overwrite)
    except RestoreStranded:
        raise  # the staging directory holds the only verified copy of the restore: keep it
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    log.info("restored %s (%d files) into %s in %.1fs; every file matches the manifest", entry.name, files, target, seconds)
    return RestoreResult(entry.name, target, files, manifest.total_bytes, seconds)


def _restore_prefix(target: Path) -> str:
    return f".{target.name}.restore-"


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse, before anything is read or downloaded, a target the restore cannot take over."""
    if target.is_symlink():
        # The restore renames its verified staging directory onto the target: that would
        # replace the link itself (and with --force, set its directory aside as a link).
        raise RestoreError(
            f"{target} is a symbolic link (to {os.readlink(target)}); pass the directory itself, "
            f"--to {target.resolve()}, or replace the link by a directory"
        )
    if target.exists() and not target.is_dir():
        raise RestoreError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise RestoreError(f"{target} is not empty; choose an empty or new directory, or pass --force to replace it")


def _process_umask() -> int:
    """The umask, read without changing it: ``os.umask`` can only read by setting, which
    would briefly change it for every thread of the process."""
    with open("/proc/self/status", encoding="utf-8", errors="replace") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise OSError("no Umask line in /proc/self/status (Linux 4.7 or later is needed)")


def _restored_mode(archived: int, umask: int) -> int:
    """Permission bits for a restored file: as archived, without setuid/setgid/sticky, less the umask."""
    return archived & 0o777 & ~umask


def _extract(entry: BackupEntry, staging: Path, umask: int, external_links: bool) -> int:
    """Write every file into ``staging``, checked against the manifest, then the links, then
    sync the filesystem once: a per-file fsync costs more than the write on small files, and
    nothing in ``staging`` is used before the sync."""
    digest = ArchiveDigest()
    files = 0
    links: list[LinkRecord] = []
    root = str(staging)
    made = {""}  # directories under staging that exist, as relative strings: no Path per file
    progress = Progress(f"restore {entry.name}", entry.manifest.total_bytes)
    sync_ahead = _SyncAhead(staging)
    with members(entry.archive_path, entry.manifest, digest) as found:
        for record, data in found:
            if isinstance(record, LinkRecord):
                links.append(record)
                continue
            assert data is not None  # a file's data
            _write_file(_new_path(root, record.path, made), data, record, umask, progress.advance)
            sync_ahead.wrote(1)
            files += 1
    progress.finish()
    if digest.sha256 != entry.manifest.archive_sha256:
        raise ArchiveError("the archive changed while it was being restored")
    _finish(staging, links, umask, external_links, sync_ahead)
    return files


def _finish(staging: Path, links: list[LinkRecord], umask: int, external_links: bool, sync_ahead: _SyncAhead) -> None:
    _make_links(staging, links, external_links)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp made it 0o700; it becomes the target
    sync_ahead.finish()
    sync_filesystem(staging)


SYNC_AHEAD_FILES = 2000


class _SyncAhead:
    """``syncfs`` of the restore's filesystem in a helper thread after every
    :data:`SYNC_AHEAD_FILES` files written (when the previous one is done), so that the disk
    writes small files while the restore goes on; the final ``syncfs``, which the swap into
    place waits for, then finds little left. A large file's chunks are handed to writeback as
    they are written (:func:`start_writeback`); this is the same for many small files, in a
    handful of calls instead of one per file. 20,000 files of 1-4 KB to this VM's ext4: the
    final syncfs took 0.50-0.65 s, with this 0.03-0.15 s. Not a safety step: the final
    ``syncfs`` still comes before the swap, and an error here fails the restore too."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._files = 0
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def wrote(self, files: int) -> None:
        self._files += files
        if self._files >= SYNC_AHEAD_FILES and (self._thread is None or not self._thread.is_alive()):
            self._files = 0
            self._thread = threading.Thread(target=self._sync, name="mlwarden-sync-ahead", daemon=True)
            self._thread.start()

    def _sync(self) -> None:
        try:
            sync_filesystem(self._directory)
        except OSError as exc:
            self._error = exc

    def finish(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error


def _packs(entry: BackupEntry) -> list[BackupEntry] | None:
    """Format 3: every pack that holds content of ``entry`` (its own first, when it has one),
    each checked to hold what the manifest expects of it; None before format 3 (one archive
    holds it all). Pack names come from the manifest, validated as backup names: one path component."""
    if entry.manifest.format_version < 3:
        return None
    root = entry.directory.parent
    wanted: dict[str, set[str]] = {}
    for record in entry.manifest.files:
        wanted.setdefault(str(record.pack), set()).add(record.sha256)
    packs = [entry.stored()] if entry.manifest.has_archive else []
    for name in entry.manifest.packs:
        if name == entry.name:
            continue
        if not (root / name / PACK).is_file():
            raise ArchiveError(f"pack {name}, which holds content of {entry.name}, is missing from {root}: nothing was extracted")
        packs.append(Catalog.read_pack(root / name))
    for pack in packs:
        missing = wanted.get(pack.name, set()) - {record.sha256 for record in pack.manifest.files}
        if missing:
            raise ArchiveError(
                f"pack {pack.name} does not hold content that {entry.name} names it for ({len(missing)} file(s)): nothing was extracted"
            )
    return packs


def _extract_packs(entry: BackupEntry, packs: list[BackupEntry], staging: Path, umask: int, external_links: bool) -> int:
    """Format 3: read each pack once and write each member it holds for ``entry`` to every
    path of ``entry`` with that content (the first from the archive, hashed as it is
    written; the others copied from it), then the hard links, then the links from
    ``entry``'s own pack. With many small files, a second process writes most of them
    (:class:`_Helper`) while this one reads and checks the members."""
    manifest = entry.manifest
    check_manifest_paths(manifest)
    linked = {link.path for link in manifest.hardlinks}
    paths: dict[tuple[str, str], list[FileRecord]] = {}
    for wanted in manifest.files:
        if wanted.path not in linked:
            paths.setdefault((str(wanted.pack), wanted.sha256), []).append(wanted)
    files = 0
    links: list[LinkRecord] = []
    root = str(staging)
    made = {""}  # directories under staging that exist, as relative strings: no Path per file
    progress = Progress(f"restore {entry.name}", manifest.total_bytes)
    sync_ahead = _SyncAhead(staging)

    def write_here(batch: list[_Job]) -> None:  # what the helper could not take in time
        for _, content, targets in batch:
            _write_content(content, targets, root, umask, made)

    with contextlib.ExitStack() as stack:
        # A SIGTERM handled between the helper's fork and the entry into a with-block would leave
        # it running (stopped, even, if it was): it is entered with signals deferred.
        with deferred_interrupts():
            helper = stack.enter_context(_Helper(paths, root, umask, write_here)) if _worth_a_helper(manifest) else None
        for pack in packs:
            digest = ArchiveDigest()
            with members(pack.archive_path, pack.manifest, digest) as found:
                for record, data in found:
                    if isinstance(record, LinkRecord):
                        if pack.name == entry.name:  # another pack's links are its own backup's
                            links.append(record)
                        continue
                    assert data is not None  # a file's data
                    key = (pack.name, record.sha256)
                    targets = paths.pop(key, None)
                    if targets is None:
                        continue
                    if helper is not None and not data.remaining and record.size <= HELPER_MAX_FILE_BYTES:
                        helper.take(key, data.read(), targets)
                        progress.advance(record.size * len(targets))
                    else:
                        first = _new_path(root, targets[0].path, made)
                        _write_file(first, data, targets[0], umask, progress.advance)
                        for other in targets[1:]:
                            _copy_restored(first, _new_path(root, other.path, made), other, umask, progress.advance)
                    files += len(targets)
                    sync_ahead.wrote(len(targets))
            if digest.sha256 != pack.manifest.archive_sha256:
                raise ArchiveError(f"the archive of pack {pack.name} changed while it was being restored")
        if helper is not None:
            helper.finish()  # every file it took is written and verified, or this raises its error
    if paths:
        raise ArchiveError(f"{len(paths)} content(s) of the manifest are missing from their packs, e.g. {next(iter(paths.values()))[0].path!r}")
    # Every file is written and verified: a hard link only joins a name to one of them.
    for hardlink in manifest.hardlinks:
        os.link(f"{root}/{hardlink.target}", _new_path(root, hardlink.path, made), follow_symlinks=False)
    progress.finish()
    _finish(staging, links, umask, external_links, sync_ahead)
    return files + len(manifest.hardlinks)


# A helper pays when a restore is mostly small files: reading and checking a member costs
# this process about 18 µs, writing it as a file (open, write, futimens, close, the
# SHA-256) about as much again, which the helper does on the second core.
HELPER_MIN_FILES = 1000
HELPER_MAX_FILE_BYTES = 2**18  # larger members are written here, as they are read
HELPER_BATCH_FILES = 128
HELPER_BATCH_BYTES = 2**18
HELPER_IN_FLIGHT = 2  # batches handed over and not yet written; beyond that this process writes them
_PIPE_BYTES = 2**20  # room for a batch in the pipe while the helper writes the one before
_LENGTH = struct.Struct("<q")

_Job = tuple[tuple[str, str], bytes, list[FileRecord]]  # (pack, SHA-256), content, the paths it goes to


def _worth_a_helper(manifest: Manifest) -> bool:
    """Many small files, and a second core this process may run on."""
    small = sum(1 for record in manifest.files if record.size <= HELPER_MAX_FILE_BYTES)
    return small >= HELPER_MIN_FILES and len(os.sched_getaffinity(0)) >= 2


class _Helper:
    """A second process that writes the small files this one has read and checked.

    Forked before the first member is read, it holds the same table of paths by content:
    what crosses to it is a batch of (pack, SHA-256, content) at a time, through a pipe; it
    writes each content to its paths, checking its SHA-256 as the first writer does, and
    acknowledges each batch. When :data:`HELPER_IN_FLIGHT` batches are unacknowledged (its
    core is busy with other work), this process writes the next batch itself, so a busy
    machine costs no more than one process would. :meth:`finish` waits for every batch and
    raises the helper's error if it had one; :meth:`close` (also on an error or a signal
    here) kills and reaps it before anyone removes the staging directory. If this process
    dies (kill -9), the kernel kills the helper too (``PR_SET_PDEATHSIG``), so it never
    writes into a staging directory that the next restore removes as left over. SIGINT is
    the first process's to handle; SIGTERM ends the helper."""

    def __init__(self, paths: dict[tuple[str, str], list[FileRecord]], root: str, umask: int, write_here: Callable[[list[_Job]], None]) -> None:
        self._write_here = write_here
        self._batch: list[_Job] = []
        self._batch_bytes = 0
        self._in_flight = 0
        self._handed = 0  # files in the batches handed over
        self._pid: int | None = None
        self._jobs = self._acks = -1
        parent = os.getpid()

        def keep(pid: int, jobs: int, acks: int) -> None:
            self._pid, self._jobs, self._acks = pid, jobs, acks

        try:
            fork_with_pipes(lambda jobs, acks: _helper_main(parent, jobs, acks, paths, root, umask), keep)
        except BaseException:  # a signal during the fork, raised once the helper is known: no with-block will close it
            self.close()
            raise
        with contextlib.suppress(OSError):  # a smaller pipe only makes this process wait more often
            fcntl.fcntl(self._jobs, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        os.set_blocking(self._acks, False)

    def take(self, key: tuple[str, str], content: bytes, targets: list[FileRecord]) -> None:
        """Write ``content`` to ``targets``: in the helper, or here if it is behind."""
        self._batch.append((key, content, targets))
        self._batch_bytes += len(content)
        if len(self._batch) >= HELPER_BATCH_FILES or self._batch_bytes >= HELPER_BATCH_BYTES:
            self._hand_over()

    def _hand_over(self) -> None:
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        with contextlib.suppress(BlockingIOError):
            self._in_flight -= len(os.read(self._acks, 4096))
        if self._in_flight >= HELPER_IN_FLIGHT:
            self._write_here(batch)
            return
        self._send(pickle.dumps([(key, content) for key, content, _ in batch], pickle.HIGHEST_PROTOCOL))
        self._in_flight += 1
        self._handed += sum(len(targets) for _, _, targets in batch)

    def _send(self, message: bytes) -> None:
        try:
            _write_all(self._jobs, _LENGTH.pack(len(message)) + message)
        except BrokenPipeError:
            raise ArchiveError(f"the restore's helper process ended early ({self._wait()}): nothing was restored") from None

    def finish(self) -> None:
        """Hand over what is left and wait until the helper wrote it all; its error if it failed."""
        if self._batch:
            self._hand_over()
        self._send(b"")  # the end
        os.close(self._jobs)
        self._jobs = -1
        os.set_blocking(self._acks, True)
        answer = b""
        while chunk := os.read(self._acks, 2**16):
            answer += chunk
        status = self._wait()
        outcome = answer.lstrip(b".")  # an acknowledgement per batch, then the outcome
        if not outcome:
            raise ArchiveError(f"the restore's helper process ended without a result ({status}): nothing was restored")
        result: int | BaseException = pickle.loads(outcome)
        if isinstance(result, BaseException):
            raise result
        if result != self._handed:
            raise ArchiveError(f"the restore's helper process wrote {result} files of {self._handed}: nothing was restored")

    def _wait(self) -> str:
        """Reap the helper; how it ended, for a message."""
        if self._pid is None:
            return "already reaped"
        status = os.waitpid(self._pid, 0)[1]
        self._pid = None
        return f"wait status {status}"

    def close(self) -> None:
        if self._pid is not None:
            os.kill(self._pid, signal.SIGKILL)
            self._wait()
        for fd in (self._jobs, self._acks):
            if fd >= 0:
                os.close(fd)
        self._jobs = self._acks = -1

    def __enter__(self) -> _Helper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _helper_main(parent: int, jobs: int, acks: int, paths: dict[tuple[str, str], list[FileRecord]], root: str, umask: int) -> int:
    """The helper: write each batch, acknowledge it; at the end, the files written or the
    first error. After an error it still reads (and drops) every batch, so the first
    process never waits on a full pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the whole group; the first process decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()  # killed with the first process, not after its current batch
    if os.getppid() != parent:  # it died before that call
        return 1
    made = {""}
    files = 0
    failure: Exception | None = None
    while True:
        length = _LENGTH.unpack(_read_exactly(jobs, _LENGTH.size))[0]
        if not length:
            break
        batch: list[tuple[tuple[str, str], bytes]] = pickle.loads(_read_exactly(jobs, length))
        if failure is None:
            try:
                for key, content in batch:
                    targets = paths.pop(key)
                    _write_content(content, targets, root, umask, made)
                    files += len(targets)
            except Exception as exc:  # noqa: BLE001  # any failure is the first process's to report
                failure = exc
        os.write(acks, b".")
    try:
        outcome = pickle.dumps(failure if failure is not None else files)
    except Exception:  # noqa: BLE001  # an exception that does not pickle: its text
        outcome = pickle.dumps(ArchiveError(f"the restore's helper process failed: {failure}"))
    _write_all(acks, outcome)
    return 0


def _read_exactly(fd: int, size: int) -> bytes:
    """``size`` bytes from a pipe; the end of the pipe first means the first process is gone."""
    parts = []
    while size:
        data = os.read(fd, size)
        if not data:
            os._exit(1)
        parts.append(data)
        size -= len(data)
    return b"".join(parts)


def _write_content(content: bytes, targets: list[FileRecord], root: str, umask: int, made: set[str]) -> None:
    """A small member's content, whole in memory, written to each of its paths."""
    first = _new_path(root, targets[0].path, made)
    _write_whole(first, content, targets[0], umask)
    for other in targets[1:]:
        _copy_restored(first, _new_path(root, other.path, made), other, umask, _ignore)


def _ignore(amount: int) -> None:
    """Progress that is reported elsewhere: where a file was handed to the helper."""


def _new_path(root: str, relative: str, made: set[str]) -> str:
    """``root/relative``, its parent directories made (once per directory: ``made``)."""
    parent = relative.rpartition("/")[0]
    if parent not in made:
        os.makedirs(f"{root}/{parent}", exist_ok=True)
        made.add(parent)
    return f"{root}/{relative}"


def _copy_restored(source: str, destination: str, record: FileRecord, umask: int, advance: Callable[[int], None]) -> None:
    """Another path with content just restored and verified: a kernel copy of it (never
    through an existing name)."""
    with open(source, "rb") as src:
        fd = os.open(destination, _CREATE, 0o600)
        try:
            remaining = record.size
            while remaining:
                copied = os.copy_file_range(src.fileno(), fd, remaining)
                if not copied:
                    raise ArchiveError(f"{record.path}: its content ended early while it was copied")
                remaining -= copied
            os.fchmod(fd, _restored_mode(record.mode, umask))
            os.utime(fd, (record.mtime, record.mtime))
        finally:
            os.close(fd)
    advance(record.size)


def _write_file(destination: str, data: MemberData, record: FileRecord, umask: int, advance: Callable[[int], None]) -> None:
    """One new file (never through an existing name: O_EXCL, O_NOFOLLOW), hashed as it is written.

    It is created with its final permission bits (no fchmod: a file opened by the call that
    creates it is writable whatever its mode); the staging directory is private to this
    process until the restore is complete and verified."""
    if not data.remaining:  # a small file: its content is whole in memory
        content = data.read()
        _write_whole(destination, content, record, umask)
        advance(len(content))
        return
    fd = os.open(destination, _CREATE, _restored_mode(record.mode, umask))
    try:
        chunk = data.read()
        file_hash = hashlib.sha256(chunk)
        _write_all(fd, chunk)
        advance(len(chunk))
        offset = len(chunk)
        with Overlap() as overlap:  # hash each chunk in the helper thread while this one decompresses and writes
            while chunk := data.read():
                overlap.run(file_hash.update, chunk)
                _write_all(fd, chunk)
                start_writeback(fd, offset, len(chunk))  # the disk writes while the rest is decompressed
                offset += len(chunk)
                advance(len(chunk))
        os.utime(fd, (record.mtime, record.mtime))
    finally:
        os.close(fd)
    if file_hash.hexdigest() != record.sha256:
        raise ArchiveError(f"{record.path}: restored content does not match its SHA-256 in the manifest")


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_whole(destination: str, content: bytes, record: FileRecord, umask: int) -> None:
    """:func:`_write_file` of a content whole in memory: four system calls, the SHA-256 in one call."""
    fd = os.open(destination, _CREATE, _restored_mode(record.mode, umask))
    try:
        if content:
            _write_all(fd, content)
        os.utime(fd, (record.mtime, record.mtime))
    finally:
        os.close(fd)
    if hashlib.sha256(content).hexdigest() != record.sha256:
        raise ArchiveError(f"{record.path}: restored content does not match its SHA-256 in the manifest")


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    if written < len(data):  # a short write (a signal, a full quota): the rest, without copying
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view) :]


def _make_links(staging: Path, links: list[LinkRecord], external_links: bool) -> None:
    """Create the symlinks (after every file, so that no file is written through one); then,
    unless ``external_links``, remove each that resolves outside ``staging`` (absolute, or up and
    out, directly or through another link), until none does."""
    for link in links:
        path = staging / link.path
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(link.target, path)
    if external_links:
        return
    root = os.path.realpath(staging)
    remaining = list(links)
    while True:
        outside = [
            link for link in remaining
            if os.path.isabs(link.target) or os.path.commonpath([root, os.path.realpath(staging / link.path)]) != root
        ]
        if not outside:
            return
        for link in outside:
            log.warning(
                "not restoring symlink %s -> %s: it points outside the restore target (--restore-external-links restores it)", link.path, link.target
            )
            os.unlink(staging / link.path)
            remaining.remove(link)


def _swap_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished restore onto ``target``; an old non-empty target goes only if allowed.

    An empty target directory is replaced by the rename itself (rename(2) allows that)."""
    old: Path | None = None
    if target.is_dir() and any(target.iterdir()):
        assert overwrite
        old = target.with_name(f".{target.name}.replaced-{int(time.time())}")
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError as exc:
        if old is not None:
            _put_back(old, target, staging, exc)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old)
        log.info("replaced the previous content of %s", target)


def _put_back(old: Path, target: Path, staging: Path, cause: OSError) -> None:
    """The new content could not take ``target``'s place: give the old content its name back."""
    try:
        os.rename(old, target)
    except OSError as undo:
        raise RestoreStranded(
            f"could not move the verified restore into {target} ({cause}) nor put its previous content back ({undo}): "
            f"{target} is missing; the previous content is in {old}, the verified restore in {staging}; "
            f"rename one of them to {target} by hand (a new restore to {target} would remove the verified restore)"
        ) from cause
    fsync_dir(target.parent)
    raise RestoreError(f"could not move the verified restore into {target} ({cause}); its previous content was put back") from cause


@contextlib.contextmanager
def entry_from_s3(location: S3Location, name: str, near: Path) -> Iterator[BackupEntry]:
    """Download backup ``name`` (or ``latest``) from S3 into a temporary directory next to ``near``."""
    from mlwarden.jobs.backup.offsite import OffsiteStore  # boto3 loads only when S3 is used

    store = OffsiteStore(location)
    manifest: Manifest = store.manifest(name)
    near.mkdir(parents=True, exist_ok=True)
    directory: Path | None = None
    try:
        with deferred_interrupts():  # see restore_entry
            directory = staging_dir(near, DOWNLOAD_STAGING)  # private: mode 0700
        log.info("downloading %s and the packs it needs (%s) from %s", manifest.name, ", ".join(manifest.packs) or "its archive", location.url)
        entry = Catalog.read(store.download(manifest, directory))
        assert entry is not None  # the manifest was just downloaded
        yield entry
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
