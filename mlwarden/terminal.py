"""Progress for long work: a live bar on a terminal, a few plain log lines under cron or systemd."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO


def interactive(stream: TextIO | None = None) -> bool:
    """True when a person is watching: stderr is a TTY and we are not a systemd unit."""
    stream = stream or sys.stderr
    if os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"):
        return False
    return hasattr(stream, "isatty") and stream.isatty()


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


class Progress:
    """Tracks done/total units (bytes by default) and shows them.

    On a terminal it redraws one line at most every ``redraw_seconds``; otherwise it logs
    a line every ``log_every_seconds`` so that cron mail and the journal stay short.
    """

    def __init__(
        self,
        label: str,
        total: float | None,
        *,
        unit: str = "bytes",
        stream: TextIO | None = None,
        logger: logging.Logger | None = None,
        redraw_seconds: float = 0.2,
        log_every_seconds: float = 60.0,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0.0
        self._stream = stream or sys.stderr
        self._tty = interactive(self._stream)
        self._log = logger or logging.getLogger("mlwarden.progress")
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._redraw = redraw_seconds if self._tty else log_every_seconds

    def advance(self, amount: float) -> None:
        self.done += amount
        now = time.monotonic()
        if now - self._last_draw >= self._redraw:
            self._last_draw = now
            self._show(final=False)

    def finish(self) -> None:
        self._show(final=True)

    def _fmt(self, value: float) -> str:
        return human_bytes(value) if self.unit == "bytes" else f"{value:,.0f} {self.unit}"

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = self.done / elapsed
        rate_text = f"{human_bytes(rate)}/s" if self.unit == "bytes" else f"{rate:,.0f} {self.unit}/s"
        if self.total:
            share = min(self.done / self.total, 1.0)
            bar = "#" * int(share * 30)
            return f"{self.label} [{bar:<30}] {share:6.1%} {self._fmt(self.done)}/{self._fmt(self.total)} {rate_text}"
        return f"{self.label} {self._fmt(self.done)} {rate_text}"

    def _show(self, final: bool) -> None:
        if self._tty:
            self._stream.write("\r\x1b[2K" + self._line() + ("\n" if final else ""))
            self._stream.flush()
        else:
            self._log.info("%s", self._line())
