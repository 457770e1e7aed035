"""Cleanup planning and deletion against ``find``, side by side on the same generated tree.

The tree has run directories full of small files, half of them older than the retention.
Planning is timed against ``find DIR -mtime +30 -printf '%s\\n'`` (walk, stat, select, sizes)
and a full cleanup (plan and delete) against ``find DIR -mtime +30 -delete``; the tree is
regenerated before each deletion. The file names are not checkpoints and nothing is
protected, so both sides select exactly the same files (checked).

    python -m bench.run_all --only cleanup [--quick]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from jobs.cleanup import delete, plan, rules

DAY = 86400
RETENTION_DAYS = 30


def generate(root: Path, files: int, runs: int) -> int:
    """Create the tree; returns how many files are old."""
    now = time.time()
    old_time = now - 60 * DAY
    per_run = files // runs
    old = 0
    for r in range(runs):
        run_dir = root / f"run-{r:04d}"
        (run_dir / "logs").mkdir(parents=True)
        for i in range(per_run):
            # Old and new files side by side in every directory, so that no directory is
            # emptied: find -delete would not remove it, and both sides do the same work.
            path = run_dir / ("logs" if (i // 2) % 2 else "") / f"metrics-{i:05d}.json"
            with open(path, "wb") as handle:
                handle.write(b"x" * (i % 64))
            if i % 2 == 0:
                os.utime(path, (old_time, old_time))
                old += 1
    return old


def rules_for_bench() -> plan.PlanRules:
    return plan.PlanRules(
        cutoff=time.time() - RETENTION_DAYS * DAY, keep_last_checkpoints=1, protection=rules.Protection([])
    )


def timed(action: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def find_sizes(root: Path) -> int:
    out = subprocess.run(["find", str(root), "-mtime", f"+{RETENTION_DAYS}", "-printf", "%s\n"],
                         check=True, capture_output=True, text=True).stdout
    return len(out.splitlines())


def find_delete(root: Path) -> None:
    subprocess.run(["find", str(root), "-mtime", f"+{RETENTION_DAYS}", "-delete"], check=True)


def cleanup(root: Path) -> int:
    root_plan = plan.build(root, rules_for_bench())
    return delete.execute(root_plan).files


def run(quick: bool) -> str:
    files, runs = (10_000, 100) if quick else (100_000, 1_000)
    repeats = 5 if quick else 3
    base = Path(tempfile.mkdtemp(prefix="bench-cleanup-", dir=os.environ.get("BENCH_TMP")))
    try:
        root = base / "tree"
        root.mkdir()
        old = generate(root, files, runs)
        find_sizes(root)  # warm the dentry and inode caches for both sides
        find_plan_times, our_plan_times = [], []
        for _ in range(repeats):
            t, found = timed(lambda: find_sizes(root))
            find_plan_times.append(t)
            t, planned = timed(lambda: plan.build(root, rules_for_bench()))
            our_plan_times.append(t)
        assert found == old == len(planned.files), (found, old, len(planned.files))

        find_delete_times, our_delete_times = [], []
        for _ in range(repeats):
            for side, times in (("find", find_delete_times), ("ours", our_delete_times)):
                shutil.rmtree(root)
                root.mkdir()
                generate(root, files, runs)
                find_sizes(root)
                t, deleted = timed(lambda: find_delete(root) if side == "find" else cleanup(root))
                times.append(t)
                if side == "ours":
                    assert deleted == old, (deleted, old)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def row(label: str, ours: list[float], baseline: list[float], command: str) -> str:
        o, b = statistics.median(ours), statistics.median(baseline)
        return f"| {label} | {o * 1000:.0f} ms | {b * 1000:.0f} ms (`{command}`) | {o / b:.2f}x |"

    return "\n".join([
        "## Cleanup: planning and deletion vs `find`",
        "",
        f"Tree: {files:,} files in {runs:,} run directories (half in a `logs/` subdirectory), "
        f"{old:,} of them older than {RETENTION_DAYS} days, old and new side by side in every directory "
        "(so neither side removes directories). Median of {repeats} runs; the tree is "
        "regenerated before every deletion. Target: within 1.5x of find.",
        "",
        "| step | mlwarden cleanup | find | ratio |",
        "| --- | --- | --- | --- |",
        row("plan (walk, stat, select, lock probe)", our_plan_times, find_plan_times,
            f"find DIR -mtime +{RETENTION_DAYS} -printf '%s\\n'"),
        row("plan + delete (re-check, lock probe, unlinkat)", our_delete_times, find_delete_times,
            f"find DIR -mtime +{RETENTION_DAYS} -delete"),
        "",
        "Reproduce: `.venv/bin/python -m bench.run_all --only cleanup` (add `--quick` for 10,000 files).",
    ])


if __name__ == "__main__":
    print(run(quick=True))
