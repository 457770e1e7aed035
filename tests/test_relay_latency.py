"""Steady latency on SQLite: no checkpoint runs in a commit or takes the write lock from it.

The latency itself is measured by bench/bench_relay.py (docs/benchmarks.md), never asserted
here; these tests pin the mechanism that keeps the stalls away.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from mlwarden.relay.store import sqlite as sqlite_store
from mlwarden.relay.store.sqlite import SQLiteStore

from mlwarden import components
from tests.test_relay_support import accept, alert, body, make_config


def test_the_writer_never_checkpoints_in_a_commit(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "relay.db")
    try:
        assert store._read("PRAGMA wal_autocheckpoint") == [(0,)]  # type: ignore[attr-defined]  # the SQLite store's private reader, to see its pragma
    finally:
        store.close()


def traced_statements(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], threading.Lock]:
    """Every statement the store's connections run from now on."""
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
    return statements, lock


def checkpoints_after_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **checkpointer: float
) -> tuple[list[str], list[str]]:
    """(the checkpoint statements, every statement) after some intake with the checkpointer running."""
    statements, lock = traced_statements(monkeypatch)
    monkeypatch.setattr(sqlite_store, "_Checkpointer",
                        lambda path, cls=sqlite_store._Checkpointer: cls(path, **checkpointer))
    store = SQLiteStore(tmp_path / "relay.db")
    try:
        config = make_config()
        for n in range(40):
            accept(store, config, body(alert(name=f"A{n}"), group_key=str(n)), 100.0 + n)

        def checkpoints() -> list[str]:
            with lock:
                return [s for s in statements if "wal_checkpoint" in s]

        seen = components.wait_until(lambda: len(checkpoints()) >= 3 and checkpoints(), 20, "checkpoint passes")
        with lock:
            return seen, list(statements)
    finally:
        store.close()


def test_the_checkpointer_takes_no_lock_while_the_wal_is_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen, _ = checkpoints_after_writes(tmp_path, monkeypatch)
    assert all("PASSIVE" in statement for statement in seen)  # never RESTART or TRUNCATE: no commit waits


def test_a_growing_wal_is_restarted_without_waiting_for_anyone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen, statements = checkpoints_after_writes(tmp_path, monkeypatch, every=0.01, restart_bytes=1)
    assert any("RESTART" in statement for statement in seen)
    assert "PRAGMA busy_timeout=0" in statements  # a RESTART that would wait gives up instead


def test_a_waiting_intake_goes_before_the_next_turn_of_whoever_holds_the_store(tmp_path: Path) -> None:
    # The outbox claims and delivers a digest in steps, each a turn of the store's lock, one right
    # after the other; with a plain lock the thread that let go took it again before the woken
    # writer ran, for turn after turn, while the event loop waited for the writer.
    store = SQLiteStore(tmp_path / "relay.db")
    try:
        store._lock.acquire()  # an outbox step in progress
        writer = threading.Thread(target=accept, args=(store, make_config(), body(alert(name="A")), 100.0))
        writer.start()
        try:
            components.wait_until(store._lock.writer_waits, 20, "the writer waiting for the lock")
        finally:
            store._lock.release()
        claimed = store.claim("ops", 100.0, limit=10, lease=60)  # the outbox's next step, asked at once
        writer.join()
        assert [job.notice.alertname for job in claimed] == ["A"]  # it ran after the writer's commit
    finally:
        store.close()
