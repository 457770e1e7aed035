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
import functools
from pathlib import Path

from mlwarden.exporter import procinfo
from mlwarden.exporter.attribution import Allocations, Attributor
from mlwarden.exporter.backends.base import BackendUnavailable, GpuLost, GpuProcess, MigDevice
from mlwarden.exporter.backends.supervisor import BackendSupervisor
from mlwarden.exporter.collectors.base import GPU_LABELS, Collected, Collector, CollectorContext, CollectorSpec, register
from mlwarden.exporter.exposition import Family, gauge
from mlwarden.exporter.podresources import DEFAULT_SOCKET, PodResourcesClient
from mlwarden.exporter.procinfo import WORKLOAD_LABELS

from mlwarden.settings import in_range, setting

PROCESS_LABELS = (*GPU_LABELS, "pid", "process", *WORKLOAD_LABELS)
ALLOCATION_LABELS = (*GPU_LABELS, "gpu_instance", "compute_instance", *WORKLOAD_LABELS)


_KnownLabels = dict[tuple[int, int], tuple[procinfo.ProcessInfo, tuple[str, ...]]]
Sample = tuple[tuple[str, ...], float]


@dataclasses.dataclass
class _Series:
    memory: list[Sample]
    sm: list[Sample]
    memory_utilization: list[Sample]
    allocations: list[Sample]
    labels: _KnownLabels


class _GpuPart:
    """One GPU's share of a pass: what its series are made from and, once made, the series.

    A pass whose NVML answer, MIG layout, process identities and allocation sources are those of the
    pass before serves the series made then: processes and their memory barely change from second to
    second, and rebuilding them was most of a ``processes`` pass. The series are made when a snapshot
    holding the part is first rendered (``series`` is None until then), under the collector's render lock.
    """

    def __init__(self, index: int, processes: list[GpuProcess], gpu: tuple[str, str], migs: tuple[MigDevice, ...],
                 largest: list[GpuProcess], devices: list[MigDevice | None], infos: list[procinfo.ProcessInfo],
                 allocations: Allocations) -> None:
        self.index = index
        self.processes = processes
        self.gpu = gpu
        self.migs = migs
        self.largest = largest
        self.devices = devices
        self.infos = infos
        self.allocations = allocations
        self.series: _Series | None = None

    def same_as(self, later: _GpuPart) -> bool:
        """Whether ``later`` (not yet made into series) would make the same series as this part.

        The backend hands back the very list of the pass before when NVML answered the same; a process'
        description is the same object while its /proc entry is the same directory."""
        return (later.processes is self.processes and later.gpu == self.gpu and later.migs == self.migs
                and len(later.infos) == len(self.infos) and all(a is b for a, b in zip(later.infos, self.infos, strict=True)))


class ProcessesCollector(Collector):
    name = "processes"
    group = "nvml"

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
        self._labels: _KnownLabels = {}
        self._parts: dict[int, _GpuPart] = {}  # GPU index -> what its series were made from last pass, and them
        self._allocations: Allocations | None = None  # the allocation sources' answer of the last pass

    def collect(self) -> Collected:
        """Read every GPU's processes and who they are; the series are made when the pass's snapshot is rendered
        (as the gpu collector's are), from the parts, which are not changed after the pass except to keep the
        series made from them."""
        if not self.supervisor.ensure():
            return Collected(success=False)
        backend = self.supervisor.backend
        try:
            gpus = backend.device_count()
        except BackendUnavailable:
            return Collected(success=False)
        allocations = self.attributor.allocations()
        same_allocations, self._allocations = allocations == self._allocations, allocations
        described: dict[int, procinfo.ProcessInfo] = {}  # a process on several GPUs is read from /proc once a pass
        parts, self._parts = self._parts, {}
        counts: list[Sample] = []
        for index in range(gpus):
            try:
                identity = backend.identity(index)
                processes = backend.processes(index)
                migs = backend.mig_devices(index)
            except GpuLost:
                continue  # the gpu collector reports the GPU as down
            self.supervisor.remember(identity)
            gpu = (str(index), identity.uuid)
            counts.append((gpu, len(processes)))
            previous = parts.get(index)
            part = self._gpu_part(index, gpu, processes, migs, allocations, described, previous)
            if previous is not None and same_allocations and previous.same_as(part):
                part = previous  # nothing changed: its series (made, or to be made) are the ones to serve
            self._parts[index] = part
        self.describer.end_pass()
        return Collected(functools.partial(self._families, counts, tuple(self._parts.values())))

    def _families(self, counts: list[Sample], parts: tuple[_GpuPart, ...]) -> list[Family]:
        """The pass's series, from its parts; under the render lock (see collect)."""
        count = gauge("mlwarden_gpu_processes", "Processes using the GPU (all of them, before the export cap).", labels=GPU_LABELS)
        count.samples = counts
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
        known, self._labels = self._labels, {}
        for part in parts:
            series = part.series
            if series is None:
                series = part.series = self._series(part, known)
            self._labels.update(series.labels)
            memory.samples += series.memory
            sm.samples += series.sm
            mem_util.samples += series.memory_utilization
            allocation.samples += series.allocations
        return [count, memory, sm, mem_util, allocation]

    def _gpu_part(self, index: int, gpu: tuple[str, str], processes: list[GpuProcess], migs: tuple[MigDevice, ...],
                  allocations: Allocations, described: dict[int, procinfo.ProcessInfo], previous: _GpuPart | None) -> _GpuPart:
        """What a GPU's series are made from: its largest processes, who they are, and where they run.

        Every process is described every pass (its /proc entry checked), so a reused PID is noticed even
        when NVML answers the same. The largest and their MIG devices are those of the pass before while
        the backend hands back the very same list and the MIG layout is the same. The allocation sources
        complete the processes' workloads when the series are made (see _series)."""
        if previous is not None and previous.processes is processes and previous.migs == migs:
            largest, devices = previous.largest, previous.devices
        else:
            by_instance: dict[tuple[int | None, int | None], MigDevice] = {(d.gpu_instance, d.compute_instance): d for d in migs}
            largest = self._largest(processes)
            devices = [by_instance.get((p.gpu_instance, p.compute_instance)) if by_instance else None for p in largest]
        # the backend may already know who a process is (simulated processes have no /proc entry)
        infos = [p.info or described.get(p.pid) or self._describe(p.pid, described) for p in largest]
        return _GpuPart(index, processes, gpu, migs, largest, devices, infos, allocations)

    def _series(self, part: _GpuPart, known: _KnownLabels) -> _Series:
        index, gpu, allocations = part.index, part.gpu, part.allocations
        infos = [allocations.complete(info, index, gpu[1], device) for info, device in zip(part.infos, part.devices, strict=True)]
        memory: list[tuple[tuple[str, ...], float]] = []
        sm: list[tuple[tuple[str, ...], float]] = []
        mem_util: list[tuple[tuple[str, ...], float]] = []
        labels_of: _KnownLabels = {}
        # processes by the MIG device they run in (None: the whole GPU, or NVML did not say)
        placed: dict[MigDevice | None, list[procinfo.ProcessInfo]] = {None: [], **{device: [] for device in part.migs}}
        for process, device, info in zip(part.largest, part.devices, infos, strict=True):
            placed[device].append(info)
            labels = self._labels_of(known, labels_of, gpu, index, process.pid, info)
            if process.used_memory_bytes is not None:  # NVML cannot say (e.g. no permission): omit, never 0
                memory.append((labels, process.used_memory_bytes))
            if process.sm_utilization_ratio is not None:
                sm.append((labels, process.sm_utilization_ratio))
            if process.memory_utilization_ratio is not None:
                mem_util.append((labels, process.memory_utilization_ratio))
        held: list[Sample] = []
        for device, infos in placed.items():
            instance = ("", "") if device is None else (str(device.gpu_instance), str(device.compute_instance))
            for workload in allocations.workloads(index, gpu[1], infos, device):
                held.append(((*gpu, *instance, *workload.labels()), 1))
        return _Series(memory, sm, mem_util, held, labels_of)

    def stop(self) -> None:
        self.attributor.close()

    @staticmethod
    def _labels_of(known: _KnownLabels, labels_of: _KnownLabels, gpu: tuple[str, str],
                   index: int, pid: int, info: procinfo.ProcessInfo) -> tuple[str, ...]:
        cached = known.get((index, pid))
        if cached is not None and cached[0] is info and cached[1][1] == gpu[1]:
            labels = cached[1]
        else:
            labels = (*gpu, str(pid), *info.label_values)
        labels_of[(index, pid)] = (info, labels)
        return labels

    def _largest(self, processes: list[GpuProcess]) -> list[GpuProcess]:
        return sorted(processes, key=lambda p: p.used_memory_bytes or 0, reverse=True)[: self.max_processes]

    def _describe(self, pid: int, described: dict[int, procinfo.ProcessInfo]) -> procinfo.ProcessInfo:
        info = described[pid] = self.describer.describe(pid)
        return info


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
