"""Log formats, UTC timestamps, journald detection, the uvicorn policy and repeated-error limiting."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlwarden.relay import app as app_module
from mlwarden.relay import outbox as outbox_module
from mlwarden.relay.app import Relay
from mlwarden.relay.auth import Credentials
from mlwarden.relay.store.base import StoreError
from mlwarden.relay.store.redis import RedisStore

from mlwarden import cli, components, logs
from tests.test_relay_support import FakeClock, make_config

# 2026-11-29T18:00:00.123Z
CREATED = 1795975200.123


def record(msg: str = "disk %s is full", *args: object, level: int = logging.ERROR, name: str = "mlwarden.test") -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, msg, args or ("/data",), None)
    rec.created = CREATED
    rec.msecs = 123.0
    return rec


@pytest.fixture
def root_logging() -> Iterator[None]:
    """logs.setup replaces the root handlers; give pytest's back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def test_text_lines_carry_a_utc_rfc3339_timestamp_with_zone() -> None:
    assert logs.TextFormatter().format(record()) == "2026-11-29T18:00:00.123Z ERROR mlwarden.test: disk /data is full"


def test_logfmt_quotes_only_what_needs_it_and_stays_on_one_line() -> None:
    line = logs.LogfmtFormatter().format(record('said "no"\nthen %s', "x=y"))
    assert line == r'ts=2026-11-29T18:00:00.123Z level=error logger=mlwarden.test msg="said \"no\"\nthen x=y"'
    assert "\n" not in line


def test_json_lines_hold_the_traceback_as_a_field() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = record()
        rec.exc_info = sys.exc_info()
    doc = json.loads(logs.JsonFormatter().format(rec))
    assert doc["ts"] == "2026-11-29T18:00:00.123Z" and doc["level"] == "error" and doc["msg"] == "disk /data is full"
    assert "RuntimeError: boom" in doc["exc"]


def test_formats_keep_secrets_masked(root_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.register_secret("hunter2-webhook-secret")
    logs.setup("info", None, "json")
    try:
        raise ValueError("token hunter2-webhook-secret refused")
    except ValueError:
        logging.getLogger("mlwarden.test").exception("post to %s failed", "https://x/hunter2-webhook-secret")
    line = capsys.readouterr().err.strip()
    assert "hunter2" not in line
    doc = json.loads(line)
    assert doc["msg"] == "post to https://x/*** failed" and "ValueError: token *** refused" in doc["exc"]


SCRIPT = "import logging; from mlwarden import logs; logs.setup('info', None, '{fmt}'); logging.getLogger('t').warning('hi there')"


def test_a_secret_containing_another_is_masked_whole() -> None:
    """A relay token "from-a-file" must not leave "-secret" of "from-a-file-secret" in a log line."""
    longest = "overlap-secret-0123456789"
    for length in range(4, len(longest) + 1):  # every prefix is a secret too, registered in any order
        logs.register_secret(longest[:length])
    assert logs.redact(f"x {longest} y") == "x *** y"


@pytest.mark.parametrize("fmt", logs.FORMATS)
def test_no_timestamp_when_stderr_is_the_journal_stream(tmp_path: Path, fmt: str) -> None:
    err_path = tmp_path / "stderr"
    with err_path.open("w") as err:
        st = os.fstat(err.fileno())
        for journal_stream, stamped in ((f"{st.st_dev}:{st.st_ino}", False), (f"{st.st_dev}:{st.st_ino + 1}", True)):
            env = {**os.environ, "JOURNAL_STREAM": journal_stream}
            err.seek(0)
            err.truncate()
            subprocess.run([sys.executable, "-c", SCRIPT.format(fmt=fmt)], stderr=err, env=env, check=True, timeout=60)
            line = err_path.read_text().strip()
            assert "hi there" in line
            assert ("Z " in line or 'Z"' in line) is stamped, line


def test_log_format_is_a_common_option_and_an_environment_variable(
    root_logging: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLWARDEN_LOG_FORMAT", "logfmt")
    monkeypatch.setenv("MLWARDEN_RELAY_TOKEN", "a-token-for-the-test")
    # a relay config that does not exist: logged as an error once logging is set up, then exit 2
    assert cli.main(["relay", "--config", str(tmp_path / "missing.yml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("ts=") and " level=error logger=mlwarden.relay" in line for line in err), err
    assert cli.main(["relay", "--log-format", "json", "--config", str(tmp_path / "missing.yml")]) == 2
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["level"] == "error"
    monkeypatch.setenv("MLWARDEN_LOG_FORMAT", "xml")
    assert cli.main(["relay", "--config", str(tmp_path / "missing.yml")]) == 2
    assert "MLWARDEN_LOG_FORMAT" in capsys.readouterr().err


def test_both_servers_use_one_uvicorn_policy(root_logging: None) -> None:
    logs.setup("info")
    assert logs.uvicorn_options() == {"log_config": None, "access_log": False, "log_level": logging.WARNING}
    logs.setup("debug")
    assert logs.uvicorn_options()["log_level"] == logging.DEBUG
    for path in ("relay/cli.py",):  # the exporter's own small server does not log through uvicorn
        text = (Path(__file__).resolve().parent.parent / path).read_text()
        assert "**logs.uvicorn_options()" in text and "log_config=None" not in text, path


def test_repeat_filter_passes_the_first_then_one_summary_per_interval() -> None:
    clock = FakeClock()
    limiter = logs.RepeatFilter(interval=60, clock=clock)
    passed = []
    for i in range(26):  # the 26 lines in 6 s
        rec = record("cannot claim jobs: %s", f"error {i}")
        if limiter.filter(rec):
            passed.append(rec.getMessage())
        clock.advance(6 / 26)
    assert passed == ["cannot claim jobs: error 0"]
    clock.advance(60)
    rec = record("cannot claim jobs: %s", "error 26")
    assert limiter.filter(rec)
    assert rec.getMessage() == "cannot claim jobs: error 26 (25 more like this in the last 66s)"
    # other templates, other levels and info lines are counted apart or not at all
    assert limiter.filter(record("prune: %s", "x"))
    assert limiter.filter(record("cannot claim jobs: %s", "x", level=logging.WARNING))
    assert all(limiter.filter(record("delivered %s", "x", level=logging.INFO)) for _ in range(3))


def test_repeat_filter_with_about_limits_only_records_about_those_errors() -> None:
    limiter = logs.RepeatFilter(about=(StoreError,), clock=FakeClock())
    assert limiter.filter(record("store: %s", StoreError("down")))
    assert not limiter.filter(record("store: %s", StoreError("down")))
    assert all(limiter.filter(record("dead-lettered %s", "x")) for _ in range(3))


def test_a_relay_with_redis_down_logs_the_claim_error_once_not_on_every_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    limiter = next(f for f in outbox_module.log.filters if isinstance(f, logs.RepeatFilter))
    # the module's own limiter, on a clock the test moves and without what other tests left in it
    monkeypatch.setattr(limiter, "_clock", clock)
    monkeypatch.setattr(limiter, "_runs", {})
    claims: list[float] = []

    class CountingRedis(RedisStore):
        def claim(self, *args: Any) -> Any:
            claims.append(clock())
            return super().claim(*args)

    store = CountingRedis(f"redis://127.0.0.1:{components.free_port()}/0")  # nothing listens: Redis is down
    relay = Relay(make_config(), store, Credentials("t"), clock=clock)

    async def passes(count: int) -> None:
        outbox = relay.start_outbox()
        task = asyncio.create_task(outbox.run(tick=0.001))
        while len(claims) < count:
            await asyncio.sleep(0.005)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert relay.http is not None
        await relay.http.aclose()

    caplog.set_level(logging.ERROR, logger="mlwarden.relay.outbox")
    asyncio.run(passes(30))
    errors = [r.getMessage() for r in caplog.records if r.name == "mlwarden.relay.outbox"]
    assert len(claims) >= 30 and len(errors) == 1 and "cannot claim jobs: Redis:" in errors[0]
    clock.advance(61)
    caplog.clear()
    before = len(claims)
    asyncio.run(passes(before + 3))
    errors = [r.getMessage() for r in caplog.records if r.name == "mlwarden.relay.outbox"]
    assert len(errors) == 1 and f"({before - 1} more like this in the last 61s)" in errors[0]
    # the watchdog and prune loops share the store: their errors are limited the same way
    assert any(isinstance(f, logs.RepeatFilter) and f.about == (StoreError,) for f in app_module.log.filters)
