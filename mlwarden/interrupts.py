"""SIGTERM ends a job the way Ctrl-C does, and neither cuts a step in half.

systemd stops a unit (``systemctl stop``, ``TimeoutStartSec``) with SIGTERM, whose default
action kills the process on the spot: no ``finally`` runs, nothing is pushed. Within
:func:`sigterm_interrupts`, SIGTERM raises :class:`Terminated`, a ``KeyboardInterrupt``, so
every clean-up that handles Ctrl-C runs for it too; ``mlwarden`` then exits 143 (128 +
SIGTERM) instead of 130 (128 + SIGINT). Further SIGTERMs are ignored so that they cannot cut
the clean-up short; a SIGKILL can.

A KeyboardInterrupt can still land between two lines that belong together (a file removed,
then counted). Within :func:`deferred_interrupts`, SIGINT and SIGTERM are only noted, and the
interrupt is raised where the caller says stopping is safe.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived."""


def _interruption(signum: int) -> KeyboardInterrupt:
    name = signal.Signals(signum).name
    return Terminated(name) if signum == signal.SIGTERM else KeyboardInterrupt(name)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _interruption(signum)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deferred_interrupts() -> Iterator[Callable[[], None]]:
    """Yields ``stop_point``: call it where stopping leaves nothing half done; it raises
    KeyboardInterrupt (:class:`Terminated` for SIGTERM) there if SIGINT or SIGTERM came since.
    A signal still pending at the end of the block is raised on leaving it."""
    received: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    def stop_point() -> None:
        if received:
            raise _interruption(received[0])

    previous = {signum: signal.signal(signum, note) for signum in _STOP_SIGNALS}
    try:
        yield stop_point
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    stop_point()
