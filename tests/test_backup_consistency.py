"""A file is consistent or the run fails: a file rewritten in place at the same size while it is
read is read once more; a second change fails the run naming it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from mlwarden.jobs.backup import archive
from mlwarden.jobs.backup import job as job_module
from test_backup_support import backup, mlwarden, only_entry, tree

from mlwarden.catalog import Catalog
from mlwarden.terminal import Progress

SIZE = 20 * 2**20  # more than two 8 MiB read chunks


class _WriterDuringRead(Progress):
    """Rewrites ``path`` in place, at the same size, after the first chunk of each of the first
    ``times`` reads of it: as a training job writing a checkpoint over the old one would."""

    path: Path
    times: int
    rewrites = 0

    def advance(self, amount: int) -> None:
        first_chunk_of_a_read = self.done % SIZE == 0  # the only file, read whole each time
        super().advance(amount)
        if self.rewrites < self.times and first_chunk_of_a_read:
            type(self).rewrites += 1
            with open(self.path, "r+b") as handle:
                handle.write(bytes([0x40 + self.rewrites]) * SIZE)
            stat = os.stat(self.path)
            os.utime(self.path, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10**9 * self.rewrites))  # never the same mtime twice


def _models(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    (models / "checkpoint.pt").write_bytes(b"\x01" * SIZE)
    # Written an hour ago: file times are coarse (a kernel tick), and a rewrite within the
    # tick of the first write would not show in them.
    os.utime(models / "checkpoint.pt", (os.path.getmtime(models / "checkpoint.pt") - 3600,) * 2)
    return models


def _writer(monkeypatch: pytest.MonkeyPatch, path: Path, times: int) -> None:
    writer = type("Writer", (_WriterDuringRead,), {"path": path, "times": times, "rewrites": 0})
    monkeypatch.setattr(job_module, "Progress", writer)


def test_a_file_rewritten_during_the_read_is_read_again_and_stored_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    models = _models(tmp_path)
    _writer(monkeypatch, models / "checkpoint.pt", times=1)
    assert backup(models, tmp_path / "backups") == 0
    entry = only_entry(tmp_path / "backups")
    assert entry.manifest.rewritten == ("checkpoint.pt",)
    assert "checkpoint.pt changed while it was read; reading it once more" in capsys.readouterr().err
    new_content = b"\x41" * SIZE
    assert mlwarden("restore", "--backup-dir", tmp_path / "backups", "--to", tmp_path / "restored") == 0
    assert (tmp_path / "restored" / "checkpoint.pt").read_bytes() == new_content  # not half old, half new
    # GNU tar gives the same: the later copy overwrites the torn one.
    out = tmp_path / "by-tar"
    out.mkdir()
    subprocess.run(["tar", "--zstd", "-xf", str(entry.archive_path), "-C", str(out)], check=True)
    assert tree(out) == {"checkpoint.pt": new_content}
    subprocess.run(["sha256sum", "-c", "--strict", str(entry.directory / "SHA256SUMS")], cwd=out, check=True, capture_output=True)


def test_a_file_that_keeps_changing_fails_the_run_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    models = _models(tmp_path)
    _writer(monkeypatch, models / "checkpoint.pt", times=2)
    assert backup(models, tmp_path / "backups") == 1
    err = capsys.readouterr().err
    assert f"{models / 'checkpoint.pt'} changed while it was being archived, twice" in err
    assert Catalog(tmp_path / "backups").entries() == []
    assert [p.name for p in (tmp_path / "backups").iterdir()] == [".mlwarden-backup.lock"]
    assert os.path.getsize(models / "checkpoint.pt") == SIZE


def test_small_files_changed_or_replaced_after_the_scan_are_stored_as_read_then_once(tmp_path: Path) -> None:
    """A small file is checked against the scan's stat after its read (not before and after):
    one rewritten in place, or replaced by a rename, between the scan and its read no longer
    matches it, is read afresh and stored once, whole, with the record of what was read."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("grown.json", "replaced.json", "same.json"):
        (models / name).write_bytes(b"old " * 100)
    source = archive.scan(models)
    (models / "grown.json").write_bytes(b"new, longer " * 100)
    (models / "replacement").write_bytes(b"renamed over " * 100)
    os.rename(models / "replacement", models / "replaced.json")
    result = archive.write_archive(source, tmp_path / "a.tar", "none", None)
    assert result.rewritten == ()
    with tarfile.open(tmp_path / "a.tar") as tar:
        stored = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}  # type: ignore[union-attr]  # regular files
    expected = {name: (models / name).read_bytes() for name in ("grown.json", "replaced.json", "same.json")}
    assert stored == expected  # one member each: no torn copy went in first
    assert {r.path: (r.size, r.sha256) for r in result.files} == {n: (len(d), hashlib.sha256(d).hexdigest()) for n, d in expected.items()}


def test_a_small_file_removed_after_the_scan_fails_the_write_naming_it(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "gone.json").write_bytes(b"{}")
    source = archive.scan(models)
    (models / "gone.json").unlink()
    with pytest.raises(FileNotFoundError, match="gone.json"):
        archive.write_archive(source, tmp_path / "a.tar", "none", None)
    assert not (tmp_path / "a.tar").exists()
