"""The immutable snapshot a scrape returns, rendered at most once per collection.

A collector's pass leaves its metric families in the snapshot; they are rendered to exposition
text when a scrape first asks for them, once, and the text is then shared by every later scrape
until that collector's next pass. Collection runs every interval whether or not anyone scrapes,
but formatting some 900 series every second for nobody was half of an idle exporter's CPU; with
Prometheus scraping every 15 s it is done about twice per scrape instead of fifteen times (the pass
after a scraped snapshot is rendered at once, in the collector's thread: scrapers that come as often as
passes, or more, then never wait for a rendering in the server's event loop). The snapshot
is the concatenation of the collectors' parts plus the per-collector success, duration and
freshness families. A scrape touches no NVML and no collector state.
"""

from __future__ import annotations

import functools
import gzip
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from mlwarden.exporter.collectors.base import Collected
from mlwarden.exporter.exposition import Family, Renderer, gauge, render

# The classic text format (what Prometheus 2.x and promtool expect).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STALE_AFTER_INTERVALS = 3

__all__ = ["CONTENT_TYPE", "Snapshot", "SnapshotStore", "render"]


class _Part:
    """One pass's families, rendered on first use with the renderer of the collector that made them.

    A collector's renderer remembers the label text of its previous render, so it must not render
    two parts at once: its lock is shared by all the parts it renders.
    """

    __slots__ = ("_families", "_renderer", "_lock", "_body")

    def __init__(self, families: Sequence[Family], renderer: Renderer, lock: threading.Lock) -> None:
        self._families = families
        self._renderer = renderer
        self._lock = lock
        self._body: bytes | None = None

    @classmethod
    def rendered(cls, body: bytes) -> _Part:
        """A part whose text is already known."""
        part = cls((), _NO_RENDERER, _NO_LOCK)
        part._body = body
        return part

    def render(self) -> bytes:
        body = self._body
        if body is None:
            with self._lock:
                body = self._body
                if body is None:
                    body = self._body = self._renderer.render(self._families)
                    self._families = ()  # the text is all that is needed from now on
        return body


_NO_RENDERER, _NO_LOCK = Renderer(), threading.Lock()  # for parts that never render
_EMPTY = _Part.rendered(b"")


class Snapshot:
    """What a scrape returns; its text is assembled at the first scrape that asks and then shared."""

    def __init__(self, parts: Sequence[_Part] | bytes) -> None:
        self._parts = (_Part.rendered(parts),) if isinstance(parts, bytes) else tuple(parts)
        self.scraped = False

    @functools.cached_property
    def body(self) -> bytes:
        self.scraped = True
        return b"".join([part.render() for part in self._parts])

    @functools.cached_property
    def gzipped(self) -> bytes:
        """The body gzip-compressed, made at the first scrape that asks and then shared by all."""
        return gzip.compress(self.body, compresslevel=6, mtime=0)


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
        self.snapshot = Snapshot(self._assemble())

    def publish(self, name: str, collected: Collected, duration: float) -> None:
        """A collector finished a pass: its families replace its previous ones in a new snapshot."""
        part = _Part(collected.families, *self._renderers[name])
        if self.snapshot.scraped:
            # scrapes come at least as often as passes (or a burst of them is under way): render here, in
            # the collector's thread, as a pass always did, not in the server's event loop while it serves
            part.render()
        with self._lock:
            state = self._states[name]
            if collected.success:
                state = replace(state, last_success=self._wall(), last_success_monotonic=self._monotonic())
            self._states[name] = replace(state, part=part, success=collected.success, duration=duration)
            self.snapshot = Snapshot(self._assemble())

    def mark_stale(self, name: str) -> None:
        """A pass is overdue (a hung NVML call): drop its data and report failure until it returns."""
        with self._lock:
            self._states[name] = replace(self._states[name], part=_EMPTY, success=False)
            self.snapshot = Snapshot(self._assemble())

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
        success = gauge("mlwarden_exporter_collector_success", "1 when the collector's last pass succeeded, else 0.", labels=["collector"])
        duration = gauge("mlwarden_exporter_collector_duration_seconds", "How long the collector's last pass took, in seconds.", labels=["collector"])
        last = gauge(
            "mlwarden_exporter_last_collection_timestamp_seconds",
            "When the collector last completed a successful pass (Unix time).", labels=["collector"],
        )
        for name, state in self._states.items():
            success.add_metric([name], 1 if state.success else 0)
            duration.add_metric([name], state.duration)
            if state.last_success is not None:
                last.add_metric([name], state.last_success)
        parts = [state.part for state in self._states.values()]
        return [*parts, _Part([success, duration, last], *self._own), self._build_info]
