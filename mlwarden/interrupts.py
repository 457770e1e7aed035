"""SIGTERM ends a job the way Ctrl-C does.

systemd stops a unit (``systemctl stop``, ``TimeoutStartSec``) with SIGTERM, whose default
action kills the process on the spot: no ``finally`` runs, nothing is pushed. Within
:func:`sigterm_interrupts`, SIGTERM raises :class:`KeyboardInterrupt` instead, so a job
stops between two steps, its clean-up code runs, its failure is pushed and ``mlwarden``
exits with the interrupted status (130), exactly as after SIGINT.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
