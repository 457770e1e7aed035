"""The notifier interface, and the registry of integrations each notifier module adds itself to.

A notifier sends notices, or raises :class:`DeliveryError` saying whether a retry can help.
Retry, backoff and rate limiting live once, in :mod:`relay.outbox`; a notifier only renders
and sends, and classifies what went wrong (like Alertmanager's ``notify.Notifier``).

Each module of this package registers its :class:`Integration` (Alertmanager's receiver
table): its ``type``, the pydantic model of its keys in relay.yml, its default rate, how its
settings are read (secrets from the environment) and its factory. relay.yml's schema, the
destinations of :mod:`relay.config` and the relay's notifiers are made from these entries.
"""

from __future__ import annotations

import email.utils
import functools
import importlib
import pkgutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field

from mlwarden import logs
from mlwarden.relay.notice import Notice
from mlwarden.relay.schema import Positive
from mlwarden.relay.templates import Templates
from mlwarden.secrets import SecretError, read_secret
from mlwarden.settings import parse_url

DocT = TypeVar("DocT", bound="DestinationDoc")
SettingsT = TypeVar("SettingsT")


class DeliveryError(Exception):
    """A failed delivery. ``retryable``: a later try may work; ``retry_after``: seconds the service asked for."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class Notifier(ABC):
    integration: str
    max_batch: int = 1  # how many notices one send() may carry
    # How many warning and info notices one send() may fold into a digest when they flood in
    # (more than max_batch waiting); 0: the integration has no digests (PagerDuty: one event each).
    digest_batch: int = 0

    @abstractmethod
    async def send(self, notices: Sequence[Notice]) -> None:
        """Deliver ``notices`` as one request; raise DeliveryError on failure. More than max_batch
        notices (at most digest_batch) are a flood to summarise."""


async def post_json(
    client: httpx.AsyncClient, url: str, body: dict[str, object], service: str, headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    """POST ``body``; return a 2xx response or raise a classified DeliveryError (never naming the URL)."""
    try:
        response = await client.post(url, json=body, headers=headers)
    except httpx.TimeoutException:
        raise DeliveryError(f"{service}: timed out", retryable=True) from None
    except httpx.TransportError as exc:
        raise DeliveryError(f"{service}: connection failed ({type(exc).__name__})", retryable=True) from None
    if response.is_success:
        return response
    # A proxy's error page, or the service itself, may quote the URL or the routing key; the error is
    # stored with the job and served by the queue view, beyond the reach of log masking. (A secret
    # that starts in the first 200 characters ends well within the first 1,000.)
    detail = logs.redact(response.text[:1000])[:200].replace("\n", " ")
    message = f"{service}: HTTP {response.status_code} {detail}".strip()
    if response.status_code == 429:
        raise DeliveryError(message, retryable=True, retry_after=retry_after(response.headers.get("retry-after")))
    # 408 and 5xx are the service's trouble, not the request's; other 4xx will not get better.
    retryable = response.status_code == 408 or response.status_code >= 500
    raise DeliveryError(message, retryable=retryable, retry_after=retry_after(response.headers.get("retry-after")))


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# The registry ---------------------------------------------------------------------------------


class DestinationDoc(BaseModel):
    """The keys every destination has; an integration's model adds ``type: Literal["<type>"]`` and its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rate_per_second: Positive | None = Field(None, description="messages per second (default: the integration's)")


@dataclass(frozen=True)
class Destination:
    """A destination of relay.yml, built: ``settings`` is its integration's own (secrets read)."""

    name: str
    type: str
    rate_per_second: float
    settings: Any

    def __repr__(self) -> str:  # never print the secrets
        return f"Destination({self.name!r}, {self.type!r})"


@dataclass(frozen=True)
class NotifierOptions:
    """What the relay's configuration gives every notifier besides its destination."""

    max_alerts_per_message: int
    templates: Templates


@dataclass(frozen=True)
class Integration(Generic[DocT, SettingsT]):
    """One registered integration. ``settings`` reads a destination's document (secrets from
    the environment) and raises ``ValueError("<key>: <reason>")`` for a value it cannot use."""

    type: str
    doc: type[DocT]
    default_rate: float
    settings: Callable[[DocT, Mapping[str, str]], SettingsT]
    factory: Callable[[Destination, httpx.AsyncClient, NotifierOptions], Notifier]


_REGISTERED: dict[str, Integration[Any, Any]] = {}


def register(integration: Integration[Any, Any]) -> None:
    """Called once at the bottom of each notifier's module."""
    known = _REGISTERED.get(integration.type)
    if known is not None and known.factory.__module__ != integration.factory.__module__:
        raise ValueError(f"notifier type {integration.type!r} is registered by {known.factory.__module__} and {integration.factory.__module__}")
    _REGISTERED[integration.type] = integration


@functools.cache
def registered() -> dict[str, Integration[Any, Any]]:
    """Every integration of this package, by type; importing its modules registers them."""
    package = __name__.rsplit(".", 1)[0]
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if module.name not in ("base", "text"):
            importlib.import_module(f"{package}.{module.name}")
    return {name: _REGISTERED[name] for name in sorted(_REGISTERED)}


def destination_secret(key: str, variable: str | None, environ: Mapping[str, str]) -> str:
    """The value of the secret a destination's ``key`` names (``<VAR>`` or ``<VAR>_FILE``)."""
    if variable is None:
        raise ValueError(f"{key}: required")
    try:
        value = read_secret(variable, environ)
    except SecretError as exc:
        raise ValueError(f"{key}: {exc}") from None
    if not value:
        raise ValueError(f"{key}: environment variable {variable} (or {variable}_FILE) is not set")
    return value


def secret_url(key: str, variable: str | None, environ: Mapping[str, str]) -> str:
    """A URL held in a secret; the error never quotes it."""
    url = destination_secret(key, variable, environ)
    try:
        parse_url(url)
    except ValueError as exc:
        raise ValueError(f"{key}: the URL in that variable: {exc}") from None
    return url


def destinations_table() -> str:
    """The docs' table of destination types (``<!-- settings:relay-destinations -->`` in docs/relay.md)."""
    rows = ["| `type` | its keys | default `rate_per_second` |", "| --- | --- | --- |"]
    for integration in registered().values():
        keys = [
            f"`{name}`{'' if field.is_required() else ' (optional)'}: {field.description}"
            for name, field in integration.doc.model_fields.items() if name not in DestinationDoc.model_fields and name != "type"
        ]
        rows.append(f"| `{integration.type}` | {'; '.join(keys)} | {integration.default_rate:g} |")
    return "\n".join(rows)
