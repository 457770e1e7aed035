"""GPU availability and temperatures over the threshold, read through the exporter's GPU backend.

The check asks :mod:`mlwarden.exporter.backends` what the exporter would serve, so both
read NVML the same way: the same errors mean "GPU lost" and the same sentinel values mean
"not reported" (a temperature NVML cannot give is said to be missing, never compared).

Without a driver (no NVML library, or no device) the check says so plainly: "no NVML".
Whether that is a failure is the operator's choice (``--require-gpu``), because the same
command runs on CPU-only machines of a fleet.
"""

from __future__ import annotations

from typing import Protocol

from mlwarden.exporter.backends import open_backend
from mlwarden.exporter.backends.base import BackendUnavailable, GpuBackend, GpuLost
from mlwarden.jobs.health.result import Result, Status


class GpuSettings(Protocol):
    require_gpu: bool
    temp_threshold: float


def check(settings: GpuSettings) -> list[Result]:
    missing = Status.CRITICAL if settings.require_gpu else Status.OK
    backend = open_backend("nvml")
    try:
        backend.start()
    except BackendUnavailable as exc:
        return [Result("gpu", missing, f"no NVML: {exc}")]
    try:
        count = backend.device_count()
        if count == 0:
            return [Result("gpu", missing, "NVML reports no GPU")]
        return [_device(backend, index, settings.temp_threshold) for index in range(count)]
    except BackendUnavailable as exc:
        return [Result("gpu", Status.CRITICAL, f"NVML stopped answering: {exc}")]
    finally:
        backend.close()


def _device(backend: GpuBackend, index: int, threshold: float) -> Result:
    name = f"gpu:{index}"
    try:
        temperature = backend.read(index).temperature_celsius
    except GpuLost as exc:
        return Result(name, Status.CRITICAL, f"GPU {index} does not answer: {exc}")
    if temperature is None:
        return Result(name, Status.OK, "answers; temperature not reported by NVML")
    data = {"temperature_celsius": temperature}
    if temperature > threshold:
        return Result(name, Status.WARNING, f"{temperature:g} °C, above {threshold:g} °C", data)
    return Result(name, Status.OK, f"{temperature:g} °C", data)
