"""The few system calls the planner and the deleter share, all relative to a directory fd.

Every open uses ``O_NOFOLLOW``: a path component swapped for a symlink makes the call fail
instead of leading out of the tree.

A mount point is recognised by its mount ID, not its device number: a bind mount of a
directory on the same filesystem has the root's ``st_dev`` but a mount ID of its own.
Python 3.11 has no ``os.statx``, so :func:`mount_id` calls glibc's ``statx`` through ctypes
(``STATX_MNT_ID``, Linux 5.8); where the kernel or libc lacks it, the ``mnt_id`` line of
``/proc/self/fdinfo/N`` (Linux 3.15) gives the same number, the first field of
``/proc/self/mountinfo``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Callable

from mlwarden.libc import libc

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


_AT_EMPTY_PATH = 0x1000
_STATX_MNT_ID = 0x1000
_STATX_SIZE = 256  # struct statx, reserved space included
_STATX_MNT_ID_OFFSET = 144  # stx_mnt_id: after the masks, ids, mode, sizes and four timestamps


def _libc_statx() -> Callable[..., int] | None:
    try:
        function = libc().statx
    except (AttributeError, OSError):  # a libc older than glibc 2.28
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)
    function.restype = ctypes.c_int
    return function


_statx = _libc_statx()
# One buffer reused by every call (the cleanup runs one thread per process), read in place.
_statx_buffer = ctypes.create_string_buffer(_STATX_SIZE)
_statx_mask = ctypes.c_uint32.from_buffer(_statx_buffer, 0)
_statx_mount_id = ctypes.c_uint64.from_buffer(_statx_buffer, _STATX_MNT_ID_OFFSET)


def mount_id(fd: int) -> int:
    """The ID of the mount that the open file ``fd`` lies on."""
    if _statx is not None:
        if _statx(fd, b"", _AT_EMPTY_PATH, _STATX_MNT_ID, _statx_buffer) != 0:
            code = ctypes.get_errno()
            if code != errno.ENOSYS:
                raise OSError(code, os.strerror(code))
        elif _statx_mask.value & _STATX_MNT_ID:
            return _statx_mount_id.value
    return fdinfo_mount_id(fd)


def fdinfo_mount_id(fd: int) -> int:
    """The mount ID as ``/proc/self/fdinfo`` gives it, for kernels whose statx lacks it."""
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
        for line in info:
            key, _, value = line.partition(":")
            if key == "mnt_id":
                return int(value)
    raise OSError(errno.ENOTSUP, f"no mount ID for fd {fd}: neither statx nor /proc/self/fdinfo gives one")
