"""The ``process`` collector: the exporter's own ``process_*`` metrics, as prometheus_client serves them.

It is also the proof of the collector registry: this file and the collector's own module are
the only files that name it (its flag, help and docs row come from its registration).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from mlwarden.exporter.app import Exporter
from mlwarden.exporter.collectors.base import registered
from mlwarden.exporter.collectors.process import ProcessCollector
from mlwarden.exporter.exposition import Renderer
from mlwarden.exporter.snapshot import SnapshotStore
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
    ours = parsed(Renderer().render(ProcessCollector(1.0, 1.0).read()))
    theirs = parsed(generate_latest(_Registry(list(PrometheusProcessCollector(registry=None).collect()))))  # type: ignore[arg-type]  # prometheus_client's families, as its renderer takes them
    assert ours.keys() == theirs.keys()
    assert {name for name, _ in ours} >= {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"}
    for same in ("process_start_time_seconds", "process_max_fds"):
        assert ours[(same, ())] == theirs[(same, ())]
    for close in ("process_resident_memory_bytes", "process_virtual_memory_bytes", "process_open_fds"):
        assert abs(ours[(close, ())] - theirs[(close, ())]) <= 0.1 * theirs[(close, ())], close
    ours_text = Renderer().render(ProcessCollector(1.0, 1.0).read()).decode()
    theirs_text = generate_latest(_Registry(list(PrometheusProcessCollector(registry=None).collect()))).decode()  # type: ignore[arg-type]  # prometheus_client's families, as its renderer takes them
    assert [line for line in ours_text.splitlines() if line.startswith("#")] == \
        [line for line in theirs_text.splitlines() if line.startswith("#")]  # same HELP and TYPE lines


def _stat_line(cpu_ticks: int) -> str:
    """A /proc/PID/stat line: the fields after the command name from index 11 (utime) on."""
    fields = ["S", *["0"] * 10, str(cpu_ticks), "0", *["0"] * 6, "100", str(64 * 2**20), "2048", *["0"] * 20]
    return "4242 (mlwarden exporter) " + " ".join(fields) + "\n"


def test_a_pass_reads_proc_self_only_when_its_snapshot_is_rendered(tmp_path: Path) -> None:
    """Nobody needs the exporter's own process_* between scrapes: a pass publishes what reads them, and the
    values are those of the moment its snapshot is rendered. Descriptors that cannot be listed omit one series."""
    (tmp_path / "self" / "fd").mkdir(parents=True)
    (tmp_path / "stat").write_text("cpu 1 2 3 4\nbtime 1700000000\n")
    stat = tmp_path / "self" / "stat"
    stat.write_text(_stat_line(cpu_ticks=100))
    collector = ProcessCollector(1.0, 1.0, proc=tmp_path)
    store = SnapshotStore([("process", 1.0)], "test")
    store.publish("process", collector.collect(), 0.0)
    stat.write_text(_stat_line(cpu_ticks=900))  # after the pass, before the scrape; the same file, kept open
    (tmp_path / "self" / "fd" / "3").touch()
    body = store.snapshot.body.decode()
    ticks = os.sysconf("SC_CLK_TCK")
    assert sample(body, "process_cpu_seconds_total") == 900 / ticks and sample(body, "process_open_fds") == 1
    assert sample(body, "process_resident_memory_bytes") == 2048 * os.sysconf("SC_PAGE_SIZE")
    assert sample(body, "mlwarden_exporter_collector_success", collector="process") == 1
    (tmp_path / "self" / "fd" / "3").unlink()
    (tmp_path / "self" / "fd").rmdir()
    store.publish("process", collector.collect(), 0.0)
    body = store.snapshot.body.decode()
    assert sample(body, "process_open_fds") is None and sample(body, "process_cpu_seconds_total") == 900 / ticks


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
