"""SIGTERM ends a job the way Ctrl-C does.

systemd stops a unit (``systemctl stop``, ``TimeoutStartSec``) with SIGTERM, and SIGKILL only
later. Python's default for SIGTERM is to die on the spot: no partial work removed, no
failure pushed. Inside :func:`sigterm_interrupts`, SIGTERM raises :class:`Terminated`, a
``KeyboardInterrupt``, so every ``finally`` and cleanup that handles Ctrl-C runs for it too;
``mlwarden`` then exits 143 (128 + SIGTERM) instead of 130 (128 + SIGINT).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # Further SIGTERMs are ignored, so that they cannot cut the cleanup short; a SIGKILL can.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
