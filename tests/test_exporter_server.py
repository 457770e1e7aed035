"""The running exporter over HTTP: real promtool, a real Prometheus, fault injection,
basic auth, TLS, the scrape bound, and the `mlwarden exporter` command itself."""

from __future__ import annotations

import base64
import datetime
import http.client
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mlwarden.exporter.app import Exporter
from mlwarden.exporter.cli import ExporterSettings
from mlwarden.exporter.server import ExporterServer
from mlwarden.exporter.snapshot import Snapshot, SnapshotStore
from prometheus_client.parser import text_string_to_metric_families

from mlwarden import settings
from mlwarden.components import free_port, wait_until

REPO = Path(__file__).resolve().parent.parent


def load(*argv: str, environ: dict[str, str] | None = None) -> ExporterSettings:
    return settings.load(ExporterSettings, "exporter", list(argv), environ or {})


def request(url: str, data: Any = None, headers: dict[str, str] | None = None,
            context: ssl.SSLContext | None = None) -> tuple[int, str]:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(body: str, metric: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


@pytest.fixture
def start_exporter(tmp_path: Path) -> Iterator[Callable[..., Exporter]]:
    started: list[Exporter] = []

    def start(*argv: str, environ: dict[str, str] | None = None) -> Exporter:
        exporter = Exporter.from_settings(load(
            "--gpu-backend", "simulated", "--listen-address", f"127.0.0.1:{free_port()}",
            "--interval", "0.2", "--artifacts-interval", "0.2", *argv, environ=environ,
        ))
        exporter.start()
        started.append(exporter)
        return exporter

    yield start
    for exporter in started:
        exporter.stop()


def url_of(exporter: Exporter, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{exporter.port}"


def test_promtool_finds_nothing_wrong_with_the_real_output(start_exporter: Callable[..., Exporter], promtool: str, tmp_path: Path) -> None:
    (tmp_path / "experiments" / "run1").mkdir(parents=True)
    (tmp_path / "experiments" / "run1" / "weights.bin").write_bytes(b"x" * 1000)
    exporter = start_exporter("--simulated-gpus", "3", "--backup-dir", str(tmp_path / "backups"),
                              "--experiments-dir", str(tmp_path / "experiments"))
    url = url_of(exporter)
    assert request(url + "/-/simulate", {"gpu": 2, "fault": "xid", "xid": 79})[0] == 200
    assert request(url + "/-/simulate", {"gpu": 1, "fault": "lose"})[0] == 200
    body = wait_until(lambda: (b := request(url + "/metrics")[1]) and "mlwarden_gpu_xid_errors_total" in b
                      and "mlwarden_artifacts_files" in b and 'mlwarden_gpu_up{gpu="1"' in b and b,
                      15, "the XID, the lost GPU and the artifacts in /metrics")
    checked = subprocess.run([promtool, "check", "metrics"], input=body.encode(), capture_output=True, timeout=30)
    assert checked.returncode == 0, checked.stderr.decode()
    assert checked.stdout.decode() + checked.stderr.decode() == ""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    documented = (Path(__file__).resolve().parent.parent / "docs" / "exporter.md").read_text()
    served = set(re.findall(r"^# TYPE (mlwarden_\w+)", body, re.M))
    assert {name for name in served if f"`{name}`" not in documented} == set()  # the metric table lists every family


def test_a_real_prometheus_scrapes_every_simulated_gpu(start_exporter: Callable[..., Exporter], start_prometheus: Callable[..., Any]) -> None:
    exporter = start_exporter("--simulated-gpus", "3")
    prometheus = start_prometheus(f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: mlwarden_exporter
    static_configs:
      - targets: ["127.0.0.1:{exporter.port}"]
""")
    query = urllib.parse.urlencode({"query": "mlwarden_gpu_temperature_celsius"})

    def gpus_seen() -> set[str]:
        status, body = request(f"{prometheus.url}/api/v1/query?{query}")
        assert status == 200, body
        return {r["metric"]["gpu"] for r in json.loads(body)["data"]["result"]}

    assert wait_until(lambda: gpus_seen() == {"0", "1", "2"}, 30, "Prometheus to see the three GPUs")
    status, body = request(f"{prometheus.url}/api/v1/query?" + urllib.parse.urlencode({"query": "up"}))
    assert json.loads(body)["data"]["result"][0]["value"][1] == "1"


def test_fault_injection_endpoint(start_exporter: Callable[..., Exporter]) -> None:
    url = url_of(start_exporter("--simulated-gpus", "2"))

    def metric(name: str, **labels: str) -> float | None:
        return sample(request(url + "/metrics")[1], name, **labels)

    assert request(url + "/-/simulate", {"gpu": 0, "fault": "overheat"}) == (200, '{"ok": true}\n')
    assert wait_until(lambda: metric("mlwarden_gpu_temperature_celsius", gpu="0") == 94.0, 15, "GPU 0 to overheat")
    assert metric("mlwarden_gpu_throttle_reason_active", gpu="0", reason="hw_thermal_slowdown") == 1
    assert request(url + "/-/simulate", {"gpu": 0, "fault": "cool"})[0] == 200
    assert wait_until(lambda: (metric("mlwarden_gpu_temperature_celsius", gpu="0") or 100) < 90, 15, "GPU 0 to cool down")

    assert request(url + "/-/simulate", {"gpu": 1, "fault": "lose"})[0] == 200
    assert wait_until(lambda: metric("mlwarden_gpu_up", gpu="1") == 0, 15, "GPU 1 to be lost")
    assert metric("mlwarden_gpu_up", gpu="0") == 1
    assert metric("mlwarden_gpu_temperature_celsius", gpu="1") is None
    assert request(url + "/-/simulate", {"gpu": 1, "fault": "recover"})[0] == 200
    assert wait_until(lambda: metric("mlwarden_gpu_up", gpu="1") == 1, 15, "GPU 1 to be back")

    assert request(url + "/-/simulate", {"gpu": 1, "fault": "ecc", "count": 2})[0] == 200
    assert wait_until(lambda: metric("mlwarden_gpu_ecc_errors_total", gpu="1", error_type="uncorrected", counter="volatile") == 2,
                      15, "two uncorrected ECC errors on GPU 1")
    assert request(url + "/-/simulate", {"gpu": 1, "fault": "xid", "xid": 79, "count": 3})[0] == 200
    assert request(url + "/-/simulate", {"gpu": 1, "fault": "xid", "xid": 79})[0] == 200
    assert wait_until(lambda: metric("mlwarden_gpu_xid_errors_total", gpu="1", xid="79") == 4, 15, "four XID 79 on GPU 1")

    for bad in ({"gpu": 9, "fault": "lose"}, {"gpu": 0, "fault": "explode"}, {"gpu": "0", "fault": "lose"}, [1]):
        status, body = request(url + "/-/simulate", bad)
        assert status == 400 and "error" in json.loads(body), bad


def test_fault_injection_does_not_exist_without_the_simulated_backend(tmp_path: Path) -> None:
    exporter = Exporter.from_settings(load("--gpu-backend", "auto", "--listen-address", f"127.0.0.1:{free_port()}",
                                           "--no-collector-gpu", "--no-collector-processes", "--no-collector-xid"))
    exporter.start()
    try:
        assert request(url_of(exporter) + "/-/simulate", {"gpu": 0, "fault": "lose"})[0] == 404
    finally:
        exporter.stop()


def test_basic_auth_protects_metrics_but_not_healthz(start_exporter: Callable[..., Exporter]) -> None:
    exporter = start_exporter("--basic-auth-user", "prom",
                              environ={"MLWARDEN_EXPORTER_BASIC_AUTH_PASSWORD": "s3cret-pass"})
    url = url_of(exporter)
    wait_until(lambda: exporter.store.snapshot.body.count(b"mlwarden_gpu_up{") == 2, 15, "the first collection")

    def auth(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    assert request(url + "/metrics")[0] == 401
    assert request(url + "/metrics", headers=auth("prom", "wrong"))[0] == 401
    assert request(url + "/metrics", headers={"Authorization": "Basic !!!"})[0] == 401
    status, body = request(url + "/metrics", headers=auth("prom", "s3cret-pass"))
    assert status == 200 and "mlwarden_gpu_temperature_celsius" in body
    assert "s3cret-pass" not in body
    assert request(url + "/-/simulate", {"gpu": 0, "fault": "lose"})[0] == 401
    assert request(url + "/healthz")[0] == 200


def test_a_refused_post_does_not_poison_the_keep_alive_connection(start_exporter: Callable[..., Exporter]) -> None:
    exporter = start_exporter("--basic-auth-user", "prom",
                              environ={"MLWARDEN_EXPORTER_BASIC_AUTH_PASSWORD": "s3cret-pass"})
    credentials = {"Authorization": "Basic " + base64.b64encode(b"prom:s3cret-pass").decode()}
    # /metrics is served before the first collection ends; wait for it, so that a body without
    # mlwarden_nvml_up below can only mean a poisoned connection (a loaded host raced it).
    wait_until(lambda: "mlwarden_nvml_up" in request(f"http://127.0.0.1:{exporter.port}/metrics", headers=credentials)[1],
               15, "the first collection")
    conn = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=10)
    try:
        for path, headers in (("/-/simulate", {}), ("/-/elsewhere", credentials)):
            conn.request("POST", path, body=json.dumps({"gpu": 0, "fault": "lose"}), headers=headers)
            refused = conn.getresponse()
            refused.read()
            assert refused.status in (401, 404)
            # the unread body must not be taken for the next request on the same connection
            conn.request("GET", "/metrics", headers=credentials)
            response = conn.getresponse()
            assert response.status == 200 and b"mlwarden_nvml_up" in response.read()
    finally:
        conn.close()


def test_scrapes_beyond_the_bound_get_503(start_exporter: Callable[..., Exporter]) -> None:
    exporter = start_exporter("--max-concurrent-scrapes", "2")
    wait_until(lambda: b"mlwarden_gpu_up{" in exporter.store.snapshot.body, 15, "the first collection")
    exporter.loop.stop()
    # A body far larger than the socket buffers: a client that does not read holds its slot.
    exporter.store.snapshot = Snapshot(exporter.store.snapshot.body * (32 * 2**20 // len(exporter.store.snapshot.body)))
    exporter.server.app.queue_timeout = 0.1
    slow_clients = []
    for _ in range(2):
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", exporter.port))
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: exporter\r\n\r\n")
        slow_clients.append(client)
    try:
        assert wait_until(lambda: exporter.server.app.scrape_slots.locked(), 10, "two scrapes in progress")
        assert request(url_of(exporter) + "/")[0] == 200  # the bound is on scrapes only
        status, body = request(url_of(exporter) + "/metrics")
        assert status == 503 and "too many concurrent scrapes" in body
    finally:
        for client in slow_clients:
            client.close()
    assert wait_until(lambda: not exporter.server.app.scrape_slots.locked(), 10, "the slow scrapes to end")
    with urllib.request.urlopen(url_of(exporter) + "/metrics", timeout=30) as response:
        assert response.status == 200 and len(response.read()) == len(exporter.store.snapshot.body)


def test_a_server_never_started_stops_and_frees_its_port() -> None:
    port = free_port()
    ExporterServer(SnapshotStore([], "test"), ("127.0.0.1", port)).stop()
    ExporterServer(SnapshotStore([], "test"), ("127.0.0.1", port)).stop()  # the port is free again


def test_a_silent_connection_is_closed_after_the_idle_timeout() -> None:
    server = ExporterServer(SnapshotStore([], "test"), ("127.0.0.1", free_port()), idle_timeout=0.5)
    server.start()
    client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        assert client.recv(1) == b""  # the server hung up on a client that never sent a request
    finally:
        client.close()
        server.stop()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_file, key_file


def test_tls(start_exporter: Callable[..., Exporter], tmp_path: Path) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    exporter = start_exporter("--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file))
    context = ssl.create_default_context(cafile=str(cert_file))
    status, body = wait_until(lambda: (r := request(url_of(exporter, "https") + "/metrics", context=context))
                              and "mlwarden_gpu_up" in r[1] and r, 15, "GPU metrics over HTTPS")
    assert status == 200
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        request(url_of(exporter, "http") + "/metrics")  # plain HTTP is refused, not served


def test_settings_are_validated() -> None:
    with pytest.raises(settings.SettingsError, match="tls-cert-file and --tls-key-file"):
        load("--tls-cert-file", "/etc/hostname")
    with pytest.raises(settings.SettingsError, match="basic-auth-user"):
        load("--basic-auth-user", "prom")
    with pytest.raises(settings.SettingsError, match="--interval"):
        load("--interval", "0")
    loaded = load(environ={"BACKUP_DIR": "/srv/backups", "EXPERIMENTS_DIR": "/a,/b"})
    assert loaded.backup_dir == Path("/srv/backups")
    assert loaded.experiments_dir == [Path("/a"), Path("/b")]
    assert loaded.listen_address == ("127.0.0.1", 9945)


def test_the_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MLWARDEN_EXPORTER_GPU_BACKEND": "simulated"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlwarden.cli", "exporter", "--listen-address", f"127.0.0.1:{port}", "--interval", "1s"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        def scraped() -> str | None:
            try:
                body = request(f"http://127.0.0.1:{port}/metrics")[1]
            except urllib.error.URLError:
                return None
            return body if "mlwarden_gpu_temperature_celsius" in body else None

        assert wait_until(scraped, 30, "the command's first GPU metrics")
        assert request(f"http://127.0.0.1:{port}/healthz")[0] == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert "stopping" in process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_command_refuses_bad_settings_with_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mlwarden.cli", "exporter", "--listen-address", "nowhere"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "--listen-address" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _raw_scrape(url: str, accept_encoding: str | None) -> tuple[dict[str, str], bytes]:
    headers = {"Accept-Encoding": accept_encoding} if accept_encoding is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers=headers), timeout=10) as response:
        return {k.lower(): v for k, v in response.headers.items()}, response.read()


def test_scrapes_are_gzipped_when_the_scraper_accepts_it(start_exporter: Callable[..., Exporter], promtool: str) -> None:
    import gzip

    url = url_of(start_exporter("--simulated-gpus", "4"))
    wait_until(lambda: "mlwarden_gpu_temperature_celsius{" in request(url + "/metrics")[1], 10, "the first GPU sample")
    # what Prometheus sends
    headers, body = _raw_scrape(url, "gzip")
    assert headers["content-encoding"] == "gzip" and headers["vary"] == "accept-encoding"
    assert int(headers["content-length"]) == len(body)
    text = gzip.decompress(body)
    assert b"mlwarden_gpu_temperature_celsius{" in text and len(body) * 4 < len(text)
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert checked.returncode == 0, checked.stderr.decode()
    for refused in (None, "identity", "gzip;q=0", "br"):
        headers, body = _raw_scrape(url, refused)
        assert "content-encoding" not in headers, refused
        assert body.startswith(b"# HELP"), refused
    assert _raw_scrape(url, "br, gzip;q=0.5")[0]["content-encoding"] == "gzip"


def test_the_snapshot_compresses_once_and_faithfully() -> None:
    import gzip

    snapshot = Snapshot(b"# HELP x y\n# TYPE x gauge\nx 1.0\n" * 100)
    assert gzip.decompress(snapshot.gzipped) == snapshot.body
    assert snapshot.gzipped is snapshot.gzipped  # made once, shared by every scrape of this snapshot


def test_glibc_is_asked_for_one_malloc_arena_unless_the_operator_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlwarden.exporter.cli import one_malloc_arena

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert one_malloc_arena() is True  # this machine's Python runs on glibc
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert one_malloc_arena() is False


def test_memory_freed_at_start_up_goes_back_to_the_kernel() -> None:
    """What start-up allocated and freed (a MiB in the exporter) is no longer resident after release_free_memory."""
    script = (
        "import os\n"
        "from mlwarden.exporter.cli import release_free_memory\n"
        "def private_dirty():\n"
        "    return int(next(l for l in open('/proc/self/smaps_rollup') if l.startswith('Private_Dirty')).split()[1])\n"
        "blocks = [bytes(2000) + os.urandom(8) for _ in range(20_000)]  # 40 MB from glibc's heap, not Python's own pools\n"
        "kept = blocks[-1]  # holds the top of the heap, so that glibc cannot give the rest back by itself\n"
        "del blocks\n"
        "before = private_dirty()\n"
        "print(release_free_memory(), before - private_dirty())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    released, kib = done.stdout.split()
    assert released == "True" and int(kib) > 30_000, done.stdout


def _exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(request)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
        return received


def test_the_server_refuses_requests_it_cannot_frame_and_closes_the_connection() -> None:
    store = SnapshotStore([], "test")
    server = ExporterServer(store, ("127.0.0.1", free_port()), idle_timeout=5.0)
    server.start()
    try:
        body = store.snapshot.body
        # HTTP/1.0 without keep-alive: one answer, then the server closes; HEAD has the length and no body
        answer = _exchange(server.port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and f"content-length: {len(body)}".encode() in head and rest == b""
        answer = _exchange(server.port, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert answer.endswith(body)
        two_lengths = b"POST /-/simulate HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}GET /metrics HTTP/1.1\r\n\r\n"
        assert _exchange(server.port, two_lengths).startswith(b"HTTP/1.1 400 ")
        chunked = b"POST /-/simulate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        assert _exchange(server.port, chunked).startswith(b"HTTP/1.1 411 ")
        too_long = b"POST /-/simulate HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n"
        assert _exchange(server.port, too_long).startswith(b"HTTP/1.1 413 ")
        head_beyond_16_kib = b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"
        assert _exchange(server.port, head_beyond_16_kib).startswith(b"HTTP/1.1 431 ")
        assert _exchange(server.port, b"GET http://elsewhere/ HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    finally:
        server.stop()


def test_a_head_whose_lines_end_in_lf_alone_is_refused_at_once() -> None:
    # The idle timeout is longer than _exchange waits: before, such a head waited for it, unanswered.
    store = SnapshotStore([], "test")
    server = ExporterServer(store, ("127.0.0.1", free_port()), idle_timeout=60.0)
    server.start()
    try:
        assert _exchange(server.port, b"GET /metrics HTTP/1.1\nHost: x\n\n").startswith(b"HTTP/1.1 400 ")
        assert _exchange(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\n\n").startswith(b"HTTP/1.1 400 ")
        assert _exchange(server.port, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n").endswith(store.snapshot.body)
    finally:
        server.stop()


def test_pipelined_requests_are_answered_in_order_and_a_half_closed_client_gets_every_answer() -> None:
    store = SnapshotStore([], "test")
    server = ExporterServer(store, ("127.0.0.1", free_port()), idle_timeout=5.0)
    server.start()
    try:
        body = store.snapshot.body
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
            client.sendall(b"GET /metrics HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\nHEAD /metrics HTTP/1.1\r\n\r\n")
            client.shutdown(socket.SHUT_WR)  # the server must answer all three, then close (recv ends)
            received = b""
            while chunk := client.recv(65536):
                received += chunk
        first, rest = received.split(b"\r\n\r\n", 1)
        assert first.startswith(b"HTTP/1.1 200 ") and rest.startswith(body)
        second, third = rest[len(body):].split(b"ok\n", 1)
        assert second.startswith(b"HTTP/1.1 ") and third.startswith(b"HTTP/1.1 200 ") and third.endswith(b"\r\n\r\n")
    finally:
        server.stop()


def test_a_scraper_that_stops_reading_loses_its_slot_after_the_idle_timeout() -> None:
    store = SnapshotStore([], "test")
    store.snapshot = Snapshot(b"# a body far larger than the socket buffers\n" * (32 * 2**20 // 45))
    server = ExporterServer(store, ("127.0.0.1", free_port()), max_concurrent_scrapes=1, idle_timeout=0.5)
    server.start()
    client = socket.socket()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", server.port))
        client.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert wait_until(lambda: server.app.scrape_slots.locked(), 10, "the scrape to start")
        # the client never reads: the server gives up on it and its slot is free for others
        assert wait_until(lambda: not server.app.scrape_slots.locked(), 10, "the stalled scrape to be dropped")
        assert not server.connections
    finally:
        client.close()
        server.stop()


def test_a_render_that_fails_drops_the_connection_and_frees_its_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    store = SnapshotStore([], "test")
    server = ExporterServer(store, ("127.0.0.1", free_port()), max_concurrent_scrapes=1, idle_timeout=5.0)
    server.start()
    try:
        def broken(self: Snapshot, gzipped: bool) -> bytes:
            raise RuntimeError("render failed")

        monkeypatch.setattr(Snapshot, "render", broken)
        monkeypatch.setattr(Snapshot, "ready", lambda self, gzipped: None)  # never rendered yet: the worker renders
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            request(f"http://127.0.0.1:{server.port}/metrics")
        assert wait_until(lambda: not server.app.scrape_slots.locked(), 10, "the slot to be freed")
        monkeypatch.undo()
        assert request(f"http://127.0.0.1:{server.port}/metrics")[0] == 200
    finally:
        server.stop()
