"""This process's C library, for the few Linux calls Python's ``os`` module lacks (syncfs,
sync_file_range, statx, prctl, mallopt, malloc_trim). Loaded once; a caller that can do
without its call catches the ``OSError`` or ``AttributeError`` of a libc that lacks it."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
