"""The NVML backend, through nvidia-ml-py (``pynvml``).

Every field is read on its own, so that one unsupported field (an NVML "not supported",
"no permission", or one of NVML's sentinel values) omits one series and nothing else.
Errors that say the GPU itself is in trouble (GPU is lost, timeout, unknown) raise
:class:`GpuLost` for that GPU only; the exporter then re-initialises NVML with backoff.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynvml
from mlwarden.exporter.backends.base import (
    ECC_COUNTERS,
    ECC_ERROR_TYPES,
    NVLINK_ERRORS,
    REMAPPED_ROW_STATES,
    BackendUnavailable,
    GpuBackend,
    GpuIdentity,
    GpuLost,
    GpuProcess,
    GpuReading,
    MigDevice,
    MigReading,
    NvLinkReading,
    XidEvent,
)
from mlwarden.exporter.backends.gpm import PCIE_AT, GpmReader, profile_of

log = logging.getLogger(__name__)

# NVML answers that mean "this field does not exist here": omit the series.
_UNSUPPORTED = (
    pynvml.NVMLError_NotSupported,
    pynvml.NVMLError_NoPermission,
    pynvml.NVMLError_FunctionNotFound,
    pynvml.NVMLError_InvalidArgument,
    pynvml.NVMLError_NotFound,
    # a driver older than the struct version asked for (nvmlMemory_v2 on an old driver)
    pynvml.NVMLError_ArgumentVersionMismatch,
)
# Of those, the answers that hold until the driver is reloaded: the call is not made again until
# NVML is re-initialised (an old GPU answers NOT_SUPPORTED to dozens of calls every pass otherwise,
# and each answer costs a Python exception).
_PERMANENT = (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_ArgumentVersionMismatch)
_U32_SENTINELS = {0xFFFFFFFF, 0xFFFFFFFE}
# 2**64-1 is NVML's "not available"; values from 0x7FFFFFFFFFFFFFF0 up are the blank /
# not-supported markers (e.g. 9223372036854775794) that DCGM-based tools leak.
_U64_SENTINEL_FLOOR = 0x7FFFFFFFFFFFFFF0
_PSTATE_UNKNOWN = 32
_THROTTLE_MASKS_KEPT = 64  # clock-event masks remembered: a GPU has a few in turn, unknown bits may add more

_THROTTLE_BITS = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clock_setting": 0x100,
}
_ECC_TYPE = {"corrected": pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, "uncorrected": pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED}
_ECC_COUNTER = {"volatile": pynvml.NVML_VOLATILE_ECC, "aggregate": pynvml.NVML_AGGREGATE_ECC}
_RETIREMENT_CAUSE = {
    "single_bit_ecc": pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
    "double_bit_ecc": pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
}
_VIOLATION_POLICY = {
    "power": pynvml.NVML_PERF_POLICY_POWER,
    "thermal": pynvml.NVML_PERF_POLICY_THERMAL,
    "sync_boost": pynvml.NVML_PERF_POLICY_SYNC_BOOST,
    "board_limit": pynvml.NVML_PERF_POLICY_BOARD_LIMIT,
    "low_utilization": pynvml.NVML_PERF_POLICY_LOW_UTILIZATION,
    "reliability": pynvml.NVML_PERF_POLICY_RELIABILITY,
    "total_app_clocks": pynvml.NVML_PERF_POLICY_TOTAL_APP_CLOCKS,
    "total_base_clocks": pynvml.NVML_PERF_POLICY_TOTAL_BASE_CLOCKS,
}
_NVLINK_ERROR_COUNTER = dict(zip(NVLINK_ERRORS, (
    pynvml.NVML_NVLINK_ERROR_DL_REPLAY, pynvml.NVML_NVLINK_ERROR_DL_RECOVERY, pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT,
    pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA, pynvml.NVML_NVLINK_ERROR_DL_ECC_DATA,
), strict=True))
# NVML's PCIe throughput is in KB/s (1024 bytes), its NVLink data counters in KiB.
_KIB = 1024
_PCIE_UTIL = {"tx": pynvml.NVML_PCIE_UTIL_TX_BYTES, "rx": pynvml.NVML_PCIE_UTIL_RX_BYTES}
_PCIE_BYTES_FIELDS = (("tx", pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES), ("rx", pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES))
_MEMORY_TEMPERATURE = (pynvml.NVML_FI_DEV_MEMORY_TEMP, 0)
_EVENTS_AT, _MEMORY_AT = 7, 12  # where the clock-event mask and the memory info are among a batch's answers (_Getters.batch)
_NVLINK_BYTES_FIELDS = (("tx", pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX), ("rx", pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX))
_FIELD_VALUE_ATTR = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
# The field values that hold what nvmlDeviceGetTotalEccErrors, nvmlDeviceGetViolationStatus,
# nvmlDeviceGetTotalEnergyConsumption and nvmlDeviceGetPcieReplayCounter answer (same counters, same units:
# compared on an H200 with driver 580), so one nvmlDeviceGetFieldValues call replaces 14 calls. A field the
# driver does not have falls back to its own call.
_ECC_FIELDS = {
    ("corrected", "volatile"): pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL, ("uncorrected", "volatile"): pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL,
    ("corrected", "aggregate"): pynvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL, ("uncorrected", "aggregate"): pynvml.NVML_FI_DEV_ECC_DBE_AGG_TOTAL,
}
_VIOLATION_FIELDS = {
    "power": pynvml.NVML_FI_DEV_PERF_POLICY_POWER,
    "thermal": pynvml.NVML_FI_DEV_PERF_POLICY_THERMAL,
    "sync_boost": pynvml.NVML_FI_DEV_PERF_POLICY_SYNC_BOOST,
    "board_limit": pynvml.NVML_FI_DEV_PERF_POLICY_BOARD_LIMIT,
    "low_utilization": pynvml.NVML_FI_DEV_PERF_POLICY_LOW_UTILIZATION,
    "reliability": pynvml.NVML_FI_DEV_PERF_POLICY_RELIABILITY,
    "total_app_clocks": pynvml.NVML_FI_DEV_PERF_POLICY_TOTAL_APP_CLOCKS,
    "total_base_clocks": pynvml.NVML_FI_DEV_PERF_POLICY_TOTAL_BASE_CLOCKS,
}
# A field answered with one of these is left out of the request until the next re-probe: the driver does
# not know the field id (INVALID_ARGUMENT) or the GPU does not have it (NOT_SUPPORTED).
_FIELD_UNSUPPORTED = frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_INVALID_ARGUMENT})
_COUNTER_FIELDS = (
    *((field, 0) for field in _ECC_FIELDS.values()), *((field, 0) for field in _VIOLATION_FIELDS.values()),
    (pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, 0), (pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER, 0),
    *((field, 0) for _, field in _PCIE_BYTES_FIELDS),
)
_FIELD_VALUE = struct.Struct("=IIqqIIQ")  # nvmlFieldValue_t, the value union read as its 8 bytes
# The PCIe byte counters are only counters when NVML answers them in 64 bits: an H200 with driver 580
# answers 32-bit values, which wrap every 4 GiB (a fraction of a second at PCIe 5 speeds), so that no
# rate() over them means anything. Such an answer is taken as "not supported"; GPM's PCIe throughput stays.
_WIDE_ONLY = frozenset(field for _, field in _PCIE_BYTES_FIELDS)
_WIDE_TYPES = frozenset({pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG, pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
                         pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG})


def _field_usable(field: int, returned: int, value_type: int) -> bool | None:
    """True: take the value; False: the field is not supported here (not asked again until the
    re-probe); None: a passing failure."""
    if returned == pynvml.NVML_SUCCESS:
        return field not in _WIDE_ONLY or value_type in _WIDE_TYPES
    return False if returned in _FIELD_UNSUPPORTED else None


# Power limit, retired pages, remapped rows and the MIG layout change only by an administrator or a rare
# hardware event (and a page retirement or row remap shows in the ECC counters):
# reading them every SLOW_REFRESH_S instead of every pass saves a fifth of the calls of a pass.
SLOW_REFRESH_S = 30.0
# Counters (energy, ECC, clock violations, PCIe replays and bytes, NVLink state, bytes and errors) are read
# with rate() or increase() over minutes, and some are the dearest calls NVML has: on an H200 (driver 580)
# the energy counter costs 4.4 ms of CPU per read and the eight violation counters 0.85 ms, where a
# temperature costs 3 us. They are read every COUNTER_REFRESH_S (dcgm-exporter reads everything every 30 s).
COUNTER_REFRESH_S = 10.0
# Per-process utilization costs 2.8 ms of CPU per GPU and read on that H200 while a process ran: it is
# read on the counters' cadence too, each process' newest sample of the last PROCESS_UTILIZATION_REFRESH_S.
PROCESS_UTILIZATION_REFRESH_S = COUNTER_REFRESH_S
# An answer of "not supported" is remembered and not asked again (each answer costs a Python exception,
# and an old GPU gives dozens a pass) until NVML is re-initialised or REPROBE_S has passed: a driver
# update, a mode change or a GPU reset can bring a field.
REPROBE_S = 300.0


class _ProcessInfo(ctypes.Structure):
    """nvmlProcessInfo_t (v2 and v3), as a plain ctypes structure: reading a field of pynvml's own
    structures runs a Python-level hook, and pynvml copies every record into a new Python object."""

    _fields_ = (("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint))


RunningProcess = tuple[int, Any, Any, Any]  # pid, used memory, GPU instance, compute instance, as NVML answered


class _ProcessLister:
    """One of NVML's ``...RunningProcesses_v3`` calls into an array kept from pass to pass.

    Used only while pynvml's own wrapper is in place (see :meth:`load`), so whoever replaces that
    wrapper (the tests' pynvml-level fake) is still the one asked.
    """

    def __init__(self, name: str, function: Any) -> None:
        self.__name__ = name  # for _call's messages and its memory of "not supported" answers
        self._function = function
        self._count = ctypes.c_uint(0)
        self._array = (_ProcessInfo * 32)()
        self._lock = threading.Lock()  # the array is reused: one call at a time
        # id(handle) -> NVML's answer as bytes, and the list made from it: the same list while the bytes are the same
        self._answered: dict[int, tuple[bytes, list[RunningProcess]]] = {}

    @classmethod
    def load(cls, wrapper: Callable[..., Any], name: str) -> _ProcessLister | None:
        function = _pynvml_own(wrapper, name)
        return None if function is None else cls(name, function)

    def __call__(self, handle: Any) -> list[RunningProcess]:
        with self._lock:
            while True:
                self._count.value = len(self._array)
                answer = self._function(handle, ctypes.byref(self._count), self._array)
                if answer == pynvml.NVML_SUCCESS:
                    break
                if answer != pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
                    raise pynvml.NVMLError(answer)
                self._array = (_ProcessInfo * (self._count.value * 2 + 8))()  # room for processes starting meanwhile
            count = self._count.value
            raw = ctypes.string_at(self._array, count * ctypes.sizeof(_ProcessInfo))
            answered = self._answered.get(id(handle))
            if answered is not None and answered[0] == raw:
                return answered[1]  # processes and their memory barely change from second to second
            listed = [(p.pid, p.usedGpuMemory, p.gpuInstanceId, p.computeInstanceId) for p in self._array[:count]]
            self._answered[id(handle)] = (raw, listed)
            return listed


class _FieldValue(ctypes.Structure):
    """nvmlFieldValue_t as a plain ctypes structure (see _ProcessInfo)."""

    _fields_ = (("fieldId", ctypes.c_uint32), ("scopeId", ctypes.c_uint32), ("timestamp", ctypes.c_int64),
                ("latencyUsec", ctypes.c_int64), ("valueType", ctypes.c_uint), ("nvmlReturn", ctypes.c_uint),
                ("value", pynvml.c_nvmlValue_t))


class _FieldReader:
    """nvmlDeviceGetFieldValues for one GPU's fixed list of fields, into an array filled in once.

    pynvml's wrapper builds the array and sets every field id through a Python hook on every call;
    here the answers are unpacked from the array's bytes in one go.
    """

    __name__ = "nvmlDeviceGetFieldValues"

    def __init__(self, function: Any, ids: list[tuple[int, int]]) -> None:
        self.ids = ids
        self._function = function
        self._array = (_FieldValue * len(ids))()
        for slot, (field, scope) in zip(self._array, ids, strict=True):
            slot.fieldId, slot.scopeId = field, scope
        self._lock = threading.Lock()

    def __call__(self, handle: Any) -> tuple[dict[tuple[int, int], Any], set[tuple[int, int]]]:
        with self._lock:
            answer = self._function(handle, len(self.ids), self._array)
            if answer != pynvml.NVML_SUCCESS:
                raise pynvml.NVMLError(answer)
            raw = bytes(self._array)
        result: dict[tuple[int, int], Any] = {}
        unsupported = set()
        for key, (_, _, _, _, value_type, returned, bits) in zip(self.ids, _FIELD_VALUE.iter_unpack(raw), strict=True):
            usable = _field_usable(key[0], returned, value_type)
            if usable:
                result[key] = _from_bits(value_type, bits)
            elif usable is False:
                unsupported.add(key)
        return result, unsupported


def _from_bits(value_type: int, bits: int) -> Any:
    """A field value's union, read as 8 little-endian bytes, as the member ``value_type`` names."""
    if value_type == pynvml.NVML_VALUE_TYPE_DOUBLE:
        return struct.unpack("=d", struct.pack("=Q", bits))[0]
    if value_type == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT:
        return bits & 0xFFFFFFFF
    if value_type == pynvml.NVML_VALUE_TYPE_SIGNED_INT:
        return ctypes.c_int32(bits & 0xFFFFFFFF).value
    if value_type == pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG:
        return ctypes.c_int64(bits).value
    if value_type == pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT:
        return bits & 0xFFFF
    return bits  # unsigned long (64 bits here) and unsigned long long


class _UtilizationSample(ctypes.Structure):
    """nvmlProcessUtilizationSample_t as a plain ctypes structure (see _ProcessInfo)."""

    _fields_ = (("pid", ctypes.c_uint), ("timeStamp", ctypes.c_ulonglong), ("smUtil", ctypes.c_uint),
                ("memUtil", ctypes.c_uint), ("encUtil", ctypes.c_uint), ("decUtil", ctypes.c_uint))


UtilizationSample = tuple[int, int, Any, Any]  # pid, timestamp (us), SM and memory percent, as NVML answered


class _UtilizationReader:
    """nvmlDeviceGetProcessUtilization into an array kept from pass to pass (see _ProcessLister)."""

    __name__ = "nvmlDeviceGetProcessUtilization"

    def __init__(self, function: Any) -> None:
        self._function = function
        self._count = ctypes.c_uint(0)
        self._array = (_UtilizationSample * 32)()
        self._lock = threading.Lock()

    def __call__(self, handle: Any, since: int) -> list[UtilizationSample]:
        with self._lock:
            while True:
                self._count.value = len(self._array)
                answer = self._function(handle, self._array, ctypes.byref(self._count), ctypes.c_ulonglong(since))
                if answer == pynvml.NVML_SUCCESS:
                    break
                if answer != pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
                    raise pynvml.NVMLError(answer)
                self._array = (_UtilizationSample * (self._count.value * 2 + 8))()
            return [(s.pid, s.timeStamp, s.smUtil, s.memUtil) for s in self._array[: self._count.value]]


class _Utilization(ctypes.Structure):
    """nvmlUtilization_t as a plain ctypes structure (see _ProcessInfo)."""

    _fields_ = (("gpu", ctypes.c_uint), ("memory", ctypes.c_uint))


class _Getter:
    """One of NVML's getters that answer through out-parameters, called directly into out-parameters kept
    from call to call: pynvml's wrapper takes a lock to look the function up and builds its out-parameters
    on every call, which was a third of a pass's NVML time. Used, like _ProcessLister, only while pynvml's
    own wrapper is in place.

    No lock of its own (taking one was a third of a call): only :meth:`NvmlBackend.read` calls these, and it
    is called by one thread at a time (the ``gpu`` collector's), as its GPM samples already require."""

    def __init__(self, name: str, function: Any, outs: tuple[Any, ...]) -> None:
        self.__name__ = name
        self._function = function
        self._outs = tuple(out() for out in outs)
        self._refs = tuple(ctypes.byref(out) for out in self._outs)
        self._out = self._outs[0]
        self._ref = self._refs[0]
        self.function = function  # for NvmlBackend's batch of a pass's getters, which calls it in one loop
        self.scalar: Any = self._out if type(self) is _Getter else None  # the one out-parameter, when .value is the answer

    @classmethod
    def load(cls, wrapper: Callable[..., Any], *outs: Any) -> Callable[..., Any]:
        """The direct call for pynvml's ``wrapper``, or the wrapper itself when it is not pynvml's own."""
        function = _pynvml_own(wrapper, wrapper.__name__)
        if function is None:
            return wrapper
        kind = _PairGetter if len(outs) > 1 else _StructGetter if issubclass(outs[0], ctypes.Structure) else cls
        return kind(wrapper.__name__, function, outs)

    def arguments(self, handle: Any, *args: Any) -> tuple[Any, ...]:
        """What the C function is called with for ``self(handle, *args)``."""
        return (handle, *args, *self._refs)

    def __call__(self, handle: Any, *args: Any) -> Any:
        answer = self._function(handle, *args, self._ref)
        if answer:  # NVML_SUCCESS is 0
            raise pynvml.NVMLError(answer)
        return self._out.value

    def answer(self) -> Any:
        """The answer of the call just made, from the out-parameters."""
        return self._out.value


class _PairGetter(_Getter):
    """A getter with two out-parameters, answered as pynvml does: [value, sampling period]."""

    def __call__(self, handle: Any, *args: Any) -> Any:
        answer = self._function(handle, *args, *self._refs)
        if answer:
            raise pynvml.NVMLError(answer)
        return self.answer()

    def answer(self) -> Any:
        return [out.value for out in self._outs]


class _StructGetter(_Getter):
    """A getter that fills in a structure: answered as a copy, since the one filled in is reused."""

    def __call__(self, handle: Any, *args: Any) -> Any:
        answer = self._function(handle, *args, self._ref)
        if answer:
            raise pynvml.NVMLError(answer)
        return self.answer()

    def answer(self) -> Any:
        return type(self._out).from_buffer_copy(self._out)


class _Memory(ctypes.Structure):
    """nvmlMemory_v2_t as a plain ctypes structure (see _ProcessInfo), its version filled in once: NVML reads it."""

    _fields_ = (("version", ctypes.c_uint), ("total", ctypes.c_ulonglong), ("reserved", ctypes.c_ulonglong),
                ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong))

    def __init__(self) -> None:
        super().__init__(version=pynvml.nvmlMemory_v2)


class _MemoryGetter(_StructGetter):
    """nvmlDeviceGetMemoryInfo_v2 into a _Memory; called as pynvml's wrapper is, with the version (which _Memory holds)."""

    @classmethod
    def load_memory(cls) -> Callable[..., Any]:
        wrapper = pynvml.nvmlDeviceGetMemoryInfo
        function = _pynvml_own(wrapper, "nvmlDeviceGetMemoryInfo_v2")
        return wrapper if function is None else cls(wrapper.__name__, function, (_Memory,))

    def __call__(self, handle: Any, *version: Any) -> Any:
        return super().__call__(handle)

    def arguments(self, handle: Any, *version: Any) -> tuple[Any, ...]:
        return (handle, self._ref)


# One getter of a pass's batch (see NvmlBackend._batch): the getter, its arguments, and for a direct getter the
# C function's arguments and its scalar out-parameter (None: ask answer()); the wrapper itself is called otherwise.
_Prepared = tuple[Callable[..., Any], tuple[Any, ...], "tuple[Any, ...] | None", Any]


@dataclass(frozen=True)
class _Getters:
    """The getters a pass calls for every GPU, direct where pynvml's own wrappers are in place."""

    temperature: Callable[..., Any]
    power: Callable[..., Any]
    fan: Callable[..., Any]
    pstate: Callable[..., Any]
    clock: Callable[..., Any]
    clock_events: Callable[..., Any]
    pcie_generation: Callable[..., Any]
    pcie_width: Callable[..., Any]
    utilization: Callable[..., Any]
    encoder: Callable[..., Any]
    decoder: Callable[..., Any]
    memory: Callable[..., Any]  # with the v2 structure's version as its second argument

    @classmethod
    def load(cls) -> _Getters:
        load, uint = _Getter.load, ctypes.c_uint
        return cls(
            temperature=load(pynvml.nvmlDeviceGetTemperature, uint), power=load(pynvml.nvmlDeviceGetPowerUsage, uint),
            fan=load(pynvml.nvmlDeviceGetFanSpeed, uint), pstate=load(pynvml.nvmlDeviceGetPerformanceState, uint),
            clock=load(pynvml.nvmlDeviceGetClockInfo, uint),
            clock_events=load(pynvml.nvmlDeviceGetCurrentClocksEventReasons, ctypes.c_ulonglong),
            pcie_generation=load(pynvml.nvmlDeviceGetCurrPcieLinkGeneration, uint),
            pcie_width=load(pynvml.nvmlDeviceGetCurrPcieLinkWidth, uint),
            utilization=load(pynvml.nvmlDeviceGetUtilizationRates, _Utilization),
            encoder=load(pynvml.nvmlDeviceGetEncoderUtilization, uint, uint),
            decoder=load(pynvml.nvmlDeviceGetDecoderUtilization, uint, uint),
            memory=_MemoryGetter.load_memory(),
        )

    def batch(self, handle: Any) -> tuple[_Prepared, ...]:
        """The getters every pass calls for the GPU of ``handle``, in the order _reading unpacks them."""
        calls = (
            (self.utilization, ()), (self.pstate, ()), (self.temperature, (pynvml.NVML_TEMPERATURE_GPU,)), (self.power, ()),
            (self.fan, ()), (self.clock, (pynvml.NVML_CLOCK_SM,)), (self.clock, (pynvml.NVML_CLOCK_MEM,)), (self.clock_events, ()),
            (self.pcie_generation, ()), (self.pcie_width, ()), (self.encoder, ()), (self.decoder, ()),
            (self.memory, (pynvml.nvmlMemory_v2,)),
        )
        prepared: list[_Prepared] = []
        for getter, args in calls:
            if isinstance(getter, _Getter):
                prepared.append((getter, (handle, *args), getter.arguments(handle, *args), getter.scalar))
            else:
                prepared.append((getter, (handle, *args), None, None))
        return tuple(prepared)


def _utilization_through_pynvml(handle: Any, since: int) -> list[UtilizationSample]:
    return [(s.pid, s.timeStamp, s.smUtil, s.memUtil) for s in pynvml.nvmlDeviceGetProcessUtilization(handle, since)]


class _EventWaiter:
    """nvmlEventSetWait_v2 called directly into an event structure kept from call to call; None when the wait
    timed out. pynvml's wrapper looks the function up under a lock, builds a structure and raises an exception
    for every wait that times out, which is nearly every one: most of what the XID listener cost an idle
    exporter each second. Only the XID listener's thread waits (see _ProcessLister for when it is used)."""

    def __init__(self, function: Any) -> None:
        self._function = function
        self._data = pynvml.c_nvmlEventData_t()
        self._ref = ctypes.byref(self._data)

    def __call__(self, event_set: Any, timeout_ms: int) -> Any:
        answer = self._function(event_set, self._ref, timeout_ms)
        if answer == pynvml.NVML_ERROR_TIMEOUT:
            return None
        if answer:
            raise pynvml.NVMLError(answer)
        return self._data  # read before the next wait


def _events_through_pynvml(event_set: Any, timeout_ms: int) -> Any:
    try:
        return pynvml.nvmlEventSetWait(event_set, timeout_ms)
    except pynvml.NVMLError_Timeout:
        return None


def _pynvml_own(wrapper: Callable[..., Any], name: str) -> Any:
    """The C function behind pynvml's ``wrapper``, or None: not pynvml's own wrapper any more (the
    tests' fake replaced it, and must be the one asked), or a driver without the function."""
    if getattr(wrapper, "__module__", None) != pynvml.__name__:
        return None
    try:
        return pynvml._nvmlGetFunctionPointer(name)
    except pynvml.NVMLError:
        return None


def _through_pynvml(wrapper: Callable[..., Any]) -> Callable[[Any], list[RunningProcess]]:
    def running(handle: Any) -> list[RunningProcess]:
        return [(p.pid, p.usedGpuMemory, getattr(p, "gpuInstanceId", None), getattr(p, "computeInstanceId", None))
                for p in wrapper(handle)]
    running.__name__ = wrapper.__name__
    return running


@dataclass(frozen=True)
class _Counters:
    """A GPU's counters as read at ``read_at`` (monotonic), every ``COUNTER_REFRESH_S``."""

    read_at: float
    energy_joules: float | None
    ecc_errors: dict[tuple[str, str], int]
    violation_seconds: dict[str, float]
    pcie_replays: int | None
    pcie_bytes: dict[str, int]
    nvlinks: tuple[NvLinkReading, ...]


@dataclass(frozen=True)
class _SlowFacts:
    read_at: float  # monotonic
    power_limit_watts: float | None
    retired_pages: dict[str, int] | None
    retired_pages_pending: bool | None
    remapped_rows: dict[str, int] | None
    mig: tuple[tuple[MigDevice, Any], ...]  # (device, its NVML handle)


def u32(value: Any) -> int | None:
    """A 32-bit NVML value, or None when it is NVML's "not available" sentinel."""
    if type(value) is not int:  # most answers are plain ints: a pass makes hundreds of these checks
        if value is None or isinstance(value, str):
            return None
        value = int(value)
    return None if value in _U32_SENTINELS or value < 0 else value


def u64(value: Any) -> int | None:
    """A 64-bit NVML value, or None when it is a sentinel."""
    if type(value) is not int:
        if value is None or isinstance(value, str):
            return None
        value = int(value)
    return None if value >= _U64_SENTINEL_FLOOR or value < 0 else value


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _scaled(value: int | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _flag(value: Any) -> bool | None:
    value = u32(value)
    return None if value is None else value == pynvml.NVML_FEATURE_ENABLED


def _counters(fields: dict[tuple[int, int], int], wanted: tuple[tuple[str, int], ...], scope: int, scale: int) -> dict[str, int]:
    """direction -> counter from the field values read, NVML's sentinels left out."""
    result = {}
    for key, field in wanted:
        counted = u64(fields.get((field, scope)))
        if counted is not None:
            result[key] = counted * scale
    return result


def _engine_ratio(answer: Any) -> float | None:
    """nvmlDeviceGet{En,De}coderUtilization answers [percent, sampling period in us]."""
    return _scaled(u32(answer[0]), 0.01) if answer else None


def _reading(identity: GpuIdentity, answers: list[Any], memory: Any, memory_temperature: Any, throttle: dict[str, bool] | None,
             gpm: list[float | None], pcie: dict[str, float] | None, slow: _SlowFacts, counters: _Counters,
             mig: tuple[MigReading, ...]) -> GpuReading:
    """A GPU's reading from NVML's answers to one read (see NvmlBackend.read_later); ``pcie`` None: GPM's."""
    util, raw_pstate, temperature, power, fan, sm_clock, memory_clock, _, generation, width, encoder, decoder, _ = answers
    pstate = u32(raw_pstate)
    profile = profile_of(gpm)
    return GpuReading(
        identity=identity,
        temperature_celsius=u32(temperature),
        memory_temperature_celsius=u32(memory_temperature),
        utilization_ratio=_scaled(u32(getattr(util, "gpu", None)), 0.01),
        memory_utilization_ratio=_scaled(u32(getattr(util, "memory", None)), 0.01),
        memory_used_bytes=u64(getattr(memory, "used", None)),
        memory_free_bytes=u64(getattr(memory, "free", None)),
        memory_total_bytes=u64(getattr(memory, "total", None)),
        memory_reserved_bytes=u64(getattr(memory, "reserved", None)),
        power_watts=_scaled(u32(power), 0.001),
        power_limit_watts=slow.power_limit_watts,
        energy_joules=counters.energy_joules,
        fan_speed_ratio=_scaled(u32(fan), 0.01),
        performance_state=None if pstate == _PSTATE_UNKNOWN else pstate,
        sm_clock_hz=_scaled(u32(sm_clock), 1e6),
        memory_clock_hz=_scaled(u32(memory_clock), 1e6),
        throttle_reasons=throttle,
        ecc_errors=counters.ecc_errors,
        pcie_link_generation=u32(generation),
        pcie_link_width=u32(width),
        retired_pages=slow.retired_pages,
        remapped_rows=slow.remapped_rows,
        retired_pages_pending=slow.retired_pages_pending,
        profiling=profile.ratios,
        pcie_throughput_bytes_per_second=(
            pcie if pcie is not None else {d: v for (bus, d), v in profile.bandwidth.items() if bus == "pcie"}),
        pcie_bytes=counters.pcie_bytes,
        pcie_replays=counters.pcie_replays,
        nvlink_throughput_bytes_per_second={d: v for (bus, d), v in profile.bandwidth.items() if bus == "nvlink"},
        nvlinks=counters.nvlinks,
        encoder_utilization_ratio=_engine_ratio(encoder),
        decoder_utilization_ratio=_engine_ratio(decoder),
        violation_seconds=counters.violation_seconds,
        mig=mig,
    )


class NvmlBackend(GpuBackend):
    kind = "nvml"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock  # monotonic seconds: when slow facts and counters are due, when to re-probe
        self._reprobe_at = 0.0
        self._handles: dict[int, Any] = {}
        self._identities: dict[int, GpuIdentity] = {}
        self._driver = ""
        self._cuda = ""
        self._generation = 0  # bumped by every (re)initialisation; the XID listener follows it
        self._event_set: Any = None
        self._wait_events: Callable[[Any, int], Any] = _events_through_pynvml  # see _EventWaiter
        self._event_generation = -1
        self._gpm = GpmReader(self._call, _pynvml_own)
        self._nvlinks: dict[int, list[int]] = {}  # GPU -> links that exist, found once per initialisation
        self._unsupported: set[tuple[Any, ...]] = set()  # calls (see _key) that answered a _PERMANENT error
        self._unsupported_fns: set[Callable[..., Any]] = set()  # the functions of those calls
        self._handle_indexes: dict[int, int] = {}  # id(handle) -> GPU index, for _key
        self._utilization_seen: dict[int, int] = {}  # GPU -> newest process-utilization timestamp read (us)
        # GPU -> (when read, PID -> (SM, memory) ratios): served until the next read is due
        self._utilization_read: dict[int, tuple[float, dict[int, tuple[float | None, float | None]]]] = {}
        self._slow: dict[int, _SlowFacts] = {}
        # GPU -> (NVML's process lists, the utilization read served, the processes made from both) of the last pass
        self._processes: dict[int, tuple[tuple[list[RunningProcess], ...], dict[int, tuple[float | None, float | None]], list[GpuProcess]]] = {}
        self._process_listers: tuple[Callable[[Any], list[RunningProcess]], ...] = ()
        self._process_utilization_reader: Callable[[Any, int], list[UtilizationSample]] = _utilization_through_pynvml
        self._get_field_values: Any = None  # NVML's own function, when pynvml's wrapper is in place
        self._field_readers: dict[int, _FieldReader] = {}  # GPU -> its reader of the fields a pass reads
        self._get = _Getters.load()  # again at start(): whoever replaced pynvml's functions by then is asked
        self._fields_unsupported: dict[int, set[tuple[int, int]]] = {}  # GPU -> fields left out until the re-probe
        self._counters: dict[int, _Counters] = {}
        self._throttle_masks: dict[int, dict[str, bool]] = {}  # clock-event mask -> the reasons it answers
        self._prepared: dict[int, tuple[_Prepared, ...]] = {}  # GPU -> its batch of getters (see _get_batch)

    # lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise BackendUnavailable(f"NVML is not available: {exc}") from None
        # start() runs before collection begins or under the supervisor's lock: no lock of its own.
        self._handles.clear()
        self._identities.clear()
        self._forget_unsupported()
        self._handle_indexes.clear()
        self._utilization_seen.clear()
        self._utilization_read.clear()
        self._slow.clear()
        self._counters.clear()
        self._processes.clear()
        self._generation += 1
        self._process_listers = tuple(
            _ProcessLister.load(wrapper, name) or _through_pynvml(wrapper)
            for wrapper, name in ((pynvml.nvmlDeviceGetComputeRunningProcesses, "nvmlDeviceGetComputeRunningProcesses_v3"),
                                  (pynvml.nvmlDeviceGetGraphicsRunningProcesses, "nvmlDeviceGetGraphicsRunningProcesses_v3"))
        )
        self._get_field_values = _pynvml_own(pynvml.nvmlDeviceGetFieldValues, "nvmlDeviceGetFieldValues")
        self._get = _Getters.load()
        self._prepared.clear()
        self._field_readers.clear()
        utilization = _pynvml_own(pynvml.nvmlDeviceGetProcessUtilization, "nvmlDeviceGetProcessUtilization")
        self._process_utilization_reader = _utilization_through_pynvml if utilization is None else _UtilizationReader(utilization)
        waiter = _pynvml_own(pynvml.nvmlEventSetWait, "nvmlEventSetWait_v2")
        self._wait_events = _events_through_pynvml if waiter is None else _EventWaiter(waiter)
        self._driver = _text(self._optional(pynvml.nvmlSystemGetDriverVersion) or "")
        cuda = u32(self._optional(pynvml.nvmlSystemGetCudaDriverVersion))
        self._cuda = f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else ""

    def close(self) -> None:
        self._gpm.reset()
        with contextlib.suppress(pynvml.NVMLError):  # not initialised, or already gone: nothing to release
            pynvml.nvmlShutdown()

    def recover(self) -> None:
        self.close()
        self.start()

    # system ----------------------------------------------------------------------------
    def driver_version(self) -> str:
        return self._driver

    def cuda_version(self) -> str:
        return self._cuda

    def device_count(self) -> int:
        try:
            return int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            raise BackendUnavailable(f"cannot count GPUs: {exc}") from None

    # per GPU ---------------------------------------------------------------------------
    def identity(self, index: int) -> GpuIdentity:
        cached = self._identities.get(index)
        if cached is not None:
            return cached
        handle = self._handle(index)
        pci = self._call(pynvml.nvmlDeviceGetPciInfo, handle)
        identity = GpuIdentity(
            index=index,
            uuid=_text(self._call(pynvml.nvmlDeviceGetUUID, handle) or ""),
            name=_text(self._call(pynvml.nvmlDeviceGetName, handle) or ""),
            pci_bus_id=_text(pci.busId) if pci is not None else "",
        )
        self._identities[index] = identity
        return identity

    def read(self, index: int) -> GpuReading:
        return self.read_later(index)[1]()

    def read_later(self, index: int) -> tuple[GpuIdentity, Callable[[], GpuReading]]:
        """Every NVML call of a reading now; NVML's answers made into the reading (units, sentinels, structures,
        GPM's percentages) when it is asked for: the gpu collector asks when a snapshot is rendered, so an
        unscraped pass does not convert. The answers are not changed after this call."""
        handle = self._handle(index)
        now = self._clock()
        if now >= self._reprobe_at:
            self._forget_unsupported()
            self._reprobe_at = now + REPROBE_S
        answers = self._get_batch(index, handle)
        memory = answers[_MEMORY_AT] or self._call(pynvml.nvmlDeviceGetMemoryInfo, handle)  # a driver without the v2 structure
        profile = self._gpm.read_values(index, handle)
        slow = self._slow_facts(index, handle, now)
        counters = self._counters.get(index)
        due = counters is None or now - counters.read_at >= COUNTER_REFRESH_S
        links = self._links(index, handle) if due else []
        # every field-value reading of this GPU in one call: memory temperature, and the counters when due
        wanted = [_MEMORY_TEMPERATURE]
        if due:
            wanted += [*_COUNTER_FIELDS, *((field, link) for link in links for _, field in _NVLINK_BYTES_FIELDS)]
        fields = self._field_values(index, handle, wanted)
        if counters is None or due:
            counters = self._counters[index] = self._read_counters(handle, now, links, fields)
        identity = self.identity(index)
        # NVML's own 20 ms PCIe sample where GPM did not measure PCIe (no GPM, or not this time)
        pcie = None if any(profile[at] is not None for at in PCIE_AT if at < len(profile)) else self._pcie_sampled(handle)
        return identity, functools.partial(
            _reading, identity, answers, memory, fields.get(_MEMORY_TEMPERATURE), self._throttle_reasons(handle, answers[_EVENTS_AT]),
            profile, pcie, slow, counters, self._mig(index, handle, slow.mig),
        )

    def _get_batch(self, index: int, handle: Any) -> list[Any]:
        """The answers of the getters every pass calls (see _Getters.batch), as ``_call`` would give them one by one.

        A direct getter's C function is called in this one loop, its out-parameter read here: two Python calls
        fewer per getter, a sixth of reading a GPU. A call that answered "not supported" before, and every
        wrapper that is not pynvml's own, goes through ``_call``."""
        prepared = self._prepared.get(index)
        if prepared is None:
            prepared = self._prepared[index] = self._get.batch(handle)
        answers: list[Any] = []
        append = answers.append
        remembered = self._unsupported_fns
        for getter, args, direct, scalar in prepared:
            if direct is None or getter in remembered:
                append(self._call(getter, *args))
                continue
            answer = getter.function(*direct)  # type: ignore[attr-defined]  # direct is set for _Getter only
            if answer:
                self._failed(getter, args, pynvml.NVMLError(answer))  # raises, or the answer is "not supported"
                append(None)
            else:
                append(scalar.value if scalar is not None else getter.answer())  # type: ignore[attr-defined]  # as above
        return answers

    def _read_counters(self, handle: Any, now: float, links: list[int], fields: dict[tuple[int, int], Any]) -> _Counters:
        """The counters from the field values read, each one a field could not give through its own call."""
        call = self._call
        energy = fields.get((pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, 0))
        if energy is None:
            energy = call(pynvml.nvmlDeviceGetTotalEnergyConsumption, handle)
        replays = fields.get((pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER, 0))
        if replays is None:
            replays = call(pynvml.nvmlDeviceGetPcieReplayCounter, handle)
        return _Counters(
            read_at=now,
            energy_joules=_scaled(u64(energy), 0.001),
            ecc_errors=self._ecc_errors(handle, fields),
            violation_seconds=self._violations(handle, fields),
            pcie_replays=u32(replays),
            pcie_bytes=_counters(fields, _PCIE_BYTES_FIELDS, 0, 1),
            nvlinks=self._nvlink_readings(handle, links, fields),
        )

    def _forget_unsupported(self) -> None:
        """Ask again what answered "not supported" (NVML re-initialised, or the re-probe is due)."""
        self._unsupported.clear()
        self._unsupported_fns.clear()
        self._fields_unsupported.clear()
        self._nvlinks.clear()

    def processes(self, index: int) -> list[GpuProcess]:
        """The GPU's processes; the very list of the pass before when NVML answered the same (callers must not
        change it): processes and their memory barely change from second to second under a caching allocator,
        and making ten GpuProcess objects per GPU anew each pass was two fifths of a ``processes`` pass."""
        handle = self._handle(index)
        answers = tuple(self._call(lister, handle) or [] for lister in self._process_listers)
        listed = any(answers)
        utilization = self._process_utilization(index, handle) if listed else {}
        previous = self._processes.get(index)
        if previous is not None and previous[0] == answers and previous[1] is utilization:
            return previous[2]
        processes = self._processes_from(answers, utilization)
        self._processes[index] = (answers, utilization, processes)
        return processes

    @staticmethod
    def _processes_from(answers: tuple[list[RunningProcess], ...], utilization: dict[int, tuple[float | None, float | None]]) -> list[GpuProcess]:
        memory: dict[int, int | None] = {}
        instances: dict[int, tuple[int | None, int | None]] = {}  # pid -> (GPU instance, compute instance) on MIG
        for answer in answers:
            for pid, raw_used, gpu_instance, compute_instance in answer:
                used = u64(raw_used)
                previous = memory.get(pid)
                memory[pid] = used if previous is None else max(previous, used or 0)
                # NVML's "not in a MIG instance" is 0xFFFFFFFF, which u32 reads as None
                instances[pid] = (u32(gpu_instance), u32(compute_instance))
        return [
            GpuProcess(pid=pid, used_memory_bytes=used, sm_utilization_ratio=utilization.get(pid, (None, None))[0],
                       memory_utilization_ratio=utilization.get(pid, (None, None))[1],
                       gpu_instance=instances[pid][0], compute_instance=instances[pid][1])
            for pid, used in memory.items()
        ]

    def _process_utilization(self, index: int, handle: Any) -> dict[int, tuple[float | None, float | None]]:
        """PID -> (SM, memory) ratios: each process' newest sample NVML took since the read before,
        read every PROCESS_UTILIZATION_REFRESH_S."""
        now = self._clock()
        read = self._utilization_read.get(index)
        if read is not None and now - read[0] < PROCESS_UTILIZATION_REFRESH_S:
            return read[1]
        since = self._utilization_seen.get(index, 0)
        samples = self._call(self._process_utilization_reader, handle, since) or []
        newest: dict[int, UtilizationSample] = {}
        for sample in samples:
            pid, stamp = sample[0], sample[1]
            if stamp > since and (pid not in newest or stamp > newest[pid][1]):
                newest[pid] = sample
        if newest:
            self._utilization_seen[index] = max(sample[1] for sample in newest.values())
        ratios = {pid: (_scaled(u32(sm), 0.01), _scaled(u32(mem), 0.01)) for pid, (_, _, sm, mem) in newest.items()}
        self._utilization_read[index] = (now, ratios)
        return ratios

    # XID events ------------------------------------------------------------------------
    def wait_xid_events(self, timeout_s: float) -> list[XidEvent]:
        event_set = self._current_event_set()
        if event_set is None:
            time.sleep(timeout_s)
            return []
        try:
            data = self._wait_events(event_set, max(1, int(timeout_s * 1000)))
        except pynvml.NVMLError as exc:
            log.debug("XID event wait failed (%s); the event set is rebuilt", exc)
            self._event_generation = -1
            time.sleep(timeout_s)
            return []
        if data is None or not data.eventType & pynvml.nvmlEventTypeXidCriticalError:
            return []
        try:
            gpu = int(pynvml.nvmlDeviceGetIndex(data.device))
        except pynvml.NVMLError:
            return []
        return [XidEvent(gpu=gpu, xid=int(data.eventData), timestamp=time.time())]

    def _current_event_set(self) -> Any:
        """The event set of the current NVML generation; None when no GPU supports XID events."""
        if self._event_generation == self._generation:
            return self._event_set
        if self._event_set is not None:
            with contextlib.suppress(pynvml.NVMLError):  # NVML was re-initialised underneath it; the set is gone either way
                pynvml.nvmlEventSetFree(self._event_set)
        self._event_set = None
        self._event_generation = self._generation
        try:
            event_set = pynvml.nvmlEventSetCreate()
            registered = 0
            for index in range(self.device_count()):
                try:
                    handle = self._handle(index)
                    supported = pynvml.nvmlDeviceGetSupportedEventTypes(handle)
                    if supported & pynvml.nvmlEventTypeXidCriticalError:
                        pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
                        registered += 1
                except (pynvml.NVMLError, GpuLost) as exc:
                    log.info("GPU %d: no XID events (%s)", index, exc)
        except (pynvml.NVMLError, BackendUnavailable) as exc:
            log.info("XID events unavailable: %s", exc)
            return None
        if registered:
            self._event_set = event_set
        else:
            pynvml.nvmlEventSetFree(event_set)
        return self._event_set

    # helpers ---------------------------------------------------------------------------
    def _handle(self, index: int) -> Any:
        handle = self._handles.get(index)
        if handle is None:
            handle = self._call(pynvml.nvmlDeviceGetHandleByIndex, index)
            if handle is None:
                raise GpuLost(f"GPU {index}: no handle")
            self._handles[index] = handle
            self._handle_indexes[id(handle)] = index
        return handle

    @staticmethod
    def _optional(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except pynvml.NVMLError:
            return None

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; None when NVML says the field is unsupported; GpuLost when the GPU is in trouble."""
        # the key is made only for functions that have answered "unsupported" before: most calls never did
        if fn in self._unsupported_fns and self._key(fn, args) in self._unsupported:
            return None
        try:
            return fn(*args)
        except pynvml.NVMLError as exc:
            self._failed(fn, args, exc)
            return None

    def _failed(self, fn: Callable[..., Any], args: tuple[Any, ...], exc: pynvml.NVMLError) -> None:
        """Returns for an "unsupported" answer (remembered while it holds, see _PERMANENT); else raises GpuLost."""
        if not isinstance(exc, _UNSUPPORTED):
            raise GpuLost(f"{fn.__name__}: {exc}") from None
        key = self._key(fn, args)
        if key and isinstance(exc, _PERMANENT):
            self._unsupported.add(key)
            self._unsupported_fns.add(fn)

    def _key(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, ...]:
        """What identifies a call across passes: a GPU's handle (a ctypes pointer, unhashable), always
        the first argument, stands as its index; () for a call with another unhashable argument, never remembered.

        Only handles this backend holds are in ``_handle_indexes``, so an id found there is that handle.
        """
        if not args:
            return (fn,)
        index = self._handle_indexes.get(id(args[0]))
        key = (fn, ("gpu", index), *args[1:]) if index is not None else (fn, *args)
        try:
            hash(key)
        except TypeError:
            return ()
        return key

    def _field_values(self, index: int, handle: Any, wanted: list[tuple[int, int]]) -> dict[tuple[int, int], Any]:
        """(field id, scope) -> the raw value, for the fields NVML answered; fields it does not have are not asked again."""
        skipped = self._fields_unsupported.setdefault(index, set())
        ids = [key for key in wanted if key not in skipped] if skipped else wanted
        if not ids:
            return {}
        if self._get_field_values is not None:
            reader = self._field_readers.get(index)
            if reader is None or reader.ids != ids:
                reader = self._field_readers[index] = _FieldReader(self._get_field_values, ids)
            values, unsupported = self._call(reader, handle) or ({}, set())
        else:
            values, unsupported = self._fields_through_pynvml(handle, ids)
        skipped |= unsupported
        return values

    def _fields_through_pynvml(self, handle: Any, ids: list[tuple[int, int]]) -> tuple[dict[tuple[int, int], Any], set[tuple[int, int]]]:
        values: dict[tuple[int, int], Any] = {}
        unsupported = set()
        for key, value in zip(ids, self._call(pynvml.nvmlDeviceGetFieldValues, handle, ids) or [], strict=False):  # a short answer leaves fields out
            usable = _field_usable(key[0], value.nvmlReturn, value.valueType)
            attr = _FIELD_VALUE_ATTR.get(value.valueType) if usable else None
            if attr is not None:
                values[key] = getattr(value.value, attr)
            elif usable is False:
                unsupported.add(key)
        return values, unsupported

    def _throttle_reasons(self, handle: Any, mask: Any) -> dict[str, bool] | None:
        """The reasons of the clock-event ``mask`` read (None: ask the older call that answers it)."""
        if mask is None:
            mask = self._call(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons, handle)
        mask = u64(mask)
        if mask is None:
            return None
        # the same dict for the same mask (callers must not change it): the mask rarely changes, and the gpu
        # collector serves the series it made from this dict again while it is handed the same one
        reasons = self._throttle_masks.get(mask)
        if reasons is None:
            if len(self._throttle_masks) >= _THROTTLE_MASKS_KEPT:
                self._throttle_masks.clear()
            reasons = self._throttle_masks[mask] = {reason: bool(mask & bit) for reason, bit in _THROTTLE_BITS.items()}
        return reasons

    def _ecc_errors(self, handle: Any, fields: dict[tuple[int, int], Any]) -> dict[tuple[str, str], int]:
        result = {}
        for error_type in ECC_ERROR_TYPES:
            for counter in ECC_COUNTERS:
                raw = fields.get((_ECC_FIELDS[(error_type, counter)], 0))
                if raw is None:
                    raw = self._call(pynvml.nvmlDeviceGetTotalEccErrors, handle, _ECC_TYPE[error_type], _ECC_COUNTER[counter])
                value = u64(raw)
                if value is not None:
                    result[(error_type, counter)] = value
        return result

    def _retired_pages(self, handle: Any) -> dict[str, int] | None:
        result = {}
        for cause, code in _RETIREMENT_CAUSE.items():
            pages = self._call(pynvml.nvmlDeviceGetRetiredPages, handle, code)
            if pages is not None:
                result[cause] = len(pages)
        return result or None

    def _pcie_sampled(self, handle: Any) -> dict[str, float]:
        """NVML's 20 ms sample of the PCIe throughput (where GPM does not measure it)."""
        measured = {}
        for direction, counter in _PCIE_UTIL.items():
            value = u32(self._call(pynvml.nvmlDeviceGetPcieThroughput, handle, counter))
            if value is not None:
                measured[direction] = float(value * _KIB)
        return measured

    def _links(self, index: int, handle: Any) -> list[int]:
        links = self._nvlinks.get(index)
        if links is None:
            # links that do not exist answer NOT_SUPPORTED or INVALID_ARGUMENT: ask once, not every pass
            links = [link for link in range(pynvml.NVML_NVLINK_MAX_LINKS)
                     if self._call(pynvml.nvmlDeviceGetNvLinkState, handle, link) is not None]
            self._nvlinks[index] = links
        return links

    def _nvlink_readings(self, handle: Any, links: list[int], fields: dict[tuple[int, int], int]) -> tuple[NvLinkReading, ...]:
        readings = []
        for link in links:
            state = self._call(pynvml.nvmlDeviceGetNvLinkState, handle, link)
            if state is None:
                continue
            errors = {}
            for name, counter in _NVLINK_ERROR_COUNTER.items():
                count = u64(self._call(pynvml.nvmlDeviceGetNvLinkErrorCounter, handle, link, counter))
                if count is not None:
                    errors[name] = count
            readings.append(NvLinkReading(
                link=link, up=state == pynvml.NVML_FEATURE_ENABLED,
                bytes=_counters(fields, _NVLINK_BYTES_FIELDS, link, _KIB), errors=errors,
            ))
        return tuple(readings)

    def _violations(self, handle: Any, fields: dict[tuple[int, int], Any]) -> dict[str, float]:
        result = {}
        for reason, policy in _VIOLATION_POLICY.items():
            nanoseconds = u64(fields.get((_VIOLATION_FIELDS[reason], 0)))
            if nanoseconds is None:
                status = self._call(pynvml.nvmlDeviceGetViolationStatus, handle, policy)
                nanoseconds = None if status is None else u64(status.violationTime)
            if nanoseconds is not None:
                result[reason] = nanoseconds / 1e9
        return result

    def _mig_layout(self, handle: Any) -> tuple[tuple[MigDevice, Any], ...]:
        """The GPU's MIG devices with their handles; empty when MIG is off."""
        mode = self._call(pynvml.nvmlDeviceGetMigMode, handle)
        if not mode or mode[0] != pynvml.NVML_DEVICE_MIG_ENABLE:
            return ()
        devices = []
        for slot in range(u32(self._call(pynvml.nvmlDeviceGetMaxMigDeviceCount, handle)) or 0):
            mig = self._call(pynvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, slot)
            if mig is None:
                continue  # an empty slot answers NOT_FOUND
            gpu_instance = u32(self._call(pynvml.nvmlDeviceGetGpuInstanceId, mig))
            compute_instance = u32(self._call(pynvml.nvmlDeviceGetComputeInstanceId, mig))
            if gpu_instance is None or compute_instance is None:
                continue
            name = _text(self._call(pynvml.nvmlDeviceGetName, mig) or "")
            devices.append((MigDevice(
                gpu_instance=gpu_instance, compute_instance=compute_instance,
                profile=name.rsplit("MIG ", 1)[1] if "MIG " in name else "",
                uuid=_text(self._call(pynvml.nvmlDeviceGetUUID, mig) or ""),
            ), mig))
        return tuple(devices)

    def _mig(self, index: int, handle: Any, layout: tuple[tuple[MigDevice, Any], ...]) -> tuple[MigReading, ...]:
        if not layout:
            return ()
        profiles = {gi: self._gpm.read_mig(index, handle, gi) for gi in sorted({device.gpu_instance for device, _ in layout})}
        readings = []
        for device, mig in layout:
            memory = self._call(pynvml.nvmlDeviceGetMemoryInfo, mig)
            readings.append(MigReading(
                device=device,
                memory_used_bytes=u64(getattr(memory, "used", None)),
                memory_total_bytes=u64(getattr(memory, "total", None)),
                profiling=profiles[device.gpu_instance].ratios,
            ))
        return tuple(readings)

    def mig_devices(self, index: int) -> tuple[MigDevice, ...]:
        return tuple(device for device, _ in self._slow_facts(index, self._handle(index), self._clock()).mig)

    def _slow_facts(self, index: int, handle: Any, now: float) -> _SlowFacts:
        """What only an administrator or a rare hardware event changes, read at most every ``SLOW_REFRESH_S``."""
        facts = self._slow.get(index)
        if facts is not None and now - facts.read_at < SLOW_REFRESH_S:
            return facts
        facts = _SlowFacts(
            read_at=now,
            power_limit_watts=_scaled(u32(self._call(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle)), 0.001),
            retired_pages=self._retired_pages(handle),
            retired_pages_pending=_flag(self._call(pynvml.nvmlDeviceGetRetiredPagesPendingStatus, handle)),
            remapped_rows=self._remapped_rows(handle),
            mig=self._mig_layout(handle),
        )
        self._gpm.forget_mig(index, {device.gpu_instance for device, _ in facts.mig})
        self._slow[index] = facts
        return facts

    def _remapped_rows(self, handle: Any) -> dict[str, int] | None:
        rows = self._call(pynvml.nvmlDeviceGetRemappedRows, handle)
        if rows is None:
            return None
        return {state: int(count) for state, count in zip(REMAPPED_ROW_STATES, rows, strict=False)}  # older bindings answer fewer states
