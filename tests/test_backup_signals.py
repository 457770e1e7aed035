"""SIGTERM (systemd's stop) is handled like SIGINT by backup, restore and drill: partial work is
removed, the failure is pushed, and the exit status says which signal it was; what a kill -9
leaves is seen by the exporter and removed by the next run. Real signals to the real
`mlwarden` script."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlwarden.exporter.collectors.backups import BackupsCollector
from mlwarden.exporter.snapshot import render
from prometheus_client.parser import text_string_to_metric_families
from test_backup_support import backup, forget_pushed, make_models, mlwarden, pushed, tree

from mlwarden import components
from mlwarden.components import wait_until

MLWARDEN = Path(sys.executable).parent / "mlwarden"  # the venv's console script


def _stop_when(argv: list[str | Path], ready: Callable[[], bool], sig: signal.Signals) -> tuple[int, str]:
    """Start ``mlwarden ARGV``, send ``sig`` once ``ready()`` holds, return (exit status, stderr)."""
    process = subprocess.Popen([str(MLWARDEN), *map(str, argv)], stderr=subprocess.PIPE, text=True)

    def started() -> bool:
        assert process.poll() is None, "the job finished before the signal could be sent"
        return ready()

    try:
        wait_until(started, 120, "the job's partial work", poll=0.005)
        process.send_signal(sig)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    return process.returncode, err


def _big_models(path: Path, mib: int) -> Path:
    path.mkdir()
    with open(path / "weights.bin", "wb") as handle:
        for _ in range(mib):
            handle.write(os.urandom(2**20))
    return path


def _big_backup(tmp_path: Path) -> tuple[Path, Path]:
    """A backup big enough (160 MiB, uncompressed) that its restore is still running when signalled."""
    models = _big_models(tmp_path / "models", 160)
    backups = tmp_path / "backups"
    assert backup(models, backups, "--compression", "none", "--no-verify") == 0
    return models, backups


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_archive_removes_the_partial_backup_and_pushes_the_failure(
    tmp_path: Path, pushgateway: components.Component, sig: signal.Signals, status: int
) -> None:
    forget_pushed(pushgateway.url, "mlwarden_backup")
    models = _big_models(tmp_path / "models", 48)
    backups = tmp_path / "backups"

    def archive_being_written() -> bool:
        # the archive's own partial file: other atomic writes (checksums, status, the files cache)
        # also end in .tmp, and one of them seen under load sent the signal after the backup was done
        return any(p.name.endswith(".tmp") and ".tar.gz." in p.name for p in backups.rglob("*"))

    # One compression thread: the archive takes seconds even on a fast host, so the signal lands in it.
    argv: list[str | Path] = ["backup", "--model-dir", models, "--backup-dir", backups, "--compression", "gzip", "--level", "9",
                              "--threads", "1", "--pushgateway", pushgateway.url]
    code, err = _stop_when(argv, archive_being_written, sig)
    assert code == status
    assert [p.name for p in backups.iterdir()] == [".mlwarden-backup.lock"]  # no staging, no partial archive
    assert ("stopped by SIGTERM" if sig == signal.SIGTERM else "interrupted") in err
    metrics = pushed(pushgateway.url, "mlwarden_backup")
    assert metrics["mlwarden_job_success"] == 0
    assert "mlwarden_job_last_success_timestamp_seconds" not in metrics


@pytest.mark.parametrize("drill", [True, False], ids=["drill", "restore"])
def test_sigterm_mid_restore_removes_the_staging_and_pushes_the_drill_failure(
    tmp_path: Path, pushgateway: components.Component, drill: bool
) -> None:
    forget_pushed(pushgateway.url, "mlwarden_restore_drill")
    models, backups = _big_backup(tmp_path)
    target = tmp_path / "restored"
    scratch = backups if drill else tmp_path

    def extracting() -> bool:
        return any(".restored.restore-" in p.name for p in scratch.rglob(".*"))

    where: list[str | Path] = ["--drill"] if drill else ["--to", target]
    code, err = _stop_when(["restore", "--backup-dir", backups, *where, "--pushgateway", pushgateway.url], extracting, signal.SIGTERM)
    assert code == 143
    assert "stopped by SIGTERM" in err
    assert [p.name for p in backups.iterdir() if p.name.startswith(".")] == [".mlwarden-backup.lock"]
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backups", "models"]
    if drill:
        metrics = pushed(pushgateway.url, "mlwarden_restore_drill")
        assert metrics["mlwarden_job_success"] == 0
        assert "mlwarden_job_last_success_timestamp_seconds" not in metrics


def _stale_bytes(backups: Path) -> float:
    text = render(BackupsCollector(backups, 60.0, 60.0).collect().families).decode()
    [value] = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "mlwarden_backup_stale_staging_bytes"]
    return value


def test_what_a_killed_drill_leaves_is_seen_by_the_exporter_and_removed_by_the_next_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models, backups = _big_backup(tmp_path)
    assert _stale_bytes(backups) == 0

    def extracted_some_bytes() -> bool:
        return any(p.is_file() and p.stat().st_size > 0 for d in backups.glob(".drill-*") for p in d.rglob("*"))

    code, _ = _stop_when(["restore", "--backup-dir", backups, "--drill"], extracted_some_bytes, signal.SIGKILL)
    assert code == -signal.SIGKILL
    [left] = [p for p in backups.iterdir() if p.name.startswith(".drill-")]
    assert _stale_bytes(backups) > 0  # the exporter serves it, and BackupStaleStaging watches it
    capsys.readouterr()
    assert backup(models, backups) == 0  # the next run that holds the lock
    assert f"removing {left}: left behind by a run that was killed" in capsys.readouterr().err
    assert not left.exists()
    assert _stale_bytes(backups) == 0


def _processes_naming(path: Path) -> list[int]:
    """Live processes whose command line names ``path`` (a forked child keeps its parent's)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(path).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue  # ended meanwhile
    return pids


def test_a_backup_killed_while_its_verifier_follows_is_cleaned_up_by_the_next_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kill -9 while the forked verifier reads the archive: the next backup (which needs the
    lock the dead run held) removes what the dead run left and makes a whole backup."""
    models = _big_models(tmp_path / "models", 48)
    backups = tmp_path / "backups"

    def verifier_following() -> bool:  # the backup and its forked verifier both run
        return len(_processes_naming(backups)) == 2

    argv: list[str | Path] = ["backup", "--model-dir", models, "--backup-dir", backups, "--compression", "gzip", "--level", "9",
                              "--threads", "1"]
    code, _ = _stop_when(argv, verifier_following, signal.SIGKILL)
    assert code == -signal.SIGKILL
    [left] = [p for p in backups.iterdir() if p.name.startswith(".") and p.name != ".mlwarden-backup.lock"]
    capsys.readouterr()
    assert backup(models, backups) == 0
    assert f"removing {left}: left behind by a run that was killed" in capsys.readouterr().err
    assert not left.exists()
    [made] = [p for p in backups.iterdir() if not p.name.startswith(".")]
    assert (made / "manifest.json").is_file()


def test_what_a_killed_restore_leaves_is_removed_by_the_next_restore_to_the_same_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models, backups = _big_backup(tmp_path)
    target = tmp_path / "restored"

    def extracting() -> bool:
        return any(p.name.startswith(".restored.restore-") for p in tmp_path.iterdir())

    code, _ = _stop_when(["restore", "--backup-dir", backups, "--to", target], extracting, signal.SIGKILL)
    assert code == -signal.SIGKILL
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".restored.restore-")]
    other = tmp_path / f".other.restore-{left.name.split('-')[1]}-abcdefgh"  # another target's: not ours to touch
    other.mkdir()
    capsys.readouterr()
    assert mlwarden("restore", "--backup-dir", backups, "--to", target) == 0
    assert f"removing {left}: left behind by a restore to {target} that was killed" in capsys.readouterr().err
    assert not left.exists() and other.exists()
    assert tree(target) == tree(models)


@pytest.mark.parametrize("job", ["backup", "restore", "drill"])
def test_sigterm_just_after_a_work_directory_is_made_strands_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, job: str
) -> None:
    """The tightest window: the signal lands after the mkdir, before the job holds the path."""
    from mlwarden.jobs.backup import job as job_module
    from mlwarden.jobs.backup import restore as restore_module

    models, backups = make_models(tmp_path / "models"), tmp_path / "backups"
    if job != "backup":
        assert backup(models, backups) == 0
    original = restore_module.staging_dir

    def made_then_signalled(parent: Path, prefix: str, name: str = "") -> Path:
        path = original(parent, prefix, name)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # checks for signals: the handler runs here, before the caller has the path
        return path

    monkeypatch.setattr(restore_module, "staging_dir", made_then_signalled)
    monkeypatch.setattr(job_module, "staging_dir", made_then_signalled)
    before = {p.name for p in tmp_path.iterdir()}
    argv = {"backup": ["backup", "--model-dir", models, "--backup-dir", backups],
            "restore": ["restore", "--backup-dir", backups, "--to", tmp_path / "restored"],
            "drill": ["restore", "--drill", "--backup-dir", backups]}[job]
    assert mlwarden(*argv) == 143
    assert {p.name for p in tmp_path.iterdir()} == before | ({"backups"} if job == "backup" else set())
    assert [p.name for p in backups.iterdir() if p.name.startswith(".") and p.name != ".mlwarden-backup.lock"] == []
