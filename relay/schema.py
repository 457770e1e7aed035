"""The shape of relay.yml as one pydantic schema: validation, and the JSON Schema editors use.

Only the shape lives here (keys, types, durations, severities); what needs the environment or
the whole document (secrets, references between routes and destinations, templates that
compile) is checked by :mod:`relay.config` as it builds the configuration. A destination's
keys come from its notifier's own model (:func:`relay.notifiers.integrations`), chosen by ``type``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, Union

import pydantic
from mlwarden.relay.fields import Doc, Duration, Text, Whole
from mlwarden.relay.notifiers import integrations
from mlwarden.relay.notifiers.base import DestinationDoc as BaseDestinationDoc
from pydantic import Field

Severity = Literal["info", "warning", "critical", "emergency"]


class CooldownDoc(Doc):
    info: Duration | None = None
    warning: Duration | None = None
    critical: Duration | None = None
    emergency: Duration | None = None


class LevelDoc(Doc):
    destinations: list[Text] = []
    after_repeats: Whole | None = Field(None, description="reached after this many notifications within the window")
    after_firing: Duration | None = Field(None, description="reached after firing this long (the level's delay)")


class EscalationDoc(Doc):
    levels: list[LevelDoc] | None = Field(None, description="an escalation chain; each level adds its destinations")
    within: Duration | None = Field(None, description="the fixed window after_repeats counts in")
    after_repeats: Whole | None = None
    after_firing: Duration | None = None
    destinations: list[Text] | None = None
    page_immediately: list[Severity] | None = None
    severities: list[Severity] | None = Field(None, description="the severities that escalate at all (default: all but info)")


class RouteDoc(Doc):
    matchers: list[str] = Field([], description='Alertmanager matchers: name="v", name!="v", name=~"re", name!~"re"')
    match: dict[str, Text] = {}
    match_re: dict[str, Text] = {}
    destinations: list[Text] = []
    key_labels: list[Text] = []
    cooldown: CooldownDoc | None = None
    escalating_cooldown: list[Duration] | None = None
    escalation: EscalationDoc | None = None


class WatchdogDoc(Doc):
    alertname: Text = "Watchdog"
    period: Duration = 60.0
    grace: Duration = 300.0
    destinations: list[Text] = []


class DeliveryDoc(Doc):
    max_attempts: Whole = 12
    backoff_initial: Duration = 1.0
    backoff_max: Duration = 600.0
    timeout: Duration = 10.0
    max_alerts_per_message: Annotated[Whole, Field(le=48, description="at most 48: Slack allows 50 blocks")] = 20
    lease: Duration | None = Field(default=None, description="how long a claimed delivery stays claimed (3 x timeout + 30s)")


class TemplatesDoc(Doc):
    title: str | None = None
    slack_text: str | None = None
    slack_notification: str | None = None
    pagerduty_summary: str | None = None


# One model per registered notifier, told apart by ``type``: each accepts only its own keys.
# Union[...] spreads a tuple built at run time, which ``X | Y`` cannot (ruff's UP007 fix to a bare
# tuple made this module fail to import: Annotated needs a type). mypy cannot follow a union built
# from the registry; to it, a destination is any notifier's model.
if TYPE_CHECKING:
    DestinationDoc = BaseDestinationDoc
else:
    DestinationDoc = Annotated[
        Union[tuple(i.doc for i in integrations().values())],  # noqa: UP007 - see above
        Field(discriminator="type"),
    ]


class RelayDoc(Doc):
    destinations: dict[str, DestinationDoc] = {}
    routes: list[RouteDoc] = []
    watchdog: WatchdogDoc | None = None
    delivery: DeliveryDoc = DeliveryDoc()
    dedup_window: Duration = 300.0
    default_severity: Severity = "warning"
    cooldown: CooldownDoc | None = None
    escalating_cooldown: list[Duration] | None = None
    escalation: EscalationDoc | None = None
    templates: TemplatesDoc | None = None


def first_error(exc: pydantic.ValidationError) -> str:
    """The first error as one line: ``routes[1].cooldown.warning: expected a duration ...``."""
    error = exc.errors()[0]
    loc = error["loc"]
    if len(loc) > 2 and loc[0] == "destinations" and loc[2] in integrations():
        loc = (*loc[:2], *loc[3:])  # pydantic names the chosen type in the path; the file does not
    path = _path(loc)
    if error["type"] == "union_tag_invalid":
        return f"{path}.type: expected one of {', '.join(integrations())}, got {error['input'].get('type')!r}"
    if error["type"] == "union_tag_not_found":
        return f"{path}.type: required (one of {', '.join(integrations())})"
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


def _path(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
