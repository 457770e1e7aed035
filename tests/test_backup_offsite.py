"""The off-site copy against moto's S3 server over real HTTP: upload, hash check, S3 down, retention in S3."""

from __future__ import annotations

import uuid
from pathlib import Path

import boto3
import pytest
from test_backup_support import backup, forget_pushed, make_models, only_entry, pushed

from mlwarden import components


@pytest.fixture
def bucket(s3_server: components.S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"models-{uuid.uuid4().hex[:12]}"  # moto keeps buckets across servers in one process
    boto3.client("s3", endpoint_url=s3_server.url).create_bucket(Bucket=name)
    return name


def s3_args(s3_server: components.S3Server, bucket: str, *extra: str) -> list[str]:
    return ["--s3-bucket", bucket, "--s3-prefix", "node-1", "--s3-endpoint-url", s3_server.url, "--s3-retry-base", "0.05", *extra]


def keys(s3_server: components.S3Server, bucket: str) -> list[str]:
    listing = boto3.client("s3", endpoint_url=s3_server.url).list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_upload_stores_the_sha256_as_metadata_and_records_the_copy(
    tmp_path: Path, s3_server: components.S3Server, bucket: str, pushgateway: components.Component
) -> None:
    forget_pushed(pushgateway.url, "mlwarden_backup")
    models = make_models(tmp_path / "models")
    argv = s3_args(s3_server, bucket, "--s3-storage-class", "STANDARD_IA", "--s3-chunk-size", "5MiB", "--pushgateway", pushgateway.url)
    assert backup(models, tmp_path / "backups", *argv) == 0
    entry = only_entry(tmp_path / "backups")
    name = entry.name
    assert keys(s3_server, bucket) == sorted(
        f"node-1/{name}/{f}" for f in (entry.manifest.archive, entry.manifest.archive + ".sha256", "SHA256SUMS", "manifest.json")
    )
    head = boto3.client("s3", endpoint_url=s3_server.url).head_object(Bucket=bucket, Key=f"node-1/{name}/{entry.manifest.archive}")
    assert head["Metadata"]["sha256"] == entry.manifest.archive_sha256
    assert head["StorageClass"] == "STANDARD_IA"
    assert entry.status.offsite is not None and entry.status.offsite.verified
    assert pushed(pushgateway.url, "mlwarden_backup")["mlwarden_backup_offsite_success"] == 1


def test_s3_down_keeps_the_verified_local_backup_exits_1_and_says_so(
    tmp_path: Path,
    s3_server: components.S3Server,
    bucket: str,
    pushgateway: components.Component,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forget_pushed(pushgateway.url, "mlwarden_backup")
    models = make_models(tmp_path / "models")
    secret = "wJalrXUtnFEMI-not-in-any-log"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3_server.stop()
    argv = s3_args(s3_server, bucket, "--s3-attempts", "2", "--pushgateway", pushgateway.url)
    assert backup(models, tmp_path / "backups", *argv) == 1
    entry = only_entry(tmp_path / "backups")
    assert entry.verified is True
    assert entry.status.offsite is None
    err = capsys.readouterr().err
    assert "off-site copy FAILED" in err and "is kept" in err
    assert secret not in err
    metrics = pushed(pushgateway.url, "mlwarden_backup")
    assert metrics["mlwarden_backup_offsite_success"] == 0
    assert metrics["mlwarden_backup_verified"] == 1
    assert metrics["mlwarden_job_success"] == 0
    assert "mlwarden_job_last_success_timestamp_seconds" not in metrics


def test_the_next_run_uploads_a_backup_whose_copy_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = make_models(tmp_path / "models")
    with components.S3Server() as server:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server.stop()
        assert backup(models, tmp_path / "backups", *s3_args(server, "later", "--s3-attempts", "1")) == 1
    with components.S3Server() as server:  # S3 is back (a new server: point the run at it)
        boto3.client("s3", endpoint_url=server.url).create_bucket(Bucket="later")
        assert backup(models, tmp_path / "backups", *s3_args(server, "later")) == 0
        entry = only_entry(tmp_path / "backups")  # still the same day's one backup
        assert entry.status.offsite is not None
        assert any(k.endswith("manifest.json") for k in keys(server, "later"))


def test_retention_in_s3_applies_the_same_rules(tmp_path: Path, s3_server: components.S3Server, bucket: str) -> None:
    models = make_models(tmp_path / "models")
    argv = s3_args(s3_server, bucket, "--period", "run")
    for _ in range(3):
        assert backup(models, tmp_path / "backups", *argv) == 0
    assert len({k.split("/")[1] for k in keys(s3_server, bucket)}) == 3
    assert backup(models, tmp_path / "backups", *argv, "--keep-last", "2", "--s3-retention") == 0
    remaining = {k.split("/")[1] for k in keys(s3_server, bucket)}
    assert len(remaining) == 2
    from mlwarden.catalog import Catalog

    assert remaining == {e.name for e in Catalog(tmp_path / "backups").entries()}
