"""A simulated GPU backend for machines without GPUs: the demo, the tests and the benchmarks.

Each GPU's load moves slowly (a sine wave with its own phase), and temperature, power,
memory and clocks follow it the way a real card's do. Faults are injected at run time
(``inject``; the exporter's ``POST /-/simulate`` calls it): overheat and cool, lose and
recover (reads raise :class:`GpuLost`, like NVML's GpuIsLost), ECC errors, and XID events
that reach the XID collector through the same path NVML events take.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mlwarden.exporter.backends.base import (
    ECC_COUNTERS,
    ECC_ERROR_TYPES,
    THROTTLE_REASONS,
    GpuBackend,
    GpuIdentity,
    GpuLost,
    GpuProcess,
    GpuReading,
    XidEvent,
)
from mlwarden.exporter.procinfo import ProcessInfo, Workload

FAULTS = ("overheat", "cool", "lose", "recover", "ecc", "xid", "idle", "busy")
_IDLE_LOAD = 0.02  # a job that holds its memory and waits: what GpuAllocatedButIdle looks for
OVERHEAT_CELSIUS = 94.0  # above the critical threshold unless the injector names a temperature
_GIB = 2**30
_MEMORY_TOTAL = 80 * _GIB
_MEMORY_RESERVED = 512 * 2**20
_POWER_LIMIT_W = 700.0
_MAX_PENDING_XIDS = 10_000  # a runaway injector cannot grow memory without bound


@dataclass
class _SimulatedGpu:
    identity: GpuIdentity
    overheat_celsius: float | None = None  # None: normal temperature
    lost: bool = False
    ecc: dict[tuple[str, str], int] = field(default_factory=dict)
    double_bit_pages: int = 0
    energy_joules: float = 0.0
    last_read: float | None = None
    idle: bool = False
    thermal_violation_seconds: float = 0.0
    pcie_bytes: float = 0.0


@functools.lru_cache(maxsize=4096)  # one identity per process, as the NVML backend's Describer keeps it
def _workload(gpu: int, k: int) -> ProcessInfo:
    """Even GPUs run a Kubernetes pod each, odd GPUs a Slurm job each: the demo shows both kinds."""
    if gpu % 2 == 0:
        return ProcessInfo(f"train_worker_{k}", Workload(
            user="ml", container_id=f"{0xc0de00000000 + gpu:012x}",
            namespace=("research", "vision")[gpu // 2 % 2], pod=f"train-{gpu // 2}-0", container="trainer",
        ))
    return ProcessInfo(f"train_worker_{k}", Workload(user=("alice", "bob")[gpu // 2 % 2], slurm_job=str(4200 + gpu)))


class SimulatedBackend(GpuBackend):
    kind = "simulated"

    def __init__(self, gpus: int = 2, processes_per_gpu: int = 3, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._processes_per_gpu = processes_per_gpu
        self._lock = threading.Lock()
        self._xids: deque[XidEvent] = deque(maxlen=_MAX_PENDING_XIDS)
        self._xid_ready = threading.Condition(self._lock)
        self._gpus = [
            _SimulatedGpu(
                identity=GpuIdentity(
                    index=i,
                    uuid=f"GPU-5e1a7ed0-0000-4000-8000-{i:012x}",
                    name="Simulated H100 80GB HBM3",
                    pci_bus_id=f"00000000:{0x18 + i:02X}:00.0",
                ),
                ecc={(t, c): 0 for t in ECC_ERROR_TYPES for c in ECC_COUNTERS},
            )
            for i in range(gpus)
        ]

    # lifecycle: nothing to open -------------------------------------------------------
    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def recover(self) -> None:
        pass

    def driver_version(self) -> str:
        return "550.54.15"

    def cuda_version(self) -> str:
        return "12.4"

    def device_count(self) -> int:
        return len(self._gpus)

    # faults -----------------------------------------------------------------------------
    def inject(self, gpu: int, fault: str, xid: int = 79, count: int = 1, celsius: float = OVERHEAT_CELSIUS) -> None:
        """Apply a fault to one GPU; ValueError for an unknown GPU, fault or count.

        ``celsius`` is the overheated temperature (a warning-level 80 C shows the relay's
        escalation path; the default trips the critical alert).
        """
        if not 0 <= gpu < len(self._gpus):
            raise ValueError(f"no GPU {gpu} (there are {len(self._gpus)})")
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)}")
        if not 1 <= count <= 1000 or not 0 < xid < 1000:
            raise ValueError("count must be 1..1000 and xid 1..999")
        if not 0 < celsius < 150:
            raise ValueError("celsius must be above 0 and below 150")
        with self._lock:
            state = self._gpus[gpu]
            if fault in ("overheat", "cool"):
                state.overheat_celsius = celsius if fault == "overheat" else None
            elif fault in ("lose", "recover"):
                state.lost = fault == "lose"
            elif fault in ("idle", "busy"):
                state.idle = fault == "idle"
            elif fault == "ecc":
                for counter in ECC_COUNTERS:
                    state.ecc[("uncorrected", counter)] += count
                    state.ecc[("corrected", counter)] += count * 10
                state.double_bit_pages += count
            else:
                now = self._clock()
                self._xids.extend(XidEvent(gpu=gpu, xid=xid, timestamp=now) for _ in range(count))
                self._xid_ready.notify_all()

    # readings ---------------------------------------------------------------------------
    def identity(self, index: int) -> GpuIdentity:
        return self._gpus[index].identity

    def _load(self, index: int, now: float) -> float:
        if self._gpus[index].idle:
            return _IDLE_LOAD
        return 0.55 + 0.4 * math.sin(now / 40.0 + index * 1.3)

    def read(self, index: int) -> GpuReading:
        now = self._clock()
        with self._lock:
            state = self._gpus[index]
            if state.lost:
                raise GpuLost(f"GPU {index} has fallen off the bus (simulated)")
            load = self._load(index, now)
            power = 90.0 + 560.0 * load
            pcie_rate = 2e9 * load
            if state.last_read is not None:
                elapsed = max(0.0, now - state.last_read)
                state.energy_joules += power * elapsed
                state.pcie_bytes += pcie_rate * elapsed
                if state.overheat_celsius is not None:
                    state.thermal_violation_seconds += elapsed
            state.last_read = now
            hot = state.overheat_celsius is not None
            used = int(_MEMORY_TOTAL * (0.2 + 0.6 * load))
            return GpuReading(
                identity=state.identity,
                temperature_celsius=round(state.overheat_celsius or 38.0 + 35.0 * load, 1),
                memory_temperature_celsius=round(state.overheat_celsius + 4.0 if state.overheat_celsius is not None else 42.0 + 30.0 * load, 1),
                utilization_ratio=round(load, 3),
                memory_utilization_ratio=round(load * 0.7, 3),
                memory_used_bytes=used,
                memory_free_bytes=_MEMORY_TOTAL - _MEMORY_RESERVED - used,
                memory_total_bytes=_MEMORY_TOTAL,
                memory_reserved_bytes=_MEMORY_RESERVED,
                power_watts=round(power, 2),
                power_limit_watts=_POWER_LIMIT_W,
                energy_joules=round(state.energy_joules, 3),
                fan_speed_ratio=round(0.3 + 0.5 * load, 3),
                performance_state=0,
                sm_clock_hz=(1100.0 if hot else 1410.0 + 570.0 * load) * 1e6,
                memory_clock_hz=2619e6,
                throttle_reasons={
                    reason: (hot and "thermal" in reason) or (reason == "gpu_idle" and load < 0.2)
                    for reason in THROTTLE_REASONS
                },
                ecc_errors=dict(state.ecc),
                pcie_link_generation=5,
                pcie_link_width=16,
                retired_pages={"single_bit_ecc": 0, "double_bit_ecc": state.double_bit_pages},
                remapped_rows={"correctable": 0, "uncorrectable": state.double_bit_pages, "pending": 0, "failure": 0},
                retired_pages_pending=False,
                profiling={
                    "graphics_engine_activity": round(min(1.0, load * 1.05), 3),
                    "sm_activity": round(load * 0.8, 3),
                    "sm_occupancy": round(load * 0.45, 3),
                    "tensor_activity": round(load * 0.6, 3),
                    "dram_bandwidth_utilization": round(load * 0.5, 3),
                    "fp16_activity": round(load * 0.3, 3),
                    "fp32_activity": round(load * 0.1, 3),
                    "fp64_activity": 0.0,
                },
                pcie_throughput_bytes_per_second={"tx": round(pcie_rate * 0.4), "rx": round(pcie_rate * 0.6)},
                pcie_bytes={"tx": int(state.pcie_bytes * 0.4), "rx": int(state.pcie_bytes * 0.6)},
                pcie_replays=0,
                encoder_utilization_ratio=0.0,
                decoder_utilization_ratio=0.0,
                violation_seconds={"power": 0.0, "thermal": round(state.thermal_violation_seconds, 3)},
            )

    def processes(self, index: int) -> list[GpuProcess]:
        now = self._clock()
        with self._lock:
            if self._gpus[index].lost:
                raise GpuLost(f"GPU {index} has fallen off the bus (simulated)")
        load = self._load(index, now)
        share = 1.0 / max(1, self._processes_per_gpu)
        return [
            GpuProcess(
                pid=200_000 + index * 1000 + k,
                used_memory_bytes=int(_GIB * (2 + 1.5 * math.sin(now / 50.0 + k))),
                info=_workload(index, k),
                sm_utilization_ratio=round(load * share, 3),
                memory_utilization_ratio=round(load * 0.7 * share, 3),
            )
            for k in range(self._processes_per_gpu)
        ]

    def wait_xid_events(self, timeout_s: float) -> list[XidEvent]:
        with self._xid_ready:
            if not self._xids:
                self._xid_ready.wait(timeout_s)
            events = list(self._xids)
            self._xids.clear()
        return events
