"""The command registry: commands declare themselves where they are defined, and nothing else lists them."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlwarden import cli, docgen, registry
from mlwarden.exitcodes import ExitCode

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("mlwarden", "exporter", "relay", "jobs")
# The long-running services are commands too, but naming them is the health check's job
# (jobs/health/services.py probes each one's endpoint); jobs and tools must never be listed.
SERVICES = {"exporter", "relay"}


def test_every_declared_command_loads_as_the_command_its_table_names() -> None:
    entries = registry.entries()
    assert {"exporter", "relay", "backup", "restore", "cleanup", "health", "maintain", "demo"} <= set(entries)
    for name, entry in entries.items():
        assert entry.load().name == name
        assert entry.help and "\n" not in entry.help


def test_the_maintain_plan_comes_from_the_tables() -> None:
    assert [entry.name for entry in registry.maintain_plan()] == ["health", "backup", "cleanup"]


def test_top_level_help_imports_no_command_module() -> None:
    modules = sorted({entry.module for entry in registry.entries().values()})
    probe = (
        "import json, sys\n"
        "from mlwarden import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps([m for m in {modules!r} if m in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.splitlines()[-1]) == []
    assert "check disks, GPUs, services and backup freshness" in result.stdout


@pytest.fixture
def extra_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A package searched by the registry, where a test can add command modules."""
    package = tmp_path / "extra_commands"
    package.mkdir()
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "ROOTS", (*registry.ROOTS, "extra_commands"))
    registry.entries.cache_clear()
    yield package
    registry.entries.cache_clear()
    for name in [m for m in sys.modules if m.startswith("extra_commands")]:
        del sys.modules[name]


NEW_JOB = '''
from dataclasses import dataclass
from mlwarden.command import Command
from mlwarden.settings import setting

RAN = []

@dataclass(frozen=True)
class NightlySettings:
    depth: int = setting(1, help="how deep")

def run(settings: NightlySettings) -> int:
    RAN.append(settings.depth)
    return 0

MLWARDEN_COMMANDS = (
    {"name": "nightly", "attribute": "COMMAND", "help": "a job added as one file",
     "maintain": {"order": 15}},
)

COMMAND = Command("nightly", settings=NightlySettings, run=run)
'''


def test_a_new_job_is_one_file(extra_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from mlwarden.jobs import maintain

    (extra_root / "nightly.py").write_text(NEW_JOB)
    # The dispatcher and its help ...
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "a job added as one file" in capsys.readouterr().out
    assert cli.main(["nightly", "--depth", "3"]) == ExitCode.OK
    from extra_commands import nightly  # type: ignore[import-not-found]  # written by this test

    assert nightly.RAN == [3]
    # ... the maintain plan, between health (10) and backup (20), with its own switch ...
    assert [e.name for e in registry.maintain_plan()] == ["health", "nightly", "backup", "cleanup"]
    plan_settings = maintain._plan_settings()
    assert "run_nightly" in plan_settings.__dataclass_fields__
    ran: list[str] = []
    monkeypatch.setattr(maintain, "run_task", lambda name, environ: ran.append(name) or maintain.Outcome(name, "ok", 0, 0.0, ""))
    switches = {"run_health_check": False, "run_backup": False, "run_cleanup": False, "run_nightly": True}
    assert maintain.run(plan_settings(**switches), {}) == ExitCode.OK
    assert ran == ["nightly"]
    # ... and the generated docs.
    assert "`--depth`" in docgen.blocks()["nightly"]


def test_a_malformed_or_duplicate_table_is_a_clear_error(extra_root: Path) -> None:
    (extra_root / "broken.py").write_text('MLWARDEN_COMMANDS = (\n    {"name": "broken"},\n)\n')
    with pytest.raises(registry.RegistryError, match="broken.*malformed"):
        registry.entries()
    (extra_root / "broken.py").write_text('MLWARDEN_COMMANDS = (\n    {"name": "backup", "attribute": "X", "help": "h"},\n)\n')
    registry.entries.cache_clear()
    with pytest.raises(registry.RegistryError, match="'backup' is declared by"):
        registry.entries()
    (extra_root / "broken.py").write_text('MLWARDEN_COMMANDS = (\n    {"name": f"x{1}"},\n)\n')
    registry.entries.cache_clear()
    with pytest.raises(registry.RegistryError, match="literal"):
        registry.entries()


def _string_collections(path: Path) -> Iterator[tuple[int, set[str]]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        items: list[ast.expr | None] = []
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = list(node.elts)
        elif isinstance(node, ast.Dict):
            items = list(node.keys)
        strings = {item.value for item in items if isinstance(item, ast.Constant) and isinstance(item.value, str)}
        yield node.lineno if hasattr(node, "lineno") else 0, strings


def test_no_source_file_lists_the_commands() -> None:
    """Adding a job is one file: no dispatcher table, plan, or docs generator names two commands in one literal."""
    names = set(registry.entries()) - SERVICES
    offenders = []
    for directory in SOURCE_DIRS:
        for path in sorted((REPO / directory).rglob("*.py")):
            for line, strings in _string_collections(path):
                if len(strings & names) >= 2:
                    offenders.append(f"{path.relative_to(REPO)}:{line}: {sorted(strings & names)}")
    assert offenders == []


def test_the_contributing_recipe_for_a_job_is_what_the_registry_reads(extra_root: Path) -> None:
    """CONTRIBUTING.md's snippets, filled in, make a job the dispatcher, plan and heartbeat know."""
    section = (REPO / "CONTRIBUTING.md").read_text().split("## Add a job", 1)[1].split("\n## ", 1)[0]
    schedule, table = (
        "\n".join(line.strip() for line in block.strip("\n").splitlines())
        for block in re.findall(r"```python\n(.*?)```", section, re.S)
    )
    source = (
        "from dataclasses import dataclass\n"
        "from pathlib import Path\n"
        "from mlwarden.command import Command\n"
        "from mlwarden.jobs.report import (PUSHGATEWAY_ENV, JobReport, expected_interval_setting, grace_setting,\n"
        "    late_severity_setting, schedule_of, timeout_setting)\n"
        "from mlwarden.settings import setting\n"
        "@dataclass(frozen=True)\nclass CompactSettings:\n"
        "    pushgateway: str | None = setting(None, help='p', env=(PUSHGATEWAY_ENV,))\n"
        "    textfile_dir: Path | None = setting(None, help='t')\n"
        + "".join(f"    {line}\n" for line in schedule.splitlines())
        + "def run(settings):\n"
        "    with JobReport('compact', textfile_dir=settings.textfile_dir, schedule=schedule_of(settings)) as report:\n"
        "        report.succeeded()\n"
        "    return 0\n"
        + table.replace("<name>", "compact").replace("<Name>", "Compact").replace('"..."', '"compacts"')
    )
    (extra_root / "compact.py").write_text(source)
    assert [entry.name for entry in registry.maintain_plan()] == ["health", "backup", "compact", "cleanup"]
    assert registry.heartbeats()["compact"].name == "compact"  # the exporter expects it too
    textfiles = extra_root / "textfiles"
    textfiles.mkdir()
    assert cli.main(["compact", "--textfile-dir", str(textfiles)]) == ExitCode.OK
    text = (textfiles / "mlwarden_compact.prom").read_text()
    assert 'mlwarden_job_expected_interval_seconds{severity="warning"} 86400.0' in text
    assert "mlwarden_job_last_success_timestamp_seconds " in text
