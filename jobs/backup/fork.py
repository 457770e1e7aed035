"""A child process joined to this one by two pipes: the backup's verifier, the restore's helper."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from mlwarden.interrupts import deferred_interrupts
from mlwarden.libc import libc

_PR_SET_PDEATHSIG = 1  # prctl(2)


def fork_with_pipes(child: Callable[[int, int], int], keep: Callable[[int, int, int], None]) -> None:
    """Fork; in the child, ``child(from_parent, to_parent)``, whose result is its exit status
    (it never returns into the caller's code, so never runs its cleanup); in this process,
    ``keep(pid, to_child, from_child)``.

    A SIGTERM or SIGINT handled during the fork would raise inside an at-fork handler
    (logging's), where the exception is printed and dropped: a backup once went on to the
    end that way. It is noted instead, and raised once ``keep`` has the child, so that the
    caller's cleanup can end it."""
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    with deferred_interrupts():
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(to_child_w)
                os.close(from_child_r)
                status = child(to_child_r, from_child_w)
            finally:
                os._exit(status)
        os.close(to_child_r)
        os.close(from_child_w)
        keep(pid, to_child_w, from_child_r)


def die_with_parent() -> None:
    """In a child: the kernel kills it (SIGKILL) when the thread that forked it ends, a kill -9
    of the parent included. The caller checks ``os.getppid()`` afterwards: a parent that died
    before this call is not watched."""
    libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
