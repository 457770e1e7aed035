"""Run a Python program with the pynvml-boundary fake in place of NVML (no GPU needed).

    python -m bench.with_fake_nvml GPUS PROCESSES_PER_GPU MODULE [ARGS...]

The fake (tests/fake_nvml.py) replaces pynvml's functions before MODULE starts, so mlwarden's
exporter and nvitop-exporter read the very same GPUs through the very same library calls.
"""

from __future__ import annotations

import runpy
import sys

from tests.fake_nvml import MIB, FakeNvml


class _Patch:
    """The one monkeypatch method FakeNvml.install uses, for a whole process's lifetime."""

    @staticmethod
    def setattr(target: object, name: str, value: object) -> None:
        setattr(target, name, value)


def main(argv: list[str]) -> None:
    gpus, per_gpu, module, *rest = argv
    fake = FakeNvml(gpus=int(gpus), gpm_gpus=set(range(int(gpus))))
    fake.processes = {gpu: [(100_000 + gpu * 100 + k, (k + 1) * 512 * MIB) for k in range(int(per_gpu))] for gpu in range(int(gpus))}
    fake.install(_Patch())
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
