"""Reading manifests and packs: the fast parser reads what the plain one did, and refuses every bad record."""

from __future__ import annotations

import json
import os
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pytest
from test_backup_support import backup, make_models, mlwarden, only_entry, tree

from mlwarden.catalog import MANIFEST, PACK, Catalog, CatalogError, FileRecord, Manifest, Pack


def _plain_records(text: bytes) -> tuple[FileRecord, ...]:
    """What ``from_json`` built before orjson and the typed fast path: the reference."""
    return tuple(FileRecord(**f) for f in json.loads(text)["files"])


def _backed_up(tmp_path: Path, non_utf8_name: bool = False) -> tuple[Path, Any]:
    models = make_models(tmp_path / "models")
    (models / "naïve ünïcode.json").write_text("{}")
    if non_utf8_name:  # a lone surrogate escape in the JSON: orjson refuses it, json reads it
        (models / os.fsdecode(b"latin1-caf\xe9.bin")).write_bytes(b"not UTF-8 in the name")
    (models / "empty").write_bytes(b"")
    assert backup(models, tmp_path / "backups") == 0
    return models, only_entry(tmp_path / "backups")


@pytest.mark.parametrize("non_utf8_name", [False, True])
def test_a_real_backup_reads_back_as_the_plain_parser_read_it(tmp_path: Path, non_utf8_name: bool) -> None:
    _, entry = _backed_up(tmp_path, non_utf8_name)
    for name, cls in ((MANIFEST, Manifest), (PACK, Pack)):
        text = (entry.directory / name).read_bytes()
        parsed = cls.from_json(text)
        assert parsed.files == _plain_records(text)
        assert [tuple(map(type, astuple(r))) for r in parsed.files] == [tuple(map(type, astuple(r))) for r in _plain_records(text)]  # 1.0 is no 1
        assert parsed.to_json() == text.decode()  # written again byte for byte
    assert any(record.path.startswith("latin1-caf") for record in entry.manifest.files) == non_utf8_name


def test_a_format_2_record_without_pack_or_mode_and_with_an_integer_mtime_still_reads(tmp_path: Path) -> None:
    record = {"path": "a", "size": 1, "sha256": "0" * 64, "mtime": 1700000000}
    manifest = {
        "name": "m-20200101T000000Z", "source": "/m", "host": "h", "started_at": 1.0, "finished_at": 2.0, "compression": "none",
        "level": None, "archive": "m-20200101T000000Z.tar", "archive_bytes": 0, "archive_sha256": "", "total_bytes": 1, "files": [record],
    }
    parsed = Manifest.from_json(json.dumps(manifest))
    assert parsed.files == (FileRecord(path="a", size=1, sha256="0" * 64, mtime=1700000000),)
    assert parsed.files[0].mode == 0o644 and parsed.files[0].pack is None


_BAD_RECORDS: dict[str, tuple[str, Any]] = {
    # field -> a value that no backup writes (the old parser took all but the missing/unknown ones)
    "size as text": ("size", "12"),
    "size as a float": ("size", 12.0),
    "size as a boolean": ("size", True),
    "size beyond 64 bits": ("size", 2**70),
    "size beyond 63 bits": ("size", 2**63),
    "size negative": ("size", -1),
    "mode as text": ("mode", "0644"),
    "mtime as text": ("mtime", "yesterday"),
    "mtime NaN": ("mtime", float("nan")),
    "mtime infinite": ("mtime", float("inf")),
    "sha256 null": ("sha256", None),
    "path as a number": ("path", 7),
    "path nested junk": ("path", {"a": [1, {"b": None}]}),
    "pack as a list": ("pack", ["x"]),
    "an unknown key": ("owner", "root"),
    "path missing": ("path", ...),
    "size missing": ("size", ...),
}


@pytest.mark.parametrize("kind", sorted(_BAD_RECORDS))
@pytest.mark.parametrize("index", [MANIFEST, PACK])
def test_each_kind_of_bad_file_record_is_a_catalog_error_naming_the_file(tmp_path: Path, kind: str, index: str) -> None:
    _, entry = _backed_up(tmp_path)
    path = entry.directory / index
    data = json.loads(path.read_bytes())
    key, value = _BAD_RECORDS[kind]
    if value is ...:
        del data["files"][-1][key]
    else:
        data["files"][-1][key] = value
    path.write_text(json.dumps(data))  # NaN and Infinity as Python's json writes them
    with pytest.raises(CatalogError, match="is missing or has wrong fields") as raised:
        Catalog.read(entry.directory)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
    assert Catalog(tmp_path / "backups").entries() == []


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"[1, 2]", id="not an object"),
        pytest.param(b'{"files": ', id="cut short"),
        pytest.param(b'{"name": "\xff"}', id="not UTF-8"),
        pytest.param(b'{"files": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", id="nested 100,000 deep"),
        pytest.param(b'{"files": "abc"}', id="files not a list"),
        pytest.param(b'{"files": [[1, 2]]}', id="a record not an object"),
    ],
)
def test_a_manifest_that_is_no_manifest_is_a_catalog_error_naming_it(tmp_path: Path, text: bytes) -> None:
    _, entry = _backed_up(tmp_path)
    (entry.directory / MANIFEST).write_bytes(text)
    with pytest.raises(CatalogError) as raised:
        Catalog.read(entry.directory)
    assert str(entry.directory / MANIFEST) in str(raised.value)


def test_a_restore_of_a_manifest_with_a_nan_mtime_fails_cleanly_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, entry = _backed_up(tmp_path)
    data = json.loads((entry.directory / MANIFEST).read_bytes())
    data["files"][0]["mtime"] = float("nan")
    (entry.directory / MANIFEST).write_text(json.dumps(data))
    assert mlwarden("restore", entry.name, "--backup-dir", tmp_path / "backups", "--to", tmp_path / "restored") == 1
    err = capsys.readouterr().err
    assert "restore FAILED" in err and str(entry.directory / MANIFEST) in err and "Traceback" not in err
    assert not (tmp_path / "restored").exists()


def test_a_backup_with_odd_names_still_restores_exactly(tmp_path: Path) -> None:
    models, entry = _backed_up(tmp_path, non_utf8_name=True)
    assert mlwarden("restore", entry.name, "--backup-dir", tmp_path / "backups", "--to", tmp_path / "restored") == 0
    assert tree(tmp_path / "restored") == tree(models)
