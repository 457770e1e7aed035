"""relay.yml: destinations, routes, cooldown and escalation policy, watchdog, delivery limits.

Validated by one pydantic schema (:mod:`relay.schema`, which also writes the JSON Schema for
editors), then built into the frozen dataclasses below; every error is one line naming the
offending key (``routes[1].cooldown.warning: ...``). Loaded at start, and again on SIGHUP or
``POST /-/reload`` (a config that does not validate is refused and the running one kept). Durations are strings such as ``15m`` or ``5s`` so a
demo can compress the timings. Secrets are never in the file: a destination names the
environment variable that holds them (``webhook_url_env: SLACK_WEBHOOK_URL``), and
``<VAR>_FILE`` works too.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml
from mlwarden.relay import schema as schema_doc
from mlwarden.relay.fields import ConfigError as ConfigError
from mlwarden.relay.notifiers import integrations
from mlwarden.relay.notifiers.base import Destination as Destination
from mlwarden.relay.templates import DEFAULT_TEMPLATES, TemplateError, Templates

SEVERITIES = ("info", "warning", "critical", "emergency")
DEFAULT_COOLDOWN = {"info": 4 * 3600.0, "warning": 3600.0, "critical": 900.0, "emergency": 300.0}


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
    # An info alert is for dashboards and the channel, not for waking someone: it never escalates.
    severities: tuple[str, ...] = ("warning", "critical", "emergency")

    @property
    def destinations(self) -> tuple[str, ...]:
        """Every destination of every level, in chain order."""
        return tuple(dict.fromkeys(d for level in self.levels for d in level.destinations))


_MATCHER = re.compile(r'\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(=~|!~|!=|=)\s*(.*?)\s*')


@dataclass(frozen=True)
class Matcher:
    """One Alertmanager matcher: ``name="value"``, ``name!="value"``, ``name=~"regex"`` or
    ``name!~"regex"`` (the value may go unquoted); a missing label counts as empty, and a
    regular expression must match the whole value, as in Alertmanager."""

    name: str
    op: str
    value: str
    pattern: re.Pattern[str] | None = None

    @classmethod
    def parse(cls, text: str) -> Matcher:
        found = _MATCHER.fullmatch(text)
        if not found:
            raise ValueError(f"not a matcher: {text!r} (expected name=\"value\", !=, =~ or !~)")
        name, op, value = found.groups()
        if value.startswith('"'):
            value = _unquote(value, text)
        pattern = None
        if op in ("=~", "!~"):
            try:
                pattern = re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression in {text!r}: {exc}") from None
        return cls(name, op, value, pattern)

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.name, "")
        if self.pattern is not None:
            return bool(self.pattern.fullmatch(value)) == (self.op == "=~")
        return (value == self.value) == (self.op == "=")


def _unquote(quoted: str, text: str) -> str:
    """The value of a double-quoted matcher value (backslash escapes ``\\"``, ``\\\\``, ``\\n``)."""
    value, i = [], 1
    while i < len(quoted):
        char = quoted[i]
        if char == "\\" and i + 1 < len(quoted):
            value.append("\n" if quoted[i + 1] == "n" else quoted[i + 1])
            i += 2
        elif char == '"':
            if i != len(quoted) - 1:
                raise ValueError(f"text after the closing quote in {text!r}")
            return "".join(value)
        else:
            value.append(char)
            i += 1
    raise ValueError(f"unterminated quoted value in {text!r}")


@dataclass(frozen=True)
class Route:
    destinations: tuple[str, ...]
    match: Mapping[str, str] = field(default_factory=dict)
    match_re: Mapping[str, re.Pattern[str]] = field(default_factory=dict)
    matchers: tuple[Matcher, ...] = ()  # Alertmanager's syntax; all must hold, like match and match_re
    key_labels: tuple[str, ...] = ()  # empty: the alert's fingerprint is its key
    cooldown: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_COOLDOWN))
    escalating_cooldown: tuple[float, ...] = ()  # successive repeats wait this long; empty: off
    escalation: Escalation = Escalation()

    @functools.cached_property
    def reach(self) -> tuple[tuple[str, ...], ...]:
        """The destinations at each escalation level (0: the route's own): the route's, then
        each level's up to it, in order, without repeats. Computed once per route, not per alert."""
        return tuple(
            tuple(dict.fromkeys([*self.destinations, *(d for step in self.escalation.levels[:n] for d in step.destinations)]))
            for n in range(len(self.escalation.levels) + 1)
        )

    def matches(self, labels: Mapping[str, str]) -> bool:
        if not (self.match or self.match_re or self.matchers):
            return True  # a catch-all route, the usual last one: no generators to build
        return (
            all(labels.get(k) == v for k, v in self.match.items())
            and all(p.fullmatch(labels.get(k, "")) for k, p in self.match_re.items())
            and all(m.matches(labels) for m in self.matchers)
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


def json_schema() -> dict[str, Any]:
    """The JSON Schema of relay.yml, for editors (``mlwarden relay check-config --json-schema``)."""
    schema = schema_doc.RelayDoc.model_json_schema()
    schema["title"] = "mlwarden relay configuration (relay.yml)"
    return schema


def parse(raw: Any, environ: Mapping[str, str], default_cooldown: float | None = None) -> RelayConfig:
    """Validate ``raw`` against the schema (one line naming the first offending key), then build
    the config: secrets from ``environ``, references between destinations and routes checked."""
    try:
        doc = schema_doc.RelayDoc.model_validate(raw)
    except pydantic.ValidationError as exc:
        raise ConfigError(schema_doc.first_error(exc)) from None
    destinations = {name: _destination(name, d, environ) for name, d in doc.destinations.items()}
    if not destinations:
        raise ConfigError("destinations: at least one destination is required")
    base_cooldown = dict(DEFAULT_COOLDOWN)
    if default_cooldown is not None:
        base_cooldown = {s: default_cooldown for s in SEVERITIES}
    defaults = Route(
        destinations=(),
        cooldown={**base_cooldown, **_cooldown(doc.cooldown)},
        escalating_cooldown=tuple(doc.escalating_cooldown or ()),
        escalation=_escalation(doc.escalation, Escalation(), "escalation"),
    )
    if not doc.routes:
        raise ConfigError("routes: at least one route is required")
    routes = tuple(_route(route, defaults, f"routes[{i}]") for i, route in enumerate(doc.routes))
    config = RelayConfig(
        destinations=destinations,
        routes=routes,
        watchdog=_watchdog(doc.watchdog) if doc.watchdog is not None else None,
        delivery=_delivery(doc.delivery),
        dedup_window=doc.dedup_window,
        default_severity=doc.default_severity,
        templates=_templates(doc.templates),
    )
    _check_references(config)
    return config


def _destination(name: str, doc: Any, environ: Mapping[str, str]) -> Destination:
    """Built by the destination's own integration, from the keys its model accepted."""
    integration = integrations()[doc.type]
    return integration.destination(name, doc, doc.rate_per_second or integration.default_rate, environ)


def _route(doc: schema_doc.RouteDoc, defaults: Route, where: str) -> Route:
    match_re = {}
    for label, pattern in doc.match_re.items():
        try:
            match_re[label] = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{where}.match_re.{label}: not a valid regular expression: {exc}") from None
    matchers = []
    for i, text in enumerate(doc.matchers):
        try:
            matchers.append(Matcher.parse(text))
        except ValueError as exc:
            raise ConfigError(f"{where}.matchers[{i}]: {exc}") from None
    if not doc.destinations:
        raise ConfigError(f"{where}.destinations: at least one destination is required")
    return Route(
        destinations=tuple(doc.destinations),
        match=dict(doc.match),
        match_re=match_re,
        matchers=tuple(matchers),
        key_labels=tuple(doc.key_labels),
        cooldown={**defaults.cooldown, **_cooldown(doc.cooldown)},
        escalating_cooldown=tuple(doc.escalating_cooldown) if doc.escalating_cooldown is not None
        else defaults.escalating_cooldown,
        escalation=_escalation(doc.escalation, defaults.escalation, f"{where}.escalation"),
    )


def _cooldown(doc: schema_doc.CooldownDoc | None) -> dict[str, float]:
    if doc is None:
        return {}
    return {severity: value for severity, value in doc.model_dump().items() if value is not None}


def _escalation(doc: schema_doc.EscalationDoc | None, defaults: Escalation, where: str) -> Escalation:
    """``levels: [...]`` (a chain), or the one-level shorthand: after_repeats, after_firing and
    destinations at the top, each defaulting to the first level of ``defaults``."""
    if doc is None:
        return defaults
    if doc.levels is not None:
        for shorthand in ("after_repeats", "after_firing", "destinations"):
            if getattr(doc, shorthand) is not None:
                raise ConfigError(f"{where}.{shorthand}: give it in each of levels, not beside them")
        if not doc.levels:
            raise ConfigError(f"{where}.levels: at least one level is required")
        for i, level in enumerate(doc.levels):
            if not level.destinations or (level.after_repeats is None and level.after_firing is None):
                raise ConfigError(f"{where}.levels[{i}]: a level needs destinations and after_repeats or after_firing")
        levels = tuple(EscalationLevel(tuple(level.destinations), level.after_repeats, level.after_firing)
                       for level in doc.levels)
    else:
        first = defaults.levels[0]
        levels = (EscalationLevel(
            destinations=tuple(doc.destinations) if doc.destinations else first.destinations,
            after_repeats=doc.after_repeats if doc.after_repeats is not None else first.after_repeats,
            after_firing=doc.after_firing if doc.after_firing is not None else first.after_firing,
        ),)
    escalation = Escalation(
        levels=levels,
        within=doc.within if doc.within is not None else defaults.within,
        page_immediately=tuple(doc.page_immediately) if doc.page_immediately is not None else defaults.page_immediately,
        severities=tuple(doc.severities) if doc.severities is not None else defaults.severities,
    )
    not_escalating = [s for s in escalation.page_immediately if s not in escalation.severities]
    if not_escalating:
        raise ConfigError(f"{where}.page_immediately: {', '.join(not_escalating)} must also be in {where}.severities "
                          f"(the severities that escalate at all)")
    return escalation


def _templates(doc: schema_doc.TemplatesDoc | None) -> Templates:
    if doc is None:
        return DEFAULT_TEMPLATES
    try:
        return Templates({name: source for name, source in doc.model_dump().items() if source is not None})
    except TemplateError as exc:
        raise ConfigError(str(exc)) from None


def _watchdog(doc: schema_doc.WatchdogDoc) -> Watchdog:
    if not doc.destinations:
        raise ConfigError("watchdog.destinations: at least one destination is required")
    return Watchdog(alertname=doc.alertname, period=doc.period, grace=doc.grace, destinations=tuple(doc.destinations))


def _delivery(doc: schema_doc.DeliveryDoc) -> Delivery:
    if doc.lease is not None and doc.lease <= doc.timeout:
        raise ConfigError("delivery.lease: must be longer than delivery.timeout, or a slow delivery is sent twice")
    return Delivery(
        max_attempts=doc.max_attempts,
        backoff_initial=doc.backoff_initial,
        backoff_max=doc.backoff_max,
        timeout=doc.timeout,
        max_alerts_per_message=doc.max_alerts_per_message,
        lease=doc.lease,
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
