"""Background collection: a thread per collector or group of collectors, one of which is the watchdog.

Collectors of one group (``Collector.group``: ``gpu`` and ``processes``, which both call NVML) and
interval run back to back in one thread, and so do the light ones (``Collector.light``: their passes
only read memory or ``/proc/self``); the others (directory walks) have a thread each. Every collector
publishes its own success and duration into the :class:`SnapshotStore`. The light collectors' thread
is also the watchdog. An idle exporter pays for every thread that wakes with cold caches, so each
wakeup does all it can.

A pass that overruns its timeout (an NVML call that hangs) is marked stale by the watchdog: its series
(and those of the collectors sharing its thread) disappear from the snapshot and its success is 0, while scrapes keep answering from memory. The hung
thread is not abandoned and no second thread is started for that collector, so hung calls cannot pile
up; when the call returns, the collector carries on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence

from mlwarden.exporter.collectors.base import Collected, Collector
from mlwarden.exporter.snapshot import SnapshotStore

log = logging.getLogger(__name__)


class StopSignal:
    """Set once, waited on by every runner between passes: threading.Event's wait makes a lock and runs a
    Condition's bookkeeping in Python at every call, a fifth of what an idle thread's wakeup cost; waiting here
    is one acquisition of a lock held until stop."""

    def __init__(self) -> None:
        self._held = threading.Lock()
        self._held.acquire()
        self._setting = threading.Lock()
        self._set = False

    def set(self) -> None:
        with self._setting:
            if not self._set:
                self._set = True
                self._held.release()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """True when set (at once, or within ``timeout`` seconds)."""
        if self._held.acquire(True, timeout):
            self._held.release()  # for the other runners
            return True
        return False


class _Runner:
    """Runs its collectors' passes back to back, one interval apart; the watching runner also checks the others."""

    def __init__(self, collectors: Sequence[Collector], store: SnapshotStore, stop: StopSignal, phase: float = 0.0) -> None:
        self.collectors = tuple(collectors)
        # a bare watchdog has no passes of its own
        self.interval = min((c.interval for c in collectors), default=math.inf)
        self.phase = phase  # seconds before the first pass
        self.watched: list[_Runner] = []  # the runners this one's thread watches for overdue passes
        self._store = store
        self._stop = stop
        self.current: Collector | None = None  # the collector whose pass is in progress
        self.pass_started: float | None = None  # monotonic start of the pass in progress
        self.marked_stale = False
        # Ending a pass and marking it stale exclude each other: otherwise the watchdog could
        # read a start time, the pass publish fresh data, and the watchdog then drop it.
        self._state = threading.Lock()
        names = "+".join(c.name for c in collectors) or "watchdog"
        self.thread = threading.Thread(target=self._run, name=f"collector-{names}", daemon=True)

    def _run(self) -> None:
        if self._stop.wait(self.phase):
            return
        shortest = min((c.timeout for runner in self.watched for c in runner.collectors), default=math.inf)
        due = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= due:
                for collector in self.collectors:
                    self._pass(collector)
                # Fixed rate: the next round starts one interval after this one started.
                due = now + self.interval
                now = time.monotonic()
            wake = min(due, self._watch(now, shortest)) if self.watched else due
            if math.isinf(wake) or self._stop.wait(max(0.0, wake - now)):
                return

    def _pass(self, collector: Collector) -> None:
        started = time.monotonic()
        with self._state:
            self.current, self.pass_started = collector, started
        collected = self._collect_once(collector)
        duration = time.monotonic() - started
        with self._state:
            self.pass_started = None
            if self.marked_stale:
                log.info("collector %s answered again after %.1fs", collector.name, duration)
                self.marked_stale = False
            self._store.publish(collector.name, collected, duration)

    @staticmethod
    def _collect_once(collector: Collector) -> Collected:
        try:
            return collector.collect()
        except Exception:  # noqa: BLE001 - one broken collector must not stop the others
            log.exception("collector %s failed", collector.name)
            return Collected(success=False)

    def _watch(self, now: float, shortest: float) -> float:
        """When to look again: when a pass in progress could be overdue, or a pass not yet started.

        A pass that starts after this check is overdue one timeout after its start at the earliest, so the
        shortest timeout from now bounds the sleep; a pass in progress is looked at again when it is due.
        """
        wake = now + shortest
        for runner in self.watched:
            due = runner.check_overdue(now)
            if due is not None:
                wake = min(wake, max(due, now + _WATCHDOG_RESOLUTION_S))
        return wake

    def check_overdue(self, now: float) -> float | None:
        """Mark the pass in progress stale if it is overdue; else when it will be (None: no pass to watch).

        The thread's other collectors are marked stale with it: they cannot run until the hung pass returns.
        """
        with self._state:
            started, collector = self.pass_started, self.current
            if started is None or collector is None or self.marked_stale:
                return None
            if now - started <= collector.timeout:
                return started + collector.timeout
            self.marked_stale = True
            for each in self.collectors:
                self._store.mark_stale(each.name)
        log.warning("collector %s has not finished after %.1fs; its data is stale", collector.name, now - started)
        if len(self.collectors) > 1:
            log.warning("so is the data of %s, which runs in its thread", ", ".join(c.name for c in self.collectors if c is not collector))
        return None


_PHASE_STEP_S = 0.1
_WATCHDOG_RESOLUTION_S = 0.01  # the watchdog never sleeps less, so a pass due this instant cannot spin it


def _groups(collectors: Sequence[Collector]) -> list[list[Collector]]:
    """A thread's worth of collectors each: one per group (the light ones are one) and interval, else one per collector.

    In the order given, except that light groups come last: the first of them watches the others.
    """
    groups: dict[object, list[Collector]] = {}
    for collector in collectors:
        group = "light" if collector.light else collector.group
        groups.setdefault(collector if group is None else (group, collector.interval), []).append(collector)
    return sorted(groups.values(), key=lambda group: group[0].light)


class CollectionLoop:
    def __init__(self, collectors: Sequence[Collector], store: SnapshotStore) -> None:
        self._stop = StopSignal()
        groups = _groups(collectors)
        # Passes start staggered, not all at once: collectors that run together take turns at the GIL every
        # switch interval, and each turn is a context switch that an idle exporter pays for.
        self._runners = [
            _Runner(group, store, self._stop, phase=min(i * _PHASE_STEP_S, group[0].interval * i / len(groups)))
            for i, group in enumerate(groups)
        ]
        # The first light runner watches the others (it never hangs, and already wakes every interval); without
        # one, a bare watchdog runner does. A runner cannot watch its own passes, and light ones cannot hang.
        watcher = next((r for r in self._runners if r.collectors[0].light), None)
        if watcher is None:
            watcher = _Runner((), store, self._stop)
            self._runners.append(watcher)
        watcher.watched = [r for r in self._runners if r is not watcher and not r.collectors[0].light]

    def start(self) -> None:
        for runner in self._runners:
            for collector in runner.collectors:
                collector.start()
            runner.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop scheduling passes; a pass stuck in a hung call is left to die with the process."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for runner in self._runners:
            for collector in runner.collectors:
                collector.stop()
            runner.thread.join(max(0.0, deadline - time.monotonic()))
