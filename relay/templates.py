"""Message text from Jinja2 templates, rendered in a sandbox; users override them in relay.yml.

Templates see one notice at a time (``title``, ``slack_text``, ``pagerduty_summary``) or the
notices of one Slack message (``slack_notification``: the text phones and desktop
notifications show). Values come prepared: for Slack, every label and annotation is already
escaped for mrkdwn (``&``, ``<``, ``>``), so a label cannot turn into a link; times are human
(``firing for 3h 12m``, ``2026-11-28 10:00 UTC``). Bidirectional control characters are
stripped from what is rendered: a right-to-left override in a label could make a message
read differently from what it says. The sandbox keeps a template from reaching Python's
internals; a template that fails at render time falls back to the default, logged, so a
notice is never lost to a template.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment
from mlwarden.relay.notice import FIRING, PIPELINE_DOWN, PIPELINE_UP, RESOLVED, Notice

log = logging.getLogger(__name__)

# Labels the default messages show on their own (title, machine, GPU); the others are listed,
# since they are what tells alerts apart.
SHOWN_ON_THEIR_OWN = ("alertname", "severity", "instance", "gpu")
TEXT_PART_LIMIT = 1200  # characters of a summary or a description (a Slack section holds 3,000)
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_FRACTION = re.compile(r"(\.\d{6})\d+")  # Alertmanager writes nanoseconds; Python reads microseconds
_BLANK_LINES = re.compile(r"\n\s*\n+")

DEFAULTS: Mapping[str, str] = {
    "title": (
        "[{{ state }}] {{ alertname }}{% if where %} on {{ where }}{% endif %}"
        "{% if alerts > 1 %} ({{ alerts }} alerts){% endif %}"
    ),
    "slack_text": (  # the line breaks are the "\n"s; each line is cut only between two tags
        "{{ icon }} *{{ title }}*\n"
        "*Severity:* {{ severity }}  *Escalation level:* {{ level }}{% if machine %}  *Machine:* {{ machine }}{% endif %}"
        "{% if gpu %}  *GPU:* {{ gpu }}{% endif %}{% if occurrences > 1 %}  *Seen:* {{ occurrences }}x{% endif %}"
        "{% if reason %}  *Reason:* {{ reason }}{% endif %}\n"
        "{% if firing_for %}{% if resolved %}*Resolved* after {{ firing_for }}{% else %}*Firing for* {{ firing_for }}"
        "{% endif %} (since {{ since }}){% endif %}\n"
        "{{ summary }}\n"
        "{% if description %}{{ description }}{% endif %}\n"
        "{% if labels %}*Labels:* {% for name, value in labels %}`{{ name }}={{ value }}`{% if not loop.last %} {% endif %}"
        "{% endfor %}{% endif %}\n"
        "{% if members %}*{{ alerts }} alerts differ by:* {% for member in members %}{% for name, value in member %}"
        "`{{ name }}={{ value }}`{% if not loop.last %} {% endif %}{% endfor %}{% if not loop.last %}; {% endif %}"
        "{% endfor %}{% if alerts > members|length %} (+{{ alerts - members|length }} more){% endif %}{% endif %}\n"
        "{% if runbook_url %}<{{ runbook_url }}|Runbook>{% endif %}{% if runbook_url and generator_url %} | {% endif %}"
        "{% if generator_url %}<{{ generator_url }}|Source>{% endif %}\n"
        "{% if omitted %}_{{ omitted }} more alert(s) of this group did not fit the relay's body limit_{% endif %}"
    ),
    "slack_notification": (
        "{% if notices|length == 1 %}{{ notices[0].title }}: {{ notices[0].summary }}"
        "{% else %}{{ firing }} firing{% if resolved %}, {{ resolved }} resolved{% endif %}: "
        "{% for n in notices[:3] %}{{ n.title }}{% if not loop.last %}; {% endif %}{% endfor %}"
        "{% if notices|length > 3 %} (+{{ notices|length - 3 }} more){% endif %}{% endif %}"
    ),
    "pagerduty_summary": "{{ title }}: {{ summary }}{% if firing_for %} (firing for {{ firing_for }}){% endif %}",
}
_ICON = {FIRING: ":rotating_light:", RESOLVED: ":white_check_mark:"}


class TemplateError(ValueError):
    """A template cannot be used; the message names it."""


def duration(seconds: float) -> str:
    """``3h 12m``, ``2d 4h``, ``45s``: the two largest units."""
    seconds = max(0, int(seconds))
    parts = [(seconds // 86400, "d"), (seconds % 86400 // 3600, "h"), (seconds % 3600 // 60, "m"), (seconds % 60, "s")]
    shown = [f"{value}{unit}" for value, unit in parts if value]
    return " ".join(shown[:2]) or "0s"


def parse_time(text: str) -> float | None:
    """An Alertmanager RFC 3339 time (nanoseconds, any offset) as a Unix time; None for none."""
    if not text or text.startswith("0001-"):
        return None
    try:
        return datetime.fromisoformat(_FRACTION.sub(r"\1", text.replace("Z", "+00:00"))).timestamp()
    except ValueError:
        return None


def utc(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M UTC")


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def strip_bidi(text: str) -> str:
    return _BIDI.sub("", text)


def mrkdwn(text: str) -> str:
    # Slack's mrkdwn treats these three as control characters.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _plain(text: str) -> str:
    return text


class Templates:
    """The templates, compiled: relay.yml's ``templates:`` over the defaults."""

    def __init__(self, sources: Mapping[str, str] | None = None) -> None:
        env = SandboxedEnvironment(lstrip_blocks=True, undefined=jinja2.ChainableUndefined)
        self.sources = {**DEFAULTS, **(sources or {})}
        self._compiled: dict[str, jinja2.Template] = {}
        for name, source in self.sources.items():
            if name not in DEFAULTS:
                raise TemplateError(f"templates: unknown template {name!r} (expected one of {', '.join(DEFAULTS)})")
            try:
                self._compiled[name] = env.from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                raise TemplateError(f"templates.{name}: line {exc.lineno}: {exc.message}") from None
        self._defaults = {name: env.from_string(source) for name, source in DEFAULTS.items()}
        sample = Notice(kind=FIRING, key="k", alertname="Sample", severity="warning", labels={"instance": "n1"},
                        starts_at="2026-01-01T00:00:00Z")
        try:  # what only shows when rendering (a sandbox refusal, a type error) shows now, not at 3 am
            self.slack_text(sample, 0.0, strict=True)
            self.slack_notification([sample], 0.0, strict=True)
            self.pagerduty_summary(sample, 0.0, strict=True)
        except Exception as exc:  # noqa: BLE001 - any failure of a user's template is a config error
            raise TemplateError(f"templates: rendering a sample notice failed: {type(exc).__name__}: {exc}") from None

    def _render(self, name: str, context: Mapping[str, Any], strict: bool = False) -> str:
        try:
            text = self._compiled[name].render(context)
        except Exception:
            if strict:
                raise
            log.exception("template %s failed; using the default for this message", name)
            text = self._defaults[name].render(context)
        return _BLANK_LINES.sub("\n", strip_bidi(text)).strip()

    def context(self, notice: Notice, now: float, escape: Any, strict: bool = False) -> dict[str, Any]:
        """What a template sees of ``notice``, every text escaped by ``escape``."""
        started = parse_time(notice.starts_at)
        ended = parse_time(notice.ends_at) if notice.kind == RESOLVED else None
        labels = [(escape(k), escape(v)) for k, v in sorted(notice.labels.items()) if k not in SHOWN_ON_THEIR_OWN]
        where = " ".join(p for p in (notice.instance, f"GPU {notice.gpu}" if notice.gpu else "") if p)
        context: dict[str, Any] = {
            "state": "RESOLVED" if notice.kind == RESOLVED else notice.severity.upper(),
            "resolved": notice.kind == RESOLVED,
            "icon": _ICON.get(notice.kind, ""),
            "alertname": escape(notice.alertname),
            "severity": escape(notice.severity),
            "level": notice.level,
            "occurrences": notice.occurrences,
            "reason": escape(notice.reason),
            "where": escape(where),
            "machine": escape(notice.instance),
            "gpu": escape(notice.gpu),
            # Each cut on its own, so a huge summary cannot push the description out of a message.
            "summary": escape(truncate(notice.summary, TEXT_PART_LIMIT)),
            "description": escape(truncate(notice.annotations.get("description", ""), TEXT_PART_LIMIT))
            if notice.annotations.get("summary") else "",
            "labels": labels,
            "all_labels": {escape(k): escape(v) for k, v in notice.labels.items()},
            "annotations": {escape(k): escape(v) for k, v in notice.annotations.items()},
            "members": [[(escape(k), escape(v)) for k, v in sorted(m.items())] for m in notice.members],
            "alerts": notice.alerts,
            "omitted": notice.omitted,
            "runbook_url": escape(_link(notice.annotations.get("runbook_url", ""))),
            "generator_url": escape(_link(notice.generator_url)),
            "since": utc(started) if started is not None else "",
            "firing_for": duration((ended or now) - started) if started is not None else "",
            "group": escape(notice.group),
        }
        context["title"] = self._render("title", context, strict)
        return context

    def title(self, notice: Notice, now: float) -> str:
        """Plain text (Slack's header block and PagerDuty show it as it is)."""
        return str(self.context(notice, now, _plain)["title"])

    def slack_text(self, notice: Notice, now: float, strict: bool = False) -> str:
        return self._render("slack_text", self.context(notice, now, mrkdwn, strict), strict)

    def slack_notification(self, notices: Sequence[Notice], now: float, strict: bool = False) -> str:
        contexts = [self.context(n, now, mrkdwn, strict) for n in notices]
        firing = sum(1 for n in notices if n.kind == FIRING)
        return self._render("slack_notification", {"notices": contexts, "firing": firing,
                                                   "resolved": len(notices) - firing}, strict)

    def pagerduty_summary(self, notice: Notice, now: float, strict: bool = False) -> str:
        return self._render("pagerduty_summary", self.context(notice, now, _plain, strict), strict)


def _link(url: str) -> str:
    return url if url.startswith(("http://", "https://")) else ""


DEFAULT_TEMPLATES = Templates()


def headline(notice: Notice, templates: Templates | None = None, now: float | None = None) -> str:
    """Plain text every integration leads with: the title template for an alert, a fixed line
    for the pipeline's own notices (they have no labels for a template to show)."""
    if notice.kind == PIPELINE_DOWN:
        return "Alerting pipeline DOWN: no Watchdog heartbeat"
    if notice.kind == PIPELINE_UP:
        return "Alerting pipeline recovered: Watchdog heartbeat is back"
    return (templates or DEFAULT_TEMPLATES).title(notice, time.time() if now is None else now)
