"""PagerDuty Events API v2: ``trigger`` for a firing notice, ``resolve`` for a resolved one.

The dedup_key is derived from the alert key alone, so every repeat, retry, replica or
restart updates the same incident instead of opening another, and the resolution closes it.
Limits from PagerDuty's documentation: summary at most 1,024 characters, event at most 512 KB.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import httpx

from mlwarden.relay.config import Destination
from mlwarden.relay.notice import PIPELINE_DOWN, PIPELINE_UP, RESOLVED, Notice
from mlwarden.relay.notifiers.base import Notifier, post_json, truncate
from mlwarden.relay.notifiers.slack import headline

SUMMARY_LIMIT = 1024
EVENT_LIMIT_BYTES = 512 * 1024
_SEVERITY = {"emergency": "critical", "critical": "critical", "warning": "warning", "info": "info"}
WATCHDOG_KEY = "mlwarden-relay-watchdog"


class PagerDutyNotifier(Notifier):
    integration = "pagerduty"
    max_batch = 1

    def __init__(self, destination: Destination, client: httpx.AsyncClient) -> None:
        self._url = destination.url
        self._routing_key = destination.routing_key
        self._client = client

    async def send(self, notices: Sequence[Notice]) -> None:
        for notice in notices:
            await post_json(self._client, self._url, event(notice, self._routing_key), "PagerDuty")


def dedup_key(notice: Notice) -> str:
    if notice.kind in (PIPELINE_DOWN, PIPELINE_UP):
        return WATCHDOG_KEY
    return "mlwarden-" + hashlib.sha256(notice.key.encode()).hexdigest()[:40]


def event(notice: Notice, routing_key: str) -> dict[str, object]:
    base: dict[str, object] = {"routing_key": routing_key, "dedup_key": dedup_key(notice)}
    if notice.kind in (RESOLVED, PIPELINE_UP):
        return {**base, "event_action": "resolve"}
    details: dict[str, object] = {
        "escalation_level": notice.level,
        "occurrences": notice.occurrences,
        "labels": dict(notice.labels),
        "annotations": dict(notice.annotations),
    }
    if notice.omitted:
        details["omitted_alerts"] = notice.omitted  # of the same notification, over the relay's body limit
    payload: dict[str, object] = {
        "summary": truncate(f"{headline(notice)}: {notice.summary}" if notice.kind != PIPELINE_DOWN else headline(notice), SUMMARY_LIMIT),
        "source": notice.instance or "mlwarden-relay",
        "severity": _SEVERITY.get(notice.severity, "error"),
        "class": notice.alertname,
        "custom_details": details,
    }
    if notice.gpu:
        payload["component"] = f"gpu {notice.gpu}"
    body: dict[str, object] = {**base, "event_action": "trigger", "payload": payload, "client": "mlwarden relay"}
    if notice.generator_url.startswith(("http://", "https://")):
        body["links"] = [{"href": notice.generator_url, "text": "source"}]
    if len(json.dumps(body).encode()) > EVENT_LIMIT_BYTES:
        # Labels and annotations are what can grow without bound; the summary already says what fired.
        details["annotations"] = {k: truncate(v, 1024) for k, v in notice.annotations.items()}
        details["labels"] = {k: truncate(v, 256) for k, v in list(notice.labels.items())[:100]}
        if len(json.dumps(body).encode()) > EVENT_LIMIT_BYTES:
            details.pop("annotations")
    return body
