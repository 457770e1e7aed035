"""The ``process`` collector: the exporter's own CPU, memory and file descriptors (``process_*``).

prometheus_client's ProcessCollector reads ``/proc/self``; running it as a collector puts its
families in the snapshot like any other, so a scrape still only writes bytes.
"""

from __future__ import annotations

from prometheus_client import ProcessCollector as _ProcessMetrics

from mlwarden.exporter.collectors.base import Collected, Collector


class ProcessCollector(Collector):
    name = "process"

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        self.timeout = timeout
        self._metrics = _ProcessMetrics(registry=None)

    def collect(self) -> Collected:
        return Collected(list(self._metrics.collect()))
