"""``mlwarden relay``: settings, and running the app under uvicorn."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import sys
from pathlib import Path

import uvicorn
from mlwarden.relay import config as relay_config
from mlwarden.relay.app import DEFAULT_MAX_BODY_BYTES, Relay, create_app
from mlwarden.relay.auth import Credentials
from mlwarden.relay.server import WebhookProtocol
from mlwarden.relay.store import StoreError, check_url, open_store

from mlwarden import logs
from mlwarden.command import Command
from mlwarden.exitcodes import ExitCode
from mlwarden.settings import in_range, parse_duration, parse_listen_address, parse_size, positive, setting

log = logging.getLogger(__name__)

DEFAULT_STATE_URL = "sqlite:///var/lib/mlwarden/relay.db"
GC_YOUNG_ALLOCATIONS = 20_000  # see run
SWITCH_INTERVAL_SECONDS = 0.0005  # see run
CHECK_CONFIG = "check-config"
ACTIONS = ("serve", CHECK_CONFIG)


@dataclasses.dataclass(frozen=True)
class RelaySettings:
    action: str = setting(
        "serve", help="serve (the default), or check-config: validate --config, exit 0 (valid) or 2 (one line why)",
        positional=True, choices=ACTIONS, metavar="ACTION",
    )
    json_schema: bool = setting(False, help="with check-config: print relay.yml's JSON Schema (for editors) and exit")
    config: Path = setting(Path("/etc/mlwarden/relay.yml"), help="relay.yml: destinations, routes, cooldown, escalation, watchdog")
    listen_address: tuple[str, int] = setting(
        ("127.0.0.1", 9946), help="address to serve the webhook, health and metrics on", parse=parse_listen_address
    )
    state_url: str = setting(
        DEFAULT_STATE_URL, help="state store: sqlite:///path/relay.db (one relay) or redis://host:port/db (replicas)",
        parse=check_url,
    )
    token: str = setting("", help="bearer token Alertmanager must send", secret=True)
    basic_auth_user: str | None = setting(None, help="user name for HTTP basic authentication (instead of or besides the token)")
    basic_auth_password: str = setting("", help="password for HTTP basic authentication", secret=True)
    max_body_bytes: int = setting(
        DEFAULT_MAX_BODY_BYTES, help="largest webhook body kept; above it, the alerts that fit are kept and the rest counted",
        parse=positive(parse_size),
    )
    workers: int = setting(4, help="deliveries in flight at once", parse=in_range(int, 1, 64))
    alert_cooldown: float | None = setting(
        None, help="cooldown for every severity, replacing the built-in defaults (routes may still override)",
        env=("ALERT_COOLDOWN",), parse=positive(parse_duration),
    )

    def __post_init__(self) -> None:
        if self.action == CHECK_CONFIG:
            return  # a config check needs no credentials
        if not self.token and not self.basic_auth_password:
            raise ValueError(
                "MLWARDEN_RELAY_TOKEN (or _FILE) or MLWARDEN_RELAY_BASIC_AUTH_PASSWORD is required: "
                "the webhook never runs unauthenticated"
            )
        if self.basic_auth_password and not self.basic_auth_user:
            raise ValueError("--basic-auth-user is required with MLWARDEN_RELAY_BASIC_AUTH_PASSWORD")


def check_config(settings: RelaySettings) -> int:
    """What an operator runs before a reload: 0 and a summary, or 2 and the one line that says why."""
    if settings.json_schema:
        print(json.dumps(relay_config.json_schema(), indent=2))
        return ExitCode.OK
    try:
        config = relay_config.load(settings.config, os.environ, settings.alert_cooldown)
    except relay_config.ConfigError as exc:
        print(f"{settings.config}: invalid: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    print(f"{settings.config}: valid ({len(config.destinations)} destination(s), {len(config.routes)} route(s))")
    return ExitCode.OK


def run(settings: RelaySettings) -> int:
    if settings.action == CHECK_CONFIG:
        return check_config(settings)

    def load() -> relay_config.RelayConfig:
        return relay_config.load(settings.config, os.environ, settings.alert_cooldown)

    try:
        config = load()
    except relay_config.ConfigError as exc:
        log.error("%s", exc)
        return ExitCode.USAGE
    try:
        store = open_store(settings.state_url)
    except (StoreError, ValueError) as exc:
        log.error("%s", exc)
        return ExitCode.FAILURE
    relay = Relay(
        config=config,
        store=store,
        credentials=Credentials(settings.token, settings.basic_auth_user or "", settings.basic_auth_password),
        max_body_bytes=settings.max_body_bytes,
        workers=settings.workers,
        load_config=load,
    )
    host, port = settings.listen_address
    log.info("relay listening on %s:%d, state %s, %d destination(s), %d route(s)",
             host, port, settings.state_url.split("@")[-1], len(config.destinations), len(config.routes))
    app = create_app(relay)
    # Everything imported and built so far lives as long as the process: moved out of the
    # collector's sight, a full collection no longer rescans it (one took 15-60 ms, stalling
    # every webhook in flight: the largest part of the acknowledgement p99 under load).
    gc.freeze()
    # Collections rarer than CPython's default (700, 10, 10). Under load each webhook's notices
    # live a second or so (until the outbox delivers them): long enough to reach the oldest
    # generation, whose growth then set off a full collection (40-50 ms, every thread stopped)
    # every few seconds, and the young collections cost 0.2 ms of CPU per webhook at 500 a
    # second. Measured in that phase: 0.22 -> 0.02 ms per webhook, and a full collection about
    # once a minute instead of every second or two. Cycles still die young: a young collection
    # runs every 20,000 allocations.
    gc.set_threshold(GC_YOUNG_ALLOCATIONS, 20, 100)
    # How long a thread that asks for the GIL waits for one running Python before that one is told
    # to let go (Python's default: 5 ms). Each webhook takes the GIL in turn on the event loop, in
    # the writer at every SQLite statement, and back on the loop; while the outbox's thread computed
    # (a Slack digest: thousands of jobs claimed, folded and recorded), each of those turns could
    # cost the full wait. Switches happen only while two threads want the GIL: a quiet relay pays
    # nothing (the exporter does the same, see exporter/cli.py).
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    try:
        uvicorn.run(app, host=host, port=port, http=WebhookProtocol, **logs.uvicorn_options(),
                    timeout_graceful_shutdown=10)
    finally:
        store.close()
    return ExitCode.OK


# Read by mlwarden.registry without importing this module (literals only).
MLWARDEN_COMMANDS = (
    {"name": "relay", "attribute": "COMMAND",
     "help": "receive Alertmanager webhooks; cooldown, escalate, fan out to Slack and PagerDuty"},
)

COMMAND = Command(
    "relay",
    settings=RelaySettings,
    run=run,
    description=(
        "Receives Alertmanager webhooks on POST /webhook/alertmanager, applies per-key cooldown and "
        "escalation, and delivers to Slack and PagerDuty through a durable outbox."
    ),
)
