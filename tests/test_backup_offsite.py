"""The off-site copy against moto's S3 server over real HTTP: upload, S3's checksums checked (through a
corrupting proxy), S3 down, retention in S3."""

from __future__ import annotations

import http.client
import http.server
import os
import random
import subprocess
import sys
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from mlwarden.jobs.backup.offsite import object_checksums
from test_backup_support import backup, forget_pushed, make_models, mlwarden, only_entry, pushed, s3_env, tree  # noqa: F401  (s3_env is a fixture)

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
        f"node-1/{name}/{f}" for f in (entry.manifest.archive, entry.manifest.archive + ".sha256", "SHA256SUMS", "manifest.json", "pack.json")
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
    remaining = {k.split("/")[1] for k in keys(s3_server, bucket) if k.endswith("/manifest.json")}
    assert len(remaining) == 2
    from mlwarden.catalog import Catalog

    kept = Catalog(tmp_path / "backups").entries()
    assert remaining == {e.name for e in kept}
    # The same models each time: the kept backups' content lives in the first one's pack,
    # which stays (without its manifest) as long as they name it.
    packs = {k.split("/")[1] for k in keys(s3_server, bucket)} - remaining
    assert packs == {name for e in kept for name in e.manifest.packs} - remaining


class _CorruptingProxy(http.server.ThreadingHTTPServer):
    """An HTTP proxy between boto3 and the S3 server that flips one byte in the body of every
    uploaded part (a bad NIC, a broken middlebox), when ``corrupt`` is set."""

    daemon_threads = True

    def __init__(self, upstream: str, corrupt: bool) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = urllib.parse.urlsplit(upstream)
        self.corrupt = corrupt
        self.flipped = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive as boto3 expects, and answers Expect: 100-continue
    server: _CorruptingProxy

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.server.corrupt and self.command == "PUT" and "partNumber=" in self.path and body:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0x01]) + body[middle + 1 :]
            self.server.flipped += 1
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
        upstream = http.client.HTTPConnection(self.server.upstream.hostname, self.server.upstream.port, timeout=30)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
        finally:
            upstream.close()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(key, value)
        # A HEAD answer says the object's length, with no body.
        self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def proxy(s3_server: components.S3Server, request: pytest.FixtureRequest) -> Iterator[_CorruptingProxy]:
    server = _CorruptingProxy(s3_server.url, corrupt=request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("proxy", [False, True], indirect=True, ids=["clean", "corrupting"])
def test_a_byte_flipped_on_the_way_to_s3_fails_the_upload(
    tmp_path: Path, s3_server: components.S3Server, bucket: str, proxy: _CorruptingProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "weights.bin").write_bytes(random.Random(7).randbytes(12 * 2**20))  # three 5 MiB parts
    argv = ["--s3-bucket", bucket, "--s3-prefix", "node-1", "--s3-endpoint-url", proxy.url, "--s3-attempts", "1",
            "--s3-chunk-size", "5MiB", "--compression", "none", "--textfile-dir", tmp_path]
    code = backup(models, tmp_path / "backups", *argv)
    metrics = (tmp_path / "mlwarden_backup.prom").read_text()
    entry = only_entry(tmp_path / "backups")
    archive_key = f"node-1/{entry.name}/{entry.manifest.archive}"
    head = boto3.client("s3", endpoint_url=s3_server.url).head_object(Bucket=bucket, Key=archive_key, ChecksumMode="ENABLED")
    assert head["ETag"].endswith('-3"')  # multipart: the parts' checksums are what is compared
    if not proxy.corrupt:
        assert code == 0 and "mlwarden_backup_offsite_success 1.0" in metrics
        local = object_checksums(entry.archive_path, 5 * 2**20)
        assert head["ChecksumSHA256"].split("-")[0] == local.sha256 and head["ETag"] == f'"{local.etag}"'
        return
    assert proxy.flipped == 3
    assert code == 1
    assert "mlwarden_backup_offsite_success 0.0" in metrics
    assert f"s3://{bucket}/{archive_key} is damaged: " in capsys.readouterr().err
    assert f"node-1/{entry.name}/manifest.json" not in keys(s3_server, bucket)  # never committed in S3
    assert entry.status.offsite is None


_LOADS = """
import sys
from mlwarden.cli import main
code = main(sys.argv[1:])
print(" ".join(sorted({m.split(".")[0] for m in sys.modules} & {"boto3", "s3transfer", "prometheus_client"})))
sys.exit(code)
"""


def test_an_archive_under_the_part_size_goes_up_without_boto3s_transfer_manager_or_prometheus_client(
    tmp_path: Path, s3_server: components.S3Server, bucket: str
) -> None:
    """The fixed cost of a daily backup of an unchanged tree: one PUT through botocore's own
    client (the same checks after it), and no metrics library without a place to send metrics."""
    models = make_models(tmp_path / "models")
    argv = ["backup", "--model-dir", models, "--backup-dir", tmp_path / "backups", *s3_args(s3_server, bucket, "--s3-chunk-size", "5MiB")]
    run = subprocess.run([sys.executable, "-c", _LOADS, *map(str, argv)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == []
    entry = only_entry(tmp_path / "backups")
    assert entry.status.offsite is not None and entry.status.offsite.verified
    head = boto3.client("s3", endpoint_url=s3_server.url).head_object(
        Bucket=bucket, Key=f"node-1/{entry.name}/{entry.manifest.archive}", ChecksumMode="ENABLED"
    )
    assert head["Metadata"]["sha256"] == entry.manifest.archive_sha256
    assert head["ChecksumSHA256"] == object_checksums(entry.archive_path, None).sha256
    # With a textfile to write, the metrics are there as before.
    again = [*map(str, argv), "--force", "--textfile-dir", str(tmp_path)]
    run = subprocess.run([sys.executable, "-c", _LOADS, *again], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["prometheus_client"]
    assert "mlwarden_backup_offsite_success 1.0" in (tmp_path / "mlwarden_backup.prom").read_text()


def test_a_missing_pack_that_s3_hides_behind_403_is_uploaded(
    tmp_path: Path, s3_env: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without s3:ListBucket, S3 answers a HEAD of a missing key with 403 Forbidden, not 404."""
    import botocore.exceptions
    from mlwarden.jobs.backup import offsite

    real_client = offsite.s3_client

    class WithoutListBucket:
        def __init__(self, client: Any) -> None:
            self._client = client

        def head_object(self, **kwargs: Any) -> Any:
            try:
                return self._client.head_object(**kwargs)
            except botocore.exceptions.ClientError as exc:
                if exc.response["Error"]["Code"] not in ("404", "NoSuchKey", "NotFound"):
                    raise
                raise botocore.exceptions.ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadObject") from None

        def __getattr__(self, name: str) -> Any:
            return getattr(self._client, name)

    monkeypatch.setattr(offsite, "s3_client", lambda *args: WithoutListBucket(real_client(*args)))
    models, backups = make_models(tmp_path / "models"), tmp_path / "backups"
    assert backup(models, backups) == 0  # no off-site copy yet: its pack is not in the bucket
    (models / "new.bin").write_bytes(os.urandom(3000))
    assert backup(models, backups, "--force", *s3_env) == 0  # needs the first pack, which HEAD calls forbidden
    assert mlwarden("restore", "latest", "--from-s3", *s3_env, "--to", tmp_path / "restored") == 0
    assert tree(tmp_path / "restored") == tree(models)
