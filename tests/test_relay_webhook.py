"""The generic JSON webhook (respx), and the notifier registry it proves: one module, nothing else."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import respx
from mlwarden.relay import config as relay_config
from mlwarden.relay.app import Relay
from mlwarden.relay.auth import Credentials
from mlwarden.relay.notice import PIPELINE_DOWN, RESOLVED
from mlwarden.relay.notifiers import integrations
from mlwarden.relay.notifiers.base import DeliveryError
from mlwarden.relay.notifiers.webhook import WebhookNotifier
from mlwarden.relay.outbox import Outbox
from mlwarden.relay.store.sqlite import SQLiteStore

from tests.test_relay_notifiers import notice
from tests.test_relay_support import ENV, FakeClock, accept, alert, body, config_dict

REPO = Path(__file__).resolve().parent.parent
HOOK_URL = "https://hooks.example.test/incoming/s3cret-path"
HOOK_TOKEN = "hook-token-0123"
HOOK_ENV = {**ENV, "HOOK_URL": HOOK_URL, "HOOK_TOKEN": HOOK_TOKEN}


def hook_config(**hook: Any) -> relay_config.RelayConfig:
    doc = config_dict(routes=[{"destinations": ["hook"]}])
    doc["destinations"]["hook"] = {"type": "webhook", "url_env": "HOOK_URL", **hook}
    return relay_config.parse(doc, HOOK_ENV)


def send(*notices: Any, **hook: Any) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(timeout=1.0) as client:
            await WebhookNotifier(hook_config(**hook).destinations["hook"], client).send(list(notices))

    asyncio.run(main())


@respx.mock
def test_posts_the_notices_fields_as_json_with_the_bearer_token() -> None:
    route = respx.post(HOOK_URL).mock(return_value=httpx.Response(204))
    send(notice(group="{}:{alertname=\"GpuHot\"}", starts_at="2026-11-28T10:00:00Z"),
         notice(RESOLVED), token_env="HOOK_TOKEN")
    assert route.call_count == 2  # one document per notice
    first, second = (json.loads(call.request.content) for call in route.calls)
    assert first["version"] == "1" and first["status"] == "firing" and second["status"] == "resolved"
    assert first["key"] == "GpuHot,node1,0" and first["severity"] == "critical" and first["escalation_level"] == 1
    assert first["labels"] == {"alertname": "GpuHot", "instance": "node1:9945", "gpu": "0"}
    assert first["annotations"] == {"summary": "GPU 0 at 91 °C"}
    assert first["group"] == "{}:{alertname=\"GpuHot\"}" and first["starts_at"] == "2026-11-28T10:00:00Z"
    assert first["text"].startswith("[CRITICAL] GpuHot")  # the title template, as Slack's header
    request = route.calls.last.request
    assert request.headers["authorization"] == f"Bearer {HOOK_TOKEN}"
    assert request.headers["content-type"] == "application/json"


@respx.mock
def test_without_token_env_no_authorization_header_and_pipeline_notices_have_text() -> None:
    route = respx.post(HOOK_URL).mock(return_value=httpx.Response(200))
    send(notice(PIPELINE_DOWN, labels={}, annotations={}))
    sent = json.loads(route.calls.last.request.content)
    assert "authorization" not in route.calls.last.request.headers
    assert sent["status"] == "pipeline_down" and sent["text"] == "Alerting pipeline DOWN: no Watchdog heartbeat"


@pytest.mark.parametrize(
    ("response", "retryable", "after"),
    [
        (httpx.Response(429, headers={"Retry-After": "7"}, text="slow down"), True, 7.0),
        (httpx.Response(502, text="bad gateway"), True, None),
        (httpx.Response(408, text="request timeout"), True, None),
        (httpx.Response(401, text=f"bad token {HOOK_TOKEN} for {HOOK_URL}"), False, None),
        (httpx.Response(400, text="bad request"), False, None),
    ],
)
@respx.mock
def test_failures_say_whether_to_retry_and_never_show_the_secrets(
    response: httpx.Response, retryable: bool, after: float | None,
) -> None:
    respx.post(HOOK_URL).mock(return_value=response)
    with pytest.raises(DeliveryError) as caught:
        send(notice(), token_env="HOOK_TOKEN")
    assert caught.value.retryable is retryable and caught.value.retry_after == after
    assert HOOK_TOKEN not in str(caught.value) and "s3cret-path" not in str(caught.value)


@respx.mock
def test_a_timeout_is_retryable() -> None:
    respx.post(HOOK_URL).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(DeliveryError) as caught:
        send(notice())
    assert caught.value.retryable


@respx.mock
def test_retry_after_holds_the_job_in_the_shared_outbox(tmp_path: Path) -> None:
    clock = FakeClock()
    route = respx.post(HOOK_URL).mock(
        side_effect=[httpx.Response(429, headers={"Retry-After": "30"}), httpx.Response(200)])
    relay = Relay(hook_config(), SQLiteStore(tmp_path / "relay.db"), Credentials("t"), clock=clock)

    async def main() -> None:
        outbox: Outbox = relay.start_outbox()
        outbox._rand = lambda: 1.0  # no jitter
        try:
            accept(relay.store, relay.config, body(alert()), clock())
            await outbox.run_once()
            clock.advance(29)
            await outbox.run_once()
            assert route.call_count == 1  # still waiting out the Retry-After
            clock.advance(1)
            await outbox.run_once()
            assert route.call_count == 2
        finally:
            assert relay.http is not None
            await relay.http.aclose()

    asyncio.run(main())
    assert relay.store.outbox_stats()[0] == 0
    retries = relay.metrics.registry.get_sample_value(
        "mlwarden_relay_delivery_retries_total", {"destination": "hook", "integration": "webhook"})
    assert retries == 1


@pytest.mark.parametrize(("hook", "env", "message"), [
    ({}, {"HOOK_URL": ""}, "destinations.hook.url_env: environment variable HOOK_URL (or HOOK_URL_FILE) is not set"),
    ({}, {"HOOK_URL": "ftp://s3cret-host"}, "destinations.hook.url_env: the URL in that variable: expected an http"),
    ({"token_env": "NO_TOKEN"}, {}, "destinations.hook.token_env: environment variable NO_TOKEN"),
    ({"webhook_url_env": "HOOK_URL"}, {}, "destinations.hook: unknown key 'webhook_url_env'"),
    ({"url_env": None}, {}, "destinations.hook.url_env:"),
])
def test_config_errors_name_the_key_and_not_the_secret(hook: dict[str, Any], env: dict[str, str], message: str) -> None:
    doc = config_dict(routes=[{"destinations": ["hook"]}])
    doc["destinations"]["hook"] = {"type": "webhook", "url_env": "HOOK_URL", **hook}
    with pytest.raises(relay_config.ConfigError) as caught:
        relay_config.parse(doc, {**HOOK_ENV, **env})
    assert message in str(caught.value) and "s3cret" not in str(caught.value)


def test_each_type_accepts_only_its_own_keys_and_names_the_types() -> None:
    doc = config_dict()
    doc["destinations"]["ops"] = {"type": "slack", "webhook_url_env": "SLACK_WEBHOOK_URL", "routing_key_env": "PD_KEY"}
    with pytest.raises(relay_config.ConfigError, match=r"^destinations\.ops: unknown key 'routing_key_env'$"):
        relay_config.parse(doc, ENV)
    doc["destinations"]["ops"] = {"type": "teams"}
    with pytest.raises(relay_config.ConfigError,
                       match=r"^destinations\.ops\.type: expected one of pagerduty, slack, webhook, got 'teams'$"):
        relay_config.parse(doc, ENV)


def test_default_rate_comes_from_the_integration_and_repr_hides_secrets() -> None:
    config = hook_config(token_env="HOOK_TOKEN")
    assert [config.destinations[n].rate_per_second for n in ("ops", "pd", "hook")] == [1.0, 2.0, 1.0]
    assert hook_config(rate_per_second=5).destinations["hook"].rate_per_second == 5.0
    shown = repr(config.destinations["hook"])
    assert HOOK_TOKEN not in shown and "s3cret" not in shown


def test_the_json_schema_covers_every_registered_type() -> None:
    schema = relay_config.json_schema()
    hook = {"destinations": {"hook": {"type": "webhook", "url_env": "HOOK_URL", "token_env": "T"}},
            "routes": [{"destinations": ["hook"]}]}
    jsonschema.validate(hook, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**hook, "destinations": {"hook": {"type": "webhook", "routing_key_env": "X"}}}, schema)
    text = json.dumps(schema)
    assert all(f'"const": "{name}"' in text or f'"enum": ["{name}"]' in text for name in integrations())


def test_only_the_notifier_module_names_the_webhook_type() -> None:
    """The registry is the only list of notifiers: no other source file names this one."""
    mentions = re.compile(r"""["']webhook["']|notifiers\.webhook|notifiers import webhook|WebhookNotifier""")
    sources = [p for folder in ("mlwarden", "relay", "exporter", "jobs") for p in (REPO / folder).rglob("*.py")]
    named = sorted(str(p.relative_to(REPO)) for p in sources if mentions.search(p.read_text(encoding="utf-8")))
    assert named == ["relay/notifiers/webhook.py"]
    assert set(integrations()) == {"pagerduty", "slack", "webhook"}
