"""The one inbound credential check (mlwarden.auth), and proof that the relay and the exporter both use it."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest
from fastapi.testclient import TestClient
from mlwarden.exporter import webconfig
from mlwarden.exporter.app import Exporter
from mlwarden.relay.app import WEBHOOK_PATH, Relay, create_app
from mlwarden.relay.auth import Credentials
from mlwarden.relay.store.sqlite import SQLiteStore

from mlwarden import auth
from mlwarden.auth import AuthCheck
from tests.test_exporter_server import request, start_exporter  # noqa: F401  (start_exporter is a fixture)
from tests.test_relay_support import FakeClock, alert, body, make_config


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_tokens_and_settings_users_are_accepted_and_near_misses_refused() -> None:
    check = AuthCheck(tokens=("tok-en",), users={"am": "pass:with colon"})
    assert check.allows("Bearer tok-en") and check.allows(b"bearer tok-en") and check.allows("BEARER  tok-en ")
    assert check.allows(basic("am", "pass:with colon")) and check.allows(basic("am", "pass:with colon").encode())
    for header in ("Bearer tok-e", "Bearer tok-enx", "Bearer ", "tok-en", "", None, basic("am", "pass:with"),
                   basic("AM", "pass:with colon"), "Basic !!!",
                   "Digest tok-en", "Bearer tök-en"):
        assert not check.allows(header), header


def test_a_basic_user_does_not_open_the_bearer_door_nor_the_token_the_basic_one() -> None:
    check = AuthCheck(tokens=("secret",), users={"am": "secret"})
    assert not check.allows(basic("", "secret")) and not check.allows("Bearer am:secret")
    assert not AuthCheck().allows("Bearer ") and not AuthCheck(tokens=("",), users={"am": ""}).allows(basic("am", ""))
    assert not AuthCheck().accepts_basic and AuthCheck(users={"am": "x"}).accepts_basic


def test_secrets_are_kept_only_as_keyed_hashes() -> None:
    check = AuthCheck(tokens=("token-in-memory",), users={"am": "password-in-memory"})
    kept = repr(vars(check)).encode() + repr(check).encode()
    assert b"token-in-memory" not in kept and b"password-in-memory" not in kept
    assert repr(check) == "AuthCheck(***)" and repr(Credentials("t")) == "Credentials(***)"
    # The key is made per instance: two checks of the same secret keep different digests.
    assert AuthCheck(tokens=("same",))._tokens != AuthCheck(tokens=("same",))._tokens


def test_every_candidate_is_compared_even_after_a_match(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[bytes] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    check = AuthCheck(users={"first": "one", "second": "two", "third": "three"})
    assert check.allows(basic("first", "one"))
    assert len(compared) == 3
    assert not check.allows(basic("nobody", "x")) and len(compared) == 6


def test_bcrypt_users_unknown_names_pay_bcrypt_too_and_outcomes_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    hashed = bcrypt.hashpw(b"scrape-secret", bcrypt.gensalt(rounds=4))
    check = AuthCheck(bcrypt_users={"prometheus": hashed})
    checked: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed_password: bytes) -> bool:
        checked.append(hashed_password)
        return real(password, hashed_password)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    assert check.allows(basic("prometheus", "scrape-secret"))
    assert check.allows(basic("prometheus", "scrape-secret"))
    assert checked == [hashed]  # the second scrape was answered from memory
    assert not check.allows(basic("nobody", "scrape-secret"))
    assert len(checked) == 2 and checked[1] != hashed  # an unknown user still costs one bcrypt check
    assert not check.allows(basic("prometheus", "x" * 100))  # too long for bcrypt: refused, not an error
    assert not check.allows(b"Basic " + base64.b64encode(b"\xff\xfe:scrape-secret"))


def test_a_user_cannot_have_both_a_password_and_a_bcrypt_hash() -> None:
    with pytest.raises(ValueError, match="user\\(s\\) am given both"):
        AuthCheck(users={"am": "x"}, bcrypt_users={"am": bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=4))})


def test_the_relay_and_the_exporter_both_go_through_the_shared_check(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, start_exporter: Callable[..., Exporter]) -> None:  # noqa: F811
    seen: list[str] = []
    real = AuthCheck.allows

    def spy(self: AuthCheck, authorization: str | bytes | None) -> bool:
        seen.append(type(self).__name__)
        return real(self, authorization)

    monkeypatch.setattr(AuthCheck, "allows", spy)

    relay = Relay(make_config(), SQLiteStore(tmp_path / "relay.db"), Credentials("relay-token"), clock=FakeClock())
    with TestClient(create_app(relay, background=False)) as client:
        assert client.post(WEBHOOK_PATH, content=body(alert()), headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.post(WEBHOOK_PATH, content=body(alert()),
                           headers={"Authorization": "Bearer relay-token"}).status_code == 200
    assert seen == ["Credentials", "Credentials"]

    exporter = start_exporter("--basic-auth-user", "prom", environ={"MLWARDEN_EXPORTER_BASIC_AUTH_PASSWORD": "s3cret"})
    url = f"http://127.0.0.1:{exporter.port}/metrics"
    assert request(url, headers={"Authorization": basic("prom", "nope")})[0] == 401
    assert request(url, headers={"Authorization": basic("prom", "s3cret")})[0] in (200, 503)
    assert seen[2:] == ["AuthCheck", "AuthCheck"]

    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prom: '{bcrypt.hashpw(b's3cret', bcrypt.gensalt(rounds=4)).decode()}'\n")
    web = webconfig.load(config)
    assert isinstance(web.auth, AuthCheck) and web.auth.allows(basic("prom", "s3cret"))


def test_bcrypt_is_loaded_only_for_bcrypt_users() -> None:
    """The exporter keeps heavy modules out unless --web.config.file needs them."""
    code = ("import sys; from mlwarden.auth import AuthCheck; "
            "AuthCheck(tokens=('t',), users={'u': 'p'}).allows('Bearer t'); print('bcrypt' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.strip() == "False"
