"""The shared resilience kit: one backoff policy, one secret reader, one disk-space reader."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import botocore.exceptions
import pytest
from mlwarden.jobs import report
from mlwarden.jobs.backup import offsite
from mlwarden.jobs.backup.s3config import OffsiteError, S3Location
from mlwarden.jobs.health import disk
from mlwarden.relay import config as relay_config

from mlwarden import fsutil, logs
from mlwarden.backoff import Backoff, RetrySchedule
from mlwarden.components import free_port
from mlwarden.fsutil import disk_space
from mlwarden.secrets import SecretError, read_secret
from tests.test_relay_support import config_dict


def test_backoff_is_full_jitter_under_a_doubling_cap() -> None:
    top = Backoff(initial=1.0, maximum=10.0, rand=lambda: 1.0)
    assert [top.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert Backoff(1.0, 10.0, rand=lambda: 0.0).delay(4) == 0.0  # the window starts at zero: full jitter
    assert Backoff(1.0, 10.0, rand=lambda: 0.5).delay(3) == 2.0
    assert top.delay(100_000) == 10.0  # a loop failing for months does not overflow


def test_retry_schedule_waits_out_the_delay_and_resets() -> None:
    now = [0.0]
    schedule = RetrySchedule(Backoff(10.0, 60.0, rand=lambda: 1.0), clock=lambda: now[0])
    assert schedule.ready()
    schedule.failed()
    assert not schedule.ready()
    now[0] = 10.0
    assert schedule.ready()
    schedule.failed()  # second failure: 20 s
    now[0] = 29.0
    assert not schedule.ready()
    schedule.reset()
    assert schedule.ready()


def test_the_pushgateway_report_retries_with_the_shared_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(report, "PUSH_BACKOFF", Backoff(1.0, 4.0, rand=lambda: 0.25))
    monkeypatch.setattr(report.time, "sleep", slept.append)
    job = report.JobReport("test", pushgateway=f"http://127.0.0.1:{free_port()}")  # nothing listens
    job.publish()  # best effort: logs and gives up
    assert slept == [0.25, 0.5]


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request 503 SlowDown, and counts them."""

    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.requests.append(self.path)
        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def unavailable_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    _Unavailable.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_s3_requests_are_tried_s3_attempts_times_in_all_not_squared(unavailable_s3: str) -> None:
    store = offsite.OffsiteStore(S3Location(bucket="models", endpoint_url=unavailable_s3, attempts=3, retry_base_seconds=0.0))
    with pytest.raises(OffsiteError, match="download of the manifest of b1-20200101T000000Z failed"):
        store.manifest("b1-20200101T000000Z")
    assert len(_Unavailable.requests) == 3  # botocore's 3; the old code made 4 (max_attempts counts retries) x 3


def test_a_failed_check_sends_the_whole_operation_again_but_an_s3_error_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offsite.time, "sleep", lambda seconds: None)
    calls: list[int] = []

    def mismatched_then_good() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OffsiteError("s3://b/k does not match the local archive (hash or size)")
        return "ok"

    assert offsite.with_retries("upload", 3, 0.0, mismatched_then_good) == "ok" and len(calls) == 3
    calls.clear()

    def s3_down() -> str:
        calls.append(1)
        raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3")

    with pytest.raises(OffsiteError, match="upload failed: Could not connect"):
        offsite.with_retries("upload", 3, 0.0, s3_down)
    assert len(calls) == 1


def test_read_secret_from_the_variable_or_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("from-a-file-secret\n")
    assert read_secret("TOKEN", {"TOKEN": " from-the-env-secret "}) == "from-the-env-secret"
    assert read_secret("TOKEN", {"TOKEN_FILE": str(secret)}) == "from-a-file-secret"
    assert read_secret("TOKEN", {"TOKEN": "", "TOKEN_FILE": str(secret)}) == "from-a-file-secret"
    assert read_secret("TOKEN", {"TOKEN": ""}) == ""
    assert read_secret("TOKEN", {}) is None
    assert logs.redact("x from-a-file-secret y") == "x *** y"
    with pytest.raises(SecretError, match=r"cannot read TOKEN_FILE='/nonexistent/token': No such file"):
        read_secret("TOKEN", {"TOKEN_FILE": "/nonexistent/token"})


def test_the_relay_config_reads_secrets_with_the_shared_reader(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "relay.yml"
    path.write_text(yaml.safe_dump(config_dict()))
    env = {"SLACK_WEBHOOK_URL": "https://hooks.slack.test/a", "SLACK_ONCALL_URL": "https://hooks.slack.test/b",
           "PD_KEY": "", "PD_KEY_FILE": "/nonexistent/pd"}
    with pytest.raises(relay_config.ConfigError, match=r"destinations\.pd\.routing_key_env: cannot read PD_KEY_FILE='/nonexistent/pd'"):
        relay_config.load(path, env)
    key = tmp_path / "pd"
    key.write_text("routing-key-from-file\n")
    loaded = relay_config.load(path, {**env, "PD_KEY_FILE": str(key)})
    assert loaded.destinations["pd"].routing_key == "routing-key-from-file"


def test_disk_space_counts_as_df_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = disk_space(tmp_path)
    assert 0 < real.available <= real.size and 0.0 <= real.used_ratio <= 1.0
    # df on a 1000-block filesystem (4 KiB fragments) with 600 free, 50 of them reserved for root
    fake = os.statvfs_result((4096, 4096, 1000, 600, 550, 0, 0, 0, 0, 255))
    monkeypatch.setattr(fsutil.os, "statvfs", lambda path: fake)
    space = disk_space(tmp_path)
    assert (space.size, space.used, space.available) == (1000 * 4096, 400 * 4096, 550 * 4096)
    assert space.used_ratio == 400 / 950  # df's Use%: reserved blocks are not the user's
    assert disk.used_ratio(tmp_path) == (400 / 950, 550 * 4096)
