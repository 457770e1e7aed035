"""Alertmanager webhook payloads (version "4"), parsed leniently.

Unknown fields are ignored so a newer Alertmanager keeps working; newer optional fields
(``notification_reason``) are used when present. What the relay needs and cannot do
without (a list of alerts, each with string labels and a status) is checked, and anything
else wrong raises :class:`PayloadError` with a message the sender can act on.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class PayloadError(ValueError):
    """The body is not a usable Alertmanager webhook payload; the message says why."""


@dataclass(frozen=True, slots=True)
class Alert:
    status: str  # "firing" | "resolved"
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    fingerprint: str
    starts_at: str = ""
    ends_at: str = ""
    generator_url: str = ""


@dataclass(frozen=True)
class Notification:
    receiver: str
    status: str
    group_key: str
    alerts: tuple[Alert, ...]
    external_url: str = ""
    notification_reason: str = ""
    truncated_alerts: int = 0
    omitted_alerts: int = 0  # left out by the relay to fit its body limit (see oversize)


# Where a lone UTF-16 surrogate can come from in a body json.loads reads as UTF-8 (with
# surrogatepass): a \uD800-\uDFFF escape, or the same code point encoded in UTF-8 (ED A0-BF).
# A NUL byte may make json.loads read the body as UTF-16 or UTF-32 instead.
_MAY_HOLD_SURROGATES = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]|\x00")


def parse(body: bytes) -> Notification:
    # Most bodies hold no lone surrogate: then no string needs clean(), which otherwise runs for
    # every label and annotation (half of the parse).
    text = clean if _MAY_HOLD_SURROGATES.search(body) else _as_is
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise PayloadError(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PayloadError("body must be a JSON object (an Alertmanager webhook payload)")
    version = doc.get("version", "4")
    if str(version) != "4":
        raise PayloadError(f"unsupported webhook payload version {str(version)[:20]!r} (expected \"4\")")
    alerts = doc.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError("field 'alerts' is missing or not a list")
    return Notification(
        receiver=_text(doc, "receiver", text),
        status=_text(doc, "status", text),
        group_key=_text(doc, "groupKey", text),
        alerts=tuple(_alert(item, i, text) for i, item in enumerate(alerts)),
        external_url=_text(doc, "externalURL", text),
        notification_reason=_text(doc, "notification_reason", text),
        truncated_alerts=doc.get("truncatedAlerts") if isinstance(doc.get("truncatedAlerts"), int) else 0,
    )


def _alert(item: Any, index: int, text: Callable[[str], str]) -> Alert:
    where = f"alerts[{index}]"
    if not isinstance(item, dict):
        raise PayloadError(f"{where} must be an object")
    status = item.get("status")
    if status not in ("firing", "resolved"):
        raise PayloadError(f"{where}.status must be \"firing\" or \"resolved\"")
    labels = _string_map(item.get("labels"), where, "labels", text, required=True)
    fingerprint = _text(item, "fingerprint", text) or label_fingerprint(labels)
    return Alert(
        status=status,
        labels=labels,
        annotations=_string_map(item.get("annotations"), where, "annotations", text, required=False),
        fingerprint=fingerprint,
        starts_at=_text(item, "startsAt", text),
        ends_at=_text(item, "endsAt", text),
        generator_url=_text(item, "generatorURL", text),
    )


def _string_map(value: Any, where: str, field: str, text: Callable[[str], str], required: bool) -> dict[str, str]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise PayloadError(f"{where}.{field} must be an object of strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise PayloadError(f"{where}.{field}.{clean(key)[:50]} must be a string")
    if text is _as_is:
        return value  # a dict json.loads just made, held by nothing else: no copy needed
    return {text(key): text(item) for key, item in value.items()}


def _text(doc: Mapping[str, Any], key: str, text: Callable[[str], str]) -> str:
    value = doc.get(key)
    return text(value) if isinstance(value, str) else ""


def _as_is(text: str) -> str:
    return text


def clean(text: str) -> str:
    """``text`` with lone UTF-16 surrogates (valid JSON, invalid UTF-8) replaced, so it can be stored."""
    if text.isascii():  # constant time (CPython marks ASCII strings), and most labels are ASCII
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def label_fingerprint(labels: Mapping[str, str]) -> str:
    """A stable identity for a label set, used when the sender gave no fingerprint."""
    canonical = json.dumps(sorted(labels.items()), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
