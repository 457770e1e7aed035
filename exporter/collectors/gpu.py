"""The ``gpu`` collector: identity, temperatures, utilization, memory, power, energy,
clocks, throttle reasons and violation time, ECC, PCIe, NVLink, video engines, retired pages and
remapped rows, profiling (GPM) and MIG instances, per GPU.

A GPU that does not answer gets ``mlwarden_gpu_up 0`` and no other series; the other GPUs
keep reporting. So does a GPU that is no longer in the device list at all (after NVML was
re-initialised, or the driver reloaded, with fewer GPUs): every GPU seen since start is
remembered by index and UUID, so a vanished one reads 0 instead of silently losing its series.
A field the GPU does not support is omitted, never reported as 0.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable

from mlwarden.exporter.backends.base import (
    DIRECTIONS,
    ECC_COUNTERS,
    ECC_ERROR_TYPES,
    NVLINK_ERRORS,
    BackendUnavailable,
    GpuIdentity,
    GpuLost,
    GpuReading,
)
from mlwarden.exporter.backends.supervisor import BackendSupervisor
from mlwarden.exporter.collectors.base import GPU_LABELS, Collected, Collector, CollectorContext, CollectorSpec, NoSettings, register
from mlwarden.exporter.exposition import Family, counter, gauge

log = logging.getLogger(__name__)

GpuLabels = tuple[int, str]  # (index, uuid) as in the series' labels; uuid "" when never read
Sample = tuple[tuple[str, ...], float]

# (reading attribute, metric name, help): the plain per-GPU gauges.
GAUGES = (
    ("temperature_celsius", "mlwarden_gpu_temperature_celsius", "GPU core temperature in degrees Celsius."),
    ("memory_temperature_celsius", "mlwarden_gpu_memory_temperature_celsius", "GPU memory (HBM) temperature in degrees Celsius, where supported."),
    ("utilization_ratio", "mlwarden_gpu_utilization_ratio", "Fraction of the last sample period in which a kernel ran (0..1)."),
    ("memory_utilization_ratio", "mlwarden_gpu_memory_utilization_ratio",
        "Fraction of the last sample period in which memory was read or written (0..1)."),
    ("memory_used_bytes", "mlwarden_gpu_memory_used_bytes", "GPU memory allocated, in bytes."),
    ("memory_free_bytes", "mlwarden_gpu_memory_free_bytes", "GPU memory free, in bytes."),
    ("memory_total_bytes", "mlwarden_gpu_memory_total_bytes", "GPU memory installed, in bytes."),
    ("memory_reserved_bytes", "mlwarden_gpu_memory_reserved_bytes",
        "GPU memory reserved by the driver and firmware, in bytes (NVML v2 memory info)."),
    ("power_watts", "mlwarden_gpu_power_watts", "Power draw in watts."),
    ("power_limit_watts", "mlwarden_gpu_power_limit_watts", "Enforced power limit in watts."),
    ("fan_speed_ratio", "mlwarden_gpu_fan_speed_ratio", "Fan speed as a fraction of its maximum (0..1)."),
    ("performance_state", "mlwarden_gpu_performance_state", "Performance state: 0 (P0, maximum) to 15 (P15, minimum)."),
    ("pcie_link_generation", "mlwarden_gpu_pcie_link_generation", "Current PCIe link generation."),
    ("pcie_link_width", "mlwarden_gpu_pcie_link_width", "Current PCIe link width (lanes)."),
    ("encoder_utilization_ratio", "mlwarden_gpu_encoder_utilization_ratio",
        "Fraction of the last sample period in which the video encoder (NVENC) was busy (0..1)."),
    ("decoder_utilization_ratio", "mlwarden_gpu_decoder_utilization_ratio",
        "Fraction of the last sample period in which the video decoder (NVDEC) was busy (0..1)."),
)
# GPM profiling ratios (Hopper and later): key in GpuReading.profiling -> (metric name, help).
PROFILING = {
    "graphics_engine_activity": ("mlwarden_gpu_graphics_engine_activity_ratio",
        "Fraction of the collection interval in which the graphics or compute engine was active (GPM)."),
    "sm_activity": ("mlwarden_gpu_sm_activity_ratio",
        "Fraction of SMs busy, averaged over the collection interval (GPM): real use, unlike utilization."),
    "sm_occupancy": ("mlwarden_gpu_sm_occupancy_ratio",
        "Resident warps as a fraction of the SMs' maximum, averaged over the collection interval (GPM)."),
    "tensor_activity": ("mlwarden_gpu_tensor_activity_ratio",
        "Fraction of the collection interval the SMs spent on tensor-core instructions of any kind (GPM)."),
    "dram_bandwidth_utilization": ("mlwarden_gpu_dram_bandwidth_utilization_ratio",
        "DRAM bandwidth used as a fraction of the theoretical maximum, over the collection interval (GPM)."),
}
PIPES = {"fp16_activity": "fp16", "fp32_activity": "fp32", "fp64_activity": "fp64"}
_GAUGE_VALUES = operator.attrgetter(*(attr for attr, _, _ in GAUGES))  # a reading's GAUGES values in one call
# MIG instances' GPM ratios: key in MigReading.profiling -> (metric name, help)
MIG_PROFILING = {
    key: (name.replace("mlwarden_gpu_", "mlwarden_gpu_mig_", 1),
          f"{text[:-1]}, for the MIG device's GPU instance (compute instances of one GPU instance share its value).")
    for key, (name, text) in PROFILING.items()
}
# label names, made once: a pass makes some 45 families
_INFO_LABELS = (*GPU_LABELS, "name", "pci_bus_id", "driver_version", "cuda_version")
_MIG_LABELS = (*GPU_LABELS, "gpu_instance", "compute_instance", "profile")
_BY = {extra: (*GPU_LABELS, extra) for extra in ("clock", "reason", "cause", "state", "pipe", "direction", "link")}
_ECC_LABELS = (*GPU_LABELS, "error_type", "counter")
_LINK_DIRECTION_LABELS = (*GPU_LABELS, "link", "direction")
_LINK_ERROR_LABELS = (*GPU_LABELS, "link", "error")


class _Labels:
    """The label values of one GPU's series, made when the GPU is first seen instead of every pass.

    Label values whose set is open (links, retirement causes, row states) are added as they appear.
    """

    def __init__(self, index: int, uuid: str) -> None:
        gpu = self.gpu = (str(index), uuid)
        self.clocks = {clock: (*gpu, clock) for clock in ("sm", "memory")}
        self.extra: dict[str, tuple[str, ...]] = {}  # reason, cause, state, direction, pipe -> (*gpu, it)
        self.ecc = {(t, c): (*gpu, t, c) for t in ECC_ERROR_TYPES for c in ECC_COUNTERS}
        self.links: dict[int, tuple[str, ...]] = {}
        self.link_extra: dict[tuple[int, str], tuple[str, ...]] = {}  # (link, direction or error) -> labels
        self._info: tuple[str, ...] = ()
        # the throttle samples made from the backend's reasons dict, served again while it hands the same dict
        self._throttle: tuple[dict[str, bool] | None, list[Sample]] = (None, [])

    def info(self, name: str, pci_bus_id: str, driver: str, cuda: str) -> tuple[str, ...]:
        """The labels of the GPU's ``mlwarden_gpu_info``: the same tuple while they are the same."""
        labels = self._info
        if labels[2:] != (name, pci_bus_id, driver, cuda):
            labels = self._info = (*self.gpu, name, pci_bus_id, driver, cuda)
        return labels

    def throttle(self, reasons: dict[str, bool] | None) -> list[Sample]:
        source, samples = self._throttle
        if reasons is not source:
            samples = [(self.of(reason), 1 if active else 0) for reason, active in (reasons or {}).items()]
            self._throttle = (reasons, samples)
        return samples

    def of(self, value: str) -> tuple[str, ...]:
        labels = self.extra.get(value)
        if labels is None:
            labels = self.extra[value] = (*self.gpu, value)
        return labels

    def link(self, link: int) -> tuple[str, ...]:
        labels = self.links.get(link)
        if labels is None:
            labels = self.links[link] = (*self.gpu, str(link))
        return labels

    def on_link(self, link: int, value: str) -> tuple[str, ...]:
        labels = self.link_extra.get((link, value))
        if labels is None:
            labels = self.link_extra[(link, value)] = (*self.gpu, str(link), value)
        return labels


class _Steady:
    """A GPU's samples of the families that change only when counters (10 s) or slow facts (30 s) are read,
    with what they were made from: served again while the backend hands out the same readings."""

    __slots__ = ("labels", "sources", "scalars", "samples")

    def __init__(self, labels: _Labels, sources: tuple[object, ...], scalars: tuple[object, ...],
                 samples: tuple[list[Sample], ...]) -> None:
        self.labels = labels
        self.sources = sources
        self.scalars = scalars
        self.samples = samples


def _nvml_up(value: int) -> Family:
    up = gauge("mlwarden_nvml_up", "1 when the GPU library (NVML) is initialised and answering, else 0.")
    up.add_metric([], value)
    return up


class GpuCollector(Collector):
    name = "gpu"
    group = "nvml"

    def __init__(self, supervisor: BackendSupervisor, interval: float, timeout: float) -> None:
        self.supervisor = supervisor
        self.interval = interval
        self.timeout = timeout
        self._lost: set[int] = set()
        self._seen: set[GpuLabels] = set()  # every GPU reported since start
        self._vanished: set[GpuLabels] = set()  # seen, but no longer in the device list
        self._labels: dict[GpuLabels, _Labels] = {}  # the GPUs of the last pass
        self._steady: dict[GpuLabels, _Steady] = {}  # the GPUs of the last pass: their counter and slow-fact samples

    def collect(self) -> Collected:
        """Read every GPU; the series are made from the readings only when the pass's snapshot is rendered.

        An exporter scraped every 15 s and collecting every second renders one pass in fifteen: making some
        900 samples in each of the other fourteen was a third of a pass. The readings are not changed after
        the pass, and the maker runs under the render lock of this collector (see snapshot._Part), the only
        place the label and steady-sample caches it keeps are touched.
        """
        if not self.supervisor.ensure():
            return Collected([_nvml_up(0)], success=False)
        backend = self.supervisor.backend
        try:
            count = backend.device_count()
        except BackendUnavailable as exc:
            log.warning("%s", exc)
            self.supervisor.gpu_failed()
            return Collected([_nvml_up(0)], success=False)
        readings: list[Callable[[], GpuReading]] = []
        answered: list[GpuIdentity] = []
        lost: list[int] = []
        for index in range(count):
            try:
                identity, reading = backend.read_later(index)
            except GpuLost as exc:
                if index not in self._lost:
                    log.warning("GPU %d is not answering: %s", index, exc)
                lost.append(index)
                continue
            if index in self._lost:
                log.info("GPU %d answers again", index)
            self.supervisor.remember(identity)
            answered.append(identity)
            readings.append(reading)
        self._lost = set(lost)
        down = self._down(answered, lost, count)
        if down:
            # re-initialise (with backoff) while a GPU is down or gone: it may come back
            self.supervisor.gpu_failed()
        else:
            self.supervisor.all_gpus_answered()
        return Collected(functools.partial(self._families, readings, down, backend.driver_version(), backend.cuda_version()))

    def _down(self, identities: list[GpuIdentity], lost: list[int], count: int) -> list[GpuLabels]:
        """The GPUs to report as down: those that did not answer, and those seen before but now gone."""
        answered = {(identity.index, identity.uuid) for identity in identities}
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

    def _families(self, later: list[Callable[[], GpuReading]], down: list[GpuLabels], driver: str, cuda: str) -> list[Family]:
        """The pass's series, from its readings; under the render lock (see collect)."""
        readings = [reading() for reading in later]
        info = gauge(
            "mlwarden_gpu_info", "GPU identity; the value is always 1.",
            labels=_INFO_LABELS,
        )
        up = gauge("mlwarden_gpu_up", "1 when the GPU answered at the last collection, 0 when it did not (lost, hung, no longer listed).",
            labels=GPU_LABELS)
        gauges = {attr: gauge(name, text, labels=GPU_LABELS) for attr, name, text in GAUGES}
        energy = counter("mlwarden_gpu_energy_joules", "Energy consumed since the driver was loaded, in joules.", labels=GPU_LABELS)
        clocks = gauge("mlwarden_gpu_clock_hz", "Current clock frequency in hertz.", labels=_BY["clock"])
        throttle = gauge("mlwarden_gpu_throttle_reason_active", "1 when this clock throttle (event) reason is active, else 0.",
            labels=_BY["reason"])
        ecc = counter("mlwarden_gpu_ecc_errors", "ECC memory errors (volatile: since the driver loaded; aggregate: lifetime).",
            labels=_ECC_LABELS)
        retired = gauge("mlwarden_gpu_retired_pages", "Memory pages retired, by cause (GPUs before Ampere).", labels=_BY["cause"])
        remapped = gauge("mlwarden_gpu_remapped_rows", "Memory rows remapped, by state (Ampere and later).", labels=_BY["state"])
        pending = gauge("mlwarden_gpu_retired_pages_pending", "1 when retired pages await a GPU reset or driver reload to take effect, else 0.",
            labels=GPU_LABELS)
        profiling = {key: gauge(name, text, labels=GPU_LABELS) for key, (name, text) in PROFILING.items()}
        pipes = gauge("mlwarden_gpu_pipe_activity_ratio",
            "Fraction of the collection interval the SMs spent on non-tensor math of this precision (GPM).",
            labels=_BY["pipe"])
        pcie_rate = gauge("mlwarden_gpu_pcie_throughput_bytes_per_second",
            "PCIe traffic in bytes per second (GPM: averaged over the collection interval; else NVML's 20 ms sample).",
            labels=_BY["direction"])
        pcie_bytes = counter("mlwarden_gpu_pcie_bytes", "PCIe bytes transferred since the driver was loaded.", labels=_BY["direction"])
        replays = counter("mlwarden_gpu_pcie_replays", "PCIe replays (retransmissions after link errors) since the driver was loaded.",
            labels=GPU_LABELS)
        nvlink_rate = gauge("mlwarden_gpu_nvlink_throughput_bytes_per_second",
            "NVLink traffic over all links in bytes per second, averaged over the collection interval (GPM).",
            labels=_BY["direction"])
        nvlink_up = gauge("mlwarden_gpu_nvlink_up", "1 when the NVLink link is active, else 0.", labels=_BY["link"])
        nvlink_bytes = counter("mlwarden_gpu_nvlink_bytes", "NVLink data bytes transferred on the link since the driver was loaded.",
            labels=_LINK_DIRECTION_LABELS)
        nvlink_errors = counter("mlwarden_gpu_nvlink_errors", "NVLink data-link errors on the link since the driver was loaded.",
            labels=_LINK_ERROR_LABELS)
        violations = counter("mlwarden_gpu_clock_violation_seconds",
            "Time the clocks were held below their target for this reason, since the driver was loaded.",
            labels=_BY["reason"])
        mig_used = gauge("mlwarden_gpu_mig_memory_used_bytes", "Memory allocated in the MIG instance, in bytes.", labels=_MIG_LABELS)
        mig_total = gauge("mlwarden_gpu_mig_memory_total_bytes", "Memory of the MIG instance, in bytes.", labels=_MIG_LABELS)
        mig_profiling = {key: gauge(name, text, labels=_MIG_LABELS) for key, (name, text) in MIG_PROFILING.items()}
        for index, uuid in down:
            up.samples.append(((str(index), uuid), 0))
        known, self._labels = self._labels, {}
        previous, self._steady = self._steady, {}
        # in the order of _Steady.samples
        steady_families = (energy, ecc, retired, remapped, pending, replays, violations, pcie_bytes, nvlink_up, nvlink_bytes, nvlink_errors)
        plain = tuple(gauges.values())  # in the order of GAUGES, as _GAUGE_VALUES answers
        for reading in readings:
            ident = reading.identity
            gpu_key = (ident.index, ident.uuid)
            labels = self._labels[gpu_key] = known.get(gpu_key) or _Labels(*gpu_key)
            gpu = labels.gpu
            info.samples.append((labels.info(ident.name, ident.pci_bus_id, driver, cuda), 1))
            up.samples.append((gpu, 1))
            for family, value in zip(plain, _GAUGE_VALUES(reading), strict=True):
                if value is not None:
                    family.samples.append((gpu, value))
            for clock, value in (("sm", reading.sm_clock_hz), ("memory", reading.memory_clock_hz)):
                if value is not None:
                    clocks.samples.append((labels.clocks[clock], value))
            throttle.samples += labels.throttle(reading.throttle_reasons)
            steady = self._steady_samples(reading, labels, previous.get(gpu_key))
            self._steady[gpu_key] = steady
            for family, made in zip(steady_families, steady.samples, strict=True):
                family.samples += made
            self._add_signals(reading, labels, profiling, pipes)
            for family, by_direction in ((pcie_rate, reading.pcie_throughput_bytes_per_second),
                                         (nvlink_rate, reading.nvlink_throughput_bytes_per_second)):
                for direction in DIRECTIONS:
                    if direction in by_direction:
                        family.samples.append((labels.of(direction), by_direction[direction]))
            for mig in reading.mig:
                device = mig.device
                instance = (*gpu, str(device.gpu_instance), str(device.compute_instance), device.profile)
                if mig.memory_used_bytes is not None:
                    mig_used.samples.append((instance, mig.memory_used_bytes))
                if mig.memory_total_bytes is not None:
                    mig_total.samples.append((instance, mig.memory_total_bytes))
                for ratio, value in mig.profiling.items():
                    if ratio in mig_profiling:
                        mig_profiling[ratio].samples.append((instance, value))
        return [_nvml_up(1), info, up, *gauges.values(), energy, clocks, throttle, ecc, retired, remapped, pending, *profiling.values(),
                pipes, pcie_rate, pcie_bytes, replays, nvlink_rate, nvlink_up, nvlink_bytes, nvlink_errors, violations,
                mig_used, mig_total, *mig_profiling.values()]

    @staticmethod
    def _add_signals(reading: GpuReading, labels: _Labels, profiling: dict[str, Family], pipes: Family) -> None:
        gpu = labels.gpu
        for key, value in reading.profiling.items():
            if key in profiling:
                profiling[key].samples.append((gpu, value))
            elif key in PIPES:
                pipes.samples.append((labels.of(PIPES[key]), value))

    @staticmethod
    def _steady_samples(reading: GpuReading, labels: _Labels, previous: _Steady | None) -> _Steady:
        """The GPU's counter and slow-fact samples: those of the pass before while the backend serves the same
        readings (counters are read every 10 s, slow facts every 30 s), else made anew."""
        sources = (reading.ecc_errors, reading.violation_seconds, reading.pcie_bytes, reading.nvlinks,
                   reading.retired_pages, reading.remapped_rows)
        scalars = (reading.energy_joules, reading.pcie_replays, reading.retired_pages_pending)
        if (previous is not None and previous.labels is labels and previous.scalars == scalars
                and all(now is then for now, then in zip(sources, previous.sources, strict=True))):
            return previous
        gpu = labels.gpu
        energy: list[Sample] = [] if reading.energy_joules is None else [(gpu, reading.energy_joules)]
        errors = reading.ecc_errors
        ecc: list[Sample] = [(ecc_labels, errors[key]) for key, ecc_labels in labels.ecc.items() if errors.get(key) is not None]
        retired: list[Sample] = [(labels.of(cause), pages) for cause, pages in (reading.retired_pages or {}).items()]
        remapped: list[Sample] = [(labels.of(state), rows) for state, rows in (reading.remapped_rows or {}).items()]
        pending: list[Sample] = [] if reading.retired_pages_pending is None else [(gpu, 1 if reading.retired_pages_pending else 0)]
        replays: list[Sample] = [] if reading.pcie_replays is None else [(gpu, reading.pcie_replays)]
        violations: list[Sample] = [(labels.of(reason), seconds) for reason, seconds in reading.violation_seconds.items()]
        pcie: dict[str, int] = reading.pcie_bytes
        pcie_bytes: list[Sample] = [(labels.of(direction), pcie[direction]) for direction in DIRECTIONS if direction in pcie]
        nvlink_up: list[Sample] = []
        nvlink_bytes: list[Sample] = []
        nvlink_errors: list[Sample] = []
        for link in reading.nvlinks:
            nvlink_up.append((labels.link(link.link), 1 if link.up else 0))
            for direction, count in link.bytes.items():
                nvlink_bytes.append((labels.on_link(link.link, direction), count))
            for error in NVLINK_ERRORS:
                if error in link.errors:
                    nvlink_errors.append((labels.on_link(link.link, error), link.errors[error]))
        samples = (energy, ecc, retired, remapped, pending, replays, violations, pcie_bytes, nvlink_up, nvlink_bytes, nvlink_errors)
        return _Steady(labels, sources, scalars, samples)


def _build(_: NoSettings, context: CollectorContext) -> Collector:
    return GpuCollector(context.supervisor, context.interval, context.timeout)


register(CollectorSpec("gpu", "each GPU's health, use, memory, power and clocks from NVML (mlwarden_gpu_*)", _build, NoSettings))
