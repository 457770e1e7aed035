"""alerts/alertmanager.yml: amtool accepts it, representative alerts take the intended routes,
and a real Alertmanager loads it, inhibits warnings by their critical twin and delivers to
the relay's webhook with the bearer token read from the credentials file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlwarden import components

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "alerts" / "alertmanager.yml"
RELAY_WEBHOOK = "http://127.0.0.1:9946/webhook/alertmanager"


def test_amtool_check_config_passes(amtool: str) -> None:
    result = subprocess.run([amtool, "check-config", str(CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        ({"alertname": "Watchdog", "severity": "info"}, "relay-watchdog"),
        ({"alertname": "GpuTemperatureCritical", "severity": "critical", "instance": "n1:9945", "gpu": "0"}, "relay-page"),
        ({"alertname": "GpuXidCriticalError", "severity": "emergency", "instance": "n1:9945", "gpu": "1"}, "relay-page"),
        ({"alertname": "GpuTemperatureHigh", "severity": "warning", "instance": "n1:9945", "gpu": "0"}, "relay"),
        ({"alertname": "BackupFailed", "severity": "warning", "instance": "n1"}, "relay"),
        ({"alertname": "GpuUnderutilized", "severity": "info", "instance": "n1:9945", "gpu": "2"}, "relay"),
    ],
)
def test_routes(amtool: str, labels: dict[str, str], receiver: str) -> None:
    result = subprocess.run(
        [amtool, "config", "routes", "test", f"--config.file={CONFIG}", *(f"{k}={v}" for k, v in labels.items())],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [receiver]


def test_every_receiver_is_the_relay_webhook_with_a_bearer_token_file() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    for receiver in config["receivers"]:
        (webhook,) = receiver["webhook_configs"]
        assert webhook["url"] == RELAY_WEBHOOK
        authorization = webhook["http_config"]["authorization"]
        assert authorization["type"] == "Bearer"
        assert "credentials_file" in authorization and "credentials" not in authorization
    assert config["route"]["group_by"] == ["alertname", "instance", "gpu"]


class _Sink(BaseHTTPRequestHandler):
    """Stands in for the relay: records each webhook's Authorization header and body."""

    received: list[tuple[str, dict[str, Any]]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append((self.headers.get("Authorization", ""), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def sink() -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    received: list[tuple[str, dict[str, Any]]] = []
    handler = type("Sink", (_Sink,), {"received": received})
    server = ThreadingHTTPServer((components.LOOPBACK, components.free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{components.LOOPBACK}:{server.server_port}/webhook/alertmanager", received
    server.shutdown()
    server.server_close()


def _post_alerts(alertmanager: components.Component, alerts: list[dict[str, Any]]) -> None:
    request = urllib.request.Request(
        alertmanager.url + "/api/v2/alerts",
        data=json.dumps(alerts).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def _alerts(alertmanager: components.Component) -> list[dict[str, Any]]:
    with urllib.request.urlopen(alertmanager.url + "/api/v2/alerts", timeout=5) as response:
        return json.load(response)


def test_real_alertmanager_inhibits_and_delivers_with_the_bearer_token(
    start_alertmanager: Callable[..., components.Component],
    sink: tuple[str, list[tuple[str, dict[str, Any]]]],
    tmp_path: Path,
) -> None:
    url, received = sink
    token_file = tmp_path / "relay-token"
    token_file.write_text("s3cret-token\n")
    text = CONFIG.read_text().replace(RELAY_WEBHOOK, url).replace("/etc/mlwarden/relay-token", str(token_file))
    alertmanager = start_alertmanager(text)

    def alert(name: str, severity: str, **labels: str) -> dict[str, Any]:
        return {"labels": {"alertname": name, "severity": severity, **labels}, "annotations": {"summary": name}}

    gpu0 = {"instance": "n1:9945", "gpu": "0"}
    _post_alerts(alertmanager, [
        alert("Watchdog", "info"),
        alert("GpuTemperatureCritical", "critical", alertgroup="gpu_temperature", **gpu0),
        alert("GpuTemperatureHigh", "warning", alertgroup="gpu_temperature", **gpu0),
        alert("GpuTemperatureHigh", "warning", alertgroup="gpu_temperature", instance="n1:9945", gpu="1"),
        # a critical alert without the same alertgroup mutes nothing
        alert("GpuMemoryNearlyFull", "warning", **gpu0),
        alert("GpuLost", "critical", instance="n1:9945", gpu="3"),
    ])

    state = {
        (a["labels"]["alertname"], a["labels"].get("gpu")): a["status"]["state"] for a in _alerts(alertmanager)
    }
    assert state[("GpuTemperatureHigh", "0")] == "suppressed"  # muted by its critical twin on GPU 0
    assert state[("GpuTemperatureHigh", "1")] == "active"  # another GPU
    assert state[("GpuTemperatureCritical", "0")] == "active"
    assert state[("GpuMemoryNearlyFull", "0")] == "active"

    # The Watchdog's route has no group wait: it reaches the relay's webhook at once.
    components.wait_until(lambda: any(body["receiver"] == "relay-watchdog" for _, body in received), 20,
                          "the Watchdog at the relay's webhook")
    authorization, body = next((a, b) for a, b in received if b["receiver"] == "relay-watchdog")
    assert authorization == "Bearer s3cret-token"
    assert [a["labels"]["alertname"] for a in body["alerts"]] == ["Watchdog"]


def test_real_alertmanager_reaches_the_real_relay(
    start_alertmanager: Callable[..., components.Component], tmp_path: Path
) -> None:
    """The relay accepts what this configuration makes Alertmanager send: its payload and its token."""
    token_file = tmp_path / "relay-token"
    token_file.write_text("relay-token-value\n")  # a trailing newline, as editors leave it
    (tmp_path / "relay.yml").write_text(yaml.safe_dump({
        "destinations": {"ops": {"type": "slack", "webhook_url_env": "SLACK_WEBHOOK_URL"}},
        "routes": [{"destinations": ["ops"]}],
        "watchdog": {"alertname": "Watchdog", "period": "1m", "grace": "5m", "destinations": ["ops"]},
    }))
    port = components.free_port()
    env = {**os.environ, "MLWARDEN_RELAY_TOKEN_FILE": str(token_file), "SLACK_WEBHOOK_URL": "http://127.0.0.1:9/unused"}
    argv = [str(Path(sys.executable).with_name("mlwarden")), "relay", "--config", str(tmp_path / "relay.yml"),
            "--listen-address", f"{components.LOOPBACK}:{port}", "--state-url", f"sqlite:///{tmp_path / 'relay.db'}"]
    with components.Component("relay", argv, port, tmp_path, components.http_ready("/readyz"), env=env) as relay:
        text = CONFIG.read_text().replace(RELAY_WEBHOOK, relay.url + "/webhook/alertmanager")
        alertmanager = start_alertmanager(text.replace("/etc/mlwarden/relay-token", str(token_file)))
        _post_alerts(alertmanager, [{"labels": {"alertname": "Watchdog", "severity": "info"}}])

        def relay_metrics() -> str:
            with urllib.request.urlopen(relay.url + "/metrics", timeout=5) as response:
                return response.read().decode()

        components.wait_until(lambda: 'mlwarden_relay_watchdog_state{state="up"} 1.0' in relay_metrics(), 20,
                              "the relay's watchdog to be up")
        assert 'mlwarden_relay_webhooks_received_total{outcome="accepted"} 1.0' in relay_metrics()
        assert 'mlwarden_relay_webhooks_received_total{outcome="unauthorized"} 0.0' in relay_metrics()
