"""One heartbeat model for every job: start and finish pings, the job's own schedule, pauses.

The rules' behaviour (late, running too long, never succeeded, paused) is proven by promtool
in alerts/tests/jobs.test.yml; here: what the jobs push, to a real Pushgateway and to
textfiles, and that the rules stay generic.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from mlwarden.exporter.collectors.jobs import JobsCollector
from mlwarden.jobs import report as job_report
from mlwarden.jobs.report import JobReport, Schedule

from mlwarden import cli, heartbeat, registry, settings
from mlwarden.components import wait_until
from mlwarden.exitcodes import ExitCode
from tests.test_exporter_server import request, start_exporter  # noqa: F401  (start_exporter is a fixture)

REPO = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()


def pushed(url: str, job: str) -> dict[str, tuple[dict[str, str], float]]:
    """metric name -> (labels, value) of one job's group on this host."""
    result = {}
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        match = re.match(r"^([a-z_]+)\{(.*)\} (\S+)$", line)
        if not match or not match.group(1).startswith("mlwarden_job_"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        if labels.get("job") == job and labels.get("instance") == HOST:
            result[match.group(1)] = (labels, float(match.group(3)))
    return result


def test_rules_name_no_job_and_no_interval() -> None:
    """A new job needs no new rule: every threshold is the job's own pushed schedule."""
    document = yaml.safe_load((REPO / "alerts" / "rules" / "jobs.yml").read_text())
    expressions = [rule["expr"] for group in document["groups"] for rule in group["rules"]]
    tasks = {"restore_drill"} | set(registry.entries())
    for expr in expressions:
        assert not re.search(r"\bjob\s*(=|!=|=~|!~)", expr), expr  # no job selector, scrape or pushed
        assert not re.search(r"mlwarden_(" + "|".join(tasks) + r")\"", expr), expr
        assert not re.search(r"\b\d+(\.\d+)?\s*[smhdwy]\b|\b\d+\s*\*\s*\d+", expr), expr  # no duration
        numbers = {float(n) for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", expr)}
        assert numbers <= {0.0, 1.0}, expr
        assert "absent(" not in expr, "a list of jobs in absent() is what the schedule replaced"


def test_a_run_pings_start_with_its_schedule_then_finish(pushgateway) -> None:
    schedule = Schedule(expected_interval=86400, grace=3600, timeout=600, late_severity="critical")
    before = time.time()
    with JobReport("sample", pushgateway=pushgateway.url, schedule=schedule) as report:
        during = pushed(pushgateway.url, "mlwarden_sample")
        report.succeeded()
    after = pushed(pushgateway.url, "mlwarden_sample")

    # While it runs, Prometheus can see it started, and what it promised.
    assert during["mlwarden_job_last_start_timestamp_seconds"][1] >= before
    assert "mlwarden_job_last_run_timestamp_seconds" not in during  # a first run has not ended
    assert "mlwarden_job_success" not in during  # no outcome is invented at the start
    for name, value in (("expected_interval", 86400), ("grace", 3600), ("timeout", 600)):
        labels, pushed_value = during[f"mlwarden_job_{name}_seconds"]
        assert (labels["severity"], pushed_value) == ("critical", value)
    # After it, the end is after the start, and the schedule is still there.
    assert after["mlwarden_job_last_run_timestamp_seconds"][1] >= after["mlwarden_job_last_start_timestamp_seconds"][1]
    assert after["mlwarden_job_success"][1] == 1
    assert after["mlwarden_job_last_success_timestamp_seconds"][1] >= before
    assert after["mlwarden_job_expected_interval_seconds"][1] == 86400


def test_pause_and_resume_survive_the_jobs_own_pushes(pushgateway) -> None:
    before = time.time()
    assert cli.main(["pause", "backup", "--for", "2h", "--pushgateway", pushgateway.url]) == ExitCode.OK
    with JobReport("backup", pushgateway=pushgateway.url, schedule=Schedule(86400, 3600, 600)) as report:
        report.succeeded(False)
    paused = pushed(pushgateway.url, "mlwarden_backup")["mlwarden_job_paused_until_timestamp_seconds"][1]
    assert before + 7200 <= paused <= time.time() + 7200
    assert cli.main(["resume", "backup", "--pushgateway", pushgateway.url]) == ExitCode.OK
    assert pushed(pushgateway.url, "mlwarden_backup")["mlwarden_job_paused_until_timestamp_seconds"][1] == 0


def test_textfile_keeps_the_pause_the_schedule_and_the_last_success(tmp_path: Path, promtool: str) -> None:
    schedule = Schedule(900, 2700, 600)
    with JobReport("health", textfile_dir=tmp_path, schedule=schedule) as report:
        report.succeeded()
    assert cli.main(["pause", "health", "--for", "30m", "--textfile-dir", str(tmp_path)]) == ExitCode.OK
    with JobReport("health", textfile_dir=tmp_path, schedule=schedule) as report:
        report.succeeded(False)
    text = (tmp_path / "mlwarden_health.prom").read_text()
    for name in ("last_success_timestamp", "paused_until_timestamp", "expected_interval", "last_start_timestamp"):
        assert len(re.findall(rf"^mlwarden_job_{name}_seconds[ {{]", text, re.M)) == 1, name
    assert re.search(r"^mlwarden_job_success 0\.0$", text, re.M)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_pause_that_cannot_be_written_fails_and_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(job_report, "PUSH_ATTEMPTS", 1)
    closed = f"http://127.0.0.1:{_closed_port()}"
    assert cli.main(["pause", "backup", "--for", "1h", "--pushgateway", closed]) == ExitCode.FAILURE
    assert "backup is NOT paused" in capsys.readouterr().err  # the CLI's own log handler writes to stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pause", "backup", "--for", "2h"], "--pushgateway (or PUSHGATEWAY_URL) or --textfile-dir is required"),
        (["pause", "backup", "--for", "40d", "--textfile-dir", "/tmp"], "at most 30 days"),
        (["pause", "Backup!", "--for", "1h", "--textfile-dir", "/tmp"], "expected one of backup, restore_drill, cleanup, health"),
        # a typo would pause nothing and report success
        (["pause", "bakup", "--for", "1h", "--textfile-dir", "/tmp"], "did you mean backup?"),
        (["pause", "backup", "--textfile-dir", "/tmp"], "--for"),
    ],
)
def test_pause_usage_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.startswith("mlwarden pause: ") and message in err and err.count("\n") == 1


def test_default_schedules_match_the_timers_and_the_old_thresholds(tmp_path: Path) -> None:
    """health every 15 min, backup and cleanup daily (maintain), the drill weekly: late after 1 h, 25 h, 2 d and 8 d."""
    from mlwarden.jobs.backup.cli import BackupSettings, RestoreSettings
    from mlwarden.jobs.cleanup.cli import CleanupSettings
    from mlwarden.jobs.health.cli import HealthSettings

    environ = {"MODEL_DIR": str(tmp_path), "BACKUP_DIR": str(tmp_path), "EXPERIMENTS_DIR": str(tmp_path)}
    expected = {
        "backup": (BackupSettings, 86400, 25 * 3600, "critical"),
        "restore": (RestoreSettings, 7 * 86400, 8 * 86400, "warning"),
        "cleanup": (CleanupSettings, 86400, 2 * 86400, "warning"),
        "health": (HealthSettings, 900, 3600, "warning"),
    }
    for command, (cls, interval, late_after, severity) in expected.items():
        argv = ["--drill"] if command == "restore" else []
        loaded = settings.load(cls, command, argv, environ)
        schedule = job_report.schedule_of(loaded)
        assert (schedule.expected_interval, schedule.expected_interval + schedule.grace) == (interval, late_after), command
        assert schedule.late_severity == severity and schedule.timeout < schedule.expected_interval, command
    timers = {p.stem: p.read_text() for p in (REPO / "deploy" / "systemd").glob("*.timer")}
    assert "OnCalendar=*:0/15" in timers["mlwarden-health"]
    assert "OnCalendar=Sun " in timers["mlwarden-restore-drill"]
    assert "OnCalendar=*-*-* 03:00:00" in timers["mlwarden-maintain"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# A job that never reported: the exporter publishes what this host expects ---------------------


def test_every_job_that_pushes_a_heartbeat_is_declared_with_its_schedule() -> None:
    """The exporter learns the jobs from the registry: a JobReport task it does not know could never be missed."""
    pushed_tasks = {
        match for path in (REPO / "jobs").rglob("*.py")
        for match in re.findall(r"JobReport\(\s*\"([a-z_]+)\"", path.read_text())
    }
    declared = registry.heartbeats()
    assert set(declared) == pushed_tasks == {"backup", "restore_drill", "cleanup", "health"}
    for name, entry in declared.items():
        options = {opt.name for opt in settings.options_of(entry.load().settings, entry.name)}
        assert set(heartbeat.SCHEDULE_FIELDS) <= options, name


def test_the_expected_jobs_follow_the_environment_the_jobs_read(caplog: pytest.LogCaptureFixture) -> None:
    environ = {
        "MLWARDEN_BACKUP_EXPECTED_INTERVAL": "6h",  # the backup runs every 6 hours here
        "MLWARDEN_RESTORE_LATE_SEVERITY": "critical",
        "RUN_CLEANUP": "false",  # maintain does not clean up on this machine
        "MLWARDEN_HEALTH_GRACE": "soon",  # health stops at this error: it must still be expected
    }
    found = {e.name: (e.job, e.interval, e.grace, e.severity) for e in heartbeat.expectations(None, environ)}
    assert found == {
        "backup": ("mlwarden_backup", 6 * 3600, 3600, "critical"),
        "restore_drill": ("mlwarden_restore_drill", 7 * 86400, 86400, "critical"),
        "health": ("mlwarden_health", 900, 2700, "warning"),
    }
    assert "MLWARDEN_HEALTH_GRACE" in caplog.text
    assert [e.name for e in heartbeat.expectations(("cleanup",), environ)] == ["cleanup"]
    assert heartbeat.expectations((), environ) == []
    # The child the exporter asks gives the same answer, and its warnings come back as logs.
    assert heartbeat.expectations_in_child(None, environ) == heartbeat.expectations(None, environ)


@pytest.mark.parametrize(("text", "message"), [
    ("bakup", "did you mean backup?"),
    ("backup,restore", "comma-separated list of backup, restore_drill, cleanup, health"),
    (",", "expected auto, none or"),
])
def test_expected_jobs_must_be_declared_jobs(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        heartbeat.parse_selection(text)
    assert heartbeat.parse_selection("auto") is None and heartbeat.parse_selection("none") == ()
    assert heartbeat.parse_selection("health, backup,health") == ("health", "backup")


def test_the_exporter_remembers_since_when_it_expects_each_job(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backup = heartbeat.Expectation("backup", 86400, 3600, "critical")
    health = heartbeat.Expectation("health", 900, 2700, "warning")

    def due(collector: JobsCollector) -> dict[str, tuple[tuple[str, ...], float]]:
        [family] = collector.collect().families
        return {labels[0]: (tuple(labels), value) for labels, value in family.samples}

    first = JobsCollector([backup], 60, 60, state_dir=tmp_path, instance="node1", clock=lambda: 1000.0)
    assert due(first) == {"mlwarden_backup": (("mlwarden_backup", "node1", "critical"), 1000 + 86400 + 3600)}
    # Restarted a day later with one more job: the backup's wait goes on, health's starts now.
    again = JobsCollector([backup, health], 60, 60, state_dir=tmp_path, instance="node1", clock=lambda: 90000.0)
    assert due(again) == {
        "mlwarden_backup": (("mlwarden_backup", "node1", "critical"), 1000 + 86400 + 3600),
        "mlwarden_health": (("mlwarden_health", "node1", "warning"), 90000 + 900 + 2700),
    }
    # Without a state directory, or with a damaged state file, the exporter's start counts.
    assert due(JobsCollector([backup], 60, 60, instance="n", clock=lambda: 5.0))["mlwarden_backup"][1] == 5 + 86400 + 3600
    (tmp_path / "expected-jobs.json").write_text("{not json")
    assert due(JobsCollector([backup], 60, 60, state_dir=tmp_path, clock=lambda: 7.0))["mlwarden_backup"][1] == 7 + 86400 + 3600
    assert "cannot read" in caplog.text


def test_the_running_exporter_publishes_the_expectations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          start_exporter: Callable[..., Any], promtool: str) -> None:
    monkeypatch.setenv("MLWARDEN_CLEANUP_EXPECTED_INTERVAL", "12h")  # the jobs' settings, in the shared environment
    before = time.time()
    # STATE_DIRECTORY: as systemd's StateDirectory= sets it
    exporter = start_exporter("--expected-jobs", "cleanup,health", environ={"STATE_DIRECTORY": str(tmp_path)})
    url = f"http://127.0.0.1:{exporter.port}/metrics"
    wait_until(lambda: "mlwarden_job_first_heartbeat_due" in request(url)[1], 15, "the jobs collector's first pass")
    body = request(url)[1]
    due = {labels["heartbeat_job"]: (labels, value) for labels, value in _samples(body, "mlwarden_job_first_heartbeat_due_timestamp_seconds")}
    assert set(due) == {"mlwarden_cleanup", "mlwarden_health"}
    labels, value = due["mlwarden_cleanup"]
    assert labels == {"heartbeat_job": "mlwarden_cleanup", "heartbeat_instance": HOST, "severity": "warning"}
    assert before + 12 * 3600 + 86400 <= value <= time.time() + 12 * 3600 + 86400
    assert (tmp_path / "expected-jobs.json").is_file()
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _samples(body: str, name: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for line in body.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match:
            found.append((dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))), float(match.group(2))))
    return found


def test_expectations_that_cannot_be_worked_out_fail_the_collector_not_the_exporter(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A broken child must not take GPU metrics down, nor leave JobNeverReported silently off."""
    from mlwarden.exporter.collectors import jobs as jobs_collector

    def broken(*_: object) -> list[heartbeat.Expectation]:
        raise RuntimeError("cannot work out the expected jobs: ['Traceback ...']")

    monkeypatch.setattr(jobs_collector, "expectations_in_child", broken)
    collector = jobs_collector._build(jobs_collector.JobsSettings(), _context())
    assert collector is not None and collector.collect().success is False
    assert "cannot work out the jobs this host expects" in caplog.text
    monkeypatch.setattr(jobs_collector, "expectations_in_child", lambda *_: [])
    assert jobs_collector._build(jobs_collector.JobsSettings(expected_jobs=()), _context()) is None  # --expected-jobs none


def _context() -> Any:
    from mlwarden.exporter.backends import open_backend
    from mlwarden.exporter.backends.supervisor import BackendSupervisor
    from mlwarden.exporter.collectors.base import CollectorContext

    return CollectorContext(BackendSupervisor(open_backend("simulated", 1, 1)), 1.0, 1.0, 60.0)


def test_the_exporter_works_the_schedules_out_without_keeping_the_job_modules() -> None:
    """Reading the jobs' settings imports them (prometheus_client among them): that happens in a child."""
    code = (
        "import sys\n"
        "from mlwarden import settings\n"
        "from mlwarden.exporter.app import collectors_for\n"
        "from mlwarden.exporter.backends import open_backend\n"
        "from mlwarden.exporter.backends.supervisor import BackendSupervisor\n"
        "from mlwarden.exporter.cli import ExporterSettings\n"
        "chosen = settings.load(ExporterSettings, 'exporter', ['--gpu-backend', 'simulated'], {})\n"
        "built = collectors_for(chosen, BackendSupervisor(open_backend('simulated', 1, 1)))\n"
        "[jobs] = [c for c in built if c.name == 'jobs']\n"
        "print(sorted(e.name for e in jobs.expected))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('mlwarden.jobs', 'prometheus_client'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    expected, loaded = result.stdout.splitlines()
    assert expected == "['backup', 'cleanup', 'health', 'restore_drill']"
    assert loaded == "[]"
