"""The relay's own metrics, in a registry per relay (so tests can run several side by side).

Outbox depth and age and the watchdog state are read from the store at scrape time, so
they are right for every replica sharing a Redis store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from mlwarden.relay.config import Watchdog
from mlwarden.relay.store.base import Store, StoreError
from mlwarden.relay.watchdog import STATES, heartbeat_state
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class RelayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.webhooks = Counter(
            "mlwarden_relay_webhooks_received", "Alertmanager webhook requests, by outcome.", ["outcome"], registry=r
        )
        self.alerts = Counter(
            "mlwarden_relay_alerts_received", "Alerts in accepted webhooks, by status.", ["status"], registry=r
        )
        self.suppressed = Counter(
            "mlwarden_relay_notifications_suppressed", "Notifications not sent because the alert key was in cooldown.",
            ["severity"], registry=r,
        )
        self.escalations = Counter(
            "mlwarden_relay_escalations", "Alert keys whose escalation level rose.", ["severity"], registry=r
        )
        self.deliveries = Counter(
            "mlwarden_relay_deliveries", "Notices delivered (a coalesced Slack message counts each alert).",
            ["destination", "integration"], registry=r,
        )
        self.retries = Counter(
            "mlwarden_relay_delivery_retries", "Notices rescheduled after a retryable delivery failure.",
            ["destination", "integration"], registry=r,
        )
        self.dead_letters = Counter(
            "mlwarden_relay_dead_letters", "Payloads or notices moved to a dead-letter state, by reason.",
            ["reason"], registry=r,
        )
        self.omitted = Counter(
            "mlwarden_relay_alerts_omitted", "Alerts left out of webhooks over the body limit (the rest was kept).",
            registry=r,
        )
        for outcome in ("accepted", "duplicate", "invalid", "unauthorized", "too_large", "unavailable"):
            self.webhooks.labels(outcome)
        for status in ("firing", "resolved"):
            self.alerts.labels(status)

    def watch_store(
        self, store: Store, watchdog: Callable[[], Watchdog | None], clock: Callable[[], float], since: float
    ) -> None:
        """Serve the store's gauges; ``watchdog`` gives the current (reloadable) watchdog config;
        ``since``: when the relay started watching the heartbeat."""
        self.registry.register(_StoreCollector(store, watchdog, clock, since))


class _StoreCollector(Collector):
    def __init__(
        self, store: Store, watchdog: Callable[[], Watchdog | None], clock: Callable[[], float], since: float
    ) -> None:
        self._store = store
        self._watchdog = watchdog
        self._clock = clock
        self._since = since

    def collect(self) -> Iterator[Metric]:
        try:
            depth, oldest = self._store.outbox_stats()
            last_seen, _ = self._store.watchdog()
        except StoreError:
            return  # the scrape shows the counters; readyz reports the store
        now = self._clock()
        yield GaugeMetricFamily("mlwarden_relay_outbox_depth", "Notices waiting for delivery.", value=depth)
        yield GaugeMetricFamily(
            "mlwarden_relay_outbox_oldest_age_seconds", "Age of the oldest notice waiting for delivery (0 when none).",
            value=max(0.0, now - oldest) if oldest is not None else 0.0,
        )
        watchdog = self._watchdog()
        if watchdog is None:
            return
        current = heartbeat_state(last_seen, now, watchdog.period, watchdog.grace, self._since)
        state = GaugeMetricFamily(
            "mlwarden_relay_watchdog_state", "Watchdog heartbeat state (1 for the current one).", labels=["state"]
        )
        for name in STATES:
            state.add_metric([name], 1.0 if name == current else 0.0)
        yield state
        if last_seen is not None:
            yield GaugeMetricFamily(
                "mlwarden_relay_watchdog_last_seen_timestamp_seconds", "When the Watchdog alert last arrived.",
                value=last_seen,
            )
