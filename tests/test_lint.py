"""ruff and mypy (strict) are clean on every package, with the configuration in pyproject.toml."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# Everything with Python in it: the installed packages and the code that tests, benches and deploys them.
LINTED = ["mlwarden", "exporter", "relay", "jobs", "bench", "dashboards", "deploy", "scripts", "tests"]
PACKAGES = ["mlwarden", "exporter", "relay", "jobs"]


def test_ruff_is_clean_everywhere() -> None:
    result = subprocess.run([str(BIN / "ruff"), "check", *LINTED], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean_on_the_whole_namespace() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "typecheck.py")], cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout
    # The link tree must hold the mapped folders, or "no issues" would mean "nothing checked".
    assert re.search(r"in (\d+) source files", result.stdout) and int(re.search(r"in (\d+) source files", result.stdout)[1]) > 100


def test_every_type_ignore_says_why() -> None:
    unexplained = [
        f"{path.relative_to(REPO)}:{number}"
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"# type: ignore(\[[^\]]*\])?\s*$", line)
    ]
    assert not unexplained, unexplained


def test_a_command_whose_run_takes_other_settings_is_a_type_error(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from dataclasses import dataclass\n"
        "from mlwarden.command import Command\n"
        "@dataclass(frozen=True)\nclass A:\n    x: int = 0\n"
        "@dataclass(frozen=True)\nclass B:\n    y: str = ''\n"
        "def run(settings: B) -> int:\n    return len(settings.y)\n"
        "COMMAND = Command('sample', settings=A, run=run)\n"
    )
    result = subprocess.run(
        [str(BIN / "mypy"), "--strict", "--cache-dir", str(tmp_path / "cache"), str(sample)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 1 and 'Argument "run" to "Command" has incompatible type' in result.stdout, result.stdout
