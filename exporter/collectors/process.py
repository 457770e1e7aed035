"""The ``process`` collector: the exporter's own CPU, memory and file descriptors (``process_*``).

The same families as prometheus_client's ProcessCollector (so dashboards and alerts written
for any Python exporter work), read from ``/proc/self`` here: importing prometheus_client's
exposition machinery only for them cost the exporter 3 MiB of resident memory.

They are read when a scrape first renders the pass's snapshot, not at every pass: an idle exporter
collecting every second read ``/proc/self`` a second time a second for values nobody asked for
(reading its ``stat`` and listing its ``fd`` cost the kernel a walk over every thread and descriptor).
"""

from __future__ import annotations

import os
import resource
import weakref
from pathlib import Path

from mlwarden.exporter.collectors.base import Collected, Collector, CollectorContext, CollectorSpec, NoSettings, register
from mlwarden.exporter.exposition import Family, counter, gauge

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _boot_time(proc: Path) -> float:
    for line in (proc / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError(f"no btime in {proc / 'stat'}")


class ProcessCollector(Collector):
    name = "process"
    light = True

    def __init__(self, interval: float, timeout: float, proc: Path = Path("/proc")) -> None:
        self.interval = interval
        self.timeout = timeout
        self._fds = str(proc / "self" / "fd")
        # kept open and read again from offset 0, where the kernel writes it anew: opening it every
        # pass was a third of this collector's cost
        self._stat = os.open(proc / "self" / "stat", os.O_RDONLY | os.O_CLOEXEC)
        # closed with the collector, not at stop(): a pass still running then must not read a reused descriptor
        weakref.finalize(self, os.close, self._stat)
        self._boot = _boot_time(proc)

    def collect(self) -> Collected:
        return Collected(self.read)

    def read(self) -> list[Family]:
        """The families as they are now (called when a snapshot is rendered, in whichever thread renders it)."""
        # /proc/self/stat: the fields after the command name, which may itself hold spaces or ")"
        fields = os.pread(self._stat, 4096, 0).rsplit(b")", 1)[1].split()
        utime, stime, start_ticks, vsize, rss_pages = (int(fields[i]) for i in (11, 12, 19, 20, 21))
        families: list[Family] = []
        for family, value in (
            (gauge("process_virtual_memory_bytes", "Virtual memory size in bytes."), vsize),
            (gauge("process_resident_memory_bytes", "Resident memory size in bytes."), rss_pages * _PAGE),
            (gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds."), self._boot + start_ticks / _TICKS),
            (counter("process_cpu_seconds", "Total user and system CPU time spent in seconds."), (utime + stime) / _TICKS),
            (gauge("process_open_fds", "Number of open file descriptors."), self._open_fds()),
            (gauge("process_max_fds", "Maximum number of open file descriptors."), resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
        ):
            if value is not None:
                family.add_metric([], value)
                families.append(family)
        return families

    def _open_fds(self) -> int | None:
        """None when they cannot be listed (every descriptor taken): omitted, and the scrape still answered."""
        try:
            return len(os.listdir(self._fds))
        except OSError:
            return None


def _build(_: NoSettings, context: CollectorContext) -> Collector:
    return ProcessCollector(context.interval, context.timeout)


register(CollectorSpec(
    "process", "the exporter's own process_* metrics (CPU, memory, file descriptors, start time) from /proc/self",
    _build, NoSettings,
))
