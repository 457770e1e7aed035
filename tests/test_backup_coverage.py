"""Nothing is skipped silently: unreadable paths fail the run, symlinks are kept as symlinks,
special files are listed, exclusions are on purpose and recorded; old backups still restore."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_backup_support import backup, make_models, mlwarden, only_entry, tree

from mlwarden.catalog import Catalog, LinkRecord, SkippedRecord

importlib.import_module("mlwarden.jobs.backup.cli")  # loaded before a child drops to nobody (see run_as_nobody)

NOBODY = 65534


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp_path is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="mlwarden-nobody-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_as_nobody(*argv: str | Path, log_file: Path) -> int:
    """``mlwarden ARGV`` in a child process that runs as nobody (real and effective uid), so
    that mode 000 means what it says: the tests run as root, which reads anything. (The
    child is forked rather than exec'd with runuser because the interpreter and its standard
    library live under /root, which nobody may not enter: what it needs is imported first.)"""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = mlwarden(*argv, "--log-file", log_file)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def nobody_models(shared_dir: Path) -> tuple[Path, Path, Path]:
    models = make_models(shared_dir / "models")
    for path in [models, *models.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    backups = shared_dir / "backups"
    backups.mkdir()
    os.chown(backups, NOBODY, NOBODY)
    log_file = shared_dir / "run.log"
    log_file.touch()
    os.chown(log_file, NOBODY, NOBODY)
    return models, backups, log_file


@pytest.mark.parametrize("what", ["directory", "file"])
def test_an_unreadable_path_fails_the_run_naming_it(nobody_models: tuple[Path, Path, Path], what: str) -> None:
    models, backups, log_file = nobody_models
    secret = models / "private"
    if what == "directory":
        secret.mkdir()
        (secret / "optimizer.pt").write_bytes(b"state" * 100)
    else:
        secret.write_bytes(b"state" * 100)
    secret.chmod(0o000)
    assert run_as_nobody("backup", "--model-dir", models, "--backup-dir", backups, log_file=log_file) == 1
    log = log_file.read_text()
    assert f"cannot read {secret} (Permission denied)" in log
    assert "--exclude" in log
    assert Catalog(backups).entries() == []
    assert [p.name for p in backups.iterdir() if p.name != ".mlwarden-backup.lock"] == []


@pytest.mark.parametrize(("mode", "readable"), [(0o400, True), (0o200, False), (0o044, False)])
def test_the_owners_read_bit_decides_for_the_owner(nobody_models: tuple[Path, Path, Path], mode: int, readable: bool) -> None:
    """The scan trusts the owner's read bit for files the user owns (access() says the same
    for the owner: the group's and others' bits do not count) and asks access() otherwise."""
    models, backups, log_file = nobody_models
    own = models / "own.bin"
    own.write_bytes(b"mine")
    os.chown(own, NOBODY, NOBODY)
    own.chmod(mode)
    code = run_as_nobody("backup", "--model-dir", models, "--backup-dir", backups, log_file=log_file)
    if readable:
        assert code == 0
        assert "own.bin" in {f.path for f in only_entry(backups).manifest.files}
    else:
        assert code == 1
        assert f"cannot read {own} (Permission denied)" in log_file.read_text()
        assert Catalog(backups).entries() == []


def test_an_excluded_unreadable_directory_is_left_out_on_purpose_and_recorded(
    nobody_models: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    models, backups, log_file = nobody_models
    (models / "private").mkdir()
    (models / "private").chmod(0o000)
    (models / "notes.tmp").write_text("scratch")
    argv = ("backup", "--model-dir", models, "--backup-dir", backups, "--force")
    assert run_as_nobody(*argv, "--exclude", "private", log_file=log_file) == 0
    entry = only_entry(backups)
    assert entry.manifest.excludes == ("private",)
    assert "notes.tmp" in {f.path for f in entry.manifest.files}

    monkeypatch.setenv("MLWARDEN_BACKUP_EXCLUDE", "private,*.tmp")
    assert run_as_nobody(*argv, log_file=log_file) == 0
    newest = Catalog(backups).entries()[-1]
    assert newest.manifest.excludes == ("private", "*.tmp")
    assert "notes.tmp" not in {f.path for f in newest.manifest.files}


def regular_files(directory: Path) -> dict[str, bytes]:
    """Regular files under ``directory``, symlinks neither followed nor counted."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                found[path.relative_to(directory).as_posix()] = path.read_bytes()
    return found


def test_symlinks_are_stored_as_links_and_restored_only_inside_the_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = make_models(tmp_path / "models")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "big.bin").write_bytes(b"not ours")
    (models / "alias.json").symlink_to("config.json")
    (models / "current").symlink_to("shards", target_is_directory=True)
    (models / "loop").symlink_to(".", target_is_directory=True)
    (models / "dangling").symlink_to("gone.bin")
    (models / "external").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (models / "shards" / "escape").symlink_to("../../elsewhere/big.bin")
    assert backup(models, tmp_path / "backups") == 0
    warnings = capsys.readouterr().err
    assert f"{models / 'external'} is a symlink to {tmp_path / 'elsewhere'}, outside {models}: stored as a link, its target is NOT" in warnings
    assert f"{models / 'alias.json'} is a symlink" not in warnings
    entry = only_entry(tmp_path / "backups")
    assert set(entry.manifest.links) == {
        LinkRecord("alias.json", "config.json"), LinkRecord("current", "shards"), LinkRecord("loop", "."),
        LinkRecord("dangling", "gone.bin"), LinkRecord("external", str(tmp_path / "elsewhere")),
        LinkRecord("shards/escape", "../../elsewhere/big.bin"),
    }
    assert not any(f.path.startswith(("current/", "loop/", "external/")) for f in entry.manifest.files)

    # GNU tar gives them back as links too: the format stays open.
    out = tmp_path / "by-tar"
    out.mkdir()
    subprocess.run(["tar", "--zstd", "-xf", str(entry.archive_path), "-C", str(out)], check=True)
    assert os.readlink(out / "current") == "shards" and os.readlink(out / "external") == str(tmp_path / "elsewhere")

    capsys.readouterr()
    target = tmp_path / "restored"
    assert mlwarden("restore", "--backup-dir", tmp_path / "backups", "--to", target) == 0
    for inside in ("alias.json", "current", "loop", "dangling"):
        assert (target / inside).is_symlink() and os.readlink(target / inside) == os.readlink(models / inside)
    assert not (target / "external").exists() and not (target / "shards" / "escape").is_symlink()
    err = capsys.readouterr().err
    assert f"not restoring symlink external -> {tmp_path / 'elsewhere'}" in err
    assert "not restoring symlink shards/escape -> ../../elsewhere/big.bin" in err
    assert regular_files(target) == regular_files(models)

    assert mlwarden("restore", "--backup-dir", tmp_path / "backups", "--to", tmp_path / "all", "--restore-external-links") == 0
    assert os.readlink(tmp_path / "all" / "external") == str(tmp_path / "elsewhere")
    assert os.readlink(tmp_path / "all" / "shards" / "escape") == "../../elsewhere/big.bin"


def test_a_link_that_leads_out_through_another_link_is_left_out(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "a" / "b").mkdir(parents=True)
    (models / "a" / "b" / "up").symlink_to("..")  # -> a: inside
    (models / "sneaky").symlink_to("a/b/up/../..")  # looks like '.', resolves to models' parent
    assert backup(models, tmp_path / "backups") == 0
    assert mlwarden("restore", "--backup-dir", tmp_path / "backups", "--to", tmp_path / "restored") == 0
    assert (tmp_path / "restored" / "a" / "b" / "up").is_symlink()
    assert not (tmp_path / "restored" / "sneaky").is_symlink()


def test_special_files_are_listed_as_skipped_and_counted(tmp_path: Path) -> None:
    models = make_models(tmp_path / "models")
    os.mkfifo(models / "progress.fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(models / "control.sock"))
        assert backup(models, tmp_path / "backups", "--textfile-dir", tmp_path) == 0
    entry = only_entry(tmp_path / "backups")
    assert set(entry.manifest.skipped) == {SkippedRecord("progress.fifo", "fifo"), SkippedRecord("control.sock", "socket")}
    assert "mlwarden_backup_skipped_special_files 2.0" in (tmp_path / "mlwarden_backup.prom").read_text()


def test_a_backup_in_the_format_before_links_still_restores(tmp_path: Path) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups") == 0
    entry = only_entry(tmp_path / "backups")
    manifest = json.loads((entry.directory / "manifest.json").read_text())
    for key in ("links", "skipped", "excludes", "rewritten"):
        del manifest[key]
    manifest["format_version"] = 1  # exactly what the previous release wrote
    for record in manifest["files"]:
        del record["pack"]
    (entry.directory / "pack.json").unlink()
    (entry.directory / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    assert mlwarden("restore", "--backup-dir", tmp_path / "backups", "--to", tmp_path / "restored") == 0
    assert tree(tmp_path / "restored") == tree(models)
    assert backup(models, tmp_path / "backups") == 0  # and the next run verifies it as the day's backup
    assert only_entry(tmp_path / "backups").verified is True


def test_a_manifest_that_puts_a_file_under_a_symlink_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A crafted backup (hash vouched for) with a link `d -> /etc` and a file `d/passwd`: writing
    the file would follow the link, so nothing is extracted at all."""
    models = tmp_path / "models"
    (models / "d").mkdir(parents=True)
    (models / "d" / "passwd").write_text("root::0:0::/:/bin/sh\n")
    assert backup(models, tmp_path / "backups", "--compression", "none") == 0
    entry = only_entry(tmp_path / "backups")
    manifest = json.loads((entry.directory / "manifest.json").read_text())
    manifest["links"] = [{"path": "d", "target": str(tmp_path / "victim")}]
    (entry.directory / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "victim").mkdir()
    assert mlwarden("restore", "--backup-dir", tmp_path / "backups", "--to", tmp_path / "restored", "--restore-external-links") == 1
    assert "refusing 'd/passwd': it lies under a symlink of the manifest" in capsys.readouterr().err
    assert list((tmp_path / "victim").iterdir()) == []
    assert not (tmp_path / "restored").exists()
