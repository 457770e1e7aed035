"""The shared pieces: crash-safe files, the job lock, log redaction, the catalog, job reports."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from mlwarden.jobs.report import JobReport

from mlwarden import catalog, fsutil, logs
from mlwarden.lock import JobLock, LockHeld


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "data.json"
    fsutil.atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), fsutil.atomic_writer(target) as handle:
        handle.write(b"half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]


def test_lock_refuses_a_second_holder_and_survives_kill_9(tmp_path: Path) -> None:
    lock_path = tmp_path / "job.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from mlwarden.lock import JobLock
            JobLock({str(lock_path)!r}).acquire()
            print("held", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld, match=f"pid {holder.pid}"):
            JobLock(lock_path).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        with JobLock(lock_path):  # the stale file is no obstacle
            pass
    finally:
        holder.kill()


def test_redaction_masks_secrets_in_messages_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logs.register_secret("https://hooks.slack.com/services/T000/B000/XXXXSECRET")
    logger = logging.getLogger("test.redact")
    handler_filter = logs.RedactingFilter()
    logger.addFilter(handler_filter)
    try:
        with caplog.at_level(logging.INFO):
            logger.info("posting to %s", "https://hooks.slack.com/services/T000/B000/XXXXSECRET")
            try:
                raise ValueError("bad url https://hooks.slack.com/services/T000/B000/XXXXSECRET")
            except ValueError:
                logger.exception("failed")
    finally:
        logger.removeFilter(handler_filter)
    assert "XXXXSECRET" not in caplog.text
    assert "posting to ***" in caplog.text


def _manifest(name: str, started: float) -> catalog.Manifest:
    return catalog.Manifest(
        name=name, source="/models", host="h", started_at=started, finished_at=started + 1,
        compression="zstd", level=3, archive=f"{name}.tar.zst", archive_bytes=10,
        archive_sha256="0" * 64, total_bytes=20,
        files=(catalog.FileRecord(path="w.bin", size=20, sha256="1" * 64, mtime=started),),
    )


def test_catalog_ignores_uncommitted_backups_and_orders_by_time(tmp_path: Path) -> None:
    for name, started in (("m-20200102T000000Z", 2000.0), ("m-20200101T000000Z", 1000.0)):
        (tmp_path / name).mkdir()
        catalog.Catalog.commit(tmp_path / name, _manifest(name, started))
    (tmp_path / "m-3").mkdir()  # interrupted: no manifest
    cat = catalog.Catalog(tmp_path)
    assert [e.name for e in cat.entries()] == ["m-20200101T000000Z", "m-20200102T000000Z"]
    assert cat.incomplete() == [tmp_path / "m-3"]
    latest = cat.get("latest")
    assert latest.verified is None
    updated = cat.update_status(latest, verification=catalog.Verification(checked_at=3000.0, ok=False, detail="hash"))
    assert cat.get("m-20200102T000000Z").verified is False and updated.verified is False
    with pytest.raises(catalog.CatalogError):
        cat.get("../etc")


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        return response.read().decode()


def _value(text: str, metric: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(metric + "{") and 'job="mlwarden_unittest"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_failed_run_keeps_the_last_success_in_the_pushgateway(pushgateway) -> None:
    with JobReport("unittest", pushgateway=pushgateway.url) as report:
        report.gauge("mlwarden_unittest_files", "files").set(7)
        report.succeeded()
    first = _scrape(pushgateway.url)
    success_at = _value(first, "mlwarden_job_last_success_timestamp_seconds")
    assert success_at is not None and _value(first, "mlwarden_job_success") == 1
    time.sleep(0.01)
    with JobReport("unittest", pushgateway=pushgateway.url):
        pass  # not marked successful
    second = _scrape(pushgateway.url)
    assert _value(second, "mlwarden_job_success") == 0
    assert _value(second, "mlwarden_job_last_success_timestamp_seconds") == success_at


def test_textfile_keeps_last_success_across_a_failure(tmp_path: Path) -> None:
    with JobReport("unittest", textfile_dir=tmp_path) as report:
        report.succeeded()
    with JobReport("unittest", textfile_dir=tmp_path):
        pass
    text = (tmp_path / "mlwarden_unittest.prom").read_text()
    assert "mlwarden_job_success 0.0" in text
    assert "mlwarden_job_last_success_timestamp_seconds " in text


def test_unreachable_pushgateway_does_not_fail_the_job(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING), JobReport("unittest", pushgateway="http://127.0.0.1:9") as report:
        report.succeeded()
    assert report.success
    assert "could not push" in caplog.text
