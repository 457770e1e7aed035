"""What keeps the exporter cheap, and what it must not cost in correctness: answers of "not supported"
remembered until a re-probe, counters read on a slower cadence yet present in every scrape, snapshots
rendered off the event loop and never served half-made, gzip bodies joined from per-part blocks."""

from __future__ import annotations

import ctypes
import dataclasses
import gzip
import struct
import threading
import zlib
from collections.abc import Callable
from types import SimpleNamespace

import pynvml
import pytest
from mlwarden.exporter import exposition
from mlwarden.exporter.backends import nvml as nvml_backend
from mlwarden.exporter.backends.nvml import NvmlBackend
from mlwarden.exporter.collectors.base import Collected, Collector
from mlwarden.exporter.collectors.gpu import GpuCollector
from mlwarden.exporter.collectors.processes import ProcessesCollector
from mlwarden.exporter.loop import CollectionLoop, StopSignal, _Runner
from mlwarden.exporter.snapshot import SnapshotStore

from mlwarden.components import wait_until
from tests.fake_nvml import MIB, FakeNvml, nvml_error
from tests.test_exporter_nvml import _counting, samples, supervisor_for, value

GPU0 = {"gpu": "0", "uuid": "GPU-fake-0"}
MEMORY_TEMPERATURE = (pynvml.NVML_FI_DEV_MEMORY_TEMP, 0)
ENERGY = (pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, 0)
ULL = (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    nvml = FakeNvml()
    nvml.install(monkeypatch)
    return nvml


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_unsupported_call_is_not_asked_again_until_the_reprobe(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.fail[("nvmlDeviceGetFanSpeed", 0)] = nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
    fans = _counting(fake, monkeypatch, "nvmlDeviceGetFanSpeed")
    clock = Clock()
    collector = GpuCollector(supervisor_for(NvmlBackend(clock=clock)), 1.0, 1.0)
    for _ in range(3):
        assert value(samples(collector), "mlwarden_gpu_fan_speed_ratio", **GPU0) is None
        clock.now += 1.0
    assert [args[0].index for args in fans].count(0) == 1
    del fake.fail[("nvmlDeviceGetFanSpeed", 0)]  # a fan appears (say, a firmware update): not seen before the re-probe
    clock.now += nvml_backend.REPROBE_S - 10
    assert value(samples(collector), "mlwarden_gpu_fan_speed_ratio", **GPU0) is None
    clock.now += 10
    assert value(samples(collector), "mlwarden_gpu_fan_speed_ratio", **GPU0) == 0.4


# Every per-pass and slow reading of GPU 1, changed: the values a warm collector must not serve from what it kept.
_CHANGED_GPU1 = {
    "nvmlDeviceGetTemperature": 83, "nvmlDeviceGetPowerUsage": 611_000, "nvmlDeviceGetFanSpeed": 95,
    "nvmlDeviceGetPerformanceState": 2, "nvmlDeviceGetClockInfo": 1410, "nvmlDeviceGetCurrentClocksEventReasons": 0x1 | 0x8,
    "nvmlDeviceGetCurrPcieLinkGeneration": 3, "nvmlDeviceGetCurrPcieLinkWidth": 8,
    "nvmlDeviceGetUtilizationRates": SimpleNamespace(gpu=97, memory=88),
    "nvmlDeviceGetEncoderUtilization": [1, 167_000], "nvmlDeviceGetDecoderUtilization": [2, 167_000],
    "nvmlDeviceGetMemoryInfo": SimpleNamespace(total=80_000 * MIB, used=70_000 * MIB, free=9_500 * MIB, reserved=500 * MIB),
    "nvmlDeviceGetEnforcedPowerLimit": 500_000, "nvmlDeviceGetTotalEnergyConsumption": 9_000_000,
}


def test_a_warm_collector_renders_what_a_fresh_one_renders_after_every_reading_of_a_gpu_changed(fake: FakeNvml) -> None:
    """The collector and backend keep label tuples, throttle samples, counter samples and prepared calls between
    passes: after GPU 1's readings all change, the next pass's text must be byte for byte what a collector that
    never saw the old values renders (none of what was kept may leak a stale value)."""
    clock = Clock()
    warm = GpuCollector(supervisor_for(NvmlBackend(clock=clock)), 1.0, 1.0)
    renderer = exposition.Renderer()  # kept across passes, as the snapshot store keeps it
    before = [renderer.render(warm.collect().made()) for _ in range(2)]
    assert before[0] != before[1]  # GPM needs two samples
    clock.now += 1.0
    assert renderer.render(warm.collect().made()) == before[1]
    for name, answer in _CHANGED_GPU1.items():
        fake.fail[(name, 1)] = answer
    clock.now += nvml_backend.SLOW_REFRESH_S  # counters and slow facts are due again too
    after = renderer.render(warm.collect().made())
    fresh = GpuCollector(supervisor_for(NvmlBackend(clock=clock)), 1.0, 1.0)
    fresh.collect()  # its first GPM sample
    expected = exposition.render(fresh.collect().made())
    assert after == expected and after != before[1]
    found = samples(warm)
    gpu1 = {"gpu": "1", "uuid": "GPU-fake-1"}
    assert value(found, "mlwarden_gpu_temperature_celsius", **gpu1) == 83
    assert value(found, "mlwarden_gpu_throttle_reason_active", **gpu1, reason="hw_slowdown") == 1
    assert value(found, "mlwarden_gpu_throttle_reason_active", **gpu1, reason="hw_thermal_slowdown") == 0
    assert value(found, "mlwarden_gpu_throttle_reason_active", gpu="0", uuid="GPU-fake-0", reason="hw_thermal_slowdown") == 1
    assert value(found, "mlwarden_gpu_energy_joules_total", **gpu1) == 9000


def test_a_direct_getter_answering_not_supported_or_lost_is_handled_as_a_call_through_pynvml(fake: FakeNvml) -> None:
    """The getters a pass calls directly (their C functions, in one loop) answer errors as return codes: "not
    supported" omits the series and is not asked again until the re-probe; any other error is that GPU lost only."""
    clock = Clock()
    backend = NvmlBackend(clock=clock)
    collector = GpuCollector(supervisor_for(backend), 1.0, 1.0)
    samples(collector)
    codes: dict[int, int] = {0: pynvml.NVML_ERROR_NOT_SUPPORTED}
    asked: list[int] = []

    def fan_speed(handle: object, out: object) -> int:  # what NVML's C function does: a return code, the answer in out
        asked.append(handle.index)  # type: ignore[attr-defined]  # the fake's handles
        code = codes.get(handle.index, pynvml.NVML_SUCCESS)  # type: ignore[attr-defined]
        if code == pynvml.NVML_SUCCESS:
            getter.scalar.value = 55
        return code

    getter = nvml_backend._Getter("nvmlDeviceGetFanSpeed", fan_speed, (ctypes.c_uint,))
    backend._get = dataclasses.replace(backend._get, fan=getter)
    backend._prepared.clear()
    for _ in range(2):
        clock.now += 1.0
        found = samples(collector)
        assert value(found, "mlwarden_gpu_fan_speed_ratio", **GPU0) is None
        assert value(found, "mlwarden_gpu_fan_speed_ratio", gpu="1", uuid="GPU-fake-1") == 0.55
    assert asked == [0, 1, 1]  # GPU 0's "not supported" is remembered
    clock.now += nvml_backend.REPROBE_S
    del codes[0]
    codes[1] = pynvml.NVML_ERROR_GPU_IS_LOST
    found = samples(collector)
    assert value(found, "mlwarden_gpu_fan_speed_ratio", **GPU0) == 0.55
    assert value(found, "mlwarden_gpu_up", **GPU0) == 1 and value(found, "mlwarden_gpu_up", gpu="1", uuid="GPU-fake-1") == 0
    assert value(found, "mlwarden_gpu_temperature_celsius", gpu="1", uuid="GPU-fake-1") is None


def test_an_unsupported_field_is_left_out_of_the_request_until_the_reprobe(fake: FakeNvml) -> None:
    del fake.field_values[MEMORY_TEMPERATURE]
    clock = Clock()
    collector = GpuCollector(supervisor_for(NvmlBackend(clock=clock)), 1.0, 1.0)
    assert value(samples(collector), "mlwarden_gpu_memory_temperature_celsius", **GPU0) is None
    assert MEMORY_TEMPERATURE in fake.field_requests[0]
    fake.field_requests.clear()
    clock.now += 1.0
    samples(collector)
    assert fake.field_requests == []  # the one field a pass reads between counter reads: no call at all
    fake.field_values[MEMORY_TEMPERATURE] = (pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, "uiVal", 71)
    clock.now += nvml_backend.REPROBE_S
    assert value(samples(collector), "mlwarden_gpu_memory_temperature_celsius", **GPU0) == 71


def test_counters_come_from_one_field_values_call_and_appear_in_every_pass_between_reads(
    fake: FakeNvml, monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake.field_values[ENERGY] = (*ULL, 2_000_000)  # mJ; the call would answer 1 500 000
    fake.field_values[(pynvml.NVML_FI_DEV_PERF_POLICY_THERMAL, 0)] = (*ULL, 4 * 10**9)  # ns
    fake.field_values[(pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL, 0)] = (*ULL, 7)
    energy_calls = _counting(fake, monkeypatch, "nvmlDeviceGetTotalEnergyConsumption")
    violation_calls = _counting(fake, monkeypatch, "nvmlDeviceGetViolationStatus")
    clock = Clock()
    collector = GpuCollector(supervisor_for(NvmlBackend(clock=clock)), 1.0, 1.0)
    for _ in range(3):  # within COUNTER_REFRESH_S: read once, served every pass
        found = samples(collector)
        assert value(found, "mlwarden_gpu_energy_joules_total", **GPU0) == 2000
        assert value(found, "mlwarden_gpu_clock_violation_seconds_total", **GPU0, reason="thermal") == 4
        assert value(found, "mlwarden_gpu_clock_violation_seconds_total", **GPU0, reason="power") == 2.5  # no field: its call
        assert value(found, "mlwarden_gpu_ecc_errors_total", **GPU0, error_type="uncorrected", counter="volatile") == 7
        assert value(found, "mlwarden_gpu_pcie_bytes_total", **GPU0, direction="tx") == 10**9
        assert value(found, "mlwarden_gpu_nvlink_up", **GPU0, link="0") == 1
        clock.now += 1.0
    assert energy_calls == []
    requests = [ids for ids in fake.field_requests if ENERGY in ids]
    assert len(requests) == 2  # one call per GPU in three passes
    assert len(violation_calls) == 2 * 7  # the seven policies without a field, once per GPU
    assert all(ids == [MEMORY_TEMPERATURE] for ids in fake.field_requests if ENERGY not in ids)
    fake.field_values[ENERGY] = (*ULL, 3_000_000)
    clock.now += nvml_backend.COUNTER_REFRESH_S
    assert value(samples(collector), "mlwarden_gpu_energy_joules_total", **GPU0) == 3000


def test_field_values_are_unpacked_from_the_bytes_as_their_value_type_says() -> None:
    bits = int.from_bytes((-5).to_bytes(8, "little", signed=True), "little")
    assert nvml_backend._from_bits(pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG, bits) == -5
    assert nvml_backend._from_bits(pynvml.NVML_VALUE_TYPE_SIGNED_INT, bits) == -5
    assert nvml_backend._from_bits(pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, bits) == 0xFFFFFFFB
    assert nvml_backend._from_bits(pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT, bits) == 0xFFFB
    assert nvml_backend._from_bits(pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, 2**63) == 2**63
    double = int.from_bytes(struct.pack("<d", 2.5), "little")
    assert nvml_backend._from_bits(pynvml.NVML_VALUE_TYPE_DOUBLE, double) == 2.5


class _Slow(Collector):
    name = "slow"
    interval = 5.0
    timeout = 5.0

    def collect(self) -> Collected:
        return Collected()


def test_the_watchdog_is_told_when_a_pass_will_be_overdue_and_marks_it_then() -> None:
    store = SnapshotStore([("slow", 5.0)], "test")
    runner = _Runner([_Slow()], store, StopSignal())
    assert runner.check_overdue(100.0) is None  # no pass in progress: nothing to wake for
    runner.current, runner.pass_started = runner.collectors[0], 100.0
    assert runner.check_overdue(101.0) == 105.0
    assert 'collector_success{collector="slow"} 0.0' in store.snapshot.body.decode()  # never succeeded yet
    store.publish("slow", Collected([_gauge("mlwarden_test_slow", 1.0)]), 0.1)
    assert runner.check_overdue(105.5) is None
    assert "mlwarden_test_slow" not in store.snapshot.body.decode()  # stale: dropped


class _Counting(Collector):
    """A collector that counts its passes; ``hang`` blocks them until it is set again."""

    def __init__(self, name: str, *, light: bool, interval: float = 0.05, timeout: float = 0.2, group: str | None = None) -> None:
        self.name, self.light, self.interval, self.timeout, self.group = name, light, interval, timeout, group
        self.passes = 0
        self.threads: set[str] = set()
        self.go = threading.Event()
        self.go.set()

    def collect(self) -> Collected:
        self.passes += 1
        self.threads.add(threading.current_thread().name)
        assert self.go.wait(30)
        return Collected([_gauge(f"mlwarden_test_{self.name}", float(self.passes))])


def _loop_of(*collectors: _Counting) -> tuple[CollectionLoop, SnapshotStore]:
    store = SnapshotStore([(c.name, c.interval) for c in collectors], "test")
    return CollectionLoop(collectors, store), store


def test_light_collectors_of_one_interval_share_a_thread_and_each_keeps_its_own_success_and_duration() -> None:
    gpu, lightweight, xid, slow = (_Counting("gpu", light=False), _Counting("own", light=True),
                                   _Counting("xid", light=True), _Counting("slowlight", light=True, interval=0.07))
    loop, store = _loop_of(gpu, lightweight, xid, slow)
    loop.start()
    try:
        wait_until(lambda: min(c.passes for c in (gpu, lightweight, xid, slow)) >= 3, 20, "three passes of each")
    finally:
        loop.stop()
    assert gpu.threads == {"collector-gpu"}
    assert lightweight.threads == xid.threads == {"collector-own+xid"}  # one thread, one wakeup a round for both
    assert slow.threads == {"collector-slowlight"}  # another interval: its own schedule
    body = store.snapshot.body.decode()
    for name in ("gpu", "own", "xid", "slowlight"):
        assert f'mlwarden_exporter_collector_success{{collector="{name}"}} 1.0' in body
        assert f'mlwarden_exporter_collector_duration_seconds{{collector="{name}"}}' in body
    # no watchdog thread of its own: the light thread watches
    assert not any(t.name == "collector-watchdog" for t in threading.enumerate())


@pytest.mark.parametrize("with_light", [True, False])
def test_a_hung_pass_is_marked_stale_by_the_light_thread_or_a_bare_watchdog(with_light: bool) -> None:
    hung = _Counting("gpu", light=False)
    light = [_Counting("own", light=True)] if with_light else []
    loop, store = _loop_of(hung, *light)
    loop.start()
    try:
        wait_until(lambda: 'collector_success{collector="gpu"} 1.0' in store.snapshot.body.decode(), 20, "a first pass")
        hung.go.clear()
        wait_until(lambda: 'collector_success{collector="gpu"} 0.0' in store.snapshot.body.decode(), 20, "the hung pass marked stale")
        assert "mlwarden_test_gpu" not in store.snapshot.body.decode()
        if light:  # the light collectors go on while the other pass hangs
            seen = light[0].passes
            wait_until(lambda: light[0].passes > seen + 2, 20, "more light passes")
        hung.go.set()
        wait_until(lambda: 'collector_success{collector="gpu"} 1.0' in store.snapshot.body.decode(), 20, "the collector to recover")
    finally:
        hung.go.set()
        loop.stop()
    names = {t.name for t in threading.enumerate()}
    assert "collector-gpu" not in names


def test_the_nvml_collectors_share_a_thread_and_a_hung_call_marks_them_all_stale_until_it_returns() -> None:
    gpu, processes, alone = (_Counting("gpu", light=False, group="nvml"), _Counting("processes", light=False, group="nvml"),
                             _Counting("jobs", light=False))
    loop, store = _loop_of(gpu, processes, alone)

    def success(name: str) -> str:
        line = next(line for line in store.snapshot.body.decode().splitlines() if f'collector_success{{collector="{name}"}}' in line)
        return line.rsplit(" ", 1)[1]

    loop.start()
    try:
        wait_until(lambda: processes.passes >= 2 and alone.passes >= 1, 20, "passes of each")
        assert gpu.threads == processes.threads == {"collector-gpu+processes"}
        assert alone.threads == {"collector-jobs"}  # no group: a thread of its own
        gpu.go.clear()
        wait_until(lambda: success("gpu") == "0.0" and success("processes") == "0.0", 20, "both marked stale")
        body = store.snapshot.body.decode()
        assert "mlwarden_test_gpu" not in body and "mlwarden_test_processes" not in body
        seen = alone.passes
        wait_until(lambda: alone.passes > seen + 2, 20, "the collector in its own thread to go on")
        assert success("jobs") == "1.0"
        gpu.go.set()
        wait_until(lambda: success("gpu") == "1.0" and success("processes") == "1.0", 20, "both to recover")
    finally:
        gpu.go.set()
        loop.stop()


def _gauge(name: str, value: float) -> exposition.Family:
    family = exposition.gauge(name, "A test gauge.")
    family.add_metric([], value)
    return family


def _render_blocks(monkeypatch: pytest.MonkeyPatch, name: str) -> tuple[threading.Event, threading.Event]:
    """Rendering the family ``name`` sets the first event and waits for the second."""
    entered, release = threading.Event(), threading.Event()
    original = exposition.Renderer.render

    def slow(self: exposition.Renderer, families: list[exposition.Family]) -> bytes:
        if any(family.name == name for family in families):
            entered.set()
            assert release.wait(30)
        return original(self, families)

    monkeypatch.setattr(exposition.Renderer, "render", slow)
    return entered, release


def test_a_scrape_during_rendering_gets_the_previous_complete_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    store = SnapshotStore([("a", 1.0), ("b", 1.0)], "9.9")
    store.publish("a", Collected([_gauge("mlwarden_test_a", 1.0)]), 0.01)
    store.publish("b", Collected([_gauge("mlwarden_test_b", 1.0)]), 0.01)
    before = store.snapshot.body  # scraped: the next pass is rendered when it is published
    entered, release = _render_blocks(monkeypatch, "mlwarden_test_a")
    publisher = threading.Thread(target=store.publish, args=("a", Collected([_gauge("mlwarden_test_a", 2.0)]), 0.01))
    publisher.start()
    try:
        assert entered.wait(30)
        assert store.snapshot.ready(False) == before  # served at once, whole, while the new one is made
        assert store.snapshot.ready(True) is None  # never asked for gzip: made by the server's worker when asked
    finally:
        release.set()
        publisher.join(30)
    after = store.snapshot.ready(False)
    assert after is not None and b"mlwarden_test_a 2.0\n" in after and b"mlwarden_test_b 1.0\n" in after


def test_a_snapshot_published_later_is_not_replaced_by_one_made_earlier(monkeypatch: pytest.MonkeyPatch) -> None:
    store = SnapshotStore([("a", 1.0), ("b", 1.0)], "9.9")
    store.publish("a", Collected([_gauge("mlwarden_test_a", 1.0)]), 0.01)
    assert store.snapshot.body
    original = exposition.Renderer.render
    entered, release = _render_blocks(monkeypatch, "mlwarden_test_a")
    publisher = threading.Thread(target=store.publish, args=("a", Collected([_gauge("mlwarden_test_a", 2.0)]), 0.01))
    publisher.start()
    assert entered.wait(30)
    monkeypatch.setattr(exposition.Renderer, "render", original)
    store.mark_stale("b")  # made after a's pass was assembled, served before it is rendered
    release.set()
    publisher.join(30)
    body = store.snapshot.body
    assert b'collector_success{collector="b"} 0.0' in body and b"mlwarden_test_a 2.0\n" in body


def test_the_gzip_body_is_the_plain_body_compressed_and_reuses_unchanged_parts() -> None:
    store = SnapshotStore([("a", 1.0), ("b", 1.0), ("empty", 1.0)], "9.9")
    big = exposition.gauge("mlwarden_test_big", "A test gauge.", labels=["n"])
    for n in range(5000):
        big.add_metric([str(n)], n * 1.5)
    store.publish("a", Collected([big]), 0.01)
    store.publish("b", Collected([_gauge("mlwarden_test_b", 1.0)]), 0.01)
    store.publish("empty", Collected([]), 0.01)
    for published in range(2):
        snapshot = store.snapshot
        body, gzipped = snapshot.body, snapshot.gzipped
        assert gzip.decompress(gzipped) == body
        stream = zlib.decompressobj(wbits=31)  # one gzip member, as Go's and zlib's readers expect
        assert stream.decompress(gzipped) == body and stream.eof and stream.unused_data == b""
        assert len(gzipped) * 5 < len(body)
        assert snapshot.gzipped is gzipped  # made once, shared by every scrape of this snapshot
        if not published:
            store.publish("b", Collected([_gauge("mlwarden_test_b", 2.0)]), 0.01)
    assert b"mlwarden_test_b 2.0\n" in gzip.decompress(store.snapshot.gzipped)


def test_a_snapshot_rendered_late_shows_the_collector_states_of_its_own_publication() -> None:
    """The success, duration and freshness families are made only when a snapshot is rendered: from the
    states captured when it was published, not from the states at rendering time."""
    now = [1000.0]
    store = SnapshotStore([("gpu", 1.0)], "test", wall=lambda: now[0], monotonic=lambda: now[0])
    gauge = exposition.gauge("mlwarden_test", "test.")
    store.publish("gpu", Collected([gauge], success=True), 0.25)
    published = store.snapshot
    now[0] = 2000.0
    store.publish("gpu", Collected([gauge], success=False), 0.5)
    early, late = published.body.decode(), store.snapshot.body.decode()
    assert 'mlwarden_exporter_collector_success{collector="gpu"} 1.0' in early
    assert 'mlwarden_exporter_collector_duration_seconds{collector="gpu"} 0.25' in early
    assert 'mlwarden_exporter_collector_success{collector="gpu"} 0.0' in late
    assert 'mlwarden_exporter_collector_duration_seconds{collector="gpu"} 0.5' in late
    assert 'mlwarden_exporter_last_collection_timestamp_seconds{collector="gpu"} 1000.0' in late  # the last success


def test_a_pass_makes_its_series_only_when_rendered_and_a_late_render_shows_that_pass(
        fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gpu and processes passes leave their series to the rendering of their snapshot: an unscraped pass makes
    none, and a snapshot rendered after later passes (a slow scrape's) still shows its own pass's readings."""
    fake.processes = {0: [(4242, 100 * MIB)]}
    supervisor = supervisor_for(NvmlBackend())
    gpu, processes = GpuCollector(supervisor, 1.0, 1.0), ProcessesCollector(supervisor, 1.0, 1.0, 8)
    made = []
    for cls in (GpuCollector, ProcessesCollector):
        original = cls._families

        def counted(self: object, *args: object, original: Callable[..., object] = original) -> object:
            made.append(type(self).__name__)
            return original(self, *args)

        monkeypatch.setattr(cls, "_families", counted)
    store = SnapshotStore([("gpu", 1.0), ("processes", 1.0)], "9.9")
    snapshots = []
    for celsius, used in ((61, 100), (62, 200), (63, 300)):
        fake.fail[("nvmlDeviceGetTemperature", 0)] = celsius
        fake.processes = {0: [(4242, used * MIB)]}
        store.publish("gpu", gpu.collect(), 0.01)
        store.publish("processes", processes.collect(), 0.01)
        snapshots.append(store.snapshot)
    assert made == []  # nobody scraped: no series made
    for snapshot, (celsius, used) in reversed(list(zip(snapshots, ((61, 100), (62, 200), (63, 300)), strict=True))):
        body = snapshot.body.decode()
        assert f'mlwarden_gpu_temperature_celsius{{gpu="0",uuid="GPU-fake-0"}} {float(celsius)}\n' in body
        assert f'pid="4242",pod="",process="",slurm_job="",user="",uuid="GPU-fake-0"}} {exposition.format_value(used * MIB)}\n' in body
    assert sorted(made) == ["GpuCollector"] * 3 + ["ProcessesCollector"] * 3


def test_rendering_a_pass_asks_nvml_nothing(fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass reads NVML; the conversion of its answers into readings and series waits for the render, which
    runs in a scrape's worker thread: it must not call NVML (a hung GPU would hang the scrape)."""
    fake.processes = {0: [(4242, 100 * MIB)]}
    supervisor = supervisor_for(NvmlBackend())
    gpu, processes = GpuCollector(supervisor, 1.0, 1.0), ProcessesCollector(supervisor, 1.0, 1.0, 8)
    gpu.collect()  # GPM's first sample
    passes = [gpu.collect(), processes.collect()]

    def hung(*args: object) -> None:
        raise AssertionError("NVML called while rendering")

    for name in dir(pynvml):
        if name.startswith("nvml") and callable(getattr(pynvml, name)):
            monkeypatch.setattr(pynvml, name, hung)
    text = exposition.render([family for collected in passes for family in collected.made()]).decode()
    for series in ('mlwarden_gpu_temperature_celsius{gpu="1",uuid="GPU-fake-1"} 61.0', 'mlwarden_gpu_sm_activity_ratio{gpu="0"',
                   'mlwarden_gpu_pcie_throughput_bytes_per_second{direction="rx",gpu="1"', 'mlwarden_gpu_process_memory_used_bytes{'):
        assert series in text


def test_the_stop_signal_wakes_every_runner_and_stays_set() -> None:
    stop = StopSignal()
    assert stop.wait(0.01) is False and not stop.is_set()
    woken: list[bool] = []
    waiters = [threading.Thread(target=lambda: woken.append(stop.wait(60))) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    stop.set()
    stop.set()  # twice: still set, no error
    for waiter in waiters:
        waiter.join(30)
    assert woken == [True, True, True] and stop.is_set() and stop.wait(0) is True
