"""Message text from sandboxed Jinja2 templates, rendered against real Alertmanager 0.25 payloads."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from mlwarden.relay import config as relay_config
from mlwarden.relay import intake, payload
from mlwarden.relay.notice import Notice
from mlwarden.relay.notifiers.pagerduty import event
from mlwarden.relay.notifiers.slack import message
from mlwarden.relay.templates import Templates, parse_time

from mlwarden import components
from tests.test_relay_support import ENV, Sink, config_dict

AM_CONFIG = """
route:
  receiver: sink
  group_by: [alertname, instance]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: sink
    webhook_configs:
      - url: {url}/am
        send_resolved: true
"""
RLO = "\u202e"  # RIGHT-TO-LEFT OVERRIDE
FIRING_FOR = timedelta(hours=3, minutes=12)


@pytest.fixture(scope="module")
def am_payload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bytes]:
    """One real Alertmanager 0.25 notification: two DiskAlmostFull alerts of one machine, told apart
    by their mount point only, with a runbook link, firing for 3h 12m, a bidi override in a label."""
    sink = Sink()
    am = components.alertmanager(_write(tmp_path_factory, AM_CONFIG.format(url=sink.url)), tmp_path_factory.mktemp("am"), ())
    am.start()
    try:
        starts = (datetime.now(UTC) - FIRING_FOR).isoformat()
        alerts = [{"labels": {"alertname": "DiskAlmostFull", "severity": "warning", "instance": "node7:9100",
                              "mountpoint": path, "job": "node", "device": f"nvme0n1p{i}{RLO}"},
                   "annotations": {"summary": f"{path} is 97% full", "runbook_url": "https://runbooks.example/disk?x=1&y=2"},
                   "startsAt": starts}
                  for i, path in enumerate(("/data1", "/data2"))]
        request = urllib.request.Request(am.url + "/api/v2/alerts", data=json.dumps(alerts).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5).close()
        # Alertmanager adds the posted alerts to the group one by one; a group flushed between the
        # two (a loaded host) notifies once per alert, so wait for the notification carrying both.
        components.wait_until(lambda: _with_both(sink.delivered("/am")), 20, "Alertmanager's webhook with both alerts")
        with urllib.request.urlopen(am.url + "/api/v2/status", timeout=5) as response:
            assert json.load(response)["versionInfo"]["version"].startswith("0.25")
        notification = _with_both(sink.delivered("/am"))[-1]
        yield json.dumps(notification).encode()
    finally:
        am.stop()
        sink.close()


def _with_both(notifications: list[dict]) -> list[dict]:
    return [n for n in notifications if len(n["alerts"]) == 2]


def _write(factory: pytest.TempPathFactory, text: str) -> relay_config.Path:
    path = factory.mktemp("amconfig") / "alertmanager.yml"
    path.write_text(text)
    return path


def notices_of(raw: bytes, **overrides: object) -> list[Notice]:
    config = relay_config.parse(config_dict(
        routes=[{"key_labels": ["alertname", "instance"], "destinations": ["ops"]}], **overrides), ENV)
    notification = payload.parse(raw)
    return [job.notice for job in intake.plan(notification, {}, time.time(), config).jobs]


def rendered_now(notice: Notice) -> float:
    started = parse_time(notice.starts_at)
    assert started is not None
    return started + FIRING_FOR.total_seconds() + 20


def test_the_default_slack_message_shows_what_tells_alerts_apart(am_payload: bytes) -> None:
    [notice] = notices_of(am_payload)  # two alerts of one key: one notice
    sent = message([notice], now=rendered_now(notice))
    text = json.dumps(sent, ensure_ascii=False)
    section = sent["blocks"][1]["text"]["text"]  # type: ignore[index]  # the message body is JSON decoded to nested dicts
    assert "`mountpoint=/data1`" in section and "`mountpoint=/data2`" in section
    assert "`job=node`" in section and "*Machine:* node7:9100" in section  # every label, some on their own
    assert "<https://runbooks.example/disk?x=1&amp;y=2|Runbook>" in section
    assert "*Firing for* 3h 12m (since " in section and " UTC)" in section
    assert RLO not in text and "nvme0n1p0" in text
    assert sent["text"] == "[WARNING] DiskAlmostFull on node7:9100 (2 alerts): /data1 is 97% full"
    assert ".000000" not in text and "T" not in section.split("since ")[1][:12]  # no raw timestamp


def test_the_default_pagerduty_event_has_the_summary_and_the_runbook(am_payload: bytes) -> None:
    [notice] = notices_of(am_payload)
    sent = event(notice, "key", now=rendered_now(notice))
    assert sent["payload"]["summary"] == (  # type: ignore[index]  # the event body is JSON decoded to nested dicts
        "[WARNING] DiskAlmostFull on node7:9100 (2 alerts): /data1 is 97% full (firing for 3h 12m)")
    assert {"href": "https://runbooks.example/disk?x=1&y=2", "text": "runbook"} in sent["links"]  # type: ignore[operator]  # the event body is JSON decoded to nested dicts
    assert RLO not in json.dumps(sent["payload"]["summary"])  # type: ignore[index]  # the event body is JSON decoded to nested dicts


def test_templates_from_relay_yml_shape_the_messages(am_payload: bytes) -> None:
    templates = {
        "slack_text": ("{{ alertname }} on {{ all_labels.instance }}:"
                       "{% for m in members %}{% for n, v in m if n == 'mountpoint' %} {{ v }}{% endfor %}{% endfor %}"),
        "slack_notification": "{{ notices|length }} for {{ notices[0].alertname }}",
        "pagerduty_summary": "DISK {{ where }} {{ firing_for }}",
    }
    [notice] = notices_of(am_payload, templates=templates)
    config = relay_config.parse(config_dict(templates=templates), ENV)
    sent = message([notice], config.templates, now=rendered_now(notice))
    assert sent["blocks"][1]["text"]["text"] == "DiskAlmostFull on node7:9100: /data1 /data2"  # type: ignore[index]  # the message body is JSON decoded to nested dicts
    assert sent["text"] == "1 for DiskAlmostFull"
    assert event(notice, "k", config.templates, rendered_now(notice))["payload"]["summary"] == "DISK node7:9100 3h 12m"  # type: ignore[index]  # the event body is JSON decoded to nested dicts


@pytest.mark.parametrize(("templates", "message_part"), [
    ({"slack_text": "{% if %}"}, "templates.slack_text: line 1:"),
    ({"slack_title": "x"}, "templates: unknown key 'slack_title'"),
    ({"pagerduty_summary": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}, "rendering a sample notice failed"),
])
def test_a_bad_or_unsafe_template_is_a_config_error(templates: dict[str, str], message_part: str) -> None:
    with pytest.raises(relay_config.ConfigError, match=message_part.replace("[", r"\[")):
        relay_config.parse(config_dict(templates=templates), ENV)


def test_a_template_failing_on_one_notice_falls_back_to_the_default(am_payload: bytes) -> None:
    templates = Templates({"slack_text": "{% if alertname == 'DiskAlmostFull' %}{{ 1 // 0 }}{% endif %}custom"})
    [notice] = notices_of(am_payload)
    section = message([notice], templates, now=rendered_now(notice))["blocks"][1]["text"]["text"]  # type: ignore[index]  # the message body is JSON decoded to nested dicts
    assert "`mountpoint=/data1`" in section  # the default's text: the notice was not lost


def test_a_template_cannot_reach_pythons_internals(am_payload: bytes) -> None:
    [notice] = notices_of(am_payload)
    templates = Templates({"title": "{{ alertname.__class__.__init__.__globals__ }}{{ alertname.mro }}|x"})
    assert templates.title(notice, 0.0) == "|x"  # the sandbox hides dunder and unsafe attributes
