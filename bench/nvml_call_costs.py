"""What each NVML function costs the exporter on this machine's driver, per call and per pass.

On a real GPU most of a collection pass is spent inside the driver (ioctls, counted as the
exporter's own system time), and which NVML calls are dear differs from one driver and GPU to
the next; on the C stand-in every call is nearly free. This runs the nvml backend's passes
(``read`` and ``processes`` for every GPU, as the collectors do) with every C function pynvml
and the backend resolve timed, and prints calls, CPU and wall time per function, dearest first.

    python3 bench/nvml_call_costs.py --passes 30
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from typing import Any

import pynvml
from mlwarden.exporter.backends.nvml import NvmlBackend
from mlwarden.exporter.collectors.xid import _WAIT_S as XID_WAIT_S

_cpu: dict[str, float] = defaultdict(float)
_wall: dict[str, float] = defaultdict(float)
_calls: dict[str, int] = defaultdict(int)


class _Timed:
    """A C function from libnvidia-ml that records its own CPU and wall time (one thread only)."""

    def __init__(self, name: str, function: Any) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_function", function)

    def __call__(self, *args: Any) -> Any:
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            return self._function(*args)
        finally:
            _cpu[self._name] += time.process_time() - cpu
            _wall[self._name] += time.perf_counter() - wall
            _calls[self._name] += 1

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._function, attribute)

    def __setattr__(self, attribute: str, value: Any) -> None:
        setattr(self._function, attribute, value)


def _time_every_c_function() -> None:
    resolve = pynvml._nvmlGetFunctionPointer
    pynvml._nvmlGetFunctionPointer = lambda name: _Timed(name, resolve(name))
    pynvml._nvmlGetFunctionPointer_cache.clear()


def _report(passes: int, pass_cpu: float) -> None:
    in_c = sum(_cpu.values())
    print(f"CPU per pass {1e3 * pass_cpu / passes:.2f} ms, of which inside NVML {1e3 * in_c / passes:.2f} ms "
          f"({sum(_calls.values()) / passes:.0f} calls)")
    print(f"{'NVML function':<52} {'calls/pass':>10} {'CPU us/call':>12} {'wall us/call':>13} {'CPU ms/pass':>12}")
    for name in sorted(_cpu, key=_cpu.__getitem__, reverse=True):
        calls = _calls[name]
        print(f"{name:<52} {calls / passes:>10.1f} {1e6 * _cpu[name] / calls:>12.1f} "
              f"{1e6 * _wall[name] / calls:>13.1f} {1e3 * _cpu[name] / passes:>12.3f}")


def _reset() -> None:
    _cpu.clear()
    _wall.clear()
    _calls.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--passes", type=int, default=30)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between passes (GPM needs two samples)")
    parser.add_argument("--xid-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    _time_every_c_function()
    backend = NvmlBackend()
    backend.start()
    gpus = backend.device_count()
    for index in range(gpus):  # identities and first samples: not part of a steady pass
        backend.identity(index)
        backend.read(index)
        backend.processes(index)
    _reset()
    pass_cpu = 0.0
    for _ in range(args.passes):
        time.sleep(args.interval)
        began = time.process_time()
        for index in range(gpus):
            backend.read(index)
            backend.processes(index)
        pass_cpu += time.process_time() - began
    print(f"{gpus} GPU(s), {args.passes} passes (read and processes of every GPU)")
    _report(args.passes, pass_cpu)
    if args.xid_seconds > 0:
        _xid_cost(backend, args.xid_seconds)
    backend.close()
    return 0


def _xid_cost(backend: NvmlBackend, seconds: float) -> None:
    _reset()
    began, wall = time.process_time(), time.perf_counter()
    while time.perf_counter() - wall < seconds:  # as the xid collector's thread waits
        backend.wait_xid_events(XID_WAIT_S)
    xid_cpu = (time.process_time() - began) / (time.perf_counter() - wall)
    print(f"waiting for XID events ({XID_WAIT_S:g} s waits for {seconds:g} s): {100 * xid_cpu:.3f} % of a core, "
          f"{sum(_calls.values())} NVML calls")


if __name__ == "__main__":
    sys.exit(main())
