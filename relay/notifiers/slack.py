"""Slack incoming webhooks, Block Kit: one message for one or many (coalesced) notices.

Limits from Slack's documentation: section text at most 3,000 characters, at most 50 blocks
per message, header text at most 150 characters. The webhook URL is the secret.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import httpx

from mlwarden.relay.config import Destination
from mlwarden.relay.notice import FIRING, PIPELINE_DOWN, PIPELINE_UP, RESOLVED, Notice
from mlwarden.relay.notifiers.base import Notifier, post_json, truncate

SECTION_TEXT_LIMIT = 3000
HEADER_TEXT_LIMIT = 150
MAX_BLOCKS = 50
DIGEST_BATCH = 5000  # notices one digest may fold; the claim for it takes about 10 ms on SQLite
DIGEST_NAMES_SHOWN = 5  # alert names and machines listed per group
_ICON = {FIRING: ":rotating_light:", RESOLVED: ":white_check_mark:", PIPELINE_DOWN: ":warning:", PIPELINE_UP: ":white_check_mark:"}


class SlackNotifier(Notifier):
    integration = "slack"

    def __init__(self, destination: Destination, client: httpx.AsyncClient, max_alerts_per_message: int) -> None:
        self._url = destination.url
        self._client = client
        self.max_batch = min(max_alerts_per_message, MAX_BLOCKS - 2)  # room for header and footer
        self.digest_batch = DIGEST_BATCH

    async def send(self, notices: Sequence[Notice]) -> None:
        body = message(notices) if len(notices) <= self.max_batch else digest(notices)
        await post_json(self._client, self._url, body, "Slack")


def message(notices: Sequence[Notice]) -> dict[str, object]:
    """The Block Kit message for ``notices``: a header, one section per notice, a footer."""
    title = headline(notices[0]) if len(notices) == 1 else _batch_title(notices)
    blocks: list[dict[str, object]] = [
        {"type": "header", "text": {"type": "plain_text", "text": truncate(title, HEADER_TEXT_LIMIT)}}
    ]
    blocks += [
        {"type": "section", "text": {"type": "mrkdwn", "text": truncate(section_text(n), SECTION_TEXT_LIMIT)}}
        for n in notices[: MAX_BLOCKS - 2]
    ]
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": "sent by mlwarden relay"}]})
    return {"text": truncate(title, SECTION_TEXT_LIMIT), "blocks": blocks}


def digest(notices: Sequence[Notice]) -> dict[str, object]:
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
    sections = [section_text(n) for n in urgent[: room - 1]]
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
        lines.append(f"*Group:* `{_escape(truncate(group, 300))}`")
    return "\n".join(lines)


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(_escape(item) for item in items[:DIGEST_NAMES_SHOWN])
    return shown + (f" (+{len(items) - DIGEST_NAMES_SHOWN:,} more)" if len(items) > DIGEST_NAMES_SHOWN else "")


def headline(notice: Notice) -> str:
    where = " ".join(p for p in (notice.instance, f"GPU {notice.gpu}" if notice.gpu else "") if p)
    if notice.kind == PIPELINE_DOWN:
        return "Alerting pipeline DOWN: no Watchdog heartbeat"
    if notice.kind == PIPELINE_UP:
        return "Alerting pipeline recovered: Watchdog heartbeat is back"
    state = "RESOLVED" if notice.kind == RESOLVED else notice.severity.upper()
    return f"[{state}] {notice.alertname}" + (f" on {where}" if where else "")


def section_text(notice: Notice) -> str:
    lines = [f"{_ICON.get(notice.kind, '')} *{_escape(headline(notice))}*"]
    if notice.kind in (FIRING, RESOLVED):
        facts = [f"*Severity:* {_escape(notice.severity)}", f"*Escalation level:* {notice.level}"]
        if notice.instance:
            facts.append(f"*Machine:* {_escape(notice.instance)}")
        if notice.gpu:
            facts.append(f"*GPU:* {_escape(notice.gpu)}")
        if notice.occurrences > 1:
            facts.append(f"*Seen:* {notice.occurrences}x")
        if notice.starts_at and not notice.starts_at.startswith("0001"):
            facts.append(f"*Since:* {_escape(notice.starts_at)}")
        if notice.reason:  # Alertmanager's notification_reason (newer versions)
            facts.append(f"*Reason:* {_escape(notice.reason)}")
        lines.append("  ".join(facts))
        # Each part is cut on its own so a huge summary cannot push the description out.
        lines.append(_escape(truncate(notice.summary, 1200)))
        if notice.annotations.get("description") and notice.annotations.get("summary"):
            lines.append(_escape(truncate(notice.annotations["description"], 1200)))
        if notice.generator_url.startswith(("http://", "https://")):
            lines.append(f"<{_escape(notice.generator_url)}|source>")
        if notice.omitted:
            lines.append(f"_{notice.omitted:,} more alert(s) of this group did not fit the relay's body limit_")
    return "\n".join(lines)


def _batch_title(notices: Sequence[Notice]) -> str:
    firing = sum(1 for n in notices if n.kind == FIRING)
    resolved = sum(1 for n in notices if n.kind == RESOLVED)
    parts = [f"{firing} firing" if firing else "", f"{resolved} resolved" if resolved else ""]
    return f"{len(notices)} alerts: " + ", ".join(p for p in parts if p) if any(parts) else f"{len(notices)} notices"


def _escape(text: str) -> str:
    # Slack's mrkdwn treats these three as control characters.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
