"""The fast paths of the archive reader and the restore's writer: the same results as the
general ones, whatever the chunk boundaries, modes and partial reads."""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from pathlib import Path

import pytest
from mlwarden.jobs.backup import prune, tarstream
from mlwarden.jobs.backup.restore import restore_entry
from mlwarden.jobs.backup.verify import verify_archive
from test_backup_support import backup, flip_byte, only_entry, tree

from mlwarden import catalog, fsutil
from mlwarden.catalog import Catalog, FileRecord, LinkRecord


def small_tree(directory: Path, count: int = 60) -> Path:
    rng = random.Random(3)
    for i in range(count):
        sub = directory / f"d{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:03d}.bin").write_bytes(rng.randbytes(rng.randint(0, 1500)))
    (directory / ("long-" + "n" * 120 + ".bin")).write_bytes(b"pax path")  # a pax header before it
    return directory


def test_byte_sum_is_the_sum_of_the_bytes() -> None:
    rng = random.Random(1)
    for block in (b"", bytes(512), b"\xff" * 512, b"\xff" * 256, b"\xff" * 257, *(rng.randbytes(rng.randint(1, 1100)) for _ in range(300))):
        assert tarstream.byte_sum(block) == sum(block)


@pytest.mark.parametrize("chunk", [700, 512, 1500, 4096])
def test_members_cut_by_chunk_boundaries_verify_and_restore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Headers and small members that straddle two reads take the general path; both paths agree."""
    models = small_tree(tmp_path / "models")
    assert backup(models, tmp_path / "backups", "--compression", "none") == 0
    monkeypatch.setattr(tarstream, "CHUNK_BYTES", chunk)
    entry = only_entry(tmp_path / "backups")
    result = verify_archive(entry)
    assert result.ok and result.files == len(tree(models))
    restore_entry(entry, tmp_path / "restored")
    assert tree(tmp_path / "restored") == tree(models)


@pytest.mark.parametrize("chunk", [700, tarstream.CHUNK_BYTES])
def test_damage_in_a_member_is_found_on_either_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    models = small_tree(tmp_path / "models")
    assert backup(models, tmp_path / "backups", "--compression", "none") == 0
    entry = only_entry(tmp_path / "backups")
    flip_byte(entry.archive_path, offset_from_end=3000)
    monkeypatch.setattr(tarstream, "CHUNK_BYTES", chunk)
    assert not verify_archive(entry).ok


def test_a_member_held_whole_can_be_read_in_pieces() -> None:
    content = os.urandom(3000)
    info = tarfile.TarInfo("a.bin")
    info.size = len(content)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(content))
        tar.addfile(tarfile.TarInfo("b.bin"), io.BytesIO(b""))
    found = []
    for header, data in tarstream._headers(tarstream._Blocks(io.BytesIO(buffer.getvalue()))):
        pieces = []
        while piece := data.read(1000):
            pieces.append(piece)
        found.append((header.name, b"".join(pieces), [len(p) for p in pieces]))
    assert found == [("a.bin", content, [1000, 1000, 1000]), ("b.bin", b"", [])]


def test_read_only_and_unreadable_files_come_back_with_their_mode_and_content(tmp_path: Path) -> None:
    """The restore creates each file with its final mode (no fchmod after the write): a mode
    without write permission must not stop the write."""
    models = tmp_path / "models"
    models.mkdir()
    for name, mode in (("read-only.json", 0o444), ("none.bin", 0o000), ("write-only.bin", 0o200)):
        (models / name).write_bytes(name.encode() * 100)
        (models / name).chmod(mode)
    try:
        if os.geteuid() != 0:
            (models / "none.bin").chmod(0o400)  # the backup must read it: as a user only 0o400 can be read
            (models / "write-only.bin").chmod(0o600)
        assert backup(models, tmp_path / "backups") == 0
        entry = only_entry(tmp_path / "backups")
        restore_entry(entry, tmp_path / "restored")
        modes = {r.path: r.mode for r in entry.manifest.files}
        for name, mode in modes.items():
            restored = tmp_path / "restored" / name
            assert restored.stat().st_mode & 0o777 == mode & ~_umask()
            restored.chmod(0o600)
            assert restored.read_bytes() == name.encode() * 100
    finally:
        for path in (*models.iterdir(), *(tmp_path / "restored").glob("*")):
            path.chmod(0o600)


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


@pytest.mark.parametrize(
    "field",
    [
        b"00000002604\0", b"00000002604 ", b"     2604 \0", b"2604\0\0\0\0\0\0\0\0", b"           \0", b"\0" * 12,
        b"\x80" + bytes(10) + b"\x05", b"000000000017",
    ],
)
def test_the_octal_shortcut_parses_as_the_general_parser(field: bytes) -> None:
    block = bytes(124) + field + bytes(512 - 136)
    assert tarstream._octal(block, 124, 135, "size") == tarstream._number(field, "size")


def test_a_bad_octal_field_is_damage() -> None:
    with pytest.raises(tarstream.ArchiveError, match="bad size field"):
        tarstream._octal(bytes(124) + b"0000000x604\0" + bytes(376), 124, 135, "size")


def test_a_large_file_is_handed_to_writeback_as_it_is_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chunk after the first is queued for writeback as it is written, so the final syncfs
    finds it on disk already; the file still comes back whole."""
    models = tmp_path / "models"
    models.mkdir()
    content = os.urandom(3 * tarstream.CHUNK_BYTES + 777)
    (models / "weights.bin").write_bytes(content)
    assert backup(models, tmp_path / "backups") == 0
    ranges: list[tuple[int, int]] = []
    real = fsutil.start_writeback

    def recorded(fd: int, offset: int, length: int) -> None:
        ranges.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr("mlwarden.jobs.backup.restore.start_writeback", recorded)
    restore_entry(only_entry(tmp_path / "backups"), tmp_path / "restored")
    assert (tmp_path / "restored" / "weights.bin").read_bytes() == content
    assert ranges and all(offset + length == following for (offset, length), (following, _) in zip(ranges, ranges[1:], strict=False))
    assert ranges[-1][0] + ranges[-1][1] == len(content)


def test_file_record_lines_are_what_json_dumps_writes() -> None:
    """The manifest's own formatting of a file record matches json.dumps(sort_keys=True), for
    every kind of name, and falls back to it for values of unexpected types."""
    names = ["a.bin", 'q"uote\\back', "é/ü/日本", "ctl\x01\n\t", "bad-\udcff-utf8", "n" * 300]
    records = [
        FileRecord(name, size, "ab" * 32, mtime, mode, pack)
        for name in names
        for size, mtime, mode, pack in ((0, 0.0, 0o644, None), (2**40, 1764000000.123456789, 0o600, "m-20261129T220000Z"), (7, 17, 0o755, None))
    ]
    records.append(FileRecord("odd", True, "ab" * 32, 1.0))  # type: ignore[arg-type]  # a value JSON from elsewhere could hold
    for record in records:
        line = catalog._record_line(record)
        assert line == json.dumps(catalog._record_dict(record), sort_keys=True)
        assert json.loads(line) == catalog._record_dict(record)


def test_record_lines_made_together_are_the_lines_made_one_by_one() -> None:
    """A manifest's file records are formatted together (their mtimes in one call of orjson):
    the same lines as one by one, for mtimes of every kind, and for other records."""
    mtimes = (1764000000.123456789, 0.0, 1e-5, 1e17, -1.5, 1764000000.0)
    records: list[object] = [FileRecord(f"f{i}", i, "ab" * 32, mtime, 0o644, "m-20261129T220000Z") for i, mtime in enumerate(mtimes)]
    for together in (records[:1], records[:2], records, records + [LinkRecord("l", "f0")]):
        expected = [catalog._record_line(record) for record in together]
        assert catalog._record_lines(tuple(together), {}) == expected
        assert expected == [json.dumps(catalog._record_dict(record), sort_keys=True) for record in together]


def test_garbage_collection_without_pruned_packs_reads_no_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's fixed cost does not grow with the catalog: nothing to collect, nothing read."""
    models, backups = tmp_path / "models", tmp_path / "backups"
    models.mkdir()
    (models / "a.bin").write_bytes(b"a" * 100)
    assert backup(models, backups) == 0

    def no_reading(*_: object, **__: object) -> None:
        raise AssertionError("read every manifest with no pruned pack to collect")

    monkeypatch.setattr(Catalog, "entries", no_reading)
    assert prune.collect_garbage(Catalog(backups)) == []
