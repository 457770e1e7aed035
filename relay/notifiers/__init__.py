"""One notifier per integration behind one interface (:class:`relay.notifiers.base.Notifier`)."""

from __future__ import annotations

import httpx

from relay.config import Destination
from relay.notifiers.base import Notifier


def notifier_for(destination: Destination, client: httpx.AsyncClient, max_alerts_per_message: int) -> Notifier:
    if destination.type == "slack":
        from relay.notifiers.slack import SlackNotifier

        return SlackNotifier(destination, client, max_alerts_per_message)
    from relay.notifiers.pagerduty import PagerDutyNotifier

    return PagerDutyNotifier(destination, client)
