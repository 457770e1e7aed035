"""What every GPU backend returns: plain readings, and the one interface they implement.

A reading of ``None`` means "not supported here" (or a sentinel value NVML uses for it):
collectors omit that series instead of inventing a zero.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field

from mlwarden.exporter.procinfo import ProcessInfo

THROTTLE_REASONS = (
    "gpu_idle",
    "applications_clocks_setting",
    "sw_power_cap",
    "hw_slowdown",
    "sync_boost",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
    "display_clock_setting",
)
ECC_ERROR_TYPES = ("corrected", "uncorrected")
ECC_COUNTERS = ("volatile", "aggregate")
REMAPPED_ROW_STATES = ("correctable", "uncorrectable", "pending", "failure")
# GPU Performance Monitoring (Hopper and later), as ratios 0..1 over the collection interval.
PROFILING_RATIOS = (
    "graphics_engine_activity", "sm_activity", "sm_occupancy", "tensor_activity",
    "dram_bandwidth_utilization", "fp16_activity", "fp32_activity", "fp64_activity",
)
DIRECTIONS = ("tx", "rx")
NVLINK_ERRORS = ("replay", "recovery", "crc_flit", "crc_data", "ecc_data")
VIOLATION_REASONS = (
    "power", "thermal", "sync_boost", "board_limit", "low_utilization", "reliability",
    "total_app_clocks", "total_base_clocks",
)


class BackendUnavailable(RuntimeError):
    """No GPU library or driver: the backend cannot read anything (yet)."""


class GpuLost(RuntimeError):
    """One GPU stopped answering (fell off the bus, timed out); the others may still work."""


@dataclass(frozen=True)
class GpuIdentity:
    index: int
    uuid: str
    name: str
    pci_bus_id: str


@dataclass(frozen=True)
class NvLinkReading:
    link: int
    up: bool
    bytes: dict[str, int] = field(default_factory=dict)  # direction -> data bytes since the driver loaded
    errors: dict[str, int] = field(default_factory=dict)  # NVLINK_ERRORS -> count


@dataclass(frozen=True)
class MigDevice:
    """One MIG device (a compute instance in a GPU instance) of a GPU, as the kubelet names it by ``uuid``."""

    gpu_instance: int
    compute_instance: int
    profile: str  # "1g.10gb"
    uuid: str = ""  # "MIG-..."


@dataclass(frozen=True)
class MigReading:
    device: MigDevice
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    # PROFILING_RATIOS of its GPU instance (GPM measures a GPU instance as a whole); empty without GPM
    profiling: dict[str, float] = field(default_factory=dict)


# Not frozen, and with slots: a frozen dataclass's __init__ sets each of these 35 fields through
# object.__setattr__, 20 us per GPU per pass (a fifth of reading a GPU); readings are not changed once made.
@dataclass(slots=True)
class GpuReading:
    identity: GpuIdentity
    temperature_celsius: float | None = None
    memory_temperature_celsius: float | None = None
    utilization_ratio: float | None = None
    memory_utilization_ratio: float | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_total_bytes: int | None = None
    memory_reserved_bytes: int | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    energy_joules: float | None = None
    fan_speed_ratio: float | None = None
    performance_state: int | None = None
    sm_clock_hz: float | None = None
    memory_clock_hz: float | None = None
    throttle_reasons: dict[str, bool] | None = None  # reason -> active
    ecc_errors: dict[tuple[str, str], int] = field(default_factory=dict)  # (error_type, counter) -> count
    pcie_link_generation: int | None = None
    pcie_link_width: int | None = None
    retired_pages: dict[str, int] | None = None  # cause -> pages
    remapped_rows: dict[str, int] | None = None  # state -> rows
    retired_pages_pending: bool | None = None
    profiling: dict[str, float] = field(default_factory=dict)  # PROFILING_RATIOS -> 0..1; empty without GPM
    pcie_throughput_bytes_per_second: dict[str, float] = field(default_factory=dict)  # direction -> B/s
    pcie_bytes: dict[str, int] = field(default_factory=dict)  # direction -> bytes since the driver loaded
    pcie_replays: int | None = None
    nvlink_throughput_bytes_per_second: dict[str, float] = field(default_factory=dict)  # all links, GPM
    nvlinks: tuple[NvLinkReading, ...] = ()
    encoder_utilization_ratio: float | None = None
    decoder_utilization_ratio: float | None = None
    violation_seconds: dict[str, float] = field(default_factory=dict)  # VIOLATION_REASONS -> seconds throttled
    mig: tuple[MigReading, ...] = ()


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_memory_bytes: int | None
    info: ProcessInfo | None = None  # None: look it up in /proc
    sm_utilization_ratio: float | None = None
    memory_utilization_ratio: float | None = None
    gpu_instance: int | None = None  # the MIG device it runs in; None without MIG
    compute_instance: int | None = None


@dataclass(frozen=True)
class XidEvent:
    gpu: int
    xid: int
    timestamp: float


class GpuBackend(abc.ABC):
    """One source of GPU readings. Methods may block (NVML can hang); the loop bounds them."""

    kind: str = ""

    @abc.abstractmethod
    def start(self) -> None:
        """Initialise the library; raises BackendUnavailable when there is no library or driver."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def recover(self) -> None:
        """Re-initialise after a lost GPU or a failure; raises BackendUnavailable if it cannot."""

    @abc.abstractmethod
    def driver_version(self) -> str: ...

    @abc.abstractmethod
    def cuda_version(self) -> str: ...

    @abc.abstractmethod
    def device_count(self) -> int: ...

    @abc.abstractmethod
    def identity(self, index: int) -> GpuIdentity:
        """Raises GpuLost when the GPU does not answer."""

    @abc.abstractmethod
    def read(self, index: int) -> GpuReading:
        """Raises GpuLost when the GPU does not answer."""

    def read_later(self, index: int) -> tuple[GpuIdentity, Callable[[], GpuReading]]:
        """Read the GPU now, and make the reading from what was read when it is asked for (``read``, split in two).

        The gpu collector asks only when a snapshot is rendered: a backend whose answers need converting
        (NVML's units, sentinels, structures) converts only the passes someone scrapes. Raises as ``read`` does.
        """
        reading = self.read(index)
        return reading.identity, lambda: reading

    @abc.abstractmethod
    def processes(self, index: int) -> list[GpuProcess]:
        """Raises GpuLost when the GPU does not answer."""

    def mig_devices(self, index: int) -> tuple[MigDevice, ...]:
        """The GPU's MIG devices as last read (empty without MIG); never blocks on the GPU."""
        return ()

    @abc.abstractmethod
    def wait_xid_events(self, timeout_s: float) -> list[XidEvent]:
        """Block up to ``timeout_s`` for XID events; an empty list when none came."""
