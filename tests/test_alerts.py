"""The Prometheus rules in alerts/rules: promtool accepts them, every alert is unit-tested, and
every alert carries what the relay and the people reading it need."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RULES = sorted((REPO / "alerts" / "rules").glob("*.yml"))
RULE_TESTS = sorted((REPO / "alerts" / "tests").glob("*.test.yml"))
SEVERITIES = {"info", "warning", "critical", "emergency"}

# Alerts that cannot name a machine: the Watchdog is global.
NO_INSTANCE = {"Watchdog"}
RUNBOOKS = REPO / "docs" / "runbooks.md"
# The Watchdog always fires by design; it has no silent case.
ALWAYS_FIRING = {"Watchdog"}


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def rule_test_cases() -> list[dict[str, Any]]:
    return [
        case
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]


def test_rule_files_exist_for_every_area() -> None:
    names = {path.stem for path in RULES}
    assert {"gpu", "exporter", "jobs", "disk", "relay", "watchdog"} <= names


def test_promtool_check_rules_is_clean(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "rules", *map(str, RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # promtool reports lint problems (e.g. duplicate rules) as warnings without failing
    assert "WARNING" not in (result.stdout + result.stderr).upper(), result.stdout + result.stderr


def test_promtool_unit_tests_pass(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "test", "rules", *[p.name for p in RULE_TESTS]],
        capture_output=True, text=True, cwd=REPO / "alerts" / "tests",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def test_every_rule_file_is_loaded_by_a_unit_test() -> None:
    loaded = {
        (path.parent / rule_file).resolve()
        for path in RULE_TESTS
        for rule_file in yaml.safe_load(path.read_text())["rule_files"]
    }
    assert set(RULES) <= loaded


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    cases = rule_test_cases()
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    silent = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts without a case where they fire"
    assert names - silent - ALWAYS_FIRING == set(), "alerts without a case where they stay silent"


def test_every_firing_case_pins_the_rendered_annotations() -> None:
    for case in rule_test_cases():
        for expected in case.get("exp_alerts") or []:
            annotations = expected.get("exp_annotations", {})
            assert {"summary", "description", "runbook_url"} <= set(annotations), case["alertname"]
            assert "{{" not in str(annotations), "an annotation did not render"


def test_alert_names_are_unique() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))


def severity(rule: dict[str, Any]) -> str:
    """The rule's severity label, or the job's own where the rule copies it from the job's schedule."""
    if "severity" in rule.get("labels", {}):
        return str(rule["labels"]["severity"])
    expr = re.sub(r"\s", "", rule["expr"])
    # The job's severity comes with its pushed schedule (joined in), or with the exporter's expectation of it.
    assert "group_left(severity)" in expr or expr.startswith("label_replace(label_replace(mlwarden_job_first_heartbeat_due_"), \
        f"{rule['alert']} has no severity"
    return "per job"


def runbook_anchors() -> set[str]:
    return {heading.strip().lower() for heading in re.findall(r"^### (\w+)\s*$", RUNBOOKS.read_text(), re.M)}


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_has_severity_summary_description_and_runbook_url(rule: dict[str, Any]) -> None:
    assert severity(rule) in SEVERITIES | {"per job"}
    annotations = rule["annotations"]
    assert annotations.get("summary") and annotations.get("description")
    assert "runbook" not in annotations, "runbook texts live in docs/runbooks.md; rules carry runbook_url"
    assert annotations["runbook_url"] == f"docs/runbooks.md#{rule['alert'].lower()}"
    assert rule["alert"].lower() in runbook_anchors(), "add a '### <alert>' section to docs/runbooks.md"
    text = annotations["summary"] + annotations["description"]
    if rule["alert"] not in NO_INSTANCE:
        assert "$labels.instance" in text, "say which machine"
    if re.search(r"\bmlwarden_gpu_|instance_gpu:", rule["expr"]):
        assert "$labels.gpu" in text, "say which GPU"


def test_every_runbook_section_belongs_to_an_alert() -> None:
    assert runbook_anchors() == {rule["alert"].lower() for rule in alert_rules()}


def test_paired_severities_share_an_alertgroup() -> None:
    """The Alertmanager inhibition mutes a warning only when its critical twin has the same alertgroup."""
    groups: dict[str, set[str]] = {}
    for rule in alert_rules():
        if "alertgroup" in rule.get("labels", {}):
            groups.setdefault(rule["labels"]["alertgroup"], set()).add(rule["labels"]["severity"])
    assert {"gpu_temperature", "disk_usage", "relay_watchdog"} <= set(groups)
    for severities in groups.values():
        assert "warning" in severities and severities & {"critical", "emergency"}


def test_docs_document_every_alert() -> None:
    page = (REPO / "docs" / "alerts.md").read_text()
    alert_table = page.split("| alert | severity |", 1)[1]
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip()
            for line in alert_table.splitlines() if line.startswith("| `")}
    documented = {name: "per job" if "--late-severity" in text else text for name, text in rows.items()}
    assert {rule["alert"]: severity(rule) for rule in alert_rules()} == documented


def test_example_prometheus_config_is_valid(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "config", str(REPO / "alerts" / "prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"]: job for job in yaml.safe_load((REPO / "alerts" / "prometheus.yml").read_text())["scrape_configs"]}
    assert jobs["pushgateway"]["honor_labels"] is True  # the jobs' own job/instance labels must survive
    # The up-based rules' documented job selectors match the example's scrape jobs (and only
    # their own: the exporter's selector does not take the relay for an exporter).
    rule_text = "".join(path.read_text() for path in RULES)
    patterns = re.findall(r'up\{job=~"([^"]+)"\}', rule_text)
    assert len(patterns) == 2
    exporter, relay = sorted(patterns)
    assert re.fullmatch(exporter, "mlwarden_exporter") and not re.fullmatch(exporter, "mlwarden_relay")
    assert re.fullmatch(relay, "mlwarden_relay") and not re.fullmatch(relay, "mlwarden_exporter")
    assert {"mlwarden_exporter", "mlwarden_relay"} <= set(jobs)
