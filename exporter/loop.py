"""Background collection: one thread per collector, plus a watchdog for hung passes.

Each collector runs in its own thread at its own interval and publishes into the
:class:`SnapshotStore`. A pass that overruns its timeout (an NVML call that hangs) is
marked stale by the watchdog: its series disappear from the snapshot and its success is 0,
while scrapes keep answering from memory. The hung thread is not abandoned and no second
thread is started for that collector, so hung calls cannot pile up; when the call returns,
the collector carries on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from mlwarden.exporter.collectors.base import Collected, Collector
from mlwarden.exporter.snapshot import SnapshotStore

log = logging.getLogger(__name__)


class _Runner:
    def __init__(self, collector: Collector, store: SnapshotStore, stop: threading.Event, phase: float = 0.0) -> None:
        self.collector = collector
        self.phase = phase  # seconds before the first pass
        self._store = store
        self._stop = stop
        self.pass_started: float | None = None  # monotonic start of the pass in progress
        self.marked_stale = False
        # Ending a pass and marking it stale exclude each other: otherwise the watchdog could
        # read a start time, the pass publish fresh data, and the watchdog then drop it.
        self._state = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"collector-{collector.name}", daemon=True)

    def _run(self) -> None:
        if self._stop.wait(self.phase):
            return
        while not self._stop.is_set():
            started = time.monotonic()
            self.pass_started = started
            collected = self._collect_once()
            duration = time.monotonic() - started
            with self._state:
                self.pass_started = None
                if self.marked_stale:
                    log.info("collector %s answered again after %.1fs", self.collector.name, duration)
                    self.marked_stale = False
                self._store.publish(self.collector.name, collected, duration)
            # Fixed rate: the next pass starts one interval after this one started.
            self._stop.wait(max(0.0, self.collector.interval - duration))

    def _collect_once(self) -> Collected:
        try:
            return self.collector.collect()
        except Exception:  # noqa: BLE001 - one broken collector must not stop the others
            log.exception("collector %s failed", self.collector.name)
            return Collected(success=False)

    def check_overdue(self, now: float) -> float | None:
        """Mark the pass in progress stale if it is overdue; else when it will be (None: no pass to watch)."""
        with self._state:
            started = self.pass_started
            if started is None or self.marked_stale:
                return None
            if now - started <= self.collector.timeout:
                return started + self.collector.timeout
            self.marked_stale = True
            self._store.mark_stale(self.collector.name)
        log.warning("collector %s has not finished after %.1fs; its data is stale", self.collector.name, now - started)
        return None


_PHASE_STEP_S = 0.1
_WATCHDOG_RESOLUTION_S = 0.01  # the watchdog never sleeps less, so a pass due this instant cannot spin it


class CollectionLoop:
    def __init__(self, collectors: Sequence[Collector], store: SnapshotStore) -> None:
        self._stop = threading.Event()
        # Passes start staggered, not all at once: collectors that run together take turns at the GIL every
        # switch interval, and each turn is a context switch that an idle exporter pays for.
        self._runners = [
            _Runner(c, store, self._stop, phase=min(i * _PHASE_STEP_S, c.interval * i / len(collectors)))
            for i, c in enumerate(collectors)
        ]
        self._watchdog = threading.Thread(target=self._watch, name="collector-watchdog", daemon=True)

    def start(self) -> None:
        for runner in self._runners:
            runner.collector.start()
            runner.thread.start()
        self._watchdog.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop scheduling passes; a pass stuck in a hung call is left to die with the process."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for runner in self._runners:
            runner.collector.stop()
            runner.thread.join(max(0.0, deadline - time.monotonic()))
        self._watchdog.join(timeout=1.0)

    def _watch(self) -> None:
        """Wake when a pass could first be overdue, not on a short period: an idle exporter's wakeups cost CPU.

        A pass that starts after this check is overdue one timeout after its start at the earliest, so the
        shortest timeout from now bounds the sleep; a pass in progress is looked at again when it is due.
        """
        if not self._runners:
            return
        shortest = min(runner.collector.timeout for runner in self._runners)
        while True:
            now = time.monotonic()
            wake = now + shortest
            for runner in self._runners:
                due = runner.check_overdue(now)
                if due is not None:
                    wake = min(wake, due)
            if self._stop.wait(max(_WATCHDOG_RESOLUTION_S, wake - now)):
                return
