"""A generic JSON webhook: one POST per notice, its fields as a JSON document.

For what has no integration of its own (Microsoft Teams or Mattermost through a workflow, an
incident tool, a script). The URL is a secret (it often carries a token), and so is the
optional bearer token sent as ``Authorization: Bearer ...``. The document::

    {"version": 1, "headline": "...", "kind": "firing", "key": "...", "alertname": "...",
     "severity": "critical", "level": 1, "labels": {...}, "annotations": {...}, "starts_at": "...",
     "ends_at": "", "generator_url": "...", "occurrences": 3, "reason": "", "group": "...",
     "alerts": 1, "members": [], "omitted": 0}

``kind`` is ``firing``, ``resolved``, ``pipeline_down`` or ``pipeline_up``; ``headline`` is the
title template's text (relay.templates). A 5xx, 408, 429 or a timeout is retried like the
other integrations; another 4xx is not.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import httpx
from pydantic import Field

from mlwarden.relay.notice import Notice
from mlwarden.relay.notifiers.base import (
    Destination,
    DestinationDoc,
    Integration,
    Notifier,
    NotifierOptions,
    destination_secret,
    post_json,
    register,
    secret_url,
)
from mlwarden.relay.schema import Text
from mlwarden.relay.templates import Templates, headline

VERSION = 1


class WebhookDoc(DestinationDoc):
    type: Literal["webhook"]
    url_env: Text = Field(description="the variable holding the URL to POST to")
    bearer_token_env: Text | None = Field(None, description="the variable holding a bearer token, sent as `Authorization: Bearer`")


@dataclass(frozen=True)
class WebhookSettings:
    url: str = field(repr=False)  # secrets, both
    bearer_token: str | None = field(default=None, repr=False)


def document(notice: Notice, templates: Templates, now: float) -> dict[str, object]:
    return {"version": VERSION, "headline": headline(notice, templates, now), **notice.to_dict()}


class WebhookNotifier(Notifier):
    integration = "webhook"
    max_batch = 1

    def __init__(self, settings: WebhookSettings, client: httpx.AsyncClient, templates: Templates) -> None:
        self._settings = settings
        self._client = client
        self._templates = templates
        self._headers = {"Authorization": f"Bearer {settings.bearer_token}"} if settings.bearer_token else None

    async def send(self, notices: Sequence[Notice]) -> None:
        for notice in notices:
            body = document(notice, self._templates, time.time())
            await post_json(self._client, self._settings.url, body, "webhook", self._headers)


def _settings(doc: WebhookDoc, environ: Mapping[str, str]) -> WebhookSettings:
    url = secret_url("url_env", doc.url_env, environ)
    token = destination_secret("bearer_token_env", doc.bearer_token_env, environ) if doc.bearer_token_env else None
    return WebhookSettings(url, token)


def _notifier(destination: Destination, client: httpx.AsyncClient, options: NotifierOptions) -> Notifier:
    return WebhookNotifier(destination.settings, client, options.templates)


register(Integration("webhook", WebhookDoc, 1.0, _settings, _notifier))
