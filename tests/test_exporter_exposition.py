"""The exporter's own renderer writes what prometheus_client's ``generate_latest`` writes for the same
samples: byte for byte, and the same samples when parsed; its cache of label text follows the series
of the last pass only."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from mlwarden.exporter.backends.base import XidEvent
from mlwarden.exporter.backends.nvml import NvmlBackend
from mlwarden.exporter.collectors.gpu import GpuCollector
from mlwarden.exporter.collectors.processes import ProcessesCollector
from mlwarden.exporter.collectors.xid import XidCollector
from mlwarden.exporter.exposition import Family, Renderer, counter, format_value, gauge, to_prometheus_client
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.test_exporter_nvml import MIB, FakeNvml, supervisor_for


class _Registry:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def reference(families: list[Family]) -> bytes:
    """The same samples through prometheus_client's own families and renderer."""
    return generate_latest(_Registry([to_prometheus_client(f) for f in families if f.samples]))  # type: ignore[arg-type]  # prometheus_client's families, as its renderer takes them


def parsed(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


@pytest.fixture
def snapshot(monkeypatch: pytest.MonkeyPatch) -> list[Family]:
    """One pass of the GPU, processes and XID collectors over every kind of signal the fake has."""
    fake = FakeNvml(gpus=3, gpm_gpus={0, 2})
    fake.install(monkeypatch)
    fake.mig[1] = [(1, 0, "3g.20gb", 5 * MIB, 20_000 * MIB)]
    fake.processes = {0: [(4242, 3 * MIB), (4243, None)], 2: [(4244, 7 * MIB)]}
    fake.process_utilization[0] = [(4242, 100, 10, 5)]
    supervisor = supervisor_for(NvmlBackend())
    gpu = GpuCollector(supervisor, 1.0, 1.0)
    gpu.collect()  # GPM needs two samples
    xid = XidCollector(supervisor, 1.0, 1.0)
    xid.record(XidEvent(gpu=0, xid=79, timestamp=1_700_000_000.25))
    families = [*gpu.collect().made(), *ProcessesCollector(supervisor, 1.0, 1.0, 8).collect().made(), *xid.collect().made()]
    assert all(isinstance(f, Family) for f in families)
    return families  # type: ignore[return-value]  # every family is a Family: asserted on the line above


def test_the_renderer_writes_what_prometheus_client_writes_for_a_whole_snapshot(snapshot: list[Family]) -> None:
    renderer = Renderer()
    first = renderer.render(snapshot)
    again = renderer.render(snapshot)  # every label prefix from the cache this time
    expected = reference(snapshot)
    assert first == expected
    assert again == expected
    samples = parsed(first)
    assert samples == parsed(expected)
    assert len(samples) > 150  # the snapshot really covers the families, not a handful of series
    assert ("mlwarden_gpu_nvlink_errors_total", (("error", "replay"), ("gpu", "0"), ("link", "0"), ("uuid", "GPU-fake-0"))) in samples


def test_awkward_label_values_help_texts_and_numbers_render_as_prometheus_client_renders_them() -> None:
    odd = gauge("x_ratio", 'help with \\ a backslash,\na newline and "quotes"', labels=["zeta", "alpha", "mid"])
    for values, number in (
        (('a"b', "c\\d", "e\nf"), 0.5), (("", "é ü", "}{,="), 1e9), (("1", "2", "3"), 2**64),
        (("n", "n", "n"), math.nan), (("i", "i", "i"), math.inf), (("-i", "-i", "-i"), -math.inf),
        (("t", "t", "t"), True), (("s", "s", "s"), 1e-7), (("z", "z", "z"), -0.25), (("b", "b", "b"), 123456.7),
    ):
        odd.add_metric(values, number)
    total = counter("y_seconds_total", "A counter named with _total, as CounterMetricFamily accepts.", labels=["gpu"])
    total.add_metric(["0"], 3)
    bare = gauge("z_up", "No labels.")
    bare.add_metric([], 1)
    empty = gauge("nothing", "No samples: left out.", labels=["gpu"])
    families = [odd, total, bare, empty]
    assert Renderer().render(families) == reference(families)
    assert b"nothing" not in Renderer().render(families)
    assert [format_value(v) for v in (3, 1e9, 0.1, 2**64, 1e-5, math.inf, True)] == \
        ["3.0", "1e+09", "0.1", "1.8446744073709552e+19", "1e-05", "+Inf", "1.0"]


# What the exporter's process must not load unless a feature asks for it: each costs resident memory
# (uvicorn and its imports were 6 MiB; YAML and bcrypt, only for --web-config-file, 2 MiB).
HEAVY = ("prometheus_client", "uvicorn", "uvloop", "click", "watchfiles", "yaml", "bcrypt", "grpc", "fastapi", "pydantic")


def test_the_exporter_does_not_load_heavy_modules_it_does_not_need() -> None:
    script = (
        "import sys, mlwarden.cli, mlwarden.exporter.app, mlwarden.exporter.collectors.base as base; base.registered(); "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.strip() == "[]"


# What only the backups, artifacts and jobs collectors use, loaded when they run: the backup catalog and its imports
# were 0.8 MiB of an exporter's 30 MiB without --backup-dir.
ONLY_WHEN_USED = ("mlwarden.catalog", "mlwarden.fsutil", "orjson", "tempfile")


def test_the_exporter_loads_the_backup_catalog_only_when_a_collector_reads_it() -> None:
    script = (
        "import sys, mlwarden.cli, mlwarden.exporter.app, mlwarden.exporter.collectors.base as base; base.registered(); "
        f"print(sorted(set(sys.modules) & set({ONLY_WHEN_USED!r})))"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.strip() == "[]"


def test_the_label_cache_holds_only_the_series_of_the_last_pass() -> None:
    renderer = Renderer()
    for pid in range(500):  # processes come and go
        family = gauge("p_bytes", "Per process.", labels=["pid"])
        family.add_metric([str(pid)], pid)
        family.add_metric(["steady"], 1)
        text = renderer.render([family])
        assert text.endswith(f'p_bytes{{pid="{pid}"}} {float(pid)}\np_bytes{{pid="steady"}} 1.0\n'.encode())
    assert [len(series) for series in renderer._prefixes.values()] == [2]


def test_promtool_accepts_the_renderers_output(snapshot: list[Family], promtool: str) -> None:
    checked = subprocess.run([promtool, "check", "metrics"], input=Renderer().render(snapshot), capture_output=True, timeout=30)
    assert checked.returncode == 0, checked.stderr.decode()
    assert checked.stdout.decode() + checked.stderr.decode() == ""
