"""The whole mlwarden chain on one machine, with real components and compressed timings.

``Stack`` starts, on 127.0.0.1 with free ports and one working directory: local Slack and
PagerDuty sinks, a real Pushgateway, the relay (SQLite state), the exporter with simulated
GPUs, a real Alertmanager with the project's ``alerts/alertmanager.yml`` and a real
Prometheus with the project's rules. The project's files are used as they are, except
where time is compressed (see :class:`Timings`): rules' ``for:`` durations, Prometheus'
alert resend delay, Alertmanager's group timings and the relay's watchdog. The backup's
heartbeat needs no rule change: the demo's backup reports a short expected interval
(``--expected-interval``), exactly as an operator would. Everything else
(expressions, labels, routes, inhibitions, the relay's policy code) is the production one,
so what the demo shows and the end-to-end test proves is the real chain.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from mlwarden import assets, components
from mlwarden.demo.sinks import Sink

RELAY_TOKEN = "demo-relay-token-not-secret"
PAGERDUTY_ROUTING_KEY = "demo-routing-key-0123456789abcdef"
HEARTBEAT_RULE = "JobLate"


@dataclass(frozen=True)
class Timings:
    """Seconds. Production values are minutes and hours; the demo runs in about a minute."""

    scrape_interval: float = 1.0
    evaluation_interval: float = 1.0
    # Prometheus resends a firing alert every minute. The Watchdog fires at the first
    # evaluation, before Prometheus has discovered Alertmanager, so its first copy is dropped:
    # without this, the heartbeat would first reach the relay a minute in, after its grace.
    alert_resend_delay: float = 1.0
    exporter_interval: float = 1.0
    alert_for: float = 2.0  # every rule's `for:` becomes this
    heartbeat_max_age: float = 60.0  # the backup's expected interval (production: 1 day + 1 h grace)
    group_wait: float = 1.0
    group_interval: float = 2.0
    repeat_interval: float = 3.0
    escalate_after_repeats: int = 3
    warning_cooldown: float = 3600.0  # longer than the demo: every repeat is suppressed
    watchdog_period: float = 5.0
    watchdog_grace: float = 10.0


def _prom_duration(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms"


def compress_rules(text: str, timings: Timings) -> str:
    """A rule file with `for:` durations compressed; expressions are never changed."""
    document = yaml.safe_load(text)
    for group in document.get("groups", []):
        group["interval"] = _prom_duration(timings.evaluation_interval)
        for rule in group.get("rules", []):
            if "for" in rule:
                rule["for"] = _prom_duration(timings.alert_for)
    return yaml.safe_dump(document, sort_keys=False)


def alertmanager_config(relay_url: str, token_file: Path, timings: Timings) -> str:
    """The project's alertmanager.yml pointed at this relay, with compressed group timings."""
    document = yaml.safe_load(assets.folder("alerts").joinpath("alertmanager.yml").read_text())
    routes = [document["route"], *document["route"].get("routes", [])]
    for route in routes:
        for key, value in (
            ("group_wait", timings.group_wait),
            ("group_interval", timings.group_interval),
            ("repeat_interval", timings.repeat_interval),
        ):
            if key in route or route is document["route"]:
                route[key] = _prom_duration(value)
    for receiver in document["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = relay_url + "/webhook/alertmanager"
            webhook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    return yaml.safe_dump(document, sort_keys=False)


def relay_config(timings: Timings, pagerduty_events_url: str) -> str:
    """The demo's relay.yml: one Slack channel, PagerDuty on escalation, watchdog on."""
    document: dict[str, Any] = {
        "destinations": {
            "ops-slack": {"type": "slack", "webhook_url_env": "DEMO_SLACK_WEBHOOK_URL"},
            "pagerduty": {
                "type": "pagerduty",
                "routing_key_env": "DEMO_PAGERDUTY_ROUTING_KEY",
                "events_url": pagerduty_events_url,
            },
        },
        "cooldown": {"warning": f"{timings.warning_cooldown:g}s"},
        "escalation": {
            "after_repeats": timings.escalate_after_repeats,
            "within": "1h",
            "destinations": ["pagerduty"],
            "page_immediately": ["critical", "emergency"],
        },
        "routes": [
            {"key_labels": ["alertname", "instance", "gpu"], "destinations": ["ops-slack"]},
        ],
        # HA peers' copies arrive within moments; Alertmanager's own repeats arrive a repeat
        # interval apart and must count as sightings, so the window stays below that interval.
        "dedup_window": f"{timings.repeat_interval / 2:g}s",
        "watchdog": {
            "alertname": "Watchdog",
            "period": f"{timings.watchdog_period:g}s",
            "grace": f"{timings.watchdog_grace:g}s",
            "destinations": ["ops-slack"],
        },
        "delivery": {"max_attempts": 5, "backoff_initial": "200ms", "backoff_max": "2s", "timeout": "5s"},
    }
    return yaml.safe_dump(document, sort_keys=False)


def prometheus_config(exporter: str, relay: str, pushgateway: str, alertmanager: str, timings: Timings) -> str:
    def target(url: str) -> str:
        return url.removeprefix("http://")

    document = {
        "global": {
            "scrape_interval": _prom_duration(timings.scrape_interval),
            "evaluation_interval": _prom_duration(timings.evaluation_interval),
        },
        "rule_files": ["rules/*.yml"],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [target(alertmanager)]}]}]},
        "scrape_configs": [
            {"job_name": "mlwarden_exporter", "static_configs": [{"targets": [target(exporter)]}]},
            {"job_name": "mlwarden_relay", "static_configs": [{"targets": [target(relay)]}]},
            {"job_name": "pushgateway", "honor_labels": True, "static_configs": [{"targets": [target(pushgateway)]}]},
        ],
    }
    return yaml.safe_dump(document, sort_keys=False)


def backup_heartbeat_args(timings: Timings) -> list[str]:
    """The demo backup's schedule: due every ``heartbeat_max_age`` seconds, no grace."""
    return ["--expected-interval", f"{timings.heartbeat_max_age:g}s", "--grace", "0s"]


def mlwarden_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlwarden.cli", *args]


class Stack:
    """Start with ``with Stack(workdir, timings) as stack:``; everything stops at the end."""

    def __init__(self, workdir: Path, timings: Timings = Timings(), gpus: int = 2, slack_printer: Any = None, pagerduty_printer: Any = None) -> None:
        self.workdir = Path(workdir)
        self.timings = timings
        self.gpus = gpus
        self.slack = Sink("slack", on_receive=slack_printer)
        self.pagerduty = Sink("pagerduty", on_receive=pagerduty_printer)
        self._exit = ExitStack()
        self.pushgateway: components.Component
        self.relay: components.Component
        self.exporter: components.Component
        self.alertmanager: components.Component
        self.prometheus: components.Component

    @property
    def models_dir(self) -> Path:
        return self.workdir / "models"

    @property
    def backup_dir(self) -> Path:
        return self.workdir / "backups"

    @property
    def experiments_dir(self) -> Path:
        return self.workdir / "experiments"

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for path in (self.models_dir, self.backup_dir, self.experiments_dir):
            path.mkdir(parents=True, exist_ok=True)
        self._exit.enter_context(self.slack)
        self._exit.enter_context(self.pagerduty)
        self.pushgateway = self._exit.enter_context(components.pushgateway(self._dir("pushgateway")))
        self.relay = self._exit.enter_context(self._relay_component())
        self.exporter = self._exit.enter_context(self._exporter_component())
        self.alertmanager = self._exit.enter_context(self._alertmanager_component())
        self.prometheus = self._exit.enter_context(self._prometheus_component())

    def _relay_component(self) -> components.Component:
        workdir = self._dir("relay")
        config = workdir / "relay.yml"
        config.write_text(relay_config(self.timings, self.pagerduty.url + "/v2/enqueue"))
        port = components.free_port()
        env = {
            **os.environ,
            "MLWARDEN_RELAY_TOKEN": RELAY_TOKEN,
            "DEMO_SLACK_WEBHOOK_URL": self.slack.url + "/services/DEMO/DEMO/demo",
            "DEMO_PAGERDUTY_ROUTING_KEY": PAGERDUTY_ROUTING_KEY,
        }
        argv = mlwarden_argv(
            "relay", "--config", str(config), "--listen-address", f"{components.LOOPBACK}:{port}",
            "--state-url", f"sqlite:///{workdir / 'relay.db'}",
        )
        return components.Component("relay", argv, port, workdir, components.http_ready("/readyz"), env=env)

    def _exporter_component(self) -> components.Component:
        port = components.free_port()
        argv = mlwarden_argv(
            "exporter", "--gpu-backend", "simulated", "--simulated-gpus", str(self.gpus),
            "--listen-address", f"{components.LOOPBACK}:{port}",
            "--interval", f"{self.timings.exporter_interval:g}s",
            "--backup-dir", str(self.backup_dir), "--experiments-dir", str(self.experiments_dir),
            "--artifacts-interval", "2s",
        )
        return components.Component("exporter", argv, port, self._dir("exporter"), components.http_ready("/healthz"))

    def _alertmanager_component(self) -> components.Component:
        workdir = self._dir("alertmanager")
        token_file = workdir / "relay-token"
        token_file.write_text(RELAY_TOKEN)
        token_file.chmod(0o600)
        config = workdir / "alertmanager.yml"
        config.write_text(alertmanager_config(self.relay.url, token_file, self.timings))
        return components.alertmanager(config, workdir)

    def _prometheus_component(self) -> components.Component:
        workdir = self._dir("prometheus")
        rules = workdir / "rules"
        rules.mkdir(exist_ok=True)
        for rule_file in assets.folder("alerts").joinpath("rules").iterdir():
            if rule_file.name.endswith(".yml"):
                (rules / rule_file.name).write_text(compress_rules(rule_file.read_text(), self.timings))
        config = workdir / "prometheus.yml"
        config.write_text(prometheus_config(
            self.exporter.url, self.relay.url, self.pushgateway.url, self.alertmanager.url, self.timings
        ))
        return components.prometheus(
            config, workdir, [f"--rules.alert.resend-delay={_prom_duration(self.timings.alert_resend_delay)}"]
        )

    def stop(self) -> None:
        self._exit.close()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # What the scenario asks of the running stack ------------------------------------------

    def inject(self, gpu: int, fault: str, **params: Any) -> None:
        body = json.dumps({"gpu": gpu, "fault": fault, **params}).encode()
        request = urllib.request.Request(
            self.exporter.url + "/-/simulate", data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant PromQL query against the stack's Prometheus."""
        url = self.prometheus.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as response:
            return list(json.load(response)["data"]["result"])

    def relay_metric(self, name: str, **labels: str) -> float:
        """Sum of a relay metric's samples whose labels include ``labels``."""
        with urllib.request.urlopen(self.relay.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )
