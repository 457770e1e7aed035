"""Alertmanager webhook payloads (version "4"), parsed leniently.

Unknown fields are ignored so a newer Alertmanager keeps working; newer optional fields
(``notification_reason``) are used when present. What the relay needs and cannot do
without (a list of alerts, each with string labels and a status) is checked, and anything
else wrong raises :class:`PayloadError` with a message the sender can act on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlwarden import jsonio


class PayloadError(ValueError):
    """The body is not a usable Alertmanager webhook payload; the message says why."""


@dataclass(slots=True)  # not frozen: see notice.Notice
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


def parse(body: bytes) -> Notification:
    try:
        doc = jsonio.decode(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise PayloadError(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PayloadError("body must be a JSON object (an Alertmanager webhook payload)")
    version = doc.get("version", "4")
    if str(version) != "4":
        raise PayloadError(f"unsupported webhook payload version {str(version)[:20]!r} (expected \"4\")")
    alerts, truncated = doc.get("alerts"), doc.get("truncatedAlerts")
    if not isinstance(alerts, list):
        raise PayloadError("field 'alerts' is missing or not a list")
    return Notification(
        receiver=_text(doc, "receiver"),
        status=_text(doc, "status"),
        group_key=_text(doc, "groupKey"),
        alerts=tuple(_alert(item, i) for i, item in enumerate(alerts)),
        external_url=_text(doc, "externalURL"),
        notification_reason=_text(doc, "notification_reason"),
        truncated_alerts=truncated if isinstance(truncated, int) else 0,
    )


def _alert(item: Any, index: int) -> Alert:
    # Run for every alert of every webhook on the event loop: the usual alert takes the straight
    # path (no error text built, each field read once); 7.5 -> 4 us per alert.
    if not isinstance(item, dict):
        raise PayloadError(f"alerts[{index}] must be an object")
    status = item.get("status")
    if status != "firing" and status != "resolved":
        raise PayloadError(f"alerts[{index}].status must be \"firing\" or \"resolved\"")
    labels = _string_map(item.get("labels"), index, "labels", required=True)
    annotations = _string_map(item.get("annotations"), index, "annotations", required=False)
    fingerprint, starts_at, ends_at, generator_url = (
        item.get("fingerprint"), item.get("startsAt"), item.get("endsAt"), item.get("generatorURL"))
    return Alert(
        status=status,
        labels=labels,
        annotations=annotations,
        fingerprint=(clean(fingerprint) if isinstance(fingerprint, str) else "") or label_fingerprint(labels),
        starts_at=clean(starts_at) if isinstance(starts_at, str) else "",
        ends_at=clean(ends_at) if isinstance(ends_at, str) else "",
        generator_url=clean(generator_url) if isinstance(generator_url, str) else "",
    )


def _string_map(value: Any, index: int, field: str, required: bool) -> dict[str, str]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise PayloadError(f"alerts[{index}].{field} must be an object of strings")
    try:
        # The usual map, checked whole: every value a string (join raises TypeError otherwise) and
        # no lone surrogate anywhere (encode raises), so nothing to clean; as fast as one label
        # checked in the loop below, which does the rest (and says which value is wrong).
        "".join(value).encode()
        "".join(value.values()).encode()
    except (TypeError, UnicodeEncodeError):
        pass
    else:
        return value
    result = {}
    for key, item in value.items():
        if not isinstance(item, str):
            raise PayloadError(f"alerts[{index}].{field}.{clean(key)[:50]} must be a string")
        result[clean(key)] = clean(item)
    return result


def _text(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    return clean(value) if isinstance(value, str) else ""


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
