"""The ``jobs`` collector: the job heartbeats this host expects, so that a job that never reported is an alert.

For each job of :func:`mlwarden.heartbeat.expectations` it publishes when the job's first
heartbeat is due: the moment the exporter first expected it, plus the job's own interval and
grace. ``JobNeverReported`` fires when that moment has passed and the Pushgateway holds no
heartbeat of the job from this host. The series carry the job and host as the job pushes
them (``heartbeat_job``, ``heartbeat_instance``: the scrape's own ``job`` and ``instance``
name the exporter) and the severity its lateness deserves.

The first-expected moments are kept in ``--state-dir`` (systemd's ``StateDirectory=``), so an
exporter restarted every day still calls a weekly job that never ran overdue after a week;
without a state directory the exporter's start counts, and a restart starts the wait again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlwarden.exporter.collectors.base import Collected, Collector, CollectorContext, CollectorSpec, register
from mlwarden.exporter.exposition import gauge

from mlwarden.heartbeat import AUTO, Expectation, expectations_in_child, parse_selection
from mlwarden.settings import setting

log = logging.getLogger(__name__)

DUE = "mlwarden_job_first_heartbeat_due_timestamp_seconds"
STATE_FILE = "expected-jobs.json"


@dataclass(frozen=True)
class JobsSettings:
    expected_jobs: tuple[str, ...] | None = setting(
        None, parse=parse_selection, metavar="JOBS",
        help=f"jobs whose heartbeat this host expects (comma-separated), `none`, or `{AUTO}` (default): every scheduled "
        "job, less the maintain steps switched off here (RUN_BACKUP=false ...); schedules from the jobs' own settings",
    )
    state_dir: Path | None = setting(
        None, env=("STATE_DIRECTORY",),
        help="where the exporter remembers since when it expects each job (systemd's StateDirectory=); "
        "without it, a restart starts a never-reported job's wait again",
    )


class JobsCollector(Collector):
    name = "jobs"

    def __init__(self, expected: list[Expectation] | None, interval: float, timeout: float, *,
                 state_dir: Path | None = None, instance: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.interval = interval
        self.timeout = timeout
        # None: the expectations could not be worked out; every pass then fails, so that
        # MlwardenCollectorFailing says so instead of JobNeverReported going quiet.
        self.expected = expected
        self.instance = instance or socket.gethostname()
        names = [e.name for e in expected or ()]
        self.since = _remember_since(names, state_dir / STATE_FILE if state_dir else None, clock()) if names else {}

    def collect(self) -> Collected:
        if self.expected is None:
            return Collected(success=False)
        family = gauge(DUE, "When the job's first heartbeat is due: since when this host expects it, plus its interval and grace.",
                       ("heartbeat_job", "heartbeat_instance", "severity"))
        for expected in self.expected:
            family.add_metric([expected.job, self.instance, expected.severity],
                              self.since[expected.name] + expected.interval + expected.grace)
        return Collected([family])


def _remember_since(names: list[str], path: Path | None, now: float) -> dict[str, float]:
    """Since when each job is expected: kept from the state file, ``now`` for a job new there."""
    known: dict[str, float] = {}
    if path is not None:
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            known = {str(k): float(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError) as exc:
            log.warning("cannot read %s (%s): expecting every job from now on", path, exc)
    since = {name: known.get(name, now) for name in names}
    if path is not None and since != known:
        from mlwarden.fsutil import atomic_write_text  # only here: see the artifacts collector's import of it

        try:
            atomic_write_text(path, json.dumps(since, sort_keys=True) + "\n")
        except OSError as exc:
            log.warning("cannot write %s (%s): a restart will start the jobs' wait again", path, exc)
    return since


def _build(settings: JobsSettings, context: CollectorContext) -> Collector | None:
    # The jobs' schedules come from the environment the exporter shares with them (/etc/mlwarden/mlwarden.env).
    expected: list[Expectation] | None
    try:
        expected = expectations_in_child(settings.expected_jobs, os.environ)
    except (OSError, RuntimeError, ValueError, TypeError, subprocess.TimeoutExpired) as exc:
        log.error("cannot work out the jobs this host expects: %s", exc)
        expected = None
    if expected == []:
        return None
    return JobsCollector(expected, context.slow_interval, context.slow_interval, state_dir=settings.state_dir)


register(CollectorSpec(
    "jobs", "when the first heartbeat of each job this host expects is due (JobNeverReported)", _build, JobsSettings,
))
