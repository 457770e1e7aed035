"""A backup with nothing new to store has no pack of its own (issue 14): only its manifest and
SHA256SUMS, locally and in the bucket. Every reader handles it (restore from the disk and
from S3, the drill, the recovery script, check, list, retention, the exporter), its
verification goes through the packs it names, and backups whose own pack is empty (made
before) still read."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import boto3
import pytest
import zstandard
from mlwarden.exporter.collectors.backups import BackupsCollector
from mlwarden.jobs.backup.archive import sha256sum_line
from mlwarden.jobs.backup.inventory import describe
from mlwarden.jobs.backup.s3config import S3Location
from mlwarden.jobs.backup.verify import verify_and_record
from test_backup_dedup import metrics, restored, run, settle
from test_backup_recovery import recover
from test_backup_support import flip_byte, make_models, mlwarden, s3_env, tree

from mlwarden import components
from mlwarden.catalog import PACK, PRUNED, BackupEntry, Catalog, CatalogError, FileRecord, LinkRecord, Manifest, Pack

__all__ = ["s3_env"]  # a fixture: imported to be used


def _models(directory: Path) -> Path:
    make_models(directory)
    (directory / "nested" / "deeper").mkdir(parents=True)
    (directory / "nested" / "deeper" / "größe.bin").write_bytes(b"\x00\xff" * 3000)
    (directory / "empty").write_bytes(b"")
    return directory


def _bucket_files(s3_server: components.S3Server, s3_env: list[str]) -> dict[str, set[str]]:
    """The bucket's keys by backup name."""
    s3 = boto3.client("s3", endpoint_url=s3_server.url)
    groups: dict[str, set[str]] = {}
    for obj in s3.list_objects_v2(Bucket=s3_env[s3_env.index("--s3-bucket") + 1]).get("Contents", []):
        name, file_name = obj["Key"].split("/")[2:]
        groups.setdefault(name, set()).add(file_name)
    return groups


def test_an_unchanged_backup_has_no_pack_and_restores_from_the_disk_from_s3_and_by_hand(
    tmp_path: Path, s3_env: list[str], s3_server: components.S3Server
) -> None:
    models, backups = _models(tmp_path / "models"), tmp_path / "backups"
    settle()
    run(models, backups, tmp_path, *s3_env)
    run(models, backups, tmp_path, *s3_env)
    assert metrics(tmp_path)["mlwarden_backup_written_bytes"] == 0
    first, second = Catalog(backups).entries()
    assert not second.manifest.has_archive and second.pack is None and second.manifest.packs == (first.name,)
    assert sorted(p.name for p in second.directory.iterdir()) == ["SHA256SUMS", "manifest.json", "status.json"]
    assert second.verified is True and second.status.verification is not None
    assert "no archive of its own" in second.status.verification.detail
    # Off-site: the pack it names was checked to be there; only its index went up.
    groups = _bucket_files(s3_server, s3_env)
    assert groups[second.name] == {"manifest.json", "SHA256SUMS"}
    assert second.status.offsite is not None and second.status.offsite.verified
    assert second.status.offsite.key == f"fleet/node-7/{second.name}/manifest.json"
    assert second.status.offsite.sha256 == hashlib.sha256((second.directory / "manifest.json").read_bytes()).hexdigest()
    expected = tree(models)
    assert restored(second.name, backups, tmp_path / "local") == expected
    assert mlwarden("restore", second.name, "--backup-dir", backups, "--drill") == 0
    done = recover(second.directory, tmp_path / "by-hand")
    assert done.returncode == 0, done.stderr
    assert tree(tmp_path / "by-hand") == expected
    assert mlwarden("backup-check", "--backup-dir", backups, "--read-data") == 0
    row = describe(second)
    assert (row["kind"], row["new_bytes"], row["stored_bytes"], row["packs"]) == ("backup", 0, 0, [first.name])
    families = {f.name: f.samples[0][1] for f in BackupsCollector(backups, 60, 60).collect().families if f.samples}
    assert families["mlwarden_backups"] == 2
    assert families["mlwarden_backup_size_bytes"] == first.manifest.archive_bytes
    shutil.rmtree(backups)  # the machine lost its disk
    assert mlwarden("restore", second.name, "--from-s3", *s3_env, "--to", tmp_path / "from-s3") == 0
    assert tree(tmp_path / "from-s3") == expected


def test_an_unchanged_backup_uploads_the_pack_it_names_when_the_bucket_lacks_it(
    tmp_path: Path, s3_env: list[str], s3_server: components.S3Server
) -> None:
    models, backups = _models(tmp_path / "models"), tmp_path / "backups"
    settle()
    run(models, backups, tmp_path)  # S3 configured only later
    run(models, backups, tmp_path, *s3_env)
    first, second = Catalog(backups).entries()
    assert not second.manifest.has_archive
    groups = _bucket_files(s3_server, s3_env)
    assert PACK in groups[first.name] and "manifest.json" not in groups[first.name]  # a pack there, not a backup
    shutil.rmtree(backups)
    assert mlwarden("restore", "latest", "--from-s3", *s3_env, "--to", tmp_path / "r") == 0
    assert tree(tmp_path / "r") == tree(models)


def test_an_unchanged_backup_is_verified_through_the_packs_it_names(tmp_path: Path) -> None:
    models, backups = _models(tmp_path / "models"), tmp_path / "backups"
    settle()
    run(models, backups, tmp_path, "--no-verify")
    run(models, backups, tmp_path)  # the first pack was never verified: it is read now, and that is recorded
    first, second = Catalog(backups).entries()
    assert first.verified is True and second.verified is True
    flip_byte(first.archive_path)  # damaged after its verification: the drill and --read-data catch it
    assert mlwarden("backup-check", "--backup-dir", backups, "--read-data") == 1


def test_an_unchanged_backup_fails_with_a_damaged_pack_that_was_never_verified(tmp_path: Path) -> None:
    models, backups = _models(tmp_path / "models"), tmp_path / "backups"
    settle()
    run(models, backups, tmp_path, "--no-verify")
    first = Catalog(backups).entries()[0]
    flip_byte(first.archive_path)
    assert mlwarden("backup", "--model-dir", models, "--backup-dir", backups, "--period", "run") == 1
    first, second = Catalog(backups).entries()
    assert not second.manifest.has_archive and second.verified is False and first.verified is False
    assert second.status.verification is not None and first.name in second.status.verification.detail
    run(models, backups, tmp_path)  # the damaged pack is no longer used: everything is stored again
    third = Catalog(backups).entries()[-1]
    assert third.manifest.has_archive and third.manifest.packs == (third.name,) and third.verified is True
    assert restored(third.name, backups, tmp_path / "r") == tree(models)


def test_a_pack_an_unchanged_backup_names_must_be_there_and_hold_its_content(tmp_path: Path) -> None:
    models, backups = _models(tmp_path / "models"), tmp_path / "backups"
    settle()
    run(models, backups, tmp_path)
    run(models, backups, tmp_path)
    first, second = Catalog(backups).entries()
    data = first.archive_path.read_bytes()
    first.archive_path.write_bytes(data[:-10])  # verified when it was made, cut short since
    entry, result = verify_and_record(second)
    assert not result.ok and f"pack {first.name}: archive {first.manifest.archive} is missing or has" in result.detail
    first.archive_path.write_bytes(data)
    assert verify_and_record(second)[1].ok
    pack = json.loads((first.directory / PACK).read_text())
    pack["files"] = pack["files"][1:]
    (first.directory / PACK).write_text(json.dumps(pack))
    entry, result = verify_and_record(second)
    assert not result.ok and f"pack {first.name} does not hold the content" in result.detail and entry.verified is False
    assert mlwarden("backup-check", "--backup-dir", backups) == 1
    shutil.rmtree(first.directory)
    entry, result = verify_and_record(second)
    assert not result.ok and f"pack {first.name} is missing" in result.detail
    assert mlwarden("restore", second.name, "--backup-dir", backups, "--to", tmp_path / "r") == 1
    assert not (tmp_path / "r").exists()


def test_retention_removes_unchanged_backups_whole_and_keeps_the_packs_they_name(
    tmp_path: Path, s3_env: list[str], s3_server: components.S3Server
) -> None:
    models, backups = _models(tmp_path / "models"), tmp_path / "backups"
    settle()
    for _ in range(3):
        run(models, backups, tmp_path, *s3_env)
    first, second, third = Catalog(backups).entries()
    run(models, backups, tmp_path, *s3_env, "--keep-last", "1", "--s3-retention")
    fourth = Catalog(backups).entries()[-1]
    assert [e.name for e in Catalog(backups).entries()] == [fourth.name]
    assert not (backups / second.name).exists() and not (backups / third.name).exists()  # nothing of theirs was needed
    assert (backups / first.name / PRUNED).exists() and (backups / first.name / PACK).exists()  # the pack fourth names
    groups = _bucket_files(s3_server, s3_env)
    assert set(groups) == {first.name, fourth.name} and "manifest.json" not in groups[first.name]
    assert restored(fourth.name, backups, tmp_path / "local") == tree(models)
    shutil.rmtree(backups)
    assert mlwarden("restore", "latest", "--from-s3", *s3_env, "--to", tmp_path / "r") == 0
    assert tree(tmp_path / "r") == tree(models)


def _with_empty_pack(entry: BackupEntry) -> BackupEntry:
    """``entry`` (no archive of its own) as the version before this one wrote it: an empty
    pack, its archive (a tar without members, zstd-compressed), the archive's .sha256."""
    buffer = io.BytesIO()
    tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT).close()
    data = zstandard.ZstdCompressor(level=1).compress(buffer.getvalue())
    manifest = entry.manifest
    archive = f"{entry.name}.tar.zst"
    (entry.directory / archive).write_bytes(data)
    sha256 = hashlib.sha256(data).hexdigest()
    (entry.directory / f"{archive}.sha256").write_text(sha256sum_line(sha256, archive))
    pack = Pack(name=entry.name, compression="zstd", level=manifest.level, archive=archive, archive_bytes=len(data), archive_sha256=sha256, files=())
    old = dataclasses.replace(manifest, archive=archive, archive_bytes=len(data), archive_sha256=sha256)
    Catalog.commit(entry.directory, old, pack)
    (entry.directory / "status.json").unlink()
    read = Catalog.read(entry.directory)
    assert read is not None and read.pack is not None and read.manifest.packs == (manifest.packs[0], entry.name)
    return read


def test_backups_whose_own_pack_is_empty_still_read_verify_restore_and_go_off_site(tmp_path: Path, s3_env: list[str]) -> None:
    models, backups = _models(tmp_path / "models"), tmp_path / "backups"
    settle()
    run(models, backups, tmp_path)
    run(models, backups, tmp_path)
    old = _with_empty_pack(Catalog(backups).entries()[-1])
    entry, result = verify_and_record(old)
    assert result.ok and "archive hash match" in result.detail
    expected = tree(models)
    assert restored(old.name, backups, tmp_path / "local") == expected
    done = recover(old.directory, tmp_path / "by-hand")
    assert done.returncode == 0, done.stderr
    assert tree(tmp_path / "by-hand") == expected
    assert mlwarden("backup-check", "--backup-dir", backups, "--read-data") == 0
    assert describe(entry)["new_bytes"] == 0 and describe(entry)["kind"] == "backup"
    run(models, backups, tmp_path, *s3_env)  # a new one, with no pack: uploads the first's and its own index
    latest = Catalog(backups).entries()[-1]
    assert not latest.manifest.has_archive
    from mlwarden.jobs.backup.offsite import OffsiteStore

    bucket = s3_env[s3_env.index("--s3-bucket") + 1]
    endpoint = s3_env[s3_env.index("--s3-endpoint-url") + 1]
    OffsiteStore(S3Location(bucket=bucket, prefix="fleet/node-7", endpoint_url=endpoint)).upload(entry)  # the old one
    shutil.rmtree(backups)
    for name in (old.name, latest.name):
        assert mlwarden("restore", name, "--from-s3", *s3_env, "--to", tmp_path / name) == 0
        assert tree(tmp_path / name) == expected


def _manifest(**changes: object) -> Manifest:
    name = "models-20260101T000000Z"
    base = Manifest(
        name=name, source="/m", host="h", started_at=1.0, finished_at=2.0, compression="zstd", level=1, archive="", archive_bytes=0,
        archive_sha256="", total_bytes=3, files=(FileRecord("a", 3, "0" * 64, 1.0, pack="models-20250101T000000Z"),), format_version=3,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]  # test values of the fields' own types


def test_a_manifest_without_an_archive_must_store_nothing() -> None:
    manifest = _manifest()
    assert Manifest.from_json(manifest.to_json()) == manifest and manifest.packs == ("models-20250101T000000Z",)
    bad = [
        {"format_version": 2, "files": (FileRecord("a", 3, "0" * 64, 1.0),)},
        {"archive_bytes": 22},
        {"archive_sha256": "0" * 64},
        {"links": (LinkRecord("l", "a"),)},
        {"files": (FileRecord("a", 3, "0" * 64, 1.0, pack="models-20260101T000000Z"),)},
    ]
    for changes in bad:
        with pytest.raises(CatalogError):
            _manifest(**changes)


S3_MODELS = ["endpoints", "partitions", "sdk-default-configuration", "s3/2006-03-01/service-2", "s3/2006-03-01/endpoint-rule-set-1"]


@pytest.mark.parametrize("model", S3_MODELS)
def test_the_s3_clients_models_read_as_botocore_reads_them(model: str) -> None:
    import botocore.loaders  # type: ignore[import-untyped]  # no type hints
    from mlwarden.jobs.backup.offsite import _JSONFiles

    path = str(Path(botocore.loaders.__file__).parent / "data" / model)
    ours, theirs = _JSONFiles().load_file(path), botocore.loaders.JSONFileLoader().load_file(path)
    assert ours is not None and ours == theirs


def test_no_verifier_is_forked_for_a_backup_that_will_store_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlwarden.jobs.backup.follow import Follower

    started: list[int] = []
    start = Follower.start
    monkeypatch.setattr(Follower, "start", lambda self, handle: started.append(1) or start(self, handle))
    models, backups = _models(tmp_path / "models"), tmp_path / "backups"
    settle()
    run(models, backups, tmp_path)
    run(models, backups, tmp_path)
    assert len(started) == 1 and Catalog(backups).entries()[-1].verified is True
    (models / "new.bin").write_bytes(b"new content")
    settle()
    run(models, backups, tmp_path)
    latest = Catalog(backups).entries()[-1]
    assert len(started) == 2 and latest.manifest.has_archive and latest.verified is True


def test_the_days_unchanged_backup_is_verified_again_and_found_off_site_by_the_next_run(
    tmp_path: Path, s3_env: list[str], s3_server: components.S3Server
) -> None:
    models, backups = _models(tmp_path / "models"), tmp_path / "backups"
    settle()
    assert mlwarden("backup", "--model-dir", models, "--backup-dir", backups, *s3_env) == 0
    assert mlwarden("backup", "--model-dir", models, "--backup-dir", backups, "--force", *s3_env) == 0
    second = Catalog(backups).entries()[-1]
    assert not second.manifest.has_archive and second.status.offsite is not None
    uploaded = _bucket_files(s3_server, s3_env)
    assert mlwarden("backup", "--model-dir", models, "--backup-dir", backups, *s3_env) == 0  # the day's backup exists
    assert [e.name for e in Catalog(backups).entries()][-1] == second.name and _bucket_files(s3_server, s3_env) == uploaded
    again = Catalog(backups).entries()[-1]
    assert again.verified is True and again.status.offsite == second.status.offsite
    assert again.status.verification is not None and second.status.verification is not None
    assert again.status.verification.checked_at > second.status.verification.checked_at
