"""The ``gpu`` collector: identity, temperatures, utilization, memory, power, energy,
clocks, throttle reasons, ECC, PCIe, retired pages and remapped rows, per GPU.

A GPU that does not answer gets ``mlwarden_gpu_up 0`` and no other series; the other GPUs
keep reporting. So does a GPU that is no longer in the device list at all (after NVML was
re-initialised, or the driver reloaded, with fewer GPUs): every GPU seen since start is
remembered by index and UUID, so a vanished one reads 0 instead of silently losing its series.
A field the GPU does not support is omitted, never reported as 0.
"""

from __future__ import annotations

import logging

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from mlwarden.exporter.backends.base import (
    ECC_COUNTERS,
    ECC_ERROR_TYPES,
    BackendUnavailable,
    GpuLost,
    GpuReading,
)
from mlwarden.exporter.backends.supervisor import BackendSupervisor
from mlwarden.exporter.collectors.base import GPU_LABELS, Collected, Collector

log = logging.getLogger(__name__)

GpuLabels = tuple[int, str]  # (index, uuid) as in the series' labels; uuid "" when never read

# (reading attribute, metric name, help): the plain per-GPU gauges.
GAUGES = (
    ("temperature_celsius", "mlwarden_gpu_temperature_celsius", "GPU core temperature in degrees Celsius."),
    ("memory_temperature_celsius", "mlwarden_gpu_memory_temperature_celsius", "GPU memory (HBM) temperature in degrees Celsius, where supported."),
    ("utilization_ratio", "mlwarden_gpu_utilization_ratio", "Fraction of the last sample period in which a kernel ran (0..1)."),
    ("memory_utilization_ratio", "mlwarden_gpu_memory_utilization_ratio", "Fraction of the last sample period in which memory was read or written (0..1)."),
    ("memory_used_bytes", "mlwarden_gpu_memory_used_bytes", "GPU memory allocated, in bytes."),
    ("memory_free_bytes", "mlwarden_gpu_memory_free_bytes", "GPU memory free, in bytes."),
    ("memory_total_bytes", "mlwarden_gpu_memory_total_bytes", "GPU memory installed, in bytes."),
    ("memory_reserved_bytes", "mlwarden_gpu_memory_reserved_bytes", "GPU memory reserved by the driver and firmware, in bytes (NVML v2 memory info)."),
    ("power_watts", "mlwarden_gpu_power_watts", "Power draw in watts."),
    ("power_limit_watts", "mlwarden_gpu_power_limit_watts", "Enforced power limit in watts."),
    ("fan_speed_ratio", "mlwarden_gpu_fan_speed_ratio", "Fan speed as a fraction of its maximum (0..1)."),
    ("performance_state", "mlwarden_gpu_performance_state", "Performance state: 0 (P0, maximum) to 15 (P15, minimum)."),
    ("pcie_link_generation", "mlwarden_gpu_pcie_link_generation", "Current PCIe link generation."),
    ("pcie_link_width", "mlwarden_gpu_pcie_link_width", "Current PCIe link width (lanes)."),
)


class GpuCollector(Collector):
    name = "gpu"

    def __init__(self, supervisor: BackendSupervisor, interval: float, timeout: float) -> None:
        self.supervisor = supervisor
        self.interval = interval
        self.timeout = timeout
        self._lost: set[int] = set()
        self._seen: set[GpuLabels] = set()  # every GPU reported since start
        self._vanished: set[GpuLabels] = set()  # seen, but no longer in the device list

    def collect(self) -> Collected:
        nvml_up = GaugeMetricFamily("mlwarden_nvml_up", "1 when the GPU library (NVML) is initialised and answering, else 0.")
        if not self.supervisor.ensure():
            nvml_up.add_metric([], 0)
            return Collected([nvml_up], success=False)
        backend = self.supervisor.backend
        try:
            count = backend.device_count()
        except BackendUnavailable as exc:
            log.warning("%s", exc)
            self.supervisor.gpu_failed()
            nvml_up.add_metric([], 0)
            return Collected([nvml_up], success=False)
        nvml_up.add_metric([], 1)
        readings: list[GpuReading] = []
        lost: list[int] = []
        for index in range(count):
            try:
                reading = backend.read(index)
            except GpuLost as exc:
                if index not in self._lost:
                    log.warning("GPU %d is not answering: %s", index, exc)
                lost.append(index)
                continue
            if index in self._lost:
                log.info("GPU %d answers again", index)
            self.supervisor.remember(reading.identity)
            readings.append(reading)
        self._lost = set(lost)
        down = self._down(readings, lost, count)
        if down:
            # re-initialise (with backoff) while a GPU is down or gone: it may come back
            self.supervisor.gpu_failed()
        else:
            self.supervisor.all_gpus_answered()
        return Collected([nvml_up, *self._families(readings, down, backend.driver_version(), backend.cuda_version())])

    def _down(self, readings: list[GpuReading], lost: list[int], count: int) -> list[GpuLabels]:
        """The GPUs to report as down: those that did not answer, and those seen before but now gone."""
        answered = {(r.identity.index, r.identity.uuid) for r in readings}
        answered_uuids = {uuid for _, uuid in answered}
        not_answering = {(index, self._last_uuid(index, answered_uuids)) for index in lost}
        now = answered | not_answering
        uuids_now = {uuid for _, uuid in now if uuid}
        named_indexes = {index for index, uuid in now if uuid}
        # replaced, not vanished: a GPU listed at another index now, or an index whose UUID is known now
        self._seen = {
            (index, uuid) for index, uuid in self._seen
            if (uuid and uuid not in uuids_now) or (not uuid and index not in named_indexes)
        } | now
        vanished = self._seen - now
        for index, uuid in sorted(vanished - self._vanished):
            log.warning("GPU %d (%s) is no longer among the %d GPUs NVML lists; reporting it down", index, uuid or "uuid unknown", count)
        for index, uuid in sorted(self._vanished - vanished):
            log.info("GPU %d (%s) is listed again", index, uuid or "uuid unknown")
        self._vanished = vanished
        return sorted(self._seen - answered)

    def _last_uuid(self, index: int, answered_uuids: set[str]) -> str:
        """The UUID last read at ``index``; "" when that GPU answers at another index now."""
        uuid = self.supervisor.uuid(index)
        return "" if uuid in answered_uuids else uuid

    def _families(self, readings: list[GpuReading], down: list[GpuLabels], driver: str, cuda: str) -> list[Metric]:
        info = GaugeMetricFamily(
            "mlwarden_gpu_info", "GPU identity; the value is always 1.",
            labels=[*GPU_LABELS, "name", "pci_bus_id", "driver_version", "cuda_version"],
        )
        up = GaugeMetricFamily("mlwarden_gpu_up", "1 when the GPU answered at the last collection, 0 when it did not (lost, hung, no longer listed).", labels=GPU_LABELS)
        gauges = {attr: GaugeMetricFamily(name, text, labels=GPU_LABELS) for attr, name, text in GAUGES}
        energy = CounterMetricFamily("mlwarden_gpu_energy_joules", "Energy consumed since the driver was loaded, in joules.", labels=GPU_LABELS)
        clocks = GaugeMetricFamily("mlwarden_gpu_clock_hz", "Current clock frequency in hertz.", labels=[*GPU_LABELS, "clock"])
        throttle = GaugeMetricFamily("mlwarden_gpu_throttle_reason_active", "1 when this clock throttle (event) reason is active, else 0.", labels=[*GPU_LABELS, "reason"])
        ecc = CounterMetricFamily("mlwarden_gpu_ecc_errors", "ECC memory errors (volatile: since the driver loaded; aggregate: lifetime).", labels=[*GPU_LABELS, "error_type", "counter"])
        retired = GaugeMetricFamily("mlwarden_gpu_retired_pages", "Memory pages retired, by cause (GPUs before Ampere).", labels=[*GPU_LABELS, "cause"])
        remapped = GaugeMetricFamily("mlwarden_gpu_remapped_rows", "Memory rows remapped, by state (Ampere and later).", labels=[*GPU_LABELS, "state"])
        for index, uuid in down:
            up.add_metric([str(index), uuid], 0)
        for reading in readings:
            ident = reading.identity
            gpu = [str(ident.index), ident.uuid]
            info.add_metric([*gpu, ident.name, ident.pci_bus_id, driver, cuda], 1)
            up.add_metric(gpu, 1)
            for attr, family in gauges.items():
                value = getattr(reading, attr)
                if value is not None:
                    family.add_metric(gpu, value)
            if reading.energy_joules is not None:
                energy.add_metric(gpu, reading.energy_joules)
            for clock, value in (("sm", reading.sm_clock_hz), ("memory", reading.memory_clock_hz)):
                if value is not None:
                    clocks.add_metric([*gpu, clock], value)
            for reason, active in (reading.throttle_reasons or {}).items():
                throttle.add_metric([*gpu, reason], 1 if active else 0)
            for error_type in ECC_ERROR_TYPES:
                for counter in ECC_COUNTERS:
                    value = reading.ecc_errors.get((error_type, counter))
                    if value is not None:
                        ecc.add_metric([*gpu, error_type, counter], value)
            for cause, pages in (reading.retired_pages or {}).items():
                retired.add_metric([*gpu, cause], pages)
            for state, rows in (reading.remapped_rows or {}).items():
                remapped.add_metric([*gpu, state], rows)
        return [info, up, *gauges.values(), energy, clocks, throttle, ecc, retired, remapped]
