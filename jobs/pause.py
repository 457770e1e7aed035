"""``mlwarden pause JOB --for 2h`` and ``mlwarden resume JOB``: maintenance for a job's heartbeat.

A pause is healthchecks.io's "paused" state: while it lasts, the rules in
alerts/rules/jobs.yml do not call the job late, stuck or failed on this machine. It is a
metric, ``mlwarden_job_paused_until_timestamp_seconds``, pushed into the job's own group
(the same Pushgateway group or textfile as its runs), so it ends by itself when the time
is up and a forgotten pause cannot silence a job for good; ``resume`` ends it early.
With ``--textfile-dir`` the pause is merged into the job's textfile; a pause written in the
same instant as the job rewrites that file can be lost, so pause before the maintenance starts.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from mlwarden.jobs.report import PUSHGATEWAY_ENV, publish
from prometheus_client import CollectorRegistry, Gauge

from mlwarden import registry
from mlwarden.command import Command
from mlwarden.exitcodes import ExitCode
from mlwarden.heartbeat import job_name
from mlwarden.settings import parse_duration, parse_url, positive, setting, suggestion

log = logging.getLogger(__name__)

PAUSED_UNTIL = "mlwarden_job_paused_until_timestamp_seconds"
MAX_PAUSE_SECONDS = 30 * 86400.0  # a pause is maintenance, not a way to switch a job's alerts off


def _job(text: str) -> str:
    """A declared heartbeat: a mistyped name would pause nothing and still say it did."""
    declared = registry.heartbeats()
    if text not in declared:
        raise ValueError(f"expected one of {', '.join(declared)}{suggestion(text, list(declared))}")
    return text


def _pause_length(text: str) -> float:
    seconds = positive(parse_duration)(text)
    if seconds > MAX_PAUSE_SECONDS:
        raise ValueError("at most 30 days; resume and pause again for longer maintenance")
    return seconds


@dataclass(frozen=True, kw_only=True)
class _Target:
    job: str = setting(
        help="the job's heartbeat name: what follows mlwarden_ in its job label (backup, restore_drill, cleanup, health)",
        positional=True, metavar="JOB", parse=_job,
    )
    instance: str | None = setting(None, help="the machine whose job to pause (default: this host's name, as the job pushes it)")
    pushgateway: str | None = setting(None, help="Pushgateway URL the job pushes to", env=(PUSHGATEWAY_ENV,), parse=parse_url)
    textfile_dir: Path | None = setting(None, help="the textfile directory the job writes to")

    def __post_init__(self) -> None:
        if not self.pushgateway and not self.textfile_dir:
            raise ValueError("--pushgateway (or PUSHGATEWAY_URL) or --textfile-dir is required: where the job's heartbeat lives")


@dataclass(frozen=True, kw_only=True)
class PauseSettings(_Target):
    duration: float = setting(help="how long the pause lasts, e.g. 2h (at most 30 days)", flag="--for", parse=_pause_length)


@dataclass(frozen=True, kw_only=True)
class ResumeSettings(_Target):
    pass


def _set_paused_until(target: _Target, until: float) -> bool:
    metrics = CollectorRegistry()
    Gauge(PAUSED_UNTIL, "Until when the job's heartbeat alerts are paused (unix seconds; 0: not paused).", registry=metrics).set(until)
    return publish(metrics, job_name(target.job), target.instance or socket.gethostname(), target.pushgateway, target.textfile_dir)


def pause(settings: PauseSettings) -> int:
    until = time.time() + settings.duration
    if not _set_paused_until(settings, until):
        log.error("%s is NOT paused: its heartbeat could not be written", settings.job)
        return ExitCode.FAILURE
    log.info("%s paused until %s", settings.job, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until)))
    return ExitCode.OK


def resume(settings: ResumeSettings) -> int:
    if not _set_paused_until(settings, 0.0):
        log.error("%s is still paused: its heartbeat could not be written", settings.job)
        return ExitCode.FAILURE
    log.info("%s resumed: its heartbeat alerts apply again", settings.job)
    return ExitCode.OK


# Read by mlwarden.registry without importing this module (literals only).
MLWARDEN_COMMANDS = (
    {"name": "pause", "attribute": "PAUSE", "help": "pause a job's heartbeat alerts for maintenance, e.g. pause backup --for 2h"},
    {"name": "resume", "attribute": "RESUME", "help": "end a job's maintenance pause before its time is up"},
)

PAUSE = Command(
    "pause",
    settings=PauseSettings,
    run=pause,
    description="Pause the job's late, running-too-long and failed alerts on this machine for --for (they resume by themselves).",
)

RESUME = Command("resume", settings=ResumeSettings, run=resume, description="End the job's maintenance pause now.")
