"""One notifier per integration behind one interface (:class:`relay.notifiers.base.Notifier`)."""

from __future__ import annotations

import httpx

from mlwarden.relay.config import Destination
from mlwarden.relay.notifiers.base import Notifier
from mlwarden.relay.templates import DEFAULT_TEMPLATES, Templates


def notifier_for(
    destination: Destination, client: httpx.AsyncClient, max_alerts_per_message: int,
    templates: Templates = DEFAULT_TEMPLATES,
) -> Notifier:
    if destination.type == "slack":
        from mlwarden.relay.notifiers.slack import SlackNotifier

        return SlackNotifier(destination, client, max_alerts_per_message, templates)
    from mlwarden.relay.notifiers.pagerduty import PagerDutyNotifier

    return PagerDutyNotifier(destination, client, templates)
