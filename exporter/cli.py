"""``mlwarden exporter``: its settings and its command."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import signal
import sys
import threading
import typing
from pathlib import Path

from mlwarden.exporter.collectors.base import with_collector_settings

from mlwarden.command import Command
from mlwarden.exitcodes import ExitCode
from mlwarden.libc import libc
from mlwarden.settings import in_range, parse_duration, parse_listen_address, positive, setting

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExporterSettings:
    listen_address: tuple[str, int] = setting(
        ("127.0.0.1", 9945), parse=parse_listen_address, metavar="HOST:PORT", aliases=("--web.listen-address",),
        help="address to serve /metrics and /healthz on (`:9945` for every interface)",
    )
    gpu_backend: str = setting(
        "auto", choices=("auto", "nvml", "simulated"),
        help="where GPU readings come from: `auto` reads NVML and serves mlwarden_nvml_up 0 without a driver; "
        "`nvml` exits 1 when NVML cannot start; `simulated` invents GPUs (demo, tests)",
    )
    simulated_gpus: int = setting(2, parse=in_range(int, 1, 1024), help="number of GPUs the simulated backend shows")
    simulated_processes: int = setting(3, parse=in_range(int, 0, 1000), help="processes per simulated GPU")
    interval: float = setting(
        5.0, parse=in_range(parse_duration, 0.1, 3600), metavar="DURATION",
        help="how often GPUs, processes and XID counts are collected (1s is fine on a busy machine)",
    )
    collection_timeout: float | None = setting(
        None, parse=positive(parse_duration), metavar="DURATION",
        help="a GPU pass running longer than this is stale: its series are dropped until it returns (default: the interval)",
    )
    artifacts_interval: float = setting(
        60.0, parse=in_range(parse_duration, 0.1, 86400), metavar="DURATION",
        help="how often the backups and artifacts collectors run (walking big trees is slow)",
    )
    max_concurrent_scrapes: int = setting(10, parse=in_range(int, 1, 1000),
        help="scrape bodies sent at once (a slow client holds one until it has read); more wait up to 1 s, then get 503")
    tls_cert_file: Path | None = setting(None, help="serve HTTPS with this certificate (PEM); needs --tls-key-file")
    tls_key_file: Path | None = setting(None, help="private key (PEM) for --tls-cert-file")
    basic_auth_user: str | None = setting(None, help="require HTTP basic auth with this user name for /metrics and /-/simulate")
    basic_auth_password: str | None = setting(None, secret=True, help="password for --basic-auth-user")
    web_config_file: Path | None = setting(
        None, flag="--web.config.file", metavar="FILE",
        help="exporter-toolkit web configuration (TLS, mTLS client CA, bcrypt basic_auth_users), as node_exporter "
        "reads it; replaces the --tls-* and --basic-auth-* settings",
    )

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("--tls-cert-file and --tls-key-file go together: set both or neither")
        if bool(self.basic_auth_user) != bool(self.basic_auth_password):
            raise ValueError(
                "--basic-auth-user and MLWARDEN_EXPORTER_BASIC_AUTH_PASSWORD go together: set both or neither"
            )
        for path in (self.tls_cert_file, self.tls_key_file):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        if self.web_config_file is not None:
            if self.tls_cert_file or self.basic_auth_user:
                raise ValueError("--web.config.file replaces --tls-cert-file/--tls-key-file and --basic-auth-user: use one or the other")
            if not self.web_config_file.is_file():
                raise ValueError(f"web config file {self.web_config_file} does not exist")

    @property
    def effective_timeout(self) -> float:
        return self.collection_timeout or self.interval


if not typing.TYPE_CHECKING:
    # Each collector's switch (--collector-NAME) and own settings join from its registration
    # (mlwarden.exporter.collectors.base); typed code sees them through the registry only.
    ExporterSettings = with_collector_settings(ExporterSettings)


_M_ARENA_MAX = -8  # glibc's mallopt parameter
SWITCH_INTERVAL_S = 0.0005


def one_malloc_arena() -> bool:
    """Have glibc's malloc use one arena for all threads, unless MALLOC_ARENA_MAX says otherwise.

    Each collector thread would otherwise get an arena of its own (a MiB of resident memory in all,
    measured), for no gain: the threads take turns under the GIL anyway. Called before any thread
    starts; True when glibc took it.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        return bool(libc().mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return False


def release_free_memory() -> bool:
    """Hand the memory start-up freed back to the kernel (glibc's ``malloc_trim``); True when glibc did.

    Parsing settings, importing and starting NVML leave about a MiB of freed blocks that glibc keeps for
    reuse, which an exporter that allocates little from then on never reuses: resident memory for nothing.
    """
    try:
        return bool(libc().malloc_trim(0))
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        return False


def run(settings: ExporterSettings) -> int:
    from mlwarden.exporter.app import Exporter, ExporterStartError

    one_malloc_arena()

    try:
        exporter = Exporter.from_settings(settings)
    except ExporterStartError as exc:
        log.error("%s", exc)
        return ExitCode.FAILURE
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # Everything made so far (modules, settings, the server) lives as long as the process.
    # Frozen, the garbage collector's full passes no longer walk it: each took ~19 ms holding the
    # GIL at 64 GPUs, and every scrape arriving meanwhile waited for it.
    gc.freeze()
    release_free_memory()
    # A thread that wants the GIL waits this long before the holder is asked to let go: at Python's
    # 5 ms a scrape that arrives during a collection pass waited up to 5 ms for each step of its answer.
    # Switches happen only while two threads want the GIL, so an idle exporter pays nothing for it.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    exporter.start()
    host, port = settings.listen_address
    log.info("serving %s://%s:%d/metrics (%s backend)", exporter.scheme, host, exporter.port, settings.gpu_backend)
    stop.wait()
    log.info("stopping")
    exporter.stop()
    return ExitCode.OK


# Read by mlwarden.registry without importing this module (literals only).
MLWARDEN_COMMANDS = (
    {"name": "exporter", "attribute": "COMMAND", "help": "serve GPU, backup and artifact metrics for Prometheus"},
)

COMMAND = Command(
    "exporter",
    settings=ExporterSettings,
    run=run,
    description="Serve GPU health (NVML), backup catalog state and artifact directory sizes on /metrics. "
    "Collection runs in the background; a scrape returns the latest snapshot.",
)
