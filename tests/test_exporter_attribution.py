"""Who holds a GPU: cgroup files, a real gRPC server speaking the kubelet's pod-resources API on a
unix socket, and a job-mapping directory in dcgm-exporter's format, end to end through the
processes collector on the pynvml-boundary fake."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from mlwarden.exporter import procinfo
from mlwarden.exporter.attribution import MAX_JOBS_PER_GPU, Attributor, read_job_mapping
from mlwarden.exporter.backends.nvml import NvmlBackend
from mlwarden.exporter.collectors.processes import ProcessesCollector
from mlwarden.exporter.podresources import PodContainer, PodResourcesClient, ProtobufError, decode_list_response

from tests.test_exporter_nvml import MIB, FakeNvml, samples, supervisor_for

CONTAINER = "3f1c9d1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6"


# protobuf, encoded by hand the way the kubelet's generated code lays it out ------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def pod(namespace: str, name: str, containers: dict[str, dict[str, list[str]]]) -> bytes:
    """PodResources{name, namespace, containers{name, devices{resource_name, device_ids}, cpu_ids}}."""
    body = _field(1, name) + _field(2, namespace)
    for container, resources in containers.items():
        devices = b"".join(
            _field(2, _field(1, resource) + b"".join(_field(2, i) for i in ids) + _field(3, _field(1, _field(1, _varint(0)))))
            for resource, ids in resources.items()
        )
        cpu_ids = _varint(3 << 3 | 0) + _varint(7)  # an unpacked int64 the decoder must skip
        body += _field(3, _field(1, container) + devices + cpu_ids)
    return _field(1, body)


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[tuple[Path, dict[str, bytes]]]:
    """A real gRPC server on a unix socket answering ``/v1.PodResourcesLister/List`` with ``answer["body"]``."""
    answer = {"body": b""}
    socket_path = tmp_path / "kubelet.sock"

    def list_pods(request: bytes, context: grpc.ServicerContext) -> bytes:
        assert request == b""  # ListPodResourcesRequest has no fields
        return answer["body"]

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "v1.PodResourcesLister", {"List": grpc.unary_unary_rpc_method_handler(list_pods)})])
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    try:
        yield socket_path, answer
    finally:
        server.stop(None)


def test_the_pod_resources_answer_maps_gpus_to_pod_containers_and_ignores_other_devices() -> None:
    body = (
        pod("research", "train-0", {"trainer": {"nvidia.com/gpu": ["GPU-a", "GPU-b"], "example.com/nic": ["nic0"]}})
        + pod("research", "notebook", {"lab": {"nvidia.com/gpu": ["GPU-c::1"]}, "sidecar": {}})
        + pod("vision", "infer", {"server": {"nvidia.com/gpu": ["GPU-c::2"]}})
    )
    owners = decode_list_response(body)
    assert owners == {
        "GPU-a": [PodContainer("research", "train-0", "trainer")],
        "GPU-b": [PodContainer("research", "train-0", "trainer")],
        "GPU-c": [PodContainer("research", "notebook", "lab"), PodContainer("vision", "infer", "server")],  # time-sliced
    }
    assert decode_list_response(b"") == {}
    with pytest.raises(ProtobufError):
        decode_list_response(_field(1, "x")[:-1] + b"\x80")


@pytest.mark.parametrize(("cgroup", "job"), [
    ("4:memory:/slurm/uid_1000/job_4242/step_0/task_0\n", "4242"),
    ("0::/system.slice/slurmstepd.scope/job_77/step_batch/user/task_0\n", "77"),
    ("0::/system.slice/slurmstepd.scope\n", ""),
    ("0::/user.slice/user-1000.slice/job_9.scope\n", ""),  # not slurmd's
])
def test_slurm_job_from_cgroup(cgroup: str, job: str) -> None:
    assert procinfo.slurm_job_of(cgroup) == job


def fake_proc(root: Path, pid: int, name: str, cgroup: str) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "comm").write_text(name + "\n")
    (root / str(pid) / "cgroup").write_text(cgroup)


def test_job_mapping_directory_in_dcgm_exporters_format(tmp_path: Path) -> None:
    (tmp_path / "0").write_text("4242\n")
    (tmp_path / "1").write_text("100\n101 1000\n\n")  # dcgm-exporter reads the first word of each line
    (tmp_path / "2").write_text("$(rm -rf /)\n")  # not a job id: never a label value
    (tmp_path / "GPU-fake-3").write_text("\n".join(str(i) for i in range(100)))
    (tmp_path / "sub").mkdir()
    mapping = read_job_mapping(tmp_path)
    assert mapping["0"] == ["4242"]
    assert mapping["1"] == ["100", "101"]
    assert "2" not in mapping and "sub" not in mapping
    assert len(mapping["GPU-fake-3"]) == MAX_JOBS_PER_GPU
    assert read_job_mapping(tmp_path / "absent") == {}


def test_processes_are_attributed_to_containers_pods_jobs_and_users(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kubelet: tuple[Path, dict[str, bytes]],
) -> None:
    fake = FakeNvml(gpus=3)
    fake.install(monkeypatch)
    socket_path, answer = kubelet
    answer["body"] = pod("research", "train-0", {"trainer": {"nvidia.com/gpu": ["GPU-fake-0"]}}) + pod(
        "vision", "idle-notebook", {"lab": {"nvidia.com/gpu": ["GPU-fake-2"]}})
    proc = tmp_path / "proc"
    fake_proc(proc, 1001, "python", f"0::/kubepods.slice/kubepods-pod1b2c3d4e_5f60_7182_93a4_b5c6d7e8f901.slice/cri-containerd-{CONTAINER}.scope\n")
    fake_proc(proc, 2002, "train.py", "0::/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0\n")
    fake_proc(proc, 2003, "helper", "0::/user.slice/user-0.slice/session-1.scope\n")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "1").write_text("4242\n4243\n")  # two jobs share GPU 1: a process without a job cgroup gets none
    fake.processes = {0: [(1001, 10 * MIB)], 1: [(2002, 20 * MIB), (2003, 1 * MIB)]}
    attributor = Attributor(PodResourcesClient(socket_path), jobs)
    collector = ProcessesCollector(supervisor_for(NvmlBackend()), 1.0, 1.0, 8, proc=proc, attributor=attributor)
    found = samples(collector)
    me = procinfo.user_name(os.getuid())

    def process(pid: str) -> dict[str, str]:
        (labels,) = [dict(lbl) for (name, lbl) in found if name == "mlwarden_gpu_process_memory_used_bytes" and dict(lbl)["pid"] == pid]
        return labels

    assert process("1001") == {"gpu": "0", "uuid": "GPU-fake-0", "pid": "1001", "process": "python", "user": me,
                               "container_id": CONTAINER[:12], "namespace": "research", "pod": "train-0",
                               "container": "trainer", "slurm_job": ""}
    assert process("2002")["slurm_job"] == "4242" and process("2002")["pod"] == ""
    assert process("2003")["slurm_job"] == ""
    allocations = sorted(
        (lbl["gpu"], lbl["namespace"], lbl["pod"], lbl["container"], lbl["slurm_job"], lbl["user"], lbl["container_id"])
        for lbl in (dict(labels) for (name, labels) in found if name == "mlwarden_gpu_allocation_info"))
    assert allocations == [
        ("0", "research", "train-0", "trainer", "", me, CONTAINER[:12]),
        ("1", "", "", "", "", me, ""),  # the helper process
        ("1", "", "", "", "4242", me, ""),
        ("1", "", "", "", "4243", "", ""),  # allocated by the job map, no visible process
        ("2", "vision", "idle-notebook", "lab", "", "", ""),  # allocated, no visible process (no hostPID)
    ]
    collector.stop()


def test_every_source_is_off_without_error_where_absent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeNvml(gpus=1)
    fake.install(monkeypatch)
    fake.processes = {0: [(4242, 5 * MIB)]}
    attributor = Attributor(PodResourcesClient(tmp_path / "no-kubelet.sock"), tmp_path / "no-job-map")
    collector = ProcessesCollector(supervisor_for(NvmlBackend()), 1.0, 1.0, 8, proc=tmp_path / "proc", attributor=attributor)
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            collected = collector.collect()
            assert collected.success
    found = samples(collector)
    (labels,) = [dict(lbl) for (name, lbl) in found if name == "mlwarden_gpu_allocation_info"]
    assert labels == {"gpu": "0", "uuid": "GPU-fake-0", "gpu_instance": "", "compute_instance": "",
                      "namespace": "", "pod": "", "container": "", "slurm_job": "",
                      "user": "", "container_id": ""}  # the process exited before /proc was read: a workload still holds the GPU
    said = [r.getMessage() for r in caplog.records]
    assert sum("Kubernetes pod attribution off" in line for line in said) == 1
    assert sum("job-mapping directory" in line for line in said) == 1


def test_a_kubelet_that_fails_or_answers_garbage_is_logged_once_and_recovers(
    kubelet: tuple[Path, dict[str, bytes]], caplog: pytest.LogCaptureFixture,
) -> None:
    socket_path, answer = kubelet
    client = PodResourcesClient(socket_path)
    answer["body"] = b"\x0a\x05ab"  # a length running past the end
    with caplog.at_level(logging.INFO):
        assert client.gpu_owners() is None
        assert client.gpu_owners() is None
        answer["body"] = pod("ns", "p", {"c": {"nvidia.com/gpu": ["GPU-x"]}})
        assert client.gpu_owners() == {"GPU-x": [PodContainer("ns", "p", "c")]}
    assert sum("pod labels are empty" in r.getMessage() for r in caplog.records) == 1
    assert sum("answers again" in r.getMessage() for r in caplog.records) == 1
    client.close()


def test_a_failure_whose_details_is_not_callable_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The warning used to call ``getattr(exc, "details", ...)()`` on whatever it found (ruff F821
    pointed at that line): an exception carrying ``details`` as data raised TypeError out of
    ``gpu_owners`` and failed the processes collector's whole pass."""

    class DetailedError(RuntimeError):
        details = "kubelet restarting"

    def call(request: bytes, timeout: float) -> object:
        raise DetailedError("connection reset")

    client = PodResourcesClient(tmp_path / "kubelet.sock")
    client._call = call  # as if connected: the failure comes from the call itself
    with caplog.at_level(logging.WARNING):
        assert client.gpu_owners() is None
    (line,) = [r.getMessage() for r in caplog.records if "pod labels are empty" in r.getMessage()]
    assert "connection reset" in line


def test_pods_holding_mig_devices_are_mapped_to_the_parent_gpu_and_its_instances(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kubelet: tuple[Path, dict[str, bytes]],
) -> None:
    fake = FakeNvml(gpus=2)
    fake.install(monkeypatch)
    fake.mig[0] = [(1, 0, "3g.40gb", 10 * MIB, 40_000 * MIB), (2, 0, "3g.40gb", 0, 40_000 * MIB)]
    socket_path, answer = kubelet
    answer["body"] = (
        pod("research", "train-0", {"trainer": {"nvidia.com/mig-3g.40gb": ["MIG-fake-0-1-0"]}})  # the MIG device's UUID
        + pod("vision", "infer-0", {"server": {"nvidia.com/mig-3g.40gb": ["MIG-GPU-fake-0/2/0"]}})  # before driver R470
        + pod("research", "big", {"trainer": {"nvidia.com/gpu": ["GPU-fake-1"]}})
    )
    proc = tmp_path / "proc"
    fake_proc(proc, 1001, "python", "0::/\n")  # no container in its cgroup: the pod comes from its MIG device
    fake.processes = {0: [(1001, 10 * MIB)]}
    fake.process_instances = {1001: (1, 0)}
    collector = ProcessesCollector(supervisor_for(NvmlBackend()), 1.0, 1.0, 8, proc=proc,
                                   attributor=Attributor(PodResourcesClient(socket_path)))
    found = samples(collector)
    (process,) = [dict(labels) for name, labels in found if name == "mlwarden_gpu_process_memory_used_bytes"]
    assert (process["gpu"], process["namespace"], process["pod"], process["container"]) == ("0", "research", "train-0", "trainer")
    allocations = sorted(
        (lbl["gpu"], lbl["uuid"], lbl["gpu_instance"], lbl["compute_instance"], lbl["namespace"], lbl["pod"])
        for lbl in (dict(labels) for name, labels in found if name == "mlwarden_gpu_allocation_info"))
    assert allocations == [
        ("0", "GPU-fake-0", "1", "0", "research", "train-0"),  # its process is visible
        ("0", "GPU-fake-0", "2", "0", "vision", "infer-0"),  # allocated, no visible process
        ("1", "GPU-fake-1", "", "", "research", "big"),  # a whole GPU
    ]
    collector.stop()
