"""The immutable snapshot a scrape returns, rendered once per collection.

Each collector's families are rendered to exposition text when that collector finishes a
pass; the snapshot is the concatenation of those parts plus the per-collector success,
duration and freshness families. A scrape reads one attribute and writes its bytes: no
locks, no NVML, no formatting on the scrape path.
"""

from __future__ import annotations

import functools
import gzip
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from mlwarden.exporter.collectors.base import Collected
from mlwarden.exporter.exposition import Renderer, gauge, render

# The classic text format (what Prometheus 2.x and promtool expect).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STALE_AFTER_INTERVALS = 3

__all__ = ["CONTENT_TYPE", "Snapshot", "SnapshotStore", "render"]


@dataclass(frozen=True)
class CollectorState:
    interval: float
    body: bytes = b""
    success: bool = False
    duration: float = 0.0
    last_success: float | None = None  # Unix time, for the metric
    last_success_monotonic: float | None = None  # for /healthz, immune to clock steps


@dataclass(frozen=True)
class Snapshot:
    body: bytes

    @functools.cached_property
    def gzipped(self) -> bytes:
        """The body gzip-compressed, made at the first scrape that asks and then shared by all."""
        return gzip.compress(self.body, compresslevel=6, mtime=0)


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
        self._renderers = {name: Renderer() for name in self._states}
        self._own = Renderer()  # the success, duration and freshness families; used under the lock
        build = gauge("mlwarden_exporter_build_info", "The exporter's version; the value is always 1.", labels=["version"])
        build.add_metric([version], 1)
        self._build_info = render([build])
        self.snapshot = Snapshot(self._assemble())

    def publish(self, name: str, collected: Collected, duration: float) -> None:
        """A collector finished a pass: render its families once and rebuild the snapshot."""
        body = self._renderers[name].render(collected.families)  # only this collector's thread renders with it
        with self._lock:
            state = self._states[name]
            if collected.success:
                state = replace(state, last_success=self._wall(), last_success_monotonic=self._monotonic())
            self._states[name] = replace(state, body=body, success=collected.success, duration=duration)
            self.snapshot = Snapshot(self._assemble())

    def mark_stale(self, name: str) -> None:
        """A pass is overdue (a hung NVML call): drop its data and report failure until it returns."""
        with self._lock:
            self._states[name] = replace(self._states[name], body=b"", success=False)
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

    def _assemble(self) -> bytes:
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
        parts = [state.body for state in self._states.values()]
        return b"".join([*parts, self._own.render([success, duration, last]), self._build_info])
