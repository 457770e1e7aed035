"""relay.yml like Alertmanager's: matchers, one schema (and its JSON Schema), check-config, reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from fastapi.testclient import TestClient
from mlwarden.relay import config as relay_config
from mlwarden.relay.app import WEBHOOK_PATH, Relay, create_app
from mlwarden.relay.auth import Credentials
from mlwarden.relay.config import Matcher
from mlwarden.relay.store.sqlite import SQLiteStore

from mlwarden import components
from tests.test_relay_e2e import RelayProcess, sink  # noqa: F401 (fixture)
from tests.test_relay_support import ENV, TOKEN, FakeClock, Sink, alert, body, config_dict

MLWARDEN = str(Path(sys.executable).parent / "mlwarden")
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("text", "labels", "matches"), [
    ('alertname="GpuHot"', {"alertname": "GpuHot"}, True),
    ('alertname = GpuHot', {"alertname": "GpuHot"}, True),  # unquoted, spaced
    ('severity=~"critical|emergency"', {"severity": "critical"}, True),
    ('severity=~"crit"', {"severity": "critical"}, False),  # anchored, as in Alertmanager
    ('team!="ml"', {}, True),  # a missing label is empty
    ('team!~"m.*"', {"team": "ml"}, False),
    ('summary="say \\"hi\\", a\\\\b"', {"summary": 'say "hi", a\\b'}, True),
    ('job=""', {}, True),
])
def test_matchers_follow_alertmanagers_syntax(text: str, labels: dict[str, str], matches: bool) -> None:
    assert Matcher.parse(text).matches(labels) is matches


def test_the_shipped_alertmanager_configs_matchers_parse() -> None:
    shipped = yaml.safe_load((REPO / "alerts" / "alertmanager.yml").read_text())
    found = [m for route in shipped["route"]["routes"] for m in route.get("matchers", [])]
    found += [m for rule in shipped.get("inhibit_rules", []) for key in ("source_matchers", "target_matchers")
              for m in rule.get(key, [])]
    assert found and all(Matcher.parse(m) for m in found)


def test_routes_take_matchers_and_keep_match_and_match_re() -> None:
    config = relay_config.parse(config_dict(routes=[
        {"matchers": ['alertname=~"Gpu.*"', 'severity!="info"'], "match": {"team": "ml"}, "destinations": ["oncall"]},
        {"match_re": {"alertname": "Disk.*"}, "destinations": ["pd"]},
        {"destinations": ["ops"]},
    ]), ENV)
    assert config.route_for({"alertname": "GpuHot", "team": "ml", "severity": "warning"}).destinations == ("oncall",)
    assert config.route_for({"alertname": "GpuHot", "team": "ml", "severity": "info"}).destinations == ("ops",)
    assert config.route_for({"alertname": "DiskFull"}).destinations == ("pd",)


@pytest.mark.parametrize(("change", "message"), [
    ({"routes": [{"matchers": ["alertname~GpuHot"], "destinations": ["ops"]}]}, "routes[0].matchers[0]: not a matcher"),
    ({"routes": [{"matchers": ['a=~"("'], "destinations": ["ops"]}]}, "routes[0].matchers[0]: not a valid regular"),
    ({"routes": [{"matchers": ['a="open'], "destinations": ["ops"]}]}, "unterminated quoted value"),
    ({"delivery": {"max_alerts_per_message": 49}}, "delivery.max_alerts_per_message: at most 48"),
    ({"routes": [{"destinations": "ops"}]}, "routes[0].destinations: input should be a valid list"),
    ({"default_severity": "fatal"}, "default_severity: input should be 'info', 'warning', 'critical' or 'emergency'"),
])
def test_schema_errors_are_one_line_naming_the_key(change: dict[str, object], message: str) -> None:
    with pytest.raises(relay_config.ConfigError) as caught:
        relay_config.parse(config_dict(**change), ENV)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_json_schema_accepts_the_example_and_refuses_a_typo() -> None:
    schema = relay_config.json_schema()
    example = yaml.safe_load((REPO / "relay" / "relay.example.yml").read_text())
    jsonschema.validate(example, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**example, "routes": [{"destinatons": ["ops-slack"]}]}, schema)


def check_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MLWARDEN, "relay", "check-config", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_check_config_exits_0_for_a_valid_file_and_2_with_one_line_for_an_invalid_one(tmp_path: Path) -> None:
    good = tmp_path / "relay.yml"
    good.write_text(yaml.safe_dump(config_dict()))
    ok = check_config("--config", str(good), env=ENV)
    assert ok.returncode == 0 and "valid (3 destination(s), 2 route(s))" in ok.stdout
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(config_dict(cooldown={"warning": "soon"})))
    refused = check_config("--config", str(bad), env=ENV)
    assert refused.returncode == 2
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith(f"{bad}: invalid: cooldown.warning: expected a duration such as 30s or 15m")
    schema = check_config("--json-schema")
    assert schema.returncode == 0 and json.loads(schema.stdout)["properties"]["routes"]


def test_post_reload_uses_a_valid_file_and_refuses_an_invalid_one(tmp_path: Path) -> None:
    path = tmp_path / "relay.yml"
    path.write_text(yaml.safe_dump(config_dict()))
    relay = Relay(relay_config.load(path, ENV), SQLiteStore(tmp_path / "relay.db"), Credentials(TOKEN),
                  clock=FakeClock(), load_config=lambda: relay_config.load(path, ENV))
    with TestClient(create_app(relay, background=False)) as client:
        assert client.post("/-/reload").status_code == 401
        path.write_text(yaml.safe_dump(config_dict(routes=[{"destinations": ["oncall"]}])))
        reloaded = client.post("/-/reload", headers=AUTH)
        assert reloaded.status_code == 200 and reloaded.json()["routes"] == 1
        posted = client.post(WEBHOOK_PATH, content=body(alert(), group_key="1"), headers=AUTH).json()
        assert posted["jobs"] == 1 and relay.store.jobs()[0].destination == "oncall"
        path.write_text(yaml.safe_dump(config_dict(routes=[{"destinations": ["nowhere"]}])))
        refused = client.post("/-/reload", headers=AUTH)
        assert refused.status_code == 400 and "unknown destination 'nowhere'" in refused.json()["error"]
        assert relay.config.routes[0].destinations == ("oncall",)  # the running config stays


def test_sighup_reloads_a_running_relay_and_keeps_it_on_an_invalid_file(tmp_path: Path, sink: Sink) -> None:  # noqa: F811
    relay = RelayProcess(tmp_path, sink).start()
    try:
        config = yaml.safe_load((tmp_path / "relay.yml").read_text())
        config["routes"][0]["destinations"] = ["ops", "pd"]  # warnings page too, after the reload
        (tmp_path / "relay.yml").write_text(yaml.safe_dump(config))
        relay.component.reload()  # SIGHUP
        components.wait_until(lambda: "relay config reloaded" in relay.component.log_tail(200), 10, "the reload")
        assert relay.post(body(alert(name="AfterReload"), group_key="after")) == 200
        components.wait_until(lambda: sink.delivered("/pd"), 20, "the warning paged under the new config")
        (tmp_path / "relay.yml").write_text("routes: [")
        relay.component.reload()
        components.wait_until(lambda: "not reloaded, the running one stays" in relay.component.log_tail(200), 10, "refusal")
        assert relay.post(body(alert(name="StillRunning"), group_key="still")) == 200
        components.wait_until(lambda: len(sink.delivered("/pd")) == 2, 20, "the old (reloaded) config still in use")
    finally:
        relay.stop()
