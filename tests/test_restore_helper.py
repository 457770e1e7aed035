"""The restore's helper process: a second process writes most of the small files while the
first reads and checks the members. The restored tree is the same whoever wrote each file,
every file is written before the final syncfs, a failure or death of the helper fails the
restore with nothing left behind, and neither a signal nor a kill -9 leaves it running."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlwarden.jobs.backup import restore as restore_module
from test_backup_support import SIGNAL_IN_FORK, backup, hard_links, mlwarden, only_entry, tree

from mlwarden.catalog import FileRecord, Manifest
from mlwarden.components import wait_until

MLWARDEN = Path(sys.executable).parent / "mlwarden"  # the venv's console script


def restore(*argv: str | Path) -> int:
    return mlwarden("restore", *argv)


def _small_tree(path: Path, count: int) -> Path:
    """``count`` small files in a few directories, some with the same content, an empty one,
    a name that is not UTF-8, a hard link and a symlink."""
    for i in range(count):
        sub = path / f"d{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}.json").write_bytes(b"same content" if i % 7 == 0 else os.urandom(50 + i % 300))
    (path / "empty").write_bytes(b"")
    (path / os.fsdecode(b"caf\xe9.bin")).write_bytes(b"latin-1 name")
    os.link(path / "d1" / "f00001.json", path / "linked.json")
    (path / "link").symlink_to("d0/f00000.json")
    return path


@pytest.fixture
def helper_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper for any backup, in small batches, so that a small tree crosses many of them."""
    monkeypatch.setattr(restore_module, "_worth_a_helper", lambda manifest: True)
    monkeypatch.setattr(restore_module, "HELPER_BATCH_FILES", 3)


@pytest.mark.parametrize("in_flight", [2, 0], ids=["handed-over", "all-written-here"])
def test_a_restore_with_the_helper_gives_back_the_same_tree_and_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, helper_always: None, in_flight: int
) -> None:
    """With ``HELPER_IN_FLIGHT`` 0 the first process writes every batch itself (the helper is
    never waited for): the way a busy second core is handled."""
    monkeypatch.setattr(restore_module, "HELPER_IN_FLIGHT", in_flight)
    models = _small_tree(tmp_path / "models", 60)
    assert backup(models, tmp_path / "backups") == 0
    writers = tmp_path / "writers"
    real = restore_module._write_whole

    def noting_the_writer(destination: str, content: bytes, record: FileRecord, umask: int) -> None:
        with open(writers, "a") as out:  # appended by both processes
            out.write(f"{os.getpid()}\n")
        real(destination, content, record, umask)

    monkeypatch.setattr(restore_module, "_write_whole", noting_the_writer)
    assert restore("--backup-dir", tmp_path / "backups", "--to", tmp_path / "r") == 0
    assert tree(tmp_path / "r") == tree(models)
    assert hard_links(tmp_path / "r") == {frozenset({"d1/f00001.json", "linked.json"})}
    assert os.readlink(tmp_path / "r" / "link") == "d0/f00000.json"
    pids = set(writers.read_text().split())
    assert (os.getpid() in map(int, pids)) and len(pids) == (2 if in_flight else 1)


def test_a_drill_takes_the_same_way_with_its_helper(tmp_path: Path, helper_always: None, capsys: pytest.CaptureFixture[str]) -> None:
    models = _small_tree(tmp_path / "models", 30)
    assert backup(models, tmp_path / "backups") == 0
    assert restore("--drill", "--backup-dir", tmp_path / "backups") == 0
    assert "every file matches the manifest" in capsys.readouterr().err
    assert not [p for p in (tmp_path / "backups").iterdir() if p.name.startswith(".drill-")]  # no scratch left
    assert not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()  # the helper was reaped


def test_every_file_the_helper_wrote_is_in_place_before_the_final_syncfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, helper_always: None
) -> None:
    models = _small_tree(tmp_path / "models", 40)
    assert backup(models, tmp_path / "backups") == 0
    seen: list[dict[str, bytes]] = []
    real = restore_module.sync_filesystem

    def checking(path: Path) -> None:
        if threading.current_thread() is threading.main_thread():
            seen.append(tree(path))
        real(path)

    monkeypatch.setattr(restore_module, "sync_filesystem", checking)
    assert restore("--backup-dir", tmp_path / "backups", "--to", tmp_path / "r") == 0
    assert seen == [tree(models)]  # one syncfs, with every file written and whole


@pytest.mark.parametrize("how", ["error", "death"])
def test_a_helper_that_fails_or_dies_fails_the_restore_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], helper_always: None, how: str
) -> None:
    models = _small_tree(tmp_path / "models", 60)
    assert backup(models, tmp_path / "backups") == 0
    first = os.getpid()
    real = restore_module._write_whole

    def failing_in_the_helper(destination: str, content: bytes, record: FileRecord, umask: int) -> None:
        if os.getpid() != first:  # the first file the helper writes
            if how == "death":
                os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer, say
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), destination)
        real(destination, content, record, umask)

    monkeypatch.setattr(restore_module, "_write_whole", failing_in_the_helper)
    assert restore("--backup-dir", tmp_path / "backups", "--to", tmp_path / "r") == 1
    err = capsys.readouterr().err
    assert ("No space left on device" in err) if how == "error" else ("the restore's helper process ended" in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backups", "models"]  # no target, no staging


def test_the_helper_is_used_only_for_many_small_files_and_a_second_core(monkeypatch: pytest.MonkeyPatch) -> None:
    def manifest(*sizes: int) -> Manifest:
        files = tuple(FileRecord(f"f{i}", size, "ab" * 32, 0.0) for i, size in enumerate(sizes))
        return Manifest(name="m-20260101T000000Z", source="/m", host="h", started_at=0.0, finished_at=0.0, compression="zstd", level=1,
                        archive="m-20260101T000000Z.tar.zst", archive_bytes=1, archive_sha256="cd" * 32, total_bytes=sum(sizes), files=files)

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    many = [restore_module.HELPER_MAX_FILE_BYTES] * restore_module.HELPER_MIN_FILES
    assert restore_module._worth_a_helper(manifest(*many, 10 * 2**30))  # large files too: each written here
    assert not restore_module._worth_a_helper(manifest(*many[1:], restore_module.HELPER_MAX_FILE_BYTES + 1))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert not restore_module._worth_a_helper(manifest(*many))


def _helper_of(pid: int) -> int:
    """The pid of ``pid``'s one child (its restore helper), once it has one."""
    children: list[str] = []

    def forked() -> bool:
        children[:] = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return len(children) == 1

    wait_until(forked, 60, "the restore's helper", poll=0.002)
    return int(children[0])


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"  # dead, not yet reaped by its new parent
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_neither_sigterm_nor_kill_9_of_a_restore_leaves_its_helper_running(tmp_path: Path, sig: signal.Signals) -> None:
    """A real restore of enough small files to take the helper; stopped once the helper
    exists. SIGTERM (with the helper stopped, so that it is surely there): the restore kills
    it and removes its staging (exit 143); kill -9: the kernel kills it with the restore, or
    it sees that the restore is gone before it writes anything (the staging is the next
    restore's to remove)."""
    models = tmp_path / "models"
    for i in range(restore_module.HELPER_MIN_FILES + 500):
        (models / f"d{i % 8}").mkdir(parents=True, exist_ok=True)
        (models / f"d{i % 8}" / f"f{i}.txt").write_bytes(os.urandom(64))
    assert backup(models, tmp_path / "backups") == 0
    process = subprocess.Popen([str(MLWARDEN), "restore", "--backup-dir", str(tmp_path / "backups"), "--to", str(tmp_path / "r")],
                               stderr=subprocess.PIPE, text=True)
    helper = 0
    try:
        helper = _helper_of(process.pid)
        if sig == signal.SIGTERM:
            os.kill(helper, signal.SIGSTOP)  # held mid-restore, so that the signal surely lands while it is there
        process.send_signal(sig)
        _, err = process.communicate(timeout=60)
        deadline = time.monotonic() + 10
        while not _gone(helper) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _gone(helper)
    finally:
        process.kill()
        if helper and not _gone(helper):
            os.kill(helper, signal.SIGKILL)
    if sig == signal.SIGTERM:
        assert process.returncode == 143 and "stopped by SIGTERM" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["backups", "models"]
    else:
        assert process.returncode == -signal.SIGKILL
        assert not (tmp_path / "r").exists()
    assert only_entry(tmp_path / "backups").manifest.files  # the backup is untouched


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_that_lands_while_the_helper_is_forked_stops_the_restore_and_its_helper(
    tmp_path: Path, helper_always: None, capsys: pytest.CaptureFixture[str], sig: signal.Signals, status: int
) -> None:
    models = _small_tree(tmp_path / "models", 20)
    assert backup(models, tmp_path / "backups") == 0
    SIGNAL_IN_FORK.append(sig)
    try:
        assert restore("--backup-dir", tmp_path / "backups", "--to", tmp_path / "r") == status
    finally:
        SIGNAL_IN_FORK.clear()
    assert "Exception ignored" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backups", "models"]  # no target, no staging
    assert not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()  # the helper was reaped
