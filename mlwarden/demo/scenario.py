"""The demo's story, told against a running :class:`~mlwarden.demo.stack.Stack`.

1. the jobs run (a backup of generated model files, a restore drill, cleanup, health) and
   their metrics reach the Pushgateway;
2. a simulated GPU overheats: the alert reaches Slack, repeats are suppressed, the key
   escalates to PagerDuty after the configured number of repeats;
3. the GPU cools down: the resolution reaches Slack and PagerDuty (same dedup_key);
4. the backup heartbeat goes stale: the heartbeat alert fires.

Each step waits for the evidence (a Prometheus query, a relay counter, what a sink
received) with a timeout, so a broken link in the chain is reported by name. The
end-to-end test runs this same code and then asserts on what the sinks received.
"""

from __future__ import annotations

import array
import json
import os
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from mlwarden.components import wait_until
from mlwarden.demo.sinks import Received, Sink
from mlwarden.demo.stack import HEARTBEAT_RULE, Stack, backup_heartbeat_args, mlwarden_argv

OVERHEAT_ALERT = "GpuTemperatureHigh"
OVERHEAT_GPU = 0
OVERHEAT_CELSIUS = 80.0  # above the 75 C warning, below the 85 C critical: the escalation path
POLL = 0.5  # seconds between checks: each step takes seconds, and every check queries the stack


def slack_alerts(item: Received) -> list[str]:
    """One text per alert in a Slack message: the relay gives each alert its own section,
    also when it coalesces several alerts into one message."""
    return [
        str(block["text"].get("text", ""))
        for block in item.body.get("blocks", [])
        if block.get("type") == "section" and isinstance(block.get("text"), dict)
    ]


def alert_sections(sink: Sink, alertname: str, *, gpu: int | None = None, resolved: bool = False) -> list[str]:
    """The sections about ``alertname`` (on ``gpu``) that Slack received, firing or resolved."""
    result = []
    for item in sink.snapshot():
        for text in slack_alerts(item):
            title = text.split("\n", 1)[0]
            if f" {alertname} " not in title + " " or ("[RESOLVED]" in title) != resolved:
                continue
            if gpu is None or f"GPU {gpu}" in title:
                result.append(text)
    return result


def pagerduty_events(sink: Sink, alertname: str, action: str) -> list[dict[str, Any]]:
    """Events about ``alertname``. A resolve carries only its dedup_key (Events API v2), so
    resolves are matched through the dedup_keys of the alert's triggers."""
    events = [r.body for r in sink.snapshot()]
    triggers = [e for e in events if e.get("event_action") == "trigger" and e.get("payload", {}).get("class") == alertname]
    if action == "trigger":
        return triggers
    keys = {e.get("dedup_key") for e in triggers}
    return [e for e in events if e.get("event_action") == action and e.get("dedup_key") in keys]


@dataclass
class Narrator:
    """Prints the story, one timestamped line at a time (the e2e test gives it a StringIO)."""

    out: TextIO
    started: float = field(default_factory=time.monotonic)

    def line(self, text: str) -> None:
        self.out.write(f"[{time.monotonic() - self.started:6.1f}s] {text}\n")
        self.out.flush()

    def step(self, number: int, title: str) -> None:
        self.out.write("\n")
        self.line(f"== Step {number}: {title}")

    def slack(self, sink: Sink, item: Received) -> None:
        for text in slack_alerts(item) or [str(item.body.get("text", ""))]:
            self.line(f"   slack     <- {text.split(chr(10), 1)[0]}")

    def pagerduty(self, sink: Sink, item: Received) -> None:
        summary = item.body.get("payload", {}).get("summary", "")
        key = str(item.body.get("dedup_key", ""))[-12:]
        self.line(f"   pagerduty <- {item.body.get('event_action', '?'):8} ...{key} {summary}")


@dataclass
class Outcome:
    steps: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.steps)


def write_models(directory: os.PathLike[str], megabytes: int = 8) -> None:
    """A small model directory: float32 weights (random, like trained ones) and JSON configs."""
    rng = random.Random(42)
    root = os.fspath(directory)
    for shard in range(2):
        weights = array.array("f", (rng.gauss(0.0, 0.02) for _ in range(megabytes * 2**20 // 8)))
        with open(os.path.join(root, f"model-{shard:05d}-of-00002.bin"), "wb") as handle:
            weights.tofile(handle)
    with open(os.path.join(root, "config.json"), "w") as handle:
        json.dump({"architectures": ["DemoForCausalLM"], "hidden_size": 1024, "num_layers": 4}, handle, indent=1)


def run_job(stack: Stack, narrator: Narrator, *args: str) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(mlwarden_argv(*args), capture_output=True, text=True, env=env, timeout=300)
    shown = " ".join(a.replace(str(stack.workdir), "$WORKDIR") for a in args)
    narrator.line(f"   $ mlwarden {shown} -> exit {result.returncode}")
    if result.returncode != 0:
        for line in result.stderr.strip().splitlines()[-5:]:
            narrator.line(f"     {line}")
    return result.returncode


def step_backup(stack: Stack, narrator: Narrator) -> str:
    narrator.step(1, "the jobs run (backup, restore drill, cleanup, health) and their metrics reach the Pushgateway")
    write_models(stack.models_dir)
    common = ["--pushgateway", stack.pushgateway.url]
    code = run_job(
        stack, narrator, "backup", "--model-dir", str(stack.models_dir), "--backup-dir", str(stack.backup_dir),
        *backup_heartbeat_args(stack.timings), *common,
    )
    if code != 0:
        raise RuntimeError(f"mlwarden backup exited {code}")
    run_job(stack, narrator, "restore", "--drill", "--backup-dir", str(stack.backup_dir), *common)
    run_job(stack, narrator, "cleanup", "--experiments-dir", str(stack.experiments_dir), "--yes", *common)
    run_job(stack, narrator, "health", "--disk-path", str(stack.workdir), "--exporter-url", stack.exporter.url,
            "--backup-dir", str(stack.backup_dir), *common)
    wait_until(
        lambda: stack.query('mlwarden_job_success{job="mlwarden_backup"} == 1'),
        30, "the backup's success in Prometheus (via the Pushgateway)", poll=POLL,
    )
    narrator.line("   Prometheus sees mlwarden_job_success{job=\"mlwarden_backup\"} = 1 from the Pushgateway")
    return "backup pushed and scraped"


def step_overheat(stack: Stack, narrator: Narrator) -> str:
    narrator.step(2, f"GPU {OVERHEAT_GPU} overheats ({OVERHEAT_CELSIUS:.0f} C)")
    stack.inject(OVERHEAT_GPU, "overheat", celsius=OVERHEAT_CELSIUS)
    wait_until(
        lambda: alert_sections(stack.slack, OVERHEAT_ALERT, gpu=OVERHEAT_GPU),
        60, f"{OVERHEAT_ALERT} for GPU {OVERHEAT_GPU} in Slack", poll=POLL,
    )
    narrator.line(f"   {OVERHEAT_ALERT} reached Slack; Alertmanager keeps repeating it")
    narrator.line("   (other alerts you see are the real rules reacting to the demo's compressed time)")
    repeats = stack.timings.escalate_after_repeats
    wait_until(
        lambda: pagerduty_events(stack.pagerduty, OVERHEAT_ALERT, "trigger"),
        60 + 5 * repeats * stack.timings.repeat_interval, f"escalation of {OVERHEAT_ALERT} to PagerDuty", poll=POLL,
    )
    suppressed = stack.relay_metric("mlwarden_relay_notifications_suppressed_total", severity="warning")
    narrator.line(f"   escalated to PagerDuty after {repeats} sightings; {suppressed:.0f} repeat(s) suppressed by cooldown")
    return f"suppressed {suppressed:.0f}, escalated"


def step_cool(stack: Stack, narrator: Narrator) -> str:
    narrator.step(3, f"GPU {OVERHEAT_GPU} cools down")
    stack.inject(OVERHEAT_GPU, "cool")
    wait_until(
        lambda: alert_sections(stack.slack, OVERHEAT_ALERT, gpu=OVERHEAT_GPU, resolved=True),
        60, f"the resolution of {OVERHEAT_ALERT} in Slack", poll=POLL,
    )
    resolves = wait_until(
        lambda: pagerduty_events(stack.pagerduty, OVERHEAT_ALERT, "resolve"),
        60, f"the PagerDuty resolve of {OVERHEAT_ALERT}", poll=POLL,
    )
    narrator.line(f"   resolved in Slack and PagerDuty (dedup_key {resolves[0].get('dedup_key')})")
    return "resolved"


def step_heartbeat(stack: Stack, narrator: Narrator) -> str:
    interval = stack.timings.heartbeat_max_age
    narrator.step(4, f"no backup succeeds any more: the heartbeat goes stale (demo interval {interval:g}s, production 1 day + 1 h grace)")
    wait_until(
        lambda: [text for text in alert_sections(stack.slack, HEARTBEAT_RULE) if "mlwarden_backup" in text],
        stack.timings.heartbeat_max_age + 60, f"{HEARTBEAT_RULE} in Slack", poll=POLL,
    )
    narrator.line(f"   {HEARTBEAT_RULE} fired and reached Slack")
    return "heartbeat alert fired"


STEPS: tuple[Callable[[Stack, Narrator], str], ...] = (step_backup, step_overheat, step_cool, step_heartbeat)


def tell(stack: Stack, narrator: Narrator) -> Outcome:
    """Run every step; a failed step is reported and the story stops there."""
    outcome = Outcome()
    for step in STEPS:
        name = step.__name__.removeprefix("step_")
        try:
            outcome.steps.append((name, True, step(stack, narrator)))
        except (TimeoutError, RuntimeError, OSError) as exc:
            narrator.line(f"   FAILED: {exc}")
            outcome.steps.append((name, False, str(exc)))
            break
    return outcome
