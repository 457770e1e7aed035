"""Slack and PagerDuty notifiers against respx: rendering limits and failure classification."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import pytest
import respx
from mlwarden.relay.notice import FIRING, RESOLVED, Notice
from mlwarden.relay.notifiers import slack as slack_module
from mlwarden.relay.notifiers.base import DeliveryError, retry_after
from mlwarden.relay.notifiers.pagerduty import EVENT_LIMIT_BYTES, PagerDutyNotifier, dedup_key, event
from mlwarden.relay.notifiers.slack import MAX_BLOCKS, SECTION_TEXT_LIMIT, SlackNotifier, message

from tests.test_relay_support import PD_URL, SLACK_URL, make_config


def notice(kind: str = FIRING, **kw: Any) -> Notice:
    fields: dict[str, Any] = {
        "kind": kind, "key": "GpuHot,node1,0", "alertname": "GpuHot", "severity": "critical", "level": 1,
        "labels": {"alertname": "GpuHot", "instance": "node1:9945", "gpu": "0"},
        "annotations": {"summary": "GPU 0 at 91 °C"}, "occurrences": 3,
    }
    return Notice(**{**fields, **kw})


def send(coro_factory: Any) -> Any:
    async def main() -> Any:
        async with httpx.AsyncClient(timeout=1.0) as client:
            return await coro_factory(client)

    return asyncio.run(main())


def slack(client: httpx.AsyncClient) -> SlackNotifier:
    return SlackNotifier(make_config().destinations["ops"], client, max_alerts_per_message=20)


def pagerduty(client: httpx.AsyncClient) -> PagerDutyNotifier:
    return PagerDutyNotifier(make_config().destinations["pd"], client)


def test_slack_message_names_machine_gpu_severity_and_level() -> None:
    text = json.dumps(message([notice(reason="repeat", starts_at="2026-11-28T10:00:00Z")], now=1_764_324_000.0 + 3600),
                      ensure_ascii=False)
    for expected in ("node1:9945", "GPU 0", "CRITICAL", "Escalation level:* 1", "91 °C", "Reason:* repeat",
                     "since 2026-11-28 10:00 UTC"):
        assert expected in text


def test_slack_message_respects_block_kit_limits() -> None:
    huge = notice(annotations={"summary": "x" * 10_000, "description": "<script>&"})
    msg = message([huge] * 48)
    blocks = msg["blocks"]
    assert isinstance(blocks, list) and len(blocks) <= MAX_BLOCKS
    assert all(len(b["text"]["text"]) <= SECTION_TEXT_LIMIT for b in blocks if b["type"] == "section")
    assert "&lt;script&gt;&amp;" in json.dumps(msg)  # mrkdwn control characters escaped


@respx.mock
def test_slack_success_posts_block_kit_to_the_webhook() -> None:
    route = respx.post(SLACK_URL).mock(return_value=httpx.Response(200, text="ok"))
    send(lambda c: slack(c).send([notice(), notice(RESOLVED)]))
    sent = json.loads(route.calls.last.request.content)
    assert sent["blocks"][0]["type"] == "header" and sent["text"].startswith("1 firing, 1 resolved: [CRITICAL] GpuHot")


@respx.mock
def test_a_digest_is_rendered_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Thousands of notices take tens of milliseconds to fold: on the event loop, every webhook in
    # flight would wait for them.
    route = respx.post(SLACK_URL).mock(return_value=httpx.Response(200, text="ok"))
    rendered_on: list[str] = []
    real_digest = slack_module.digest

    def digest(*args: Any) -> dict[str, object]:
        rendered_on.append(threading.current_thread().name)
        return real_digest(*args)

    monkeypatch.setattr(slack_module, "digest", digest)
    flood = [notice(severity="warning", key=f"k{i}", group=f"g{i % 3}") for i in range(100)]
    send(lambda c: slack(c).send(flood))
    assert rendered_on and rendered_on[0] != threading.main_thread().name
    assert json.loads(route.calls.last.request.content)["text"].startswith("Digest: 100 notices in 3 group(s)")


@pytest.mark.parametrize(
    ("response", "retryable", "after"),
    [
        (httpx.Response(429, headers={"Retry-After": "7"}, text="rate_limited"), True, 7.0),
        (httpx.Response(503, text="unavailable"), True, None),
        (httpx.Response(404, text="no_service"), False, None),
        (httpx.Response(400, text="invalid_blocks"), False, None),
    ],
)
@respx.mock
def test_slack_failures_say_whether_to_retry(response: httpx.Response, retryable: bool, after: float | None) -> None:
    respx.post(SLACK_URL).mock(return_value=response)
    with pytest.raises(DeliveryError) as caught:
        send(lambda c: slack(c).send([notice()]))
    assert caught.value.retryable is retryable and caught.value.retry_after == after
    assert SLACK_URL not in str(caught.value)  # the URL is the secret


@respx.mock
def test_a_response_that_echoes_the_secret_does_not_carry_it_into_the_error() -> None:
    # The error text is stored with the job and served by the queue view, where log masking does not reach.
    respx.post(SLACK_URL).mock(return_value=httpx.Response(403, text=f"proxy denied {SLACK_URL}"))
    respx.post(PD_URL).mock(return_value=httpx.Response(400, text='{"errors": ["bad key routing-key-0123"]}'))
    for notifier in (slack, pagerduty):
        with pytest.raises(DeliveryError) as caught:
            send(lambda c, notifier=notifier: notifier(c).send([notice()]))
        assert "HTTP 40" in str(caught.value)
        assert SLACK_URL not in str(caught.value) and "routing-key-0123" not in str(caught.value)


@respx.mock
def test_slack_timeout_is_retryable() -> None:
    respx.post(SLACK_URL).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(DeliveryError) as caught:
        send(lambda c: slack(c).send([notice()]))
    assert caught.value.retryable and "timed out" in str(caught.value)


@respx.mock
def test_pagerduty_trigger_then_resolve_with_the_same_dedup_key() -> None:
    route = respx.post(PD_URL).mock(return_value=httpx.Response(202, json={"status": "success"}))
    send(lambda c: pagerduty(c).send([notice()]))
    send(lambda c: pagerduty(c).send([notice(RESOLVED)]))
    trigger, resolve = (json.loads(call.request.content) for call in route.calls)
    assert trigger["event_action"] == "trigger" and resolve["event_action"] == "resolve"
    assert trigger["dedup_key"] == resolve["dedup_key"] == dedup_key(notice())
    assert trigger["routing_key"] == "routing-key-0123"
    assert trigger["payload"]["severity"] == "critical" and trigger["payload"]["source"] == "node1:9945"
    assert trigger["payload"]["component"] == "gpu 0"


@pytest.mark.parametrize(
    ("response", "retryable", "after"),
    [
        (httpx.Response(429, headers={"Retry-After": "30"}), True, 30.0),
        (httpx.Response(500), True, None),
        (httpx.Response(400, json={"status": "invalid event"}), False, None),
    ],
)
@respx.mock
def test_pagerduty_failures_say_whether_to_retry(response: httpx.Response, retryable: bool, after: float | None) -> None:
    respx.post(PD_URL).mock(return_value=response)
    with pytest.raises(DeliveryError) as caught:
        send(lambda c: pagerduty(c).send([notice()]))
    assert caught.value.retryable is retryable and caught.value.retry_after == after
    assert "routing-key-0123" not in str(caught.value)


@respx.mock
def test_pagerduty_timeout_is_retryable() -> None:
    respx.post(PD_URL).mock(side_effect=httpx.ConnectTimeout("slow"))
    with pytest.raises(DeliveryError) as caught:
        send(lambda c: pagerduty(c).send([notice()]))
    assert caught.value.retryable


def test_pagerduty_event_respects_summary_and_size_limits() -> None:
    huge = notice(annotations={"summary": "s" * 5000, "description": "d" * 600_000},
                  labels={"alertname": "GpuHot", "instance": "n", **{f"l{i}": "v" * 10_000 for i in range(60)}})
    body = event(huge, "key")
    assert len(body["payload"]["summary"]) <= 1024  # type: ignore[index]  # the event body is JSON decoded to nested dicts
    assert len(json.dumps(body).encode()) <= EVENT_LIMIT_BYTES


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert retry_after("12") == 12.0
    assert retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert retry_after("soon") is None and retry_after(None) is None


