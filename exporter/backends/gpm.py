"""Profiling metrics without DCGM: NVML's GPU Performance Monitoring (GPM, Hopper and later).

GPM counts what NVML's "utilization" cannot tell apart: how many SMs were busy, how full they
were, whether tensor cores and which pipes worked, how much DRAM bandwidth was used. Each
collection takes one sample per GPU (``nvmlGpmSampleGet``) and asks NVML for the metrics
between it and the previous pass's sample (``nvmlGpmMetricsGet``), so each value covers the
whole collection interval; the first pass after a (re)start has no previous sample and
reports nothing. A GPU without GPM gets no series at all (and one info line), never zeros.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynvml

log = logging.getLogger(__name__)

_MIB = 2**20
# (metric id, key, scale to base units): ratios from percent, bandwidths from MiB/s.
RATIOS = (
    (pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL, "graphics_engine_activity"),
    (pynvml.NVML_GPM_METRIC_SM_UTIL, "sm_activity"),
    (pynvml.NVML_GPM_METRIC_SM_OCCUPANCY, "sm_occupancy"),
    (pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL, "tensor_activity"),
    (pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL, "dram_bandwidth_utilization"),
    (pynvml.NVML_GPM_METRIC_FP16_UTIL, "fp16_activity"),
    (pynvml.NVML_GPM_METRIC_FP32_UTIL, "fp32_activity"),
    (pynvml.NVML_GPM_METRIC_FP64_UTIL, "fp64_activity"),
)
BANDWIDTHS = (
    (pynvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC, "pcie", "tx"),
    (pynvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC, "pcie", "rx"),
    (pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC, "nvlink", "tx"),
    (pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC, "nvlink", "rx"),
)
_METRIC_IDS = [metric for metric, _ in RATIOS] + [metric for metric, _, _ in BANDWIDTHS]


@dataclass
class Profile:
    """One interval's GPM values in base units; empty dicts where GPM is absent."""

    ratios: dict[str, float]
    bandwidth: dict[tuple[str, str], float]  # (bus, direction) -> bytes per second


_NOTHING = Profile({}, {})


def metrics_request(metric_ids: list[int]) -> Any:
    """A ``nvmlGpmMetricsGet`` request for ``metric_ids``, filled once and reused every pass."""
    request = pynvml.c_nvmlGpmMetricsGet_t()
    request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = len(metric_ids)
    for slot, metric_id in enumerate(metric_ids):
        request.metrics[slot].metricId = metric_id
    return request


@dataclass
class _Sampler:
    previous: Any
    current: Any
    metrics: Callable[[Any, Any], list[float | None]]  # the metrics between two samples (see _MetricsGetter)
    primed: bool = False  # ``previous`` holds a sample


# Where each metric's return code and value lie in the request: read from its bytes, because every
# attribute read of pynvml's structures runs Python code (three per metric, a third of a GPM read).
_METRICS_AT = pynvml.c_nvmlGpmMetricsGet_t.metrics.offset
_METRIC_SIZE = ctypes.sizeof(pynvml.c_nvmlGpmMetric_t)
_RETURN = struct.Struct("=I")
_RETURN_AT = pynvml.c_nvmlGpmMetric_t.nvmlReturn.offset
_VALUE = struct.Struct("=d")
_VALUE_AT = pynvml.c_nvmlGpmMetric_t.value.offset


def metrics_between(request: Any, earlier: Any, later: Any) -> list[float | None]:
    """The request's GPM metrics between two samples, None where NVML could not compute one."""
    request.sample1 = earlier
    request.sample2 = later
    answer = pynvml.nvmlGpmMetricsGet(request)
    memory = memoryview(answer).cast("B")
    success = pynvml.NVML_SUCCESS
    values: list[float | None] = []
    for at in range(_METRICS_AT, _METRICS_AT + answer.numMetrics * _METRIC_SIZE, _METRIC_SIZE):
        returned = _RETURN.unpack_from(memory, at + _RETURN_AT)[0]
        values.append(_VALUE.unpack_from(memory, at + _VALUE_AT)[0] if returned == success else None)
    return values


# A request's answers at once: (return code, value) per metric, from 40-byte records (id, return, value, three pointers).
_ANSWERS = struct.Struct("=" + "4xId24x" * len(_METRIC_IDS))
_SAMPLE1_AT = pynvml.c_nvmlGpmMetricsGet_t.sample1.offset
_SAMPLE2_AT = pynvml.c_nvmlGpmMetricsGet_t.sample2.offset
assert _METRIC_SIZE == 40 and _RETURN_AT == 4 and _VALUE_AT == 8, "nvmlGpmMetric_t is not laid out as _ANSWERS reads it"


class _MetricsGetter:
    """``nvmlGpmMetricsGet`` called directly on a request filled in once: pynvml's wrapper looks the function
    up under a lock, and every field of its structures set or read runs a Python hook (two to set the samples,
    a third of a GPM read). The samples' addresses are written into the request through views made once."""

    __name__ = "nvmlGpmMetricsGet"  # for the backend's messages

    def __init__(self, function: Any) -> None:
        self._function = function
        self._request = metrics_request(_METRIC_IDS)
        self._ref = ctypes.byref(self._request)
        self._first = ctypes.c_void_p.from_buffer(self._request, _SAMPLE1_AT)
        self._second = ctypes.c_void_p.from_buffer(self._request, _SAMPLE2_AT)
        self._addresses: dict[int, int | None] = {}  # id(sample) -> its address; samples live as long as their sampler

    def __call__(self, earlier: Any, later: Any) -> list[float | None]:
        self._first.value = self._address(earlier)
        self._second.value = self._address(later)
        answer = self._function(self._ref)
        if answer != pynvml.NVML_SUCCESS:
            raise pynvml.NVMLError(answer)
        raw = _ANSWERS.unpack_from(self._request, _METRICS_AT)
        success = pynvml.NVML_SUCCESS
        return [raw[at + 1] if raw[at] == success else None for at in range(0, len(raw), 2)]

    def _address(self, sample: Any) -> int | None:
        address = self._addresses.get(id(sample))
        if address is None:
            address = self._addresses[id(sample)] = ctypes.cast(sample, ctypes.c_void_p).value
        return address


def _through_pynvml(request: Any) -> Callable[[Any, Any], list[float | None]]:
    def nvmlGpmMetricsGet(earlier: Any, later: Any) -> list[float | None]:  # noqa: N802 - named as NVML's, for messages
        return metrics_between(request, earlier, later)
    return nvmlGpmMetricsGet


def profile_of(values: list[float | None]) -> Profile:
    """The Profile of a request's answers (in _METRIC_IDS' order), in base units; empty without answers."""
    if not values:
        return _NOTHING
    # percent to a ratio, clamped to 0..1 (inline: a call per metric was a tenth of a GPM read)
    ratios = {key: min(1.0, max(0.0, value / 100.0))
              for (_, key), value in zip(RATIOS, values[:len(RATIOS)], strict=True) if value is not None}
    bandwidth = {
        (bus, direction): value * _MIB
        for (_, bus, direction), value in zip(BANDWIDTHS, values[len(RATIOS):], strict=True) if value is not None
    }
    return Profile(ratios, bandwidth)


# Where the PCIe bandwidths lie in a request's answers: GPM measured PCIe when either is there.
PCIE_AT = tuple(len(RATIOS) + at for at, (_, bus, _) in enumerate(BANDWIDTHS) if bus == "pcie")


class GpmReader:
    """GPM samples per GPU and per MIG GPU instance, kept between passes; ``call`` is the backend's error-sorting call,
    ``own`` finds the C function behind one of pynvml's own wrappers (None: call the wrapper, whoever replaced it)."""

    def __init__(self, call: Callable[..., Any], own: Callable[[Callable[..., Any], str], Any] = lambda wrapper, name: None) -> None:
        self._call = call
        self._own = own
        self._supported: dict[int, bool] = {}  # GPU -> GPM there at all
        self._samplers: dict[tuple[int, int | None], _Sampler | None] = {}  # (GPU, GPU instance or None); None: no GPM
        self._said_unsupported: set[int] = set()

    def read(self, index: int, handle: Any) -> Profile:
        """The whole GPU's metrics over the interval since the last read."""
        return profile_of(self.read_values(index, handle))

    def read_values(self, index: int, handle: Any) -> list[float | None]:
        """``read``'s metrics as NVML answered them (``profile_of`` makes the Profile): empty where there are none."""
        return self._read((index, None), handle, pynvml.nvmlGpmSampleGet, handle)

    def read_mig(self, index: int, handle: Any, gpu_instance: int) -> Profile:
        """One MIG GPU instance's metrics (``nvmlGpmMigSampleGet`` on the parent GPU's handle)."""
        return profile_of(self._read((index, gpu_instance), handle, pynvml.nvmlGpmMigSampleGet, handle, gpu_instance))

    def forget_mig(self, index: int, gpu_instances: set[int]) -> None:
        """Free the samples of this GPU's instances that are no longer there (MIG reconfigured)."""
        for key in [key for key in self._samplers if key[0] == index and key[1] is not None and key[1] not in gpu_instances]:
            sampler = self._samplers.pop(key)
            if sampler is not None:
                self._free(sampler.previous)
                self._free(sampler.current)

    def _read(self, key: tuple[int, int | None], handle: Any, sample_get: Callable[..., Any], *where: Any) -> list[float | None]:
        sampler = self._sampler(key, handle)
        if sampler is None:
            return []
        if self._call(sample_get, *where, sampler.current) is None:
            if not sampler.primed:  # never sampled here (a MIG instance GPM cannot see): not asked again until re-initialised
                self._samplers[key] = None
                self._free(sampler.previous)
                self._free(sampler.current)
            return []
        values: list[float | None] = []
        if sampler.primed:
            values = self._call(sampler.metrics, sampler.previous, sampler.current) or []
        sampler.previous, sampler.current, sampler.primed = sampler.current, sampler.previous, True
        return values

    def _sampler(self, key: tuple[int, int | None], handle: Any) -> _Sampler | None:
        if key in self._samplers:
            return self._samplers[key]
        index = key[0]
        if index not in self._supported:
            support = self._call(pynvml.nvmlGpmQueryDeviceSupport, handle)
            self._supported[index] = support is not None and bool(support.isSupportedDevice)
        sampler = None
        if self._supported[index]:
            first = self._call(pynvml.nvmlGpmSampleAlloc)
            second = self._call(pynvml.nvmlGpmSampleAlloc) if first is not None else None
            if second is not None:
                function = self._own(pynvml.nvmlGpmMetricsGet, "nvmlGpmMetricsGet")
                metrics = _through_pynvml(metrics_request(_METRIC_IDS)) if function is None else _MetricsGetter(function)
                sampler = _Sampler(first, second, metrics)
            elif first is not None:
                self._free(first)
        if sampler is None and index not in self._said_unsupported:
            log.info("GPU %d: no GPU Performance Monitoring (Hopper or later needed); SM activity, occupancy, "
                     "tensor and DRAM metrics are omitted", index)
            self._said_unsupported.add(index)
        self._samplers[key] = sampler
        return sampler

    def reset(self) -> None:
        """Free every sample (before NVML shuts down); the next read starts over."""
        for sampler in self._samplers.values():
            if sampler is not None:
                self._free(sampler.previous)
                self._free(sampler.current)
        self._samplers.clear()
        self._supported.clear()

    @staticmethod
    def _free(sample: Any) -> None:
        with contextlib.suppress(pynvml.NVMLError):  # NVML already gone: so is the sample
            pynvml.nvmlGpmSampleFree(sample)

