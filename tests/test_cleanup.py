"""mlwarden cleanup on generated trees: what goes, what stays, and that nothing escapes the root."""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from mlwarden.jobs.cleanup import cli as cleanup_cli
from mlwarden.jobs.cleanup import delete, fileops, plan, rules, safety

from mlwarden import cli, settings
from mlwarden.exitcodes import ExitCode
from mlwarden.interrupts import sigterm_interrupts

DAY = 86400


def make(path: Path, age_days: float = 0, size: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    when = time.time() - age_days * DAY
    os.utime(path, (when, when))
    return path


def run_cleanup(root: Path, *flags: str, env: dict[str, str] | None = None) -> int:
    loaded = settings.load(cleanup_cli.CleanupSettings, "cleanup", ["--experiments-dir", str(root), "--yes", *flags], env or {})
    return cleanup_cli.run(loaded)


def existing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def pushed_value(pushgateway_url: str, metric: str) -> float:
    text = httpx.get(pushgateway_url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(metric + "{") and 'job="mlwarden_cleanup"' in line and f'instance="{socket.gethostname()}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{metric} not pushed:\n{text}")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "experiments"
    directory.mkdir()
    return directory


def test_old_files_go_new_files_stay_and_emptied_directories_are_removed(root: Path) -> None:
    make(root / "run-a" / "old.log", age_days=40)
    make(root / "run-a" / "logs" / "old.json", age_days=40)
    make(root / "run-b" / "fresh.log", age_days=1)
    make(root / "run-b" / "old.log", age_days=31)
    (root / "run-c-just-started").mkdir()

    assert run_cleanup(root) == ExitCode.OK

    assert existing(root) == {"run-b", "run-b/fresh.log", "run-c-just-started"}
    assert root.is_dir()  # never the root itself


def test_symlinks_are_neither_followed_nor_removed(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    make(outside / "precious.bin", age_days=100)
    make(root / "run" / "old.log", age_days=100)
    (root / "run" / "to-dir").symlink_to(outside)
    (root / "run" / "to-file").symlink_to(outside / "precious.bin")
    os.utime(root / "run" / "to-file", (0, 0), follow_symlinks=False)

    assert run_cleanup(root) == ExitCode.OK

    assert (outside / "precious.bin").exists()
    assert (root / "run" / "to-dir").is_symlink() and (root / "run" / "to-file").is_symlink()
    assert not (root / "run" / "old.log").exists()


@pytest.fixture
def nested_tmpfs(root: Path) -> Iterator[Path]:
    mount_point = root / "run" / "scratch"
    mount_point.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_nested_filesystem_is_not_entered(root: Path, nested_tmpfs: Path) -> None:
    make(nested_tmpfs / "old.bin", age_days=90)
    make(root / "run" / "old.log", age_days=90)

    assert run_cleanup(root) == ExitCode.OK

    assert (nested_tmpfs / "old.bin").exists()
    assert not (root / "run" / "old.log").exists()


@contextmanager
def bind_mounted(source: Path, mount_point: Path) -> Iterator[Path]:
    mount_point.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.parametrize("where", ["shared", "run/shared"])
def test_a_bind_mount_on_the_same_filesystem_is_not_entered(root: Path, tmp_path: Path, where: str) -> None:
    # Same device number as the root: only the mount ID tells that it leads outside.
    outside = tmp_path / "outside"
    precious = [make(outside / "old.bin", age_days=90), make(outside / "deep" / "old.bin", age_days=90)]
    make(root / "run" / "old.log", age_days=90)
    with bind_mounted(outside, root / where) as mount_point:
        assert os.stat(mount_point).st_dev == os.stat(root).st_dev
        for workers in ("1", "2"):
            assert run_cleanup(root, "--workers", workers) == ExitCode.OK
            assert all(p.exists() for p in precious)
            assert (mount_point / "old.bin").exists() and (mount_point / "deep").is_dir()
    assert not (root / "run" / "old.log").exists()


def test_a_file_bind_mounted_into_the_root_is_kept_not_an_error(root: Path, tmp_path: Path) -> None:
    precious = make(tmp_path / "outside" / "weights.bin", age_days=90)
    make(root / "run" / "weights.bin", age_days=1)
    make(root / "run" / "old.log", age_days=90)
    mount_point = root / "run" / "weights.bin"
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    subprocess.run(["mount", "--bind", str(precious), str(mount_point)], check=True)
    try:
        assert run_cleanup(root, "--textfile-dir", str(textfiles)) == ExitCode.OK
        assert mount_point.exists()
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
    assert precious.exists() and mount_point.exists()
    assert not (root / "run" / "old.log").exists()
    metrics = (textfiles / "mlwarden_cleanup.prom").read_text()
    assert 'mlwarden_cleanup_skipped_files{reason="a mount point"} 1.0' in metrics
    assert 'mlwarden_cleanup_skipped_files{reason="directory moved"} 0.0' in metrics


def test_mount_ids_come_from_statx_and_match_proc(root: Path, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    with bind_mounted(tmp_path / "outside", root / "bound") as mount_point:
        fds = [os.open(path, os.O_RDONLY | os.O_DIRECTORY) for path in (root, mount_point)]
        try:
            ids = [fileops.mount_id(fd) for fd in fds]
            assert ids == [fileops.fdinfo_mount_id(fd) for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
    assert ids[0] != ids[1]
    mountinfo_ids = {int(line.split()[0]) for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    assert ids[0] in mountinfo_ids


def _statx_without_mount_ids(fd: int, path: bytes, flags: int, mask: int, buffer: object) -> int:
    ctypes.memset(buffer, 0, fileops._STATX_SIZE)  # an older kernel: success, but STATX_MNT_ID not in the mask
    return 0


@pytest.mark.parametrize("statx", [None, _statx_without_mount_ids], ids=["no libc statx", "kernel without STATX_MNT_ID"])
def test_without_statx_mount_ids_the_fallback_still_fences_bind_mounts(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, statx: object,
) -> None:
    monkeypatch.setattr(fileops, "_statx", statx)
    precious = make(tmp_path / "outside" / "old.bin", age_days=90)
    with bind_mounted(tmp_path / "outside", root / "run" / "shared"):
        assert run_cleanup(root, "--workers", "1") == ExitCode.OK
        assert precious.exists()


def test_protected_globs_keep_markers_and_best_are_kept(root: Path) -> None:
    make(root / "run-a" / "config.yaml", age_days=90)
    make(root / "run-a" / "eval" / "report.txt", age_days=90)
    make(root / "run-a" / "noise.txt", age_days=90)
    make(root / "run-b" / ".mlwarden-keep", age_days=90)
    make(root / "run-b" / "deep" / "weights.bin", age_days=90)
    make(root / "run-c" / "model_best.pth", age_days=90)
    make(root / "run-c" / "best_model" / "weights.bin", age_days=90)

    assert run_cleanup(root, "--protect", "*.yaml", "--protect", "run-a/eval/*") == ExitCode.OK

    assert existing(root) == {
        "run-a", "run-a/config.yaml", "run-a/eval", "run-a/eval/report.txt",
        "run-b", "run-b/.mlwarden-keep", "run-b/deep", "run-b/deep/weights.bin",
        "run-c", "run-c/model_best.pth", "run-c/best_model", "run-c/best_model/weights.bin",
    }


def test_the_newest_checkpoints_of_each_run_are_kept_however_old(root: Path) -> None:
    for step in (1, 2, 3):
        make(root / "run-a" / "checkpoints" / f"step_{step}.pt", age_days=50 - step)
        make(root / "run-b" / f"checkpoint-{step}" / "model.safetensors", age_days=50 - step)
        make(root / "run-b" / f"checkpoint-{step}" / "optimizer.bin", age_days=50 - step)
    make(root / "run-c" / "checkpoint-9" / "model.safetensors", age_days=5)  # young, and the newest
    make(root / "run-c" / "checkpoint-1" / "model.safetensors", age_days=60)

    assert run_cleanup(root, "--keep-last-checkpoints", "2") == ExitCode.OK

    left = existing(root)
    assert {"run-a/checkpoints/step_3.pt", "run-a/checkpoints/step_2.pt"} <= left
    assert "run-a/checkpoints/step_1.pt" not in left
    assert {"run-b/checkpoint-3/model.safetensors", "run-b/checkpoint-3/optimizer.bin", "run-b/checkpoint-2/model.safetensors"} <= left
    assert "run-b/checkpoint-1" not in left
    assert {"run-c/checkpoint-9/model.safetensors", "run-c/checkpoint-1/model.safetensors"} <= left


def test_a_locked_file_and_a_locked_directory_are_kept(root: Path) -> None:
    locked_file = make(root / "run-a" / "writing.bin", age_days=90)
    make(root / "run-b" / "inside.bin", age_days=90)
    make(root / "run-a" / "free.bin", age_days=90)
    file_fd = os.open(locked_file, os.O_RDONLY)
    dir_fd = os.open(root / "run-b", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(file_fd, fcntl.LOCK_SH)  # even a reader's shared lock protects
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        assert run_cleanup(root) == ExitCode.OK
    finally:
        os.close(file_fd)
        os.close(dir_fd)
    assert locked_file.exists() and (root / "run-b" / "inside.bin").exists()
    assert not (root / "run-a" / "free.bin").exists()


def test_a_breaker_trip_deletes_nothing_exits_3_and_is_pushed(root: Path, pushgateway) -> None:
    for i in range(5):
        make(root / "run" / f"old-{i}.bin", age_days=90, size=1000)
    before = existing(root)

    started = time.time()
    assert run_cleanup(root, "--max-files", "4", "--pushgateway", pushgateway.url) == ExitCode.BREAKER
    assert existing(root) == before
    # Debian's Pushgateway persists to a shared file by default: make sure this run's push is read.
    assert pushed_value(pushgateway.url, "mlwarden_job_last_run_timestamp_seconds") >= started
    assert pushed_value(pushgateway.url, "mlwarden_cleanup_breaker_tripped") == 1
    assert pushed_value(pushgateway.url, "mlwarden_cleanup_planned_files") == 5
    assert pushed_value(pushgateway.url, "mlwarden_job_success") == 0

    assert run_cleanup(root, "--max-bytes", "4kB") == ExitCode.BREAKER
    assert existing(root) == before

    assert run_cleanup(root, "--max-files", "5", "--pushgateway", pushgateway.url) == ExitCode.OK
    assert existing(root) == set()  # the emptied run directory went too
    assert pushed_value(pushgateway.url, "mlwarden_cleanup_breaker_tripped") == 0
    assert pushed_value(pushgateway.url, "mlwarden_cleanup_deleted_files") == 5
    assert pushed_value(pushgateway.url, "mlwarden_cleanup_freed_bytes") == 5000


def test_dry_run_prints_the_plan_and_deletes_nothing(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make(root / "run" / "old.bin", age_days=90, size=123)
    make(root / "run" / "new.bin", age_days=1)
    before = existing(root)

    assert run_cleanup(root, env={"DRY_RUN": "1"}) == ExitCode.OK

    assert existing(root) == before
    out = capsys.readouterr().out
    assert f"delete {root}/run/old.bin\t123\t" in out and "new.bin" not in out


def pushed_or_none(pushgateway_url: str, metric: str) -> float | None:
    try:
        return pushed_value(pushgateway_url, metric)
    except AssertionError:
        return None


def test_a_dry_run_pushes_no_success_and_cannot_hide_a_failed_cleanup(root: Path, tmp_path: Path, pushgateway) -> None:
    # A failed real run (another process holds the root), then a dry run: JobLate
    # reads the last success, so the dry run must leave the failure standing.
    make(root / "run" / "old.bin", age_days=90)
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert run_cleanup(root, "--pushgateway", pushgateway.url, "--textfile-dir", str(textfiles)) == ExitCode.FAILURE
    finally:
        os.close(fd)
    failed_at = pushed_value(pushgateway.url, "mlwarden_job_last_run_timestamp_seconds")
    failed_textfile = (textfiles / "mlwarden_cleanup.prom").read_text()

    assert run_cleanup(root, "--dry-run", "--pushgateway", pushgateway.url, "--textfile-dir", str(textfiles)) == ExitCode.OK

    assert (root / "run" / "old.bin").exists()
    assert pushed_value(pushgateway.url, "mlwarden_job_success") == 0
    assert pushed_or_none(pushgateway.url, "mlwarden_job_last_success_timestamp_seconds") is None
    assert pushed_value(pushgateway.url, "mlwarden_job_last_run_timestamp_seconds") == failed_at
    assert (textfiles / "mlwarden_cleanup.prom").read_text() == failed_textfile


def test_dry_run_prints_the_plan_when_a_breaker_trips(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The runbook's answer to a tripped breaker is to read the --dry-run plan.
    for i in range(3):
        make(root / "run" / f"old-{i}.bin", age_days=90)
    before = existing(root)

    assert run_cleanup(root, "--dry-run", "--max-files", "2") == ExitCode.BREAKER

    assert existing(root) == before
    out = capsys.readouterr().out
    assert all(f"delete {root}/run/old-{i}.bin\t10\t" in out for i in range(3))


@pytest.fixture
def walking_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a refusal ever regress, the test fails before a system directory is walked or
    anything in it deleted (pytest.fail is a BaseException: the command's handler lets it through)."""
    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail("a root that must be refused was walked")

    monkeypatch.setattr(plan, "build", refuse)
    monkeypatch.setattr(delete, "execute", refuse)


@pytest.mark.usefixtures("walking_fails")
@pytest.mark.parametrize(
    "bad_root",
    ["/", "/home", "/etc", "/usr", "/var", "/root", "/opt", "/tmp/../etc", "", "relative/dir", "HOME",
     "/etc/ssl", "/etc/systemd", "/usr/share", "/usr/local", "/var/lib/apt", "/var/lib/dpkg", "/var/cache", "/dev/shm",
     "/var/cache/apt/archives", "/boot", "/proc/self", "/sys/fs", "/run/lock", "/lib", "/lib64", "/usr/lib/x86_64-linux-gnu",
     # trees other tools own and age out by their own policy
     "/var/log/journal", "/var/log/apt", "/var/log/experiments", "/var/spool", "/var/spool/cron/crontabs", "/var/mail",
     "/var/mail/alice", "/var/backups", "/var/backups/mlwarden", "/var/opt/app", "/var/local/site"],
)
def test_dangerous_or_relative_roots_are_refused_with_exit_2(bad_root: str, capsys: pytest.CaptureFixture[str]) -> None:
    if bad_root == "HOME":
        bad_root = os.environ["HOME"]
    assert cli.main(["cleanup", "--experiments-dir", bad_root, "--yes"]) == ExitCode.USAGE
    assert "experiments-dir" in capsys.readouterr().err


@pytest.mark.usefixtures("walking_fails")
@pytest.mark.parametrize("system_dir", ["/etc/ssl", "/etc/systemd", "/usr/share", "/usr/local", "/var/lib/apt", "/var/lib/dpkg", "/var/cache"])
def test_system_subdirectories_are_refused_before_anything_is_read(system_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(os.listdir(system_dir))

    argv = ["cleanup", "--experiments-dir", system_dir, "--yes", "--retention-days", "0.0001", "--max-files", "1000000000"]
    assert cli.main(argv) == ExitCode.USAGE

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"refusing to clean {system_dir}: " in err[0] and "a system directory" in err[0]
    assert sorted(os.listdir(system_dir)) == before


def test_a_root_in_dev_shm_is_refused_and_nothing_goes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Our own directory in /dev/shm: should the refusal regress, only the test's file is lost.
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        old = make(shm / "run" / "old.bin", age_days=90)
        (tmp_path / "link").symlink_to(shm)
        for root in (shm, tmp_path / "link"):
            assert cli.main(["cleanup", "--experiments-dir", str(root), "--yes"]) == ExitCode.USAGE
            assert f"refusing to clean {shm}" in capsys.readouterr().err
            assert old.exists()
    finally:
        shutil.rmtree(shm)


@pytest.mark.usefixtures("walking_fails")
def test_a_symlink_into_a_system_tree_is_resolved_and_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "link").symlink_to("/etc/systemd")
    assert cli.main(["cleanup", "--experiments-dir", str(tmp_path / "link"), "--yes"]) == ExitCode.USAGE
    assert f"refusing to clean /etc/systemd (from {tmp_path}/link): it lies under /etc" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("path", "refused"),
    [("/opt", True), ("/opt/experiments", False), ("/home/alice", True), ("/home/alice/experiments", False),
     ("/root", True), ("/root/experiments", False), ("/srv", True), ("/srv/experiments", False), ("/data/runs", False),
     ("/var/lib/mlwarden/experiments", True), ("/libx32", True), ("/var/log", True), ("/var/log/train", True),
     ("/var/spool/x", True), ("/var/tmp/experiments", False), ("/var/experiments", False)],
)
def test_what_is_refused_and_what_is_fine(path: str, refused: bool) -> None:
    assert (safety.refusal(Path(path)) is not None) is refused


def test_shell_variable_names_are_honoured(root: Path) -> None:
    loaded = settings.load(
        cleanup_cli.CleanupSettings, "cleanup", [],
        {"EXPERIMENTS_DIR": str(root), "RETENTION_DAYS": "7", "DRY_RUN": "true"},
    )
    assert loaded.experiments_dir == [root.resolve()] and loaded.retention_days == 7 and loaded.dry_run


def test_missing_and_overlapping_roots_are_configuration_errors(root: Path) -> None:
    (root / "inner").mkdir()
    with pytest.raises(settings.SettingsError, match="required"):
        settings.load(cleanup_cli.CleanupSettings, "cleanup", [], {})
    with pytest.raises(settings.SettingsError, match="overlap"):
        settings.load(cleanup_cli.CleanupSettings, "cleanup", ["--experiments-dir", str(root), "--experiments-dir", str(root / "inner")], {})
    with pytest.raises(settings.SettingsError, match="files per second"):
        settings.load(cleanup_cli.CleanupSettings, "cleanup", ["--experiments-dir", str(root), "--rate-limit", "fast"], {})


def test_a_directory_swapped_for_a_symlink_after_planning_cannot_lead_outside(root: Path, tmp_path: Path) -> None:
    make(root / "run" / "logs" / "a.log", age_days=90)
    make(root / "run" / "logs" / "b.log", age_days=90)
    outside = tmp_path / "outside"
    victims = [make(outside / "a.log", age_days=90), make(outside / "b.log", age_days=90)]
    planned = plan.build(root, plan.PlanRules(time.time() - 30 * DAY, 1, rules.Protection([])))
    assert sorted(f.relative for f in planned.files) == ["run/logs/a.log", "run/logs/b.log"]

    for name in ("a.log", "b.log"):
        (root / "run" / "logs" / name).unlink()
    (root / "run" / "logs").rmdir()
    (root / "run" / "logs").symlink_to(outside)
    # An old file of the same name one level up must not be hit through a half-open path.
    bystander = make(root / "run" / "b.log", age_days=90)
    result = delete.execute(planned)

    assert all(v.exists() for v in victims) and bystander.exists()
    assert result.files == 0 and result.errors == 2
    assert (root / "run" / "logs").is_symlink()


def test_a_file_replaced_or_touched_after_planning_is_kept(root: Path) -> None:
    replaced = make(root / "run" / "a.bin", age_days=90)
    touched = make(root / "run" / "b.bin", age_days=90)
    planned = plan.build(root, plan.PlanRules(time.time() - 30 * DAY, 1, rules.Protection([])))
    os.replace(make(root / "run" / "a.new", age_days=90), replaced)  # same name, new inode
    touched.write_bytes(b"new data")

    result = delete.execute(planned)

    assert replaced.exists() and touched.exists()
    assert result.skipped == {"replaced": 1, "modified": 1}


class MoveOutAfterFirstDeletion:
    """A progress sink that moves a directory out of the root once a file in it is gone:
    the operator rescuing a run while the cleanup is busy in it."""

    def __init__(self, directory: Path, destination: Path) -> None:
        self.directory, self.destination = directory, destination
        self.files = sum(1 for p in directory.rglob("*") if p.is_file())
        self.moved_after = 0

    def advance(self, amount: float) -> None:
        if not self.moved_after and self.directory.exists():
            left = sum(1 for p in self.directory.rglob("*") if p.is_file())
            if left < self.files:
                self.directory.rename(self.destination)
                self.moved_after = self.files - left


@pytest.mark.parametrize(("rate_limit", "lost_after_move"), [(0.0, delete.VERIFY_EVERY - 1), (1e6, 0)], ids=["batches", "rate-limited"])
def test_a_directory_moved_out_of_the_root_during_deletion_is_no_longer_touched(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, rate_limit: float, lost_after_move: int,
) -> None:
    # The chain is re-checked before each batch (VERIFY_EVERY files, or each file under a
    # rate limit): at most one batch goes after the move, never the rest of the directory.
    for i in range(40):
        make(root / "run" / "logs" / f"{i:02d}.log", age_days=90)
    for i in range(5):
        make(root / "run" / "logs" / "deep" / f"{i}.json", age_days=90)
    for i in range(5):
        make(root / "run" / "other" / f"{i}.log", age_days=90)
    planned = plan.build(root, plan.PlanRules(time.time() - 30 * DAY, 1, rules.Protection([])))
    assert len(planned.files) == 50
    safe = tmp_path / "rescued"
    hook = MoveOutAfterFirstDeletion(root / "run" / "logs", safe)

    result = delete.execute(planned, rate_limit, progress=hook)  # type: ignore[arg-type]  # a test double: the hook moves a directory, beyond the Progress protocol

    assert hook.moved_after == 1
    survivors = sum(1 for p in safe.rglob("*") if p.is_file())
    assert 45 - 1 - lost_after_move <= survivors < 45
    if not lost_after_move:
        assert survivors == 44  # everything but the file deleted before the move
    assert result.skipped == {delete.SKIPPED_MOVED: survivors} and result.errors == 0
    assert result.files == 45 - survivors + 5 and not (root / "run" / "other").exists()
    assert f"{root}/run/logs is no longer where the plan found it" in caplog.text


def test_a_root_moved_away_during_deletion_stops_its_cleanup(root: Path, tmp_path: Path) -> None:
    for run in ("run-a", "run-b"):
        for i in range(3):
            make(root / run / f"{i}.log", age_days=90)
    planned = plan.build(root, plan.PlanRules(time.time() - 30 * DAY, 1, rules.Protection([])))
    hook = MoveOutAfterFirstDeletion(root, tmp_path / "moved-root")

    result = delete.execute(planned, progress=hook)  # type: ignore[arg-type]  # a test double: the hook moves a directory, beyond the Progress protocol

    # The rest of the first run's batch may go; the next directory is never entered.
    assert result.errors == 1 and result.files <= 3
    assert sum(1 for p in (tmp_path / "moved-root").rglob("*") if p.is_file()) == 6 - result.files


def test_two_cleanups_of_one_root_never_overlap(root: Path) -> None:
    make(root / "run" / "old.bin", age_days=90)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert run_cleanup(root) == ExitCode.FAILURE
    finally:
        os.close(fd)
    assert (root / "run" / "old.bin").exists()


def test_the_rate_limit_spaces_deletions(root: Path) -> None:
    for i in range(3):
        make(root / "run" / f"old-{i}.bin", age_days=90)
    assert cleanup_cli.parse_rate("20/s") == 20.0
    assert run_cleanup(root, "--rate-limit", "200/s") == ExitCode.OK
    assert not (root / "run").exists()


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, ExitCode.TERMINATED), (signal.SIGINT, ExitCode.INTERRUPTED)])
def test_a_signal_stops_deletion_pushes_the_failure_and_exits_128_plus_it(
    root: Path, tmp_path: Path, pushgateway, signum: int, status: int
) -> None:
    # systemd stops a unit with SIGTERM: it must end the run as Ctrl-C does, not kill it unreported.
    files = 300
    for i in range(files):
        make(root / "run" / f"old-{i:03d}.bin", age_days=90)
    log_path = tmp_path / "cleanup.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlwarden.cli", "cleanup", "--experiments-dir", str(root), "--yes",
             "--rate-limit", "100/s", "--pushgateway", pushgateway.url],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while len(os.listdir(root / "run")) == files and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            process.send_signal(signum)
            assert process.wait(timeout=60) == status
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    deleted = files - len(os.listdir(root / "run"))
    assert 0 < deleted < files
    assert ("stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted") in log_path.read_text()
    assert pushed_value(pushgateway.url, "mlwarden_job_success") == 0
    assert pushed_or_none(pushgateway.url, "mlwarden_job_last_success_timestamp_seconds") is None
    assert pushed_value(pushgateway.url, "mlwarden_cleanup_deleted_files") == deleted
    assert pushed_value(pushgateway.url, "mlwarden_cleanup_planned_files") == files


def test_a_signal_right_after_an_unlink_still_counts_that_file(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The signal lands between the unlink and its count, the window a KeyboardInterrupt
    # raised on the spot would leave uncounted.
    for i in range(10):
        make(root / "run" / f"old-{i}.bin", age_days=90, size=100)
    planned = plan.build(root, plan.PlanRules(time.time() - 30 * DAY, 1, rules.Protection([])))
    real_unlink = os.unlink
    calls = 0

    def unlink_then_signal(name: str, *, dir_fd: int | None = None) -> None:
        nonlocal calls
        real_unlink(name, dir_fd=dir_fd)
        calls += 1
        if calls == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "unlink", unlink_then_signal)
    result = delete.DeleteResult()
    with sigterm_interrupts(), pytest.raises(KeyboardInterrupt):
        delete.execute(planned, result=result)
    monkeypatch.undo()

    assert len(os.listdir(root / "run")) == 7
    assert (result.files, result.bytes) == (3, 300)


def test_the_exposed_metrics_pass_promtool(root: Path, tmp_path: Path, promtool: str) -> None:
    make(root / "run" / "old.bin", age_days=90)
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    assert run_cleanup(root, "--textfile-dir", str(textfiles)) == ExitCode.OK
    text = (textfiles / "mlwarden_cleanup.prom").read_text()
    assert "mlwarden_cleanup_deleted_files 1.0" in text and "mlwarden_cleanup_breaker_tripped 0.0" in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("answer", "deleted"), [("n", False), ("", False), ("y", True)])
def test_on_a_terminal_without_yes_it_asks_first(root: Path, monkeypatch: pytest.MonkeyPatch, answer: str, deleted: bool) -> None:
    old = make(root / "run" / "old.bin", age_days=90)
    questions: list[str] = []
    monkeypatch.setattr(cleanup_cli, "interactive", lambda: True)
    monkeypatch.setattr(cleanup_cli.sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt: questions.append(prompt) or answer)
    loaded = settings.load(cleanup_cli.CleanupSettings, "cleanup", ["--experiments-dir", str(root)], {})

    assert cleanup_cli.run(loaded) == ExitCode.OK

    assert questions == ["Delete 1 files (10 B)? [y/N] "]
    assert old.exists() is not deleted


def test_workers_sharing_the_runs_plan_exactly_what_one_walker_plans(root: Path, tmp_path: Path) -> None:
    for r in range(7):
        run = root / f"run-{r}"
        for step in (1, 2, 3):
            make(run / "checkpoints" / f"step_{step}.pt", age_days=60 - step)
            make(run / f"checkpoint-{step}" / "model.safetensors", age_days=60 - step)
        make(run / "logs" / "old.log", age_days=90)
        make(run / "logs" / "new.log", age_days=1)
        make(run / "config.yaml", age_days=90)
        make(run / "model_best.pth", age_days=90)
        (run / "empty-old").mkdir()
        os.utime(run / "empty-old", (time.time() - 90 * DAY,) * 2)
        (run / "link").symlink_to(tmp_path)
    make(root / "run-3" / ".mlwarden-keep", age_days=90)
    for step in (1, 2):  # checkpoints in the root belong to the root's own run, whichever worker finds them
        make(root / f"step_{step}.pt", age_days=60 - step)
    make(root / "stray.bin", age_days=90)

    def planned(workers: int) -> tuple[list[plan.Doomed], list[str], dict[str, int]]:
        rules_ = plan.PlanRules(time.time() - 30 * DAY, 2, rules.Protection(["*.yaml"]))
        result = plan.build(root, rules_, workers)
        return sorted(result.files), result.directories, dict(result.kept)

    files, directories, kept = planned(1)
    # Each of the 6 unmarked runs loses old.log and 4 of its 6 checkpoints; the root's own run keeps both of its.
    assert len(files) == 6 * 5 + 1 and "stray.bin" in {f.relative for f in files}
    for workers in (2, 3, 8):
        parallel_files, parallel_directories, parallel_kept = planned(workers)
        assert parallel_files == files and parallel_kept == kept
        assert sorted(parallel_directories) == sorted(directories)
        for i, directory in enumerate(parallel_directories):  # still children before their parents
            assert not any(d.startswith(directory + "/") for d in parallel_directories[i + 1:])


def test_the_workers_setting(root: Path) -> None:
    loaded = settings.load(cleanup_cli.CleanupSettings, "cleanup", ["--experiments-dir", str(root)], {})
    assert loaded.walk_workers == cleanup_cli.automatic_workers() == min(len(os.sched_getaffinity(0)), 8)
    loaded = settings.load(cleanup_cli.CleanupSettings, "cleanup", ["--experiments-dir", str(root), "--workers", "3"], {})
    assert loaded.walk_workers == 3
    with pytest.raises(settings.SettingsError, match="--workers"):
        settings.load(cleanup_cli.CleanupSettings, "cleanup", ["--experiments-dir", str(root), "--workers", "-1"], {})
