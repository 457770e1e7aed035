"""A fake NVML at the pynvml function boundary: pynvml's functions replaced, pynvml's real
exception classes raised (``NVMLError(code)`` builds the subclass), pynvml's own structs where the
exporter hands structs to NVML (GPM requests, process-utilization samples).

Shared by the tests and by the benchmark, which injects it into the exporter and into
nvitop-exporter alike (bench/with_fake_nvml.py); so it imports nothing but pynvml.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

MIB = 2**20
GPM_PERCENT = {
    pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL: 90.0, pynvml.NVML_GPM_METRIC_SM_UTIL: 42.0, pynvml.NVML_GPM_METRIC_SM_OCCUPANCY: 25.0,
    pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 30.0, pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: 55.0, pynvml.NVML_GPM_METRIC_FP16_UTIL: 5.0,
    pynvml.NVML_GPM_METRIC_FP32_UTIL: 12.5, pynvml.NVML_GPM_METRIC_FP64_UTIL: 0.0,
    pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC: 100.0, pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC: 200.0,
    pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC: 1000.0, pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC: 2000.0,
}
FIELD_VALUES = {  # (field id, scope) -> (value type, attribute, value)
    (pynvml.NVML_FI_DEV_MEMORY_TEMP, 0): (pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, "uiVal", 70),
    (pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, 0): (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal", 10**9),
    (pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, 0): (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal", 2 * 10**9),
    **{(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, link): (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal", 1000 * (link + 1))
       for link in range(4)},
    **{(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, link): (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal", 3000 * (link + 1))
       for link in range(4)},
}


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


@dataclass
class Handle:
    index: int


def _address(sample: Any) -> int:
    return ctypes.cast(sample, ctypes.c_void_p).value or 0


@dataclass
class FakeNvml:
    """Two healthy GPUs by default; ``fail[(function, gpu)]`` overrides one answer."""

    gpus: int = 2
    fail: dict[tuple[str, int], Any] = field(default_factory=dict)
    init_error: int | None = None
    inits: int = 0
    processes: dict[int, list[tuple[int, int | None]]] = field(default_factory=dict)
    process_instances: dict[int, tuple[int, int]] = field(default_factory=dict)  # pid -> (GPU instance, compute instance) on MIG
    xids: list[tuple[int, int]] = field(default_factory=list)
    gpm_gpus: set[int] = field(default_factory=lambda: {0})  # an H100 and an older GPU without GPM
    gpm_percent: dict[int, float] = field(default_factory=lambda: dict(GPM_PERCENT))  # metric id -> value NVML computes
    nvlinks: int = 2  # links per GPU; link 1 is down
    # GPU -> (pid, timestamp in us, SM %, memory %) samples NVML holds
    process_utilization: dict[int, list[tuple[int, int, int, int]]] = field(default_factory=dict)
    mig: dict[int, list[tuple[int, int, str, int, int]]] = field(default_factory=dict)  # GPU -> (gi, ci, profile, used, total)
    # (GPU, GPU instance) -> metric id -> value NVML computes for that instance; absent: NOT_SUPPORTED there
    mig_gpm_percent: dict[tuple[int, int], dict[int, float]] = field(default_factory=dict)
    gpm_samples: dict[int, tuple[Any, int]] = field(default_factory=dict)  # sample address -> (GPU or (GPU, GI), when taken)
    gpm_clock: int = 0
    field_values: dict[tuple[int, int], tuple[int, str, int]] = field(default_factory=lambda: dict(FIELD_VALUES))  # what fields answer
    field_requests: list[list[tuple[int, int]]] = field(default_factory=list)  # the ids of every nvmlDeviceGetFieldValues call
    _buffers: list[Any] = field(default_factory=list)

    def install(self, monkeypatch: Any) -> None:
        for name in dir(self):
            if name.startswith("nvml"):
                monkeypatch.setattr(pynvml, name, getattr(self, name))

    def _answer(self, name: str, handle: Handle, value: Any) -> Any:
        override = self.fail.get((name, handle.index))
        if isinstance(override, BaseException):
            raise override
        if callable(override):
            return override()
        return value if override is None else override

    # system
    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        self.inits += 1
        if self.init_error is not None:
            raise nvml_error(self.init_error)

    def nvmlInitWithFlags(self, flags: int) -> None:  # noqa: N802 - what nvitop calls
        self.nvmlInit()

    def nvmlShutdown(self) -> None:  # noqa: N802
        pass

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:  # noqa: N802
        return 12040

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:  # noqa: N802
        return self._answer("nvmlDeviceGetHandleByIndex", Handle(index), Handle(index))

    def nvmlDeviceGetIndex(self, handle: Handle) -> int:  # noqa: N802
        return handle.index

    # identity
    def nvmlDeviceGetUUID(self, h: Any) -> str:  # noqa: N802
        if hasattr(h, "mig"):
            return f"MIG-fake-{h.index}-{h.mig[0]}-{h.mig[1]}"
        return self._answer("nvmlDeviceGetUUID", h, f"GPU-fake-{h.index}")

    def nvmlDeviceGetName(self, h: Any) -> bytes:  # noqa: N802
        if hasattr(h, "mig"):
            return f"NVIDIA A100-SXM4-40GB MIG {h.mig[2]}".encode()
        return self._answer("nvmlDeviceGetName", h, b"NVIDIA H100 80GB HBM3")

    def nvmlDeviceGetPciInfo(self, h: Handle) -> Any:  # noqa: N802
        return self._answer("nvmlDeviceGetPciInfo", h, SimpleNamespace(busId=f"00000000:{h.index + 0x18:02X}:00.0".encode()))

    # readings (NVML's units: mW, mJ, MHz, percent)
    def nvmlDeviceGetTemperature(self, h: Handle, sensor: int) -> int:  # noqa: N802
        return self._answer("nvmlDeviceGetTemperature", h, 60 + h.index)

    def nvmlDeviceGetFieldValues(self, h: Handle, ids: list[Any]) -> Any:  # noqa: N802
        values = []
        self.field_requests.append([wanted if isinstance(wanted, tuple) else (wanted, 0) for wanted in ids])
        for wanted in ids:
            key = wanted if isinstance(wanted, tuple) else (wanted, 0)
            known = self.field_values.get(key)
            if known is None:
                values.append(SimpleNamespace(nvmlReturn=pynvml.NVML_ERROR_NOT_SUPPORTED, valueType=0, value=SimpleNamespace(uiVal=0)))
            else:
                value_type, attr, number = known
                values.append(SimpleNamespace(nvmlReturn=pynvml.NVML_SUCCESS, valueType=value_type, value=SimpleNamespace(**{attr: number})))
        return self._answer("nvmlDeviceGetFieldValues", h, values)

    # the signals beyond the basics
    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: Handle) -> int:  # noqa: N802
        return self._answer("nvmlDeviceGetRetiredPagesPendingStatus", h, pynvml.NVML_FEATURE_DISABLED)

    def nvmlDeviceGetPcieThroughput(self, h: Handle, counter: int) -> int:  # noqa: N802
        return self._answer("nvmlDeviceGetPcieThroughput", h, 1000 if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES else 2000)

    def nvmlDeviceGetPcieReplayCounter(self, h: Handle) -> int:  # noqa: N802
        return self._answer("nvmlDeviceGetPcieReplayCounter", h, 3)

    def nvmlDeviceGetEncoderUtilization(self, h: Handle) -> list[int]:  # noqa: N802
        return self._answer("nvmlDeviceGetEncoderUtilization", h, [12, 167_000])

    def nvmlDeviceGetDecoderUtilization(self, h: Handle) -> list[int]:  # noqa: N802
        return self._answer("nvmlDeviceGetDecoderUtilization", h, [34, 167_000])

    def nvmlDeviceGetViolationStatus(self, h: Handle, policy: int) -> Any:  # noqa: N802
        if policy == pynvml.NVML_PERF_POLICY_RELIABILITY:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        nanoseconds = 2_500_000_000 if policy == pynvml.NVML_PERF_POLICY_POWER else 0
        return self._answer("nvmlDeviceGetViolationStatus", h, SimpleNamespace(referenceTime=1, violationTime=nanoseconds))

    def nvmlDeviceGetNvLinkState(self, h: Handle, link: int) -> int:  # noqa: N802
        if link >= self.nvlinks:
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._answer("nvmlDeviceGetNvLinkState", h, pynvml.NVML_FEATURE_DISABLED if link == 1 else pynvml.NVML_FEATURE_ENABLED)

    def nvmlDeviceGetNvLinkErrorCounter(self, h: Handle, link: int, counter: int) -> int:  # noqa: N802
        if counter == pynvml.NVML_NVLINK_ERROR_DL_ECC_DATA:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self._answer("nvmlDeviceGetNvLinkErrorCounter", h, 5 if counter == pynvml.NVML_NVLINK_ERROR_DL_REPLAY else 0)

    def nvmlDeviceGetProcessUtilization(self, h: Handle, since: int) -> list[Any]:  # noqa: N802
        found = [pynvml.c_nvmlProcessUtilizationSample_t(pid, ts, sm, mem, 0, 0)
                 for pid, ts, sm, mem in self.process_utilization.get(h.index, []) if ts > since]
        if not found:
            raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)  # what NVML answers when nothing was sampled since
        return self._answer("nvmlDeviceGetProcessUtilization", h, found)

    # MIG: a MIG device handle is Handle(index) with a (gi, ci) attached
    def nvmlDeviceGetMigMode(self, h: Handle) -> list[int]:  # noqa: N802
        enabled = pynvml.NVML_DEVICE_MIG_ENABLE if h.index in self.mig else pynvml.NVML_DEVICE_MIG_DISABLE
        return self._answer("nvmlDeviceGetMigMode", h, [enabled, enabled])

    def nvmlDeviceGetMaxMigDeviceCount(self, h: Handle) -> int:  # noqa: N802
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: Handle, slot: int) -> Any:  # noqa: N802
        instances = self.mig.get(h.index, [])
        if slot >= len(instances):
            raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
        return SimpleNamespace(index=h.index, mig=instances[slot])

    def nvmlDeviceGetGpuInstanceId(self, mig: Any) -> int:  # noqa: N802
        return mig.mig[0]

    def nvmlDeviceGetComputeInstanceId(self, mig: Any) -> int:  # noqa: N802
        return mig.mig[1]

    # GPM: samples are real pynvml sample pointers, so the request struct is pynvml's own
    def nvmlGpmQueryDeviceSupport(self, h: Handle) -> Any:  # noqa: N802
        return self._answer("nvmlGpmQueryDeviceSupport", h, SimpleNamespace(version=1, isSupportedDevice=int(h.index in self.gpm_gpus)))

    def nvmlGpmSampleAlloc(self) -> Any:  # noqa: N802
        buffer = ctypes.c_uint64(0)
        self._buffers.append(buffer)
        return ctypes.cast(ctypes.pointer(buffer), pynvml.c_nvmlGpmSample_t)

    def nvmlGpmSampleFree(self, sample: Any) -> None:  # noqa: N802
        self.gpm_samples.pop(_address(sample), None)

    def nvmlGpmSampleGet(self, h: Handle, sample: Any) -> Any:  # noqa: N802
        self.gpm_clock += 1
        self.gpm_samples[_address(sample)] = (h.index, self.gpm_clock)
        return sample

    def nvmlGpmMigSampleGet(self, h: Handle, gpu_instance: int, sample: Any) -> Any:  # noqa: N802
        if (h.index, gpu_instance) not in self.mig_gpm_percent:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        self.gpm_clock += 1
        self.gpm_samples[_address(sample)] = ((h.index, gpu_instance), self.gpm_clock)
        return sample

    def nvmlGpmMetricsGet(self, request: Any) -> Any:  # noqa: N802
        assert request.version == pynvml.NVML_GPM_METRICS_GET_VERSION
        (gpu1, taken1), (gpu2, taken2) = self.gpm_samples[_address(request.sample1)], self.gpm_samples[_address(request.sample2)]
        assert gpu1 == gpu2 and taken1 < taken2, "samples of one GPU (or GPU instance), earlier first"
        percent = self.mig_gpm_percent[gpu1] if isinstance(gpu1, tuple) else self.gpm_percent
        for slot in range(request.numMetrics):
            metric = request.metrics[slot]
            if metric.metricId in percent:
                metric.value = percent[metric.metricId]
                metric.nvmlReturn = pynvml.NVML_SUCCESS
            else:
                metric.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return request

    def nvmlDeviceGetUtilizationRates(self, h: Handle) -> Any:  # noqa: N802
        return self._answer("nvmlDeviceGetUtilizationRates", h, SimpleNamespace(gpu=50, memory=25))

    def nvmlDeviceGetMemoryInfo(self, h: Any, version: int | None = None) -> Any:  # noqa: N802
        if hasattr(h, "mig"):
            return SimpleNamespace(total=h.mig[4], used=h.mig[3], free=h.mig[4] - h.mig[3])
        memory = SimpleNamespace(total=80_000 * MIB, used=30_000 * MIB, free=49_500 * MIB)
        if version:
            memory.reserved = 500 * MIB
        return self._answer("nvmlDeviceGetMemoryInfo", h, memory)

    def nvmlDeviceGetPowerUsage(self, h: Handle) -> int:  # noqa: N802
        return self._answer("nvmlDeviceGetPowerUsage", h, 250_000)

    def nvmlDeviceGetEnforcedPowerLimit(self, h: Handle) -> int:  # noqa: N802
        return self._answer("nvmlDeviceGetEnforcedPowerLimit", h, 700_000)

    def nvmlDeviceGetTotalEnergyConsumption(self, h: Handle) -> int:  # noqa: N802
        return self._answer("nvmlDeviceGetTotalEnergyConsumption", h, 1_500_000)

    def nvmlDeviceGetFanSpeed(self, h: Handle) -> int:  # noqa: N802
        return self._answer("nvmlDeviceGetFanSpeed", h, 40)

    def nvmlDeviceGetPerformanceState(self, h: Handle) -> int:  # noqa: N802
        return self._answer("nvmlDeviceGetPerformanceState", h, 0)

    def nvmlDeviceGetClockInfo(self, h: Handle, clock: int) -> int:  # noqa: N802
        return self._answer("nvmlDeviceGetClockInfo", h, 1980 if clock == pynvml.NVML_CLOCK_SM else 2619)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: Handle) -> int:  # noqa: N802
        return self._answer("nvmlDeviceGetCurrentClocksEventReasons", h, 0x40 | 0x4)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h: Handle) -> int:  # noqa: N802
        return self._answer("nvmlDeviceGetCurrentClocksThrottleReasons", h, 0x1)

    def nvmlDeviceGetTotalEccErrors(self, h: Handle, error_type: int, counter: int) -> int:  # noqa: N802
        return self._answer("nvmlDeviceGetTotalEccErrors", h, 3 if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED else 0)

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: Handle) -> int:  # noqa: N802
        return self._answer("nvmlDeviceGetCurrPcieLinkGeneration", h, 5)

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: Handle) -> int:  # noqa: N802
        return self._answer("nvmlDeviceGetCurrPcieLinkWidth", h, 16)

    def nvmlDeviceGetRetiredPages(self, h: Handle, cause: int) -> list[int]:  # noqa: N802
        return self._answer("nvmlDeviceGetRetiredPages", h, [])

    def nvmlDeviceGetRemappedRows(self, h: Handle) -> tuple[int, int, int, int]:  # noqa: N802
        return self._answer("nvmlDeviceGetRemappedRows", h, (2, 0, 0, 0))

    def nvmlDeviceGetComputeRunningProcesses(self, h: Handle) -> list[Any]:  # noqa: N802
        procs = [SimpleNamespace(pid=pid, usedGpuMemory=used, gpuInstanceId=self.process_instances.get(pid, (0xFFFFFFFF,))[0],
                                 computeInstanceId=self.process_instances.get(pid, (0, 0xFFFFFFFF))[1])
                 for pid, used in self.processes.get(h.index, [])]
        return self._answer("nvmlDeviceGetComputeRunningProcesses", h, procs)

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: Handle) -> list[Any]:  # noqa: N802
        return self._answer("nvmlDeviceGetGraphicsRunningProcesses", h, [])

    # events
    def nvmlEventSetCreate(self) -> str:  # noqa: N802
        return "event-set"

    def nvmlDeviceGetSupportedEventTypes(self, h: Handle) -> int:  # noqa: N802
        return pynvml.nvmlEventTypeXidCriticalError

    def nvmlDeviceRegisterEvents(self, h: Handle, types: int, event_set: str) -> None:  # noqa: N802
        pass

    def nvmlEventSetWait(self, event_set: str, timeout_ms: int) -> Any:  # noqa: N802
        if not self.xids:
            time.sleep(0.01)
            raise nvml_error(pynvml.NVML_ERROR_TIMEOUT)
        gpu, xid = self.xids.pop(0)
        return SimpleNamespace(device=Handle(gpu), eventType=pynvml.nvmlEventTypeXidCriticalError, eventData=xid)

    def nvmlEventSetFree(self, event_set: str) -> None:  # noqa: N802
        pass
