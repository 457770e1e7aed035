"""The few system calls the planner and the deleter share, all relative to a directory fd.

Every open uses ``O_NOFOLLOW``: a path component swapped for a symlink makes the call fail
instead of leading out of the tree.
"""

from __future__ import annotations

import fcntl
import os

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PROBE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def open_directory(name: str, dir_fd: int | None = None) -> int:
    return os.open(name, DIRECTORY_FLAGS, dir_fd=dir_fd)


def fd_is_locked(fd: int) -> bool:
    """True when another process holds a BSD lock (shared or exclusive) on the file.

    systemd-tmpfiles skips what is locked; we probe with LOCK_EX|LOCK_NB, which conflicts
    with both kinds of lock, so a reader's LOCK_SH protects a file too. Our own probe lock
    is released at once.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def probe_file(name: str, dir_fd: int) -> tuple[os.stat_result, bool]:
    """The file's status and whether it is locked, opening it without following a symlink.

    Opening a symlink fails with ``ELOOP``. The probe lock goes away with the close, which
    saves the unlock call on the hot path of deletion.
    """
    fd = os.open(name, PROBE_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return st, True
        return st, False
    finally:
        os.close(fd)
