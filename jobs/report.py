"""Heartbeat and completion metrics every job pushes, so that a late or stuck job is an alert.

The model is healthchecks.io's: a job pings when it starts and when it finishes, and says
how often it is expected (``--expected-interval``), how late it may be (``--grace``), how
long one run may take (``--timeout``) and how loud lateness is (``--late-severity``). The
rules in alerts/rules/jobs.yml read only these series, so they name no job and no interval.

Each run pushes to the Pushgateway under a stable grouping key, ``job="mlwarden_<task>"``
and ``instance="<host>"`` (never a pid, which would leave one group per run behind). The
push uses POST (``pushadd``), which replaces only the metric names it sends: a failed run
therefore does not send ``mlwarden_job_last_success_timestamp_seconds`` and the previous
success survives, which is what the "no success in 25 h" alert reads.

Pushing is best effort: failures are retried briefly, logged and then given up on; they
never turn a good run into a failed one. ``--textfile-dir`` writes the same metrics for
node_exporter's textfile collector instead (atomically, keeping the last success across a
failed run the same way).

Metrics common to every job, pushed when it starts:

- ``mlwarden_job_last_start_timestamp_seconds``
- ``mlwarden_job_expected_interval_seconds``, ``mlwarden_job_grace_seconds`` and
  ``mlwarden_job_timeout_seconds``, labelled ``severity`` (the severity of lateness)

and when it finishes:

- ``mlwarden_job_last_success_timestamp_seconds`` (only on success)
- ``mlwarden_job_last_run_timestamp_seconds``
- ``mlwarden_job_duration_seconds``
- ``mlwarden_job_success`` (1 or 0)
plus whatever the job adds with :meth:`JobReport.gauge`. ``mlwarden pause`` pushes
``mlwarden_job_paused_until_timestamp_seconds`` (see :mod:`mlwarden.jobs.pause`).
"""

from __future__ import annotations

import logging
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from mlwarden.backoff import Backoff
from mlwarden.fsutil import atomic_write_text
from mlwarden.heartbeat import job_name
from mlwarden.settings import parse_duration, positive, setting

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

LAST_SUCCESS = "mlwarden_job_last_success_timestamp_seconds"
# One variable every job reads (after its own MLWARDEN_<JOB>_PUSHGATEWAY), so that
# `mlwarden maintain` and an environment file name the Pushgateway once.
PUSHGATEWAY_ENV = "PUSHGATEWAY_URL"
PUSH_ATTEMPTS = 3
PUSH_BACKOFF = Backoff(initial=1.0, maximum=4.0)
PUSH_TIMEOUT_SECONDS = 5.0
SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Schedule:
    """When a job is due and how long it may run, as the job itself reports it."""

    expected_interval: float
    grace: float
    timeout: float
    late_severity: str = "warning"


class ScheduledSettings(Protocol):
    """The four schedule fields every job's (frozen) settings declare; read-only here, as there."""

    @property
    def expected_interval(self) -> float: ...
    @property
    def grace(self) -> float: ...
    @property
    def timeout(self) -> float: ...
    @property
    def late_severity(self) -> str: ...


def schedule_of(settings: ScheduledSettings) -> Schedule:
    return Schedule(settings.expected_interval, settings.grace, settings.timeout, settings.late_severity)


# Each job's settings class declares these four fields with its own defaults (its timer's period).
def expected_interval_setting(default: str) -> Any:
    return setting(
        parse_duration(default), parse=positive(parse_duration),
        help=f"how often the job is expected to succeed (match its timer; default {default}, shown in seconds); "
        "later than this plus --grace is an alert",
    )


def grace_setting(default: str) -> Any:
    return setting(
        parse_duration(default), parse=parse_duration,
        help=f"how late a success may be before the job counts as late (default {default}, shown in seconds)",
    )


def timeout_setting(default: str) -> Any:
    return setting(
        parse_duration(default), parse=positive(parse_duration),
        help=f"a run still going after this long is an alert: running too long (default {default}, shown in seconds)",
    )


def late_severity_setting(default: str) -> Any:
    return setting(default, help="severity of the alert when the job is late", choices=SEVERITIES)


class ReportGauge:
    """One gauge of a run's report. The values stay here until the report is published, and
    only then become Prometheus metrics: a run with nowhere to publish to (no Pushgateway,
    no textfile) never loads prometheus_client (about 50 ms of every job's start)."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        # What prometheus_client exposes: 0 for a gauge without labels, nothing before a labelled one is set.
        self.values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}

    def set(self, value: float) -> None:
        self.values[()] = float(value)

    def labels(self, *values: str) -> _LabelledGauge:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} has the labels {self.labelnames}, not {values}")
        return _LabelledGauge(self, tuple(str(v) for v in values))


@dataclass(frozen=True)
class _LabelledGauge:
    gauge: ReportGauge
    labels: tuple[str, ...]

    def set(self, value: float) -> None:
        self.gauge.values[self.labels] = float(value)


def _registry(gauges: list[ReportGauge]) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    for gauge in gauges:
        metric = Gauge(gauge.name, gauge.documentation, gauge.labelnames, registry=registry)
        for labels, value in gauge.values.items():
            (metric.labels(*labels) if labels else metric).set(value)
    return registry


class JobReport:
    """Collects one run's metrics and publishes them when the run ends.

    Use as a context manager around the run; call :meth:`succeeded` when the run's
    outcome is success. An exception inside the block counts as failure.
    """

    def __init__(
        self,
        task: str,
        pushgateway: str | None = None,
        textfile_dir: Path | None = None,
        instance: str | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        self.task = task
        self.job = job_name(task)
        self.pushgateway = pushgateway
        self.textfile_dir = Path(textfile_dir) if textfile_dir else None
        self.instance = instance or socket.gethostname()
        self.schedule = schedule
        self._success = False
        self._started = time.time()
        self._gauges: dict[str, ReportGauge] = {}
        self._last_run = self.gauge("mlwarden_job_last_run_timestamp_seconds", "When the job last finished, successfully or not.")
        self._duration = self.gauge("mlwarden_job_duration_seconds", "How long the job's last run took.")
        self._success_gauge = self.gauge("mlwarden_job_success", "1 if the job's last run succeeded, else 0.")

    def gauge(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> ReportGauge:
        """A gauge of this run's report (created once per name)."""
        if name not in self._gauges:
            self._gauges[name] = ReportGauge(name, documentation, labelnames)
        return self._gauges[name]

    def succeeded(self, success: bool = True) -> None:
        self._success = success

    @property
    def success(self) -> bool:
        return self._success

    def __enter__(self) -> JobReport:
        self._started = time.time()
        self._publish(self._start_gauges())
        return self

    def _start_gauges(self) -> list[ReportGauge]:
        """The "started" ping: sent alone, so that a run in progress leaves the last outcome in place."""
        started = ReportGauge("mlwarden_job_last_start_timestamp_seconds", "When the job last started (unix seconds).")
        started.set(self._started)
        gauges = [started]
        if self.schedule is not None:
            for name, documentation, value in (
                ("mlwarden_job_expected_interval_seconds", "How often the job is expected to succeed.", self.schedule.expected_interval),
                ("mlwarden_job_grace_seconds", "How late a success may be before the job counts as late.", self.schedule.grace),
                ("mlwarden_job_timeout_seconds", "How long one run may take before it counts as running too long.", self.schedule.timeout),
            ):
                gauge = ReportGauge(name, documentation, ("severity",))
                gauge.labels(self.schedule.late_severity).set(value)
                gauges.append(gauge)
        return gauges

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._success = False
        self.publish()

    def publish(self) -> None:
        now = time.time()
        self._last_run.set(now)
        self._duration.set(now - self._started)
        self._success_gauge.set(1 if self._success else 0)
        if self._success:
            self.gauge(LAST_SUCCESS, "When the job last succeeded (unix seconds).").set(now)
        self._publish(list(self._gauges.values()))

    def _publish(self, gauges: list[ReportGauge]) -> None:
        if self.pushgateway or self.textfile_dir:
            publish(_registry(gauges), self.job, self.instance, self.pushgateway, self.textfile_dir)


def publish(
    registry: CollectorRegistry, job: str, instance: str, pushgateway: str | None, textfile_dir: Path | None
) -> bool:
    """Send ``registry``'s metrics, replacing only the metric names it holds; False if any target failed.

    The Pushgateway's POST (``pushadd``) keeps the group's other metric names; the textfile
    is merged the same way, so both keep the last success across a failed run, the schedule
    across a finish and a pause across both.
    """
    ok = True
    if pushgateway:
        ok = _push(registry, job, instance, pushgateway)
    if textfile_dir:
        ok = _write_textfile(registry, Path(textfile_dir) / f"{job}.prom") and ok
    return ok


def _push(registry: CollectorRegistry, job: str, instance: str, pushgateway: str) -> bool:
    from prometheus_client.exposition import pushadd_to_gateway

    for attempt in range(1, PUSH_ATTEMPTS + 1):
        try:
            pushadd_to_gateway(
                pushgateway, job=job, registry=registry, grouping_key={"instance": instance}, timeout=PUSH_TIMEOUT_SECONDS
            )
            return True
        except OSError as exc:  # URLError and socket errors are OSErrors
            if attempt == PUSH_ATTEMPTS:
                log.warning("could not push %s metrics to the Pushgateway after %d tries: %s", job, attempt, exc)
                return False
            time.sleep(PUSH_BACKOFF.delay(attempt))
    return False


def _write_textfile(registry: CollectorRegistry, path: Path) -> bool:
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    try:
        atomic_write_text(path, text + _other_families(path, _family_names(text)))
    except OSError as exc:
        log.warning("could not write %s: %s", path, exc)
        return False
    return True


_FAMILY = re.compile(r"^(?:# (?:HELP|TYPE) )?([a-zA-Z_:][a-zA-Z0-9_:]*)")


def _family_names(text: str) -> set[str]:
    return {match.group(1) for line in text.splitlines() if (match := _FAMILY.match(line))}


def _other_families(path: Path, replaced: set[str]) -> str:
    """The lines of an earlier textfile whose metric is not being replaced."""
    try:
        previous = path.read_text(encoding="utf-8")
    except OSError:
        return ""
    kept = [line for line in previous.splitlines() if (m := _FAMILY.match(line)) and m.group(1) not in replaced]
    return "".join(line + "\n" for line in kept)
