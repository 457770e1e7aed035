"""``mlwarden demo``: the whole stack on this machine, with simulated GPUs, telling a short story.

See :mod:`mlwarden.demo.stack` for what runs and :mod:`mlwarden.demo.scenario` for the story.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from mlwarden.command import Command
from mlwarden.components import ComponentError
from mlwarden.exitcodes import ExitCode
from mlwarden.settings import in_range, setting

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    keep_running: bool = setting(False, help="leave the stack up after the story, until Ctrl-C")
    gpus: int = setting(2, help="number of simulated GPUs", parse=in_range(int, 1, 64))
    workdir: Path | None = setting(None, help="working directory for data and logs (default: a temporary one, removed at the end)")


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(settings: DemoSettings) -> int:
    from mlwarden.demo.scenario import Narrator, tell
    from mlwarden.demo.stack import Stack

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    narrator = Narrator(sys.stdout)
    with tempfile.TemporaryDirectory(prefix="mlwarden-demo-") as tmp:
        workdir = settings.workdir or Path(tmp)
        narrator.line(f"mlwarden demo: starting the stack in {workdir}")
        try:
            stack = Stack(workdir, gpus=settings.gpus, slack_printer=narrator.slack, pagerduty_printer=narrator.pagerduty)
            stack.start()
        except ComponentError as exc:
            narrator.line(f"cannot start the stack: {exc}")
            return ExitCode.FAILURE
        try:
            for name, url in (
                ("Prometheus", stack.prometheus.url), ("Alertmanager", stack.alertmanager.url),
                ("Pushgateway", stack.pushgateway.url), ("relay", stack.relay.url + "/api/v1/state"),
                ("exporter", stack.exporter.url + "/metrics"),
            ):
                narrator.line(f"   {name:12} {url}")
            outcome = tell(stack, narrator)
            narrator.step(5, "summary")
            for name, ok, detail in outcome.steps:
                narrator.line(f"   {'ok  ' if ok else 'FAIL'} {name:10} {detail}")
            narrator.line(f"   Slack received {len(stack.slack.snapshot())} message(s), PagerDuty {len(stack.pagerduty.snapshot())} event(s)")
            if settings.keep_running:
                narrator.line("the stack stays up; press Ctrl-C to stop it")
                threading.Event().wait()
            return ExitCode.OK if outcome.ok else ExitCode.FAILURE
        except KeyboardInterrupt:
            narrator.line("stopping")
            return ExitCode.OK
        finally:
            stack.stop()
            narrator.line("stack stopped; no process left behind")


# Read by mlwarden.registry without importing this module (literals only).
MLWARDEN_COMMANDS = (
    {"name": "demo", "attribute": "COMMAND", "help": "run the whole stack locally with simulated GPUs and tell the story"},
)

COMMAND = Command(
    name="demo",
    settings=DemoSettings,
    run=run,
    description=__doc__ or "",
)
