"""Who a GPU process is: its name, user, container and Slurm job, from ``/proc``.

NVML gives only a PID. A process that exited between NVML's answer and our read (or
that lives in another PID namespace) gets empty labels rather than an error.
"""

from __future__ import annotations

import functools
import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

# Docker, containerd and CRI-O put the 64-hex container id in the cgroup path; Kubernetes
# adds the pod UID (with '_' instead of '-' under the systemd cgroup driver).
_CONTAINER_ID = re.compile(r"([0-9a-f]{64})")
_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
# slurmd's cgroup plugins: v1 ``/slurm/uid_1000/job_42/step_0/task_0``, v2
# ``/system.slice/slurmstepd.scope/job_42/step_0/user/task_0``.
_SLURM_JOB = re.compile(r"/slurm[^/\n]*/(?:uid_\d+/)?job_(\d+)(?:/|$)", re.MULTILINE)


@dataclass(frozen=True)
class ProcessInfo:
    """A GPU process's identity. ``namespace``/``pod``/``container`` come from the kubelet,
    not from /proc: :mod:`mlwarden.exporter.attribution` fills them in."""

    name: str = ""
    user: str = ""
    container_id: str = ""
    slurm_job: str = ""
    namespace: str = ""
    pod: str = ""
    container: str = ""


def describe(pid: int, proc: Path = Path("/proc")) -> ProcessInfo:
    base = proc / str(pid)
    try:
        name = (base / "comm").read_text().strip()
        uid = os.stat(base).st_uid
        cgroup = (base / "cgroup").read_text()
    except OSError:
        return ProcessInfo()
    return ProcessInfo(name=name, user=user_name(uid), container_id=container_of(cgroup), slurm_job=slurm_job_of(cgroup))


@functools.lru_cache(maxsize=256)
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def container_of(cgroup_text: str) -> str:
    """The short container id (12 hex digits, as ``docker ps`` shows), else ``pod<UID>``, else empty."""
    match = _CONTAINER_ID.search(cgroup_text)
    if match:
        return match.group(1)[:12]
    match = _POD_UID.search(cgroup_text)
    return "pod" + match.group(1).replace("_", "-") if match else ""


def slurm_job_of(cgroup_text: str) -> str:
    """The Slurm job id from a slurmd cgroup path, else empty."""
    match = _SLURM_JOB.search(cgroup_text)
    return match.group(1) if match else ""
