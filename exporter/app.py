"""Assembles the exporter from its settings: backend, collectors, loop, snapshot, server."""

from __future__ import annotations

import logging
import ssl

from mlwarden.exporter.backends import open_backend
from mlwarden.exporter.backends.base import BackendUnavailable
from mlwarden.exporter.backends.simulated import SimulatedBackend
from mlwarden.exporter.backends.supervisor import BackendSupervisor
from mlwarden.exporter.cli import ExporterSettings
from mlwarden.exporter.collectors.base import Collector, CollectorContext, registered
from mlwarden.exporter.loop import CollectionLoop
from mlwarden.exporter.server import ExporterServer, tls_context
from mlwarden.exporter.snapshot import SnapshotStore

from mlwarden import __version__
from mlwarden.auth import AuthCheck

log = logging.getLogger(__name__)


class ExporterStartError(RuntimeError):
    """The exporter cannot start (port taken, bad TLS files, NVML required but missing)."""


def collectors_for(settings: ExporterSettings, supervisor: BackendSupervisor) -> list[Collector]:
    context = CollectorContext(supervisor, settings.interval, settings.effective_timeout, settings.artifacts_interval)
    built = (spec.build(settings, context) for spec in registered())
    return [collector for collector in built if collector is not None]


class Exporter:
    def __init__(
        self,
        supervisor: BackendSupervisor,
        collectors: list[Collector],
        address: tuple[str, int],
        *,
        max_concurrent_scrapes: int = 10,
        auth: AuthCheck | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.collectors = collectors
        self.store = SnapshotStore([(c.name, c.interval) for c in collectors], __version__)
        self.loop = CollectionLoop(collectors, self.store)
        backend = supervisor.backend
        self.scheme = "https" if tls else "http"
        try:
            self.server = ExporterServer(
                self.store, address, max_concurrent_scrapes=max_concurrent_scrapes, auth=auth, tls=tls,
                simulator=backend if isinstance(backend, SimulatedBackend) else None,
            )
        except OSError as exc:
            raise ExporterStartError(f"cannot listen on {address[0]}:{address[1]}: {exc.strerror}") from None

    @classmethod
    def from_settings(cls, settings: ExporterSettings) -> Exporter:
        backend = open_backend(settings.gpu_backend, settings.simulated_gpus, settings.simulated_processes)
        supervisor = BackendSupervisor(backend)
        if settings.gpu_backend == "nvml":
            try:
                supervisor.start()
            except BackendUnavailable as exc:
                raise ExporterStartError(f"{exc} (use --gpu-backend auto to serve mlwarden_nvml_up 0 instead)") from None
        tls: ssl.SSLContext | None = None
        auth: AuthCheck | None = None
        if settings.web_config_file is not None:
            # only here: YAML and bcrypt cost 2 MiB of resident memory that most exporters never need
            from mlwarden.exporter import webconfig
            from mlwarden.exporter.webconfig import WebConfigError

            try:
                web = webconfig.load(settings.web_config_file)
            except WebConfigError as exc:
                raise ExporterStartError(str(exc)) from None
            tls, auth = web.tls, web.auth
        if settings.tls_cert_file and settings.tls_key_file:
            try:
                tls = tls_context(settings.tls_cert_file, settings.tls_key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ExporterStartError(f"cannot load the TLS certificate or key: {exc}") from None
        if settings.basic_auth_user and settings.basic_auth_password:
            auth = AuthCheck(users={settings.basic_auth_user: settings.basic_auth_password})
        return cls(
            supervisor,
            collectors_for(settings, supervisor),
            settings.listen_address,
            max_concurrent_scrapes=settings.max_concurrent_scrapes,
            auth=auth,
            tls=tls,
        )

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        self.loop.start()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.loop.stop()
        self.supervisor.backend.close()
