"""The collector registry: each collector's module registers it, and the exporter's switches,
settings, dispatcher and docs table are made from the registrations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from mlwarden.exporter.app import collectors_for
from mlwarden.exporter.backends import open_backend
from mlwarden.exporter.backends.supervisor import BackendSupervisor
from mlwarden.exporter.cli import ExporterSettings
from mlwarden.exporter.collectors import base
from mlwarden.exporter.collectors.base import CollectorSpec, NoSettings, collectors_table, register, registered

from mlwarden.settings import SettingsError, load, options_of, setting

EXPECTED = {"artifacts", "backups", "gpu", "jobs", "process", "processes", "xid"}


def built(*argv: str, environ: dict[str, str] | None = None) -> set[str]:
    settings = load(ExporterSettings, "exporter", ["--gpu-backend", "simulated", *argv], environ or {})
    return {collector.name for collector in collectors_for(settings, BackendSupervisor(open_backend("simulated", 1, 1)))}


def test_every_collector_module_registers_its_collector() -> None:
    assert {spec.name for spec in registered()} == EXPECTED
    for spec in registered():
        assert spec.factory.__module__ == f"mlwarden.exporter.collectors.{spec.name}"


def test_each_registration_makes_today_s_switch_flag_and_variable() -> None:
    options = {opt.name: opt for opt in options_of(ExporterSettings, "exporter")}
    for spec in registered():
        switch = options[spec.switch]
        assert switch.flag == f"--collector-{spec.name}"
        assert switch.env_names == (f"MLWARDEN_EXPORTER_COLLECTOR_{spec.name.upper()}",)
        assert switch.default is spec.default and spec.help in switch.spec.help
        assert f"`--collector-{spec.name}` / `--no-collector-{spec.name}`" in collectors_table()


def test_collectors_own_settings_keep_their_flags_and_legacy_variables(tmp_path: Path) -> None:
    options = {opt.name: opt for opt in options_of(ExporterSettings, "exporter")}
    assert options["backup_dir"].env_names == ("MLWARDEN_EXPORTER_BACKUP_DIR", "BACKUP_DIR")
    assert options["experiments_dir"].env_names == ("MLWARDEN_EXPORTER_EXPERIMENTS_DIR", "EXPERIMENTS_DIR")
    assert options["max_processes"].flag == "--max-processes"
    settings = load(ExporterSettings, "exporter", ["--max-processes", "7"],
                    {"BACKUP_DIR": str(tmp_path), "EXPERIMENTS_DIR": f"{tmp_path}/a,{tmp_path}/b"})
    assert (settings.backup_dir, settings.experiments_dir, settings.max_processes) == (tmp_path, [tmp_path / "a", tmp_path / "b"], 7)
    with pytest.raises(SettingsError, match="--max-processes"):
        load(ExporterSettings, "exporter", ["--max-processes", "-1"], {})


def test_the_dispatcher_builds_what_the_switches_and_settings_ask_for(tmp_path: Path) -> None:
    assert built() == {"gpu", "jobs", "process", "processes", "xid"}  # backups and artifacts have nothing to read
    assert built("--backup-dir", str(tmp_path), "--experiments-dir", str(tmp_path)) == EXPECTED
    for name in EXPECTED:
        left = built(f"--no-collector-{name}", "--backup-dir", str(tmp_path), "--experiments-dir", str(tmp_path))
        assert left == EXPECTED - {name}, name
    assert built(environ={"MLWARDEN_EXPORTER_COLLECTOR_GPU": "false"}) == {"jobs", "process", "processes", "xid"}
    # node_exporter's spelling works too, and wins over the environment like any flag.
    assert built("--no-collector.gpu", "--no-collector.xid") == {"jobs", "process", "processes"}
    assert built("--collector.gpu", environ={"MLWARDEN_EXPORTER_COLLECTOR_GPU": "false"}) == {"gpu", "jobs", "process", "processes", "xid"}


def test_a_mistyped_switch_gets_a_suggestion() -> None:
    with pytest.raises(SettingsError, match=r"did you mean --no-collector\.xid\?"):
        load(ExporterSettings, "exporter", ["--no-collector.xdi"], {})


def _spec(name: str, settings: type = NoSettings) -> CollectorSpec[object]:
    return CollectorSpec(name, "a test collector", lambda _settings, _context: None, settings)


def test_a_name_registered_by_two_modules_is_refused() -> None:
    with pytest.raises(ValueError, match=f"'gpu' is registered by mlwarden.exporter.collectors.gpu and {__name__}$"):
        register(_spec("gpu"))


def test_an_own_setting_that_another_part_has_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclasses.dataclass(frozen=True)
    class Clashing:
        interval: float = setting(1.0, help="the exporter's --interval already")

    monkeypatch.setattr(base, "registered", lambda: (_spec("extra", Clashing),))
    with pytest.raises(ValueError, match="collector 'extra' declares the setting 'interval'"):
        base.with_collector_settings(ExporterSettings.__mro__[1])


def test_a_new_registration_brings_its_switch_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclasses.dataclass(frozen=True)
    class Own:
        extra_depth: int = setting(3, help="how deep")

    monkeypatch.setattr(base, "registered", lambda: (*registered(), _spec("extra", Own)))
    composed = base.with_collector_settings(ExporterSettings.__mro__[1])
    flags = {opt.flag for opt in options_of(composed, "exporter")}
    assert {"--collector-extra", "--extra-depth", "--collector-gpu"} <= flags
    assert load(composed, "exporter", ["--no-collector-extra", "--extra-depth", "5"], {}).extra_depth == 5
