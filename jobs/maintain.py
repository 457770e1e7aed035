"""``mlwarden maintain``: the jobs of the maintain plan in order, with one summary.

The plan is every command whose ``MLWARDEN_COMMANDS`` row has a ``maintain`` entry (see
:mod:`mlwarden.registry`), sorted by its order; each gets an on/off setting here.

Each task is the same command an operator would run alone, with its settings read from
the environment exactly as that command reads them (``MLWARDEN_<TASK>_*`` and the shell
names), and it pushes its own metrics under its own job name. One task failing, crashing
or being misconfigured does not stop the others; the exit status is 1 if any failed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlwarden import cli as mlwarden_cli
from mlwarden import registry, settings
from mlwarden.command import Command
from mlwarden.exitcodes import ExitCode
from mlwarden.settings import setting

log = logging.getLogger(__name__)


def _plan_settings() -> type:
    """One on/off setting per step of the plan, made from the registry."""
    plan = registry.maintain_plan()
    fields: list[tuple[str, type, Any]] = []
    for position, entry in enumerate(plan, 1):
        assert entry.maintain is not None
        help_text = f"run mlwarden {entry.name} (step {position} of {len(plan)})"
        fields.append((entry.maintain.setting, bool, setting(True, help=help_text, env=entry.maintain.env)))
    cls = dataclasses.make_dataclass("MaintainSettings", fields, frozen=True)
    cls.__module__ = __name__
    return cls


MaintainSettings = _plan_settings()


@dataclass(frozen=True)
class Outcome:
    task: str
    state: str  # "ok", "failed" or "skipped"
    exit_code: int | None
    seconds: float
    detail: str


def run_task(name: str, environ: Mapping[str, str]) -> Outcome:
    """Load, configure and run one task; every way it can fail becomes a failed outcome."""
    started = time.monotonic()

    def failed(code: int, detail: str) -> Outcome:
        return Outcome(name, "failed", code, time.monotonic() - started, detail)

    try:
        command: Command[Any] = mlwarden_cli.load_command(name)
    except Exception as exc:  # an uninstalled optional part must not stop the other tasks
        log.error("%s: cannot load the command: %s", name, exc)
        return failed(ExitCode.FAILURE, f"cannot load: {type(exc).__name__}")
    try:
        task_settings = settings.load(command.settings, command.name, [], environ)
    except settings.SettingsError as exc:
        log.error("%s: configuration error: %s", name, exc)
        return failed(ExitCode.USAGE, f"configuration: {exc}")
    log.info("%s: starting", name)
    try:
        code = int(command.run(task_settings))
    except Exception as exc:
        log.exception("%s crashed", name)
        return failed(ExitCode.FAILURE, f"crashed: {type(exc).__name__}")
    if code != ExitCode.OK:
        return failed(code, _describe(code))
    return Outcome(name, "ok", code, time.monotonic() - started, "")


def _describe(code: int) -> str:
    try:
        return f"exit {code} ({ExitCode(code).name.lower()})"
    except ValueError:
        return f"exit {code}"


def summary(outcomes: list[Outcome]) -> list[str]:
    lines = [f"{'TASK':<8} {'RESULT':<8} {'EXIT':>4} {'SECONDS':>8}  DETAIL"]
    for o in outcomes:
        code = "-" if o.exit_code is None else str(o.exit_code)
        lines.append(f"{o.task:<8} {o.state:<8} {code:>4} {o.seconds:>8.1f}  {o.detail}")
    return lines


def run(maintain: Any, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    outcomes = []
    for entry in registry.maintain_plan():
        assert entry.maintain is not None
        enabled = getattr(maintain, entry.maintain.setting)
        outcomes.append(run_task(entry.name, environ) if enabled else Outcome(entry.name, "skipped", None, 0.0, "disabled"))
    for line in summary(outcomes):
        log.info("summary: %s", line)
    failures = [o.task for o in outcomes if o.state == "failed"]
    if failures:
        log.error("maintenance finished with failures: %s", ", ".join(failures))
        return ExitCode.FAILURE
    log.info("maintenance finished: all enabled tasks succeeded")
    return ExitCode.OK


# Read by mlwarden.registry without importing this module (literals only).
MLWARDEN_COMMANDS = (
    {"name": "maintain", "attribute": "COMMAND", "help": "run the jobs of the maintain plan in order, with one summary"},
)

COMMAND: Command[Any] = Command(
    name="maintain",
    settings=MaintainSettings,
    run=run,
    description=(
        f"Run mlwarden {', '.join(e.name for e in registry.maintain_plan())} in that order (each configured by its own "
        "environment variables); a failing task does not stop the others; exit 1 if any failed."
    ),
)
