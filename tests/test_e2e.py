"""End to end: a simulated GPU fault travels exporter -> Prometheus -> Alertmanager -> relay -> Slack/PagerDuty.

Everything is real except the GPUs (simulated) and Slack/PagerDuty (local sinks); timings
are compressed (mlwarden.demo.stack.Timings). It runs the demo's own story and then
checks, from what the sinks received, that each link did its job.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from mlwarden.demo.scenario import (
    OVERHEAT_ALERT,
    OVERHEAT_GPU,
    Narrator,
    is_firing_about,
    is_resolution_about,
    pagerduty_events,
    slack_text,
    tell,
)
from mlwarden.demo.stack import HEARTBEAT_RULE, Stack, Timings

TIMINGS = Timings(heartbeat_max_age=40.0)


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_gpu_overheat_reaches_slack_escalates_to_pagerduty_and_resolves(tmp_path: Path) -> None:
    story = io.StringIO()
    with Stack(tmp_path, TIMINGS) as stack:
        outcome = tell(stack, Narrator(story))
        assert outcome.ok, story.getvalue()
        slack = stack.slack.snapshot()
        suppressed = stack.relay_metric("mlwarden_relay_notifications_suppressed_total", severity="warning")
        escalations = stack.relay_metric("mlwarden_relay_escalations_total", severity="warning")
        exporter_instance = stack.exporter.url.removeprefix("http://")

    firing = [r for r in slack if is_firing_about(r, OVERHEAT_ALERT, OVERHEAT_GPU)]
    first = [r for r in firing if "Escalation level:* 0" in slack_text(r)]
    assert len(first) == 1, "the overheat alert must reach Slack exactly once before escalation"
    assert exporter_instance in slack_text(first[0]) and f"GPU {OVERHEAT_GPU}" in slack_text(first[0])
    # Alertmanager repeated the alert; the relay held the repeats back and escalated once.
    assert suppressed >= 1
    assert escalations == 1
    escalated = [r for r in firing if "Escalation level:* 1" in slack_text(r)]
    assert len(escalated) == 1, "Slack is told once that the alert escalated"

    triggers = pagerduty_events(stack.pagerduty, OVERHEAT_ALERT, "trigger")
    resolves = pagerduty_events(stack.pagerduty, OVERHEAT_ALERT, "resolve")
    assert len(triggers) == 1 and len(resolves) == 1
    assert triggers[0]["dedup_key"] == resolves[0]["dedup_key"]
    assert "GPU 0" in triggers[0]["payload"]["summary"]

    assert any(is_resolution_about(r, OVERHEAT_ALERT) for r in slack)
    assert any(is_firing_about(r, HEARTBEAT_RULE) for r in slack)
