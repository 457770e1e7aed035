"""One notifier per integration behind one interface (:class:`relay.notifiers.base.Notifier`)."""

from __future__ import annotations

import httpx

from mlwarden.relay.config import Destination
from mlwarden.relay.notifiers.base import Notifier


def notifier_for(destination: Destination, client: httpx.AsyncClient, max_alerts_per_message: int) -> Notifier:
    if destination.type == "slack":
        from mlwarden.relay.notifiers.slack import SlackNotifier

        return SlackNotifier(destination, client, max_alerts_per_message)
    from mlwarden.relay.notifiers.pagerduty import PagerDutyNotifier

    return PagerDutyNotifier(destination, client)
