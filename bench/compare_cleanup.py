"""The cleanup's planner and deleter against those of an earlier revision, in one process.

``bench_cleanup`` compares the cleanup with ``find``; on a machine that other work keeps
busy, the disk's waits swamp that ratio from one run to the next. This script measures what
a change to the cleanup's own code costs instead: it loads ``plan.py`` and ``delete.py`` of
``--base`` (from git) beside the current ones, runs both on the same generated trees,
alternating, on a tmpfs (no disk waits), and compares the CPU time of this process (user +
system), which other processes barely disturb.

    python -m bench.compare_cleanup [--base main] [--dir /dev/shm]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from mlwarden.jobs.cleanup import delete, plan

from bench.bench_cleanup import generate, rules_for_bench

ROOT = Path(__file__).resolve().parent.parent


def module_at(revision: str, path: str, name: str, scratch: Path) -> ModuleType:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{path}"], check=True, capture_output=True).stdout
    file = scratch / f"{name}.py"
    file.write_bytes(source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def cpu_seconds(action: Callable[[], object]) -> tuple[float, object]:
    started = time.process_time()
    result = action()
    return time.process_time() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="main", help="git revision to compare with")
    parser.add_argument("--dir", default="/dev/shm", help="where to generate the trees (a tmpfs keeps the disk out)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="compare-cleanup-", dir=args.dir))
    try:
        sides = {
            "base": (module_at(args.base, "jobs/cleanup/plan.py", "base_plan", scratch),
                     module_at(args.base, "jobs/cleanup/delete.py", "base_delete", scratch)),
            "this": (plan, delete),
        }
        root = scratch / "tree"
        root.mkdir()
        generate(root, 50_000, 500)
        planning: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(9):
            for side, (planner, _) in sides.items():
                planning[side].append(cpu_seconds(lambda planner=planner: planner.build(root, rules_for_bench(), 1))[0])
        deleting: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(7):
            for side, (planner, deleter) in sides.items():
                shutil.rmtree(root)
                root.mkdir()
                old = generate(root, 20_000, 200)
                planned = planner.build(root, rules_for_bench(), 1)
                seconds, result = cpu_seconds(lambda deleter=deleter, planned=planned: deleter.execute(planned))
                assert result.files == old, (side, result)
                deleting[side].append(seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"| step (CPU time, median) | {args.base} | this revision | ratio |")
    print("| --- | --- | --- | --- |")
    for label, times in (
        ("plan, `--workers 1`, 50,000 files in 1,000 directories", planning),
        ("delete phase, 10,000 of 20,000 files in 400 directories", deleting),
    ):
        base, this = statistics.median(times["base"]), statistics.median(times["this"])
        print(f"| {label} | {base * 1000:.0f} ms | {this * 1000:.0f} ms | {this / base:.2f}x |")


if __name__ == "__main__":
    main()
