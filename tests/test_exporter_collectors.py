"""The collectors that read the machine rather than the GPU: backups, artifacts, process
identity; plus the snapshot's freshness bookkeeping and the simulated backend."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from mlwarden.exporter import procinfo
from mlwarden.exporter.backends.base import GpuLost, XidEvent
from mlwarden.exporter.backends.simulated import SimulatedBackend
from mlwarden.exporter.backends.supervisor import BackendSupervisor
from mlwarden.exporter.collectors import xid as xid_module
from mlwarden.exporter.collectors.artifacts import ArtifactsCollector
from mlwarden.exporter.collectors.backups import BackupsCollector
from mlwarden.exporter.collectors.base import Collected, Collector
from mlwarden.exporter.collectors.xid import XidCollector
from mlwarden.exporter.snapshot import SnapshotStore, render
from prometheus_client.parser import text_string_to_metric_families

from mlwarden.catalog import Catalog, FileRecord, Manifest, OffsiteCopy, Verification


def samples(collector: Collector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = render(collector.collect().made()).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _backup(root: Path, name: str, finished_at: float, archive_bytes: int) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    Catalog.commit(directory, Manifest(
        name=name, source="/models", host="gpu01", started_at=finished_at - 60, finished_at=finished_at,
        compression="zstd", level=3, archive=f"{name}.tar.zst", archive_bytes=archive_bytes,
        archive_sha256="0" * 64, total_bytes=archive_bytes * 2,
        files=(FileRecord(path="model.pt", size=archive_bytes * 2, sha256="1" * 64, mtime=finished_at - 100),),
    ))
    return directory


def test_backups_collector_reads_the_catalog(tmp_path: Path) -> None:
    root = tmp_path / "backups"
    _backup(root, "models-20260101T000000Z", 1_767_225_600.0, 1000)
    newest = Catalog.read(_backup(root, "models-20260102T000000Z", 1_767_312_000.0, 3000))
    assert newest is not None
    (root / "models-20260103T000000Z").mkdir()  # an interrupted run: no manifest
    labels = (("backup_dir", str(root)),)
    collector = BackupsCollector(root, 60.0, 60.0)

    found = samples(collector)
    assert found[("mlwarden_backups", labels)] == 2
    assert found[("mlwarden_backup_newest_timestamp_seconds", labels)] == 1_767_312_000.0
    assert found[("mlwarden_backup_size_bytes", labels)] == 4000
    assert found[("mlwarden_backup_incomplete", labels)] == 1
    assert found[("mlwarden_backup_newest_offsite", labels)] == 0
    assert ("mlwarden_backup_newest_verified", labels) not in found  # never verified: absent, not 0

    Catalog.update_status(newest, verification=Verification(checked_at=time.time(), ok=False, detail="sha mismatch"))
    assert samples(collector)[("mlwarden_backup_newest_verified", labels)] == 0
    entry = Catalog.read(newest.directory)
    assert entry is not None
    entry = Catalog.update_status(entry, verification=Verification(checked_at=time.time(), ok=True))
    Catalog.update_status(entry, offsite=OffsiteCopy(uploaded_at=time.time(), bucket="b", key="k", sha256="0" * 64))
    found = samples(collector)
    assert found[("mlwarden_backup_newest_verified", labels)] == 1
    assert found[("mlwarden_backup_newest_offsite", labels)] == 1


def test_an_unreadable_manifest_is_counted_every_pass_and_logged_once_per_change(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "backups"
    _backup(root, "models-20260101T000000Z", 1_767_225_600.0, 1000)
    broken = _backup(root, "models-20260102T000000Z", 1_767_312_000.0, 3000)
    good_manifest = (broken / "manifest.json").read_text()
    labels = (("backup_dir", str(root)),)
    collector = BackupsCollector(root, 60.0, 60.0)

    def passes(n: int, incomplete: int, backups: int) -> int:
        """Run ``n`` passes, check the counts of each, and return the warnings about the broken backup."""
        caplog.clear()
        for _ in range(n):
            found = samples(collector)
            assert found[("mlwarden_backup_incomplete", labels)] == incomplete
            assert found[("mlwarden_backups", labels)] == backups
        return len([r for r in caplog.records if str(broken) in r.getMessage()])

    with caplog.at_level(logging.WARNING):
        (broken / "manifest.json").write_text("{not json")
        assert passes(3, incomplete=1, backups=1) == 1  # counted every pass, said once
        (broken / "manifest.json").write_text('{"name": "truncated"}')
        assert passes(3, incomplete=1, backups=1) == 1  # it changed: said again, once
        (broken / "manifest.json").write_text(good_manifest)
        assert passes(2, incomplete=0, backups=2) == 0
        (broken / "manifest.json").write_text('{"name": "truncated"}')  # the same damage as before, but new
        assert passes(2, incomplete=1, backups=1) == 1
        stat = (broken / "manifest.json").stat()
        os.utime(broken / "manifest.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten, same bytes
        assert passes(2, incomplete=1, backups=1) == 1


def test_backups_collector_on_a_missing_directory_reports_zero_backups(tmp_path: Path) -> None:
    root = tmp_path / "not-yet"
    found = samples(BackupsCollector(root, 60.0, 60.0))
    assert found[("mlwarden_backups", (("backup_dir", str(root)),))] == 0
    assert not any(name == "mlwarden_backup_newest_timestamp_seconds" for name, _ in found)


def test_artifacts_collector_sizes_trees_without_following_symlinks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    experiments = tmp_path / "experiments"
    (experiments / "run1" / "ckpt").mkdir(parents=True)
    (experiments / "run1" / "ckpt" / "a.pt").write_bytes(b"a" * 1000)
    (experiments / "run1" / "log.txt").write_bytes(b"b" * 24)
    (experiments / "escape").symlink_to("/usr")  # must not be walked
    missing = tmp_path / "gone"
    collector = ArtifactsCollector([experiments, missing], 60.0, 60.0)
    with caplog.at_level(logging.WARNING):
        collected = collector.collect()
        collector.collect()
    assert not collected.success  # one directory is missing
    assert len([r for r in caplog.records if str(missing) in r.getMessage()]) == 1  # said once, not every pass
    found = samples(collector)
    labels = (("directory", str(experiments)),)
    assert found[("mlwarden_artifacts_size_bytes", labels)] == 1024
    assert found[("mlwarden_artifacts_files", labels)] == 2
    stats = os.statvfs(experiments)
    assert found[("mlwarden_artifacts_filesystem_size_bytes", labels)] == stats.f_blocks * stats.f_frsize
    assert found[("mlwarden_artifacts_filesystem_free_bytes", labels)] > 0
    assert not any(dict(lbl).get("directory") == str(missing) for _, lbl in found)


@pytest.mark.parametrize(("cgroup", "expected"), [
    ("0::/system.slice/docker-3f1c9d1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6.scope\n", "3f1c9d1a2b3c"),
    ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_5f60_7182_93a4_b5c6d7e8f901.slice\n",
     "pod1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901"),
    ("0::/user.slice/user-1000.slice/session-3.scope\n", ""),
])
def test_container_of_cgroup(cgroup: str, expected: str) -> None:
    assert procinfo.container_of(cgroup) == expected


def test_describe_a_real_process_and_a_gone_one() -> None:
    me = procinfo.describe(os.getpid())
    assert me.name and me.workload.user
    assert procinfo.describe(2**22 + 12345) == procinfo.ProcessInfo()


def test_xid_series_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xid_module, "MAX_SERIES", 3)
    collector = XidCollector(BackendSupervisor(SimulatedBackend(gpus=1)), 1.0, 1.0)
    for code in (13, 31, 43, 48, 79):
        collector.record(XidEvent(gpu=0, xid=code, timestamp=1.0))
    collector.record(XidEvent(gpu=0, xid=13, timestamp=2.0))
    found = samples(collector)
    counted = {dict(lbl)["xid"]: v for (name, lbl), v in found.items() if name == "mlwarden_gpu_xid_errors_total"}
    assert counted == {"13": 2, "31": 1, "43": 1}


def _xid_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == xid_module.__name__]
    caplog.clear()
    return lines


def test_an_xid_storm_logs_one_line_per_gpu_and_code_per_pass_and_counts_every_event(caplog: pytest.LogCaptureFixture) -> None:
    backend = SimulatedBackend(gpus=2)
    collector = XidCollector(BackendSupervisor(backend), 1.0, 1.0)

    def deliver() -> None:  # what the listener thread does with each batch the backend hands over
        for event in backend.wait_xid_events(0.01):
            collector.record(event)

    def xid_total(found: dict, gpu: str, xid: str) -> float:
        return next(v for (name, lbl), v in found.items()
                    if name == "mlwarden_gpu_xid_errors_total" and dict(lbl)["gpu"] == gpu and dict(lbl)["xid"] == xid)

    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            backend.inject(1, "xid", xid=79, count=1000)
            deliver()
        backend.inject(0, "xid", xid=48, count=1)
        deliver()
        found = samples(collector)
        assert _xid_lines(caplog) == [
            "GPU 0 reported XID 48 (1 time since the last report)",
            "GPU 1 reported XID 79 (3000 times since the last report)",
        ]
        assert xid_total(found, "1", "79") == 3000
        assert xid_total(found, "0", "48") == 1

        found = samples(collector)  # a pass without new events says nothing
        assert _xid_lines(caplog) == []
        assert xid_total(found, "1", "79") == 3000

        backend.inject(1, "xid", xid=79, count=250)
        deliver()
        found = samples(collector)
        assert _xid_lines(caplog) == ["GPU 1 reported XID 79 (250 times since the last report)"]
        assert xid_total(found, "1", "79") == 3250


def test_simulated_backend_moves_and_faults() -> None:
    now = [1000.0]
    backend = SimulatedBackend(gpus=2, processes_per_gpu=4, clock=lambda: now[0])
    first = backend.read(0)
    now[0] += 30
    second = backend.read(0)
    assert first.temperature_celsius != second.temperature_celsius
    assert second.energy_joules is not None and second.energy_joules > 0
    assert len(backend.processes(1)) == 4
    backend.inject(0, "lose")
    with pytest.raises(GpuLost):
        backend.read(0)
    backend.inject(0, "xid", xid=43, count=2)
    assert [e.xid for e in backend.wait_xid_events(0.01)] == [43, 43]
    assert backend.wait_xid_events(0.01) == []
    with pytest.raises(ValueError):
        backend.inject(5, "lose")


class _Fixed(Collector):
    name = "fixed"
    interval = 1.0
    timeout = 1.0

    def collect(self) -> Collected:
        return Collected()


def test_snapshot_freshness_and_staleness() -> None:
    now = [100.0]
    store = SnapshotStore([("fixed", 1.0)], "9.9", wall=lambda: 1e9 + now[0], monotonic=lambda: now[0])
    assert store.stale_collectors() == []  # grace period after start
    now[0] += 3.5
    assert store.stale_collectors() == ["fixed"]
    store.publish("fixed", Collected(), 0.01)
    assert store.stale_collectors() == []
    body = store.snapshot.body.decode()
    assert 'mlwarden_exporter_collector_success{collector="fixed"} 1.0' in body
    assert 'mlwarden_exporter_collector_duration_seconds{collector="fixed"} 0.01' in body
    assert 'mlwarden_exporter_build_info{version="9.9"} 1.0' in body
    assert 'mlwarden_exporter_last_collection_timestamp_seconds{collector="fixed"} 1.0000001035e+09' in body
    store.mark_stale("fixed")
    assert 'mlwarden_exporter_collector_success{collector="fixed"} 0.0' in store.snapshot.body.decode()


def test_a_pass_is_rendered_only_when_scraped_and_then_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlwarden.exporter import exposition

    rendered: list[list[str]] = []
    original = exposition.Renderer.render

    def counting(self: exposition.Renderer, families: list[exposition.Family]) -> bytes:
        rendered.append([family.name for family in families])
        return original(self, families)

    def tests_rendered() -> list[list[str]]:
        return [names for names in rendered if names and names[0].startswith("mlwarden_test_")]

    monkeypatch.setattr(exposition.Renderer, "render", counting)
    store = SnapshotStore([("a", 1.0), ("b", 1.0)], "9.9")

    def publish(name: str, value: float) -> None:
        family = exposition.gauge(f"mlwarden_test_{name}", "A test gauge.")
        family.add_metric([], value)
        store.publish(name, Collected([family]), 0.01)

    for value in range(5):  # passes nobody scrapes are collected, not formatted
        publish("a", value)
        publish("b", value)
    assert tests_rendered() == []
    body = store.snapshot.body.decode()
    assert "mlwarden_test_a 4.0\n" in body and "mlwarden_test_b 4.0\n" in body
    assert tests_rendered() == [["mlwarden_test_a"], ["mlwarden_test_b"]]
    rendered.clear()
    assert store.snapshot.gzipped and store.snapshot.body.decode() == body  # later scrapes share the text
    publish("b", 5.0)  # the snapshot it replaces was scraped: rendered now, in the collector's thread
    assert tests_rendered() == [["mlwarden_test_b"]]
    publish("b", 6.0)  # the one it replaces was not: left for a scrape
    assert tests_rendered() == [["mlwarden_test_b"]]
    body = store.snapshot.body.decode()  # a's part is shared by the new snapshot: rendered already, not again
    assert "mlwarden_test_a 4.0\n" in body and "mlwarden_test_b 6.0\n" in body
    assert tests_rendered() == [["mlwarden_test_b"], ["mlwarden_test_b"]]


def test_processes_collector_works_without_the_gpu_collector() -> None:
    from mlwarden.exporter.collectors.processes import ProcessesCollector

    supervisor = BackendSupervisor(SimulatedBackend(gpus=2, processes_per_gpu=2))  # nobody started it yet
    found = samples(ProcessesCollector(supervisor, 1.0, 1.0, max_processes=8))
    uuids = {dict(lbl)["uuid"] for (name, lbl) in found if name == "mlwarden_gpu_process_memory_used_bytes"}
    assert uuids == {"GPU-5e1a7ed0-0000-4000-8000-000000000000", "GPU-5e1a7ed0-0000-4000-8000-000000000001"}
    assert supervisor.uuid(1) == "GPU-5e1a7ed0-0000-4000-8000-000000000001"
