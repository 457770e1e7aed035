"""Relay intake: Alertmanager-shaped payloads (10 alerts each) from 50 concurrent senders.

The relay (SQLite store, every payload and its jobs committed before the 200) and a
baseline (a bare FastAPI endpoint under uvicorn that only parses the JSON and answers 200)
run the same way, one after the other in this run, as separate processes loaded by the
same client (this process, on uvloop so that it leaves the server as much of the 2 cores as
it can). Each server's own CPU time per request is read from /proc: unlike latency, it
hardly moves when other people's work shares the machine. The relay's resident memory is
sampled through the whole storm.

The target rate is measured in steady state: the full-load phase leaves the relay's outbox a
backlog (tens of thousands of Slack jobs, which the digest drains at about the rate 500
webhooks a second bring), so a paced phase right after it measures 500 webhooks a second plus
the catching up. That phase still runs and is reported (the method of the tables before
2026-11-30); then the bench waits, untimed and bounded, until the outbox is empty, and paces
again: the steady-state figures are that phase's.

    python -m bench.run_all --only relay [--quick]
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import uvloop
from mlwarden.relay.store.sqlite import NOTICE_CACHE_SIZE

from mlwarden import components

SENDERS = 50
ALERTS_PER_PAYLOAD = 10
TOKEN = "bench-token-0123456789"
TARGET_RPS = 500
TARGET_P99_MS = 50.0
DRAIN_TIMEOUT_SECONDS = 120.0  # the wait for the outbox's backlog before the steady-state phase
_DEPTH = re.compile(rb"^mlwarden_relay_outbox_depth (\S+)$", re.MULTILINE)

BASELINE = """
import sys, uvicorn
from fastapi import FastAPI, Request
app = FastAPI()
@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}
@app.post("/webhook/alertmanager")
async def webhook(request: Request) -> dict:
    await request.json()
    return {"status": "ok"}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_config=None, access_log=False)
"""

RELAY_CONFIG = """
destinations:
  ops: {type: slack, webhook_url_env: SLACK_WEBHOOK_URL}
routes:
  - destinations: [ops]
"""


@dataclasses.dataclass(frozen=True)
class Result:
    requests: int
    seconds: float
    latencies_ms: list[float]
    failures: int
    server_cpu_seconds: float = 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        return self.server_cpu_seconds * 1000 / self.requests

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def cores_at(self, rate: float) -> float:
        """Cores this server's CPU per request takes at ``rate`` requests/s (1.0: one core, all of it)."""
        return self.cpu_ms_per_request * rate / 1000

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def payloads(count: int, offset: int) -> list[bytes]:
    result = []
    for n in range(offset, offset + count):
        alerts = [
            {"status": "firing", "fingerprint": f"{n:08x}{i:02x}", "startsAt": "2026-11-28T10:00:00Z",
             "labels": {"alertname": "GpuTemperatureHigh", "severity": "warning", "instance": f"node{n % 97}:9945",
                        "gpu": str(i % 8), "job": "mlwarden_exporter", "seq": str(n * 100 + i)},
             "annotations": {"summary": f"GPU {i % 8} on node{n % 97} at 91 °C", "runbook_url": "https://runbooks.test/gpu"},
             "generatorURL": "http://prometheus.test/graph?g0.expr=mlwarden_gpu_temperature_celsius"}
            for i in range(ALERTS_PER_PAYLOAD)
        ]
        doc = {"version": "4", "groupKey": f"{{}}:{{n=\"{n}\"}}", "status": "firing", "receiver": "relay",
               "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am.test",
               "truncatedAlerts": 0, "alerts": alerts}
        result.append(json.dumps(doc).encode())
    return result


async def load(port: int, bodies: list[bytes], rate: float | None = None) -> Result:
    """Send ``bodies`` from SENDERS connections: as fast as answers come (``rate`` None), or paced
    to ``rate`` requests/s in total on a fixed schedule, timing each request from when it was due
    rather than from when it went out (as wrk2 does: a slow server cannot hide its queueing by
    slowing the senders down, so the figures are those of an open-loop sender)."""
    latencies: list[float] = []
    failures = 0
    queue = list(reversed(bodies))
    interval = SENDERS / rate if rate else 0.0

    async def sender(offset: float) -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        due = time.perf_counter() + offset
        while queue:
            raw = queue.pop()
            if interval:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            started = due if interval else time.perf_counter()
            writer.write(_request(raw))
            status = await _response_status(reader)
            latencies.append((time.perf_counter() - started) * 1000)
            failures += status != 200
            due += interval
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(sender(i * interval / SENDERS) for i in range(SENDERS)))
    return Result(len(bodies), time.perf_counter() - started, latencies, failures)


def _request(raw: bytes) -> bytes:
    # A hand-written HTTP/1.1 client: httpx would spend more CPU than the server under test.
    head = (f"POST /webhook/alertmanager HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n")
    return head.encode() + raw


async def _response_status(reader: asyncio.StreamReader) -> int:
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status


def drive(load_run: Coroutine[Any, Any, Result], pid: int) -> Result:
    """Run one load phase, adding the CPU time the server process spent on it."""
    before = cpu_seconds(pid)
    result = uvloop.run(load_run)
    return dataclasses.replace(result, server_cpu_seconds=cpu_seconds(pid) - before)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid``, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class MemorySampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[int] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            self.samples.append(rss_bytes(self.pid))
            time.sleep(0.2)


def start_sink() -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serve(argv: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not components.http_ok(f"http://127.0.0.1:{port}/healthz"):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError(f"{argv[0]} did not start")
        time.sleep(0.1)
    return process


@dataclasses.dataclass(frozen=True)
class Measurement:
    throughput: Result  # senders as fast as answers come
    behind: Result  # paced to the target rate right after the full-load phase, behind its backlog
    paced: Result  # paced to the target rate in steady state: once the backlog was delivered
    memory: list[int]  # RSS samples through all phases
    backlog: int  # jobs queued when the full-load phase ended
    drain_seconds: float  # waited (untimed) for the queue to empty before the steady-state phase
    drained: bool  # False: the wait ran out and the steady-state phase began behind a backlog


def outbox_depth(port: int) -> int:
    """Jobs the server has queued for delivery (the relay's gauge; 0 for a server without one)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            found = _DEPTH.search(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # the baseline has no /metrics: it queues nothing
            return 0
        raise  # anything else would pass for an empty outbox
    return int(float(found.group(1))) if found else 0


def drain(port: int) -> tuple[float, bool]:
    """Wait until the server's outbox is empty, at most DRAIN_TIMEOUT_SECONDS: (seconds, drained)."""
    started = time.monotonic()
    while (depth := outbox_depth(port)) > 0 and time.monotonic() - started < DRAIN_TIMEOUT_SECONDS:
        time.sleep(0.25)
    return time.monotonic() - started, depth == 0


def measure(
    argv: list[str], env: dict[str, str], port: int, fast: list[bytes], behind: list[bytes], paced: list[bytes]
) -> Measurement:
    process = serve(argv, env, port)
    try:
        uvloop.run(load(port, payloads(200, 90_000_000)))  # warm-up
        sampler = MemorySampler(process.pid)
        sampler.start()
        throughput = drive(load(port, fast), process.pid)
        backlog = outbox_depth(port)
        after_full_load = drive(load(port, behind, rate=TARGET_RPS), process.pid)
        waited, drained = drain(port)
        steady = drive(load(port, paced, rate=TARGET_RPS), process.pid)
        sampler.running = False
        sampler.join()
        return Measurement(throughput, after_full_load, steady, [*sampler.samples, rss_bytes(process.pid)],
                           backlog, waited, drained)
    finally:
        process.terminate()
        process.wait(timeout=15)


def run(quick: bool) -> str:
    requests = 2_000 if quick else 5_000  # per phase; x 10 alerts, three phases: 60,000 / 150,000 alerts
    rounds = 1 if quick else 5  # alternated baseline/relay; best of the rounds for each (shared, noisy host)
    load_before = os.getloadavg()[0]
    sink = start_sink()
    baselines: list[Measurement] = []
    relays: list[Measurement] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "relay.yml"
            config.write_text(RELAY_CONFIG)
            env = {**os.environ, "MLWARDEN_RELAY_TOKEN": TOKEN, "MLWARDEN_LOG_LEVEL": "warning",
                   "SLACK_WEBHOOK_URL": f"http://127.0.0.1:{sink.server_port}/slack"}
            for n in range(rounds):
                # Fresh alerts in every phase: nothing is a duplicate or in cooldown.
                fast, behind, paced = (payloads(requests, (3 * n + phase) * requests) for phase in range(3))
                port = components.free_port()
                baselines.append(measure([sys.executable, "-c", BASELINE, str(port)], env, port, fast, behind, paced))
                port = components.free_port()
                argv = [str(Path(sys.executable).parent / "mlwarden"), "relay", "--config", str(config),
                        "--listen-address", f"127.0.0.1:{port}", "--state-url", f"sqlite://{tmp}/relay-{n}.db"]
                relays.append(measure(argv, env, port, fast, behind, paced))
    finally:
        sink.shutdown()
    loads = (load_before, os.getloadavg()[0])
    return report(quick, requests, baselines, relays, loads)


def best(measurements: list[Measurement]) -> Measurement:
    """Best of the rounds, each figure on its own: other people's work on this host only ever slows a round."""
    return Measurement(
        throughput=max((m.throughput for m in measurements), key=lambda r: r.rps),
        behind=min((m.behind for m in measurements), key=lambda r: r.percentile(0.99)),
        paced=min((m.paced for m in measurements), key=lambda r: r.percentile(0.99)),
        memory=measurements[-1].memory,  # the last round's process went through the whole storm too
        backlog=max(m.backlog for m in measurements),
        drain_seconds=max(m.drain_seconds for m in measurements),
        drained=all(m.drained for m in measurements),
    )


def report(
    quick: bool, requests: int, baselines: list[Measurement], relays: list[Measurement], loads: tuple[float, float]
) -> str:
    rounds = len(relays)
    baseline, relay = best(baselines), best(relays)

    def each_round(measurements: list[Measurement], phase: Callable[[Measurement], Result]) -> str:
        return ", ".join(f"{phase(m).percentile(0.99):.1f}/{phase(m).percentile(1.0):.0f}" for m in measurements)

    def row(name: str, m: Measurement) -> str:
        t, p = m.throughput, m.paced
        return (f"| {name} | {t.rps:,.0f} | {t.rps * ALERTS_PER_PAYLOAD:,.0f} | {t.percentile(0.99):.0f} | "
                f"{t.cpu_ms_per_request:.2f} | {p.percentile(0.5):.1f} | {p.percentile(0.99):.1f} | "
                f"{t.failures + m.behind.failures + p.failures} |")

    def steady(m: Measurement) -> Result:
        return m.paced

    def after_full_load(m: Measurement) -> Result:
        return m.behind

    def paced_row(name: str, phase: str, queued: str, r: Result) -> str:
        return (f"| {name} | {phase} | {queued} | {r.percentile(0.5):.1f} | {r.percentile(0.99):.1f} | "
                f"{r.cpu_ms_per_request:.2f} |")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    mib = 1024 * 1024
    memory = relay.memory
    early = statistics.median(memory[: max(1, len(memory) // 4)])
    alerts = 3 * requests * ALERTS_PER_PAYLOAD
    rps_ok = "met" if relay.throughput.rps >= TARGET_RPS else "NOT met"
    p99_ok = "met" if relay.paced.percentile(0.99) <= TARGET_P99_MS else "NOT met"
    behind_ok = "met" if relay.behind.percentile(0.99) <= TARGET_P99_MS else "not met"
    drained = (f"the longest wait for the outbox to empty was {relay.drain_seconds:.1f} s" if relay.drained else
               f"in at least one round the outbox was still not empty after {DRAIN_TIMEOUT_SECONDS:.0f} s, and that "
               "round's steady-state phase began behind what was left")
    return "\n".join([
        "## Relay intake (`mlwarden relay`, SQLite store)" + (" — quick run" if quick else ""),
        "",
        f"Alertmanager-shaped webhooks of {ALERTS_PER_PAYLOAD} alerts each, all distinct, from {SENDERS} concurrent "
        f"senders over keep-alive connections. Phase 1: {requests:,} requests as fast as the server answers "
        f"(throughput). Phase 2: {requests:,} requests paced to {TARGET_RPS} requests/s in total, right after phase 1. "
        "Then the bench waits, untimed, until the server's outbox is empty (at most "
        f"{DRAIN_TIMEOUT_SECONDS:.0f} s; the baseline queues nothing), and phase 3 paces {requests:,} more to "
        f"{TARGET_RPS} requests/s: the steady state the target is about. Paced latency is counted from when each "
        "request was due (acknowledgement latency at the target rate). The relay commits each payload, its key "
        "states and its delivery jobs to SQLite (WAL) before it answers, while its outbox delivers to a local "
        "Slack sink (one message a second, each a digest of up to 5,000 notices). The baseline is a bare FastAPI "
        "endpoint under uvicorn that only parses the JSON and answers 200, started and loaded the same way. "
        f"{rounds} round(s) alternating baseline and relay; for each server the best throughput and the best p99 "
        "of each phase over its rounds are shown (other work on this shared host only ever slows a round down).",
        "",
        "| server | requests/s | alerts/s | p99 (ms) at full load | server CPU per request (ms) | "
        "p50 ack (ms) at 500 req/s, steady | p99 ack (ms) at 500 req/s, steady | non-200 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        row("baseline: bare FastAPI, parse JSON, 200", baseline),
        row("mlwarden relay, SQLite store", relay),
        f"| **relay / baseline** | **{ratio(relay.throughput.rps, baseline.throughput.rps)}** | | | "
        f"{ratio(relay.throughput.cpu_ms_per_request, baseline.throughput.cpu_ms_per_request)} | "
        f"{ratio(relay.paced.percentile(0.5), baseline.paced.percentile(0.5))} | "
        f"{ratio(relay.paced.percentile(0.99), baseline.paced.percentile(0.99))} | |",
        "",
        f"Both paced phases at {TARGET_RPS} requests/s (phase 2 is how the tables before 2026-11-30 measured the "
        "target: behind the backlog that phase 1 left, so its figures are the target rate plus the catching up):",
        "",
        "| server | paced phase | queued at its start | p50 ack (ms) | p99 ack (ms) | server CPU per request (ms) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        paced_row("baseline", "steady (phase 3)", "0", baseline.paced),
        paced_row("baseline", "right after full load (phase 2)", "0", baseline.behind),
        paced_row("mlwarden relay", "steady (phase 3)", "0", relay.paced),
        paced_row("mlwarden relay", "right after full load (phase 2)", f"{relay.backlog:,} jobs", relay.behind),
        "",
        f"Targets: >= {TARGET_RPS} requests/s: **{rps_ok}** ({relay.throughput.rps:,.0f}); p99 acknowledgement "
        f"<= {TARGET_P99_MS:.0f} ms at {TARGET_RPS} requests/s in steady state: **{p99_ok}** "
        f"({relay.paced.percentile(0.99):.1f} ms); right after the full-load phase, behind a backlog of up to "
        f"{relay.backlog:,} jobs, {behind_ok} ({relay.behind.percentile(0.99):.1f} ms). Before phase 3, {drained}. "
        f"At its CPU per request in the steady phase ({relay.paced.cpu_ms_per_request:.2f} ms, its outbox's "
        f"deliveries included), {TARGET_RPS} requests/s take {relay.paced.cores_at(TARGET_RPS):.2f} of a core "
        f"(baseline {baseline.paced.cores_at(TARGET_RPS):.2f}): under 1.0 with room to spare is what makes the "
        "target rate sustainable. "
        "The load generator runs on the same cores as the server (and as everyone else's work on this shared "
        f"machine: 1-minute load average {loads[0]:.2f} before the run, {loads[1]:.2f} after), so the absolute "
        "figures are lower bounds; the ratio, and the server CPU per request (measured in the full-load phase, "
        "hardly moved by other work), are the figures to compare. Both servers run under uvicorn with uvloop "
        "and httptools (`uvicorn[standard]`). p99/slowest acknowledgement at 500 requests/s in each round (ms), "
        f"steady: relay {each_round(relays, steady)}; baseline {each_round(baselines, steady)}; right after full "
        f"load: relay {each_round(relays, after_full_load)}; baseline {each_round(baselines, after_full_load)}. A slowest answer "
        "well above the p99 in both servers' rounds alike is the host (other work, the load generator), not the "
        "relay.",
        "",
        f"Relay memory (RSS) through the storm of {alerts:,} alerts: median of the first quarter "
        f"{early / mib:.0f} MiB, peak {max(memory) / mib:.0f} MiB, end {memory[-1] / mib:.0f} MiB "
        f"({len(memory)} samples). Queued jobs live in SQLite; the oldest {NOTICE_CACHE_SIZE:,} are also kept in "
        "memory for the outbox (see docs/relay.md).",
        "",
        "Reproduce: `.venv/bin/python -m bench.run_all --only relay` (add `--quick` for a smaller run).",
    ])


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
