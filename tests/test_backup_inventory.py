"""``mlwarden backup-list`` and ``mlwarden backup-check [--read-data]``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_backup_support import backup, flip_byte, make_models, mlwarden, only_entry

from mlwarden.catalog import CHECKSUMS


@pytest.fixture()
def backups(tmp_path: Path) -> Path:
    assert backup(make_models(tmp_path / "models"), tmp_path / "backups") == 0
    return tmp_path / "backups"


def test_list_shows_each_backup_as_a_table_and_as_json(backups: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entry = only_entry(backups)
    capsys.readouterr()
    assert mlwarden("backup-list", "--backup-dir", backups) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "STARTED", "FILES", "TOTAL", "NEW", "STORED", "VERIFIED", "OFF-SITE"]
    assert row.split()[0] == entry.name and row.split()[2] == "4" and row.split()[-2:] == ["yes", "no"]
    assert mlwarden("backup-list", "--backup-dir", backups, "--json") == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["name"] == entry.name and listed["files"] == 4 and listed["verified"] is True and listed["offsite"] is None
    assert listed["total_bytes"] == entry.manifest.total_bytes and listed["stored_bytes"] == entry.manifest.archive_bytes


def test_check_passes_on_sound_backups(backups: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mlwarden("backup-check", "--backup-dir", backups) == 0
    assert mlwarden("backup-check", "--backup-dir", backups, "--read-data") == 0
    assert "1 backup(s)" in capsys.readouterr().err


def test_check_read_data_catches_a_flipped_byte_that_the_reference_check_cannot_see(backups: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entry = only_entry(backups)
    flip_byte(entry.archive_path)
    assert mlwarden("backup-check", "--backup-dir", backups) == 0  # same size, same recorded hashes
    capsys.readouterr()
    assert mlwarden("backup-check", "--backup-dir", backups, "--read-data") == 1
    err = capsys.readouterr().err
    assert f"check FAILED: {entry.name}:" in err


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda entry: entry.archive_path.unlink(), "is missing"),
        (lambda entry: entry.archive_path.open("ab").write(b"x"), "bytes, the manifest says"),
        (lambda entry: (entry.directory / CHECKSUMS).write_text("0" * 64 + "  config.json\n"), "SHA256SUMS does not match"),
        (lambda entry: (entry.directory / "manifest.json").write_text("{"), "unreadable"),
        (lambda entry: (entry.directory / "manifest.json").unlink(), "no manifest.json"),
    ],
)
def test_check_names_a_broken_reference(backups: Path, capsys: pytest.CaptureFixture[str], damage, said: str) -> None:  # type: ignore[no-untyped-def]  # damage is a parametrized callable of several shapes
    entry = only_entry(backups)
    damage(entry)
    capsys.readouterr()
    assert mlwarden("backup-check", "--backup-dir", backups) == 1
    err = capsys.readouterr().err
    assert entry.name in err and said in err
