"""Completion metrics every job pushes, so that a missing success is an alert.

Each run pushes to the Pushgateway under a stable grouping key, ``job="mlwarden_<task>"``
and ``instance="<host>"`` (never a pid, which would leave one group per run behind). The
push uses POST (``pushadd``), which replaces only the metric names it sends: a failed run
therefore does not send ``mlwarden_job_last_success_timestamp_seconds`` and the previous
success survives, which is what the "no success in 25 h" alert reads.

Pushing is best effort: failures are retried briefly, logged and then given up on; they
never turn a good run into a failed one. ``--textfile-dir`` writes the same metrics for
node_exporter's textfile collector instead (atomically, keeping the last success across a
failed run the same way).

Metrics common to every job:

- ``mlwarden_job_last_success_timestamp_seconds`` (only on success)
- ``mlwarden_job_last_run_timestamp_seconds``
- ``mlwarden_job_duration_seconds``
- ``mlwarden_job_success`` (1 or 0)
plus whatever the job adds with :meth:`JobReport.gauge`.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from pathlib import Path
from types import TracebackType

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import pushadd_to_gateway

from mlwarden.backoff import Backoff
from mlwarden.fsutil import atomic_write_text

log = logging.getLogger(__name__)

LAST_SUCCESS = "mlwarden_job_last_success_timestamp_seconds"
# One variable every job reads (after its own MLWARDEN_<JOB>_PUSHGATEWAY), so that
# `mlwarden maintain` and an environment file name the Pushgateway once.
PUSHGATEWAY_ENV = "PUSHGATEWAY_URL"
PUSH_ATTEMPTS = 3
PUSH_BACKOFF = Backoff(initial=1.0, maximum=4.0)
PUSH_TIMEOUT_SECONDS = 5.0


class JobReport:
    """Collects one run's metrics and publishes them when the run ends.

    Use as a context manager around the run; call :meth:`succeeded` when the run's
    outcome is success. An exception inside the block counts as failure.
    """

    def __init__(
        self,
        task: str,
        pushgateway: str | None = None,
        textfile_dir: Path | None = None,
        instance: str | None = None,
    ) -> None:
        self.task = task
        self.job = f"mlwarden_{task}"
        self.pushgateway = pushgateway
        self.textfile_dir = Path(textfile_dir) if textfile_dir else None
        self.instance = instance or socket.gethostname()
        self.registry = CollectorRegistry()
        self._success = False
        self._started = time.time()
        self._gauges: dict[str, Gauge] = {}
        self._last_run = self.gauge("mlwarden_job_last_run_timestamp_seconds", "When the job last finished, successfully or not.")
        self._duration = self.gauge("mlwarden_job_duration_seconds", "How long the job's last run took.")
        self._success_gauge = self.gauge("mlwarden_job_success", "1 if the job's last run succeeded, else 0.")

    def gauge(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Gauge:
        """A gauge in this run's registry (created once per name)."""
        if name not in self._gauges:
            self._gauges[name] = Gauge(name, documentation, labelnames, registry=self.registry)
        return self._gauges[name]

    def succeeded(self, success: bool = True) -> None:
        self._success = success

    @property
    def success(self) -> bool:
        return self._success

    def __enter__(self) -> JobReport:
        self._started = time.time()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._success = False
        self.publish()

    def publish(self) -> None:
        now = time.time()
        self._last_run.set(now)
        self._duration.set(now - self._started)
        self._success_gauge.set(1 if self._success else 0)
        if self._success:
            self.gauge(LAST_SUCCESS, "When the job last succeeded (unix seconds).").set(now)
        if self.pushgateway:
            self._push()
        if self.textfile_dir:
            self._write_textfile()

    def _push(self) -> None:
        grouping = {"instance": self.instance}
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            try:
                pushadd_to_gateway(
                    self.pushgateway,
                    job=self.job,
                    registry=self.registry,
                    grouping_key=grouping,
                    timeout=PUSH_TIMEOUT_SECONDS,
                )
                return
            except OSError as exc:  # URLError and socket errors are OSErrors
                if attempt == PUSH_ATTEMPTS:
                    log.warning("could not push %s metrics to the Pushgateway after %d tries: %s", self.job, attempt, exc)
                    return
                time.sleep(PUSH_BACKOFF.delay(attempt))

    def _write_textfile(self) -> None:
        assert self.textfile_dir is not None
        path = self.textfile_dir / f"{self.job}.prom"
        text = generate_latest(self.registry).decode()
        if not self._success:
            text += _previous_last_success(path)
        try:
            atomic_write_text(path, text)
        except OSError as exc:
            log.warning("could not write %s: %s", path, exc)


def _previous_last_success(path: Path) -> str:
    """The last-success lines of an earlier textfile, so a failed run keeps them."""
    try:
        previous = path.read_text(encoding="utf-8")
    except OSError:
        return ""
    lines = [line for line in previous.splitlines() if re.match(rf"^(# (HELP|TYPE) )?{LAST_SUCCESS}\b", line)]
    return "".join(line + "\n" for line in lines)
