"""Execute a cleanup plan without ever leaving the root.

Files are removed with ``unlinkat`` relative to directory fds that were opened one
component at a time from the root with ``O_NOFOLLOW``, and every directory is checked to
be on the root's mount (mount ID, so neither another filesystem nor a bind mount is
entered). Right before each unlink the entry is opened again (``O_NOFOLLOW``): if it is no
longer the same regular file (inode), was modified since planning (mtime), or is locked,
it is skipped. Locks are probed here, at the moment of deletion, so a lock taken after
planning still protects a file. A directory swapped for a symlink between planning and
deletion therefore makes the open fail; nothing outside the root can be reached.

An open directory fd follows its directory wherever it is moved, so before each batch of
deletions the directory is checked to be still under the root: each link of the fd chain
from the root down must still name the same directory (device and inode). A batch is at
most :data:`VERIFY_EVERY` files of one directory, or a single file under ``--rate-limit``.
A directory moved out of the root during the run is left alone from then on, logged and
counted.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from mlwarden.jobs.cleanup import fileops
from mlwarden.jobs.cleanup.plan import RootPlan

from mlwarden.interrupts import deferred_interrupts
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


# Files deleted in one directory between two checks that it is still under the root. A
# check costs one lstat per level of depth, about as much as the rest of a deletion (five
# system calls), so checking every file would nearly double the CPU time of the phase;
# every 16th costs a few percent and bounds what a moved directory can lose to 15 files.
VERIFY_EVERY = 16

# Why a planned file was kept at the moment of deletion (a label of the skipped-files metric).
SKIPPED_REPLACED = "replaced"
SKIPPED_SYMLINK = "replaced by a symlink"
SKIPPED_MODIFIED = "modified"
SKIPPED_LOCKED = "locked"
SKIPPED_VANISHED = "vanished"
SKIPPED_MOVED = "directory moved"
SKIPPED_MOUNT = "a mount point"
SKIP_REASONS = (
    SKIPPED_REPLACED, SKIPPED_SYMLINK, SKIPPED_MODIFIED, SKIPPED_LOCKED, SKIPPED_VANISHED, SKIPPED_MOVED, SKIPPED_MOUNT,
)


class MovedOut(Exception):
    """A directory of the chain is no longer where the plan found it, under the root."""

    def __init__(self, relative: str) -> None:
        super().__init__(relative)
        self.relative = relative


class _DirectoryChain:
    """Open directory fds along the current path, reused while consecutive items share it."""

    def __init__(self, plan: RootPlan, root_fd: int, batch: int) -> None:
        self.plan = plan
        self.batch = batch
        self.unverified = 0  # deletions since the chain was last checked
        self.names: list[str] = []
        self.fds: list[int] = [root_fd]
        self.identities: list[tuple[int, int]] = [(plan.device, plan.inode)]
        self.current: str | None = ""

    def open(self, relative_dir: str) -> int:
        """The fd of ``relative_dir``, checked to be under the root right now."""
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
        self._check_root()
        self.verify()  # the directories kept open from the last path
        for name in wanted[common:]:
            fd = fileops.open_directory(name, self.fds[-1])
            self.names.append(name)
            self.fds.append(fd)
            st = os.fstat(fd)
            self.identities.append((st.st_dev, st.st_ino))
            if st.st_dev != self.plan.device or fileops.mount_id(fd) != self.plan.mount:
                raise OSError(errno.EXDEV, "directory is now a mount point", relative_dir)
        self.current = relative_dir
        return self.fds[-1]

    def before_unlink(self) -> None:
        """Count one deletion in the current directory, checking the chain first if a
        batch is complete."""
        if self.unverified >= self.batch:
            self.verify()
        self.unverified += 1

    def verify(self) -> None:
        """Raise :class:`MovedOut` unless every open directory is still linked where it was."""
        self.unverified = 0
        for depth, name in enumerate(self.names):
            try:
                st = os.lstat(name, dir_fd=self.fds[depth])
                linked = (st.st_dev, st.st_ino) == self.identities[depth + 1]
            except FileNotFoundError:
                linked = False
            if not linked:
                moved = "/".join(self.names[: depth + 1])
                self._close_from(depth)
                self.current = None
                raise MovedOut(moved)

    def _check_root(self) -> None:
        try:
            st = os.lstat(self.plan.root)
        except FileNotFoundError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != self.identities[0]:
            raise RootChanged(f"{self.plan.root} was moved or replaced during the cleanup")

    def _close_from(self, depth: int) -> None:
        while len(self.names) > depth:
            self.names.pop()
            self.identities.pop()
            os.close(self.fds.pop())

    def close(self) -> None:
        self._close_from(0)
        self.current = ""


class _Moved:
    """The directories found moved out of the root, and the planned entries below them."""

    def __init__(self, plan: RootPlan) -> None:
        self.root = plan.root
        self.prefixes: list[str] = []

    def add(self, relative: str) -> None:
        log.warning(
            "%s/%s is no longer where the plan found it (moved out of the root, renamed or removed "
            "during the cleanup): nothing more is deleted in it",
            self.root, relative,
        )
        self.prefixes.append(relative + "/")

    def holds(self, relative_dir: str) -> bool:
        path = relative_dir + "/"
        return any(path.startswith(prefix) for prefix in self.prefixes)


def execute(
    plan: RootPlan, rate_limit: float = 0.0, progress: Progress | None = None, result: DeleteResult | None = None,
) -> DeleteResult:
    """Delete what ``plan`` lists, counting into ``result`` (a new one by default) as it
    goes, so that an interrupted run still reports what it removed."""
    result = DeleteResult() if result is None else result
    root_fd = fileops.open_directory(str(plan.root))
    try:
        st = os.fstat(root_fd)
        if (st.st_dev, st.st_ino) != (plan.device, plan.inode) or fileops.mount_id(root_fd) != plan.mount:
            raise RootChanged(f"{plan.root} is no longer the directory that was planned")
        chain = _DirectoryChain(plan, root_fd, 1 if rate_limit > 0 else VERIFY_EVERY)
        moved = _Moved(plan)
        # SIGINT and SIGTERM stop the run between two deletions, never between an unlink
        # and its count: the metrics then say exactly what is gone.
        try:
            with deferred_interrupts() as stop_point:
                _delete_files(plan, chain, moved, _RateLimit(rate_limit), result, progress, stop_point)
                _remove_directories(plan, chain, moved, result, stop_point)
        except RootChanged as exc:  # during the run: keep the counts of what was done before
            log.error("cleanup of %s stopped: %s", plan.root, exc)
            result.errors += 1
        finally:
            chain.close()
    finally:
        os.close(root_fd)
    return result


def _delete_files(
    plan: RootPlan, chain: _DirectoryChain, moved: _Moved, limit: _RateLimit, result: DeleteResult, progress: Progress | None,
    stop_point: Callable[[], None],
) -> None:
    for item in plan.files:
        stop_point()
        name = item.name
        if moved.prefixes and moved.holds(item.directory):
            result.skipped[SKIPPED_MOVED] += 1
            continue
        try:
            dir_fd = chain.open(item.directory)
            reason = _why_not(name, dir_fd, item.inode, plan)
            if reason is not None:
                result.skipped[reason] += 1
                log.info("kept %s/%s: %s since planning", plan.root, item.relative, reason)
                continue
            limit.wait()
            chain.before_unlink()  # after the probe and the wait: as close to the unlink as it gets
            os.unlink(name, dir_fd=dir_fd)
        except MovedOut as exc:
            moved.add(exc.relative)
            result.skipped[SKIPPED_MOVED] += 1
            continue
        except FileNotFoundError:
            result.skipped[SKIPPED_VANISHED] += 1
            continue
        except OSError as exc:
            if exc.errno == errno.EBUSY:  # a file bind-mounted over the planned name: not ours to remove
                result.skipped[SKIPPED_MOUNT] += 1
                log.info("kept %s/%s: %s", plan.root, item.relative, SKIPPED_MOUNT)
                continue
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
            return SKIPPED_SYMLINK
        raise
    if not stat.S_ISREG(st.st_mode) or st.st_ino != inode:
        return SKIPPED_REPLACED
    if st.st_mtime >= plan.cutoff:
        return SKIPPED_MODIFIED
    if locked:
        return SKIPPED_LOCKED
    return None


def _remove_directories(
    plan: RootPlan, chain: _DirectoryChain, moved: _Moved, result: DeleteResult, stop_point: Callable[[], None],
) -> None:
    for relative in plan.directories:  # children before parents
        stop_point()
        parent, _, name = relative.rpartition("/")
        if moved.holds(relative):
            continue
        try:
            parent_fd = chain.open(parent)
            chain.verify()
            os.rmdir(name, dir_fd=parent_fd)
        except MovedOut as exc:
            moved.add(exc.relative)
            continue
        except OSError as exc:
            # Not empty any more (something was written or kept meanwhile): keep it.
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                log.warning("could not remove directory %s/%s: %s", plan.root, relative, exc.strerror)
            continue
        result.directories += 1
