"""Rules and dashboards survive any scrape job name: they select by metric, and the only
job matchers left are the documented ones for `up` and the jobs' own pushed `job` labels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRAPED = ("mlwarden_exporter", "mlwarden_relay")  # the systemd set-up's scrape job names
DOCUMENTED = {'job=~".*mlwarden[-_]exporter.*"', 'job=~".*mlwarden[-_]relay.*"'}
JOB_MATCHER = re.compile(r'job\s*(=~|!~|!=|=)\s*"([^"]*)"')


def _sources() -> list[Path]:
    return [*sorted((REPO / "alerts" / "rules").glob("*.yml")), *sorted((REPO / "dashboards").glob("*.json"))]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: p.name)
def test_no_query_names_a_scrape_job(path: Path) -> None:
    text = path.read_text()
    for match in JOB_MATCHER.finditer(text):
        if match.group(0) in DOCUMENTED:
            continue
        assert not any(name in match.group(2) for name in SCRAPED), f"{path.name}: {match.group(0)}"


@pytest.mark.parametrize("name", ["gpu-fleet.json", "relay.json"])
def test_scraped_dashboards_have_a_job_variable_taken_from_a_metric(name: str) -> None:
    dashboard = json.loads((REPO / "dashboards" / name).read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert re.fullmatch(r"label_values\(mlwarden_\w+, job\)", variables["job"]["definition"])
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if re.match(r"(time\(\) - )?(up|mlwarden_(exporter|nvml|gpu|relay)\w*)\{", target["expr"]):
                assert 'job=~"$job"' in target["expr"], f"{panel['title']}: {target['expr']}"
