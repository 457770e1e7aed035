"""End to end: a simulated GPU fault travels exporter -> Prometheus -> Alertmanager -> relay -> Slack/PagerDuty.

Everything is real except the GPUs (simulated) and Slack/PagerDuty (local sinks); timings
are compressed (mlwarden.demo.stack.Timings). It runs the demo's own story and then
checks, from what the sinks received, that each link did its job.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from mlwarden.demo.scenario import OVERHEAT_ALERT, OVERHEAT_GPU, Narrator, alert_sections, pagerduty_events, tell
from mlwarden.demo.stack import HEARTBEAT_RULE, Stack, Timings

TIMINGS = Timings(heartbeat_max_age=40.0)


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_gpu_overheat_reaches_slack_escalates_to_pagerduty_and_resolves(tmp_path: Path) -> None:
    story = io.StringIO()
    with Stack(tmp_path, TIMINGS) as stack:
        outcome = tell(stack, Narrator(story))
        assert outcome.ok, story.getvalue()
        suppressed = stack.relay_metric("mlwarden_relay_notifications_suppressed_total", severity="warning")
        exporter_instance = stack.exporter.url.removeprefix("http://")

        firing = alert_sections(stack.slack, OVERHEAT_ALERT, gpu=OVERHEAT_GPU)
        first = [text for text in firing if "*Escalation level:* 0" in text]
        escalated = [text for text in firing if "*Escalation level:* 1" in text]
        resolved = alert_sections(stack.slack, OVERHEAT_ALERT, gpu=OVERHEAT_GPU, resolved=True)
        triggers = pagerduty_events(stack.pagerduty, OVERHEAT_ALERT, "trigger")
        resolves = pagerduty_events(stack.pagerduty, OVERHEAT_ALERT, "resolve")
        heartbeat = alert_sections(stack.slack, HEARTBEAT_RULE)

    story_text = story.getvalue()
    # The alert reached Slack once, naming the machine and the GPU ...
    assert len(first) == 1, story_text
    assert f"*Machine:* {exporter_instance}" in first[0] and f"*GPU:* {OVERHEAT_GPU}" in first[0]
    # ... Alertmanager's repeats inside the cooldown were held back and counted ...
    assert suppressed >= 1
    # ... and after the configured repeats the key escalated once: Slack was told, PagerDuty paged.
    assert len(escalated) == 1, story_text
    assert len(triggers) == 1, story_text
    assert f"GPU {OVERHEAT_GPU}" in triggers[0]["payload"]["summary"]
    # Cooling down resolved it everywhere, PagerDuty with the same dedup_key.
    assert len(resolved) == 1
    assert len(resolves) == 1 and resolves[0]["dedup_key"] == triggers[0]["dedup_key"]
    # The stale backup heartbeat fired.
    assert heartbeat, story_text
