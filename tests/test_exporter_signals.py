"""The signals beyond the basics on the pynvml-boundary fake: GPM profiling, PCIe, NVLink, video
engines, violation time, pending retirements, MIG and per-process utilization; NOT_SUPPORTED paths
and GPUs without GPM omit series; promtool accepts every new family."""

from __future__ import annotations

import logging
import subprocess

import pynvml
import pytest
from mlwarden.exporter.backends import nvml as nvml_backend
from mlwarden.exporter.backends.nvml import NvmlBackend
from mlwarden.exporter.collectors.gpu import GpuCollector
from mlwarden.exporter.collectors.processes import ProcessesCollector
from mlwarden.exporter.snapshot import render

from tests.test_exporter_cost import Clock
from tests.test_exporter_nvml import MIB, FakeNvml, _counting, nvml_error, samples, supervisor_for, value

GPU0 = {"gpu": "0", "uuid": "GPU-fake-0"}
GPU1 = {"gpu": "1", "uuid": "GPU-fake-1"}
PROFILING = ("mlwarden_gpu_sm_activity_ratio", "mlwarden_gpu_sm_occupancy_ratio", "mlwarden_gpu_tensor_activity_ratio",
             "mlwarden_gpu_dram_bandwidth_utilization_ratio", "mlwarden_gpu_graphics_engine_activity_ratio",
             "mlwarden_gpu_pipe_activity_ratio", "mlwarden_gpu_nvlink_throughput_bytes_per_second")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    nvml = FakeNvml()
    nvml.install(monkeypatch)
    return nvml


def names_for(found: dict, gpu: str) -> set[str]:
    return {name for (name, labels) in found if ("gpu", gpu) in labels}


def test_gpm_profiling_covers_the_interval_between_passes_and_is_absent_without_gpm(
    fake: FakeNvml, caplog: pytest.LogCaptureFixture,
) -> None:
    del fake.gpm_percent[pynvml.NVML_GPM_METRIC_FP64_UTIL]  # one metric this GPU cannot compute
    collector = GpuCollector(supervisor_for(NvmlBackend()), 1.0, 1.0)
    with caplog.at_level(logging.INFO):
        first = samples(collector)
        assert not names_for(first, "0") & set(PROFILING)  # one sample is no interval: nothing, not zeros
        found = samples(collector)
        samples(collector)
    assert value(found, "mlwarden_gpu_sm_activity_ratio", **GPU0) == 0.42
    assert value(found, "mlwarden_gpu_sm_occupancy_ratio", **GPU0) == 0.25
    assert value(found, "mlwarden_gpu_tensor_activity_ratio", **GPU0) == 0.30
    assert value(found, "mlwarden_gpu_dram_bandwidth_utilization_ratio", **GPU0) == 0.55
    assert value(found, "mlwarden_gpu_graphics_engine_activity_ratio", **GPU0) == 0.90
    assert value(found, "mlwarden_gpu_pipe_activity_ratio", **GPU0, pipe="fp16") == 0.05
    assert value(found, "mlwarden_gpu_pipe_activity_ratio", **GPU0, pipe="fp32") == 0.125
    assert value(found, "mlwarden_gpu_pipe_activity_ratio", **GPU0, pipe="fp64") is None
    assert value(found, "mlwarden_gpu_pcie_throughput_bytes_per_second", **GPU0, direction="tx") == 100 * MIB  # GPM
    assert value(found, "mlwarden_gpu_nvlink_throughput_bytes_per_second", **GPU0, direction="rx") == 2000 * MIB
    # GPU 1 has no GPM: no profiling series at all, PCIe from NVML's own sample (KB/s)
    assert not names_for(found, "1") & set(PROFILING)
    assert value(found, "mlwarden_gpu_pcie_throughput_bytes_per_second", **GPU1, direction="rx") == 2000 * 1024
    said = [r.getMessage() for r in caplog.records if "Performance Monitoring" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("GPU 1")


def test_gpm_starts_over_after_nvml_is_reinitialised(fake: FakeNvml) -> None:
    collector = GpuCollector(supervisor_for(NvmlBackend()), 1.0, 1.0)
    samples(collector)
    assert value(samples(collector), "mlwarden_gpu_sm_activity_ratio", **GPU0) == 0.42
    fake.fail[("nvmlDeviceGetTemperature", 1)] = nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
    samples(collector)
    del fake.fail[("nvmlDeviceGetTemperature", 1)]
    assert fake.gpm_samples  # held until NVML shuts down
    after = samples(collector)  # re-initialised first: the old samples are freed, and one new sample is no interval
    assert fake.inits == 2
    assert value(after, "mlwarden_gpu_sm_activity_ratio", **GPU0) is None
    assert len(fake.gpm_samples) == 1
    assert value(samples(collector), "mlwarden_gpu_sm_activity_ratio", **GPU0) == 0.42


def test_pcie_nvlink_video_violations_and_pending_retirements(fake: FakeNvml) -> None:
    fake.fail[("nvmlDeviceGetRetiredPagesPendingStatus", 1)] = pynvml.NVML_FEATURE_ENABLED
    found = samples(GpuCollector(supervisor_for(NvmlBackend()), 1.0, 1.0))
    assert value(found, "mlwarden_gpu_pcie_bytes_total", **GPU0, direction="tx") == 10**9
    assert value(found, "mlwarden_gpu_pcie_bytes_total", **GPU0, direction="rx") == 2 * 10**9
    assert value(found, "mlwarden_gpu_pcie_replays_total", **GPU0) == 3
    assert value(found, "mlwarden_gpu_encoder_utilization_ratio", **GPU0) == 0.12
    assert value(found, "mlwarden_gpu_decoder_utilization_ratio", **GPU0) == 0.34
    assert value(found, "mlwarden_gpu_clock_violation_seconds_total", **GPU0, reason="power") == 2.5
    assert value(found, "mlwarden_gpu_clock_violation_seconds_total", **GPU0, reason="thermal") == 0
    assert value(found, "mlwarden_gpu_clock_violation_seconds_total", **GPU0, reason="reliability") is None  # NOT_SUPPORTED
    assert value(found, "mlwarden_gpu_retired_pages_pending", **GPU0) == 0
    assert value(found, "mlwarden_gpu_retired_pages_pending", **GPU1) == 1
    assert value(found, "mlwarden_gpu_nvlink_up", **GPU0, link="0") == 1
    assert value(found, "mlwarden_gpu_nvlink_up", **GPU0, link="1") == 0
    assert value(found, "mlwarden_gpu_nvlink_up", **GPU0, link="2") is None  # no such link
    assert value(found, "mlwarden_gpu_nvlink_bytes_total", **GPU0, link="1", direction="tx") == 2000 * 1024
    assert value(found, "mlwarden_gpu_nvlink_bytes_total", **GPU0, link="1", direction="rx") == 6000 * 1024
    assert value(found, "mlwarden_gpu_nvlink_errors_total", **GPU0, link="0", error="replay") == 5
    assert value(found, "mlwarden_gpu_nvlink_errors_total", **GPU0, link="0", error="crc_flit") == 0
    assert value(found, "mlwarden_gpu_nvlink_errors_total", **GPU0, link="0", error="ecc_data") is None


def test_unsupported_signals_omit_their_series_and_the_gpu_stays_up(fake: FakeNvml) -> None:
    not_supported = nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
    for function in ("nvmlDeviceGetPcieThroughput", "nvmlDeviceGetPcieReplayCounter", "nvmlDeviceGetEncoderUtilization",
                     "nvmlDeviceGetDecoderUtilization", "nvmlDeviceGetViolationStatus", "nvmlDeviceGetRetiredPagesPendingStatus",
                     "nvmlDeviceGetMigMode", "nvmlGpmQueryDeviceSupport"):
        fake.fail[(function, 0)] = not_supported
    fake.fail[("nvmlDeviceGetPcieReplayCounter", 1)] = 0xFFFFFFFF  # a sentinel, not a count
    fake.nvlinks = 0  # a PCIe card
    collector = GpuCollector(supervisor_for(NvmlBackend()), 1.0, 1.0)
    samples(collector)
    found = samples(collector)
    assert value(found, "mlwarden_gpu_up", **GPU0) == 1
    new = {"mlwarden_gpu_pcie_throughput_bytes_per_second", "mlwarden_gpu_pcie_replays_total", "mlwarden_gpu_encoder_utilization_ratio",
           "mlwarden_gpu_decoder_utilization_ratio", "mlwarden_gpu_clock_violation_seconds_total", "mlwarden_gpu_retired_pages_pending",
           "mlwarden_gpu_nvlink_up", "mlwarden_gpu_nvlink_bytes_total", "mlwarden_gpu_nvlink_errors_total", *PROFILING}
    assert not names_for(found, "0") & new
    assert "mlwarden_gpu_pcie_replays_total" not in names_for(found, "1")
    assert value(found, "mlwarden_gpu_pcie_bytes_total", **GPU0, direction="tx") == 10**9  # field values still answer


def test_mig_instances_report_memory_by_gpu_and_compute_instance_and_profile(fake: FakeNvml) -> None:
    fake.mig[1] = [(1, 0, "3g.20gb", 5 * MIB, 20_000 * MIB), (2, 0, "1g.5gb", 0, 5_000 * MIB)]
    found = samples(GpuCollector(supervisor_for(NvmlBackend()), 1.0, 1.0))
    labels = {**GPU1, "gpu_instance": "1", "compute_instance": "0", "profile": "3g.20gb"}
    assert value(found, "mlwarden_gpu_mig_memory_used_bytes", **labels) == 5 * MIB
    assert value(found, "mlwarden_gpu_mig_memory_total_bytes", **labels) == 20_000 * MIB
    assert value(found, "mlwarden_gpu_mig_memory_total_bytes", **{**labels, "gpu_instance": "2", "profile": "1g.5gb"}) == 5_000 * MIB
    assert "mlwarden_gpu_mig_memory_used_bytes" not in names_for(found, "0")  # MIG disabled there


def test_per_process_utilization_takes_each_processes_newest_sample_since_the_last_read(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = _counting(fake, monkeypatch, "nvmlDeviceGetProcessUtilization")
    fake.processes[0] = [(4242, 3 * MIB), (4243, 1 * MIB)]
    fake.process_utilization[0] = [(4242, 100, 10, 5), (4242, 200, 80, 40), (4243, 150, 7, 1)]
    clock = Clock()
    collector = ProcessesCollector(supervisor_for(NvmlBackend(clock=clock)), 1.0, 1.0, 8)

    def ratios(found: dict, metric: str) -> dict[str, float]:
        return {dict(lbl)["pid"]: v for (name, lbl), v in found.items() if name == metric}

    found = samples(collector)
    assert ratios(found, "mlwarden_gpu_process_sm_utilization_ratio") == {"4242": 0.8, "4243": 0.07}
    assert ratios(found, "mlwarden_gpu_process_memory_utilization_ratio") == {"4242": 0.4, "4243": 0.01}
    fake.process_utilization[0].append((4243, 300, 50, 2))
    reads = len(asked)
    clock.now += nvml_backend.PROCESS_UTILIZATION_REFRESH_S - 1
    found = samples(collector)  # not due: the last read's ratios, without asking NVML
    assert ratios(found, "mlwarden_gpu_process_sm_utilization_ratio") == {"4242": 0.8, "4243": 0.07}
    assert len(asked) == reads
    clock.now += 1
    found = samples(collector)  # only 4243 was sampled since: 4242 has no value for this interval
    assert ratios(found, "mlwarden_gpu_process_sm_utilization_ratio") == {"4243": 0.5}
    assert len(ratios(found, "mlwarden_gpu_process_memory_used_bytes")) == 2
    clock.now += nvml_backend.PROCESS_UTILIZATION_REFRESH_S
    found = samples(collector)  # nothing sampled since (NVML answers NOT_FOUND): no ratios, processes still there
    assert ratios(found, "mlwarden_gpu_process_sm_utilization_ratio") == {}
    assert len(ratios(found, "mlwarden_gpu_process_memory_used_bytes")) == 2


def test_promtool_accepts_every_new_family(fake: FakeNvml, promtool: str) -> None:
    fake.mig[1] = [(1, 0, "3g.20gb", 5 * MIB, 20_000 * MIB)]
    fake.mig[0] = [(1, 0, "7g.80gb", 5 * MIB, 80_000 * MIB)]
    fake.mig_gpm_percent[(0, 1)] = {pynvml.NVML_GPM_METRIC_SM_UTIL: 60.0}
    fake.processes[0] = [(4242, 3 * MIB)]
    fake.process_utilization[0] = [(4242, 100, 10, 5)]
    supervisor = supervisor_for(NvmlBackend())
    gpu = GpuCollector(supervisor, 1.0, 1.0)
    gpu.collect()
    families = [*gpu.collect().made(), *ProcessesCollector(supervisor, 1.0, 1.0, 8).collect().made()]
    text = render(families)
    for family in ("mlwarden_gpu_sm_activity_ratio", "mlwarden_gpu_pipe_activity_ratio", "mlwarden_gpu_nvlink_errors_total",
                   "mlwarden_gpu_clock_violation_seconds_total", "mlwarden_gpu_mig_memory_used_bytes", "mlwarden_gpu_mig_sm_activity_ratio",
                   "mlwarden_gpu_process_sm_utilization_ratio", "mlwarden_gpu_allocation_info"):
        assert f"\n{family}{{".encode() in text, family
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert checked.returncode == 0, checked.stderr.decode()
    assert checked.stdout.decode() + checked.stderr.decode() == ""


def test_mig_utilization_comes_from_gpm_per_gpu_instance_and_is_omitted_where_unsupported(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake.mig[0] = [(1, 0, "3g.40gb", 5 * MIB, 40_000 * MIB), (2, 0, "1g.10gb", 0, 10_000 * MIB)]
    fake.mig_gpm_percent[(0, 1)] = {pynvml.NVML_GPM_METRIC_SM_UTIL: 60.0, pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 20.0}
    fake.mig[1] = [(1, 0, "7g.80gb", 0, 80_000 * MIB)]  # GPU 1 has no GPM at all
    mig_samples = _counting(fake, monkeypatch, "nvmlGpmMigSampleGet")
    collector = GpuCollector(supervisor_for(NvmlBackend()), 1.0, 1.0)
    first = samples(collector)
    assert not {name for name, _ in first if name.startswith("mlwarden_gpu_mig_") and name.endswith("_ratio")}  # one sample: no interval yet
    found = samples(collector)
    samples(collector)
    instance = {**GPU0, "gpu_instance": "1", "compute_instance": "0", "profile": "3g.40gb"}
    assert value(found, "mlwarden_gpu_mig_sm_activity_ratio", **instance) == 0.60
    assert value(found, "mlwarden_gpu_mig_tensor_activity_ratio", **instance) == 0.20
    assert value(found, "mlwarden_gpu_mig_sm_occupancy_ratio", **instance) is None  # NVML could not compute it there
    ratios = {(name, dict(labels)["gpu"], dict(labels)["gpu_instance"]) for name, labels in found
              if name.startswith("mlwarden_gpu_mig_") and name.endswith("_ratio")}
    assert ratios == {("mlwarden_gpu_mig_sm_activity_ratio", "0", "1"), ("mlwarden_gpu_mig_tensor_activity_ratio", "0", "1")}
    assert value(found, "mlwarden_gpu_mig_memory_total_bytes", **{**instance, "gpu_instance": "2", "profile": "1g.10gb"}) == 10_000 * MIB
    # GPU instance 2 answered NOT_SUPPORTED to its first sample: never asked again (3 passes, 1 call)
    assert [gi for _, gi, _ in mig_samples].count(2) == 1
    assert [gi for _, gi, _ in mig_samples].count(1) == 3


def test_facts_only_an_administrator_changes_are_read_every_30_s_not_every_pass(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.mig[1] = [(1, 0, "3g.20gb", 5 * MIB, 20_000 * MIB)]
    limits = _counting(fake, monkeypatch, "nvmlDeviceGetEnforcedPowerLimit")
    modes = _counting(fake, monkeypatch, "nvmlDeviceGetMigMode")
    collector = GpuCollector(supervisor_for(NvmlBackend()), 1.0, 1.0)
    for _ in range(3):
        found = samples(collector)
    assert len(limits) == 2 and len(modes) == 2  # once per GPU in three passes
    assert value(found, "mlwarden_gpu_power_limit_watts", **GPU0) == 700.0
    assert value(found, "mlwarden_gpu_mig_memory_used_bytes", **GPU1, gpu_instance="1", compute_instance="0", profile="3g.20gb") == 5 * MIB
    monkeypatch.setattr(nvml_backend, "SLOW_REFRESH_S", 0.0)
    samples(collector)
    assert len(limits) == 4  # stale now: read again


def test_pcie_byte_counters_answered_in_32_bits_are_left_out(fake: FakeNvml) -> None:
    """An H200 with driver 580 answers them as unsigned ints: they wrap every 4 GiB, no counter."""
    for field, value_bytes in ((pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, 10**9), (pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, 2 * 10**9)):
        fake.field_values[(field, 0)] = (pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, "uiVal", value_bytes)
    found = samples(GpuCollector(supervisor_for(NvmlBackend()), 1.0, 1.0))
    assert value(found, "mlwarden_gpu_pcie_bytes_total", **GPU0, direction="tx") is None
    assert value(found, "mlwarden_gpu_pcie_bytes_total", **GPU0, direction="rx") is None
    assert value(found, "mlwarden_gpu_memory_temperature_celsius", **GPU0) == 70  # a 32-bit gauge is fine
