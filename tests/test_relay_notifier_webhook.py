"""The generic JSON webhook notifier, against respx; and the proof of the notifier registry:
this file and the notifier's own module are the only files that name it."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
import respx
from mlwarden.relay import config as relay_config
from mlwarden.relay.notice import FIRING, PIPELINE_DOWN, RESOLVED, Notice
from mlwarden.relay.notifiers import notifier_for
from mlwarden.relay.notifiers.base import DeliveryError, registered
from mlwarden.relay.notifiers.webhook import WebhookNotifier

from tests.naming import files_naming
from tests.test_relay_support import ENV, config_dict

HOOK_URL = "https://incidents.example.test/hooks/abc?token=url-secret-0123"
TOKEN = "bearer-secret-4567"
HOOK_ENV = {**ENV, "HOOK_URL": HOOK_URL, "HOOK_TOKEN": TOKEN}
OWN_FILES = {"relay/notifiers/webhook.py", "tests/test_relay_notifier_webhook.py"}
NAMES = re.compile(
    r"notifiers[./]webhook\b|Webhook(Notifier|Doc|Settings)\b|type:\s*[\"']?webhook\b|[\"']type[\"']:\s*[\"']webhook[\"']"
    r"|Integration\(\s*[\"']webhook[\"']|integration = [\"']webhook[\"']|webhook notifier"
)


def config(hook: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> relay_config.RelayConfig:
    doc = config_dict()
    doc["destinations"]["hook"] = hook or {"type": "webhook", "url_env": "HOOK_URL", "bearer_token_env": "HOOK_TOKEN"}
    doc["routes"] = [{"destinations": ["hook"]}]
    return relay_config.parse(doc, HOOK_ENV if env is None else env)


def notice(kind: str = FIRING) -> Notice:
    return Notice(kind=kind, key="GpuHot,node1,0", alertname="GpuHot", severity="critical", level=1,
                  labels={"alertname": "GpuHot", "instance": "node1:9945", "gpu": "0"},
                  annotations={"summary": "GPU 0 at 91 °C"}, occurrences=3, starts_at="2026-11-28T10:00:00Z")


def send(notices: list[Notice], built: relay_config.RelayConfig | None = None) -> None:
    built = built or config()

    async def main() -> None:
        async with httpx.AsyncClient(timeout=0.5) as client:
            await notifier_for(built.destinations["hook"], client, 20, built.templates).send(notices)

    asyncio.run(main())


@respx.mock
def test_it_posts_the_notice_as_json_with_the_bearer_token() -> None:
    route = respx.post(HOOK_URL).mock(return_value=httpx.Response(204))
    send([notice(), notice(RESOLVED)])
    assert route.call_count == 2
    first, second = (call.request for call in route.calls)
    assert first.headers["authorization"] == f"Bearer {TOKEN}" and first.headers["content-type"] == "application/json"
    body = httpx.Response(200, content=first.content).json()
    assert body["version"] == 1 and body["kind"] == FIRING and body["severity"] == "critical"
    assert body["labels"] == {"alertname": "GpuHot", "instance": "node1:9945", "gpu": "0"}
    assert body["annotations"]["summary"] == "GPU 0 at 91 °C" and body["occurrences"] == 3 and body["level"] == 1
    assert "GpuHot" in body["headline"]
    assert httpx.Response(200, content=second.content).json()["kind"] == RESOLVED


@respx.mock
def test_without_a_token_no_authorization_header_and_the_pipeline_notice_has_its_headline() -> None:
    route = respx.post(HOOK_URL).mock(return_value=httpx.Response(200))
    send([notice(PIPELINE_DOWN)], config({"type": "webhook", "url_env": "HOOK_URL"}))
    request = route.calls[0].request
    assert "authorization" not in request.headers
    assert httpx.Response(200, content=request.content).json()["headline"] == "Alerting pipeline DOWN: no Watchdog heartbeat"


@pytest.mark.parametrize(
    ("response", "retryable", "retry_after"),
    [(httpx.Response(503), True, None), (httpx.Response(429, headers={"Retry-After": "7"}), True, 7.0),
     (httpx.Response(408), True, None), (httpx.Response(400, text="bad"), False, None),
     (httpx.Response(404), False, None)],
)
@respx.mock
def test_failures_are_classified_like_the_other_integrations(response: httpx.Response, retryable: bool, retry_after: float | None) -> None:
    respx.post(HOOK_URL).mock(return_value=response)
    with pytest.raises(DeliveryError) as caught:
        send([notice()])
    assert (caught.value.retryable, caught.value.retry_after) == (retryable, retry_after)
    assert HOOK_URL not in str(caught.value) and TOKEN not in str(caught.value)


@respx.mock
def test_a_timeout_is_retryable() -> None:
    respx.post(HOOK_URL).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(DeliveryError, match="webhook: timed out") as caught:
        send([notice()])
    assert caught.value.retryable


def test_config_reads_both_secrets_has_its_rate_and_never_shows_them() -> None:
    built = config()
    hook = built.destinations["hook"]
    assert (hook.type, hook.rate_per_second) == ("webhook", 1.0)
    assert HOOK_URL not in repr(hook) and TOKEN not in repr(hook) and TOKEN not in repr(hook.settings)
    assert config({"type": "webhook", "url_env": "HOOK_URL", "rate_per_second": 5}).destinations["hook"].rate_per_second == 5.0


@pytest.mark.parametrize(
    ("hook", "env", "message"),
    [({"type": "webhook", "url_env": "NOPE"}, HOOK_ENV, "destinations.hook.url_env: environment variable NOPE (or NOPE_FILE) is not set"),
     ({"type": "webhook", "url_env": "HOOK_URL", "bearer_token_env": "NOPE"}, HOOK_ENV,
      "destinations.hook.bearer_token_env: environment variable NOPE"),
     ({"type": "webhook", "url_env": "HOOK_URL"}, {**HOOK_ENV, "HOOK_URL": "ftp://x"}, "destinations.hook.url_env: the URL in that variable"),
     ({"type": "webhook"}, HOOK_ENV, "destinations.hook.url_env: required"),
     ({"type": "webhook", "url_env": "HOOK_URL", "webhook_url_env": "X"}, HOOK_ENV, "destinations.hook: unknown key 'webhook_url_env'"),
     ({"type": "webhok", "url_env": "HOOK_URL"}, HOOK_ENV, "destinations.hook.type: expected one of")],
)
def test_config_errors_are_one_line_naming_the_key(hook: dict[str, Any], env: dict[str, str], message: str) -> None:
    with pytest.raises(relay_config.ConfigError) as caught:
        config(hook, env)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert "ftp://x" not in str(caught.value)


def test_it_is_registered_from_its_own_module_and_in_the_json_schema() -> None:
    assert registered()["webhook"].factory.__module__ == WebhookNotifier.__module__
    schema = relay_config.json_schema()
    assert any("url_env" in definition.get("properties", {}) for definition in schema["$defs"].values())


def test_no_other_file_names_the_webhook_notifier() -> None:
    assert files_naming(NAMES, OWN_FILES) == []


def test_the_pattern_would_find_a_hand_wired_notifier() -> None:
    for wiring in ("from mlwarden.relay.notifiers.webhook import WebhookNotifier", "  hook:\n    type: webhook\n",
                   '{"type": "webhook", "url_env": "U"}', 'register(Integration("webhook", ...))', "the webhook notifier"):
        assert NAMES.search(wiring), wiring
