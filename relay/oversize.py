"""Webhook bodies above the size limit: keep the alerts that fit, count the rest.

Alertmanager does not retry a 4xx, so answering 413 to a large group lost the notification
for good. Instead the body is read to its end (keeping at most ``limit`` bytes of it, plus the
few fields Alertmanager writes after the alerts), and cut after the last alert that ends
within the limit. Its structure is followed only once the limit is crossed, so bodies of the
usual size cost nothing extra.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

TAIL_LIMIT = 1024 * 1024  # what follows the alerts array: group labels, common labels and annotations, group key
_OUTSIDE = re.compile(rb'[{}\[\]":,]')
_INSIDE = re.compile(rb'["\\]')


@dataclass(frozen=True)
class Trimmed:
    body: bytes
    omitted_alerts: int = 0  # alerts left out to fit the limit
    dropped_bytes: int = 0


class _Scanner:
    """Follows the JSON of a webhook body, chunk by chunk: where each alert of the top-level
    ``alerts`` array ends, and where that array ends. Needs only the bytes, not a parse."""

    def __init__(self) -> None:
        self.offset = 0  # absolute position of the next byte fed
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.key = bytearray()  # the current string while at depth 1 (a top-level key, perhaps)
        self.last_string = b""
        self.current_key = b""
        self.in_alerts = False
        self.alerts = 0  # complete alerts seen
        self.alert_ends: list[int] = []  # absolute end offsets, while within the kept part
        self.alerts_end: int | None = None  # absolute offset of the alerts array's "]"

    def feed(self, chunk: bytes, remember_until: int) -> None:
        pos = 0
        while pos < len(chunk):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                    pos += 1
                    continue
                found = _INSIDE.search(chunk, pos)
                end = found.start() if found else len(chunk)
                if self.depth == 1 and len(self.key) < 16:
                    self.key += chunk[pos:end][: 16 - len(self.key)]
                if not found:
                    break
                if chunk[end] == 0x5C:  # backslash
                    self.escaped = True
                else:
                    self.in_string = False
                    self.last_string = bytes(self.key)
                pos = end + 1
                continue
            found = _OUTSIDE.search(chunk, pos)
            if not found:
                break
            char, pos = chunk[found.start()], found.start() + 1
            absolute = self.offset + pos
            if char == 0x22:  # quote
                self.in_string = True
                self.key.clear()
            elif char == 0x3A and self.depth == 1:  # colon after a top-level key
                self.current_key = self.last_string
            elif char in (0x7B, 0x5B):  # { [
                if char == 0x5B and self.depth == 1 and self.current_key == b"alerts":
                    self.in_alerts = True
                self.depth += 1
            elif char in (0x7D, 0x5D):  # } ]
                self.depth -= 1
                if self.in_alerts and char == 0x7D and self.depth == 2:
                    self.alerts += 1
                    if absolute <= remember_until:
                        self.alert_ends.append(absolute)
                elif self.in_alerts and char == 0x5D and self.depth == 1:
                    self.in_alerts = False
                    self.alerts_end = absolute - 1
        self.offset += len(chunk)


async def read_webhook(chunks: AsyncIterator[bytes], limit: int) -> Trimmed | None:
    """The body, or above ``limit`` its alerts that fit; None when not even one alert fits."""
    kept = bytearray()
    scanner: _Scanner | None = None
    tail = bytearray()
    tail_overflow = False
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if scanner is None:
            kept += chunk
            if len(kept) <= limit:
                continue
            scanner = _Scanner()  # crossed the limit: follow the structure from the start
            chunk = bytes(kept)
            del kept[limit:]
        start = scanner.offset
        scanner.feed(chunk, limit)
        if scanner.alerts_end is not None and scanner.alerts_end >= limit and not tail_overflow:
            tail += chunk[max(0, scanner.alerts_end - start):]
            tail_overflow = len(tail) > TAIL_LIMIT
    if scanner is None:
        return Trimmed(bytes(kept))
    if not scanner.alert_ends or scanner.alerts_end is None or scanner.alerts_end < limit:
        return None  # one alert alone is over the limit, or the body is large outside the alerts
    cut = scanner.alert_ends[-1]
    rest = bytes(tail) if tail and not tail_overflow else b"]}"
    return Trimmed(bytes(kept[:cut]) + rest, scanner.alerts - len(scanner.alert_ends), total - cut - len(rest))
