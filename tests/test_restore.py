"""Restore: hash checked before extraction, strict members, all-or-nothing target, from S3, and drills."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from mlwarden.jobs.backup import job as job_module
from mlwarden.jobs.backup import restore as restore_module
from mlwarden.jobs.backup.job import LOCK_FILE
from test_backup_support import backup, flip_byte, forget_pushed, make_models, mlwarden, only_entry, pushed, s3_env, tree  # noqa: F401 (s3_env: a fixture)

from mlwarden import components
from mlwarden.catalog import Catalog, FileRecord, Manifest


def restore(*argv: str | Path) -> int:
    return mlwarden("restore", *argv)


def test_restore_latest_and_by_name_gives_back_every_file(tmp_path: Path) -> None:
    models = make_models(tmp_path / "models")
    (models / "run.sh").write_text("#!/bin/sh\n")
    (models / "run.sh").chmod(0o755)
    assert backup(models, tmp_path / "backups") == 0
    name = only_entry(tmp_path / "backups").name
    assert restore("--backup-dir", tmp_path / "backups", "--to", tmp_path / "latest") == 0
    assert restore(name, "--backup-dir", tmp_path / "backups", "--to", tmp_path / "named") == 0
    assert tree(tmp_path / "latest") == tree(models) == tree(tmp_path / "named")
    assert (tmp_path / "latest" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_a_flipped_byte_is_refused_before_anything_is_extracted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups") == 0
    flip_byte(only_entry(tmp_path / "backups").archive_path)
    assert restore("--backup-dir", tmp_path / "backups", "--to", tmp_path / "restored") == 1
    assert "damaged; nothing was extracted" in capsys.readouterr().err
    assert not (tmp_path / "restored").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_non_empty_target_is_left_alone_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups") == 0
    target = tmp_path / "serving"
    target.mkdir()
    (target / "keep-me.txt").write_text("precious")
    assert restore("--backup-dir", tmp_path / "backups", "--to", target) == 1
    assert "not empty" in capsys.readouterr().err
    assert tree(target) == {"keep-me.txt": b"precious"}
    assert restore("--backup-dir", tmp_path / "backups", "--to", target, "--force") == 0
    assert tree(target) == tree(models)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backups", "models", "serving"]


@pytest.fixture
def umask() -> Iterator[None]:
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


def test_restored_files_keep_their_permission_bits_less_setuid_and_the_umask(tmp_path: Path, umask: None) -> None:
    models = make_models(tmp_path / "models")
    (models / "shared.json").write_text("{}")
    (models / "shared.json").chmod(0o664)
    (models / "tool").write_text("#!/bin/sh\n")
    (models / "tool").chmod(0o4755)
    assert (models / "tool").stat().st_mode & 0o7777 == 0o4755
    assert backup(models, tmp_path / "backups") == 0
    modes = {f.path: f.mode for f in only_entry(tmp_path / "backups").manifest.files}
    assert (modes["shared.json"], modes["tool"]) == (0o664, 0o4755)  # the archive keeps them all

    def restored_modes(target: Path, mask: int) -> tuple[int, int, int]:
        os.umask(mask)
        assert restore("--backup-dir", tmp_path / "backups", "--to", target) == 0
        return tuple(p.stat().st_mode & 0o7777 for p in (target / "shared.json", target / "tool", target))  # type: ignore[return-value]  # three modes from a three-element generator

    assert restored_modes(tmp_path / "group-writable", 0o002) == (0o664, 0o755, 0o775)
    assert restored_modes(tmp_path / "private", 0o027) == (0o640, 0o750, 0o750)


def _fail_renames(monkeypatch: pytest.MonkeyPatch, *fragments: str) -> None:
    """Make os.rename fail for a source whose name contains one of ``fragments``; others pass."""
    real_rename = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        if any(fragment in Path(src).name for fragment in fragments):
            raise OSError(errno.EIO, "simulated I/O error", str(src))
        real_rename(src, dst)

    monkeypatch.setattr(restore_module.os, "rename", rename)


def test_force_puts_the_old_content_back_when_the_new_cannot_take_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert backup(make_models(tmp_path / "models"), tmp_path / "backups") == 0
    target = tmp_path / "serving"
    target.mkdir()
    (target / "keep-me.txt").write_text("precious")
    _fail_renames(monkeypatch, ".serving.restore-")  # the second rename: new content into place
    assert restore("--backup-dir", tmp_path / "backups", "--to", target, "--force") == 1
    assert "its previous content was put back" in capsys.readouterr().err
    assert tree(target) == {"keep-me.txt": b"precious"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backups", "models", "serving"]


def test_a_swap_that_cannot_be_undone_says_in_one_line_where_both_contents_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups") == 0
    target = tmp_path / "serving"
    target.mkdir()
    (target / "keep-me.txt").write_text("precious")
    _fail_renames(monkeypatch, ".serving.restore-", ".serving.replaced-")  # the swap, then its undo
    assert restore("--backup-dir", tmp_path / "backups", "--to", target, "--force") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [old] = tmp_path.glob(".serving.replaced-*")
    [staging] = tmp_path.glob(".serving.restore-*")
    assert tree(old) == {"keep-me.txt": b"precious"}
    assert tree(staging) == tree(models)  # the verified restore is kept, not cleaned up
    assert not target.exists()
    [line] = [line for line in err.splitlines() if "restore FAILED" in line]
    assert str(old) in line and str(staging) in line and "by hand" in line


def test_an_unknown_backup_name_is_a_clear_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "backups").mkdir()
    assert restore("nope-20200101T000000Z", "--backup-dir", tmp_path / "backups", "--to", tmp_path / "x") == 1
    assert "no backup named" in capsys.readouterr().err
    assert restore("--backup-dir", tmp_path / "backups") == 2  # no --to and no --drill


def test_a_target_that_cannot_be_made_is_a_clear_failure_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backup(make_models(tmp_path / "models"), tmp_path / "backups")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert restore("latest", "--backup-dir", tmp_path / "backups", "--to", blocker / "restored") == 1
    err = capsys.readouterr().err
    assert "restore FAILED" in err and "Traceback" not in err
    assert blocker.read_text() == "not a directory"


def _crafted_backup(backup_dir: Path, members: list[tuple[tarfile.TarInfo, bytes]], listed: list[str]) -> Path:
    """A backup whose manifest vouches for the archive's hash, so only the member checks can refuse it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    blob = buffer.getvalue()
    name = "crafted-20200101T000000Z"
    directory = backup_dir / name
    directory.mkdir(parents=True)
    (directory / f"{name}.tar").write_bytes(blob)
    files = tuple(FileRecord(path=p, size=3, sha256=hashlib.sha256(b"bad").hexdigest(), mtime=0.0) for p in listed)
    Catalog.commit(
        directory,
        Manifest(
            name=name, source="/models", host="h", started_at=time.time(), finished_at=time.time(), compression="none",
            level=None, archive=f"{name}.tar", archive_bytes=len(blob), archive_sha256=hashlib.sha256(blob).hexdigest(),
            total_bytes=3 * len(listed), files=files,
        ),
    )
    return directory


def _file(name: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = 3
    return info, b"bad"


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, b""


@pytest.mark.parametrize(
    ("members", "listed", "reason"),
    [
        ([_file("../escaped.txt")], ["../escaped.txt"], "'..'"),
        ([_file("ok/../../escaped.txt")], ["ok/../../escaped.txt"], "'..'"),
        ([_file("/tmp/absolute.txt")], ["/tmp/absolute.txt"], "absolute"),
        ([_link("weights", "/etc"), _file("weights/passwd")], ["weights/passwd"], "only regular files"),
        ([_link("up", "../../.."), _file("up/escaped.txt")], ["up/escaped.txt"], "only regular files"),
        ([_link("hard", "/etc/passwd", tarfile.LNKTYPE)], [], "only regular files"),
        ([_file("unlisted.txt")], [], "not listed in the manifest"),
    ],
)
def test_crafted_archives_are_refused_and_nothing_escapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], members: list[tuple[tarfile.TarInfo, bytes]], listed: list[str], reason: str
) -> None:
    backups = tmp_path / "area" / "backups"
    _crafted_backup(backups, members, listed)
    target = tmp_path / "area" / "restore" / "here"
    assert restore("--backup-dir", backups, "--to", target) == 1
    assert reason in capsys.readouterr().err
    assert not target.exists()
    assert not (tmp_path / "area" / "restore" / "escaped.txt").exists()
    assert not (tmp_path / "area" / "escaped.txt").exists()
    assert sorted(p.name for p in (tmp_path / "area" / "restore").iterdir()) == []


def test_restore_from_s3_after_the_machine_lost_its_disk(tmp_path: Path, s3_env: list[str]) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups", *s3_env) == 0
    expected = tree(models)
    shutil.rmtree(tmp_path / "backups")
    shutil.rmtree(models)
    assert restore("latest", "--from-s3", *s3_env, "--to", models) == 0
    assert tree(models) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # the download was cleaned up


def test_a_restore_from_s3_downloads_next_to_the_target_not_into_the_backup_dir(
    tmp_path: Path, s3_env: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlwarden import catalog

    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups", *s3_env) == 0
    made_in: list[Path] = []
    mkdtemp = catalog.tempfile.mkdtemp

    def recording_mkdtemp(**kwargs: str | Path) -> str:
        made_in.append(Path(kwargs["dir"]))
        return mkdtemp(**kwargs)  # type: ignore[arg-type]  # the keywords mkdtemp was called with, passed on unchanged

    monkeypatch.setattr(catalog.tempfile, "mkdtemp", recording_mkdtemp)
    target = tmp_path / "other-disk" / "models"
    assert restore("latest", "--from-s3", *s3_env, "--backup-dir", tmp_path / "backups", "--to", target) == 0
    assert tree(target) == tree(models)
    assert made_in == [target.parent, target.parent]  # the download, then the staging directory


def test_a_damaged_object_in_s3_is_refused(tmp_path: Path, s3_env: list[str], s3_server: components.S3Server,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups", *s3_env) == 0
    entry = only_entry(tmp_path / "backups")
    flip_byte(entry.archive_path)
    s3 = boto3.client("s3", endpoint_url=s3_server.url)
    s3.put_object(Bucket=s3_env[1], Key=f"fleet/node-7/{entry.name}/{entry.manifest.archive}", Body=entry.archive_path.read_bytes())
    assert restore(entry.name, "--from-s3", *s3_env, "--to", tmp_path / "restored") == 1
    assert "damaged" in capsys.readouterr().err
    assert not (tmp_path / "restored").exists()


def test_a_drill_proves_the_latest_backup_restorable_and_pushes_it(tmp_path: Path, pushgateway: components.Component) -> None:
    forget_pushed(pushgateway.url, "mlwarden_restore_drill")
    models = make_models(tmp_path / "models")
    backups = tmp_path / "backups"
    assert backup(models, backups) == 0
    assert restore("--drill", "--backup-dir", backups, "--pushgateway", pushgateway.url) == 0
    metrics = pushed(pushgateway.url, "mlwarden_restore_drill")
    assert metrics["mlwarden_job_success"] == 1
    assert metrics["mlwarden_restore_drill_verified_files"] == 4
    assert metrics["mlwarden_restore_drill_duration_seconds"] > 0
    assert [p.name for p in backups.iterdir() if p.name.startswith(".drill")] == []
    last_success = metrics["mlwarden_job_last_success_timestamp_seconds"]

    flip_byte(only_entry(backups).archive_path)
    assert restore("--drill", "--backup-dir", backups, "--pushgateway", pushgateway.url) == 1
    metrics = pushed(pushgateway.url, "mlwarden_restore_drill")
    assert metrics["mlwarden_job_success"] == 0
    assert metrics["mlwarden_restore_drill_verified_files"] == 0
    assert metrics["mlwarden_job_last_success_timestamp_seconds"] == last_success


def test_a_drill_from_s3(tmp_path: Path, s3_env: list[str]) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups", *s3_env) == 0
    assert restore("--drill", "--from-s3", *s3_env, "--backup-dir", tmp_path / "backups") == 0
    assert [p.name for p in (tmp_path / "backups").iterdir() if p.name.startswith(".")] == [".mlwarden-backup.lock"]


def test_glacier_copies_are_checked_by_metadata_and_a_restore_says_what_to_do(
    tmp_path: Path, s3_env: list[str], s3_server: components.S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups", *s3_env, "--s3-storage-class", "GLACIER") == 0
    entry = only_entry(tmp_path / "backups")
    assert entry.status.offsite is not None and entry.status.offsite.storage_class == "GLACIER" and entry.status.offsite.verified
    head = boto3.client("s3", endpoint_url=s3_server.url).head_object(Bucket=s3_env[1], Key=entry.status.offsite.key)
    assert head["StorageClass"] == "GLACIER"
    assert restore("latest", "--from-s3", *s3_env, "--to", tmp_path / "restored") == 1
    err = capsys.readouterr().err
    assert "restore-object" in err
    assert "attempt" not in err  # an archived object needs a restore request, not retries
    assert not (tmp_path / "restored").exists()


@contextlib.contextmanager
def lock_held_by_another_process(lock_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A real holder of the backup lock in its own process; it exits (dropping the lock) on a line to stdin."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from mlwarden.lock import JobLock
            JobLock({str(lock_path)!r}).acquire()
            print("held", flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_drill_fails_with_one_clear_line_while_a_backup_holds_the_lock_past_the_wait(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backups = tmp_path / "backups"
    assert backup(make_models(tmp_path / "models"), backups) == 0
    (tmp_path / "metrics").mkdir()
    with lock_held_by_another_process(backups / LOCK_FILE) as holder:
        code = restore("--drill", "--backup-dir", backups, "--lock-wait", "0", "--textfile-dir", tmp_path / "metrics")
    assert code == 1
    [line] = [line for line in capsys.readouterr().err.splitlines() if "restore drill" in line]
    assert "not started: another run holds" in line and f"pid {holder.pid}" in line and "--lock-wait" in line
    assert "mlwarden_job_success 0" in (tmp_path / "metrics" / "mlwarden_restore_drill.prom").read_text()
    assert [p.name for p in backups.iterdir() if p.name.startswith(".drill")] == []


class _ReleaseWhenWaiting(logging.Handler):
    """Lets the lock holder go only once the drill has said it is waiting for it."""

    def __init__(self, holder: subprocess.Popen[str]) -> None:
        super().__init__()
        self.holder = holder
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting" in record.getMessage() and not self.seen:
            self.seen = True
            assert self.holder.stdin is not None
            self.holder.stdin.write("go\n")
            self.holder.stdin.flush()


def test_a_drill_waits_for_a_running_backup_then_checks_it(tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    assert backup(make_models(tmp_path / "models"), backups) == 0
    with lock_held_by_another_process(backups / LOCK_FILE) as holder:
        release = _ReleaseWhenWaiting(holder)
        logging.getLogger(job_module.__name__).addHandler(release)
        try:
            assert restore("--drill", "--backup-dir", backups, "--lock-wait", "2m") == 0
        finally:
            logging.getLogger(job_module.__name__).removeHandler(release)
        assert release.seen
        assert holder.wait(timeout=10) == 0


def test_a_backup_does_not_start_while_a_drill_holds_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    models = make_models(tmp_path / "models")
    backups = tmp_path / "backups"
    assert backup(models, backups, "--keep-last", "1") == 0
    drilled = only_entry(backups).name
    real_drill = job_module._drill
    codes: list[int] = []

    def drill_during_which_a_backup_with_retention_starts(*args: object) -> object:
        codes.append(backup(models, backups, "--force", "--keep-last", "1"))
        return real_drill(*args)  # type: ignore[arg-type]  # the arguments the drill was called with, passed on unchanged

    monkeypatch.setattr(job_module, "_drill", drill_during_which_a_backup_with_retention_starts)
    assert restore("--drill", "--backup-dir", backups) == 0
    assert codes == [1]
    assert "backup not started: another run holds" in capsys.readouterr().err
    assert only_entry(backups).name == drilled  # retention did not run under the drill


@pytest.mark.parametrize("force", [True, False])
def test_a_symlinked_target_is_refused_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], force: bool
) -> None:
    assert backup(make_models(tmp_path / "models"), tmp_path / "backups") == 0
    real = tmp_path / "serving-v3"
    real.mkdir()
    (real / "keep-me.txt").write_text("precious")
    link = tmp_path / "serving"
    link.symlink_to(real, target_is_directory=True)
    assert restore("--backup-dir", tmp_path / "backups", "--to", link, *(["--force"] if force else [])) == 1
    [line] = [line for line in capsys.readouterr().err.splitlines() if "restore FAILED" in line]
    assert f"{link} is a symbolic link (to {real})" in line and f"--to {real}" in line
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert tree(real) == {"keep-me.txt": b"precious"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backups", "models", "serving", "serving-v3"]  # nothing left behind


def test_many_small_files_are_synced_ahead_in_a_helper_thread_and_a_failed_sync_there_fails_the_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    for i in range(12):
        (models / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (models / f"d{i % 3}" / f"f{i}.json").write_bytes(os.urandom(100 + i))
    assert backup(models, tmp_path / "backups") == 0
    monkeypatch.setattr(restore_module, "SYNC_AHEAD_FILES", 5)
    real = restore_module.sync_filesystem
    synced: list[str] = []

    def recording(path: Path) -> None:
        synced.append(threading.current_thread().name)
        real(path)

    monkeypatch.setattr(restore_module, "sync_filesystem", recording)
    assert restore("--backup-dir", tmp_path / "backups", "--to", tmp_path / "r") == 0
    assert tree(tmp_path / "r") == tree(models)
    assert "mlwarden-sync-ahead" in synced and synced[-1] == threading.main_thread().name  # the last one before the swap

    def failing(path: Path) -> None:
        if threading.current_thread().name == "mlwarden-sync-ahead":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        real(path)

    monkeypatch.setattr(restore_module, "sync_filesystem", failing)
    assert restore("--backup-dir", tmp_path / "backups", "--to", tmp_path / "r2") == 1
    assert not (tmp_path / "r2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r2.restore-")]  # no staging left
