"""Who a GPU process is: its name, user, container and Slurm job, from ``/proc``.

NVML gives only a PID. A process that exited between NVML's answer and our read (or
that lives in another PID namespace) gets empty labels rather than an error.
"""

from __future__ import annotations

import functools
import os
import pwd
import re
import time
from dataclasses import dataclass
from pathlib import Path

# Docker, containerd and CRI-O put the 64-hex container id in the cgroup path; Kubernetes
# adds the pod UID (with '_' instead of '-' under the systemd cgroup driver).
_CONTAINER_ID = re.compile(r"([0-9a-f]{64})")
_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
# slurmd's cgroup plugins: v1 ``/slurm/uid_1000/job_42/step_0/task_0``, v2
# ``/system.slice/slurmstepd.scope/job_42/step_0/user/task_0``.
_SLURM_JOB = re.compile(r"/slurm[^/\n]*/(?:uid_\d+/)?job_(\d+)(?:/|$)", re.MULTILINE)


@dataclass(frozen=True, order=True)
class Workload:
    """Who holds a GPU, as the ``mlwarden_gpu_*`` series label it (WORKLOAD_LABELS, in that order).
    ``namespace``/``pod``/``container`` come from the kubelet, not from /proc:
    :mod:`mlwarden.exporter.attribution` fills them in."""

    namespace: str = ""
    pod: str = ""
    container: str = ""
    slurm_job: str = ""
    user: str = ""
    container_id: str = ""

    def labels(self) -> list[str]:
        return [self.namespace, self.pod, self.container, self.slurm_job, self.user, self.container_id]


WORKLOAD_LABELS = ("namespace", "pod", "container", "slurm_job", "user", "container_id")


@dataclass(frozen=True)
class ProcessInfo:
    """A GPU process's identity: its command name and the workload it belongs to."""

    name: str = ""
    workload: Workload = Workload()

    @functools.cached_property
    def label_values(self) -> tuple[str, ...]:
        """The ``process`` label and the WORKLOAD_LABELS, made once per process (the Describer keeps it across passes)."""
        return (self.name, *self.workload.labels())


def describe(pid: int, proc: Path = Path("/proc")) -> ProcessInfo:
    base = proc / str(pid)
    try:
        name = (base / "comm").read_text().strip()
        uid = os.stat(base).st_uid
        cgroup = (base / "cgroup").read_text()
    except OSError:
        return ProcessInfo()
    return ProcessInfo(name, _workload(user_name(uid), container_of(cgroup), slurm_job_of(cgroup)))


@functools.lru_cache(maxsize=1024)
def _workload(user: str, container_id: str, slurm_job: str) -> Workload:
    """One object per workload: the processes of a container or job share it, so that a pass groups them by identity."""
    return Workload(user=user, container_id=container_id, slurm_job=slurm_job)


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


class Describer:
    """``describe`` with memory across passes: a process's identity is read from /proc once, not every second.

    An entry holds while ``/proc/PID`` is the same directory (inode and change time: a reused PID is a
    new directory) and for at most ``max_age`` seconds (a process moved to another cgroup is seen
    then); PIDs no longer on any GPU are forgotten at the end of each pass.
    """

    def __init__(self, proc: Path = Path("/proc"), max_age: float = 60.0) -> None:
        self.proc = proc
        self._root = str(proc)
        self.max_age = max_age
        self._known: dict[int, tuple[tuple[int, int], float, ProcessInfo]] = {}
        self._seen: set[int] = set()

    def describe(self, pid: int) -> ProcessInfo:
        self._seen.add(pid)
        try:
            st = os.stat(f"{self._root}/{pid}")  # not a Path: joining one cost more than the stat
        except OSError:
            self._known.pop(pid, None)
            return describe(pid, self.proc)  # gone or another PID namespace: empty labels, as describe says
        stamp, now = (st.st_ino, st.st_ctime_ns), time.monotonic()
        known = self._known.get(pid)
        if known is not None and known[0] == stamp and now - known[1] < self.max_age:
            return known[2]
        info = describe(pid, self.proc)
        self._known[pid] = (stamp, now, info)
        return info

    def end_pass(self) -> None:
        """Forget the processes not described since the last call."""
        for pid in self._known.keys() - self._seen:
            del self._known[pid]
        self._seen = set()
