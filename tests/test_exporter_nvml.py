"""The NVML path, against a fake at the pynvml function boundary.

The fake replaces pynvml's functions (monkeypatch) and raises pynvml's real exception
classes, built the way pynvml builds them (``NVMLError(code)`` returns the subclass), so
the exporter's error handling is exercised exactly as a driver would exercise it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
from mlwarden.exporter import cli as exporter_cli
from mlwarden.exporter import procinfo
from mlwarden.exporter.app import Exporter
from mlwarden.exporter.backends import nvml as nvml_backend
from mlwarden.exporter.backends.base import THROTTLE_REASONS, BackendUnavailable, GpuBackend
from mlwarden.exporter.backends.nvml import NvmlBackend
from mlwarden.exporter.backends.supervisor import BackendSupervisor
from mlwarden.exporter.collectors.base import Collector
from mlwarden.exporter.collectors.gpu import GpuCollector
from mlwarden.exporter.collectors.processes import ProcessesCollector
from mlwarden.exporter.collectors.xid import XidCollector
from mlwarden.exporter.loop import CollectionLoop
from mlwarden.exporter.server import ExporterServer
from mlwarden.exporter.snapshot import SnapshotStore, render
from prometheus_client.parser import text_string_to_metric_families

from mlwarden import settings
from mlwarden.backoff import Backoff, RetrySchedule
from mlwarden.components import free_port, wait_until
from mlwarden.exitcodes import ExitCode
from tests.fake_nvml import MIB, FakeNvml, Handle, nvml_error

__all__ = ["MIB", "FakeNvml", "Handle", "nvml_error", "samples", "supervisor_for", "value"]

def test_nvml_error_codes_build_the_real_subclasses() -> None:
    assert type(nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)) is pynvml.NVMLError_NotSupported
    assert type(nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)) is pynvml.NVMLError_GpuIsLost
    assert type(nvml_error(pynvml.NVML_ERROR_TIMEOUT)) is pynvml.NVMLError_Timeout
    assert type(nvml_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)) is pynvml.NVMLError_LibraryNotFound


def test_every_throttle_reason_of_the_contract_has_its_nvml_bit() -> None:
    assert tuple(nvml_backend._THROTTLE_BITS) == THROTTLE_REASONS


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    nvml = FakeNvml()
    nvml.install(monkeypatch)
    return nvml


def supervisor_for(backend: GpuBackend) -> BackendSupervisor:
    return BackendSupervisor(backend, RetrySchedule(Backoff(initial=0.0, maximum=0.0)))  # retry at once: tests need no waiting


def samples(collector: Collector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    collected = collector.collect()
    text = render(collected.made()).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict, metric: str, **labels: str) -> float | None:
    return found.get((metric, tuple(sorted(labels.items()))))


def test_readings_are_converted_to_base_units(fake: FakeNvml) -> None:
    found = samples(GpuCollector(supervisor_for(NvmlBackend()), 1.0, 1.0))
    gpu = {"gpu": "0", "uuid": "GPU-fake-0"}
    assert value(found, "mlwarden_nvml_up") == 1
    assert value(found, "mlwarden_gpu_info", **gpu, name="NVIDIA H100 80GB HBM3", pci_bus_id="00000000:18:00.0",
                 driver_version="550.54.15", cuda_version="12.4") == 1
    assert value(found, "mlwarden_gpu_up", **gpu) == 1
    assert value(found, "mlwarden_gpu_temperature_celsius", **gpu) == 60
    assert value(found, "mlwarden_gpu_memory_temperature_celsius", **gpu) == 70
    assert value(found, "mlwarden_gpu_utilization_ratio", **gpu) == 0.5
    assert value(found, "mlwarden_gpu_memory_utilization_ratio", **gpu) == 0.25
    assert value(found, "mlwarden_gpu_memory_total_bytes", **gpu) == 80_000 * MIB
    assert value(found, "mlwarden_gpu_memory_reserved_bytes", **gpu) == 500 * MIB
    assert value(found, "mlwarden_gpu_power_watts", **gpu) == 250
    assert value(found, "mlwarden_gpu_power_limit_watts", **gpu) == 700
    assert value(found, "mlwarden_gpu_energy_joules_total", **gpu) == 1500
    assert value(found, "mlwarden_gpu_fan_speed_ratio", **gpu) == 0.4
    assert value(found, "mlwarden_gpu_clock_hz", **gpu, clock="sm") == 1.98e9
    assert value(found, "mlwarden_gpu_clock_hz", **gpu, clock="memory") == 2.619e9
    assert value(found, "mlwarden_gpu_throttle_reason_active", **gpu, reason="hw_thermal_slowdown") == 1
    assert value(found, "mlwarden_gpu_throttle_reason_active", **gpu, reason="sw_power_cap") == 1
    assert value(found, "mlwarden_gpu_throttle_reason_active", **gpu, reason="gpu_idle") == 0
    assert value(found, "mlwarden_gpu_ecc_errors_total", **gpu, error_type="corrected", counter="aggregate") == 3
    assert value(found, "mlwarden_gpu_pcie_link_width", **gpu) == 16
    assert value(found, "mlwarden_gpu_retired_pages", **gpu, cause="double_bit_ecc") == 0
    assert value(found, "mlwarden_gpu_remapped_rows", **gpu, state="correctable") == 2
    assert value(found, "mlwarden_gpu_temperature_celsius", gpu="1", uuid="GPU-fake-1") == 61


def test_not_supported_and_sentinels_omit_the_series_instead_of_reporting_zero(fake: FakeNvml) -> None:
    not_supported = nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
    unsupported_field = [SimpleNamespace(nvmlReturn=pynvml.NVML_ERROR_NOT_SUPPORTED, valueType=1, value=SimpleNamespace(uiVal=0))]
    fake.fail.update({
        ("nvmlDeviceGetFanSpeed", 0): not_supported,
        ("nvmlDeviceGetTotalEccErrors", 0): not_supported,
        ("nvmlDeviceGetRemappedRows", 0): not_supported,
        ("nvmlDeviceGetCurrentClocksEventReasons", 0): nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND),
        ("nvmlDeviceGetFieldValues", 0): lambda: unsupported_field,
        ("nvmlDeviceGetPowerUsage", 0): 0xFFFFFFFF,
        ("nvmlDeviceGetTotalEnergyConsumption", 0): 9223372036854775794,
        ("nvmlDeviceGetCurrPcieLinkWidth", 0): 0xFFFFFFFF,
        ("nvmlDeviceGetTemperature", 0): "N/A",
        ("nvmlDeviceGetPerformanceState", 0): 32,  # NVML_PSTATE_UNKNOWN
    })
    found = samples(GpuCollector(supervisor_for(NvmlBackend()), 1.0, 1.0))
    gpu0 = {"gpu": "0", "uuid": "GPU-fake-0"}
    names_for_gpu0 = {name for (name, labels) in found if ("gpu", "0") in labels}
    for omitted in (
        "mlwarden_gpu_fan_speed_ratio", "mlwarden_gpu_ecc_errors_total", "mlwarden_gpu_remapped_rows",
        "mlwarden_gpu_memory_temperature_celsius", "mlwarden_gpu_power_watts", "mlwarden_gpu_energy_joules_total",
        "mlwarden_gpu_pcie_link_width", "mlwarden_gpu_temperature_celsius", "mlwarden_gpu_performance_state",
    ):
        assert omitted not in names_for_gpu0, omitted
    # the older throttle-reasons call answers when the newer one does not exist
    assert value(found, "mlwarden_gpu_throttle_reason_active", **gpu0, reason="gpu_idle") == 1
    assert value(found, "mlwarden_gpu_up", **gpu0) == 1
    assert value(found, "mlwarden_gpu_power_watts", gpu="1", uuid="GPU-fake-1") == 250


def test_a_driver_without_v2_memory_info_falls_back_to_v1(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = fake.nvmlDeviceGetMemoryInfo

    def old_driver(h: Handle, version: int | None = None) -> Any:
        if version:
            raise nvml_error(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        return plain(h)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", old_driver)
    found = samples(GpuCollector(supervisor_for(NvmlBackend()), 1.0, 1.0))
    gpu = {"gpu": "0", "uuid": "GPU-fake-0"}
    assert value(found, "mlwarden_gpu_up", **gpu) == 1  # not taken for a lost GPU
    assert value(found, "mlwarden_gpu_memory_total_bytes", **gpu) == 80_000 * MIB
    assert value(found, "mlwarden_gpu_memory_reserved_bytes", **gpu) is None  # v1 has no reserved field


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_TIMEOUT])
def test_a_lost_gpu_is_down_the_others_keep_reporting_and_nvml_is_reinitialised(fake: FakeNvml, code: int) -> None:
    fake.fail[("nvmlDeviceGetTemperature", 1)] = nvml_error(code)
    collector = GpuCollector(supervisor_for(NvmlBackend()), 1.0, 1.0)
    found = samples(collector)
    assert value(found, "mlwarden_gpu_up", gpu="1", uuid="") == 0
    assert not any(("gpu", "1") in labels for (name, labels) in found if name != "mlwarden_gpu_up")
    assert value(found, "mlwarden_gpu_up", gpu="0", uuid="GPU-fake-0") == 1
    assert value(found, "mlwarden_gpu_temperature_celsius", gpu="0", uuid="GPU-fake-0") == 60
    assert fake.inits == 1
    samples(collector)  # the next pass re-initialises NVML first
    assert fake.inits == 2
    del fake.fail[("nvmlDeviceGetTemperature", 1)]
    found = samples(collector)
    assert value(found, "mlwarden_gpu_up", gpu="1", uuid="GPU-fake-1") == 1


def test_a_gpu_gone_from_the_device_list_after_reinit_stays_reported_down(fake: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
    fake.gpus = 3
    collector = GpuCollector(supervisor_for(NvmlBackend()), 1.0, 1.0)
    assert {value(samples(collector), "mlwarden_gpu_up", gpu=str(i), uuid=f"GPU-fake-{i}") for i in range(3)} == {1}
    fake.fail[("nvmlDeviceGetTemperature", 1)] = nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
    assert value(samples(collector), "mlwarden_gpu_up", gpu="1", uuid="GPU-fake-1") == 0
    # GPU 1 fell off the bus: after the re-init NVML lists two GPUs, and the old GPU 2 is now index 1
    del fake.fail[("nvmlDeviceGetTemperature", 1)]
    fake.gpus = 2
    fake.fail[("nvmlDeviceGetUUID", 1)] = "GPU-fake-2"
    with caplog.at_level(logging.WARNING):
        for passes in (1, 2):
            found = samples(collector)
            assert fake.inits == 1 + passes  # it keeps re-initialising (with backoff): the GPU may come back
            assert value(found, "mlwarden_gpu_up", gpu="1", uuid="GPU-fake-1") == 0
            assert not any(("uuid", "GPU-fake-1") in labels for (name, labels) in found if name != "mlwarden_gpu_up")
            assert value(found, "mlwarden_gpu_up", gpu="1", uuid="GPU-fake-2") == 1
            assert value(found, "mlwarden_gpu_up", gpu="0", uuid="GPU-fake-0") == 1
            assert not any(("gpu", "2") in labels for (_, labels) in found)  # moved, not gone
            assert sorted(labels for (name, labels) in found if name == "mlwarden_gpu_up") == [
                (("gpu", "0"), ("uuid", "GPU-fake-0")), (("gpu", "1"), ("uuid", "GPU-fake-1")), (("gpu", "1"), ("uuid", "GPU-fake-2"))]
    gone = [r for r in caplog.records if "no longer among" in r.getMessage()]
    assert len(gone) == 1 and "GPU-fake-1" in gone[0].getMessage()  # said once, not every pass
    # the driver lists all three again
    fake.gpus = 3
    del fake.fail[("nvmlDeviceGetUUID", 1)]
    found = samples(collector)
    assert {labels: v for (name, labels), v in found.items() if name == "mlwarden_gpu_up"} == {
        (("gpu", str(i)), ("uuid", f"GPU-fake-{i}")): 1 for i in range(3)}


def test_reinitialisation_backs_off(fake: FakeNvml) -> None:
    now = [0.0]
    supervisor = BackendSupervisor(NvmlBackend(), RetrySchedule(Backoff(10.0, 60.0, rand=lambda: 1.0), clock=lambda: now[0]))  # no jitter
    fake.fail[("nvmlDeviceGetHandleByIndex", 0)] = nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
    collector = GpuCollector(supervisor, 1.0, 1.0)
    samples(collector)
    samples(collector)
    assert fake.inits == 1  # within the 10 s backoff: no re-init storm
    now[0] = 11.0
    samples(collector)
    assert fake.inits == 2
    now[0] = 22.0  # the delay doubled to 20 s
    samples(collector)
    assert fake.inits == 2
    now[0] = 32.0
    samples(collector)
    assert fake.inits == 3


def test_without_nvml_library_it_serves_nvml_up_0_and_logs_once(fake: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
    fake.init_error = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    supervisor = supervisor_for(NvmlBackend())
    collector = GpuCollector(supervisor, 1.0, 1.0)
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            collected = collector.collect()
            assert not collected.success
    found = samples(collector)
    assert found == {("mlwarden_nvml_up", ()): 0}
    warnings = [r for r in caplog.records if "NVML is not available" in r.getMessage()]
    assert len(warnings) == 1
    assert fake.inits >= 3  # it keeps trying (a driver may be loaded later)
    assert not ProcessesCollector(supervisor, 1.0, 1.0, 10).collect().success


def test_with_gpu_backend_nvml_a_missing_library_exits_1(fake: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
    fake.init_error = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    loaded = settings.load(exporter_cli.ExporterSettings, "exporter", ["--gpu-backend", "nvml", "--listen-address", f"127.0.0.1:{free_port()}"], {})
    with caplog.at_level(logging.ERROR):
        assert exporter_cli.run(loaded) == ExitCode.FAILURE
    assert "NVML is not available" in caplog.text and "--gpu-backend auto" in caplog.text


def test_with_gpu_backend_nvml_the_exporter_starts_nvml_once_through_the_supervisor(fake: FakeNvml) -> None:
    loaded = settings.load(exporter_cli.ExporterSettings, "exporter",
                           ["--gpu-backend", "nvml", "--listen-address", f"127.0.0.1:{free_port()}"], {})
    exporter = Exporter.from_settings(loaded)
    try:
        assert exporter.supervisor.available
        assert fake.inits == 1
        assert exporter.supervisor.ensure()  # already usable: no second initialisation
        assert fake.inits == 1
        exporter.start()
        assert fake.inits == 1  # the collectors find it started
    finally:
        exporter.stop()  # also releases the listening socket


def test_supervisor_start_raises_and_stays_unavailable_without_a_driver(fake: FakeNvml) -> None:
    fake.init_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    supervisor = supervisor_for(NvmlBackend())
    with pytest.raises(BackendUnavailable):
        supervisor.start()
    assert not supervisor.available
    fake.init_error = None
    supervisor.start()  # a driver loaded later
    assert supervisor.available and supervisor.ensure()
    assert fake.inits == 2


def test_processes_merge_compute_and_graphics_cap_and_vanish(fake: FakeNvml) -> None:
    supervisor = supervisor_for(NvmlBackend())
    GpuCollector(supervisor, 1.0, 1.0).collect()  # learns the UUIDs
    fake.processes[0] = [(4242, 3 * MIB), (4243, 1 * MIB), (4244, 2 * MIB), (4245, None)]
    fake.fail[("nvmlDeviceGetGraphicsRunningProcesses", 0)] = lambda: [SimpleNamespace(pid=4242, usedGpuMemory=5 * MIB)]
    collector = ProcessesCollector(supervisor, 1.0, 1.0, max_processes=2)
    found = samples(collector)
    memory = {dict(labels)["pid"]: v for (name, labels), v in found.items() if name == "mlwarden_gpu_process_memory_used_bytes"}
    assert memory == {"4242": 5 * MIB, "4244": 2 * MIB}  # the two largest; the larger of both answers
    assert value(found, "mlwarden_gpu_processes", gpu="0", uuid="GPU-fake-0") == 4  # counted before the cap
    fake.processes[0] = [(4244, 2 * MIB)]
    del fake.fail[("nvmlDeviceGetGraphicsRunningProcesses", 0)]
    found = samples(collector)
    pids = {dict(labels)["pid"] for (name, labels) in found if name == "mlwarden_gpu_process_memory_used_bytes"}
    assert pids == {"4244"}  # exited processes are gone at the next collection


def test_xid_events_from_the_nvml_event_set_count_every_repeat(fake: FakeNvml) -> None:
    supervisor = supervisor_for(NvmlBackend())
    GpuCollector(supervisor, 1.0, 1.0).collect()
    fake.xids.extend([(1, 79), (1, 79), (1, 79), (0, 48)])
    collector = XidCollector(supervisor, 1.0, 1.0)
    collector.start()
    try:
        # counted, not only taken off the fake's queue: the last one is recorded after it is popped
        found = wait_until(lambda: (f := samples(collector)) and sum(
            v for (name, _), v in f.items() if name == "mlwarden_gpu_xid_errors_total") == 4 and f,
            10, "the collector to count every XID event", poll=0.02)
    finally:
        collector.stop()
    assert value(found, "mlwarden_gpu_xid_errors_total", gpu="1", uuid="GPU-fake-1", xid="79") == 3
    assert value(found, "mlwarden_gpu_xid_errors_total", gpu="0", uuid="GPU-fake-0", xid="48") == 1
    assert value(found, "mlwarden_gpu_xid_last_timestamp_seconds", gpu="1", uuid="GPU-fake-1", xid="79") > 1e9


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_hung_nvml_call_marks_data_stale_and_scrapes_still_answer(fake: FakeNvml) -> None:
    release = threading.Event()
    supervisor = supervisor_for(NvmlBackend())
    collector = GpuCollector(supervisor, interval=0.2, timeout=0.3)
    store = SnapshotStore([(collector.name, collector.interval)], "test")
    loop = CollectionLoop([collector], store)
    server = ExporterServer(store, ("127.0.0.1", free_port()))
    url = f"http://127.0.0.1:{server.port}"
    loop.start()
    server.start()
    try:
        wait_until(lambda: "mlwarden_gpu_temperature_celsius{" in _get(url + "/metrics")[1], 10, "the first GPU sample")
        assert _get(url + "/healthz")[0] == 200
        fake.fail[("nvmlDeviceGetTemperature", 0)] = lambda: release.wait(30) and 60
        status, body = wait_until(lambda: (r := _get(url + "/metrics")) and 'collector_success{collector="gpu"} 0.0' in r[1] and r,
                                  10, "the hung collector to be reported")
        assert status == 200
        assert "mlwarden_gpu_temperature_celsius{" not in body  # stale data is dropped, not served as current
        assert wait_until(lambda: _get(url + "/healthz")[0] == 503, 10, "/healthz to answer 503")
        assert "gpu" in _get(url + "/healthz")[1]
        alive = [t for t in threading.enumerate() if t.name == "collector-gpu"]
        assert len(alive) == 1  # one hung pass, not a pile of threads
        release.set()
        wait_until(lambda: 'collector_success{collector="gpu"} 1.0' in _get(url + "/metrics")[1], 10, "the collector to recover")
        wait_until(lambda: _get(url + "/healthz")[0] == 200, 10, "/healthz to answer 200 again")
    finally:
        release.set()
        server.stop()
        loop.stop()


def _counting(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple]:
    """Record the arguments of every call of one fake NVML function."""
    calls: list[tuple] = []
    real = getattr(fake, name)

    def counted(*args: object) -> object:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(pynvml, name, counted)
    return calls


def test_an_answer_of_not_supported_is_remembered_until_nvml_is_reinitialised(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.fail[("nvmlDeviceGetFanSpeed", 0)] = nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)  # permanent: no fan
    fake.fail[("nvmlDeviceGetPowerUsage", 0)] = nvml_error(pynvml.NVML_ERROR_NO_PERMISSION)  # may change: asked again
    fans = _counting(fake, monkeypatch, "nvmlDeviceGetFanSpeed")
    power = _counting(fake, monkeypatch, "nvmlDeviceGetPowerUsage")
    backend = NvmlBackend()
    collector = GpuCollector(supervisor_for(backend), 1.0, 1.0)
    for _ in range(3):
        found = samples(collector)
        assert value(found, "mlwarden_gpu_fan_speed_ratio", gpu="0", uuid="GPU-fake-0") is None  # omitted, as before
        assert value(found, "mlwarden_gpu_fan_speed_ratio", gpu="1", uuid="GPU-fake-1") == 0.4
    assert [args[0].index for args in fans] == [0, 1, 1, 1]  # GPU 0 once, GPU 1 every pass
    assert [args[0].index for args in power].count(0) == 3
    backend.recover()  # a driver reload may bring the field: asked again
    del fake.fail[("nvmlDeviceGetFanSpeed", 0)]
    assert value(samples(collector), "mlwarden_gpu_fan_speed_ratio", gpu="0", uuid="GPU-fake-0") == 0.4


def test_a_pass_reads_every_field_value_of_a_gpu_in_one_call(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(fake, monkeypatch, "nvmlDeviceGetFieldValues")
    collector = GpuCollector(supervisor_for(NvmlBackend()), 1.0, 1.0)
    samples(collector)  # the first pass also finds which NVLinks exist
    calls.clear()
    found = samples(collector)
    assert [args[0].index for args in calls] == [0, 1]
    gpu0 = {"gpu": "0", "uuid": "GPU-fake-0"}
    assert value(found, "mlwarden_gpu_memory_temperature_celsius", **gpu0) == 70
    assert value(found, "mlwarden_gpu_pcie_bytes_total", **gpu0, direction="rx") == 2 * 10**9
    assert value(found, "mlwarden_gpu_nvlink_bytes_total", **gpu0, link="1", direction="tx") == 2000 * 1024


def test_a_process_on_several_gpus_is_read_from_proc_once_a_pass(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake.processes = {0: [(4242, 3 * MIB)], 1: [(4242, 5 * MIB)]}
    read: list[int] = []
    real = procinfo.describe
    monkeypatch.setattr(procinfo, "describe", lambda pid, proc: read.append(pid) or real(pid, proc))
    collector = ProcessesCollector(supervisor_for(NvmlBackend()), 1.0, 1.0, 8, proc=tmp_path)
    found = samples(collector)
    assert read == [4242]
    assert {dict(labels)["gpu"] for name, labels in found if name == "mlwarden_gpu_process_memory_used_bytes"} == {"0", "1"}
    samples(collector)
    assert read == [4242, 4242]  # no /proc entry to tell it is the same process: looked up again


def test_a_process_is_read_from_proc_once_while_its_entry_stays_and_again_when_the_pid_is_reused(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    def start(name: str) -> None:
        (tmp_path / "4242").mkdir()
        (tmp_path / "4242" / "comm").write_text(name + "\n")
        (tmp_path / "4242" / "cgroup").write_text("0::/\n")

    fake.processes = {0: [(4242, 3 * MIB)]}
    read: list[int] = []
    real = procinfo.describe
    monkeypatch.setattr(procinfo, "describe", lambda pid, proc: read.append(pid) or real(pid, proc))
    start("train.py")
    collector = ProcessesCollector(supervisor_for(NvmlBackend()), 1.0, 1.0, 8, proc=tmp_path)

    def names() -> set[str]:
        return {dict(labels)["process"] for name, labels in samples(collector) if name == "mlwarden_gpu_process_memory_used_bytes"}

    assert names() == {"train.py"} and names() == {"train.py"}
    assert read == [4242]
    for entry in (tmp_path / "4242").iterdir():  # the process exits; another one gets its PID
        entry.unlink()
    (tmp_path / "4242").rmdir()
    start("eval.py")
    assert names() == {"eval.py"}
    assert read == [4242, 4242]



def test_a_pass_like_the_one_before_serves_the_same_series_and_every_change_shows(fake: FakeNvml, tmp_path: Path) -> None:
    """A GPU whose processes, their /proc entries and the allocation sources did not change keeps its series
    from the pass before (the collector's shortcut); each kind of change must still reach the series."""
    from mlwarden.exporter.attribution import Attributor

    proc, mapping = tmp_path / "proc", tmp_path / "jobs"
    mapping.mkdir()

    def start(name: str) -> None:
        (proc / "4242").mkdir(parents=True)
        (proc / "4242" / "comm").write_text(name + "\n")
        (proc / "4242" / "cgroup").write_text("0::/\n")

    start("train.py")
    fake.processes = {0: [(4242, 3 * MIB)]}
    collector = ProcessesCollector(supervisor_for(NvmlBackend()), 1.0, 1.0, 8, proc=proc, attributor=Attributor(None, mapping))

    def memory(found: dict) -> dict[str, float]:
        return {dict(labels)["process"]: v for (name, labels), v in found.items() if name == "mlwarden_gpu_process_memory_used_bytes"}

    first = samples(collector)
    assert memory(first) == {"train.py": 3 * MIB} and samples(collector) == first
    fake.processes = {0: [(4242, 4 * MIB)]}  # the memory moved
    assert memory(samples(collector)) == {"train.py": 4 * MIB}
    for entry in (proc / "4242").iterdir():  # the process exits; another one gets its PID, and the same memory
        entry.unlink()
    (proc / "4242").rmdir()
    start("eval.py")
    assert memory(samples(collector)) == {"eval.py": 4 * MIB}
    # two Slurm jobs are given the GPU: NVML's answer and the process are the same (with two jobs, neither is its)
    (mapping / "0").write_text("777\n778\n")
    found = samples(collector)
    jobs = {dict(labels)["slurm_job"] for name, labels in found if name == "mlwarden_gpu_allocation_info" and dict(labels)["gpu"] == "0"}
    assert jobs == {"", "777", "778"}
    fake.processes = {0: [(4242, 4 * MIB), (4343, 1 * MIB)]}
    assert value(samples(collector), "mlwarden_gpu_processes", gpu="0", uuid="GPU-fake-0") == 2


def test_a_process_whose_job_comes_from_the_mapping_keeps_its_series_while_nothing_changes(fake: FakeNvml, tmp_path: Path) -> None:
    """The allocation sources fill in a process' job (or pod) when the series are made: the part of a pass like
    the one before is served again with them too (it was made anew every pass wherever a kubelet or a job map
    named the workload, the completed description being a new object each pass)."""
    from mlwarden.exporter.attribution import Attributor

    proc, mapping = tmp_path / "proc", tmp_path / "jobs"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "comm").write_text("train.py\n")
    (proc / "4242" / "cgroup").write_text("0::/\n")
    mapping.mkdir()
    (mapping / "0").write_text("777\n")
    fake.processes = {0: [(4242, 3 * MIB)]}
    collector = ProcessesCollector(supervisor_for(NvmlBackend()), 1.0, 1.0, 8, proc=proc, attributor=Attributor(None, mapping))
    first = samples(collector)
    part = collector._parts[0]
    assert samples(collector) == first and collector._parts[0] is part
    [(_, labels)] = [key for key in first if key[0] == "mlwarden_gpu_process_memory_used_bytes" and dict(key[1])["gpu"] == "0"]
    assert dict(labels)["slurm_job"] == "777" and dict(labels)["process"] == "train.py"
    (mapping / "0").write_text("778\n")  # the job map changed: the series change with it
    [(_, labels)] = [key for key in samples(collector) if key[0] == "mlwarden_gpu_process_memory_used_bytes" and dict(key[1])["gpu"] == "0"]
    assert dict(labels)["slurm_job"] == "778" and collector._parts[0] is not part

_COMPARE_PROCESS_PATHS = """
import dataclasses, json, pynvml
from mlwarden.exporter.backends.nvml import NvmlBackend, _ProcessLister

def listed(backend):
    backend.start()
    found = []
    for index in range(backend.device_count()):
        reading = backend.read(index)  # the parts of a reading that come from nvmlDeviceGetFieldValues
        fields = [reading.memory_temperature_celsius, reading.pcie_bytes, [(l.link, l.bytes) for l in reading.nvlinks]]
        whole = {f.name: getattr(reading, f.name) for f in dataclasses.fields(reading) if f.name != "profiling"}  # GPM: one sample, no interval
        whole["ecc_errors"] = str(whole["ecc_errors"])  # JSON keys: no tuples
        profiling = backend.read(index).profiling  # GPM between this pass's sample and the one before
        found.append([[vars(p) for p in backend.processes(index)], fields, whole, profiling])
    found.append([[(e.gpu, e.xid) for e in backend.wait_xid_events(0.01)] for _ in range(3)])  # two events, then none
    kinds = sorted({type(lister).__name__ for lister in backend._process_listers})
    kinds.append(type(backend._gpm._samplers[(0, None)].metrics).__name__)
    kinds += [type(backend._get_field_values).__name__, type(backend._process_utilization_reader).__name__,
              type(backend._wait_events).__name__]
    kinds += sorted({type(getter).__name__ for getter in vars(backend._get).values()})
    backend.close()
    return found, kinds

direct, direct_kinds = listed(NvmlBackend())
for name in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetFieldValues",
             "nvmlDeviceGetProcessUtilization", "nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetFanSpeed",
             "nvmlDeviceGetPerformanceState", "nvmlDeviceGetClockInfo", "nvmlDeviceGetCurrentClocksEventReasons",
             "nvmlDeviceGetCurrPcieLinkGeneration", "nvmlDeviceGetCurrPcieLinkWidth", "nvmlDeviceGetUtilizationRates",
             "nvmlDeviceGetEncoderUtilization", "nvmlDeviceGetDecoderUtilization", "nvmlGpmMetricsGet", "nvmlDeviceGetMemoryInfo",
             "nvmlEventSetWait"):
    wrapped = getattr(pynvml, name)
    setattr(pynvml, name, lambda *args, wrapped=wrapped: wrapped(*args))  # no longer pynvml's own
through_pynvml, pynvml_kinds = listed(NvmlBackend())
print(json.dumps([direct, direct_kinds, through_pynvml, pynvml_kinds], default=str))
"""


def test_the_direct_ctypes_calls_read_what_pynvml_reads_from_a_real_library(tmp_path: Path) -> None:
    """The C stand-in for libnvidia-ml.so.1 (bench/) is loaded for real: the ctypes paths that skip
    pynvml's wrappers must find the same processes, memory, MIG placement and field values as pynvml's."""
    from bench.bench_exporter import build_fake_nvml

    libdir = build_fake_nvml(tmp_path)
    pids = [os.getpid(), os.getppid(), *range(700_001, 700_040)]  # more than the first array holds: it must grow
    env = {**os.environ, "LD_LIBRARY_PATH": str(libdir), "MLWARDEN_FAKE_NVML_GPUS": "3",
           "MLWARDEN_FAKE_NVML_PIDS": ",".join(map(str, pids)), "MLWARDEN_FAKE_NVML_XIDS": "2:79,0:48"}
    answer = subprocess.run([sys.executable, "-c", _COMPARE_PROCESS_PATHS], env=env, capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0, answer.stderr
    direct, direct_kinds, through_pynvml, pynvml_kinds = json.loads(answer.stdout)
    assert direct_kinds == ["_ProcessLister", "_MetricsGetter", "_FuncPtr", "_UtilizationReader", "_EventWaiter",
                            "_Getter", "_MemoryGetter", "_PairGetter", "_StructGetter"]
    assert pynvml_kinds == ["function", "function", "NoneType", "function", "function", "function"]
    assert direct.pop() == [[[2, 79]], [[0, 48]], []] == through_pynvml.pop()  # XID events, then a wait that times out
    processes, (memory_temperature, pcie_bytes, nvlinks), whole, profiling = direct[0]
    assert profiling["sm_activity"] == 0.42 and profiling["fp32_activity"] == 0.125 and "fp64_activity" in profiling
    assert whole["temperature_celsius"] == 60 and whole["utilization_ratio"] == 0.5 and whole["encoder_utilization_ratio"] == 0.12
    assert whole["throttle_reasons"]["hw_thermal_slowdown"] and whole["sm_clock_hz"] and whole["pcie_link_width"] == 16
    assert whole["energy_joules"] == 1500 and whole["violation_seconds"]["power"] == 2.5 and whole["pcie_replays"] == 3
    assert whole["memory_reserved_bytes"] == 500 * 2**20 and whole["memory_used_bytes"] == 30000 * 2**20
    assert len(direct) == 3 and [p["pid"] for p in processes] == pids
    assert processes[0]["used_memory_bytes"] == 512 * 2**20 and processes[0]["gpu_instance"] is None
    assert processes[0]["sm_utilization_ratio"] == 0.1 and processes[40]["memory_utilization_ratio"] == 0.45
    assert memory_temperature == 70 and pcie_bytes == {"tx": 10**9, "rx": 2 * 10**9}
    assert nvlinks and nvlinks[1] == [1, {"tx": 2000 * 1024, "rx": 6000 * 1024}]
    assert direct == through_pynvml
