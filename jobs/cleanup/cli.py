"""``mlwarden cleanup``: settings, the confirmation, the breakers and the report."""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from mlwarden.jobs.cleanup import delete, fileops, plan, rules, safety
from mlwarden.jobs.report import (
    PUSHGATEWAY_ENV,
    JobReport,
    ReportGauge,
    expected_interval_setting,
    grace_setting,
    late_severity_setting,
    schedule_of,
    timeout_setting,
)

from mlwarden.command import Command
from mlwarden.exitcodes import ExitCode
from mlwarden.interrupts import sigterm_interrupts
from mlwarden.settings import in_range, parse_size, parse_url, positive, setting
from mlwarden.terminal import Progress, human_bytes, interactive

log = logging.getLogger(__name__)

DAY_SECONDS = 86400


def automatic_workers() -> int:
    """One walk worker per CPU this process may use, at most 8: past a few, the walk waits
    on the disk and on merging the findings, not on Python."""
    return min(len(os.sched_getaffinity(0)), 8)


def parse_rate(text: str) -> float:
    """``20``, ``20/s`` -> 20.0 files per second; 0 means no limit."""
    number = text.removesuffix("/s").strip()
    try:
        value = float(number)
    except ValueError:
        raise ValueError("expected files per second, such as 50 or 50/s") from None
    if value < 0:
        raise ValueError("must not be negative")
    return value


@dataclass(frozen=True)
class CleanupSettings:
    experiments_dir: list[Path] = setting(
        help="directory whose old artifacts are removed; system and home directories are refused",
        env=("EXPERIMENTS_DIR",), parse=safety.checked_root, default_factory=list, metavar="DIR",
    )
    retention_days: float = setting(
        30.0, help="files whose mtime is older than this many days are removed",
        env=("RETENTION_DAYS",), parse=positive(float),
    )
    keep_last_checkpoints: int = setting(
        1, help="keep this many newest checkpoints of each run, however old (0: age alone decides)",
        parse=in_range(int, 0, 1_000_000),
    )
    protect: list[str] = setting(
        help="glob of files or directories never removed (name, or path relative to the root if it has a /)",
        default_factory=list, metavar="GLOB",
    )
    keep_marker: str = setting(
        rules.KEEP_MARKER, help="a directory holding a file of this name is kept with everything below it",
    )
    max_files: int = setting(1000, help="breaker: delete nothing if the plan has more files", parse=positive(int))
    max_bytes: int = setting(
        500 * 10**9, help="breaker: delete nothing if the plan frees more bytes (default 500GB; units kB MB GB TB KiB MiB GiB TiB)", parse=parse_size,
    )
    dry_run: bool = setting(False, help="print the plan and change nothing", env=("DRY_RUN",))
    yes: bool = setting(False, help="do not ask for confirmation on a terminal")
    rate_limit: float = setting(0.0, help="delete at most this many files per second (0: no limit)", parse=parse_rate)
    workers: int = setting(
        0, help="processes that walk the tree while planning, each taking a share of the runs "
        "(0: one per CPU this process may use, at most 8)", parse=in_range(int, 0, 64),
    )
    pushgateway: str | None = setting(None, help="Pushgateway URL for the job's metrics", env=(PUSHGATEWAY_ENV,), parse=parse_url)
    textfile_dir: Path | None = setting(None, help="write the job's metrics for node_exporter's textfile collector here")
    expected_interval: float = expected_interval_setting("1d")
    grace: float = grace_setting("1d")
    timeout: float = timeout_setting("2h")
    late_severity: str = late_severity_setting("warning")

    def __post_init__(self) -> None:
        if not self.experiments_dir:
            raise ValueError("--experiments-dir or EXPERIMENTS_DIR is required: the directory to clean")
        for a in self.experiments_dir:
            for b in self.experiments_dir:
                if a != b and a.is_relative_to(b):
                    raise ValueError(f"cleanup roots overlap: {a} is inside {b}")
        if not self.keep_marker or "/" in self.keep_marker:
            raise ValueError("--keep-marker must be a plain file name")

    @property
    def walk_workers(self) -> int:
        return self.workers or automatic_workers()


def run(settings: CleanupSettings) -> int:
    # A dry run publishes nothing (no start, no finish): its success would reset the
    # last-success time that JobLate reads, and its plan gauges would overwrite those of
    # the last real run.
    publish = not settings.dry_run
    with sigterm_interrupts(), JobReport(
        "cleanup",
        pushgateway=settings.pushgateway if publish else None,
        textfile_dir=settings.textfile_dir if publish else None,
        schedule=schedule_of(settings),
    ) as report:
        code = _run(settings, report)
        report.succeeded(code == ExitCode.OK)
    if not publish and (settings.pushgateway or settings.textfile_dir):
        log.info("dry run: no metrics pushed or written")
    return code


def _run(settings: CleanupSettings, report: JobReport) -> int:
    gauges = {
        name: report.gauge(f"mlwarden_cleanup_{name}", doc)
        for name, doc in (
            ("planned_files", "Files the cleanup planned to delete in its last run."),
            ("planned_bytes", "Bytes the cleanup planned to free in its last run."),
            ("deleted_files", "Files the cleanup deleted in its last run."),
            ("freed_bytes", "Bytes the cleanup freed in its last run."),
            ("breaker_tripped", "1 if a safety breaker stopped the last cleanup run (nothing deleted), else 0."),
        )
    }
    for gauge in gauges.values():
        gauge.set(0)
    gauges["skipped_files"] = report.gauge(
        "mlwarden_cleanup_skipped_files",
        "Planned files the last cleanup run kept at the moment of deletion (changed, locked, moved out of the root), by reason.",
        ("reason",),
    )
    for reason in delete.SKIP_REASONS:
        gauges["skipped_files"].labels(reason).set(0)
    with ExitStack() as stack:
        for root in settings.experiments_dir:
            if not _lock_root(root, stack):
                log.error("%s is locked (another cleanup runs, or a process protects it with flock); nothing done", root)
                return ExitCode.FAILURE
        return _plan_and_delete(settings, gauges)


def _plan_and_delete(settings: CleanupSettings, gauges: dict[str, ReportGauge]) -> int:
    plans = _plan(settings)
    files = sum(len(p.files) for p in plans)
    size = sum(p.bytes for p in plans)
    gauges["planned_files"].set(files)
    gauges["planned_bytes"].set(size)
    _log_plan(plans, settings)
    if settings.dry_run:  # before the breakers: a tripped breaker is when the plan is needed most
        _print_plan(plans)
    if files > settings.max_files or size > settings.max_bytes:
        gauges["breaker_tripped"].set(1)
        log.error(
            "breaker tripped: the plan deletes %d files / %s, over the limit of %d files / %s; "
            "NOTHING was deleted. Check the plan with --dry-run, then raise --max-files/--max-bytes "
            "or lower the backlog in steps",
            files, human_bytes(size), settings.max_files, human_bytes(settings.max_bytes),
        )
        return ExitCode.BREAKER
    if settings.dry_run:
        log.info("dry run: nothing deleted")
        return ExitCode.OK
    if files == 0 and not any(p.directories for p in plans):
        log.info("nothing to delete")
        return ExitCode.OK
    if not settings.yes and interactive() and sys.stdin.isatty() and not _confirm(files, size):
        log.info("not confirmed: nothing deleted")
        return ExitCode.OK
    return _execute(plans, settings, gauges)


def _lock_root(root: Path, stack: ExitStack) -> bool:
    """Hold a lock on the root directory itself, so two cleanups of one root never overlap."""
    fd = fileops.open_directory(str(root))
    stack.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _plan(settings: CleanupSettings) -> list[plan.RootPlan]:
    plan_rules = plan.PlanRules(
        cutoff=time.time() - settings.retention_days * DAY_SECONDS,
        keep_last_checkpoints=settings.keep_last_checkpoints,
        protection=rules.Protection(settings.protect),
        keep_marker=settings.keep_marker,
    )
    return [plan.build(root, plan_rules, settings.walk_workers) for root in settings.experiments_dir]


def _log_plan(plans: list[plan.RootPlan], settings: CleanupSettings) -> None:
    for p in plans:
        kept = ", ".join(f"{count} {reason}" for reason, count in sorted(p.kept.items())) or "nothing"
        log.info(
            "plan for %s: delete %d files (%s) older than %g days and %d emptied directories; kept: %s",
            p.root, len(p.files), human_bytes(p.bytes), settings.retention_days, len(p.directories), kept,
        )
        for item in p.files:
            log.debug("plan: delete %s/%s (%s, %.0f days old)", p.root, item.relative, human_bytes(item.size), _age_days(item.mtime))


def _age_days(mtime: float) -> float:
    return (time.time() - mtime) / DAY_SECONDS


def _print_plan(plans: list[plan.RootPlan]) -> None:
    for p in plans:
        for item in p.files:
            print(f"delete {p.root}/{item.relative}\t{item.size}\t{_age_days(item.mtime):.0f} days old")
        for relative in p.directories:
            print(f"rmdir  {p.root}/{relative}")


def _confirm(files: int, size: int) -> bool:
    answer = input(f"Delete {files} files ({human_bytes(size)})? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _execute(plans: list[plan.RootPlan], settings: CleanupSettings, gauges: dict[str, ReportGauge]) -> int:
    total = delete.DeleteResult()
    progress = Progress("cleanup", sum(p.bytes for p in plans))
    try:
        for p in plans:
            try:
                delete.execute(p, settings.rate_limit, progress, total)
            except (OSError, delete.RootChanged) as exc:
                log.error("cleanup of %s stopped: %s", p.root, exc)
                total.errors += 1
    finally:  # also when interrupted (SIGINT, SIGTERM): the metrics say what is gone
        progress.finish()
        _report_deleted(total, gauges)
    return ExitCode.FAILURE if total.errors else ExitCode.OK


def _report_deleted(total: delete.DeleteResult, gauges: dict[str, ReportGauge]) -> None:
    gauges["deleted_files"].set(total.files)
    gauges["freed_bytes"].set(total.bytes)
    for reason, count in total.skipped.items():
        gauges["skipped_files"].labels(reason).set(count)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(total.skipped.items())) or "none"
    log.info(
        "deleted %d files, freed %s, removed %d directories; skipped at deletion: %s; errors: %d",
        total.files, human_bytes(total.bytes), total.directories, skipped, total.errors,
    )


# Read by mlwarden.registry without importing this module (literals only).
MLWARDEN_COMMANDS = (
    {"name": "cleanup", "attribute": "COMMAND", "help": "remove old experiment artifacts, behind safety breakers",
     "heartbeat": "cleanup", "maintain": {"order": 30, "env": "RUN_CLEANUP"}},
)

COMMAND = Command(
    name="cleanup",
    settings=CleanupSettings,
    run=run,
    description=(
        "Plan the removal of files older than the retention under each experiments directory, "
        "keeping protected, marked, best, locked files and the newest checkpoints of each run; "
        "delete nothing if the plan exceeds the breakers (exit 3)."
    ),
)
