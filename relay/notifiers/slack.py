"""Slack incoming webhooks, Block Kit: one message for one or many (coalesced) notices.

The text comes from the templates (see relay.templates). Limits from Slack's documentation:
section text at most 3,000 characters, at most 50 blocks per message, header text at most
150 characters. The webhook URL is the secret.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import httpx
from mlwarden.relay.fields import Text
from mlwarden.relay.notice import FIRING, PIPELINE_DOWN, PIPELINE_UP, RESOLVED, Notice
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
from mlwarden.relay.templates import DEFAULT_TEMPLATES, Templates, headline, mrkdwn, truncate
from pydantic import Field

SECTION_TEXT_LIMIT = 3000
HEADER_TEXT_LIMIT = 150
MAX_BLOCKS = 50
DIGEST_BATCH = 5000  # notices one digest may fold; the claim for it takes about 10 ms on SQLite
DIGEST_NAMES_SHOWN = 5  # alert names and machines listed per group
_ICON = {PIPELINE_DOWN: ":warning:", PIPELINE_UP: ":white_check_mark:"}


class SlackDoc(DestinationDoc):
    type: Literal["slack"]
    webhook_url_env: Text = Field(description="the variable holding the webhook URL")


@dataclass(frozen=True, repr=False)
class SlackDestination(Destination):
    url: str  # the webhook URL: a secret


class SlackNotifier(Notifier):
    integration = "slack"

    def __init__(
        self, destination: SlackDestination, client: httpx.AsyncClient, max_alerts_per_message: int,
        templates: Templates = DEFAULT_TEMPLATES,
    ) -> None:
        self._url = destination.url
        self._client = client
        self._templates = templates
        self.max_batch = min(max_alerts_per_message, MAX_BLOCKS - 2)  # room for header and footer
        self.digest_batch = DIGEST_BATCH

    async def send(self, notices: Sequence[Notice]) -> None:
        now = time.time()
        if len(notices) <= self.max_batch:
            body = message(notices, self._templates, now)
        else:
            # A digest folds up to thousands of notices (about 20 ms of work for 5,000): in a
            # thread, so the event loop goes on acknowledging webhooks meanwhile.
            body = await asyncio.to_thread(digest, notices, self._templates, now)
        await post_json(self._client, self._url, body, "Slack")


def message(notices: Sequence[Notice], templates: Templates = DEFAULT_TEMPLATES, now: float | None = None) -> dict[str, object]:
    """The Block Kit message for ``notices``: a header, one section per notice, a footer; its
    ``text`` is what a phone's notification shows."""
    now = time.time() if now is None else now
    alerts = [n for n in notices if n.kind in (FIRING, RESOLVED)]
    title = headline(notices[0], templates, now) if len(notices) == 1 else _batch_title(notices)
    text = templates.slack_notification(alerts, now) if len(alerts) == len(notices) else mrkdwn(title)
    blocks: list[dict[str, object]] = [
        {"type": "header", "text": {"type": "plain_text", "text": truncate(title, HEADER_TEXT_LIMIT)}}
    ]
    blocks += [
        {"type": "section", "text": {"type": "mrkdwn", "text": truncate(section_text(n, templates, now), SECTION_TEXT_LIMIT)}}
        for n in notices[: MAX_BLOCKS - 2]
    ]
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": "sent by mlwarden relay"}]})
    return {"text": truncate(text, SECTION_TEXT_LIMIT), "blocks": blocks}


def digest(notices: Sequence[Notice], templates: Templates = DEFAULT_TEMPLATES, now: float | None = None) -> dict[str, object]:
    """One message for a flood: anything urgent that joined it in full, then one section per
    Alertmanager group saying how many notices of which alerts on which machines it holds."""
    urgent = [n for n in notices if n.severity in ("critical", "emergency")]
    groups: dict[str, list[Notice]] = {}
    for notice in notices:
        if notice.severity not in ("critical", "emergency"):
            groups.setdefault(notice.group, []).append(notice)
    folded = len(notices) - len(urgent)
    title = f"Digest: {folded:,} notices in {len(groups):,} group(s)" + (f", {len(urgent)} urgent" if urgent else "")
    room = MAX_BLOCKS - 2
    now = time.time() if now is None else now
    sections = [section_text(n, templates, now) for n in urgent[: room - 1]]
    listed = list(groups.items())[: max(0, room - len(sections) - 1)]
    sections += [_group_text(group, members) for group, members in listed]
    left = list(groups.values())[len(listed):]
    if left:
        sections.append(f"… and {len(left):,} more group(s) with {sum(map(len, left)):,} notices")
    blocks: list[dict[str, object]] = [
        {"type": "header", "text": {"type": "plain_text", "text": truncate(title, HEADER_TEXT_LIMIT)}}
    ]
    blocks += [{"type": "section", "text": {"type": "mrkdwn", "text": truncate(t, SECTION_TEXT_LIMIT)}} for t in sections]
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": "digest sent by mlwarden relay"}]})
    return {"text": truncate(title, SECTION_TEXT_LIMIT), "blocks": blocks}


def _group_text(group: str, members: Sequence[Notice]) -> str:
    kinds = Counter(n.kind for n in members)
    severities = Counter(n.severity for n in members)
    names = Counter(n.alertname for n in members)
    machines = list(dict.fromkeys(n.instance for n in members if n.instance))
    state = ", ".join(f"{count:,} {kind}" for kind, count in kinds.most_common())
    lines = [
        f":bell: *{len(members):,} notices* ({state}; "
        + ", ".join(f"{count:,} {severity}" for severity, count in severities.most_common()) + ")",
        "*Alerts:* " + _listing([f"{name} ×{count:,}" for name, count in names.most_common()]),
    ]
    if machines:
        lines.append("*Machines:* " + _listing(machines))
    if group:
        lines.append(f"*Group:* `{mrkdwn(truncate(group, 300))}`")
    return "\n".join(lines)


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(mrkdwn(item) for item in items[:DIGEST_NAMES_SHOWN])
    return shown + (f" (+{len(items) - DIGEST_NAMES_SHOWN:,} more)" if len(items) > DIGEST_NAMES_SHOWN else "")


def section_text(notice: Notice, templates: Templates = DEFAULT_TEMPLATES, now: float | None = None) -> str:
    if notice.kind in (FIRING, RESOLVED):
        return templates.slack_text(notice, time.time() if now is None else now)
    return f"{_ICON.get(notice.kind, '')} *{mrkdwn(headline(notice))}*"


def _batch_title(notices: Sequence[Notice]) -> str:
    firing = sum(1 for n in notices if n.kind == FIRING)
    resolved = sum(1 for n in notices if n.kind == RESOLVED)
    parts = [f"{firing} firing" if firing else "", f"{resolved} resolved" if resolved else ""]
    return ", ".join(p for p in parts if p) if any(parts) else f"{len(notices)} notices"


def _destination(name: str, doc: SlackDoc, rate: float, environ: Mapping[str, str]) -> SlackDestination:
    where = f"destinations.{name}.webhook_url_env"
    url = checked_url(secret(doc.webhook_url_env, where, environ), f"{where}: the webhook URL in that variable")
    return SlackDestination(name, doc.type, rate, url)


def _notifier(destination: SlackDestination, context: Context) -> SlackNotifier:
    return SlackNotifier(destination, context.client, context.max_alerts_per_message, context.templates)


# Slack documents about one message per second per incoming webhook.
register(Integration(name="slack", doc=SlackDoc, default_rate=1.0, destination=_destination, notifier=_notifier))
