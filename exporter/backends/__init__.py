"""GPU backends: NVML (real GPUs) and simulated (machines without GPUs)."""

from __future__ import annotations

from mlwarden.exporter.backends.base import GpuBackend


def open_backend(kind: str, simulated_gpus: int = 2, simulated_processes: int = 3) -> GpuBackend:
    """The backend for ``kind``: ``auto`` and ``nvml`` read NVML, ``simulated`` invents GPUs.

    ``auto`` never falls back to simulated data: a machine without a driver reports
    ``mlwarden_nvml_up 0`` rather than plausible numbers nobody measured.
    """
    if kind == "simulated":
        from mlwarden.exporter.backends.simulated import SimulatedBackend

        return SimulatedBackend(gpus=simulated_gpus, processes_per_gpu=simulated_processes)
    if kind in ("auto", "nvml"):
        from mlwarden.exporter.backends.nvml import NvmlBackend

        return NvmlBackend()
    raise ValueError(f"unknown GPU backend {kind!r}")
