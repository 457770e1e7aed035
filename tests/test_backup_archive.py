"""The archive itself: plain tar that the real `tar` extracts, checksums the real `sha256sum -c` accepts,
and verification that catches one flipped byte."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mlwarden.jobs.backup.verify import verify_archive
from test_backup_support import backup, flip_byte, make_models, only_entry, tree

from mlwarden.catalog import ARCHIVE_EXTENSIONS, Catalog


@pytest.mark.parametrize(("compression", "tar_flag"), [("zstd", "--zstd"), ("gzip", "--gzip"), ("none", "")])
def test_real_tar_extracts_it_and_sha256sum_accepts_the_checksums(tmp_path: Path, compression: str, tar_flag: str) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups", "--compression", compression) == 0
    entry = only_entry(tmp_path / "backups")
    assert entry.archive_path.name.endswith(ARCHIVE_EXTENSIONS[compression])

    subprocess.run(["sha256sum", "-c", "--strict", entry.archive_path.name + ".sha256"], cwd=entry.directory, check=True, capture_output=True)
    out = tmp_path / "extracted"
    out.mkdir()
    subprocess.run(["tar", *([tar_flag] if tar_flag else []), "-xf", str(entry.archive_path), "-C", str(out)], check=True)
    assert tree(out) == tree(models)
    subprocess.run(["sha256sum", "-c", "--strict", str(entry.directory / "SHA256SUMS")], cwd=out, check=True, capture_output=True)


def test_manifest_lists_every_file_with_its_hash_and_is_committed_last(tmp_path: Path) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups") == 0
    entry = only_entry(tmp_path / "backups")
    manifest = json.loads((entry.directory / "manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]] == [
        "config.json", "shards/model-00001.safetensors", "shards/model-00002.safetensors", "tokenizer.json",
    ]
    assert manifest["total_bytes"] == sum(len(v) for v in tree(models).values())
    assert manifest["compression"] == "zstd" and manifest["level"] == 1
    assert manifest["source"] == str(models)
    # Everything else was on disk before the manifest (written last, as the commit marker).
    manifest_time = (entry.directory / "manifest.json").stat().st_mtime_ns
    for other in ("SHA256SUMS", entry.manifest.archive, entry.manifest.archive + ".sha256"):
        assert (entry.directory / other).stat().st_mtime_ns <= manifest_time
    assert entry.verified is True


def test_odd_file_names_survive_and_sha256sum_still_checks_them(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "a dir").mkdir(parents=True)
    (models / "a dir" / "back\\slash.bin").write_bytes(b"x" * 100)
    (models / ("long-" + "n" * 150 + ".bin")).write_bytes(b"y" * 10)
    assert backup(models, tmp_path / "backups") == 0
    entry = only_entry(tmp_path / "backups")
    out = tmp_path / "extracted"
    out.mkdir()
    subprocess.run(["tar", "--zstd", "-xf", str(entry.archive_path), "-C", str(out)], check=True)
    assert tree(out) == tree(models)
    subprocess.run(["sha256sum", "-c", "--strict", str(entry.directory / "SHA256SUMS")], cwd=out, check=True, capture_output=True)


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_verify_catches_one_flipped_byte(tmp_path: Path, compression: str) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups", "--compression", compression) == 0
    entry = only_entry(tmp_path / "backups")
    assert verify_archive(entry).ok
    flip_byte(entry.archive_path)
    result = verify_archive(entry)
    assert not result.ok
    assert result.detail


def test_verify_catches_a_member_changed_inside_an_uncompressed_archive(tmp_path: Path) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups", "--compression", "none") == 0
    entry = only_entry(tmp_path / "backups")
    data = entry.archive_path.read_bytes()
    position = data.index(b"hidden_size")  # inside config.json's content
    entry.archive_path.write_bytes(data[:position] + b"HIDDEN_SIZE" + data[position + 11 :])
    result = verify_archive(entry)
    assert not result.ok
    assert "config.json" in result.detail


def test_a_damaged_backup_of_the_day_is_recorded_replaced_and_fails_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups") == 0
    damaged = only_entry(tmp_path / "backups")
    flip_byte(damaged.archive_path)
    # Same day: the run verifies the existing backup, finds the damage, makes a new one, and
    # still fails: a damaged backup is news, not a detail.
    assert backup(models, tmp_path / "backups", "--textfile-dir", tmp_path) == 1
    old, new = Catalog(tmp_path / "backups").entries()
    assert old.name == damaged.name and old.verified is False
    assert new.verified is True
    assert f"backup {damaged.name} is damaged" in capsys.readouterr().err
    metrics = (tmp_path / "mlwarden_backup.prom").read_text()
    assert "mlwarden_backup_damaged_found 1.0" in metrics and "mlwarden_job_success 0.0" in metrics
    assert "mlwarden_backup_verified 1.0" in metrics  # the new one is good
    # The next run checks the day's good backup: nothing newly damaged (the exporter keeps showing the old one).
    assert backup(models, tmp_path / "backups", "--textfile-dir", tmp_path) == 0
    assert "mlwarden_backup_damaged_found 0.0" in (tmp_path / "mlwarden_backup.prom").read_text()
