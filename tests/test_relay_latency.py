"""Steady latency on SQLite: no checkpoint runs in a commit or takes the write lock from it.

The latency itself is measured by bench/bench_relay.py (docs/benchmarks.md), never asserted
here; these tests pin the mechanism that keeps the stalls away.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import pytest

from mlwarden import components
from mlwarden.relay.store import sqlite as sqlite_store
from mlwarden.relay.store.sqlite import SQLiteStore
from tests.test_relay_support import accept, alert, body, make_config


def test_the_writer_never_checkpoints_in_a_commit(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "relay.db")
    try:
        assert store._read("PRAGMA wal_autocheckpoint") == [(0,)]  # type: ignore[attr-defined]
    finally:
        store.close()


def test_the_checkpointer_runs_passive_checkpoints_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    statements: list[str] = []
    lock = threading.Lock()
    connect = sqlite_store._connect

    def traced(path: Path) -> sqlite3.Connection:
        db = connect(path)

        def record(sql: str) -> None:
            with lock:
                statements.append(sql)

        db.set_trace_callback(record)
        return db

    monkeypatch.setattr(sqlite_store, "_connect", traced)
    store = SQLiteStore(tmp_path / "relay.db")
    try:
        config = make_config()
        for n in range(200):
            accept(store, config, body(alert(name=f"A{n}"), group_key=str(n)), 100.0 + n)

        def checkpoints() -> list[str]:
            with lock:
                return [s for s in statements if "wal_checkpoint" in s]

        seen = components.wait_until(lambda: len(checkpoints()) >= 3 and checkpoints(), 20, "checkpoint passes")
        assert all("PASSIVE" in statement for statement in seen)  # never RESTART or TRUNCATE: no commit waits
    finally:
        store.close()


def test_a_wal_that_outgrows_the_passive_passes_is_brought_back_once_and_said_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SQLiteStore(tmp_path / "relay.db")
    checkpointer = sqlite_store._Checkpointer(tmp_path / "relay.db", every=0.01, force_bytes=1)
    caplog.set_level(logging.WARNING, logger="mlwarden.relay.store.sqlite")
    try:
        checkpointer.start()
        accept(store, make_config(), body(alert()), 100.0)
        components.wait_until(lambda: "passive checkpoints fell behind" in caplog.text, 20, "the forced checkpoint")
    finally:
        checkpointer.stop()
        store.close()
