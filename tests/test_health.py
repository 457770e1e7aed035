"""mlwarden health: each check, the output, the exit status, and the pushed metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pynvml
import pytest
from mlwarden.jobs.health import cli as health_cli
from mlwarden.jobs.health import disk, gpu, output
from mlwarden.jobs.health.result import Result, Status

from mlwarden import components, settings
from mlwarden.catalog import Catalog, Manifest, Verification
from mlwarden.components import free_port
from mlwarden.exitcodes import ExitCode

# The exporter's fake pynvml: the health check reads NVML through the exporter's backend.
from tests.test_exporter_nvml import FakeNvml, nvml_error


def load(*flags: str, env: dict[str, str] | None = None) -> health_cli.HealthSettings:
    return settings.load(health_cli.HealthSettings, "health", list(flags), env or {})


class _Handler(BaseHTTPRequestHandler):
    answers = {"/healthz": 200, "/readyz": 503}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(self.answers.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def service() -> Iterator[str]:
    """A tiny HTTP server: /healthz answers 200 (a healthy exporter), /readyz 503 (a relay not ready)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[str]:
    """The real ``mlwarden exporter`` (simulated GPUs), once its /healthz answers."""
    port = free_port()
    argv = [sys.executable, "-m", "mlwarden.cli", "exporter", "--gpu-backend", "simulated", "--listen-address", f"127.0.0.1:{port}"]
    with components.Component("exporter", argv, port, tmp_path / "exporter", components.http_ready("/healthz")) as process:
        yield process.url


def make_backup(root: Path, name: str, age_seconds: float, verified: bool | None) -> None:
    directory = root / name
    directory.mkdir(parents=True)
    finished = time.time() - age_seconds
    manifest = Manifest(
        name=name, source="/models", host="h", started_at=finished - 10, finished_at=finished,
        compression="zstd", level=3, archive=f"{name}.tar.zst", archive_bytes=1, archive_sha256="0" * 64,
        total_bytes=1, files=(),
    )
    entry = Catalog.commit(directory, manifest)
    if verified is not None:
        Catalog.update_status(entry, verification=Verification(checked_at=finished, ok=verified))


def pushed(pushgateway_url: str) -> dict[str, float]:
    """Pushed health series as {'name{labels}': value}, without the grouping labels."""
    values = {}
    for line in httpx.get(pushgateway_url + "/metrics", timeout=5).text.splitlines():
        ours = 'job="mlwarden_health"' in line and f'instance="{socket.gethostname()}"' in line
        if ours and line.startswith(("mlwarden_health_", "mlwarden_job_")):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            kept = [part for part in labels.rstrip("}").split(",") if part.split("=")[0] in ("check", "path")]
            values[f"{name}{{{','.join(kept)}}}"] = float(value)
    return values


def test_services_checks_and_metrics_are_pushed(service: str, pushgateway, tmp_path: Path) -> None:
    started = time.time()
    loaded = load("--exporter-url", service, "--relay-url", service, "--pushgateway", pushgateway.url,
                  "--disk-path", str(tmp_path), "--disk-critical", "1.0", "--disk-warning", "1.0")

    assert health_cli.run(loaded) == ExitCode.FAILURE  # the relay is not ready

    metrics = pushed(pushgateway.url)
    # Debian's Pushgateway persists to a shared file by default: make sure this run's push is read.
    assert metrics["mlwarden_job_last_run_timestamp_seconds{}"] >= started
    assert metrics['mlwarden_health_check_ok{check="service:exporter"}'] == 1
    assert metrics['mlwarden_health_check_ok{check="service:relay"}'] == 0
    assert metrics['mlwarden_health_check_ok{check="service:pushgateway"}'] == 1
    ratio = metrics[f'mlwarden_health_disk_used_ratio{{path="{tmp_path}"}}']
    assert 0 < ratio < 1
    assert metrics["mlwarden_job_success{}"] == 1  # the health job itself ran


def test_the_running_exporter_is_reachable(exporter: str) -> None:
    [result] = health_cli.services.check(load("--exporter-url", exporter))
    assert (result.check, result.status, result.summary) == ("service:exporter", Status.OK, "HTTP 200 from /healthz")


def test_an_unreachable_service_is_critical_and_the_url_is_not_shown(tmp_path: Path) -> None:
    loaded = load("--prometheus-url", f"http://user:s3cret@127.0.0.1:{free_port()}", "--http-timeout", "1s")
    [result] = health_cli.services.check(loaded)
    assert result.status is Status.CRITICAL and "unreachable" in result.summary
    assert "s3cret" not in result.summary


def test_disk_thresholds(tmp_path: Path) -> None:
    ratio, _ = disk.used_ratio(tmp_path)
    assert 0 < ratio < 1
    [warn] = disk.check(load("--disk-path", str(tmp_path), "--disk-warning", "0", "--disk-critical", "1"))
    [crit] = disk.check(load("--disk-path", str(tmp_path), "--disk-warning", "0", "--disk-critical", "0"))
    [gone] = disk.check(load("--disk-path", str(tmp_path / "missing")))
    assert (warn.status, crit.status, gone.status) == (Status.WARNING, Status.CRITICAL, Status.CRITICAL)
    with pytest.raises(settings.SettingsError, match="disk-warning"):
        load("--disk-warning", "0.9", "--disk-critical", "0.8")


def test_no_nvml_is_reported_and_fails_only_when_a_gpu_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_library() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    [relaxed] = gpu.check(load())
    [strict] = gpu.check(load("--require-gpu"))
    assert relaxed.status is Status.OK and "no NVML" in relaxed.summary
    assert strict.status is Status.CRITICAL


def test_gpu_temperature_above_threshold_is_a_warning_and_a_lost_gpu_critical(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read through the exporter's NVML backend, against the exporter tests' fake at the pynvml boundary."""
    fake = FakeNvml(gpus=3, fail={
        ("nvmlDeviceGetTemperature", 0): 60,
        ("nvmlDeviceGetTemperature", 1): 91,
        ("nvmlDeviceGetTemperature", 2): nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST),
    })
    fake.install(monkeypatch)
    results = gpu.check(load(env={"TEMP_THRESHOLD": "85"}))
    assert [(r.check, r.status) for r in results] == [
        ("gpu:0", Status.OK), ("gpu:1", Status.WARNING), ("gpu:2", Status.CRITICAL),
    ]
    assert results[1].summary == "91 °C, above 85 °C"


@pytest.mark.parametrize("answer", [0xFFFFFFFF, nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)], ids=["sentinel", "not-supported"])
def test_a_temperature_nvml_cannot_give_is_missing_not_compared(monkeypatch: pytest.MonkeyPatch, answer: object) -> None:
    """NVML's "not available" value (2**32-1) is the exporter backend's sentinel: never 4294967295 °C."""
    FakeNvml(gpus=1, fail={("nvmlDeviceGetTemperature", 0): answer}).install(monkeypatch)
    [result] = gpu.check(load(env={"TEMP_THRESHOLD": "85"}))
    assert result.status is Status.OK and result.summary == "answers; temperature not reported by NVML"
    assert "temperature_celsius" not in result.data


def test_nvml_that_cannot_count_gpus_is_critical(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(gpus=1)
    fake.install(monkeypatch)

    def uninitialised() -> int:
        raise nvml_error(pynvml.NVML_ERROR_UNINITIALIZED)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", uninitialised)
    [result] = gpu.check(load())
    assert result.status is Status.CRITICAL and result.summary.startswith("NVML stopped answering")


def test_backup_freshness_and_verification(tmp_path: Path) -> None:
    make_backup(tmp_path / "fresh", "models-20200101T000000Z", 3600, verified=True)
    make_backup(tmp_path / "stale", "models-20200101T000000Z", 30 * 3600, verified=True)
    make_backup(tmp_path / "corrupt", "models-20200101T000000Z", 3600, verified=False)
    make_backup(tmp_path / "unverified", "models-20200101T000000Z", 3600, verified=None)
    (tmp_path / "empty").mkdir()
    names = ["fresh", "stale", "corrupt", "unverified", "empty"]
    env = {"BACKUP_DIR": ",".join(str(tmp_path / n) for n in names)}

    results = health_cli.backups.check(load(env=env))

    assert [r.status for r in results] == [Status.OK, Status.CRITICAL, Status.CRITICAL, Status.WARNING, Status.CRITICAL]


def test_work_directories_killed_runs_left_are_reported_and_old_ones_are_a_warning(tmp_path: Path) -> None:
    """What the exporter counts in mlwarden_backup_stale_staging_bytes (BackupStaleStaging), health reports too."""
    old, fresh, clean, running = (tmp_path / name for name in ("old", "fresh", "clean", "running"))
    for root in (old, fresh, clean, running):
        make_backup(root, "models-20200101T000000Z", 3600, verified=True)
    dead = "999999999"  # above any pid_max: that run is gone
    for root, prefix in ((old, f".mlwarden-staging-{dead}-models-"), (old, f".drill-{dead}-"), (fresh, f".download-{dead}-")):
        work = root / f"{prefix}x"
        (work / "shards").mkdir(parents=True)
        (work / "shards" / "part").write_bytes(b"\0" * 1500)
    day_and_more = time.time() - 30 * 3600
    for work in old.glob(".*-x"):
        os.utime(work, (day_and_more, day_and_more))
    (running / f".mlwarden-staging-{os.getpid()}-models-x").mkdir()  # a live run's work is not stale
    env = {"BACKUP_DIR": ",".join(str(root) for root in (old, fresh, clean, running))}

    results = {r.check: r for r in health_cli.run_checks(load(env=env)) if r.check.startswith("backup-staging:")}

    assert [(check, r.status) for check, r in results.items()] == [
        (f"backup-staging:{old}", Status.WARNING), (f"backup-staging:{fresh}", Status.OK),
        (f"backup-staging:{clean}", Status.OK), (f"backup-staging:{running}", Status.OK),
    ]
    warning = results[f"backup-staging:{old}"]
    assert warning.summary.startswith("2 work directories of killed backups, drills or downloads (3.0 kB) left 30.0 h ago (limit 26 h)")
    assert warning.data["bytes"] == 3000 and len(warning.data["directories"]) == 2
    assert "the next backup or drill removes them" in results[f"backup-staging:{fresh}"].summary
    assert results[f"backup-staging:{clean}"].summary == results[f"backup-staging:{running}"].summary == "no work directories left by killed runs"


def test_json_output_and_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health_cli, "CHECKS", {"disk": disk.check})
    assert health_cli.run(load("--json", "--disk-path", str(tmp_path))) == ExitCode.OK
    document = json.loads(capsys.readouterr().out)
    assert document["healthy"] is True
    assert document["checks"][0]["check"] == f"disk:{tmp_path}"

    assert health_cli.run(load("--json", "--disk-path", str(tmp_path), "--disk-warning", "0", "--disk-critical", "0")) == ExitCode.FAILURE
    assert json.loads(capsys.readouterr().out)["healthy"] is False


def test_a_crashing_check_is_critical_and_the_others_still_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(_: object) -> list[Result]:
        raise RuntimeError("boom")

    monkeypatch.setattr(health_cli, "CHECKS", {"broken": broken, "disk": disk.check})
    results = health_cli.run_checks(load("--disk-path", str(tmp_path)))
    assert [(r.check, r.status) for r in results] == [("broken", Status.CRITICAL), (f"disk:{tmp_path}", Status.OK)]


def test_table_output() -> None:
    table = output.as_table([Result("disk:/", Status.OK, "10% used"), Result("gpu", Status.CRITICAL, "no NVML")])
    lines = table.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "DETAIL"]
    assert lines[2].startswith("gpu") and "CRITICAL" in lines[2]
    assert lines[-1] == "machine is NOT healthy"


def test_the_exposed_metrics_pass_promtool(tmp_path: Path, promtool: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health_cli, "CHECKS", {"disk": disk.check})
    health_cli.run(load("--disk-path", str(tmp_path), "--textfile-dir", str(tmp_path)))
    text = (tmp_path / "mlwarden_health.prom").read_text()
    assert f'mlwarden_health_check_ok{{check="disk:{tmp_path}"}} 1.0' in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
