"""Which job heartbeats a host expects, and on what schedule: so that a job that never reported is an alert.

Every scheduled job pushes its heartbeat under ``job="mlwarden_<name>"`` together with its
schedule (:mod:`mlwarden.jobs.report`), and the generic rules compare what it pushed. A job
that never pushed anything (its timer was never enabled, it stops at a configuration error
before its first ping, it cannot reach the Pushgateway) leaves nothing to compare. So the
exporter, which runs all the time on the same host and reads the same environment file as
the jobs, publishes what this host expects (``exporter/collectors/jobs.py``): the jobs the
command registry declares with a ``heartbeat``, each with the interval, grace and severity
its own settings give it, here. The rule ``JobNeverReported`` fires when such a job has no
heartbeat at all once its first one is overdue. No job name or interval is written in PromQL.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from mlwarden import registry, settings

log = logging.getLogger(__name__)

AUTO = "auto"
NONE = "none"
SCHEDULE_FIELDS = ("expected_interval", "grace", "late_severity")


@dataclass(frozen=True)
class Expectation:
    """One job this host expects a heartbeat from."""

    name: str  # what follows mlwarden_ in its job label
    interval: float
    grace: float
    severity: str

    @property
    def job(self) -> str:
        return job_name(self.name)


def job_name(name: str) -> str:
    """The Pushgateway ``job`` label of a job's heartbeat."""
    return f"mlwarden_{name}"


def parse_selection(text: str) -> tuple[str, ...] | None:
    """``--expected-jobs``: ``auto`` (None: decided by the environment), ``none``, or job names."""
    text = text.strip()
    if text == AUTO:
        return None
    if text == NONE:
        return ()
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    declared = registry.heartbeats()
    unknown = [name for name in names if name not in declared]
    if unknown or not names:
        hint = settings.suggestion(unknown[0], list(declared)) if unknown else ""
        raise ValueError(f"expected {AUTO}, {NONE} or a comma-separated list of {', '.join(declared)}{hint}")
    return names


def expectations(selection: tuple[str, ...] | None, environ: Mapping[str, str]) -> list[Expectation]:
    """The jobs expected on this host, with the schedules their settings in ``environ`` give them.

    ``auto`` (None) expects every declared job, except a step of ``mlwarden maintain`` that
    the environment switches off (``RUN_BACKUP=false``): the shipped units run maintain and
    the restore drill on every machine. A job setting the environment gets wrong is expected
    on its default schedule (and logged): that job stops at the error and never pushes, which
    is exactly what the expectation is there to catch.
    """
    declared = registry.heartbeats()
    names = selection if selection is not None else tuple(name for name, entry in declared.items() if _in_plan(entry, environ))
    return [_expectation(name, declared[name], environ) for name in names]


def expectations_in_child(selection: tuple[str, ...] | None, environ: Mapping[str, str]) -> list[Expectation]:
    """:func:`expectations`, worked out by a short-lived child process.

    Reading the schedules imports every job's module; in the exporter they would stay in
    memory for good (6.7 MiB resident, more than the rest of its collectors together).
    """
    import subprocess  # here: the jobs that import this module for job_name() start without it

    argument = json.dumps(None if selection is None else list(selection))
    result = subprocess.run([sys.executable, "-m", __name__, argument], env=dict(environ),
                            capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"cannot work out the expected jobs: {result.stderr.strip().splitlines()[-1:]}")
    for line in result.stderr.splitlines():  # the child's warnings (a bad schedule setting), once more here
        log.warning("%s", line)
    return [Expectation(**row) for row in json.loads(result.stdout)]


def _in_plan(entry: registry.Entry, environ: Mapping[str, str]) -> bool:
    if entry.maintain is None:
        return True
    from mlwarden.jobs import maintain  # the plan's switches, read exactly as maintain reads them

    try:
        switches = settings.resolve_fields(maintain.MaintainSettings, "maintain", (entry.maintain.setting,), environ)
    except settings.SettingsError:
        return True  # maintain stops at the bad switch, so the job never runs: expect it
    return bool(switches[entry.maintain.setting])


def _expectation(name: str, entry: registry.Entry, environ: Mapping[str, str]) -> Expectation:
    job_settings = entry.load().settings
    try:
        values = settings.resolve_fields(job_settings, entry.name, SCHEDULE_FIELDS, environ)
    except settings.SettingsError as exc:
        log.warning("%s: %s; its heartbeat is expected on its default schedule", name, exc)
        values = settings.resolve_fields(job_settings, entry.name, SCHEDULE_FIELDS, {})
    return Expectation(name, float(values["expected_interval"]), float(values["grace"]), str(values["late_severity"]))


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    chosen = json.loads(sys.argv[1])
    found = expectations(None if chosen is None else tuple(chosen), os.environ)
    print(json.dumps([dataclasses.asdict(e) for e in found]))
