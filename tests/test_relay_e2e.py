"""The relay as a real process: kill -9 and restart with SQLite, and a real Alertmanager posting to it.

Slack and PagerDuty are a local HTTP sink that records every request and can answer 503.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from mlwarden import components
from tests.test_relay_support import TOKEN, Sink, alert, body

MLWARDEN = str(Path(sys.executable).parent / "mlwarden")


@pytest.fixture
def sink() -> Iterator[Sink]:
    sink = Sink()
    yield sink
    sink.close()


class RelayProcess:
    """The relay as a real process (a components.Component) that a test may kill -9 and start again."""

    def __init__(self, tmp_path: Path, sink: Sink, state_url: str = "", delivery: dict[str, str] | None = None) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        port = components.free_port()
        config = {
            "destinations": {
                "ops": {"type": "slack", "webhook_url_env": "SLACK_WEBHOOK_URL"},
                "pd": {"type": "pagerduty", "routing_key_env": "PD_KEY", "events_url": f"{sink.url}/pd"},
            },
            "routes": [{"destinations": ["ops"], "key_labels": ["alertname", "instance", "gpu"]}],
            "escalation": {"destinations": ["pd"]},
            "watchdog": {"period": "30s", "grace": "30s", "destinations": ["ops"]},
            "delivery": {"backoff_initial": "100ms", "backoff_max": "300ms", "max_attempts": 1000, **(delivery or {})},
        }
        (tmp_path / "relay.yml").write_text(yaml.safe_dump(config))
        (tmp_path / "token").write_text(TOKEN + "\n")
        argv = [MLWARDEN, "relay", "--config", str(tmp_path / "relay.yml"), "--listen-address",
                f"127.0.0.1:{port}", "--state-url", state_url or f"sqlite://{tmp_path}/state/relay.db"]
        env = {**os.environ, "SLACK_WEBHOOK_URL": f"{sink.url}/slack", "PD_KEY": "pd-routing-key",
               "MLWARDEN_RELAY_TOKEN_FILE": str(tmp_path / "token")}
        self.component = components.Component("relay", argv, port, tmp_path, components.http_ready("/readyz"), env=env)

    @property
    def url(self) -> str:
        return self.component.url

    def start(self) -> RelayProcess:
        self.component.start()
        return self

    def kill9(self) -> None:
        assert self.component.process is not None
        self.component.process.send_signal(signal.SIGKILL)
        self.component.process.wait()
        self.component.stop()  # the process is gone already: this only closes its log

    def stop(self) -> None:
        self.component.stop()

    def post(self, raw: bytes) -> int:
        request = urllib.request.Request(self.url + "/webhook/alertmanager", data=raw, method="POST",
                                         headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            return str(response.read().decode())


@pytest.fixture
def relay_process(tmp_path: Path, sink: Sink) -> Iterator[RelayProcess]:
    process = RelayProcess(tmp_path, sink)
    yield process
    process.stop()


def test_kill_9_mid_storm_loses_nothing_and_pagerduty_sees_one_incident(relay_process: RelayProcess, sink: Sink) -> None:
    sink.status = 503  # Slack and PagerDuty are down
    relay_process.start()
    assert relay_process.post(body(alert(name="GpuXid", severity="critical"), group_key="page")) == 200
    names = [f"Storm{n:03d}" for n in range(60)]
    for start in range(0, len(names), 10):
        batch = [alert(name=name) for name in names[start : start + 10]]
        assert relay_process.post(body(*batch, group_key=str(start))) == 200
    components.wait_until(lambda: len(sink.received) >= 4, 20, "retries against the failing sink")
    relay_process.kill9()
    sink.status = 200  # the services recover while the relay is dead
    relay_process.start()

    def slack_text() -> str:
        return "".join(json.dumps(message) for message in sink.delivered("/slack"))

    # The 60 warnings queued while Slack was down go out as a digest (they are counted, not listed).
    components.wait_until(lambda: "GpuXid" in slack_text() and "mlwarden_relay_outbox_depth 0.0" in relay_process.metrics(),
                          30, "every accepted alert delivered to Slack after the restart")
    assert 'mlwarden_relay_deliveries_total{destination="ops",integration="slack"} 61.0' in relay_process.metrics()
    assert "Digest: " in slack_text()
    [incident] = components.wait_until(lambda: sink.delivered("/pd"), 20, "PagerDuty delivery after the restart")
    every_pd_attempt = [data for path, _, data in sink.received if path == "/pd"]
    assert {e["dedup_key"] for e in every_pd_attempt} == {incident["dedup_key"]}  # one incident, however often tried
    components.wait_until(lambda: "mlwarden_relay_outbox_depth 0.0" in relay_process.metrics(), 20, "an empty outbox")
    assert len(sink.delivered("/pd")) == 1


ALERTMANAGER_CONFIG = """
route:
  receiver: relay
  group_by: [alertname, instance, gpu]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: relay
    webhook_configs:
      - url: {url}/webhook/alertmanager
        send_resolved: true
        http_config:
          authorization:
            credentials_file: {token_file}
"""


def test_real_alertmanager_posts_to_the_relay(
    relay_process: RelayProcess, sink: Sink, tmp_path: Path, start_alertmanager: Callable[..., components.Component]
) -> None:
    relay_process.start()
    am = start_alertmanager(ALERTMANAGER_CONFIG.format(url=relay_process.url, token_file=tmp_path / "token"))
    alerts = [
        {"labels": {"alertname": "GpuTemperatureHigh", "severity": "warning", "instance": "node7:9945", "gpu": "3"},
         "annotations": {"summary": "GPU 3 is hot"}},
        {"labels": {"alertname": "Watchdog", "severity": "none"}},
    ]
    request = urllib.request.Request(am.url + "/api/v2/alerts", data=json.dumps(alerts).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).close()
    [message] = components.wait_until(lambda: sink.delivered("/slack"), 20, "Slack message via Alertmanager")
    text = json.dumps(message)
    assert "GpuTemperatureHigh" in text and "node7:9945" in text and "GPU 3" in text and "WARNING" in text
    metrics = components.wait_until(lambda: 'mlwarden_relay_watchdog_state{state="up"} 1.0' in relay_process.metrics()
                                    and relay_process.metrics(), 20, "watchdog heartbeat")
    assert 'mlwarden_relay_webhooks_received_total{outcome="accepted"}' in metrics
    assert 'mlwarden_relay_webhooks_received_total{outcome="unauthorized"} 0.0' in metrics
