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
import stat
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mlwarden.jobs.cleanup import delete, plan, rules
from mlwarden.jobs.cleanup.cli import automatic_workers

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


def bare_walk(root: Path) -> int:
    """The floor for a Python planner: list and lstat every entry through directory fds, as the
    planner does, and count the old files; no rules, no plan."""
    cutoff = time.time() - RETENTION_DAYS * DAY

    def walk(dir_fd: int) -> int:
        old = 0
        for name in os.listdir(dir_fd):
            st = os.lstat(name, dir_fd=dir_fd)
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                try:
                    old += walk(fd)
                finally:
                    os.close(fd)
            elif st.st_mtime < cutoff:
                old += 1
        return old

    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return walk(root_fd)
    finally:
        os.close(root_fd)


def find_delete(root: Path) -> None:
    subprocess.run(["find", str(root), "-mtime", f"+{RETENTION_DAYS}", "-delete"], check=True)


def cleanup(root: Path) -> tuple[float, float, int]:
    """Plan and delete as the command does by default; returns the seconds of each phase and the files deleted."""
    plan_seconds, root_plan = timed(lambda: plan.build(root, rules_for_bench(), automatic_workers()))
    delete_seconds, result = timed(lambda: delete.execute(root_plan))
    return plan_seconds, delete_seconds, result.files


def run(quick: bool) -> str:
    files, runs = (10_000, 100) if quick else (100_000, 1_000)
    # Generating 100,000 files is the slow part, so the full run deletes twice per side;
    # planning is cheap to repeat, and other work on the host makes single runs noisy.
    plan_repeats, delete_repeats = (5, 3) if quick else (9, 2)
    base = Path(tempfile.mkdtemp(prefix="bench-cleanup-", dir=os.environ.get("BENCH_TMP")))
    try:
        root = base / "tree"
        root.mkdir()
        old = generate(root, files, runs)
        find_sizes(root)  # warm the dentry and inode caches for both sides
        workers = automatic_workers()
        find_plan_times, our_plan_times, one_worker_times, bare_times = [], [], [], []
        for _ in range(plan_repeats):
            t, found = timed(lambda: find_sizes(root))
            find_plan_times.append(t)
            t, planned = timed(lambda: plan.build(root, rules_for_bench(), workers))
            our_plan_times.append(t)
            t, planned_alone = timed(lambda: plan.build(root, rules_for_bench(), 1))
            one_worker_times.append(t)
            t, counted = timed(lambda: bare_walk(root))
            bare_times.append(t)
        assert found == old == len(planned.files) == len(planned_alone.files) == counted, (found, old, len(planned.files), counted)

        find_delete_times, our_delete_times, our_cleanup_times = [], [], []
        for _ in range(delete_repeats):
            for side in ("find", "ours"):
                shutil.rmtree(root)
                root.mkdir()
                generate(root, files, runs)
                # Write back the new tree first: otherwise its writeback lands in whichever
                # deletion runs next, and the comparison measures the disk, not the tools.
                os.sync()
                find_sizes(root)
                if side == "find":
                    find_delete_times.append(timed(lambda: find_delete(root))[0])
                else:
                    plan_seconds, delete_seconds, deleted = cleanup(root)
                    assert deleted == old, (deleted, old)
                    our_delete_times.append(delete_seconds)
                    our_cleanup_times.append(plan_seconds + delete_seconds)
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
        "(so neither side removes directories). Median of "
        f"{plan_repeats} planning and {delete_repeats} deletion runs per side, alternating; the tree is "
        "regenerated, synced to disk and its metadata cached (one find pass) before every deletion. Target: within 1.5x of find.",
        "",
        "| step | mlwarden cleanup | find | ratio |",
        "| --- | --- | --- | --- |",
        row(f"plan, as the command runs it ({workers} walk workers: one per CPU)", our_plan_times, find_plan_times,
            f"find DIR -mtime +{RETENTION_DAYS} -printf '%s\\n'"),
        row("plan with `--workers 1` (one process, as find)", one_worker_times, find_plan_times,
            f"find DIR -mtime +{RETENTION_DAYS} -printf '%s\\n'"),
        row("reference: bare Python walk (`os.listdir` + `os.lstat`, no rules, no plan)", bare_times, find_plan_times,
            f"find DIR -mtime +{RETENTION_DAYS} -printf '%s\\n'"),
        row("delete phase (re-open, inode/mtime re-check, flock probe, unlinkat)", our_delete_times, find_delete_times,
            f"find DIR -mtime +{RETENTION_DAYS} -delete"),
        row("whole cleanup: plan, then delete", our_cleanup_times, find_delete_times,
            f"find DIR -mtime +{RETENTION_DAYS} -delete"),
        "",
        "The plan is a complete walk that `find -delete` does not need (it deletes as it walks); "
        "mlwarden pays it on purpose, so that the breakers see the whole plan before anything goes. "
        "In one process, planning is bounded by Python's cost per entry (a `stat_result` per file): "
        "the bare walk in the reference row, with no rules and no plan, is the floor for one Python "
        "process. So the command deals the runs out to forked walk workers, one per CPU it may use "
        "(at most 8; `--workers 1` turns this off): find walks on one core, mlwarden on all of them. "
        "What the planner adds to the walk is the keep rules (names screened a whole directory at a "
        "time), the directory lock probes, one plan entry per old file and, with workers, sending "
        "each worker's findings back through a pipe.",
        "",
        "Reproduce: `.venv/bin/python -m bench.run_all --only cleanup` (add `--quick` for 10,000 files).",
    ])


if __name__ == "__main__":
    print(run(quick=True))
