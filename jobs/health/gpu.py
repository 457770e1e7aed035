"""GPU availability through NVML, and temperatures over the threshold.

Without a driver (no NVML library, or no device) the check says so plainly: "no NVML".
Whether that is a failure is the operator's choice (``--require-gpu``), because the same
command runs on CPU-only machines of a fleet.
"""

from __future__ import annotations

from typing import Protocol

import pynvml

from mlwarden.jobs.health.result import Result, Status


class GpuSettings(Protocol):
    require_gpu: bool
    temp_threshold: float


def check(settings: GpuSettings) -> list[Result]:
    missing = Status.CRITICAL if settings.require_gpu else Status.OK
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [Result("gpu", missing, f"no NVML: {exc}")]
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return [Result("gpu", missing, "NVML reports no GPU")]
        return [_device(index, settings.temp_threshold) for index in range(count)]
    finally:
        pynvml.nvmlShutdown()


def _device(index: int, threshold: float) -> Result:
    name = f"gpu:{index}"
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        temperature = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
    except pynvml.NVMLError as exc:
        return Result(name, Status.CRITICAL, f"GPU {index} does not answer: {exc}")
    data = {"temperature_celsius": temperature}
    if temperature > threshold:
        return Result(name, Status.WARNING, f"{temperature} °C, above {threshold:g} °C", data)
    return Result(name, Status.OK, f"{temperature} °C", data)
