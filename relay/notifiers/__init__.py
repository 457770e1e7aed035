"""One module per integration, each registered where it is defined (see :mod:`relay.notifiers.base`)."""

from __future__ import annotations

import httpx

from mlwarden.relay.notifiers.base import Destination, Notifier, NotifierOptions, registered
from mlwarden.relay.templates import DEFAULT_TEMPLATES, Templates


def notifier_for(
    destination: Destination, client: httpx.AsyncClient, max_alerts_per_message: int,
    templates: Templates = DEFAULT_TEMPLATES,
) -> Notifier:
    options = NotifierOptions(max_alerts_per_message, templates)
    return registered()[destination.type].factory(destination, client, options)
