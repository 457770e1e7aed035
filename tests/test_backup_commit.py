"""A backup's commit: every file of the backup (archive, checksums, pack, manifest, the
verification's status) and its staging directory are on disk before the directory is renamed
into place, their fsyncs overlapping instead of one after another; the files cache, a hint,
is written beside it and cannot fail the backup."""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import pytest
from mlwarden.jobs.backup import archive
from test_backup_dedup import settle
from test_backup_support import backup, make_models, only_entry

from mlwarden.catalog import Catalog, FileRecord, new_file_record
from mlwarden.fsutil import StagedFiles


class _Recorder:
    """os.fsync and os.rename, recorded in order: (call, inode or names, thread)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, object, int]] = []
        real_fsync, real_rename = os.fsync, os.rename

        def fsync(fd: int) -> None:
            self.events.append(("fsync", os.fstat(fd).st_ino, threading.get_ident()))
            real_fsync(fd)

        def rename(source: str | Path, target: str | Path) -> None:
            self.events.append(("rename", (Path(source).name, Path(target).name), threading.get_ident()))
            real_rename(source, target)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)

    def before_rename_to(self, name: str) -> list[tuple[str, object, int]]:
        """The events before the staging directory became ``name``."""
        at = next(i for i, (call, what, _) in enumerate(self.events) if call == "rename" and what[1] == name)  # type: ignore[index]  # a rename's names
        return self.events[:at]


@pytest.mark.parametrize("second", [False, True], ids=["new content", "nothing new"])
def test_every_file_and_the_directory_are_synced_before_the_rename_and_the_syncs_overlap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second: bool
) -> None:
    models, backups = make_models(tmp_path / "models"), tmp_path / "backups"
    if second:  # the files cache then knows every file: no archive, verified through the first backup's pack
        settle()
        assert backup(models, backups, "--period", "run") == 0
        first = only_entry(backups).name
    recorder = _Recorder(monkeypatch)
    assert backup(models, backups, "--period", "run", "--force") == 0
    entry = max(Catalog(backups).entries(), key=lambda e: e.manifest.started_at)
    assert entry.verified is True  # recorded with the commit
    if second:
        assert entry.name != first and not entry.manifest.has_archive
    names = {p.name for p in entry.directory.iterdir()}
    assert "status.json" in names and "manifest.json" in names
    before = recorder.before_rename_to(entry.name)
    synced = {what for call, what, _ in before if call == "fsync"}
    for path in [entry.directory, *entry.directory.iterdir()]:  # a rename keeps the inode
        assert path.stat().st_ino in synced, f"{path.name} was not synced before the commit"
    threads = {thread for call, _, thread in before if call == "fsync"}
    assert len(threads) > 1  # not one after another in one thread


def test_the_files_cache_written_beside_the_commit_cannot_fail_the_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models, backups = make_models(tmp_path / "models"), tmp_path / "backups"
    settle()  # the files' times old enough to be cached
    assert backup(models, backups, "--period", "run") == 0
    (cache,) = backups.glob(".mlwarden-files-cache-*")
    cache.unlink()
    cache.mkdir()  # the cache's rename over it fails
    assert backup(models, backups, "--period", "run", "--force") == 0
    assert "could not write the files cache" in capsys.readouterr().err
    assert all(entry.verified for entry in Catalog(backups).entries())
    assert not any(p.name.endswith(".tmp") for p in backups.rglob("*"))


def test_staged_files_are_new_whole_and_of_their_mode_and_a_failed_sync_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staged = StagedFiles()
    try:
        staged.write_bytes(tmp_path / "a", b"x" * 100_000, mode=0o600)
        staged.write_bytes(tmp_path / "b", b"")
        with pytest.raises(FileExistsError):
            staged.write_bytes(tmp_path / "a", b"again")
        staged.sync()
        assert (tmp_path / "a").read_bytes() == b"x" * 100_000 and (tmp_path / "b").read_bytes() == b""
        assert (tmp_path / "a").stat().st_mode & 0o777 == 0o600 and (tmp_path / "b").stat().st_mode & 0o777 == 0o644

        def failing(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "fsync", failing)
        with pytest.raises(OSError, match="Input/output error"):
            staged.sync()
    finally:
        staged.close()


def test_a_file_record_made_in_the_per_file_loop_is_the_dataclass_s_own() -> None:
    made = new_file_record("a/b.json", 3, "ab" * 32, 1.5, 0o640, "models-20200101T000000Z")
    expected = FileRecord("a/b.json", 3, "ab" * 32, 1.5, 0o640, "models-20200101T000000Z")
    assert made == expected and hash(made) == hash(expected) and repr(made) == repr(expected)
    assert dataclasses.asdict(made) == dataclasses.asdict(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.size = 4  # type: ignore[misc]  # frozen: the assignment is what is tested


@pytest.mark.parametrize("odd", ["", "back\\slash", "new\nline", "carriage\rreturn", "b\udcffd-bytes"])
def test_checksum_lines_are_sha256sum_s_with_or_without_names_to_escape(odd: str) -> None:
    names = ["a.json", "dir/b c.bin", *([odd] if odd else []), "z"]
    records = [FileRecord(name, 1, f"{i:064x}", 0.0) for i, name in enumerate(names)]
    assert archive._checksum_lines(records) == "".join(archive.sha256sum_line(r.sha256, r.path) for r in records)
