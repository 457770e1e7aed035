"""The ``processes`` collector: GPU memory per running process, and who holds each GPU.

Series are rebuilt from scratch on every pass, so a process that exited is gone at the
next collection. At most ``max_processes`` per GPU are exported (the largest users of
memory), which bounds the number of series; ``mlwarden_gpu_processes`` counts them all.

``mlwarden_gpu_allocation_info`` has one series per GPU and workload (a pod's container, a
Slurm job, a container, a user), from the exported processes and from the allocation sources
(:mod:`mlwarden.exporter.attribution`), so that any per-GPU series can be joined to its workload:
``... * on(instance, gpu, uuid) group_right mlwarden_gpu_allocation_info``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mlwarden.exporter import procinfo
from mlwarden.exporter.attribution import Allocations, Attributor
from mlwarden.exporter.backends.base import BackendUnavailable, GpuLost, GpuProcess, MigDevice
from mlwarden.exporter.backends.supervisor import BackendSupervisor
from mlwarden.exporter.collectors.base import GPU_LABELS, Collected, Collector, CollectorContext, CollectorSpec, register
from mlwarden.exporter.exposition import gauge
from mlwarden.exporter.podresources import DEFAULT_SOCKET, PodResourcesClient
from mlwarden.exporter.procinfo import WORKLOAD_LABELS

from mlwarden.settings import in_range, setting

PROCESS_LABELS = (*GPU_LABELS, "pid", "process", *WORKLOAD_LABELS)
ALLOCATION_LABELS = (*GPU_LABELS, "gpu_instance", "compute_instance", *WORKLOAD_LABELS)


class ProcessesCollector(Collector):
    name = "processes"

    def __init__(
        self, supervisor: BackendSupervisor, interval: float, timeout: float, max_processes: int,
        proc: Path = Path("/proc"), attributor: Attributor | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.interval = interval
        self.timeout = timeout
        self.max_processes = max_processes
        self.proc = proc
        self.attributor = attributor or Attributor()
        self.describer = procinfo.Describer(proc)
        # (GPU index, pid) -> (its identity, its label values) of the last pass: the same tuple every pass
        # while the identity holds, so that rendering finds the series' text by identity, not by content
        self._labels: dict[tuple[int, int], tuple[procinfo.ProcessInfo, tuple[str, ...]]] = {}

    def collect(self) -> Collected:
        if not self.supervisor.ensure():
            return Collected(success=False)
        backend = self.supervisor.backend
        count = gauge("mlwarden_gpu_processes", "Processes using the GPU (all of them, before the export cap).", labels=GPU_LABELS)
        memory = gauge("mlwarden_gpu_process_memory_used_bytes", "GPU memory used by one process, in bytes.", labels=PROCESS_LABELS)
        sm = gauge(
            "mlwarden_gpu_process_sm_utilization_ratio",
            "Fraction of the last sample period in which the process ran on the GPU's SMs (0..1).", labels=PROCESS_LABELS,
        )
        mem_util = gauge(
            "mlwarden_gpu_process_memory_utilization_ratio",
            "Fraction of the last sample period in which the process read or wrote GPU memory (0..1).", labels=PROCESS_LABELS,
        )
        allocation = gauge(
            "mlwarden_gpu_allocation_info",
            "One series per GPU (or MIG device: gpu_instance, compute_instance) and workload holding it "
            "(pod container, Slurm job, container, user); the value is always 1.",
            labels=ALLOCATION_LABELS,
        )
        try:
            gpus = backend.device_count()
        except BackendUnavailable:
            return Collected(success=False)
        allocations = self.attributor.allocations()
        described: dict[int, procinfo.ProcessInfo] = {}  # a process on several GPUs is read from /proc once a pass
        known, self._labels = self._labels, {}
        for index in range(gpus):
            try:
                identity = backend.identity(index)
                processes = backend.processes(index)
                migs: dict[tuple[int | None, int | None], MigDevice] = {
                    (d.gpu_instance, d.compute_instance): d for d in backend.mig_devices(index)
                }
            except GpuLost:
                continue  # the gpu collector reports the GPU as down
            self.supervisor.remember(identity)
            gpu = (str(index), identity.uuid)
            count.samples.append((gpu, len(processes)))
            # processes by the MIG device they run in (None: the whole GPU, or NVML did not say)
            placed: dict[MigDevice | None, list[procinfo.ProcessInfo]] = {None: [], **{device: [] for device in migs.values()}}
            for process in self._largest(processes):
                device = migs.get((process.gpu_instance, process.compute_instance)) if migs else None
                info = self._describe(process, allocations, index, identity.uuid, device, described)
                placed[device].append(info)
                labels = self._labels_of(known, gpu, index, process.pid, info)
                if process.used_memory_bytes is not None:  # NVML cannot say (e.g. no permission): omit, never 0
                    memory.samples.append((labels, process.used_memory_bytes))
                if process.sm_utilization_ratio is not None:
                    sm.samples.append((labels, process.sm_utilization_ratio))
                if process.memory_utilization_ratio is not None:
                    mem_util.samples.append((labels, process.memory_utilization_ratio))
            for device, infos in placed.items():
                instance = ("", "") if device is None else (str(device.gpu_instance), str(device.compute_instance))
                for workload in allocations.workloads(index, identity.uuid, infos, device):
                    allocation.samples.append(((*gpu, *instance, *workload.labels()), 1))
        self.describer.end_pass()
        return Collected([count, memory, sm, mem_util, allocation])

    def stop(self) -> None:
        self.attributor.close()

    def _labels_of(self, known: dict[tuple[int, int], tuple[procinfo.ProcessInfo, tuple[str, ...]]], gpu: tuple[str, str],
                   index: int, pid: int, info: procinfo.ProcessInfo) -> tuple[str, ...]:
        cached = known.get((index, pid))
        if cached is not None and cached[0] is info and cached[1][1] == gpu[1]:
            labels = cached[1]
        else:
            labels = (*gpu, str(pid), *info.label_values)
        self._labels[(index, pid)] = (info, labels)
        return labels

    def _largest(self, processes: list[GpuProcess]) -> list[GpuProcess]:
        return sorted(processes, key=lambda p: p.used_memory_bytes or 0, reverse=True)[: self.max_processes]

    def _describe(self, process: GpuProcess, allocations: Allocations, index: int, uuid: str, device: MigDevice | None,
                  described: dict[int, procinfo.ProcessInfo]) -> procinfo.ProcessInfo:
        # the backend may already know (simulated processes have no /proc entry)
        info = process.info or described.get(process.pid)
        if info is None:
            info = described[process.pid] = self.describer.describe(process.pid)
        return allocations.complete(info, index, uuid, device)


@dataclasses.dataclass(frozen=True)
class ProcessesSettings:
    max_processes: int = setting(
        32, parse=in_range(int, 0, 10000), help="most processes exported per GPU (the largest memory users); bounds series count",
    )
    pod_resources_socket: Path = setting(
        DEFAULT_SOCKET, metavar="PATH",
        help="kubelet pod-resources socket that maps GPUs to pods (needs `mlwarden[kubernetes]`); off while absent",
    )
    hpc_job_mapping_dir: Path | None = setting(
        None, metavar="DIR",
        help="Slurm job-mapping directory in dcgm-exporter's format (a file per GPU index holding its job ids)",
    )


def _build(settings: ProcessesSettings, context: CollectorContext) -> Collector:
    attributor = Attributor(PodResourcesClient(settings.pod_resources_socket), settings.hpc_job_mapping_dir)
    return ProcessesCollector(context.supervisor, context.interval, context.timeout, settings.max_processes, attributor=attributor)


register(CollectorSpec(
    "processes", "GPU memory per process and the workload (pod, Slurm job, container, user) holding each GPU",
    _build, ProcessesSettings,
))
