"""Keeps one GPU backend usable for the collectors that share it.

It starts the backend, notices when a GPU was lost or the library failed, and
re-initialises with exponential backoff (a GPU that fell off the bus makes every NVML
call slow; hammering it every second helps nobody). A missing library or driver is
logged once, not on every pass.
"""

from __future__ import annotations

import logging
import threading

from mlwarden.exporter.backends.base import BackendUnavailable, GpuBackend, GpuIdentity

from mlwarden.backoff import Backoff, RetrySchedule

log = logging.getLogger(__name__)


class BackendSupervisor:
    def __init__(self, backend: GpuBackend, backoff: RetrySchedule | None = None) -> None:
        self.backend = backend
        self.available = False
        self._needs_recovery = False
        self._backoff = backoff or RetrySchedule(Backoff(initial=1.0, maximum=300.0))
        self._lock = threading.Lock()
        self._warned_unavailable = False
        self._identities: dict[int, GpuIdentity] = {}

    def start(self) -> None:
        """Start the backend now and record it as usable; raises BackendUnavailable when it cannot.

        For ``--gpu-backend nvml``, where a missing driver must stop the exporter at start
        instead of being retried in the background.
        """
        with self._lock:
            self.backend.start()
            self.available = True
            self._needs_recovery = False
            self._warned_unavailable = False
            self._backoff.reset()

    def ensure(self) -> bool:
        """Start or re-initialise the backend when it needs it and backoff allows; True when usable."""
        with self._lock:
            if self.available and not self._needs_recovery:
                return True
            if not self._backoff.ready():
                return self.available
            try:
                if self.available:
                    log.info("re-initialising %s after a GPU failure", self.backend.kind)
                    self.backend.recover()
                else:
                    self.backend.start()
            except BackendUnavailable as exc:
                self.available = False
                self._backoff.failed()
                if not self._warned_unavailable:
                    log.warning("%s; serving mlwarden_nvml_up 0 and retrying with backoff", exc)
                    self._warned_unavailable = True
                return False
            if self._warned_unavailable or not self.available:
                log.info("%s backend is up: driver %s, CUDA %s", self.backend.kind,
                         self.backend.driver_version() or "?", self.backend.cuda_version() or "?")
            self.available = True
            self._needs_recovery = False
            self._warned_unavailable = False
            return True

    def gpu_failed(self) -> None:
        """A GPU did not answer this pass: re-initialise at the next allowed attempt."""
        with self._lock:
            if not self._needs_recovery:
                self._backoff.failed()
            self._needs_recovery = True

    def all_gpus_answered(self) -> None:
        with self._lock:
            if not self._needs_recovery:
                self._backoff.reset()

    def remember(self, identity: GpuIdentity) -> None:
        self._identities[identity.index] = identity

    def uuid(self, index: int) -> str:
        """The GPU's UUID as last read, without calling the backend (it may be hung or lost)."""
        identity = self._identities.get(index)
        return identity.uuid if identity else ""
