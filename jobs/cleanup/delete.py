"""Execute a cleanup plan without ever leaving the root.

Files are removed with ``unlinkat`` relative to directory fds that were opened one
component at a time from the root with ``O_NOFOLLOW``, and every directory is checked to
be on the root's filesystem. Right before each unlink the entry is opened again
(``O_NOFOLLOW``): if it is no longer the same regular file (inode), was modified since
planning (mtime), or is locked, it is skipped. Locks are probed here, at the moment of
deletion, so a lock taken after planning still protects a file. A directory swapped for a
symlink between planning and deletion therefore makes the open fail; nothing outside the
root can be reached.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import Counter
from dataclasses import dataclass, field

from mlwarden.jobs.cleanup import fileops
from mlwarden.jobs.cleanup.plan import RootPlan
from mlwarden.terminal import Progress

log = logging.getLogger(__name__)


class RootChanged(RuntimeError):
    """The root is no longer the directory that was planned."""


@dataclass
class DeleteResult:
    files: int = 0
    bytes: int = 0
    directories: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    errors: int = 0


class _RateLimit:
    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self.started = time.monotonic()
        self.count = 0

    def wait(self) -> None:
        if self.interval:
            self.count += 1
            delay = self.started + self.count * self.interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)


class _DirectoryChain:
    """Open directory fds along the current path, reused while consecutive items share it."""

    def __init__(self, root_fd: int, device: int) -> None:
        self.device = device
        self.names: list[str] = []
        self.fds: list[int] = [root_fd]
        self.current: str | None = ""

    def open(self, relative_dir: str) -> int:
        if relative_dir == self.current:  # the common case: the same directory as the last file
            return self.fds[-1]
        # Forget the current directory until the whole path is open: after a failure part
        # way, the fd on top is an ancestor and must never be used for this directory.
        self.current = None
        wanted = relative_dir.split("/") if relative_dir else []
        common = 0
        while common < min(len(wanted), len(self.names)) and wanted[common] == self.names[common]:
            common += 1
        self._close_from(common)
        for name in wanted[common:]:
            fd = fileops.open_directory(name, self.fds[-1])
            self.names.append(name)
            self.fds.append(fd)
            if os.fstat(fd).st_dev != self.device:
                raise OSError(errno.EXDEV, "directory is now on another filesystem", relative_dir)
        self.current = relative_dir
        return self.fds[-1]

    def _close_from(self, depth: int) -> None:
        while len(self.names) > depth:
            self.names.pop()
            os.close(self.fds.pop())

    def close(self) -> None:
        self._close_from(0)
        self.current = ""


def execute(plan: RootPlan, rate_limit: float = 0.0, progress: Progress | None = None) -> DeleteResult:
    result = DeleteResult()
    root_fd = fileops.open_directory(str(plan.root))
    try:
        st = os.fstat(root_fd)
        if (st.st_dev, st.st_ino) != (plan.device, plan.inode):
            raise RootChanged(f"{plan.root} is no longer the directory that was planned")
        chain = _DirectoryChain(root_fd, plan.device)
        try:
            _delete_files(plan, chain, _RateLimit(rate_limit), result, progress)
            _remove_directories(plan, chain, result)
        finally:
            chain.close()
    finally:
        os.close(root_fd)
    return result


def _delete_files(plan: RootPlan, chain: _DirectoryChain, limit: _RateLimit, result: DeleteResult, progress: Progress | None) -> None:
    for item in plan.files:
        name = item.name
        try:
            dir_fd = chain.open(item.directory)
            reason = _why_not(name, dir_fd, item.inode, plan)
            if reason is not None:
                result.skipped[reason] += 1
                log.info("kept %s/%s: %s since planning", plan.root, item.relative, reason)
                continue
            limit.wait()
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            result.skipped["vanished"] += 1
            continue
        except OSError as exc:
            result.errors += 1
            log.warning("could not delete %s/%s: %s", plan.root, item.relative, exc.strerror)
            continue
        result.files += 1
        result.bytes += item.size
        if progress is not None:
            progress.advance(item.size)


def _why_not(name: str, dir_fd: int, inode: int, plan: RootPlan) -> str | None:
    try:
        st, locked = fileops.probe_file(name, dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "replaced by a symlink"
        raise
    if not stat.S_ISREG(st.st_mode) or st.st_ino != inode:
        return "replaced"
    if st.st_mtime >= plan.cutoff:
        return "modified"
    if locked:
        return "locked"
    return None


def _remove_directories(plan: RootPlan, chain: _DirectoryChain, result: DeleteResult) -> None:
    for relative in plan.directories:  # children before parents
        parent, _, name = relative.rpartition("/")
        try:
            os.rmdir(name, dir_fd=chain.open(parent))
        except OSError as exc:
            # Not empty any more (something was written or kept meanwhile): keep it.
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                log.warning("could not remove directory %s/%s: %s", plan.root, relative, exc.strerror)
            continue
        result.directories += 1
