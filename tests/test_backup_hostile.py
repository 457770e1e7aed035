"""Names from a catalog are hostile: a manifest in the bucket (or on disk) never chooses a path."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import boto3
import pytest
from mlwarden.jobs.backup import tarstream
from test_backup_support import backup, make_models, mlwarden, only_entry, s3_env  # noqa: F401 (s3_env: a fixture)

from mlwarden import components
from mlwarden.catalog import Catalog, CatalogError, Manifest, check_backup_name


def _plant(s3_server: components.S3Server, bucket: str, name: str, archive: str) -> None:
    """A manifest in the bucket whose archive name is ``archive``, with a real object under that
    key and the right hash: only the name check stands between it and the file system."""
    blob = b"\0" * 10240  # an empty tar: the old code even restored it and exited 0
    manifest = {
        "name": name, "source": "/models", "host": "evil", "started_at": time.time(), "finished_at": time.time(),
        "compression": "none", "level": None, "archive": archive, "archive_bytes": len(blob),
        "archive_sha256": hashlib.sha256(blob).hexdigest(), "total_bytes": 0, "files": [], "format_version": 1,
    }
    s3 = boto3.client("s3", endpoint_url=s3_server.url)
    for key, body in (
        (f"fleet/node-7/{name}/{archive}", blob),
        (f"fleet/node-7/{name}/{archive}.sha256", b""),
        (f"fleet/node-7/{name}/SHA256SUMS", b""),
        (f"fleet/node-7/{name}/manifest.json", json.dumps(manifest).encode()),
    ):
        s3.put_object(Bucket=bucket, Key=key, Body=body)


@pytest.mark.parametrize("drill", [False, True])
@pytest.mark.parametrize("archive", ["../../escaped.txt", "ABSOLUTE"])
def test_a_crafted_manifest_in_the_bucket_writes_nothing_outside_and_fails(
    tmp_path: Path, s3_server: components.S3Server, s3_env: list[str], capsys: pytest.CaptureFixture[str], archive: str, drill: bool
) -> None:
    outside = tmp_path / "outside" / "escaped.txt"
    outside.parent.mkdir()
    if archive == "ABSOLUTE":
        archive = str(outside)
    name = "models-20200101T000000Z"
    _plant(s3_server, s3_env[1], name, archive)
    area = tmp_path / "area"
    target = area / "restore" / "here"
    where = ["--drill", "--to", area / "restore"] if drill else ["--to", target]
    code = mlwarden("restore", name, "--from-s3", *s3_env, *where)
    assert not outside.exists()
    for escaped in (area / "escaped.txt", tmp_path / "escaped.txt", area / "restore" / "escaped.txt"):
        assert not escaped.exists()
    assert code == 1
    err = capsys.readouterr().err
    assert "failed unexpectedly" not in err  # one clear line, not a traceback
    assert f"archive {archive!r} is not '{name}.tar'" in err
    assert not target.exists()
    assert [p for p in area.rglob("*") if not p.is_dir()] == []


def test_a_hostile_manifest_is_left_out_of_latest_and_a_hostile_name_is_refused(
    tmp_path: Path, s3_server: components.S3Server, s3_env: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups", *s3_env) == 0
    good = only_entry(tmp_path / "backups").name
    _plant(s3_server, s3_env[1], "zz-29990101T000000Z", "../../escaped.txt")  # the newest, by name and time
    assert mlwarden("restore", "latest", "--from-s3", *s3_env, "--to", tmp_path / "restored") == 0
    err = capsys.readouterr().err
    assert "ignoring s3://" in err and "zz-29990101T000000Z/manifest.json" in err
    assert f"restored {good}" in err
    assert mlwarden("restore", "../../etc", "--from-s3", *s3_env, "--to", tmp_path / "other") == 1
    assert "not a backup name: '../../etc'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("name", ["..", ".", "", "a/b-20200101T000000Z", "/abs-20200101T000000Z", "x-20200101T000000Z\n", "../x-20200101T000000Z"])
def test_only_backup_names_pass(name: str) -> None:
    with pytest.raises(CatalogError):
        check_backup_name(name)
    assert check_backup_name("models.v2_final-20200101T000000Z") == "models.v2_final-20200101T000000Z"


def test_a_local_manifest_naming_an_archive_outside_its_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = make_models(tmp_path / "models")
    assert backup(models, tmp_path / "backups") == 0
    entry = only_entry(tmp_path / "backups")
    data = json.loads((entry.directory / "manifest.json").read_text())
    data["archive"] = "../../models/config.json"
    (entry.directory / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CatalogError, match="is not"):
        Manifest.from_json(json.dumps(data))
    assert mlwarden("restore", entry.name, "--backup-dir", tmp_path / "backups", "--to", tmp_path / "restored") == 1
    err = capsys.readouterr().err
    assert "restore FAILED" in err and "Traceback" not in err
    assert not (tmp_path / "restored").exists()
    assert Catalog(tmp_path / "backups").entries() == []


@pytest.mark.parametrize(
    "names",
    [
        ["a", "dir/sub/file", "é/日本", "x" * 300, "a..b", ".hidden", "a/.b", "..x/y", "x./y", "sp ace"],
        [""], ["/abs"], ["a/"], ["a//b"], ["."], [".."], ["./a"], ["a/."], ["a/./b"], ["../a"], ["a/.."], ["a/../b"],
        ["a\0b"], ["ok", "a/b/.."], ["ok", "\0"], ["ok", "a/b/", "c"],
    ],
)
def test_the_names_tested_together_pass_only_when_each_passes_alone(names: list[str]) -> None:
    """tarstream._plain, the test of all of a manifest's names at once, says yes only when
    check_name returns each one as it is (a no sends them to check_name one by one), and yes
    for names as backups hold them."""
    def unchanged(name: str) -> bool:
        try:
            return tarstream.check_name(name) == name and "\0" not in name
        except tarstream.ArchiveError:
            return False

    assert not tarstream._plain(names) or all(unchanged(name) for name in names)
    assert tarstream._plain(names) == (names[0] == "a")  # only the first list is made of plain names
