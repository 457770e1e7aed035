"""The immutable snapshot a scrape returns, rendered at most once per collection.

A collector's pass leaves its metric families in the snapshot; they are rendered to exposition
text once, and the text is then shared by every later scrape until that collector's next pass.
Collection runs every interval whether or not anyone scrapes, but formatting some 900 series every
second for nobody was half of an idle exporter's CPU. So a pass is rendered when it is published only
while scrapes come at least as often as passes (the snapshot it replaces was scraped): then in the
collector's thread, and the previous snapshot, complete, is served until the new one is made.
Otherwise the first scrape that asks renders it, in the server's worker thread, never on the event
loop. With Prometheus scraping every 15 s that is about twice per scrape instead of fifteen times.

The gzip encoding is made the same way, from each collector's part compressed once (raw deflate
blocks that join into one stream), so a pass that changed one collector's part compresses that part
only. The snapshot is the concatenation of the collectors' parts plus the per-collector success,
duration and freshness families. A scrape touches no NVML and no collector state.
"""

from __future__ import annotations

import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

from mlwarden.exporter.collectors.base import Collected
from mlwarden.exporter.exposition import Family, Renderer, gauge, render

# The classic text format (what Prometheus 2.x and promtool expect).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STALE_AFTER_INTERVALS = 3

__all__ = ["CONTENT_TYPE", "Snapshot", "SnapshotStore", "render"]


class _Part:
    """One pass's families (or what makes them), rendered on first use with the renderer of the collector that made them.

    A collector's renderer remembers the label text of its previous render, so it must not render
    two parts at once: its lock is shared by all the parts it renders.
    """

    __slots__ = ("_families", "_renderer", "_lock", "_body", "_deflated")

    def __init__(self, families: Sequence[Family] | Callable[[], Sequence[Family]], renderer: Renderer, lock: threading.Lock) -> None:
        self._families = families
        self._renderer = renderer
        self._lock = lock
        self._body: bytes | None = None
        self._deflated: bytes | None = None

    @classmethod
    def rendered(cls, body: bytes) -> _Part:
        """A part whose text is already known."""
        part = cls((), _NO_RENDERER, threading.Lock())
        part._body = body
        return part

    def render(self) -> bytes:
        body = self._body
        if body is None:
            with self._lock:
                body = self._body
                if body is None:
                    families = self._families
                    body = self._body = self._renderer.render(families() if callable(families) else families)
                    self._families = ()  # the text is all that is needed from now on
        return body

    def deflated(self) -> bytes:
        """The text as raw deflate blocks that end byte-aligned and not final, so that the parts of a
        snapshot join into one stream: each part is compressed once, not once per snapshot it is in."""
        deflated = self._deflated
        if deflated is None:
            body = self.render()
            with self._lock:
                deflated = self._deflated
                if deflated is None:
                    compressor = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
                    deflated = self._deflated = compressor.compress(body) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return deflated


_NO_RENDERER = Renderer()  # for parts that never render
_EMPTY = _Part.rendered(b"")
_GZIP_LEVEL = 6
# RFC 1952: magic, deflate, no flags, no mtime (so equal bodies give equal bytes), no extra flags, unknown OS
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_LAST_BLOCK = b"\x03\x00"  # an empty final block (fixed Huffman codes): ends the joined deflate stream


class Snapshot:
    """What a scrape returns; its text is made once (at publication or at the first scrape) and then shared."""

    def __init__(self, parts: Sequence[_Part] | bytes) -> None:
        self._parts = (_Part.rendered(parts),) if isinstance(parts, bytes) else tuple(parts)
        self._body: bytes | None = None
        self._gzipped: bytes | None = None
        self._lock = threading.Lock()
        self.scraped = False  # a scrape asked for it: the next one is rendered when it is published
        self.gzip_asked = False  # ... and compressed then too

    def ready(self, gzipped: bool) -> bytes | None:
        """The answer for a scrape if it is made already, else None: never formats or compresses anything."""
        self.scraped = True
        if gzipped:
            self.gzip_asked = True
            return self._gzipped
        return self._body

    def render(self, gzipped: bool) -> bytes:
        """The text, or its gzip encoding, made on the first call and shared by every later one."""
        with self._lock:
            if self._body is None:
                self._body = b"".join([part.render() for part in self._parts])
            if not gzipped:
                return self._body
            if self._gzipped is None:
                body = self._body
                trailer = struct.pack("<II", zlib.crc32(body), len(body) & 0xFFFFFFFF)
                self._gzipped = b"".join([_GZIP_HEADER, *(part.deflated() for part in self._parts), _LAST_BLOCK, trailer])
            return self._gzipped

    @property
    def body(self) -> bytes:
        self.scraped = True
        return self.render(False)

    @property
    def gzipped(self) -> bytes:
        self.scraped = self.gzip_asked = True
        return self.render(True)


@dataclass(frozen=True)
class CollectorState:
    interval: float
    part: _Part = _EMPTY
    success: bool = False
    duration: float = 0.0
    last_success: float | None = None  # Unix time, for the metric
    last_success_monotonic: float | None = None  # for /healthz, immune to clock steps


class SnapshotStore:
    def __init__(
        self,
        collectors: Sequence[tuple[str, float]],
        version: str,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._started = monotonic()
        self._lock = threading.Lock()
        self._states = {name: CollectorState(interval=interval) for name, interval in collectors}
        self._renderers = {name: (Renderer(), threading.Lock()) for name in self._states}
        self._own = (Renderer(), threading.Lock())  # for the success, duration and freshness families
        build = gauge("mlwarden_exporter_build_info", "The exporter's version; the value is always 1.", labels=["version"])
        build.add_metric([version], 1)
        self._build_info = _Part.rendered(render([build]))
        self._sequence = self._installed = 0
        self.snapshot = Snapshot(self._assemble())

    def publish(self, name: str, collected: Collected, duration: float) -> None:
        """A collector finished a pass: its families replace its previous ones in a new snapshot."""
        part = _Part(collected.families, *self._renderers[name])
        with self._lock:
            state = self._states[name]
            last, last_monotonic = state.last_success, state.last_success_monotonic
            if collected.success:
                last, last_monotonic = self._wall(), self._monotonic()
            # made directly: dataclasses.replace, twice a publish, was a fifth of what publishing cost
            self._states[name] = CollectorState(state.interval, part, collected.success, duration, last, last_monotonic)
            snapshot, sequence, previous = self._next()
        if previous.scraped:
            # scrapes come at least as often as passes (or a burst of them is under way): render here, in the
            # collector's thread, while scrapes are still answered with the previous snapshot, complete
            snapshot.render(previous.gzip_asked)
        self._install(snapshot, sequence)

    def mark_stale(self, name: str) -> None:
        """A pass is overdue (a hung NVML call): drop its data and report failure until it returns."""
        with self._lock:
            self._states[name] = replace(self._states[name], part=_EMPTY, success=False)
            snapshot, sequence, _ = self._next()
        self._install(snapshot, sequence)

    def _next(self) -> tuple[Snapshot, int, Snapshot]:
        """A snapshot of the states as they are now, its number, and the snapshot served now; under the lock."""
        self._sequence += 1
        return Snapshot(self._assemble()), self._sequence, self.snapshot

    def _install(self, snapshot: Snapshot, sequence: int) -> None:
        """Serve ``snapshot`` unless one made later is served already (two collectors publish at once)."""
        with self._lock:
            if sequence > self._installed:
                self._installed = sequence
                self.snapshot = snapshot

    def stale_collectors(self) -> list[str]:
        """Collectors without a successful pass within three of their intervals (counted from start)."""
        now = self._monotonic()
        stale = []
        for name, state in self._states.items():
            since = state.last_success_monotonic or self._started
            if now - since > STALE_AFTER_INTERVALS * state.interval:
                stale.append(name)
        return stale

    def _assemble(self) -> list[_Part]:
        """The snapshot's parts: the collectors', then their success, duration and freshness, made into families
        only if the snapshot is rendered (most snapshots of an unscraped exporter never are)."""
        states = tuple(self._states.items())
        own = _Part(partial(_store_families, states), *self._own)
        return [*(state.part for _, state in states), own, self._build_info]


def _store_families(states: Sequence[tuple[str, CollectorState]]) -> list[Family]:
    success = gauge("mlwarden_exporter_collector_success", "1 when the collector's last pass succeeded, else 0.", labels=["collector"])
    duration = gauge("mlwarden_exporter_collector_duration_seconds", "How long the collector's last pass took, in seconds.", labels=["collector"])
    last = gauge(
        "mlwarden_exporter_last_collection_timestamp_seconds",
        "When the collector last completed a successful pass (Unix time).", labels=["collector"],
    )
    for name, state in states:
        success.add_metric([name], 1 if state.success else 0)
        duration.add_metric([name], state.duration)
        if state.last_success is not None:
            last.add_metric([name], state.last_success)
    return [success, duration, last]
