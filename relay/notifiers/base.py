"""The notifier interface: send notices, or raise :class:`DeliveryError` saying whether a retry can help.

Retry, backoff and rate limiting live once, in :mod:`relay.outbox`; a notifier only renders
and sends, and classifies what went wrong (like Alertmanager's ``notify.Notifier``).

Each integration registers itself here (:func:`register`) from its own module: its ``type``
name, the pydantic model of its keys in relay.yml, its default rate, how its keys become a
:class:`Destination` and how a Destination becomes a :class:`Notifier`. The schema, the
configuration and the relay read nothing else (:func:`relay.notifiers.integrations`).
"""

from __future__ import annotations

import email.utils
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from mlwarden.relay.fields import ConfigError, Doc, Positive
from mlwarden.relay.notice import Notice
from mlwarden.relay.templates import Templates
from pydantic import Field

from mlwarden import logs
from mlwarden.secrets import SecretError, read_secret
from mlwarden.settings import parse_url


class DestinationDoc(Doc):
    """The keys every destination has; an integration's model adds ``type: Literal["<name>"]`` and its own."""

    rate_per_second: Positive | None = Field(None, description="messages per second (default: the type's own)")


@dataclass(frozen=True)
class Destination:
    """A built destination; an integration's subclass (``repr=False``) adds its fields, secrets included."""

    name: str
    type: str
    rate_per_second: float

    def __repr__(self) -> str:  # never print the secrets
        return f"Destination({self.name!r}, {self.type!r})"


@dataclass(frozen=True)
class Context:
    """What the relay gives every notifier it builds."""

    client: httpx.AsyncClient
    templates: Templates
    max_alerts_per_message: int


@dataclass(frozen=True)
class Integration:
    name: str  # the destination's ``type`` in relay.yml
    doc: type[DestinationDoc]
    default_rate: float  # messages per second when the destination gives no rate_per_second
    # (name, validated doc, rate, environ) -> Destination; raises ConfigError naming the key
    destination: Callable[[str, Any, float, Mapping[str, str]], Destination]
    notifier: Callable[[Any, Context], Notifier]  # (its own Destination, context)


REGISTRY: dict[str, Integration] = {}


def register(integration: Integration) -> Integration:
    """Called once by each notifier module; a second module claiming the same type is a bug."""
    if integration.name in REGISTRY:
        raise RuntimeError(f"notifier type {integration.name!r} registered twice")
    REGISTRY[integration.name] = integration
    return integration


def secret(variable: str, where: str, environ: Mapping[str, str]) -> str:
    """The value of a secret variable (or its ``_FILE``) named by a destination's ``*_env`` key."""
    try:
        value = read_secret(variable, environ)
    except SecretError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not value:
        raise ConfigError(f"{where}: environment variable {variable} (or {variable}_FILE) is not set")
    return value


def checked_url(url: str, where: str) -> str:
    """``url`` if it is an http(s) URL; the error never quotes it, since it may be a secret."""
    try:
        parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return url


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
    client: httpx.AsyncClient, url: str, body: dict[str, object], service: str,
    headers: Mapping[str, str] | None = None,
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
