"""The shape of relay.yml as one pydantic schema: validation, and the JSON Schema editors use.

Only the shape lives here (keys, types, durations, severities); what needs the environment or
the whole document (secrets, references between routes and destinations, templates that
compile) is checked by :mod:`relay.config` as it builds the configuration.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, Union

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from mlwarden.settings import parse_duration

Severity = Literal["info", "warning", "critical", "emergency"]


def _duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a duration such as 30s or 15m, got {value!r}")
    try:
        return parse_duration(str(value))
    except ValueError as exc:
        raise ValueError(f"expected a duration such as 30s or 15m: {exc}") from None


def _whole(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"expected a whole number of at least 1, got {value!r}")
    return value


def _positive(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"expected a number greater than zero, got {value!r}")
    return float(value)


def _text(value: Any) -> str:
    # YAML reads `gpu: 0` as a number; a label value is text all the same.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value) == "":
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return str(value)


Duration = Annotated[
    float, BeforeValidator(_duration),
    WithJsonSchema({"type": ["string", "number"], "description": "a duration: 500ms, 30s, 15m, 1h30m, 1d"}),
]
Whole = Annotated[int, BeforeValidator(_whole), WithJsonSchema({"type": "integer", "minimum": 1})]
Positive = Annotated[float, BeforeValidator(_positive), WithJsonSchema({"type": "number", "exclusiveMinimum": 0})]
Text = Annotated[str, BeforeValidator(_text), WithJsonSchema({"type": ["string", "number"], "minLength": 1})]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CooldownDoc(_Doc):
    info: Duration | None = None
    warning: Duration | None = None
    critical: Duration | None = None
    emergency: Duration | None = None


class LevelDoc(_Doc):
    destinations: list[Text] = []
    after_repeats: Whole | None = Field(None, description="reached after this many notifications within the window")
    after_firing: Duration | None = Field(None, description="reached after firing this long (the level's delay)")


class EscalationDoc(_Doc):
    levels: list[LevelDoc] | None = Field(None, description="an escalation chain; each level adds its destinations")
    within: Duration | None = Field(None, description="the fixed window after_repeats counts in")
    after_repeats: Whole | None = None
    after_firing: Duration | None = None
    destinations: list[Text] | None = None
    page_immediately: list[Severity] | None = None


class RouteDoc(_Doc):
    matchers: list[str] = Field([], description='Alertmanager matchers: name="v", name!="v", name=~"re", name!~"re"')
    match: dict[str, Text] = {}
    match_re: dict[str, Text] = {}
    destinations: list[Text] = []
    key_labels: list[Text] = []
    cooldown: CooldownDoc | None = None
    escalating_cooldown: list[Duration] | None = None
    escalation: EscalationDoc | None = None


class WatchdogDoc(_Doc):
    alertname: Text = "Watchdog"
    period: Duration = 60.0
    grace: Duration = 300.0
    destinations: list[Text] = []


class DeliveryDoc(_Doc):
    max_attempts: Whole = 12
    backoff_initial: Duration = 1.0
    backoff_max: Duration = 600.0
    timeout: Duration = 10.0
    max_alerts_per_message: Annotated[Whole, Field(le=48, description="at most 48: Slack allows 50 blocks")] = 20
    lease: Duration | None = Field(None, description="how long a claimed delivery stays claimed (3 x timeout + 30s)")


class TemplatesDoc(_Doc):
    title: str | None = None
    slack_text: str | None = None
    slack_notification: str | None = None
    pagerduty_summary: str | None = None


class RelayDoc(_Doc):
    destinations: dict[str, Any] = {}  # each integration's model: see relay_doc()
    routes: list[RouteDoc] = []
    watchdog: WatchdogDoc | None = None
    delivery: DeliveryDoc = DeliveryDoc()
    dedup_window: Duration = 300.0
    default_severity: Severity = "warning"
    cooldown: CooldownDoc | None = None
    escalating_cooldown: list[Duration] | None = None
    escalation: EscalationDoc | None = None
    templates: TemplatesDoc | None = None


@functools.cache
def relay_doc() -> type[RelayDoc]:
    """:class:`RelayDoc` whose destinations are the registered integrations' models, told apart by ``type``."""
    from mlwarden.relay.notifiers.base import registered  # by name: the notifiers use this module's types

    docs = tuple(integration.doc for integration in registered().values())
    destination = Annotated[Union[docs], pydantic.Field(discriminator="type")]  # noqa: UP007 - a Union of a tuple
    model: type[RelayDoc] = pydantic.create_model("RelayDoc", __base__=RelayDoc, destinations=(dict[str, destination], {}))
    return model


def first_error(exc: pydantic.ValidationError) -> str:
    """The first error as one line: ``routes[1].cooldown.warning: expected a duration ...``."""
    error = exc.errors()[0]
    loc = list(error["loc"])
    if loc[:1] == ["destinations"] and len(loc) > 2:
        del loc[2]  # the destination's type, by which pydantic chose its model
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if error["type"] == "union_tag_invalid":
        return f"{path}.type: expected one of {error['ctx']['expected_tags']}, got {error['ctx']['tag']!r}"
    if error["type"] == "union_tag_not_found":
        return f"{path}.type: required"
    if error["type"] == "extra_forbidden":
        parent, _, key = path.rpartition(".")
        return f"{parent or 'relay config'}: unknown key {key!r}"
    if error["type"] == "missing":
        return f"{path}: required"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "less_than_equal":
        message = f"at most {error['ctx']['le']}, got {error['input']!r}"
    elif error["type"] != "value_error":
        message = f"{message[0].lower()}{message[1:]}, got {error['input']!r}"
    return f"{path or 'relay config'}: {message}"
