"""``mlwarden health``: run every check, show the answers, push them as metrics.

Exit status 0 when no check is critical, 1 otherwise. The job's own
``mlwarden_job_success`` says that the checks *ran* (so "no success in 25 h" means the
health job itself stopped); the machine's health is in ``mlwarden_health_check_ok``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlwarden.jobs.health import backups, disk, gpu, output, services
from mlwarden.jobs.health.result import Result, Status
from mlwarden.jobs.report import (
    PUSHGATEWAY_ENV,
    JobReport,
    expected_interval_setting,
    grace_setting,
    late_severity_setting,
    schedule_of,
    timeout_setting,
)

from mlwarden.command import Command
from mlwarden.exitcodes import ExitCode
from mlwarden.settings import in_range, parse_duration, parse_url, positive, setting

log = logging.getLogger(__name__)

ratio = in_range(float, 0.0, 1.0)


@dataclass(frozen=True)
class HealthSettings:
    disk_path: list[Path] = setting(help="check disk usage of the filesystem holding this path (none given: /)", default_factory=list, metavar="PATH")
    disk_warning: float = setting(0.85, help="used share of a disk (0..1) that is a warning", parse=ratio)
    disk_critical: float = setting(0.95, help="used share of a disk (0..1) that makes the machine unhealthy", parse=ratio)
    require_gpu: bool = setting(False, help="no NVML or no GPU is a failure (otherwise reported only)")
    temp_threshold: float = setting(85.0, help="GPU temperature (°C) above which a warning is given", env=("TEMP_THRESHOLD",), parse=positive(float))
    exporter_url: str | None = setting(None, help="mlwarden exporter base URL; its /healthz must answer 2xx", parse=parse_url)
    relay_url: str | None = setting(None, help="mlwarden relay base URL; its /readyz must answer 2xx", parse=parse_url)
    prometheus_url: str | None = setting(None, help="Prometheus base URL; its /-/ready must answer 2xx", parse=parse_url)
    pushgateway: str | None = setting(
        None, help="Pushgateway URL: the metrics go there, and its /-/ready is checked", env=(PUSHGATEWAY_ENV,), parse=parse_url,
    )
    http_timeout: float = setting(3.0, help="timeout of each service check (e.g. 3s)", parse=positive(parse_duration))
    backup_dir: list[Path] = setting(
        help="backup catalog whose newest backup must be fresh and verified", env=("BACKUP_DIR",), default_factory=list, metavar="DIR",
    )
    backup_max_age: float = setting(
        26 * 3600.0, help="newest backup older than this is a failure (default 26h, shown in seconds)", parse=positive(parse_duration),
    )
    json: bool = setting(False, help="print the results as JSON on stdout")
    textfile_dir: Path | None = setting(None, help="write the job's metrics for node_exporter's textfile collector here")
    expected_interval: float = expected_interval_setting("15m")
    grace: float = grace_setting("45m")
    timeout: float = timeout_setting("10m")
    late_severity: str = late_severity_setting("warning")

    def __post_init__(self) -> None:
        if self.disk_warning > self.disk_critical:
            raise ValueError("--disk-warning must not be above --disk-critical")


Check = Callable[[Any], list[Result]]
CHECKS: dict[str, Check] = {
    "disk": disk.check, "gpu": gpu.check, "services": services.check, "backups": backups.check, "backup-staging": backups.check_staging,
}


def run_checks(settings: HealthSettings) -> list[Result]:
    """Every check's results; a check that crashes is reported as critical, not as a crash."""
    results: list[Result] = []
    for name, check in CHECKS.items():
        try:
            results.extend(check(settings))
        except Exception as exc:  # one broken check must not hide the others
            log.exception("health check %s crashed", name)
            results.append(Result(name, Status.CRITICAL, f"check crashed: {type(exc).__name__}"))
    return results


def run(settings: HealthSettings) -> int:
    with JobReport("health", pushgateway=settings.pushgateway, textfile_dir=settings.textfile_dir, schedule=schedule_of(settings)) as report:
        results = run_checks(settings)
        check_ok = report.gauge("mlwarden_health_check_ok", "1 if the health check passed (ok or warning), 0 if critical.", ("check",))
        disk_ratio = report.gauge("mlwarden_health_disk_used_ratio", "Used share of the filesystem holding the path.", ("path",))
        for result in results:
            check_ok.labels(result.check).set(1 if result.ok else 0)
            if "used_ratio" in result.data:
                disk_ratio.labels(result.data["path"]).set(result.data["used_ratio"])
        _show(results, settings.json)
        report.succeeded()
    return ExitCode.OK if all(r.ok for r in results) else ExitCode.FAILURE


def _show(results: list[Result], as_json: bool) -> None:
    if as_json:
        print(output.as_json(results))
    elif sys.stdout.isatty():
        print(output.as_table(results))
    else:
        levels = {Status.OK: logging.INFO, Status.WARNING: logging.WARNING, Status.CRITICAL: logging.ERROR}
        for result in results:
            log.log(levels[result.status], "%s: %s: %s", result.check, result.status.value, result.summary)


# Read by mlwarden.registry without importing this module (literals only).
MLWARDEN_COMMANDS = (
    {"name": "health", "attribute": "COMMAND", "help": "check disks, GPUs, services and backup freshness",
     "heartbeat": "health", "maintain": {"order": 10, "setting": "run_health_check", "env": "RUN_HEALTH_CHECK"}},
)

COMMAND = Command(
    name="health",
    settings=HealthSettings,
    run=run,
    description="Check disk usage, GPUs (NVML), the mlwarden services and backup freshness; exit 0 when healthy, 1 when not.",
)
