"""Every dashboard query and every rule expression, run against a real Prometheus that holds
the project's own metrics.

The stack: the real exporter with simulated GPUs (faults injected: one GPU overheating with
ECC errors, one with XID 79, one lost), a real backup into the directory the exporter's
backups collector reads, the real relay fed a few webhooks (a delivery that needed a retry,
a repeat suppressed by cooldown, a critical alert escalated, an invalid payload
dead-lettered, the Watchdog heartbeat), and a real Pushgateway holding the jobs' metrics as
jobs/report.py pushes them, for a healthy machine and a failing one. A real Prometheus
scrapes them with alerts/prometheus.yml's job names and evaluates alerts/rules/*.yml.

Then each query must parse, and must return data unless it is on ALLOWED_EMPTY below (an
alert condition that is false here, or a metric that legitimately has no series yet).
Independently, every metric selector inside every query must match at least one series, so
a renamed metric cannot hide behind an allowed-empty alert condition.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlwarden.jobs import pause
from mlwarden.jobs.report import JobReport, Schedule

from mlwarden import components

REPO = Path(__file__).resolve().parent.parent
RULES = sorted((REPO / "alerts" / "rules").glob("*.yml"))
MLWARDEN = str(Path(sys.executable).with_name("mlwarden"))
TOKEN = "live-test-token"
QUERY_POLL = 0.2  # seconds between checks that query Prometheus: a few queries each, on a shared machine

# Queries that may return nothing in this stack, and why. Keys: "alert:<name>",
# "record:<name>" or "panel:<dashboard uid>/<panel title>/<refId>".
ALLOWED_EMPTY = {
    # alert conditions that are false on a healthy simulated fleet
    "alert:GpuMemoryNearlyFull": "simulated GPUs use at most 80 % of their memory",
    "alert:GpuUnderutilized": "the simulated load is a sine wave: below 50 % only part of the time",
    "alert:GpuPowerAtLimit": "simulated power stays below the limit",
    "alert:GpuPowerBrakeSlowdown": "the simulator never asserts the power brake",
    "alert:MlwardenExporterDown": "the exporter is up",
    "alert:MlwardenExporterDataStale": "collections are fresh",
    "alert:MlwardenCollectorFailing": "every collector works",
    "alert:MlwardenNvmlDown": "the simulated backend is always available",
    "alert:JobLate": "the only successes are seconds old",
    "alert:JobRunningTooLong": "every run has finished",
    "alert:JobNeverReported": "the exporter began to expect the jobs seconds ago: no first heartbeat is due yet",
    "alert:PushgatewayPushFailing": "no push was rejected",
    "alert:BackupStaleStaging": "no killed run left a staging directory",
    "alert:DiskUsageHigh": "the test's disks are not full",
    "alert:DiskUsageCritical": "the test's disks are not full",
    "alert:DiskWillFillIn24Hours": "the test's disks are not filling",
    "alert:RelayDown": "the relay is up",
    "alert:RelayOutboxBacklogGrowing": "deliveries succeed",
    "alert:RelayOutboxStuck": "deliveries succeed",
    "alert:RelayWatchdogLate": "the heartbeat arrived",
    "alert:RelayWatchdogDown": "the heartbeat arrived",
}

# Dashboard template variables, as Grafana would expand them for "All" and a short range.
VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval_ms": "15000", "$__interval": "15s"}
ALL = ".*"


@dataclass(frozen=True)
class Query:
    key: str
    expr: str


def rule_queries() -> list[Query]:
    queries = []
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                kind, name = ("alert", rule["alert"]) if "alert" in rule else ("record", rule["record"])
                queries.append(Query(f"{kind}:{name}", rule["expr"]))
    return queries


def substitute(expr: str) -> str:
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    return re.sub(r"\$\{?(instance|gpu|exporter|job)\}?", ALL, expr)


def dashboard_queries() -> list[Query]:
    queries = []
    for path in sorted((REPO / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                # label_values(selector, label): the selector must have series carrying the label
                selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["definition"]).groups()
                queries.append(Query(f"variable:{dashboard['uid']}/{variable['name']}",
                                     f"count by ({label}) ({substitute(selector)})"))
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                queries.append(Query(f"panel:{dashboard['uid']}/{panel['title']}/{target['refId']}",
                                     substitute(target["expr"])))
    return queries


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def selectors(expr: str) -> list[str]:
    """The vector selectors inside a PromQL expression (good enough for this project's queries)."""
    found: list[str] = []

    def take(match: re.Match[str]) -> str:
        found.append(match.group(0))
        return " "

    text = re.sub(r"[a-zA-Z_:][\w:]*\s*\{[^}]*\}", take, expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]|\boffset\s+\w+", " ", text)
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][\w:]*", text):
        if match.group(0) not in _KEYWORDS and not text[match.end():].lstrip().startswith("("):
            found.append(match.group(0))
    return found


def test_selector_extraction() -> None:
    assert selectors('sum by (instance) (rate(a_total{x="1"}[5m])) / on (instance) b offset 5m > bool 0.5') == [
        'a_total{x="1"}', "b"]
    assert selectors('label_replace(1 - c / d, "path", "$1", "dir", "(.*)") or absent(e{job="j"})') == [
        'e{job="j"}', "c", "d"]


# The stack ------------------------------------------------------------------------------------

def _get(url: str, headers: dict[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read()


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _serving(metric: bytes) -> Callable[[components.Component], bool]:
    """Readiness: the component's /metrics page has ``metric``; a refused connection means not yet."""
    def ready(component: components.Component) -> bool:
        try:
            return metric in _get(component.url + "/metrics")
        except OSError:
            return False

    return ready


class _Slack(BaseHTTPRequestHandler):
    """Stands in for Slack: the first message gets a 500 (so the relay retries), the rest 200."""

    messages: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.messages.append(body)
        self.send_response(500 if len(self.messages) == 1 else 200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def slack_sink() -> Iterator[tuple[str, list[bytes]]]:
    messages: list[bytes] = []
    server = ThreadingHTTPServer((components.LOOPBACK, 0), type("Slack", (_Slack,), {"messages": messages}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://{components.LOOPBACK}:{server.server_port}/services/T0/B0/x", messages
    server.shutdown()
    server.server_close()


def exporter_component(tmp_path: Path) -> components.Component:
    """The exporter on simulated GPUs, over a real backup catalog; ready once it reports the backups."""
    models, backups, experiments = tmp_path / "models", tmp_path / "backups", tmp_path / "experiments"
    for directory in (models / "llm", backups, experiments / "run-1"):
        directory.mkdir(parents=True)
    (models / "llm" / "weights.bin").write_bytes(os.urandom(64 * 1024))
    (experiments / "run-1" / "checkpoint.pt").write_bytes(b"x" * 4096)
    # A real backup, so the exporter's backups collector reads a real catalog.
    backup = subprocess.run([MLWARDEN, "backup", "--model-dir", str(models), "--backup-dir", str(backups)],
                            capture_output=True, text=True, timeout=60)
    assert backup.returncode == 0, backup.stderr
    port = components.free_port()
    argv = [MLWARDEN, "exporter", "--gpu-backend", "simulated", "--simulated-gpus", "3",
            "--listen-address", f"127.0.0.1:{port}", "--interval", "0.5s", "--artifacts-interval", "1s",
            "--backup-dir", str(backups), "--experiments-dir", str(experiments)]
    return components.Component("exporter", argv, port, tmp_path, _serving(b"mlwarden_backups{"))


def inject_faults(exporter: str) -> None:
    for fault in ({"gpu": 0, "fault": "overheat"}, {"gpu": 0, "fault": "ecc", "count": 5},
                  {"gpu": 1, "fault": "xid", "xid": 79}, {"gpu": 2, "fault": "lose"},
                  # allocated but idle: GPU 0 holds a pod, GPU 1 a Slurm job (the waste panels need both)
                  {"gpu": 0, "fault": "idle"}, {"gpu": 1, "fault": "idle"}):
        assert _post(exporter + "/-/simulate", json.dumps(fault).encode()) == 200


def relay_component(tmp_path: Path, slack_url: str) -> components.Component:
    """The relay with SQLite state and Slack at ``slack_url``; ready once it exposes its outbox."""
    config = {
        "destinations": {"ops-slack": {"type": "slack", "webhook_url_env": "SLACK_WEBHOOK_URL"}},
        "escalation": {"after_repeats": 3, "within": "1h", "destinations": ["ops-slack"],
                       "page_immediately": ["critical", "emergency"]},
        "routes": [{"destinations": ["ops-slack"]}],
        "watchdog": {"alertname": "Watchdog", "period": "1m", "grace": "5m", "destinations": ["ops-slack"]},
        "delivery": {"max_attempts": 5, "backoff_initial": "100ms", "backoff_max": "200ms", "timeout": "5s"},
    }
    (tmp_path / "relay.yml").write_text(yaml.safe_dump(config))
    port = components.free_port()
    argv = [MLWARDEN, "relay", "--config", str(tmp_path / "relay.yml"), "--listen-address", f"127.0.0.1:{port}",
            "--state-url", f"sqlite:///{tmp_path / 'relay.db'}"]
    env = {**os.environ, "MLWARDEN_RELAY_TOKEN": TOKEN, "SLACK_WEBHOOK_URL": slack_url}
    return components.Component("relay", argv, port, tmp_path, _serving(b"mlwarden_relay_outbox_depth"), env=env)


def webhook(receiver: str, *alerts: dict[str, str]) -> bytes:
    return json.dumps({
        "version": "4", "receiver": receiver, "status": "firing", "groupKey": "{}:{alertname=\"x\"}",
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am", "truncatedAlerts": 0,
        "alerts": [{"status": "firing", "labels": labels, "annotations": {"summary": labels["alertname"]},
                    "startsAt": "2026-01-01T00:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://prometheus/graph"} for labels in alerts],
    }).encode()


def feed_relay(relay: str, slack_messages: list[bytes]) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    hook = relay + "/webhook/alertmanager"
    warning = {"alertname": "GpuTemperatureHigh", "severity": "warning", "instance": "n1:9945", "gpu": "0"}
    critical = {"alertname": "GpuLost", "severity": "critical", "instance": "n1:9945", "gpu": "2"}
    assert _post(hook, webhook("relay-watchdog", {"alertname": "Watchdog", "severity": "info"}), auth) == 200
    assert _post(hook, webhook("relay", warning), auth) == 200
    assert _post(hook, webhook("relay-page", critical), auth) == 200
    # The same alert key again (a new notification, not an HA duplicate): inside its cooldown
    # it is suppressed; the third sighting reaches after_repeats and escalates.
    assert _post(hook, webhook("relay-again", warning), auth) == 200
    assert _post(hook, webhook("relay-third", warning), auth) == 200
    assert _post(hook, b"{not json", auth) in (400, 422)  # dead-lettered
    components.wait_until(lambda: len(slack_messages) >= 2 and re.search(
        rb"^mlwarden_relay_outbox_depth 0\.0$", _get(relay + "/metrics"), re.MULTILINE) is not None,
        30, "the relay to deliver everything (one message retried)")


def push_job_metrics(pushgateway: str) -> None:
    """What the four jobs push (jobs/report.py), for a healthy machine and a failing one."""
    for instance, ok in (("node-good", True), ("node-bad", False)):
        with JobReport("backup", pushgateway=pushgateway, instance=instance, schedule=Schedule(86400, 3600, 21600, "critical")) as report:
            report.gauge("mlwarden_backup_read_bytes", "Bytes read.").set(1_000_000)
            report.gauge("mlwarden_backup_written_bytes", "Bytes written.").set(400_000)
            report.gauge("mlwarden_backup_files", "Files archived.").set(12)
            report.gauge("mlwarden_backup_verified", "Verified.").set(1 if ok else 0)
            report.gauge("mlwarden_backup_offsite_success", "Off-site copy.").set(1 if ok else 0)
            report.gauge("mlwarden_backup_damaged_found", "Damaged backups found.").set(0 if ok else 1)
            report.succeeded(ok)
        with JobReport("restore_drill", pushgateway=pushgateway, instance=instance) as report:
            report.gauge("mlwarden_restore_drill_duration_seconds", "Restore time.").set(42.0)
            report.gauge("mlwarden_restore_drill_verified_files", "Files verified.").set(12 if ok else 0)
            report.succeeded(ok)
        with JobReport("cleanup", pushgateway=pushgateway, instance=instance) as report:
            report.gauge("mlwarden_cleanup_deleted_files", "Deleted.").set(3 if ok else 0)
            report.gauge("mlwarden_cleanup_freed_bytes", "Freed.").set(5_000_000 if ok else 0)
            report.gauge("mlwarden_cleanup_planned_files", "Planned.").set(3 if ok else 900)
            report.gauge("mlwarden_cleanup_planned_bytes", "Planned.").set(5_000_000 if ok else 9e11)
            report.gauge("mlwarden_cleanup_breaker_tripped", "Breaker.").set(0 if ok else 1)
            skipped = report.gauge("mlwarden_cleanup_skipped_files", "Kept at deletion.", ("reason",))
            skipped.labels("modified").set(0 if ok else 4)
            report.succeeded(ok)
        with JobReport("health", pushgateway=pushgateway, instance=instance) as report:
            checks = report.gauge("mlwarden_health_check_ok", "Check passed.", ("check",))
            checks.labels("disk").set(1 if ok else 0)
            checks.labels("gpu").set(1)
            report.gauge("mlwarden_health_disk_used_ratio", "Disk used.", ("path",)).labels("/").set(0.4 if ok else 0.97)
            report.succeeded(ok)
    # a maintenance pause (mlwarden pause), so the heartbeat rules' pause selector has a series
    assert pause.pause(pause.PauseSettings(job="cleanup", instance="node-good", pushgateway=pushgateway, duration=3600)) == 0


def prometheus_config(exporter: str, relay: str, pushgateway: str) -> str:
    """alerts/prometheus.yml with this stack's targets and a 1 s rhythm."""
    config = yaml.safe_load((REPO / "alerts" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(path) for path in RULES]
    del config["alerting"]
    targets = {"mlwarden_exporter": exporter, "mlwarden_relay": relay, "pushgateway": pushgateway}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [urllib.parse.urlparse(targets.pop(job["job_name"])).netloc]}]
    assert not targets, f"alerts/prometheus.yml lacks scrape jobs {sorted(targets)}"
    return yaml.safe_dump(config)


def query(prometheus: str, expr: str) -> dict[str, Any]:
    url = prometheus + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return json.loads(_get(url))
    except urllib.error.HTTPError as error:  # 400: the query does not parse
        return json.loads(error.read())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The whole stack, started once for this module's tests; yields Prometheus' URL."""
    tmp_path = tmp_path_factory.mktemp("stack")
    with contextlib.ExitStack() as stop:
        slack_url, slack_messages = stop.enter_context(slack_sink())
        pushgateway = stop.enter_context(components.pushgateway(tmp_path / "pushgateway"))
        exporter = stop.enter_context(exporter_component(tmp_path)).url
        relay = stop.enter_context(relay_component(tmp_path, slack_url)).url
        push_job_metrics(pushgateway.url)
        config = tmp_path / "prometheus" / "prometheus.yml"
        config.parent.mkdir()
        config.write_text(prometheus_config(exporter, relay, pushgateway.url))
        prometheus = stop.enter_context(components.prometheus(config, config.parent)).url

        # A few clean samples first, then the faults and the relay traffic: counters that
        # move after their first sample give increase() and rate() something to see.
        components.wait_until(lambda: len(
            query(prometheus, "count_over_time(up[1m]) >= 3 and up == 1")["data"]["result"]) == 3,
            30, "three scrapes of every target", poll=QUERY_POLL)
        inject_faults(exporter)
        feed_relay(relay, slack_messages)
        # increase() needs two samples of each counter that appeared with the faults
        moved = ["mlwarden_gpu_xid_errors_total", "mlwarden_relay_deliveries_total",
                 "mlwarden_relay_delivery_retries_total", "mlwarden_relay_dead_letters_total",
                 "mlwarden_relay_escalations_total", "mlwarden_relay_notifications_suppressed_total"]
        components.wait_until(lambda: all(
            query(prometheus, f"count_over_time({name}[1m]) >= 2")["data"]["result"] for name in moved),
            30, "the faults and the relay's counters, scraped twice", poll=QUERY_POLL)
        components.wait_until(lambda: query(
            prometheus, 'ALERTS{alertname="GpuXidCriticalError", alertstate="firing"} and on () mlwarden_gpu_up == 0'
        )["data"]["result"], 30, "the rules to see the XID and the lost GPU", poll=QUERY_POLL)
        # idle GPU-hours are sampled at the dashboard's interval (15 s here): wait for one sample since the faults
        components.wait_until(lambda: query(
            prometheus, 'sum_over_time((mlwarden_gpu_sm_activity_ratio < 0.05)[1h:15s])')["data"]["result"],
            30, "a subquery step with an idle GPU", poll=QUERY_POLL)
        yield prometheus


def test_every_query_runs_and_returns_data(stack: str) -> None:
    failures = []
    queries = rule_queries() + dashboard_queries()
    for item in queries:
        answer = query(stack, item.expr)
        if answer["status"] != "success":
            failures.append(f"{item.key}: does not run: {answer.get('error')}\n    {item.expr}")
        elif not answer["data"]["result"] and item.key not in ALLOWED_EMPTY:
            failures.append(f"{item.key}: no data\n    {item.expr}")
        for selector in selectors(item.expr):
            if not query(stack, selector)["data"]["result"]:
                failures.append(f"{item.key}: selector {selector} matches no series")
    assert not failures, "\n".join(failures)
    # every allow-list entry names a real query (a renamed alert must not leave a stale excuse)
    assert set(ALLOWED_EMPTY) <= {item.key for item in queries}


def test_prometheus_evaluates_every_rule_without_error(stack: str) -> None:
    groups = json.loads(_get(stack + "/api/v1/rules"))["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(rule_queries())
    broken = [f"{r['name']}: {r.get('lastError')}" for r in rules if r["health"] != "ok"]
    assert not broken, broken
    firing = {r["name"] for r in rules if r["type"] == "alerting" and r["state"] == "firing"}
    # alerts without a `for:` that the stack provokes
    assert {"Watchdog", "GpuUncorrectedEccErrors", "GpuXidCriticalError", "JobFailed", "JobNeverSucceeded", "RestoreDrillFailed",
            "CleanupBreakerTripped", "HealthCheckFailing", "BackupOffsiteCopyMissing",
            "BackupVerificationFailed", "RelayDeadLetters"} <= firing
