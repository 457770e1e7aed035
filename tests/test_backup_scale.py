"""Backups of trees with many small files, odd names and Hugging Face caches: read and restored
without tarfile's stream reader and without an fsync per file, byte for byte and link for link."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
from mlwarden.jobs.backup import archive, tarstream
from mlwarden.jobs.backup.restore import restore_entry
from mlwarden.jobs.backup.verify import verify_archive
from test_backup_support import backup, only_entry, tree

from bench.bench_backup import hf_cache, links
from mlwarden import fsutil


def restore(*argv: str | Path) -> int:
    from test_backup_support import mlwarden

    return mlwarden("restore", *argv)


def odd_tree(directory: Path) -> Path:
    """Many small files, empty ones, unicode, a non-UTF-8 name, a long name and a deep path."""
    for i in range(300):
        sub = directory / f"d{i % 7}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:04d}.json").write_bytes(os.urandom(1 + i * 13 % 4000))
    (directory / "empty.bin").write_bytes(b"")
    (directory / "größe-データ.txt").write_text("unicode")
    os.mkdir(os.fsencode(directory) + b"/raw-\xff\xfe")
    (Path(os.fsdecode(os.fsencode(directory) + b"/raw-\xff\xfe")) / "x").write_bytes(b"non-utf-8 parent")
    (directory / ("long-" + "n" * 150 + ".bin")).write_bytes(b"long name")
    deep = directory.joinpath(*(f"level{i}" for i in range(40)))
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_bytes(b"deep")
    (directory / "big.bin").write_bytes(os.urandom(tarstream.CHUNK_BYTES + 12345))  # more than one read
    return directory


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_odd_trees_round_trip_byte_for_byte_without_tarfiles_reader(tmp_path: Path, compression: str, monkeypatch: pytest.MonkeyPatch) -> None:
    models = odd_tree(tmp_path / "models")
    assert backup(models, tmp_path / "backups", "--compression", compression) == 0

    def no_tarfile(*_: object, **__: object) -> None:
        raise AssertionError("tarfile's reader was used")

    monkeypatch.setattr(tarfile, "open", no_tarfile)
    assert verify_archive(only_entry(tmp_path / "backups")).ok
    assert restore("--backup-dir", tmp_path / "backups", "--to", tmp_path / "restored") == 0
    assert tree(tmp_path / "restored") == tree(models)


def test_a_restore_syncs_the_filesystem_once_instead_of_each_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = odd_tree(tmp_path / "models")
    assert backup(models, tmp_path / "backups") == 0
    fsynced: list[int] = []
    synced: list[Path] = []
    real_fsync, real_sync = os.fsync, fsutil.sync_filesystem
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr("mlwarden.jobs.backup.restore.sync_filesystem", lambda path: (synced.append(path), real_sync(path))[1])
    result = restore_entry(only_entry(tmp_path / "backups"), tmp_path / "restored")
    assert result.files == len(tree(models))
    assert len(synced) == 1  # the staging directory, before it is renamed into place
    assert len(fsynced) <= 2  # the target's parent after the swap; never one per file


def test_fast_headers_are_the_ones_tarfile_writes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    os.chmod(path, 0o640)
    info = os.stat(path)
    for name in ("a", "dir/sub/file-00001.json", "n" * 100):
        reference = tarfile.TarInfo(name)
        reference.size, reference.mtime, reference.mode = info.st_size, int(info.st_mtime), 0o640
        reference.uname = reference.gname = ""
        assert archive._header(name, info.st_size, int(info.st_mtime), 0o640) == reference.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_a_damaged_tar_header_is_reported_as_damage(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.bin").write_bytes(b"a" * 600)
    (models / "b.bin").write_bytes(b"b" * 600)
    assert backup(models, tmp_path / "backups", "--compression", "none") == 0
    entry = only_entry(tmp_path / "backups")
    data = bytearray(entry.archive_path.read_bytes())
    data[1536 + 10] ^= 0x01  # the second member's header: a.bin is 512 header + 1024 of data
    entry.archive_path.write_bytes(bytes(data))
    result = verify_archive(entry)
    assert not result.ok and "checksum" in result.detail


def test_a_hugging_face_cache_comes_back_with_every_symlink_and_is_stored_once(tmp_path: Path) -> None:
    cache, blob_bytes = hf_cache(tmp_path / "hub", 300_000)
    assert backup(cache, tmp_path / "backups") == 0
    entry = only_entry(tmp_path / "backups")
    assert entry.manifest.archive_bytes <= 1.05 * blob_bytes
    assert restore("--backup-dir", tmp_path / "backups", "--to", tmp_path / "restored") == 0
    expected = links(cache)
    assert len(expected) == 9 and links(tmp_path / "restored") == expected
    assert tree(tmp_path / "restored") == tree(cache)  # through the links too: every blob is there


@pytest.mark.parametrize(("pax", "said"), [({"size": "-5"}, "pax size"), ({"comment": "x" * 2**21}, "pax header of")])
def test_a_hostile_pax_header_is_damage_not_a_crash(tmp_path: Path, pax: dict[str, str], said: str) -> None:
    import io

    info = tarfile.TarInfo("a.bin")
    info.size = 3
    info.pax_headers = pax
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(tarstream.ArchiveError, match=said):
        list(tarstream._headers(tarstream._Blocks(io.BytesIO(buffer.getvalue()))))  # type: ignore[arg-type]  # a BytesIO stands in for the archive file
