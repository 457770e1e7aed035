"""SIGTERM ends a job the way Ctrl-C does, and neither cuts a step in half.

systemd stops a unit (``systemctl stop``, ``TimeoutStartSec``) with SIGTERM, whose default
action kills the process on the spot: no ``finally`` runs, nothing is pushed. Within
:func:`sigterm_interrupts`, SIGTERM raises :class:`KeyboardInterrupt` instead, so a job
stops, its clean-up code runs, its failure is pushed and ``mlwarden`` exits with the
interrupted status (130), exactly as after SIGINT.

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


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def deferred_interrupts() -> Iterator[Callable[[], None]]:
    """Yields ``stop_point``: call it where stopping leaves nothing half done; it raises
    KeyboardInterrupt there if SIGINT or SIGTERM came since. A signal still pending at the
    end of the block is raised on leaving it."""
    received: list[str] = []

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)

    def stop_point() -> None:
        if received:
            raise KeyboardInterrupt(received[0])

    previous = {signum: signal.signal(signum, note) for signum in _STOP_SIGNALS}
    try:
        yield stop_point
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    stop_point()
