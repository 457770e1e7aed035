"""PagerDuty Events API v2: ``trigger`` for a firing notice, ``resolve`` for a resolved one.

The dedup_key is derived from the alert key alone, so every repeat, retry, replica or
restart updates the same incident instead of opening another, and the resolution closes it.
Limits from PagerDuty's documentation: summary at most 1,024 characters, event at most 512 KB.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import httpx
from mlwarden.relay.fields import Text
from mlwarden.relay.notice import PIPELINE_DOWN, PIPELINE_UP, RESOLVED, Notice
from mlwarden.relay.notifiers.base import (
    Context,
    Destination,
    DestinationDoc,
    Integration,
    Notifier,
    checked_url,
    post_json,
    register,
    secret,
)
from mlwarden.relay.templates import DEFAULT_TEMPLATES, Templates, headline, truncate
from pydantic import Field

SUMMARY_LIMIT = 1024
EVENT_LIMIT_BYTES = 512 * 1024
_SEVERITY = {"emergency": "critical", "critical": "critical", "warning": "warning", "info": "info"}
WATCHDOG_KEY = "mlwarden-relay-watchdog"
EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"


class PagerDutyDoc(DestinationDoc):
    type: Literal["pagerduty"]
    routing_key_env: Text = Field(description="the variable holding the routing key")
    events_url: Text = Field(EVENTS_URL, description="the Events API v2 URL")


@dataclass(frozen=True, repr=False)
class PagerDutyDestination(Destination):
    url: str  # the Events API v2 URL
    routing_key: str  # a secret


class PagerDutyNotifier(Notifier):
    integration = "pagerduty"
    max_batch = 1

    def __init__(self, destination: PagerDutyDestination, client: httpx.AsyncClient, templates: Templates = DEFAULT_TEMPLATES) -> None:
        self._url = destination.url
        self._routing_key = destination.routing_key
        self._client = client
        self._templates = templates

    async def send(self, notices: Sequence[Notice]) -> None:
        for notice in notices:
            body = event(notice, self._routing_key, self._templates, time.time())
            await post_json(self._client, self._url, body, "PagerDuty")


def dedup_key(notice: Notice) -> str:
    if notice.kind in (PIPELINE_DOWN, PIPELINE_UP):
        return WATCHDOG_KEY
    return "mlwarden-" + hashlib.sha256(notice.key.encode()).hexdigest()[:40]


def event(notice: Notice, routing_key: str, templates: Templates = DEFAULT_TEMPLATES, now: float | None = None) -> dict[str, object]:
    base: dict[str, object] = {"routing_key": routing_key, "dedup_key": dedup_key(notice)}
    if notice.kind in (RESOLVED, PIPELINE_UP):
        return {**base, "event_action": "resolve"}
    details: dict[str, object] = {
        "escalation_level": notice.level,
        "occurrences": notice.occurrences,
        "labels": dict(notice.labels),
        "annotations": dict(notice.annotations),
    }
    if notice.members:  # the key's several alerts, by what tells them apart
        details["alerts"] = notice.alerts
        details["members"] = [dict(m) for m in notice.members]
    if notice.omitted:
        details["omitted_alerts"] = notice.omitted  # of the same notification, over the relay's body limit
    payload: dict[str, object] = {
        "summary": truncate(headline(notice) if notice.kind == PIPELINE_DOWN
                            else templates.pagerduty_summary(notice, time.time() if now is None else now), SUMMARY_LIMIT),
        "source": notice.instance or "mlwarden-relay",
        "severity": _SEVERITY.get(notice.severity, "error"),
        "class": notice.alertname,
        "custom_details": details,
    }
    if notice.gpu:
        payload["component"] = f"gpu {notice.gpu}"
    body: dict[str, object] = {**base, "event_action": "trigger", "payload": payload, "client": "mlwarden relay"}
    links = [{"href": url, "text": text} for url, text in ((notice.annotations.get("runbook_url", ""), "runbook"),
                                                           (notice.generator_url, "source"))
             if url.startswith(("http://", "https://"))]
    if links:
        body["links"] = links
    if len(json.dumps(body).encode()) > EVENT_LIMIT_BYTES:
        # Labels and annotations are what can grow without bound; the summary already says what fired.
        details["annotations"] = {k: truncate(v, 1024) for k, v in notice.annotations.items()}
        details["labels"] = {k: truncate(v, 256) for k, v in list(notice.labels.items())[:100]}
        if len(json.dumps(body).encode()) > EVENT_LIMIT_BYTES:
            details.pop("annotations")
    return body


def _destination(name: str, doc: PagerDutyDoc, rate: float, environ: Mapping[str, str]) -> PagerDutyDestination:
    where = f"destinations.{name}"
    url = checked_url(doc.events_url, f"{where}.events_url")
    return PagerDutyDestination(name, doc.type, rate, url, secret(doc.routing_key_env, f"{where}.routing_key_env", environ))


def _notifier(destination: PagerDutyDestination, context: Context) -> PagerDutyNotifier:
    return PagerDutyNotifier(destination, context.client, context.templates)


# PagerDuty documents about 120 events per minute per routing key.
register(Integration(name="pagerduty", doc=PagerDutyDoc, default_rate=2.0, destination=_destination, notifier=_notifier))
