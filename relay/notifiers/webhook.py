"""A generic JSON webhook: one POST per notice, for Teams or Mattermost bridges, incident tools,
or anything that reads JSON.

The body is the notice's own fields (``version`` 1: key, status, severity, labels, annotations,
the rendered headline as ``text``, the Alertmanager group) so a receiver needs no knowledge of
Slack or PagerDuty. The URL may carry a token, so it is read from a secret variable, as is the
optional bearer token.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import httpx
from mlwarden.relay.fields import Text
from mlwarden.relay.notice import Notice
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
from mlwarden.relay.templates import DEFAULT_TEMPLATES, Templates, headline
from pydantic import Field

VERSION = "1"  # of the body's shape; a receiver can refuse one it does not know


class WebhookDoc(DestinationDoc):
    type: Literal["webhook"]
    url_env: Text = Field(description="the variable holding the URL to POST to")
    token_env: Text | None = Field(None, description="the variable holding a bearer token (optional)")


@dataclass(frozen=True, repr=False)
class WebhookDestination(Destination):
    url: str  # a secret: it may carry a token
    token: str  # a secret; empty: no Authorization header


class WebhookNotifier(Notifier):
    integration = "webhook"
    max_batch = 1

    def __init__(self, destination: WebhookDestination, client: httpx.AsyncClient,
                 templates: Templates = DEFAULT_TEMPLATES) -> None:
        self._url = destination.url
        self._headers = {"Authorization": f"Bearer {destination.token}"} if destination.token else {}
        self._client = client
        self._templates = templates

    async def send(self, notices: Sequence[Notice]) -> None:
        for notice in notices:
            await post_json(self._client, self._url, document(notice, self._templates, time.time()), "Webhook",
                            headers=self._headers)


def document(notice: Notice, templates: Templates = DEFAULT_TEMPLATES, now: float | None = None) -> dict[str, object]:
    """What is POSTed for ``notice``."""
    return {
        "version": VERSION,
        "key": notice.key,
        "status": notice.kind,
        "alertname": notice.alertname,
        "severity": notice.severity,
        "escalation_level": notice.level,
        "labels": dict(notice.labels),
        "annotations": dict(notice.annotations),
        "text": headline(notice, templates, now),
        "group": notice.group,
        "starts_at": notice.starts_at,
        "ends_at": notice.ends_at,
        "generator_url": notice.generator_url,
        "occurrences": notice.occurrences,
        "alerts": notice.alerts,
        "members": [dict(m) for m in notice.members],
        "omitted_alerts": notice.omitted,
    }


def _destination(name: str, doc: WebhookDoc, rate: float, environ: Mapping[str, str]) -> WebhookDestination:
    where = f"destinations.{name}"
    url = checked_url(secret(doc.url_env, f"{where}.url_env", environ), f"{where}.url_env: the URL in that variable")
    token = secret(doc.token_env, f"{where}.token_env", environ) if doc.token_env is not None else ""
    return WebhookDestination(name, doc.type, rate, url, token)


def _notifier(destination: WebhookDestination, context: Context) -> WebhookNotifier:
    return WebhookNotifier(destination, context.client, context.templates)


# A receiver's limits are unknown; one a second is what the most modest of them (Slack) allows.
register(Integration(name="webhook", doc=WebhookDoc, default_rate=1.0, destination=_destination, notifier=_notifier))
