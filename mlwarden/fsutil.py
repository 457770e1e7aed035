"""Crash-safe file writing (a complete file or none, never a half-written one), free space, tree sizes.

The pattern is the classic one: write to a temporary name in the same directory, fsync
the file, rename it over the final name, fsync the directory so the rename survives a
power cut.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mlwarden.libc import libc


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """Flush everything written to the filesystem that holds ``path`` (``syncfs(2)``): one call
    after writing many files instead of an fsync per file; ``sync()`` where libc has no syncfs."""
    syncfs = getattr(libc(), "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error), str(path))
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the dirty pages in the range, do not wait


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` to disk now,
    without waiting (``sync_file_range(2)``): a later ``syncfs`` then finds most of a large
    file already written instead of flushing it all at once. Best effort: nothing where libc
    or the filesystem lacks it."""
    call = getattr(libc(), "sync_file_range", None)
    if call is not None:
        call(fd, ctypes.c_int64(offset), ctypes.c_int64(length), ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))


class StagedFiles:
    """Files that become durable together, instead of one fsync after another.

    For what is written into a staging directory (nobody reads it until the caller renames it
    into place): each file is written whole and left unsynced. :meth:`start` starts the fsyncs
    of the files written so far, each in a thread, while the caller goes on (writes more,
    waits for a verifier); :meth:`sync` fsyncs the rest and the directories they were written
    in, and waits for all. Their waits for the device overlap: a backup's commit made 15
    fsyncs of about 6 ms, one after another. The caller renames the staging directory only
    after :meth:`sync` returned, so a crash before the rename leaves no committed directory,
    and one after it finds every file whole. :meth:`close` waits for the fsyncs under way and
    closes the files, synced or not.
    """

    def __init__(self) -> None:
        self._fds: list[int] = []
        self._directories: set[Path] = set()
        self._threads: list[threading.Thread] = []
        self._started = 0  # files whose fsync has started
        self._errors: list[OSError] = []

    def keep(self, fd: int, directory: Path) -> None:
        """Sync the file open as ``fd`` (duplicated here) and ``directory``."""
        self._fds.append(os.dup(fd))
        self._directories.add(directory)

    def write_bytes(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        """Write the new file ``path`` (it must not exist) with ``data``."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # what the umask took away
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fds.append(fd)
        self._directories.add(path.parent)

    def start(self) -> None:
        """Start fsyncing the files written so far (not their directories: more entries may come)."""
        for fd in self._fds[self._started :]:
            self._in_thread(fd)
        self._started = len(self._fds)

    def sync(self) -> None:
        """Every file's data and every directory's entries on disk; the first error is raised.
        None of them needs another first: only the caller's rename needs them all."""
        self.start()
        directories = [os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) for d in sorted(self._directories)]
        try:
            for fd in directories:
                self._in_thread(fd)
            self._join()
        finally:
            for fd in directories:
                os.close(fd)
        if self._errors:
            raise self._errors[0]

    def close(self) -> None:
        self._join()
        while self._fds:
            os.close(self._fds.pop())

    def _in_thread(self, fd: int) -> None:
        thread = threading.Thread(target=self._fsync, args=(fd,), name="fsync", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _fsync(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            self._errors.append(exc)

    def _join(self) -> None:
        while self._threads:
            self._threads.pop().join()


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o644, staged: StagedFiles | None = None, durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` only if the block finishes without error.

    On any error (disk full included) the temporary file is removed and ``path`` keeps its
    previous content, if it had one. With ``staged`` (``path`` is in a staging directory),
    the file is renamed into place unsynced and made durable by ``staged.sync()``. Not
    ``durable``: renamed into place unsynced, for a file that checks itself and may be lost
    (a crash can leave the previous content, or a damaged file, under ``path``).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if staged is not None:
                staged.keep(handle.fileno(), path.parent)
            elif durable:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if staged is None and durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    with atomic_writer(path, mode, durable=durable) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


@dataclass(frozen=True)
class DiskSpace:
    """A filesystem's space in bytes, counted as ``df`` counts it."""

    size: int  # every block, the root-reserved ones included
    used: int
    available: int  # to unprivileged users: the reserved blocks are not theirs

    @property
    def used_ratio(self) -> float:
        """Used share of what users can have (``df``'s Use%): 1.0 when only reserved blocks are left."""
        usable = self.used + self.available
        return self.used / usable if usable else 0.0


def disk_space(path: Path) -> DiskSpace:
    """The space of the filesystem that holds ``path``; OSError when it cannot be read."""
    st = os.statvfs(path)
    return DiskSpace(
        size=st.f_blocks * st.f_frsize,
        used=(st.f_blocks - st.f_bfree) * st.f_frsize,
        available=st.f_bavail * st.f_frsize,
    )


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes, regular files) under ``root``; unreadable subdirectories are skipped."""
    total = files = 0
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                            files += 1
                    except OSError:
                        continue  # vanished while we walked
        except OSError:
            continue
    return total, files
