"""The Grafana dashboards: generated JSON is current and importable (datasource variable,
unique panel ids, units), and every panel query returns data from a real Prometheus that
scrapes the project's own exporter, relay and Pushgateway (tests/test_dashboards_live.py)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DASHBOARDS = REPO / "dashboards"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # collapsed rows keep theirs inside
    return found


def test_committed_json_is_what_the_generator_writes() -> None:
    rendered = load_generator().render()
    assert sorted(rendered) == [p.name for p in dashboard_files()], "a dashboard is missing or not generated"
    for name, text in rendered.items():
        assert (DASHBOARDS / name).read_text() == text, f"{name} is stale: run .venv/bin/python -m dashboards.generate"


def test_the_three_dashboards_exist() -> None:
    titles = {json.loads(p.read_text())["uid"] for p in dashboard_files()}
    assert titles == {"mlwarden-gpu-fleet", "mlwarden-jobs", "mlwarden-relay"}


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_dashboard_schema(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    # no hard-coded datasource uid anywhere: everything reads the variable
    uids = set(re.findall(r'"uid": "([^"]*)"', path.read_text())) - {dashboard["uid"], "-- Grafana --"}
    assert uids == {"${datasource}"}

    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["fieldConfig"]["defaults"]["thresholds"]["steps"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert target["expr"].strip(), panel["title"]


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_panels_do_not_overlap(path: Path) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in json.loads(path.read_text())["panels"]:
        grid = panel["gridPos"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_every_variable_used_in_queries_is_defined(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", json.dumps([t["expr"] for p in panels(dashboard) for t in p.get("targets", [])])))
    assert {name for name in used if not name.startswith("__")} <= defined


def test_every_metric_the_cleanup_pushes_is_on_the_jobs_dashboard(tmp_path: Path) -> None:
    """Found missing once: mlwarden_cleanup_skipped_files had no panel. The cleanup runs on a tmp_path tree."""
    from mlwarden.jobs.cleanup import cli as cleanup_cli

    from mlwarden import settings

    experiments, textfiles = tmp_path / "experiments", tmp_path / "textfiles"
    (experiments / "run").mkdir(parents=True)
    textfiles.mkdir()
    loaded = settings.load(cleanup_cli.CleanupSettings, "cleanup",
                           ["--experiments-dir", str(experiments), "--yes", "--textfile-dir", str(textfiles)], {})
    assert cleanup_cli.run(loaded) == 0
    pushed = set(re.findall(r"^(mlwarden_cleanup_[a-z_]+)[{ ]", (textfiles / "mlwarden_cleanup.prom").read_text(), re.M))
    assert "mlwarden_cleanup_skipped_files" in pushed
    queries = " ".join(target["expr"] for panel in panels(json.loads((DASHBOARDS / "jobs.json").read_text()))
                       for target in panel.get("targets", []))
    assert {name for name in pushed if not re.search(rf"\b{name}\b", queries)} == set()
