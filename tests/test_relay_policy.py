"""The relay's pure parts: config validation, payload parsing, cooldown/escalation policy, watchdog."""

from __future__ import annotations

import json

import pytest
from mlwarden.relay import config as relay_config
from mlwarden.relay import intake, payload, watchdog
from mlwarden.relay.cli import RelaySettings
from mlwarden.relay.dedup import notification_digest
from mlwarden.relay.policy import KeyState, decide

from mlwarden import settings
from tests.test_relay_support import ENV, FakeClock, alert, body, config_dict, make_config

MIN, HOUR = 60.0, 3600.0


def parsed(**kw: object) -> payload.Alert:
    return payload.parse(body(alert(**kw))).alerts[0]  # type: ignore[arg-type]  # the test payload's JSON bytes, which parse() accepts


def run(route, events, clock, key="k"):  # type: ignore[no-untyped-def]  # a table-driven helper over mixed event tuples
    """Feed (advance_seconds, alert) events through decide(); return the decisions."""
    state, decisions = None, []
    for advance, item in events:
        clock.advance(advance)
        decision = decide(state, item, key, clock(), route, "warning")
        state = decision.state
        decisions.append(decision)
    return decisions


# Config ---------------------------------------------------------------------------------

def test_example_config_loads() -> None:
    env = {"SLACK_WEBHOOK_URL": "https://hooks.slack.test/a", "SLACK_ONCALL_WEBHOOK_URL": "https://hooks.slack.test/b",
           "PAGERDUTY_ROUTING_KEY": "key-1234"}
    config = relay_config.load(relay_config.Path("relay/relay.example.yml"), env)
    assert config.routes[0].cooldown["warning"] == 30 * MIN
    assert config.routes[0].escalation.destinations == ("oncall-slack", "pagerduty")
    assert config.routes[1].cooldown["critical"] == 15 * MIN


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"routes": [{"destinations": ["nowhere"]}]}, "routes[0].destinations: unknown destination 'nowhere'"),
        ({"cooldown": {"warning": "soon"}}, "cooldown.warning: expected a duration"),
        ({"cooldown": {"fatal": "1m"}}, "cooldown: unknown key 'fatal'"),
        ({"destinations": {"x": {"type": "slack", "webhook_url_env": "MISSING_VAR"}}},
         "destinations.x.webhook_url_env: environment variable MISSING_VAR (or MISSING_VAR_FILE) is not set"),
        ({"delivery": {"max_attempts": 0}}, "delivery.max_attempts: expected a whole number"),
        ({"routes": []}, "routes: at least one route is required"),
    ],
)
def test_config_errors_name_the_key(change: dict[str, object], message: str) -> None:
    with pytest.raises(relay_config.ConfigError) as caught:
        relay_config.parse(config_dict(**change), ENV)
    assert message in str(caught.value)


def test_config_error_never_shows_the_secret() -> None:
    with pytest.raises(relay_config.ConfigError) as caught:
        relay_config.parse(config_dict(), {**ENV, "SLACK_WEBHOOK_URL": "not-a-url-but-secret"})
    assert "not-a-url-but-secret" not in str(caught.value)


def test_alert_cooldown_setting_replaces_the_defaults_but_not_route_overrides() -> None:
    config = relay_config.parse(config_dict(cooldown={"critical": "1m"}), ENV, default_cooldown=42.0)
    assert config.routes[0].cooldown == {"info": 42.0, "warning": 42.0, "critical": 60.0, "emergency": 42.0}


def test_secret_from_file(tmp_path: relay_config.Path) -> None:
    secret = tmp_path / "pd"
    secret.write_text("file-routing-key\n")
    env = {k: v for k, v in ENV.items() if k != "PD_KEY"} | {"PD_KEY_FILE": str(secret)}
    assert relay_config.parse(config_dict(), env).destinations["pd"].routing_key == "file-routing-key"


# Payload ---------------------------------------------------------------------------------

def test_payload_is_parsed_leniently_and_uses_notification_reason() -> None:
    doc = json.loads(body(alert()))
    doc["someFutureField"] = {"x": 1}
    doc["notification_reason"] = "repeat"
    doc["alerts"][0]["brandNew"] = [1, 2]
    del doc["alerts"][0]["fingerprint"]
    notification = payload.parse(json.dumps(doc).encode())
    assert notification.notification_reason == "repeat"
    assert notification.alerts[0].fingerprint  # computed from the labels when absent


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"alerts": "many"}', "'alerts' is missing or not a list"),
        (b'{"alerts": [{"status": "firing", "labels": {"a": 1}}]}', "alerts[0].labels.a must be a string"),
        (b'{"alerts": [{"status": "burning", "labels": {}}]}', "alerts[0].status"),
        (b'{"alerts": [{"status": "firing", "labels": {}}, 5]}', "alerts[1] must be an object"),
        (b'{"alerts": [{"status": "firing", "labels": ["a"]}]}', "alerts[0].labels must be an object of strings"),
        (b'{"alerts": [{"status": "firing"}]}', "alerts[0].labels must be an object of strings"),
        (b'{"alerts": [{"status": "firing", "labels": {}, "annotations": {"s": null}}]}',
         "alerts[0].annotations.s must be a string"),
        (b'{"version": "3", "alerts": []}', "unsupported webhook payload version"),
    ],
)
def test_bad_payloads_say_why(raw: bytes, message: str) -> None:
    with pytest.raises(payload.PayloadError) as caught:
        payload.parse(raw)
    assert message in str(caught.value)


def test_text_fields_that_are_not_strings_read_as_absent() -> None:
    raw = (b'{"alerts": [{"status": "resolved", "labels": {"alertname": "x"}, "fingerprint": 7,'
           b' "startsAt": 1, "endsAt": null, "generatorURL": ["u"]}]}')
    alert = payload.parse(raw).alerts[0]
    assert (alert.starts_at, alert.ends_at, alert.generator_url) == ("", "", "")
    assert alert.fingerprint == payload.label_fingerprint({"alertname": "x"})
    assert payload.parse(raw).alerts[0].annotations == {}


def test_lone_surrogates_are_replaced_so_they_can_be_stored() -> None:
    raw = b'{"alerts": [{"status": "firing", "labels": {"alertname": "x\\ud800y"}}]}'
    name = payload.parse(raw).alerts[0].labels["alertname"]
    assert name.encode("utf-8") and name.startswith("x") and name.endswith("y")


def test_ha_duplicates_share_a_digest_and_changes_do_not() -> None:
    first = payload.parse(body(alert(), alert(name="Other")))
    reordered = payload.parse(body(alert(name="Other"), alert()))
    resolved = payload.parse(body(alert(status="resolved"), alert(name="Other")))
    assert notification_digest(first) == notification_digest(reordered)
    assert notification_digest(first) != notification_digest(resolved)


# Policy ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("severity", "cooldown"), [("info", 4 * HOUR), ("warning", HOUR), ("critical", 15 * MIN), ("emergency", 5 * MIN)])
def test_cooldown_depends_on_severity(severity: str, cooldown: float) -> None:
    route = make_config().routes[0]
    a = parsed(severity=severity)
    decisions = run(route, [(0, a), (cooldown - 1, a), (1, a)], FakeClock())
    assert [d.action for d in decisions] == ["notify", "suppress", "notify"]


def test_route_cooldown_override() -> None:
    config = make_config(routes=[{"destinations": ["ops"], "cooldown": {"warning": "2m"}}])
    a = parsed()
    decisions = run(config.routes[0], [(0, a), (119, a), (1, a)], FakeClock())
    assert [d.action for d in decisions] == ["notify", "suppress", "notify"]


def test_escalating_cooldown_waits_longer_after_each_repeat() -> None:
    config = make_config(escalating_cooldown=["10m", "30m", "1h"], escalation={"after_repeats": 100})
    a = parsed()
    events = [(0, a), (10 * MIN, a), (29 * MIN, a), (1 * MIN, a), (59 * MIN, a), (1 * MIN, a), (59 * MIN, a), (1 * MIN, a)]
    actions = [d.action for d in run(config.routes[0], events, FakeClock())]
    assert actions == ["notify", "notify", "suppress", "notify", "suppress", "notify", "suppress", "notify"]


def test_escalation_after_n_repeats_within_the_window_adds_destinations_once() -> None:
    route = make_config().routes[0]  # after_repeats 3 within 1h -> pd
    a = parsed()
    decisions = run(route, [(0, a), (MIN, a), (MIN, a), (MIN, a)], FakeClock())
    assert [d.action for d in decisions] == ["notify", "suppress", "notify", "suppress"]
    assert decisions[2].escalated and decisions[2].level == 1
    assert decisions[2].destinations == ("ops", "pd")
    assert not decisions[3].escalated and decisions[3].level == 1


def test_repeats_spread_wider_than_the_window_do_not_escalate() -> None:
    route = make_config().routes[0]
    a = parsed()
    decisions = run(route, [(0, a), (40 * MIN, a), (40 * MIN, a), (40 * MIN, a)], FakeClock())
    assert all(d.level == 0 for d in decisions)


def test_escalation_after_firing_longer_than_t() -> None:
    config = make_config(escalation={"after_repeats": 100, "after_firing": "2h", "destinations": ["oncall"]})
    a = parsed()
    decisions = run(config.routes[0], [(0, a), (HOUR + 1, a), (HOUR, a)], FakeClock())
    assert [d.level for d in decisions] == [0, 0, 1]
    assert decisions[2].escalated and "oncall" in decisions[2].destinations


def test_info_never_escalates_unless_the_config_says_so() -> None:
    a = parsed(severity="info")
    events = [(0, a), *((MIN, a) for _ in range(4))]  # a warning seen this often escalates at the third
    chain = {"after_repeats": 3, "after_firing": "2h", "destinations": ["pd"]}
    decisions = run(make_config(escalation=chain).routes[0], [*events, (3 * HOUR, a)], FakeClock())
    assert [d.level for d in decisions] == [0] * 6  # neither by repeats nor by hours of firing
    assert all("pd" not in d.destinations for d in decisions)
    opted_in = make_config(escalation={**chain, "severities": ["info", "warning", "critical", "emergency"]})
    assert run(opted_in.routes[0], events, FakeClock())[2].level == 1


def test_a_severity_paged_at_once_must_be_one_that_escalates() -> None:
    with pytest.raises(relay_config.ConfigError, match=r"escalation.page_immediately: critical, emergency must also be in escalation.severities"):
        make_config(escalation={"after_repeats": 3, "destinations": ["pd"], "severities": ["warning"]})


def test_critical_pages_from_the_start() -> None:
    route = make_config().routes[0]
    decision = run(route, [(0, parsed(severity="critical"))], FakeClock())[0]
    assert decision.action == "notify" and decision.level == 1 and decision.destinations == ("ops", "pd")
    assert not decision.escalated  # paging at once is policy, not an escalation


def test_severity_change_notifies_despite_cooldown() -> None:
    route = make_config().routes[0]
    decisions = run(route, [(0, parsed()), (MIN, parsed(severity="critical"))], FakeClock())
    assert [d.action for d in decisions] == ["notify", "notify"]


def test_resolve_clears_state_and_tells_everyone_who_was_told() -> None:
    route = make_config().routes[0]
    clock = FakeClock()
    fired = run(route, [(0, parsed(severity="critical"))], clock)[0]
    resolved = decide(fired.state, parsed(status="resolved", severity="critical"), "k", clock(), route, "warning")
    assert resolved.action == "resolve" and resolved.state is None
    assert resolved.destinations == ("ops", "pd")
    again = decide(None, parsed(), "k", clock() + 1, route, "warning")
    assert again.action == "notify" and again.level == 0  # a new episode starts from scratch


def test_a_resolution_nobody_was_told_of_is_not_sent() -> None:
    route = make_config().routes[0]
    clock = FakeClock()
    fired = run(route, [(0, parsed())], clock)[0]
    resolved = decide(fired.state, parsed(status="resolved"), "k", clock(), route, "warning")
    assert resolved.destinations == ("ops",)
    # Alertmanager repeats the resolved alert in its next group notifications: silence.
    repeated = decide(resolved.state, parsed(status="resolved"), "k", clock() + 5, route, "warning")
    assert repeated.action == "resolve" and repeated.destinations == ()


def test_a_key_shared_by_several_alerts_ends_when_none_of_them_fires() -> None:
    # The team=ml route keys on alertname, instance and gpu; escalation is out of the way.
    config = make_config(escalation={"after_repeats": 10, "within": "1h", "destinations": ["pd"]})
    clock = FakeClock()
    states: dict[str, KeyState] = {}

    def deliver(*alerts: dict[str, object]) -> list[tuple[str, str]]:
        result = intake.plan(payload.parse(body(*alerts)), states, clock(), config)
        for key, state in result.states.items():
            if state is None:
                states.pop(key, None)
            else:
                states[key] = state
        return [(job.destination, job.notice.kind) for job in result.jobs]

    disk = lambda path, status="firing": alert("DiskUsageHigh", status=status, path=path, team="ml")  # noqa: E731
    assert deliver(disk("/a"), disk("/b")) == [("ops", "firing")]  # one key: one notification
    clock.advance(60)
    # /a recovers while /b still fires: the key stays, nothing resolves, the cooldown holds.
    assert deliver(disk("/a", "resolved"), disk("/b")) == []
    [state] = states.values()
    assert dict(state.labels) == {"alertname": "DiskUsageHigh", "instance": "node1:9945", "gpu": "0"}
    clock.advance(60)
    assert deliver(disk("/a", "resolved"), disk("/b", "resolved")) == [("ops", "resolved")]
    assert deliver(disk("/a", "resolved"), disk("/b", "resolved")) == []  # Alertmanager's repeat


def test_unknown_severity_uses_the_default() -> None:
    route = make_config().routes[0]
    decision = run(route, [(0, parsed(severity="bogus"))], FakeClock())[0]
    assert decision.severity == "warning"


# Watchdog --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("last_seen", "now", "state"),
    [(None, 100.0, "new"), (None, 131.0, "down"), (95.0, 100.0, "up"), (85.0, 100.0, "late"), (60.0, 100.0, "down")],
)
def test_heartbeat_states(last_seen: float | None, now: float, state: str) -> None:
    # Watching since 100: a heartbeat never seen is new for period + grace (30 s), then down.
    assert watchdog.heartbeat_state(last_seen, now, period=10, grace=20, since=100.0) == state


@pytest.mark.parametrize(
    ("previous", "current", "kind"),
    [("up", "down", "pipeline_down"), ("late", "down", "pipeline_down"), ("new", "down", "pipeline_down"),
     ("down", "up", "pipeline_up"), ("up", "late", None), ("late", "up", None), ("down", "down", None)],
)
def test_watchdog_announces_down_and_recovery_only(previous: str, current: str, kind: str | None) -> None:
    assert watchdog.announcement(previous, current) == kind


# Settings --------------------------------------------------------------------------------

def test_relay_refuses_to_start_without_credentials() -> None:
    with pytest.raises(settings.SettingsError, match="MLWARDEN_RELAY_TOKEN"):
        settings.load(RelaySettings, "relay", [], {})


def test_legacy_alert_cooldown_variable_and_token_file(tmp_path: relay_config.Path) -> None:
    token = tmp_path / "token"
    token.write_text("from-a-file\n")
    loaded = settings.load(RelaySettings, "relay", ["--state-url", "redis://127.0.0.1:6379/0"],
                           {"MLWARDEN_RELAY_TOKEN_FILE": str(token), "ALERT_COOLDOWN": "5m"})
    assert loaded.alert_cooldown == 300.0 and loaded.token == "from-a-file"
    assert loaded.listen_address == ("127.0.0.1", 9946)
