"""The demo's time compression changes timings only, never what the rules and routes mean."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mlwarden import assets
from mlwarden.demo import stack
from mlwarden.demo.stack import Timings

REPO = Path(__file__).resolve().parent.parent


def _rules(text: str) -> list[dict]:
    return [rule for group in yaml.safe_load(text)["groups"] for rule in group["rules"]]


@pytest.mark.parametrize("path", sorted((REPO / "alerts" / "rules").glob("*.yml")), ids=lambda p: p.name)
def test_compress_rules_shortens_for_only(path: Path) -> None:
    timings = Timings(alert_for=2.0)
    original = path.read_text()
    compressed = _rules(stack.compress_rules(original, timings))
    before = {r.get("alert") or r.get("record"): r for r in _rules(original)}
    for rule in compressed:
        name = rule.get("alert") or rule.get("record")
        if "for" in rule:
            assert rule["for"] == "2000ms"
        assert rule["expr"] == before[name]["expr"]
        assert rule.get("labels") == before[name].get("labels")


def test_the_demo_backup_is_due_every_heartbeat_max_age_through_its_own_flags() -> None:
    """The heartbeat rule is the production one: the demo's backup just promises a short interval."""
    from mlwarden.jobs.backup.cli import BackupSettings
    from mlwarden.jobs.report import schedule_of

    from mlwarden import settings

    argv = ["--model-dir", "/m", "--backup-dir", "/b", *stack.backup_heartbeat_args(Timings(heartbeat_max_age=40.0))]
    schedule = schedule_of(settings.load(BackupSettings, "backup", argv, {}))
    assert (schedule.expected_interval, schedule.grace) == (40.0, 0.0)
    rules = _rules(assets.folder("alerts").joinpath("rules", "jobs.yml").read_text())
    assert stack.HEARTBEAT_RULE in {rule.get("alert") for rule in rules}


def test_alertmanager_config_points_every_receiver_at_the_relay(tmp_path: Path) -> None:
    token = tmp_path / "token"
    document = yaml.safe_load(stack.alertmanager_config("http://127.0.0.1:1234", token, Timings(repeat_interval=3.0)))
    hooks = [hook for receiver in document["receivers"] for hook in receiver.get("webhook_configs", [])]
    assert hooks and all(hook["url"] == "http://127.0.0.1:1234/webhook/alertmanager" for hook in hooks)
    assert all(hook["http_config"]["authorization"]["credentials_file"] == str(token) for hook in hooks)
    assert document["route"]["repeat_interval"] == "3000ms"
    assert document["inhibit_rules"] == yaml.safe_load(assets.folder("alerts").joinpath("alertmanager.yml").read_text())["inhibit_rules"]


def test_relay_dedup_window_stays_below_alertmanagers_repeat_interval() -> None:
    timings = Timings(repeat_interval=3.0)
    document = yaml.safe_load(stack.relay_config(timings, "http://127.0.0.1:1/v2/enqueue"))
    assert float(document["dedup_window"].rstrip("s")) < timings.repeat_interval
