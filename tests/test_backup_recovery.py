"""The format stays open: a backup is rebuilt with scripts/mlwarden-recover.py (standard
library only), tar and zstd, with mlwarden not importable; backups in today's format restore."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_backup_scale import odd_tree
from test_backup_support import backup, flip_byte, make_models, mlwarden, only_entry, tree

from bench.bench_backup import hf_cache, links

REPO = Path(__file__).resolve().parent.parent
RECOVER = REPO / "scripts" / "mlwarden-recover.py"
FORMAT_2 = Path(__file__).resolve().parent / "data" / "format-2"
# The interpreter the virtual environment was made from: with -I it sees neither the
# environment's site-packages (where mlwarden is installed) nor PYTHONPATH.
BARE_PYTHON = getattr(sys, "_base_executable", sys.executable)


def format_2_source(directory: Path) -> Path:
    """The tree the committed format-2 backup (tests/data/format-2) was made from."""
    (directory / "shards").mkdir(parents=True)
    (directory / "shards" / "model-00001.safetensors").write_bytes(bytes(range(256)) * 40)
    (directory / "config.json").write_text('{"hidden_size": 64}\n')
    (directory / "empty.txt").write_bytes(b"")
    (directory / "größe.txt").write_text("unicode name\n")
    (directory / "current").symlink_to("shards", target_is_directory=True)
    (directory / "alias.json").symlink_to("config.json")
    return directory


def recover(backup_dir: Path, target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BARE_PYTHON, "-I", str(RECOVER), str(backup_dir), str(target)], capture_output=True, text=True, cwd="/", timeout=300)


def test_the_recovery_interpreter_cannot_import_mlwarden() -> None:
    result = subprocess.run([BARE_PYTHON, "-I", "-c", "import mlwarden"], capture_output=True, text=True, cwd="/")
    assert result.returncode != 0 and "No module named 'mlwarden'" in result.stderr


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_the_recovery_script_rebuilds_a_backup_byte_for_byte_and_link_for_link(tmp_path: Path, compression: str) -> None:
    models = odd_tree(tmp_path / "models")
    hf_cache(models / "hub", 300_000)
    (models / "weights.bin").write_bytes(os.urandom(100_000))
    assert backup(models, tmp_path / "backups", "--compression", compression) == 0
    result = recover(only_entry(tmp_path / "backups").directory, tmp_path / "recovered")
    assert result.returncode == 0, result.stderr
    assert tree(tmp_path / "recovered") == tree(models)
    assert links(tmp_path / "recovered") == links(models) and links(models)


def test_the_recovery_script_refuses_a_damaged_archive_and_extracts_nothing(tmp_path: Path) -> None:
    assert backup(make_models(tmp_path / "models"), tmp_path / "backups") == 0
    entry = only_entry(tmp_path / "backups")
    flip_byte(entry.archive_path)
    result = recover(entry.directory, tmp_path / "recovered")
    assert result.returncode == 1 and "the archive is damaged" in result.stderr
    assert not (tmp_path / "recovered").exists()


def test_the_recovery_script_names_a_file_that_does_not_match(tmp_path: Path) -> None:
    assert backup(make_models(tmp_path / "models"), tmp_path / "backups") == 0
    entry = only_entry(tmp_path / "backups")
    manifest = json.loads((entry.directory / "manifest.json").read_text())
    record = next(r for r in manifest["files"] if r["path"] == "config.json")
    record["sha256"] = "0" * 64
    (entry.directory / "manifest.json").write_text(json.dumps(manifest))
    pack = json.loads((entry.directory / "pack.json").read_text())  # format 3: the member's index says the same
    next(r for r in pack["files"] if r["path"] == "config.json")["sha256"] = "0" * 64
    (entry.directory / "pack.json").write_text(json.dumps(pack))
    result = recover(entry.directory, tmp_path / "recovered")
    assert result.returncode == 1 and "config.json: SHA-256 does not match the manifest" in result.stderr


def test_a_backup_in_format_2_restores_with_mlwarden_and_with_the_recovery_script(tmp_path: Path) -> None:
    expected = format_2_source(tmp_path / "source")
    backups = tmp_path / "backups"
    shutil.copytree(FORMAT_2, backups)
    (directory,) = backups.iterdir()
    assert json.loads((directory / "manifest.json").read_text())["format_version"] == 2
    assert mlwarden("restore", "--backup-dir", backups, "--to", tmp_path / "restored") == 0
    assert tree(tmp_path / "restored") == tree(expected) and links(tmp_path / "restored") == links(expected)
    result = recover(directory, tmp_path / "recovered")
    assert result.returncode == 0, result.stderr
    assert tree(tmp_path / "recovered") == tree(expected) and links(tmp_path / "recovered") == links(expected)
