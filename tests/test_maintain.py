"""mlwarden maintain: order, feature flags, isolation of failures, and each task's own metrics."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from pathlib import Path

import httpx
import pytest
from mlwarden.jobs import maintain

from mlwarden import cli, settings
from mlwarden.catalog import Catalog
from mlwarden.command import Command
from mlwarden.exitcodes import ExitCode

DAY = 86400


@dataclasses.dataclass(frozen=True)
class _StandInSettings:
    fail: bool = settings.setting(False, help="return 1")
    crash: bool = settings.setting(False, help="raise")
    count: int = settings.setting(0, help="a number", parse=settings.positive(int))


def stand_in_registry(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the real commands with recorders; returns the order in which tasks ran."""
    ran: list[str] = []

    def load_command(name: str) -> Command:
        def run(task_settings: _StandInSettings) -> int:
            ran.append(name)
            if task_settings.crash:
                raise RuntimeError("boom")
            return ExitCode.FAILURE if task_settings.fail else ExitCode.OK

        return Command(name, _StandInSettings, run)

    monkeypatch.setattr(cli, "load_command", load_command)
    return ran


def test_tasks_run_in_order_and_flags_disable_them(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = stand_in_registry(monkeypatch)
    assert maintain.run(settings.load(maintain.MaintainSettings, "maintain", [], {}), {}) == ExitCode.OK
    assert ran == ["health", "backup", "cleanup"]

    ran.clear()
    flags = settings.load(maintain.MaintainSettings, "maintain", [], {"RUN_BACKUP": "false", "RUN_HEALTH_CHECK": "0"})
    assert maintain.run(flags, {}) == ExitCode.OK
    assert ran == ["cleanup"]


def test_a_failing_crashing_or_misconfigured_task_does_not_stop_the_others(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ran = stand_in_registry(monkeypatch)
    environ = {
        "MLWARDEN_HEALTH_CRASH": "1",
        "MLWARDEN_BACKUP_COUNT": "-3",  # a settings error: reported as this task's failure
        "MLWARDEN_CLEANUP_FAIL": "1",
    }
    caplog.set_level(logging.INFO)

    assert maintain.run(maintain.MaintainSettings(), environ) == ExitCode.FAILURE

    assert ran == ["health", "cleanup"]  # backup never started: its configuration was refused
    outcomes = {o.task: o for o in (maintain.run_task(n, environ) for n in ("health", "backup", "cleanup"))}
    assert outcomes["health"].detail == "crashed: RuntimeError"
    assert outcomes["backup"].exit_code == ExitCode.USAGE and "MLWARDEN_BACKUP_COUNT" in outcomes["backup"].detail
    assert outcomes["cleanup"].detail == "exit 1 (failure)"
    assert "summary: health   failed" in caplog.text


def test_an_unloadable_task_is_a_failure_of_that_task(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> Command:
        raise ImportError(f"no module for {name}")

    monkeypatch.setattr(cli, "load_command", missing)
    outcome = maintain.run_task("backup", {})
    assert (outcome.state, outcome.detail) == ("failed", "cannot load: ImportError")


def pushed_success(pushgateway_url: str) -> dict[str, tuple[float, float]]:
    """job -> (mlwarden_job_success, mlwarden_job_last_run_timestamp_seconds)."""
    success: dict[str, float] = {}
    last_run: dict[str, float] = {}
    for line in httpx.get(pushgateway_url + "/metrics", timeout=5).text.splitlines():
        for name, target in (("mlwarden_job_success{", success), ("mlwarden_job_last_run_timestamp_seconds{", last_run)):
            if line.startswith(name) and f'instance="{socket.gethostname()}"' in line:
                job = line.split('job="', 1)[1].split('"', 1)[0]
                target[job] = float(line.rsplit(" ", 1)[1])
    return {job: (success[job], last_run[job]) for job in success}


def test_the_real_tasks_each_push_under_their_own_name(tmp_path: Path, pushgateway, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "weights.safetensors").write_bytes(os.urandom(4096))
    experiments = tmp_path / "experiments"
    old = experiments / "run-1" / "old.log"
    old.parent.mkdir(parents=True)
    old.write_text("old")
    os.utime(old, (time.time() - 60 * DAY,) * 2)
    environ = {
        "MODEL_DIR": str(models),
        "BACKUP_DIR": str(tmp_path / "backups"),  # the shell name: backup writes it, health reads it
        "EXPERIMENTS_DIR": str(experiments),
        "MLWARDEN_CLEANUP_YES": "1",
        "MLWARDEN_HEALTH_DISK_PATH": str(tmp_path),
        "MLWARDEN_HEALTH_DISK_CRITICAL": "1",
        "MLWARDEN_HEALTH_DISK_WARNING": "1",
        "PUSHGATEWAY_URL": pushgateway.url,  # one variable for every job
    }
    started = time.time()

    # First run: health runs before the first backup exists, so it fails; the others still run.
    assert maintain.run(maintain.MaintainSettings(), environ) == ExitCode.FAILURE
    assert not old.exists()
    assert len(Catalog(tmp_path / "backups").entries()) == 1
    pushed = pushed_success(pushgateway.url)
    for job in ("mlwarden_health", "mlwarden_backup", "mlwarden_cleanup"):
        success, last_run = pushed[job]
        assert last_run >= started, job  # this run's push, not one persisted by an earlier Pushgateway
        assert success == 1, job  # health's job_success means "the checks ran"; its verdict is check_ok

    # Second run: the backup made by the first run is fresh and verified, so health passes too.
    assert maintain.run(maintain.MaintainSettings(), environ) == ExitCode.OK
