from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from mlwarden import logs, settings
from mlwarden.settings import SettingsError, setting


@dataclasses.dataclass(frozen=True)
class Example:
    model_dir: Path = setting(help="models", env=("MODEL_DIR",))
    level: int = setting(3, help="level", env=("COMPRESSION_LEVEL",), parse=settings.in_range(int, 1, 19))
    verify: bool = setting(True, help="verify", env=("VERIFY_BACKUP",))
    dirs: list[Path] = setting(help="dirs", default_factory=list)
    mode: str = setting("zstd", help="mode", choices=("zstd", "gzip"))
    token: str | None = setting(None, help="token", secret=True)
    max_bytes: int = setting(500 * 10**9, help="bytes", parse=settings.parse_size)


def test_flag_beats_primary_env_beats_legacy_env_beats_default() -> None:
    env = {"MODEL_DIR": "/legacy", "MLWARDEN_T_LEVEL": "5", "COMPRESSION_LEVEL": "9"}
    s = settings.load(Example, "t", ["--model-dir", "/flag"], env)
    assert s.model_dir == Path("/flag")
    assert s.level == 5
    s = settings.load(Example, "t", [], env)
    assert s.model_dir == Path("/legacy")
    assert s.verify is True and s.mode == "zstd"


def test_bool_list_size_and_choices() -> None:
    s = settings.load(
        Example, "t", ["--model-dir", "/m", "--no-verify", "--dirs", "/a", "--dirs", "/b", "--max-bytes", "1.5GiB"], {}
    )
    assert s.verify is False
    assert s.dirs == [Path("/a"), Path("/b")]
    assert s.max_bytes == int(1.5 * 2**30)
    s = settings.load(Example, "t", [], {"MODEL_DIR": "/m", "VERIFY_BACKUP": "no", "MLWARDEN_T_DIRS": "/x,/y"})
    assert s.verify is False and s.dirs == [Path("/x"), Path("/y")]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MODEL_DIR": "/m", "COMPRESSION_LEVEL": "abc"}, "invalid COMPRESSION_LEVEL='abc': expected a whole number"),
        ({"MODEL_DIR": "/m", "COMPRESSION_LEVEL": "40"}, "must be from 1 to 19"),
        ({"MODEL_DIR": "/m", "VERIFY_BACKUP": "maybe"}, "invalid VERIFY_BACKUP='maybe'"),
        ({"MODEL_DIR": "/m", "MLWARDEN_T_MODE": "lz4"}, "expected one of zstd, gzip"),
        ({}, "--model-dir or MLWARDEN_T_MODEL_DIR is required"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace("[", r"\[")):
        settings.load(Example, "t", [], env)


def test_secret_from_file_is_never_a_flag_and_is_masked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text("s3cr3t-token-value\n")
    s = settings.load(Example, "t", [], {"MODEL_DIR": "/m", "MLWARDEN_T_TOKEN_FILE": str(secret_file)})
    assert s.token == "s3cr3t-token-value"
    with pytest.raises(SettingsError):
        settings.load(Example, "t", ["--token", "x"], {"MODEL_DIR": "/m"})
    assert "s3cr3t" not in logs.redact("token is s3cr3t-token-value")


def test_unreadable_secret_file_is_a_clear_error() -> None:
    with pytest.raises(SettingsError, match="cannot read MLWARDEN_T_TOKEN_FILE"):
        settings.load(Example, "t", [], {"MODEL_DIR": "/m", "MLWARDEN_T_TOKEN_FILE": "/nonexistent/token"})


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("15m", 900), ("1h30m", 5400), ("2.5", 2.5), ("500ms", 0.5)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert settings.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "5x", "-3s"])
def test_parse_duration_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        settings.parse_duration(text)


def test_parse_listen_address() -> None:
    assert settings.parse_listen_address("127.0.0.1:9945") == ("127.0.0.1", 9945)
    assert settings.parse_listen_address(":9945") == ("0.0.0.0", 9945)
    assert settings.parse_listen_address("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        settings.parse_listen_address("localhost")
    with pytest.raises(ValueError):
        settings.parse_listen_address("host:70000")


def test_cli_exits_2_with_one_line_naming_the_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mlwarden.cli", "exporter", "--log-level", "loud"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "--log-level" in result.stderr


def test_cli_without_command_prints_help_and_exits_2() -> None:
    result = subprocess.run([sys.executable, "-m", "mlwarden.cli"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "exporter" in result.stderr and "backup" in result.stderr
