"""A child process joined to this one by two pipes: the backup's verifier, the restore's helper."""

from __future__ import annotations

import os
from collections.abc import Callable

from mlwarden.interrupts import deferred_interrupts


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
