"""The launcher of real components starts each one, and stops it without leaving a process."""

from __future__ import annotations

import subprocess
import urllib.request

import boto3

from mlwarden import components


def test_prometheus_and_pushgateway_start_and_stop(start_prometheus, pushgateway) -> None:
    prom = start_prometheus(f"""
global: {{scrape_interval: 1s}}
scrape_configs:
  - job_name: pushgateway
    honor_labels: true
    static_configs: [{{targets: ['{pushgateway.url.removeprefix("http://")}']}}]
""")
    with urllib.request.urlopen(prom.url + "/api/v1/status/buildinfo", timeout=5) as response:
        assert b'"version":"2.' in response.read()
    prom.stop()
    assert prom.process is not None and prom.process.poll() is not None


def test_redis_answers_ping(redis_server) -> None:
    assert components._redis_ready(redis_server)


def test_s3_server_speaks_s3_over_http(s3_server) -> None:
    client = boto3.client(
        "s3", endpoint_url=s3_server.url, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
    )
    client.create_bucket(Bucket="mlwarden-test")
    client.put_object(Bucket="mlwarden-test", Key="k", Body=b"hello")
    assert client.get_object(Bucket="mlwarden-test", Key="k")["Body"].read() == b"hello"


def test_missing_binary_names_the_debian_package(monkeypatch) -> None:
    monkeypatch.setitem(components.INSTALLS, "redis", ("redis-server", ("no-such-redis",)))
    try:
        components.find_binary("redis")
    except components.ComponentError as exc:
        assert "apt-get install -y --no-install-recommends redis-server" in str(exc)
    else:
        raise AssertionError("expected ComponentError")


def test_readme_configuration_tables_are_current() -> None:
    result = subprocess.run(["python", "-m", "mlwarden.docgen", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
