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

from mlwarden.exporter.podresources import PodContainer, PodResourcesClient
from mlwarden.exporter.procinfo import ProcessInfo

log = logging.getLogger(__name__)

WORKLOAD_LABELS = ("namespace", "pod", "container", "slurm_job", "user", "container_id")
_JOB_ID = re.compile(r"[0-9A-Za-z_.+-]{1,64}")
MAX_JOBS_PER_GPU = 16  # a mapping file is operator input: a runaway one cannot flood the series
_MAX_MAPPING_BYTES = 4096


@dataclass(frozen=True, order=True)
class Workload:
    namespace: str = ""
    pod: str = ""
    container: str = ""
    slurm_job: str = ""
    user: str = ""
    container_id: str = ""

    def labels(self) -> list[str]:
        return [self.namespace, self.pod, self.container, self.slurm_job, self.user, self.container_id]


def workload_of(info: ProcessInfo) -> Workload:
    return Workload(info.namespace, info.pod, info.container, info.slurm_job, info.user, info.container_id)


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

    pods: dict[str, list[PodContainer]]  # GPU UUID -> pods' containers
    jobs: dict[str, list[str]]  # GPU index or UUID -> Slurm job ids

    def pods_on(self, uuid: str) -> list[PodContainer]:
        return self.pods.get(uuid, [])

    def jobs_on(self, index: int, uuid: str) -> list[str]:
        return self.jobs.get(str(index)) or self.jobs.get(uuid, [])

    def complete(self, info: ProcessInfo, index: int, uuid: str) -> ProcessInfo:
        """``info`` with its GPU's pod and job filled in where the GPU has exactly one."""
        pods = self.pods_on(uuid)
        if not info.pod and len(pods) == 1:
            info = replace(info, namespace=pods[0].namespace, pod=pods[0].pod, container=pods[0].container)
        jobs = self.jobs_on(index, uuid)
        if not info.slurm_job and len(jobs) == 1:
            info = replace(info, slurm_job=jobs[0])
        return info

    def workloads(self, index: int, uuid: str, processes: list[ProcessInfo]) -> list[Workload]:
        """Every workload on the GPU: its processes', and allocations no visible process accounts for."""
        found = {workload_of(info) for info in processes}
        pods_seen = {(w.namespace, w.pod, w.container) for w in found}
        jobs_seen = {w.slurm_job for w in found}
        for pod in self.pods_on(uuid):
            if (pod.namespace, pod.pod, pod.container) not in pods_seen:
                found.add(Workload(namespace=pod.namespace, pod=pod.pod, container=pod.container))
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
