"""Shared builders for the relay tests: configs, Alertmanager-shaped payloads, a fake clock."""

from __future__ import annotations

import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mlwarden.relay import config as relay_config

SLACK_URL = "https://hooks.slack.test/services/T000/B000/XXXX"
ONCALL_URL = "https://hooks.slack.test/services/T000/B000/ONCALL"
PD_URL = "https://events.pagerduty.test/v2/enqueue"
TOKEN = "s3cret-token-for-tests"
ENV = {"SLACK_WEBHOOK_URL": SLACK_URL, "SLACK_ONCALL_URL": ONCALL_URL, "PD_KEY": "routing-key-0123"}


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def config_dict(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "destinations": {
            "ops": {"type": "slack", "webhook_url_env": "SLACK_WEBHOOK_URL"},
            "oncall": {"type": "slack", "webhook_url_env": "SLACK_ONCALL_URL"},
            "pd": {"type": "pagerduty", "routing_key_env": "PD_KEY", "events_url": PD_URL},
        },
        "escalation": {"after_repeats": 3, "within": "1h", "destinations": ["pd"]},
        "routes": [
            {"match": {"team": "ml"}, "key_labels": ["alertname", "instance", "gpu"], "destinations": ["ops"]},
            {"destinations": ["ops"]},
        ],
        "watchdog": {"period": "10s", "grace": "20s", "destinations": ["ops"]},
        "delivery": {"max_attempts": 4, "backoff_initial": "1s", "backoff_max": "8s", "timeout": "2s"},
    }
    doc.update(overrides)
    return doc


def make_config(**overrides: Any) -> relay_config.RelayConfig:
    return relay_config.parse(config_dict(**overrides), ENV)


def alert(name: str = "GpuTemperatureHigh", status: str = "firing", severity: str = "warning", **labels: str) -> dict[str, Any]:
    all_labels = {"alertname": name, "severity": severity, "instance": "node1:9945", "gpu": "0", **labels}
    return {
        "status": status,
        "labels": all_labels,
        "annotations": {"summary": f"{name} on {all_labels['instance']}"},
        "startsAt": "2026-11-28T10:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.test/graph",
        "fingerprint": "fp-" + "-".join(f"{k}={v}" for k, v in sorted(all_labels.items()) if k != "severity"),
    }


def payload(*alerts: dict[str, Any], group_key: str = "{}:{alertname=\"x\"}", receiver: str = "relay", **extra: Any) -> dict[str, Any]:
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return {
        "version": "4", "groupKey": group_key, "truncatedAlerts": 0, "status": status, "receiver": receiver,
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am.test",
        "alerts": list(alerts), **extra,
    }


def body(*alerts: dict[str, Any], **kw: Any) -> bytes:
    return json.dumps(payload(*alerts, **kw)).encode()


def accept(store: Any, config: relay_config.RelayConfig, raw: bytes, now: float) -> Any:
    """Run one webhook body through intake into ``store``, as the app does (None: duplicate)."""
    from mlwarden.relay import intake, payload

    return store.intake_batch([intake.request(payload.parse(raw), raw, now, config)])[0]


HANG = "hang"  # a Sink answer: hold the request without answering until the sink closes


class Sink:
    """A local HTTP stand-in for Slack and PagerDuty that records every POST.

    Each path answers from its script (``script("/pd", 503, 503, (429, "4"), HANG)``: a status,
    a (status, Retry-After) pair, or HANG), then ``status`` once the script has run out.
    """

    def __init__(self) -> None:
        self.status = 200
        self.received: list[tuple[str, int | str, dict[str, Any]]] = []
        self._scripts: dict[str, deque[Any]] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                answer = sink._next(self.path)
                status, retry_after = answer if isinstance(answer, tuple) else (answer, None)
                with sink._lock:
                    sink.received.append((self.path, status, data))
                if status == HANG:
                    sink._closing.wait()
                    return
                self.send_response(status)
                if retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def script(self, path: str, *answers: Any) -> None:
        with self._lock:
            self._scripts.setdefault(path, deque()).extend(answers)

    def _next(self, path: str) -> Any:
        with self._lock:
            queue = self._scripts.get(path)
            return queue.popleft() if queue else self.status

    def delivered(self, path: str) -> list[dict[str, Any]]:
        with self._lock:
            return [data for p, status, data in self.received if p == path and isinstance(status, int) and status < 300]

    def close(self) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()
