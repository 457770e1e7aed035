"""The deploy files, checked with the real tools: systemd-analyze, logrotate, sh."""

from __future__ import annotations

import configparser
import logging
import re
import subprocess
from pathlib import Path

import pytest

from mlwarden import logs, registry, settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
UNITS = DEPLOY / "systemd"
INSTALLED_BINARY = "/opt/mlwarden/venv/bin/mlwarden"
VENV_BINARY = REPO / ".venv" / "bin" / "mlwarden"


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(path)
    return parser


def job_services() -> list[Path]:
    return [p for p in sorted(UNITS.glob("*.service")) if unit(p).get("Service", "Type", fallback="") == "oneshot" and "@" not in p.name]


@pytest.fixture(scope="module")
def units_for_verify(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units with ExecStart pointing at this checkout's mlwarden (verify checks it exists)."""
    directory = tmp_path_factory.mktemp("units")
    for path in UNITS.iterdir():
        (directory / path.name).write_text(path.read_text().replace(INSTALLED_BINARY, str(VENV_BINARY)))
    return directory


def test_every_unit_passes_systemd_analyze_verify_without_a_single_warning(units_for_verify: Path) -> None:
    files = sorted(str(p) for p in units_for_verify.iterdir())
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=false", *files], capture_output=True, text=True, cwd=units_for_verify
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_verify_would_catch_a_typo(units_for_verify: Path, tmp_path: Path) -> None:
    broken = tmp_path / "mlwarden-health.service"
    broken.write_text((units_for_verify / "mlwarden-health.service").read_text().replace("Nice=", "Nicee="))
    result = subprocess.run(["systemd-analyze", "verify", "--man=false", str(broken)], capture_output=True, text=True)
    assert "Nicee" in result.stderr


def test_every_schedule_is_a_valid_calendar_expression() -> None:
    timers = sorted(UNITS.glob("*.timer"))
    assert {t.stem for t in timers} == {"mlwarden-maintain", "mlwarden-health", "mlwarden-restore-drill"}
    for timer in timers:
        section = unit(timer)["Timer"]
        result = subprocess.run(["systemd-analyze", "calendar", section["OnCalendar"]], capture_output=True, text=True)
        assert result.returncode == 0 and "Next elapse" in result.stdout, (timer.name, result.stderr)
        assert section["Persistent"] == "true" and section["RandomizedDelaySec"]
        assert (UNITS / f"{timer.stem}.service").exists(), f"{timer.name} has no service"


def test_jobs_are_limited_hardened_and_report_failures() -> None:
    assert {p.stem for p in job_services()} == {"mlwarden-maintain", "mlwarden-health", "mlwarden-restore-drill"}
    for path in job_services():
        service = unit(path)["Service"]
        for key in ("CPUQuota", "MemoryHigh", "MemoryMax", "Nice"):
            assert service.get(key), (path.name, key)
        assert service["IOSchedulingClass"] == "idle"
        assert service["EnvironmentFile"] == "/etc/mlwarden/mlwarden.env"
        on_failure = unit(path)["Unit"]["OnFailure"]
        assert (UNITS / re.sub(r"@.*\.service$", "@.service", on_failure)).exists()
    for path in UNITS.glob("*.service"):
        service = unit(path)["Service"]
        assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict", path.name
        assert service["PrivateTmp"] == "yes", path.name
        if "@" not in path.name:
            assert service["User"] == "mlwarden", path.name
        command = service["ExecStart"].split()
        if command[0] == INSTALLED_BINARY:
            assert command[1] in registry.entries(), path.name


def test_the_dedicated_user_is_declared_for_sysusers() -> None:
    line = next(entry for entry in (DEPLOY / "sysusers.d" / "mlwarden.conf").read_text().splitlines() if entry.startswith("u "))
    assert line.split()[1] == "mlwarden"


def known_variables() -> set[str]:
    names: set[str] = set()
    for name, entry in registry.entries().items():
        command = entry.load()
        for opt in settings.options_of(command.settings, name):
            names.update(opt.env_names)
            if opt.spec.secret:
                names.update(f"{n}_FILE" for n in opt.env_names)
    return names


def test_every_variable_in_the_example_environment_file_exists_and_secrets_are_files() -> None:
    text = (DEPLOY / "mlwarden.env.example").read_text()
    assignments = re.findall(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", text, re.M)
    assert len(assignments) > 30
    known = known_variables() | {"AWS_SHARED_CREDENTIALS_FILE", "SLACK_WEBHOOK_URL_FILE", "PAGERDUTY_ROUTING_KEY_FILE"}
    unknown = sorted({name for name, _ in assignments} - known)
    assert unknown == []
    for name, _ in assignments:
        if re.search(r"TOKEN|PASSWORD|SECRET|KEY|WEBHOOK", name):
            assert name.endswith("_FILE"), f"{name}: secrets go in files"
    # Each assignment is preceded by a comment (documented), directly or in its group.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Z]", line):
            assert any(above.startswith("#") for above in lines[max(0, i - 6):i]), line
    # And the file is valid for both readers: sh (cron) and the settings loader.
    subprocess.run(["sh", "-n", str(DEPLOY / "mlwarden.env.example")], check=True)


def test_the_crontab_runs_each_job_under_flock_nice_and_ionice() -> None:
    jobs = [entry for entry in (DEPLOY / "cron" / "mlwarden.crontab").read_text().splitlines() if re.match(r"^[0-9*]", entry)]
    assert len(jobs) == 3
    for line in jobs:
        fields = line.split(None, 6)
        assert fields[5] == "mlwarden"
        command = fields[6]
        assert "flock -n" in command and "nice -n 10" in command and "ionice -c 3" in command
        subcommand = command.split("$MLWARDEN ", 1)[1].split()[0]
        assert subcommand in registry.entries()
        subprocess.run(["sh", "-n", "-c", command], check=True)


def logrotate_config(tmp_path: Path, log_dir: Path) -> Path:
    text = (DEPLOY / "logrotate" / "mlwarden").read_text().replace("/var/log/mlwarden", str(log_dir))
    config = tmp_path / "logrotate.conf"
    config.write_text(text)
    return config


def test_logrotate_accepts_the_rules_and_never_copytruncates(tmp_path: Path) -> None:
    text = (DEPLOY / "logrotate" / "mlwarden").read_text()
    rules = [entry.strip() for entry in text.splitlines() if entry.strip() and not entry.strip().startswith("#")]
    assert "copytruncate" not in rules and "delaycompress" in rules
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "maintain.log").write_text("a line\n")
    result = subprocess.run(
        ["logrotate", "-d", "-s", str(tmp_path / "state"), str(logrotate_config(tmp_path, log_dir))],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "error" not in (result.stdout + result.stderr).lower()
    assert "maintain.log" in result.stdout + result.stderr


def test_a_real_rotation_loses_no_line_because_the_log_file_is_reopened(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    log_file = log_dir / "job.log"
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.setup("info", log_file)
        logging.getLogger("mlwarden.test").info("before rotation")
        subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "state"), str(logrotate_config(tmp_path, log_dir))], check=True)
        logging.getLogger("mlwarden.test").info("after rotation")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    assert "before rotation" in (log_dir / "job.log.1").read_text()  # delaycompress: not compressed yet
    assert "after rotation" in log_file.read_text()
    assert "before rotation" not in log_file.read_text()
