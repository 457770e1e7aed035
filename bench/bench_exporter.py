"""The exporter against a naive exporter, side by side on the same simulated GPUs.

The naive baseline is prometheus_client's own ``start_http_server`` serving a registry
whose collector builds the very same series (the same collector code, 8 or 64 simulated
GPUs, 10 processes each) at scrape time, which is how most GPU exporters work. mlwarden
builds them in the background and a scrape returns pre-rendered bytes. Both run as
separate processes; the scrapers are curl's parallel transfers over keep-alive connections.

It also runs mlwarden's exporter and nvitop-exporter side by side on the same GPUs: a C
stand-in for ``libnvidia-ml.so.1`` (bench/fake_libnvidia_ml.c, built here with gcc) that both
load through pynvml's normal library search, so neither pays for a fake written in Python.
nvitop-exporter lives in a venv of its own under ~/.cache/mlwarden-bench, never in the project's.

    python -m bench.run_all --only exporter [--quick]
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from mlwarden.components import Component, free_port

ROOT = Path(__file__).resolve().parent.parent
PROCESSES_PER_GPU = 10
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlwarden-bench"
NVITOP_EXPORTER = "nvitop-exporter==1.7.2"
TICK = os.sysconf("SC_CLK_TCK")


# The baseline: a naive exporter (run as ``python -m bench.bench_exporter baseline``) ----------
def serve_baseline(gpus: int, port: int) -> None:
    from mlwarden.exporter.backends.simulated import SimulatedBackend
    from mlwarden.exporter.backends.supervisor import BackendSupervisor
    from mlwarden.exporter.collectors.gpu import GpuCollector
    from mlwarden.exporter.collectors.processes import ProcessesCollector
    from mlwarden.exporter.collectors.xid import XidCollector
    from mlwarden.exporter.exposition import to_prometheus_client
    from prometheus_client import REGISTRY, start_http_server

    supervisor = BackendSupervisor(SimulatedBackend(gpus=gpus, processes_per_gpu=PROCESSES_PER_GPU))
    collectors = [GpuCollector(supervisor, 1, 1), ProcessesCollector(supervisor, 1, 1, 32), XidCollector(supervisor, 1, 1)]

    class AtScrapeTime:
        def collect(self) -> Iterable:
            for collector in collectors:
                yield from (to_prometheus_client(family) for family in collector.collect().made())

    REGISTRY.register(AtScrapeTime())
    start_http_server(port, addr="127.0.0.1")
    threading.Event().wait()


# Measuring -----------------------------------------------------------------------------------
def start_project(gpus: int, port: int, interval: str = "1s") -> Component:
    argv = [sys.executable, "-m", "mlwarden.cli", "exporter", "--gpu-backend", "simulated",
            "--simulated-gpus", str(gpus), "--simulated-processes", str(PROCESSES_PER_GPU),
            "--listen-address", f"127.0.0.1:{port}", "--interval", interval, "--log-level", "warning"]
    return _spawn("mlwarden", argv, port)


def start_baseline(gpus: int, port: int) -> Component:
    argv = [sys.executable, "-m", "bench.bench_exporter", "baseline", "--gpus", str(gpus), "--port", str(port)]
    return _spawn("baseline", argv, port)


def _serves(marker: bytes) -> Callable[[Component], bool]:
    def ready(component: Component) -> bool:
        try:
            return marker in _scrape(http.client.HTTPConnection("127.0.0.1", component.port, timeout=5))
        except (OSError, RuntimeError):
            return False
    return ready


def _spawn(name: str, argv: list[str], port: int, env: dict[str, str] | None = None,
           marker: bytes = b"mlwarden_gpu_temperature_celsius{") -> Component:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-exporter-{name}-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return Component(name, argv, port, workdir, _serves(marker), env=env).start()


# Side by side with nvitop-exporter on the C stand-in for NVML ---------------------------------
def build_fake_nvml(into: Path) -> Path:
    """Compile bench/fake_libnvidia_ml.c into ``into``/libnvidia-ml.so.1; returns ``into``."""
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(into / "libnvidia-ml.so.1"),
                    str(ROOT / "bench" / "fake_libnvidia_ml.c")], check=True)
    return into


def nvitop_python() -> Path:
    """The interpreter of a venv holding nvitop-exporter (made on first use; not a project dependency)."""
    venv = CACHE / "nvitop-venv"
    python = venv / "bin" / "python"
    if not (venv / "bin" / "nvitop-exporter").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", NVITOP_EXPORTER], check=True)
    return python


def _version(python: Path, distribution: str) -> str:
    return subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({distribution!r}))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def side_by_side(quick: bool) -> list[str]:
    """Idle CPU and RSS of mlwarden's exporter and nvitop-exporter, both on the C stand-in, in one window.

    8 GPUs, each listing the same ``PROCESSES_PER_GPU`` live processes (sleepers started here, so
    that both exporters read real /proc entries for them); both collect every second; nothing
    scrapes them during the window. Both run at once, so that the machine's noise hits both.
    """
    window = 15.0 if quick else 60.0
    gpus = 8
    sleepers = [subprocess.Popen(["sleep", "3600"]) for _ in range(PROCESSES_PER_GPU)]
    libdir = build_fake_nvml(Path(tempfile.mkdtemp(prefix="bench-fake-nvml-")))
    env = {"LD_LIBRARY_PATH": str(libdir), "MLWARDEN_FAKE_NVML_GPUS": str(gpus),
           "MLWARDEN_FAKE_NVML_PIDS": ",".join(str(s.pid) for s in sleepers)}
    nvitop = nvitop_python()
    ours_port, theirs_port = free_port(), free_port()
    ours = _spawn("mlwarden-nvml", [sys.executable, "-m", "mlwarden.cli", "exporter", "--gpu-backend", "nvml",
                                    "--listen-address", f"127.0.0.1:{ours_port}", "--interval", "1s",
                                    "--log-level", "warning"], ours_port, env)
    theirs = _spawn("nvitop-exporter", [str(nvitop), "-m", "nvitop_exporter", "--bind-address", "127.0.0.1",
                                        "--port", str(theirs_port), "--interval", "1"], theirs_port, env,
                    marker=b"gpu_utilization_Percentage{")
    try:
        time.sleep(5.0)  # past start-up: imports, first passes, GPM's first sample
        before = {p.name: cpu_seconds(p.pid) for p in (ours, theirs)}
        began = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - began
        cpu = {p.name: (cpu_seconds(p.pid) - before[p.name]) / elapsed for p in (ours, theirs)}
        rss = {p.name: rss_mib(p.pid) for p in (ours, theirs)}
        bodies = {p.name: _scrape(http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)) for p in (ours, theirs)}
    finally:
        ours.stop()
        theirs.stop()
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
    rows = []
    for name, label, targets in (("mlwarden-nvml", "mlwarden (all collectors)", (0.0035, 30.0)),
                                 ("nvitop-exporter", f"nvitop-exporter {_version(nvitop, 'nvitop-exporter')}", None)):
        body = bodies[name]
        samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        verdict = ""
        if targets:
            met = cpu[name] <= targets[0] and rss[name] <= targets[1]
            verdict = f"<= {targets[0] * 100:.2f} %, <= {targets[1]:.0f} MiB ({'meets' if met else 'misses'})"
        rows.append(f"| {label} | {cpu[name] * 100:.2f} % | {rss[name]:.1f} MiB | {samples} "
                    f"| {len(body) / 1024:.0f} KiB, {len(gzip.compress(body)) / 1024:.1f} KiB gzipped | {verdict} |")
    ratio_cpu = cpu["nvitop-exporter"] / max(cpu["mlwarden-nvml"], 1e-9)
    ratio_rss = rss["nvitop-exporter"] / rss["mlwarden-nvml"]
    return [
        f"Idle cost next to nvitop-exporter: {gpus} GPUs x {PROCESSES_PER_GPU} live processes on the C stand-in "
        f"for `libnvidia-ml.so.1` (`bench/fake_libnvidia_ml.c`, built with gcc at bench time and loaded by both "
        f"through `LD_LIBRARY_PATH`), both collecting every 1 s, not scraped, CPU (user + system) over the same {window:.0f} s "
        f"window from 5 s after both answered their first scrape (both running at once), RSS at its end:",
        "",
        "| exporter | CPU, % of one core | RSS | samples | /metrics | target |",
        "| --- | ---: | ---: | ---: | --- | --- |",
        *rows,
        "",
        f"nvitop-exporter / mlwarden: CPU {ratio_cpu:.1f}x, RSS {ratio_rss:.2f}x. mlwarden serves more "
        f"(GPM profiling, NVLink, PCIe, ECC, violations, per-process attribution) and nvitop-exporter serves "
        f"host metrics mlwarden leaves to node_exporter; its series have no `nvitop_` prefix (`gpu_*`, `host_*`, "
        f"`process_*`, the unit appended), only `nvitop_info` does.",
    ]


def _scrape(conn: http.client.HTTPConnection) -> bytes:
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"scrape answered {response.status}")
    return body


def latencies(port: int, scrapers: int, count: int) -> list[float]:
    """Seconds per scrape (request to last byte) with ``scrapers`` concurrent keep-alive connections.

    curl is the client (``--parallel``): a Python client's own overhead under 20 threads would
    dominate what is measured. Transfers that opened a connection are left out, so the
    figures are steady-state scrapes, as Prometheus makes them.
    """
    config = f'url = "http://127.0.0.1:{port}/metrics"\noutput = "/dev/null"\n' * count
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail", "--parallel", "--parallel-immediate",
         "--parallel-max", str(scrapers), "--config", "-", "--write-out", "%{time_total} %{num_connects}\n"],
        input=config, capture_output=True, text=True, check=True, timeout=600,
    )
    times = [line.split() for line in result.stdout.splitlines() if line.strip()]
    if len(times) != count:
        raise RuntimeError(f"curl finished {len(times)} of {count} scrapes: {result.stderr[-300:]}")
    reused = [float(seconds) for seconds, connects in times if connects == "0"]
    # prometheus_client's server closes the connection after every scrape: then every transfer connects.
    return reused or [float(seconds) for seconds, _ in times]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else values[0]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


# Scrapes per measurement. mlwarden's runs last several seconds, so that each spans several
# 1 s collections and their p99 includes the scrapes that met a snapshot being rendered; the
# baseline renders at every scrape, so a short run of it already shows its full cost.
SCRAPES = {  # (gpus, scrapers) -> (mlwarden, baseline)
    (8, 1): (20_000, 1_000), (8, 20): (60_000, 1_000), (64, 1): (10_000, 500), (64, 20): (20_000, 500),
}


def latency_rows(quick: bool) -> list[str]:
    rows = []
    for gpus, target_ms in ((8, 5.0), (64, 20.0)):
        project_port, baseline_port = free_port(), free_port()
        project = start_project(gpus, project_port)
        try:
            baseline = start_baseline(gpus, baseline_port)
        except Exception:
            project.stop()
            raise
        try:
            size = len(_scrape(http.client.HTTPConnection("127.0.0.1", project_port, timeout=10)))
            for scrapers in (1, 20):
                ours_count, theirs_count = (count // 10 if quick else count for count in SCRAPES[gpus, scrapers])
                began = time.monotonic()
                ours = latencies(project_port, scrapers, ours_count)
                seconds = time.monotonic() - began
                theirs = latencies(baseline_port, scrapers, theirs_count)
                verdict = ("meets" if p99(ours) * 1000 <= target_ms else "misses") if scrapers == 20 else ""
                rows.append(
                    f"| {gpus} GPUs ({size // 1024} KiB) | {scrapers} | {len(ours)} in {seconds:.1f} s "
                    f"| {_ms(statistics.median(ours))} / {_ms(p99(ours))} "
                    f"| {_ms(statistics.median(theirs))} / {_ms(p99(theirs))} "
                    f"| {statistics.median(theirs) / statistics.median(ours):.1f}x / {p99(theirs) / p99(ours):.1f}x "
                    f"| p99 <= {target_ms:.0f} ms {('(' + verdict + ')') if verdict else '(20 scrapers)'} |"
                )
        finally:
            project.stop()
            baseline.stop()
    return rows


def cpu_rows(quick: bool) -> tuple[list[str], str]:
    """CPU of each server over a window of one scrape per second (Prometheus at a 1 s interval),
    and how the baseline's cost compares there ("a little less", "about the same", "more")."""
    window = 15.0 if quick else 60.0
    rows = []
    project_port, baseline_port = free_port(), free_port()
    project, baseline = start_project(8, project_port), start_baseline(8, baseline_port)
    try:
        # past start-up, as side_by_side: the window began at once, with the baseline's start next to it and the
        # rendering the readiness scrape asked for (its snapshot was scraped, so the next pass is rendered at once)
        time.sleep(5.0)
        idle_before = cpu_seconds(project.pid)
        time.sleep(window)
        idle = (cpu_seconds(project.pid) - idle_before) / window
        loaded = {}
        for name, process, port in (("project", project, project_port), ("baseline", baseline, baseline_port)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            before = cpu_seconds(process.pid)
            began = time.monotonic()
            while time.monotonic() - began < window:
                _scrape(conn)
                time.sleep(1.0)
            loaded[name] = (cpu_seconds(process.pid) - before) / (time.monotonic() - began)
        rows.append(f"| 8 GPUs, collection every 1 s, no scrapes (from 5 s after start) | {idle * 100:.2f}% | — | — "
                    f"| <= 2% ({'meets' if idle <= 0.02 else 'misses'}) |")
        rows.append(
            f"| 8 GPUs, 1 scrape/s (mlwarden also collects every 1 s) | {loaded['project'] * 100:.2f}% | {loaded['baseline'] * 100:.2f}% "
            f"| {loaded['baseline'] / max(loaded['project'], 1e-9):.1f}x | |"
        )
    finally:
        project.stop()
        baseline.stop()
    ratio = loaded["baseline"] / max(loaded["project"], 1e-9)
    return rows, "a little less" if ratio < 0.95 else "more" if ratio > 1.05 else "about the same"


def memory_rows(quick: bool) -> tuple[list[str], int, float]:
    """RSS over many collections, compressed in time: 0.1 s collections stand in for 1 s ones."""
    collections = 300 if quick else 3600
    port = free_port()
    project = start_project(64, port, interval="0.1s")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    samples = []
    try:
        began = time.monotonic()
        for step in range(1, 6):
            target = began + collections * 0.1 * step / 5
            while time.monotonic() < target:
                _scrape(conn)
                time.sleep(0.5)
            samples.append((round((time.monotonic() - began) / 0.1), rss_mib(project.pid)))
    finally:
        project.stop()
    rows = [f"| {count} | {rss:.1f} |" for count, rss in samples]
    growth = samples[-1][1] - samples[0][1]
    return rows, collections, growth


def run(quick: bool) -> str:
    versus_nvitop = side_by_side(quick)
    latency = latency_rows(quick)
    cpu, baseline_cost = cpu_rows(quick)
    memory, collections, growth = memory_rows(quick)
    mode = "Quick mode (fewer scrapes, shorter windows)" if quick else "Full mode"
    return "\n".join([
        "## GPU exporter",
        "",
        f"mlwarden's exporter (background collection; each pass rendered and gzipped once: in its collector's thread while "
        f"scrapers keep up with passes, else at the first scrape in a worker thread; one event loop serves) against a "
        f"naive exporter: prometheus_client's `start_http_server` with a collector that builds the same series at "
        f"scrape time. mlwarden collects every second throughout, and each of its runs spans several collections. "
        f"Simulated GPUs, {PROCESSES_PER_GPU} processes each; each server is its own process; the scrapers are "
        f"curl's parallel transfers over keep-alive connections (transfers that connected are left out; "
        f"prometheus_client's server closes every connection, so its figures include a loopback connect). "
        f"The machine is shared with other work, so the ratios matter more than the absolute figures. {mode}.",
        "",
        *versus_nvitop,
        "",
        "Scrape latency, milliseconds (median / p99):",
        "",
        "| series set | concurrent scrapers | mlwarden's scrapes | mlwarden | naive baseline | baseline / mlwarden | target |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *latency,
        "",
        "CPU, percent of one core:",
        "",
        "| load | mlwarden | naive baseline | baseline / mlwarden | target |",
        "| --- | --- | --- | --- | --- |",
        *cpu,
        "",
        f"Scraped once a second by one Prometheus, the naive exporter costs {baseline_cost}: it does the same "
        "work once per scrape, mlwarden once per collection plus serving. mlwarden's cost does not grow with "
        "the number of scrapers (an HA pair, federation, a curious human), and a scrape never waits for NVML.",
        "",
        f"Resident memory of mlwarden with 64 GPUs while collecting every 0.1 s and scraped twice a second: "
        f"{collections} collections, the number an hour of 1 s collections makes, compressed into "
        f"{collections * 0.1 / 60:.0f} minutes. This is not a wall-clock hour: anything that grows with "
        f"time rather than with collections would not show. Target: <= 60 MB and flat.",
        "",
        "| collections so far (elapsed time / 0.1 s) | RSS (MiB) |",
        "| --- | --- |",
        *memory,
        "",
        f"Growth from the first to the last sample: {growth:+.1f} MiB.",
        "",
        "Reproduce: `.venv/bin/python -m bench.run_all --only exporter` (add `--quick` for a smoke run).",
    ])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["baseline"])
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve_baseline(args.gpus, args.port)


if __name__ == "__main__":
    main()
