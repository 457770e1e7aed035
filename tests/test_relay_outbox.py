"""The outbox with a real SQLite store, respx for Slack/PagerDuty and a fake clock: no sleeping."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import respx
from mlwarden.relay.app import Relay
from mlwarden.relay.auth import Credentials
from mlwarden.relay.outbox import MAX_RETRY_AFTER_SECONDS, Outbox
from mlwarden.relay.store.sqlite import SQLiteStore

from tests.test_relay_support import PD_URL, SLACK_URL, FakeClock, accept, alert, body, make_config


def with_outbox(tmp_path: Path, clock: FakeClock, scenario: Callable[[Relay, Outbox], Awaitable[Any]], **config: Any) -> Relay:
    relay = Relay(make_config(**config), SQLiteStore(tmp_path / "relay.db"), Credentials("t"), clock=clock)

    async def main() -> None:
        outbox = relay.start_outbox()
        outbox._rand = lambda: 1.0  # no jitter: deterministic delays
        try:
            await scenario(relay, outbox)
        finally:
            assert relay.http is not None
            await relay.http.aclose()

    asyncio.run(main())
    return relay


def sample(relay: Relay, name: str, **labels: str) -> float:
    value = relay.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@respx.mock
def test_storm_for_one_slack_webhook_is_coalesced_rate_limited_and_complete(tmp_path: Path) -> None:
    clock = FakeClock()
    sent_at: list[float] = []
    delivered: list[str] = []

    def slack(request: httpx.Request) -> httpx.Response:
        sent_at.append(clock())
        delivered.extend(block["text"]["text"] for block in json.loads(request.content)["blocks"] if block["type"] == "section")
        return httpx.Response(200, text="ok")

    respx.post(SLACK_URL).mock(side_effect=slack)
    storm = 10_000  # the storm size

    async def scenario(relay: Relay, outbox: Outbox) -> None:
        for i in range(0, storm, 10):  # distinct alerts arriving far faster than Slack may be sent to
            # Critical: a flood of warnings is folded into a digest instead (test_relay_priority).
            alerts = [alert(name=f"Storm{n:05d}", severity="critical") for n in range(i, i + 10)]
            accept(relay.store, relay.config, body(*alerts, group_key=str(i)), clock())
            await outbox.run_once()
            clock.advance(0.01)
        while relay.store.outbox_stats()[0] and clock() < 1_000_000 + 3600:
            clock.advance(0.25)
            await outbox.run_once()

    relay = with_outbox(tmp_path, clock, scenario, escalation={"after_repeats": 100, "page_immediately": []})
    names = sorted(text.split("Storm")[1][:5] for text in delivered)
    assert names == [f"{i:05d}" for i in range(storm)]  # every alert, exactly once
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(sent_at))  # at most one message per second
    assert len(sent_at) <= storm // 20 + 1  # coalesced: 20 alerts per message once they queue up
    assert sample(relay, "mlwarden_relay_deliveries_total", destination="ops", integration="slack") == storm


@respx.mock
def test_429_retry_after_is_honoured_for_the_job_and_the_destination(tmp_path: Path) -> None:
    clock = FakeClock()
    route = respx.post(SLACK_URL).mock(
        side_effect=[httpx.Response(429, headers={"Retry-After": "30"}), httpx.Response(200, text="ok")]
    )

    async def scenario(relay: Relay, outbox: Outbox) -> None:
        accept(relay.store, relay.config, body(alert()), clock())
        await outbox.run_once()
        assert route.call_count == 1
        clock.advance(29)
        accept(relay.store, relay.config, body(alert(name="Other")), clock())  # the destination is held too
        await outbox.run_once()
        assert route.call_count == 1
        clock.advance(1)
        await outbox.run_once()
        assert route.call_count == 2

    relay = with_outbox(tmp_path, clock, scenario)
    assert relay.store.outbox_stats()[0] == 0
    assert sample(relay, "mlwarden_relay_delivery_retries_total", destination="ops", integration="slack") == 1


@respx.mock
def test_a_retry_after_of_a_day_is_capped_at_an_hour(tmp_path: Path) -> None:
    clock = FakeClock()
    route = respx.post(SLACK_URL).mock(
        side_effect=[httpx.Response(429, headers={"Retry-After": "86400"}), httpx.Response(200, text="ok")]
    )

    async def scenario(relay: Relay, outbox: Outbox) -> None:
        accept(relay.store, relay.config, body(alert()), clock())
        await outbox.run_once()
        clock.advance(MAX_RETRY_AFTER_SECONDS - 1)
        await outbox.run_once()
        assert route.call_count == 1
        clock.advance(1)
        await outbox.run_once()
        assert route.call_count == 2  # tried again after an hour, not after a day

    relay = with_outbox(tmp_path, clock, scenario)
    assert relay.store.outbox_stats()[0] == 0


@respx.mock
def test_5xx_backs_off_exponentially_then_dead_letters(tmp_path: Path) -> None:
    clock = FakeClock()
    route = respx.post(SLACK_URL).mock(return_value=httpx.Response(503, text="down"))
    tries_at: list[float] = []

    async def scenario(relay: Relay, outbox: Outbox) -> None:
        accept(relay.store, relay.config, body(alert()), clock())
        for _ in range(200):
            before = route.call_count
            await outbox.run_once()
            if route.call_count > before:
                tries_at.append(clock())
            clock.advance(0.5)

    relay = with_outbox(tmp_path, clock, scenario)  # max_attempts 4, backoff 1s doubling, no jitter
    gaps = [round(b - a) for a, b in itertools.pairwise(tries_at)]
    assert gaps == [1, 2, 4]
    [job] = relay.store.jobs()
    assert job.status == "dead" and job.attempts == 4 and "503" in job.last_error
    assert sample(relay, "mlwarden_relay_dead_letters_total", reason="retries_exhausted") == 1


@respx.mock
def test_permanent_4xx_dead_letters_at_once_and_other_destinations_still_deliver(tmp_path: Path) -> None:
    clock = FakeClock()
    respx.post(SLACK_URL).mock(return_value=httpx.Response(404, text="no_service"))
    pd = respx.post(PD_URL).mock(return_value=httpx.Response(202, json={"status": "success"}))

    async def scenario(relay: Relay, outbox: Outbox) -> None:
        accept(relay.store, relay.config, body(alert(severity="critical")), clock())  # -> ops and pd
        await outbox.run_once()

    relay = with_outbox(tmp_path, clock, scenario)
    [job] = relay.store.jobs()
    assert job.destination == "ops" and job.status == "dead" and job.attempts == 1
    assert pd.call_count == 1
    assert sample(relay, "mlwarden_relay_dead_letters_total", reason="permanent_failure") == 1


@respx.mock
def test_timeout_is_retried_not_lost(tmp_path: Path) -> None:
    clock = FakeClock()
    route = respx.post(SLACK_URL).mock(side_effect=[httpx.ReadTimeout("slow"), httpx.Response(200, text="ok")])

    async def scenario(relay: Relay, outbox: Outbox) -> None:
        accept(relay.store, relay.config, body(alert()), clock())
        await outbox.run_once()
        clock.advance(1)
        await outbox.run_once()

    relay = with_outbox(tmp_path, clock, scenario)
    assert route.call_count == 2 and relay.store.outbox_stats()[0] == 0


@respx.mock
def test_an_unforeseen_error_is_counted_and_retried_not_left_to_the_lease(tmp_path: Path) -> None:
    # httpx.DecodingError is neither a timeout nor a transport error, so no notifier classifies it.
    clock = FakeClock()
    route = respx.post(SLACK_URL).mock(side_effect=[httpx.DecodingError("bad gzip"), httpx.Response(200, text="ok")])

    async def scenario(relay: Relay, outbox: Outbox) -> None:
        accept(relay.store, relay.config, body(alert()), clock())
        await outbox.run_once()
        [job] = relay.store.jobs()
        assert job.attempts == 1 and job.last_error == "slack: DecodingError"
        clock.advance(1)  # the first backoff, not the 60 s lease
        await outbox.run_once()

    relay = with_outbox(tmp_path, clock, scenario)
    assert route.call_count == 2 and relay.store.outbox_stats()[0] == 0
    assert sample(relay, "mlwarden_relay_delivery_retries_total", destination="ops", integration="slack") == 1


@respx.mock
def test_pagerduty_rate_limit_spaces_events(tmp_path: Path) -> None:
    clock = FakeClock()
    sent_at: list[float] = []
    respx.post(PD_URL).mock(side_effect=lambda r: sent_at.append(clock()) or httpx.Response(202, json={}))
    respx.post(SLACK_URL).mock(return_value=httpx.Response(200, text="ok"))

    async def scenario(relay: Relay, outbox: Outbox) -> None:
        for i in range(5):
            accept(relay.store, relay.config, body(alert(name=f"Page{i}", severity="critical")), clock())
        for _ in range(40):
            await outbox.run_once()
            clock.advance(0.1)

    with_outbox(tmp_path, clock, scenario)
    assert len(sent_at) == 5
    assert all(b - a >= 0.5 - 1e-9 for a, b in itertools.pairwise(sent_at))  # 120 events/min


def test_sqlite_restart_releases_leases(tmp_path: Path) -> None:
    config = make_config()
    store = SQLiteStore(tmp_path / "relay.db")
    accept(store, config, body(alert()), 100.0)
    assert len(store.claim("ops", 100.0, 10, lease=600)) == 1
    assert store.claim("ops", 101.0, 10, lease=600) == []  # leased
    store.close()
    reopened = SQLiteStore(tmp_path / "relay.db")  # the process that held the lease is gone
    assert len(reopened.claim("ops", 102.0, 10, lease=600)) == 1


@respx.mock
def test_an_unexpected_error_in_a_dispatcher_pass_does_not_stop_deliveries(tmp_path: Path) -> None:
    clock = FakeClock()
    route = respx.post(SLACK_URL).mock(return_value=httpx.Response(200, text="ok"))

    async def scenario(relay: Relay, outbox: Outbox) -> None:
        accept(relay.store, relay.config, body(alert()), clock())
        real_claim = relay.store.claim
        calls = {"n": 0}

        def claim_once_broken(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise ValueError("corrupt job row")
            return real_claim(*args, **kwargs)

        relay.store.claim = claim_once_broken  # type: ignore[method-assign]  # a store method replaced by a failing one for this test
        runner = asyncio.create_task(outbox.run(tick=0.01))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if route.called:
                break
        runner.cancel()
        await outbox.drain()

    with_outbox(tmp_path, clock, scenario)
    assert route.called, "the dispatcher died on the first error and never delivered"
