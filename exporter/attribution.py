"""Who holds each GPU: the workloads behind its processes and its allocations.

Sources, each optional and off without error where absent:

- ``/proc/PID/cgroup``: the container id and the Slurm job of each GPU process (procinfo);
  ``/proc/PID`` owner: its user.
- the kubelet's pod-resources API: which pod and container each GPU is allocated to
  (podresources), processes visible or not.
- a job-mapping directory in dcgm-exporter's ``--hpc-job-mapping-dir`` format: one file per
  GPU, named by its index (or UUID), holding the ids of the jobs on it, one per line, written
  by Slurm prolog/epilog scripts.

A process inherits its GPU's pod (or job) when exactly one pod (or job) holds that GPU; on a
shared GPU the process's own cgroup is the only evidence, and labels it cannot prove stay empty.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from mlwarden.exporter.backends.base import MigDevice
from mlwarden.exporter.podresources import PodContainer, PodResourcesClient
from mlwarden.exporter.procinfo import ProcessInfo, Workload

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"[0-9A-Za-z_.+-]{1,64}")
MAX_JOBS_PER_GPU = 16  # a mapping file is operator input: a runaway one cannot flood the series
_MAX_MAPPING_BYTES = 4096


def read_job_mapping(directory: Path) -> dict[str, list[str]]:
    """File name (GPU index or UUID) -> job ids; unreadable or odd files are skipped."""
    mapping: dict[str, list[str]] = {}
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return mapping
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            with open(entry.path, "rb") as handle:
                text = handle.read(_MAX_MAPPING_BYTES).decode("utf-8", errors="replace")
        except OSError:
            continue  # removed by the epilog while we read: the job ended
        jobs = [line.split()[0] for line in text.splitlines() if line.strip()]
        valid = sorted({job for job in jobs if _JOB_ID.fullmatch(job)})[:MAX_JOBS_PER_GPU]
        if valid:
            mapping[entry.name] = valid
    return mapping


@dataclass(frozen=True)
class Allocations:
    """One pass's view of the allocation sources."""

    pods: dict[str, list[PodContainer]]  # device id (GPU or MIG device UUID) -> pods' containers
    jobs: dict[str, list[str]]  # GPU index or UUID -> Slurm job ids

    def pods_on(self, uuid: str, device: MigDevice | None = None) -> list[PodContainer]:
        """The pods holding the GPU, or one of its MIG devices.

        The NVIDIA device plugin names a MIG device by its own UUID (``MIG-...``), or, before driver
        R470, as ``MIG-<GPU UUID>/<GPU instance>/<compute instance>``.
        """
        if device is None:
            return self.pods.get(uuid, [])
        return self.pods.get(device.uuid) or self.pods.get(f"MIG-{uuid}/{device.gpu_instance}/{device.compute_instance}", [])

    def jobs_on(self, index: int, uuid: str) -> list[str]:
        return self.jobs.get(str(index)) or self.jobs.get(uuid, [])

    def complete(self, info: ProcessInfo, index: int, uuid: str, device: MigDevice | None = None) -> ProcessInfo:
        """``info`` with its GPU's (or MIG device's) pod and job filled in where it has exactly one."""
        if not self.pods and not self.jobs:
            return info  # no allocation source on this machine: every pass of every process
        workload = info.workload
        pods = self.pods_on(uuid, device)
        if not workload.pod and len(pods) == 1:
            workload = replace(workload, namespace=pods[0].namespace, pod=pods[0].pod, container=pods[0].container)
        jobs = self.jobs_on(index, uuid)
        if not workload.slurm_job and len(jobs) == 1:
            workload = replace(workload, slurm_job=jobs[0])
        return info if workload is info.workload else replace(info, workload=workload)

    def workloads(self, index: int, uuid: str, processes: list[ProcessInfo], device: MigDevice | None = None) -> list[Workload]:
        """Every workload on the GPU (or MIG device): its processes', and allocations no visible process accounts for.

        Slurm's job map names whole GPUs: its jobs are listed with the GPU, not with each MIG device.
        """
        # by identity first: the processes of one workload share its object (procinfo), and hashing a
        # workload's six labels for each of its processes was most of this function's cost
        found = set({id(info.workload): info.workload for info in processes}.values())
        pods_seen = {(w.namespace, w.pod, w.container) for w in found}
        jobs_seen = {w.slurm_job for w in found}
        for pod in self.pods_on(uuid, device):
            if (pod.namespace, pod.pod, pod.container) not in pods_seen:
                found.add(Workload(namespace=pod.namespace, pod=pod.pod, container=pod.container))
        if device is None:
            for job in self.jobs_on(index, uuid):
                if job not in jobs_seen:
                    found.add(Workload(slurm_job=job))
        return sorted(found)


class Attributor:
    """Reads the allocation sources once per collection pass."""

    def __init__(self, pod_resources: PodResourcesClient | None = None, job_mapping_dir: Path | None = None) -> None:
        self.pod_resources = pod_resources
        self.job_mapping_dir = job_mapping_dir
        self._said_no_mapping = False

    def allocations(self) -> Allocations:
        pods = (self.pod_resources.gpu_owners() if self.pod_resources else None) or {}
        jobs: dict[str, list[str]] = {}
        if self.job_mapping_dir is not None:
            if self.job_mapping_dir.is_dir():
                jobs = read_job_mapping(self.job_mapping_dir)
                self._said_no_mapping = False
            elif not self._said_no_mapping:
                log.info("job-mapping directory %s does not exist (yet): no Slurm jobs from it", self.job_mapping_dir)
                self._said_no_mapping = True
        return Allocations(pods, jobs)

    def close(self) -> None:
        if self.pod_resources is not None:
            self.pod_resources.close()
