"""The backup run: idempotence, dry-run, the lock, interrupted runs, a full disk, kill -9, settings, metrics."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlwarden.jobs.backup.job import LOCK_FILE
from test_backup_support import backup, forget_pushed, make_models, mlwarden, only_entry, pushed, tree

from mlwarden import components
from mlwarden.catalog import BACKUP_DIR_STAGING, Catalog, stale_staging
from mlwarden.components import wait_until
from mlwarden.lock import JobLock

REPO = Path(__file__).resolve().parent.parent


def test_second_run_the_same_day_verifies_the_existing_backup_and_stops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups") == 0
    first = only_entry(tmp_path / "backups")
    assert backup(models, tmp_path / "backups") == 0
    again = only_entry(tmp_path / "backups")
    assert again.name == first.name
    assert again.status.verification.checked_at > first.status.verification.checked_at  # type: ignore[union-attr]  # both backups were verified: the lines above check it
    assert "already exists" in capsys.readouterr().err


def test_force_makes_a_new_backup_in_the_same_period(tmp_path: Path) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups") == 0
    assert backup(models, tmp_path / "backups", "--force") == 0
    assert len(Catalog(tmp_path / "backups").entries()) == 2


def test_dry_run_touches_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = make_models(tmp_path / "models")
    backups = tmp_path / "backups"
    assert backup(models, backups, "--dry-run") == 0
    assert not backups.exists()
    err = capsys.readouterr().err
    assert "would back up 4 files" in err and "nothing was changed" in err

    assert backup(models, backups) == 0
    interrupted = backups / ".mlwarden-staging-999999999-models-20200101T000000Z"
    interrupted.mkdir()
    (backups / "models-20200102T000000Z").mkdir()
    before = {p: p.stat().st_mtime_ns for p in backups.rglob("*")}
    assert backup(models, backups, "--dry-run", "--force", "--keep-last", "1") == 0
    assert {p: p.stat().st_mtime_ns for p in backups.rglob("*")} == before
    err = capsys.readouterr().err
    assert f"would remove {interrupted}" in err and "retention keeps" in err
    assert "models-20200102T000000Z has no manifest: not a backup, would be left alone" in err


def test_legacy_environment_names_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = make_models(tmp_path / "models")
    monkeypatch.setenv("MODEL_DIR", str(models))
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path / "backups"))
    monkeypatch.setenv("COMPRESSION_LEVEL", "5")
    monkeypatch.setenv("VERIFY_BACKUP", "false")
    from test_backup_support import mlwarden

    assert mlwarden("backup") == 0
    entry = only_entry(tmp_path / "backups")
    assert entry.manifest.level == 5
    assert entry.verified is None  # not verified: VERIFY_BACKUP=false


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compression", "gzip", "--level", "12"], "gzip levels are 1 to 9"),
        (["--level", "0"], "zstd levels are 1 to 19"),
        (["--compression", "lz4"], "invalid choice: 'lz4'"),
        (["--keep-daily", "-1"], "must be from 0"),
        (["--s3-endpoint-url", "ftp://x"], "http"),
    ],
)
def test_bad_settings_stop_with_exit_2_before_anything_is_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups", *argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "backups").exists()


def test_a_missing_model_dir_is_a_usage_error(tmp_path: Path) -> None:
    assert backup(tmp_path / "nope", tmp_path / "backups") == 2


def test_the_lock_prevents_overlapping_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = make_models(tmp_path / "models")
    (tmp_path / "backups").mkdir()
    with JobLock(tmp_path / "backups" / LOCK_FILE):
        assert backup(models, tmp_path / "backups") == 1
    assert "another run holds" in capsys.readouterr().err
    assert Catalog(tmp_path / "backups").entries() == []
    assert backup(models, tmp_path / "backups") == 0


def test_only_staging_directories_of_dead_runs_are_removed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = make_models(tmp_path / "models")
    backups = tmp_path / "backups"
    interrupted = backups / ".mlwarden-staging-999999999-models-20200101T000000Z"  # no such pid
    interrupted.mkdir(parents=True)
    (interrupted / ".models-20200101T000000Z.tar.zst.abc.tmp").write_bytes(b"partial")
    legacy_drill = backups / ".drill-k2j4h5g6"  # made before pids were in the names
    legacy_drill.mkdir()
    live = backups / f".drill-{os.getpid()}-abcdefgh"  # a live process's: not ours to remove
    live.mkdir()
    not_ours = backups / "holiday-photos"
    not_ours.mkdir()
    looks_like_a_backup = backups / "models-20200102T000000Z"  # e.g. its manifest was deleted
    (looks_like_a_backup / "models-20200102T000000Z.tar.zst").parent.mkdir()
    (looks_like_a_backup / "models-20200102T000000Z.tar.zst").write_bytes(b"a complete archive")
    assert backup(models, backups) == 0
    assert not interrupted.exists() and not legacy_drill.exists()
    assert live.exists() and not_ours.exists()
    assert (looks_like_a_backup / "models-20200102T000000Z.tar.zst").read_bytes() == b"a complete archive"
    assert len(Catalog(backups).entries()) == 1
    err = capsys.readouterr().err
    assert f"removing {interrupted}: left behind by a run that was killed" in err
    assert f"{looks_like_a_backup} has no manifest: not a backup, left alone" in err


def test_retention_deletes_old_backups_and_keeps_the_rules(tmp_path: Path) -> None:
    models = make_models(tmp_path / "models")
    backups = tmp_path / "backups"
    for _ in range(3):
        assert backup(models, backups, "--period", "run") == 0
    names = [e.name for e in Catalog(backups).entries()]
    assert backup(models, backups, "--period", "run", "--keep-last", "2") == 0
    kept = [e.name for e in Catalog(backups).entries()]
    assert len(kept) == 2
    assert names[0] not in kept and names[1] not in kept
    # The same models each time: the kept backups' content lives in the first backup's pack,
    # which stays as a pack (not a backup) while they name it; the later ones stored nothing
    # new, so they have no pack of their own, and the second is gone whole.
    assert not (backups / names[0] / "manifest.json").exists()
    assert {name for e in Catalog(backups).entries() for name in e.manifest.packs} == {names[0]}
    assert not (backups / names[1]).exists()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_leaves_no_partial_archive_and_no_damaged_earlier_backup(
    tmp_path: Path, small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = make_models(tmp_path / "models", weights_bytes=200_000)
    assert backup(models, small_disk) == 0
    earlier = only_entry(small_disk)
    earlier_files = tree(earlier.directory)
    (models / "shards" / "model-00003.safetensors").write_bytes(os.urandom(3 * 2**20))  # more than the disk holds
    assert backup(models, small_disk, "--force") == 1
    assert "no space left" in capsys.readouterr().err
    assert only_entry(small_disk).name == earlier.name
    assert Catalog(small_disk).incomplete() == []
    assert not any(p.name.endswith(".tmp") for p in small_disk.rglob("*"))
    assert tree(earlier.directory) == earlier_files
    from mlwarden.jobs.backup.verify import verify_archive

    assert verify_archive(earlier).ok


def test_kill_9_mid_backup_leaves_no_manifest_and_the_next_run_succeeds(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "big.bin").write_bytes(os.urandom(48 * 2**20))
    backups = tmp_path / "backups"
    argv = [sys.executable, "-m", "mlwarden.cli", "backup", "--model-dir", str(models), "--backup-dir", str(backups)]
    argv += ["--compression", "gzip", "--level", "9"]
    process = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.DEVNULL)

    def archive_being_written() -> bool:
        assert process.poll() is None, "the backup finished before it could be killed"
        return any(p.name.endswith(".tmp") for p in backups.rglob("*"))

    wait_until(archive_being_written, 60, "the archive's temporary file", poll=0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert Catalog(backups).entries() == []
    [left] = stale_staging(backups, BACKUP_DIR_STAGING)
    assert left.name.startswith(f".mlwarden-staging-{process.pid}-models-")
    assert Catalog(backups).incomplete() == []  # a staging directory is not mistaken for anything else
    assert not any(p.name == "manifest.json" for p in backups.rglob("*"))

    assert backup(models, backups) == 0
    assert only_entry(backups).verified is True
    assert stale_staging(backups, BACKUP_DIR_STAGING) == []
    assert Catalog(backups).incomplete() == []


def test_metrics_reach_the_pushgateway_and_a_failed_run_keeps_the_last_success(
    tmp_path: Path, pushgateway: components.Component
) -> None:
    forget_pushed(pushgateway.url, "mlwarden_backup")
    models = make_models(tmp_path / "models")
    backups = tmp_path / "backups"
    assert backup(models, backups, "--pushgateway", pushgateway.url) == 0
    metrics = pushed(pushgateway.url, "mlwarden_backup")
    assert metrics["mlwarden_job_success"] == 1
    assert metrics["mlwarden_backup_files"] == 4
    assert metrics["mlwarden_backup_verified"] == 1
    assert metrics["mlwarden_backup_read_bytes"] == sum(len(v) for v in tree(models).values())
    assert metrics["mlwarden_backup_written_bytes"] == only_entry(backups).manifest.archive_bytes
    assert "mlwarden_backup_offsite_success" not in metrics  # no S3 configured
    last_success = metrics["mlwarden_job_last_success_timestamp_seconds"]

    with JobLock(backups / LOCK_FILE):  # a run that cannot even start
        assert backup(models, backups, "--pushgateway", pushgateway.url) == 1
    metrics = pushed(pushgateway.url, "mlwarden_backup")
    assert metrics["mlwarden_job_success"] == 0
    assert metrics["mlwarden_job_last_success_timestamp_seconds"] == last_success
    assert metrics["mlwarden_job_last_run_timestamp_seconds"] > last_success


def test_an_unreachable_pushgateway_does_not_fail_a_good_backup(tmp_path: Path) -> None:
    models = make_models(tmp_path / "models")
    url = f"http://127.0.0.1:{components.free_port()}"
    assert backup(models, tmp_path / "backups", "--pushgateway", url) == 0


def test_textfile_metrics_pass_promtool(tmp_path: Path, promtool: str) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups", "--textfile-dir", tmp_path) == 0
    text = (tmp_path / "mlwarden_backup.prom").read_text()
    assert "mlwarden_backup_files 4.0" in text
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_retention_days_from_the_old_scripts_means_keep_daily() -> None:
    from mlwarden.jobs.backup.cli import BackupSettings

    from mlwarden import settings

    loaded = settings.load(BackupSettings, "backup", [], {"MODEL_DIR": "/m", "BACKUP_DIR": "/b", "RETENTION_DAYS": "14", "DRY_RUN": "1"})
    assert loaded.policy.keep_daily == 14 and loaded.policy.keep_last is None
    assert loaded.dry_run is True
    flagged = settings.load(BackupSettings, "backup", ["--keep-daily", "3"], {"MODEL_DIR": "/m", "BACKUP_DIR": "/b", "RETENTION_DAYS": "14"})
    assert flagged.policy.keep_daily == 3  # the flag wins over the legacy variable


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("under_systemd", [False, True])
def test_progress_is_a_bar_on_a_terminal_and_plain_log_lines_under_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, under_systemd: bool
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    if under_systemd:
        monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")  # set by systemd for every unit
    else:
        monkeypatch.delenv("INVOCATION_ID", raising=False)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # stderr is a TTY in both cases
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups") == 0
    assert mlwarden("restore", "--backup-dir", tmp_path / "backups", "--to", tmp_path / "restored") == 0

    err = terminal.getvalue()
    redraws = [line for line in err.split("\r\x1b[2K") if line.startswith(("backup models-", "restore models-"))]
    if under_systemd:
        assert redraws == [] and "\x1b" not in err
        progress = [line for line in err.splitlines() if "INFO mlwarden.progress: " in line]
        assert any("backup models-" in line and "100.0%" in line for line in progress)
        assert len(progress) <= 4  # sparse (one a minute, plus the last): two per run here
    else:
        assert any(r.startswith("backup models-") and "100.0%" in r and "/s" in r for r in redraws)
        assert any(r.startswith("restore models-") for r in redraws)
