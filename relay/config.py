"""relay.yml: destinations, routes, cooldown and escalation policy, watchdog, delivery limits.

Loaded and validated once at start; every error is one line naming the offending key
(``routes[1].cooldown.warning: ...``). Durations are strings such as ``15m`` or ``5s`` so a
demo can compress the timings. Secrets are never in the file: a destination names the
environment variable that holds them (``webhook_url_env: SLACK_WEBHOOK_URL``), and
``<VAR>_FILE`` works too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlwarden import logs
from mlwarden.relay.templates import DEFAULT_TEMPLATES, TemplateError, Templates
from mlwarden.settings import parse_duration, parse_url

SEVERITIES = ("info", "warning", "critical", "emergency")
DEFAULT_COOLDOWN = {"info": 4 * 3600.0, "warning": 3600.0, "critical": 900.0, "emergency": 300.0}
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
# Slack documents about one message per second per incoming webhook; PagerDuty about 120
# events per minute per routing key.
DEFAULT_RATE = {"slack": 1.0, "pagerduty": 2.0}


class ConfigError(ValueError):
    """relay.yml cannot be used; the message is one line naming the key."""


@dataclass(frozen=True)
class Destination:
    name: str
    type: str  # "slack" | "pagerduty"
    url: str  # Slack: the webhook URL (a secret); PagerDuty: the Events API v2 URL
    routing_key: str = ""  # PagerDuty only (a secret)
    rate_per_second: float = 1.0

    def __repr__(self) -> str:  # never print the secrets
        return f"Destination({self.name!r}, {self.type!r})"


@dataclass(frozen=True)
class EscalationLevel:
    """One step of an escalation chain: reached after ``after_repeats`` notifications within the
    chain's window, or after firing for ``after_firing`` (whichever comes first)."""

    destinations: tuple[str, ...]
    after_repeats: int | None = None
    after_firing: float | None = None


@dataclass(frozen=True)
class Escalation:
    levels: tuple[EscalationLevel, ...] = (EscalationLevel((), after_repeats=5),)
    within: float = 3600.0  # the fixed window after_repeats counts in
    page_immediately: tuple[str, ...] = ("critical", "emergency")  # these start at the top level

    @property
    def destinations(self) -> tuple[str, ...]:
        """Every destination of every level, in chain order."""
        return tuple(dict.fromkeys(d for level in self.levels for d in level.destinations))


@dataclass(frozen=True)
class Route:
    destinations: tuple[str, ...]
    match: Mapping[str, str] = field(default_factory=dict)
    match_re: Mapping[str, re.Pattern[str]] = field(default_factory=dict)
    key_labels: tuple[str, ...] = ()  # empty: the alert's fingerprint is its key
    cooldown: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_COOLDOWN))
    escalating_cooldown: tuple[float, ...] = ()  # successive repeats wait this long; empty: off
    escalation: Escalation = Escalation()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match.items()) and all(
            p.fullmatch(labels.get(k, "")) for k, p in self.match_re.items()
        )


@dataclass(frozen=True)
class Watchdog:
    alertname: str = "Watchdog"
    period: float = 60.0
    grace: float = 300.0
    destinations: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delivery:
    max_attempts: int = 12
    backoff_initial: float = 1.0
    backoff_max: float = 600.0
    timeout: float = 10.0
    max_alerts_per_message: int = 20  # Slack coalescing; capped by Slack's 50 blocks
    lease: float | None = None  # how long a claimed job stays claimed; None: 3 x timeout + 30 s

    @property
    def claim_seconds(self) -> float:
        """A claim outlasts the delivery's own timeout, so only a dead worker's jobs come back."""
        return self.lease if self.lease is not None else self.timeout * 3 + 30


@dataclass(frozen=True)
class RelayConfig:
    destinations: Mapping[str, Destination]
    routes: tuple[Route, ...]
    watchdog: Watchdog | None = None
    delivery: Delivery = Delivery()
    dedup_window: float = 300.0
    default_severity: str = "warning"
    templates: Templates = DEFAULT_TEMPLATES

    def route_for(self, labels: Mapping[str, str]) -> Route | None:
        return next((r for r in self.routes if r.matches(labels)), None)


def load(path: Path, environ: Mapping[str, str] | None = None, default_cooldown: float | None = None) -> RelayConfig:
    """Read and validate ``path``. ``default_cooldown`` (ALERT_COOLDOWN) replaces the per-severity defaults."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read relay config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse(raw or {}, os.environ if environ is None else environ, default_cooldown)


def parse(raw: Any, environ: Mapping[str, str], default_cooldown: float | None = None) -> RelayConfig:
    doc = _Node(raw, "")
    doc.only("destinations", "routes", "watchdog", "delivery", "dedup_window", "default_severity",
             "cooldown", "escalating_cooldown", "escalation", "templates")
    destinations = {
        name: _destination(node, environ) for name, node in doc.child("destinations").items()
    }
    if not destinations:
        raise ConfigError("destinations: at least one destination is required")
    base_cooldown = dict(DEFAULT_COOLDOWN)
    if default_cooldown is not None:
        base_cooldown = {s: default_cooldown for s in SEVERITIES}
    defaults = Route(
        destinations=(),
        cooldown={**base_cooldown, **_cooldown(doc.child("cooldown"))},
        escalating_cooldown=_durations(doc.child("escalating_cooldown")),
        escalation=_escalation(doc.child("escalation"), Escalation()),
    )
    routes = tuple(_route(node, defaults) for node in doc.child("routes").list())
    if not routes:
        raise ConfigError("routes: at least one route is required")
    watchdog_node = doc.child("watchdog")
    config = RelayConfig(
        destinations=destinations,
        routes=routes,
        watchdog=_watchdog(watchdog_node) if watchdog_node.value is not None else None,
        delivery=_delivery(doc.child("delivery")),
        dedup_window=doc.child("dedup_window").duration(300.0),
        default_severity=doc.child("default_severity").choice(SEVERITIES, "warning"),
        templates=_templates(doc.child("templates")),
    )
    _check_references(config)
    return config


def _destination(node: _Node, environ: Mapping[str, str]) -> Destination:
    kind = node.child("type").choice(("slack", "pagerduty"), None)
    rate = node.child("rate_per_second").number(DEFAULT_RATE[kind])
    if kind == "slack":
        node.only("type", "webhook_url_env", "rate_per_second")
        url = _secret(node.child("webhook_url_env"), environ)
        try:
            parse_url(url)
        except ValueError as exc:
            raise ConfigError(f"{node.child('webhook_url_env').path}: the webhook URL in that variable: {exc}") from None
        return Destination(node.name, kind, url, rate_per_second=rate)
    node.only("type", "routing_key_env", "events_url", "rate_per_second")
    events_url = node.child("events_url").text(PAGERDUTY_EVENTS_URL)
    try:
        parse_url(events_url)
    except ValueError as exc:
        raise ConfigError(f"{node.child('events_url').path}: {exc}") from None
    key = _secret(node.child("routing_key_env"), environ)
    return Destination(node.name, kind, events_url, routing_key=key, rate_per_second=rate)


def _secret(node: _Node, environ: Mapping[str, str]) -> str:
    variable = node.text(None)
    if variable in environ and environ[variable].strip():
        value = environ[variable].strip()
    elif f"{variable}_FILE" in environ:
        try:
            value = Path(environ[f"{variable}_FILE"]).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{node.path}: cannot read {variable}_FILE: {exc.strerror}") from None
    else:
        raise ConfigError(f"{node.path}: environment variable {variable} (or {variable}_FILE) is not set")
    logs.register_secret(value)
    return value


def _route(node: _Node, defaults: Route) -> Route:
    node.only("match", "match_re", "destinations", "key_labels", "cooldown", "escalating_cooldown", "escalation")
    match_re = {}
    for label, pattern_node in node.child("match_re").items():
        try:
            match_re[label] = re.compile(pattern_node.text(None))
        except re.error as exc:
            raise ConfigError(f"{pattern_node.path}: not a valid regular expression: {exc}") from None
    destinations = node.child("destinations").strings()
    if not destinations:
        raise ConfigError(f"{node.path}.destinations: at least one destination is required")
    escalating = node.child("escalating_cooldown")
    return Route(
        destinations=destinations,
        match={label: v.text(None) for label, v in node.child("match").items()},
        match_re=match_re,
        key_labels=node.child("key_labels").strings(),
        cooldown={**defaults.cooldown, **_cooldown(node.child("cooldown"))},
        escalating_cooldown=_durations(escalating) if escalating.value is not None else defaults.escalating_cooldown,
        escalation=_escalation(node.child("escalation"), defaults.escalation),
    )


def _cooldown(node: _Node) -> dict[str, float]:
    node.only(*SEVERITIES)
    return {severity: value.duration(None) for severity, value in node.items()}


def _durations(node: _Node) -> tuple[float, ...]:
    return tuple(item.duration(None) for item in node.list())


def _escalation(node: _Node, defaults: Escalation) -> Escalation:
    """``levels: [...]`` (a chain), or the one-level shorthand: after_repeats, after_firing and
    destinations at the top, each defaulting to the first level of ``defaults``."""
    if node.value is None:
        return defaults
    node.only("levels", "after_repeats", "within", "after_firing", "destinations", "page_immediately")
    immediately = node.child("page_immediately")
    for severity in immediately.list():
        severity.choice(SEVERITIES, None)
    levels_node = node.child("levels")
    if levels_node.value is not None:
        for shorthand in ("after_repeats", "after_firing", "destinations"):
            if node.child(shorthand).value is not None:
                raise ConfigError(f"{node.path}.{shorthand}: give it in each of levels, not beside them")
        levels = tuple(_level(level, None) for level in levels_node.list())
        if not levels:
            raise ConfigError(f"{levels_node.path}: at least one level is required")
    else:
        levels = (_level(node, defaults.levels[0]),)
    return Escalation(
        levels=levels,
        within=node.child("within").duration(defaults.within),
        page_immediately=immediately.strings() if immediately.value is not None else defaults.page_immediately,
    )


def _level(node: _Node, defaults: EscalationLevel | None) -> EscalationLevel:
    if defaults is None:
        node.only("after_repeats", "after_firing", "destinations")
    repeats, firing = node.child("after_repeats"), node.child("after_firing")
    level = EscalationLevel(
        destinations=node.child("destinations").strings() or (defaults.destinations if defaults else ()),
        after_repeats=repeats.integer(1) if repeats.value is not None else (defaults.after_repeats if defaults else None),
        after_firing=firing.duration(None) if firing.value is not None else (defaults.after_firing if defaults else None),
    )
    if defaults is None and (level.after_repeats is None and level.after_firing is None or not level.destinations):
        raise ConfigError(f"{node.path}: a level needs destinations and after_repeats or after_firing")
    return level


def _templates(node: _Node) -> Templates:
    if node.value is None:
        return DEFAULT_TEMPLATES
    try:
        return Templates({name: source.text(None) for name, source in node.items()})
    except TemplateError as exc:
        raise ConfigError(str(exc)) from None


def _watchdog(node: _Node) -> Watchdog:
    node.only("alertname", "period", "grace", "destinations")
    destinations = node.child("destinations").strings()
    if not destinations:
        raise ConfigError(f"{node.path}.destinations: at least one destination is required")
    return Watchdog(
        alertname=node.child("alertname").text("Watchdog"),
        period=node.child("period").duration(60.0),
        grace=node.child("grace").duration(300.0),
        destinations=destinations,
    )


def _delivery(node: _Node) -> Delivery:
    node.only("max_attempts", "backoff_initial", "backoff_max", "timeout", "max_alerts_per_message", "lease")
    per_message = node.child("max_alerts_per_message").integer(20)
    if per_message > 48:
        raise ConfigError(f"{node.child('max_alerts_per_message').path}: at most 48 (Slack allows 50 blocks)")
    timeout = node.child("timeout").duration(10.0)
    lease_node = node.child("lease")
    lease = lease_node.duration(None) if lease_node.value is not None else None
    if lease is not None and lease <= timeout:
        raise ConfigError(f"{lease_node.path}: must be longer than delivery.timeout, or a slow delivery is sent twice")
    return Delivery(
        lease=lease,
        max_attempts=node.child("max_attempts").integer(12),
        backoff_initial=node.child("backoff_initial").duration(1.0),
        backoff_max=node.child("backoff_max").duration(600.0),
        timeout=timeout,
        max_alerts_per_message=per_message,
    )


def _check_references(config: RelayConfig) -> None:
    def check(names: tuple[str, ...], where: str) -> None:
        for name in names:
            if name not in config.destinations:
                raise ConfigError(f"{where}: unknown destination {name!r} (known: {', '.join(config.destinations)})")

    for i, route in enumerate(config.routes):
        check(route.destinations, f"routes[{i}].destinations")
        check(route.escalation.destinations, f"routes[{i}].escalation.destinations")
    if config.watchdog:
        check(config.watchdog.destinations, "watchdog.destinations")


class _Node:
    """A value in the YAML tree that knows its path, so that errors can name it."""

    def __init__(self, value: Any, path: str, name: str = "") -> None:
        self.value = value
        self.path = path
        self.name = name

    def _fail(self, expected: str) -> ConfigError:
        return ConfigError(f"{self.path or 'relay config'}: expected {expected}, got {self.value!r}")

    def child(self, key: str) -> _Node:
        mapping = self.value if self.value is not None else {}
        if not isinstance(mapping, dict):
            raise self._fail("a mapping")
        return _Node(mapping.get(key), f"{self.path}.{key}" if self.path else key, key)

    def only(self, *keys: str) -> None:
        if self.value is None:
            return
        if not isinstance(self.value, dict):
            raise self._fail("a mapping")
        unknown = sorted(set(map(str, self.value)) - set(keys))
        if unknown:
            where = f"{self.path}: " if self.path else ""
            raise ConfigError(f"{where}unknown key {unknown[0]!r} (expected one of {', '.join(keys)})")

    def items(self) -> list[tuple[str, _Node]]:
        if self.value is None:
            return []
        if not isinstance(self.value, dict):
            raise self._fail("a mapping")
        return [(str(k), _Node(v, f"{self.path}.{k}", str(k))) for k, v in self.value.items()]

    def list(self) -> list[_Node]:
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            raise self._fail("a list")
        return [_Node(v, f"{self.path}[{i}]") for i, v in enumerate(self.value)]

    def _required(self, default: Any) -> Any:
        if self.value is None:
            if default is None:
                raise ConfigError(f"{self.path}: required")
            return default
        return self.value

    def text(self, default: str | None) -> str:
        value = self._required(default)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool) or str(value) == "":
            raise self._fail("a non-empty string")
        return str(value)

    def strings(self) -> tuple[str, ...]:
        return tuple(item.text(None) for item in self.list())

    def choice(self, choices: tuple[str, ...], default: str | None) -> str:
        value = self.text(default)
        if value not in choices:
            raise ConfigError(f"{self.path}: expected one of {', '.join(choices)}, got {value!r}")
        return value

    def duration(self, default: float | None) -> float:
        value = self._required(default)
        if isinstance(value, bool):
            raise self._fail("a duration such as 30s or 15m")
        try:
            seconds = parse_duration(str(value))
        except ValueError as exc:
            raise ConfigError(f"{self.path}: {exc}") from None
        return seconds

    def integer(self, default: int) -> int:
        value = self._required(default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise self._fail("a whole number of at least 1")
        return value

    def number(self, default: float) -> float:
        value = self._required(default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise self._fail("a number greater than zero")
        return float(value)

