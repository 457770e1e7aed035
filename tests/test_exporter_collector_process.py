"""The ``process`` collector: the exporter's own ``process_*`` metrics, as prometheus_client serves them.

It is also the proof of the collector registry: this file and the collector's own module are
the only files that name it (its flag, help and docs row come from its registration).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from mlwarden.exporter.app import Exporter
from mlwarden.exporter.collectors.base import registered
from mlwarden.exporter.collectors.process import ProcessCollector
from mlwarden.exporter.exposition import Renderer
from prometheus_client import ProcessCollector as PrometheusProcessCollector
from prometheus_client.exposition import generate_latest

from mlwarden.components import wait_until
from tests.naming import files_naming
from tests.test_exporter_exposition import _Registry, parsed
from tests.test_exporter_server import request, sample, start_exporter, url_of

__all__ = ["start_exporter"]  # the fixture, used by name

OWN_FILES = {"exporter/collectors/process.py", "tests/test_exporter_collector_process.py"}
# What naming the collector looks like: its module, its class, its flag, setting or variable,
# its label value, its name in prose. The families' names (process_*) are Prometheus' own.
NAMES = re.compile(
    r"collectors[./]process\b|ProcessCollector|collector[-_.]process\b|COLLECTOR_PROCESS\b"
    r"|collector=\"process\"|`process` collector|process collector"
)


def test_the_process_collector_serves_what_prometheus_client_s_process_collector_serves() -> None:
    ours = parsed(Renderer().render(ProcessCollector(1.0, 1.0).collect().families))
    theirs = parsed(generate_latest(_Registry(list(PrometheusProcessCollector(registry=None).collect()))))  # type: ignore[arg-type]  # prometheus_client's families, as its renderer takes them
    assert ours.keys() == theirs.keys()
    assert {name for name, _ in ours} >= {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"}
    for same in ("process_start_time_seconds", "process_max_fds"):
        assert ours[(same, ())] == theirs[(same, ())]
    for close in ("process_resident_memory_bytes", "process_virtual_memory_bytes", "process_open_fds"):
        assert abs(ours[(close, ())] - theirs[(close, ())]) <= 0.1 * theirs[(close, ())], close
    ours_text = Renderer().render(ProcessCollector(1.0, 1.0).collect().families).decode()
    theirs_text = generate_latest(_Registry(list(PrometheusProcessCollector(registry=None).collect()))).decode()  # type: ignore[arg-type]  # prometheus_client's families, as its renderer takes them
    assert [line for line in ours_text.splitlines() if line.startswith("#")] == \
        [line for line in theirs_text.splitlines() if line.startswith("#")]  # same HELP and TYPE lines


def test_the_exporter_reports_its_own_process_metrics_and_the_registry_s_flag_turns_them_off(
    start_exporter: Callable[..., Exporter],
) -> None:
    url = url_of(start_exporter())
    body = wait_until(lambda: (b := request(url + "/metrics")[1]) and "process_resident_memory_bytes" in b and b,
                      10, "the process collector's first pass")
    assert sample(body, "process_resident_memory_bytes") > 10 * 2**20
    assert sample(body, "process_open_fds") >= 3
    assert sample(body, "mlwarden_exporter_collector_success", collector="process") == 1
    off = url_of(start_exporter("--no-collector-process"))
    body = wait_until(lambda: (b := request(off + "/metrics")[1]) and "mlwarden_gpu_temperature_celsius{" in b and b,
                      10, "the first GPU sample")
    assert "process_resident_memory_bytes" not in body
    assert sample(body, "mlwarden_exporter_collector_success", collector="process") is None
    by_env = url_of(start_exporter(environ={"MLWARDEN_EXPORTER_COLLECTOR_PROCESS": "false"}))
    body = wait_until(lambda: (b := request(by_env + "/metrics")[1]) and "mlwarden_gpu_temperature_celsius{" in b and b,
                      10, "the first GPU sample")
    assert "process_resident_memory_bytes" not in body


def test_it_is_registered_from_its_own_module() -> None:
    spec = next(spec for spec in registered() if spec.name == "process")
    assert spec.factory.__module__ == ProcessCollector.__module__
    assert spec.switch == "collector_process" and spec.default is True


def test_no_other_file_names_the_process_collector() -> None:
    assert files_naming(NAMES, OWN_FILES) == []


def test_the_pattern_would_find_a_hand_wired_collector() -> None:
    for wiring in ("from mlwarden.exporter.collectors.process import ProcessCollector",
                   "collector_process: bool = setting(True, help=...)", "--no-collector-process",
                   "| `--collector-process` / `--no-collector-process` |", "the `process` collector"):
        assert NAMES.search(wiring), wiring
