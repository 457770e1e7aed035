"""Damage is a failure: damaged backups fail the run, are skipped by latest, and are visible;
unreadable catalog files give one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlwarden.exporter.collectors.backups import BackupsCollector
from mlwarden.exporter.snapshot import render
from mlwarden.jobs.backup.verify import verify_and_record
from prometheus_client.parser import text_string_to_metric_families
from test_backup_support import backup, flip_byte, make_models, mlwarden, tree

from mlwarden.catalog import Catalog


def restore(*argv: str | Path) -> int:
    return mlwarden("restore", *argv)


def test_restore_latest_skips_a_backup_marked_failed_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backups = tmp_path / "backups"
    good_models = make_models(tmp_path / "models", seed=1)
    assert backup(good_models, backups, "--period", "run") == 0
    expected = tree(good_models)
    (good_models / "config.json").write_text("{}")
    assert backup(good_models, backups, "--period", "run") == 0
    good, bad = Catalog(backups).entries()
    flip_byte(bad.archive_path)
    assert not verify_and_record(bad)[1].ok  # what a backup run or a drill records when it finds the damage
    capsys.readouterr()

    assert restore("--backup-dir", backups, "--to", tmp_path / "restored") == 0
    err = capsys.readouterr().err
    assert f"skipping backup {bad.name} for latest: it failed verification" in err
    assert f"restored {good.name}" in err
    assert tree(tmp_path / "restored") == expected


def _metric(collector: BackupsCollector, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = render(collector.collect().families).decode()
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name}


def test_the_exporter_names_each_damaged_backup(tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    models = make_models(tmp_path / "models")
    assert backup(models, backups) == 0
    collector = BackupsCollector(backups, 60.0, 60.0)
    [entry] = Catalog(backups).entries()
    key = (("backup", entry.name), ("backup_dir", str(backups)))
    assert _metric(collector, "mlwarden_backup_damaged") == {key: 0.0}
    flip_byte(entry.archive_path)
    assert backup(models, backups) == 1
    [_, new] = Catalog(backups).entries()
    assert _metric(collector, "mlwarden_backup_damaged") == {key: 1.0, (("backup", new.name), ("backup_dir", str(backups))): 0.0}


@pytest.mark.parametrize("broken", ["manifest.json", "status.json"])
@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", b'{"verification": "yes"}'])
def test_a_corrupt_catalog_file_gives_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], broken: str, content: bytes
) -> None:
    backups = tmp_path / "backups"
    models = make_models(tmp_path / "models")
    assert backup(models, backups) == 0
    [entry] = Catalog(backups).entries()
    (entry.directory / broken).write_bytes(content)
    capsys.readouterr()
    assert restore(entry.name, "--backup-dir", backups, "--to", tmp_path / "restored") == 1
    err = capsys.readouterr().err
    [line] = err.splitlines()
    assert "restore FAILED" in line and str(entry.directory / broken) in line
    assert not (tmp_path / "restored").exists()
    # A backup run that meets it fails too, and leaves the file for inspection.
    assert backup(models, backups, "--textfile-dir", tmp_path) == 1
    assert "mlwarden_backup_damaged_found 1.0" in (tmp_path / "mlwarden_backup.prom").read_text()
    assert (entry.directory / broken).read_bytes() == content
