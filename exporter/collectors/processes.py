"""The ``processes`` collector: GPU memory per running process.

Series are rebuilt from scratch on every pass, so a process that exited is gone at the
next collection. At most ``max_processes`` per GPU are exported (the largest users of
memory), which bounds the number of series; ``mlwarden_gpu_processes`` counts them all.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

from mlwarden.exporter import procinfo
from mlwarden.exporter.backends.base import BackendUnavailable, GpuLost, GpuProcess
from mlwarden.exporter.backends.supervisor import BackendSupervisor
from mlwarden.exporter.collectors.base import GPU_LABELS, Collected, Collector


class ProcessesCollector(Collector):
    name = "processes"

    def __init__(
        self, supervisor: BackendSupervisor, interval: float, timeout: float, max_processes: int, proc: Path = Path("/proc")
    ) -> None:
        self.supervisor = supervisor
        self.interval = interval
        self.timeout = timeout
        self.max_processes = max_processes
        self.proc = proc

    def collect(self) -> Collected:
        if not self.supervisor.ensure():
            return Collected(success=False)
        backend = self.supervisor.backend
        count = GaugeMetricFamily("mlwarden_gpu_processes", "Processes using the GPU (all of them, before the export cap).", labels=GPU_LABELS)
        memory = GaugeMetricFamily(
            "mlwarden_gpu_process_memory_used_bytes", "GPU memory used by one process, in bytes.",
            labels=[*GPU_LABELS, "pid", "process", "user", "container"],
        )
        try:
            gpus = backend.device_count()
        except BackendUnavailable:
            return Collected(success=False)
        for index in range(gpus):
            try:
                identity = backend.identity(index)
                processes = backend.processes(index)
            except GpuLost:
                continue  # the gpu collector reports the GPU as down
            self.supervisor.remember(identity)
            gpu = [str(index), identity.uuid]
            count.add_metric(gpu, len(processes))
            for process in self._largest(processes):
                if process.used_memory_bytes is None:
                    continue  # NVML cannot say (e.g. no permission): omit, never 0
                info = self._describe(process)
                memory.add_metric([*gpu, str(process.pid), info.name, info.user, info.container], process.used_memory_bytes)
        return Collected([count, memory])

    def _largest(self, processes: list[GpuProcess]) -> list[GpuProcess]:
        return sorted(processes, key=lambda p: p.used_memory_bytes or 0, reverse=True)[: self.max_processes]

    def _describe(self, process: GpuProcess) -> procinfo.ProcessInfo:
        if process.name:  # the backend already knows (simulated processes have no /proc entry)
            return procinfo.ProcessInfo(process.name, process.user, process.container)
        return procinfo.describe(process.pid, self.proc)
