"""The ``xid`` collector: XID errors (the driver's fault reports), counted per GPU and code.

A listener thread waits on the backend's event stream (an NVML event set, or the simulated
backend's injected events) and counts every event, identical repeats included, so that
``increase(mlwarden_gpu_xid_errors_total[10m])`` sees the third XID 79 as well as the first.
The number of (GPU, XID) pairs is capped, so memory cannot grow without bound.

Logging is per collection pass, not per event: an XID storm (thousands a second) gives one
line per (GPU, XID) and pass, with the count since the previous line, instead of a flood.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from mlwarden.exporter.backends.base import XidEvent
from mlwarden.exporter.backends.supervisor import BackendSupervisor
from mlwarden.exporter.collectors.base import GPU_LABELS, Collected, Collector, CollectorContext, CollectorSpec, NoSettings, register
from mlwarden.exporter.exposition import counter, gauge

log = logging.getLogger(__name__)

MAX_SERIES = 1024
_WAIT_S = 1.0  # how long one wait blocks; also how fast stop() takes effect


@dataclass
class _Count:
    total: int
    last_seen: float
    unlogged: int  # events since the last log line


class XidCollector(Collector):
    name = "xid"
    light = True

    def __init__(self, supervisor: BackendSupervisor, interval: float, timeout: float) -> None:
        self.supervisor = supervisor
        self.interval = interval
        self.timeout = timeout
        self._counts: dict[tuple[int, int], _Count] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_full = False

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._listen, name="xid-listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * _WAIT_S)

    def _listen(self) -> None:
        while not self._stop.is_set():
            if not self.supervisor.ensure():
                self._stop.wait(_WAIT_S)
                continue
            try:
                events = self.supervisor.backend.wait_xid_events(_WAIT_S)
            except Exception:  # noqa: BLE001 - the listener must outlive any backend error
                log.exception("XID listener error; retrying")
                self._stop.wait(_WAIT_S)
                continue
            for event in events:
                self.record(event)

    def record(self, event: XidEvent) -> None:
        key = (event.gpu, event.xid)
        with self._lock:
            count = self._counts.get(key)
            if count is None:
                if len(self._counts) >= MAX_SERIES:
                    if not self._warned_full:
                        log.warning("more than %d distinct (GPU, XID) pairs; new pairs are not counted", MAX_SERIES)
                        self._warned_full = True
                    return
                self._counts[key] = _Count(1, event.timestamp, unlogged=1)
            else:
                count.total += 1
                count.unlogged += 1
                count.last_seen = max(count.last_seen, event.timestamp)

    def collect(self) -> Collected:
        if not self._counts:  # no XID since start (nearly always): nothing to count or log. Read without the lock:
            return Collected((), success=self.supervisor.available)  # an event recorded meanwhile shows next pass
        total = counter("mlwarden_gpu_xid_errors", "XID errors reported by the driver, every occurrence counted.", labels=[*GPU_LABELS, "xid"])
        last = gauge("mlwarden_gpu_xid_last_timestamp_seconds", "When this XID was last reported (Unix time).", labels=[*GPU_LABELS, "xid"])
        counts: list[tuple[int, int, int, float]] = []
        unlogged: list[tuple[int, int, int]] = []
        with self._lock:
            for (gpu, xid), c in sorted(self._counts.items()):
                counts.append((gpu, xid, c.total, c.last_seen))
                if c.unlogged:
                    unlogged.append((gpu, xid, c.unlogged))
                    c.unlogged = 0
        for gpu, xid, new in unlogged:
            log.warning("GPU %d reported XID %d (%d time%s since the last report)", gpu, xid, new, "" if new == 1 else "s")
        for gpu, xid, count, seen in counts:
            labels = [str(gpu), self.supervisor.uuid(gpu), str(xid)]
            total.add_metric(labels, count)
            last.add_metric(labels, seen)
        return Collected([total, last], success=self.supervisor.available)


def _build(_: NoSettings, context: CollectorContext) -> Collector:
    return XidCollector(context.supervisor, context.interval, context.timeout)


register(CollectorSpec("xid", "XID error events counted per GPU and code, from NVML's event stream", _build, NoSettings))
