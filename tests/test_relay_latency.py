"""Steady latency on SQLite: no checkpoint runs in a commit or takes the write lock from it.

The latency itself is measured by bench/bench_relay.py (docs/benchmarks.md), never asserted
here; these tests pin the mechanism that keeps the stalls away.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlwarden.relay import cli as relay_cli
from mlwarden.relay.cli import RelaySettings
from mlwarden.relay.config import SEVERITIES
from mlwarden.relay.store import sqlite as sqlite_store
from mlwarden.relay.store.sqlite import SQLiteStore

from mlwarden import components, settings
from tests.test_relay_support import accept, alert, body, make_config


def test_the_writer_never_checkpoints_in_a_commit(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "relay.db")
    try:
        writer = store._db  # type: ignore[attr-defined]  # the SQLite store's private connection, to see its pragma
        assert writer.execute("PRAGMA wal_autocheckpoint").fetchall() == [(0,)]
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


def test_a_flood_s_wal_is_not_restarted_every_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A RESTART, once it has its locks, holds every commit off until the database file is synced
    # (15-80 ms on the test host). Restarted past 32 MB, the WAL of a flood of 500 webhooks a second
    # (about 35 MB a second) paid that about once a second: the largest part of the p99.
    statements, lock = traced_statements(monkeypatch)
    monkeypatch.setattr(sqlite_store, "_Checkpointer", lambda path, cls=sqlite_store._Checkpointer: cls(path, every=0.01))
    store = SQLiteStore(tmp_path / "relay.db")
    pinned = sqlite3.connect(tmp_path / "relay.db", isolation_level=None)
    try:
        pinned.execute("BEGIN")
        pinned.execute("SELECT count(*) FROM payloads").fetchall()  # its snapshot keeps every later frame in the WAL
        for _ in range(48):  # 48 MB of WAL, past the old limit
            store.dead_letter_payload(b"x" * (1 << 20), "a large body", 100.0)

        def checkpoints() -> list[str]:
            with lock:
                return [s for s in statements if "wal_checkpoint" in s]

        passes = len(checkpoints())
        seen = components.wait_until(lambda: len(checkpoints()) >= passes + 3 and checkpoints(), 20, "checkpoint passes")
        assert all("PASSIVE" in statement for statement in seen)
    finally:
        pinned.close()
        store.close()


def test_a_waiting_intake_goes_before_the_next_turn_of_whoever_holds_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The outbox records a digest's deliveries in steps, each a turn of the store's lock; with a
    # plain lock the thread that let go took it again before the woken writer ran, for turn after
    # turn, while the event loop waited for the writer.
    statements, lock = traced_statements(monkeypatch)
    store = SQLiteStore(tmp_path / "relay.db")
    try:
        config = make_config()
        accept(store, config, body(alert(name="B")), 99.0)
        delivered = store.claim("ops", 100.0, limit=10, lease=60)
        store._lock.acquire()  # an outbox step in progress
        writer = threading.Thread(target=accept, args=(store, config, body(alert(name="A")), 100.0))
        writer.start()
        try:
            components.wait_until(store._lock.writer_waits, 20, "the writer waiting for the lock")
        finally:
            store._lock.release()
        store.delivered(delivered)  # the outbox's next step, asked at once
        writer.join()
        with lock:
            turns = [sql.split(" (")[0] for sql in statements if sql.startswith(("INSERT INTO payloads", "DELETE FROM jobs"))]
        assert turns[-2:] == ["INSERT INTO payloads", "DELETE FROM jobs WHERE id IN"]  # the writer's commit first
    finally:
        store.close()


def test_claims_and_views_never_wait_for_the_store_lock(tmp_path: Path) -> None:
    # A digest's claim is 25 reads; under the lock, the writer, and so every webhook in flight,
    # waited behind them (acknowledgements of 40-75 ms through each claim at 500 webhooks/s).
    store = SQLiteStore(tmp_path / "relay.db")
    try:
        accept(store, make_config(), body(alert(name="A")), 100.0)
        found: list[object] = []
        store._lock.acquire()  # a long write in progress
        try:
            reader = threading.Thread(target=lambda: found.extend(
                [store.claim("ops", 101.0, limit=10, lease=60), store.jobs(), store.outbox_stats()]))
            reader.start()
            reader.join(timeout=30)
            assert not reader.is_alive(), "a claim waited for the writer's lock"
        finally:
            store._lock.release()
        claimed, listed, stats = found
        assert [job.notice.alertname for job in claimed] == ["A"]  # type: ignore[attr-defined]
        assert [job.id for job in listed] == [job.id for job in claimed]  # type: ignore[attr-defined]
        assert stats == (1, 100.0)
    finally:
        store.close()


class _RowCounter:
    """The store's connection, counting the rows its statements hand back to Python."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.rows = 0

    def execute(self, sql: str, params: Any = ()) -> _CountedCursor:
        return _CountedCursor(self._db.execute(sql, params), self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


class _CountedCursor:
    def __init__(self, cursor: sqlite3.Cursor, counter: _RowCounter) -> None:
        self._cursor = cursor
        self._counter = counter

    def fetchall(self) -> list[Any]:
        rows = self._cursor.fetchall()
        self._counter.rows += len(rows)
        return rows

    def fetchone(self) -> Any:
        row = self._cursor.fetchone()
        self._counter.rows += row is not None
        return row

    def __iter__(self) -> Iterator[Any]:
        for row in self._cursor:
            self._counter.rows += 1
            yield row


def test_a_claim_steps_through_one_row_per_statement_not_one_per_job(tmp_path: Path) -> None:
    # Each row the sqlite3 module steps to lets go of the GIL and takes it back, and a busy event
    # loop that took it in between kept the claim waiting for up to the switch interval each time.
    store = SQLiteStore(tmp_path / "relay.db")
    try:
        config = make_config()
        for n in range(30):
            accept(store, config, body(*(alert(name=f"A{n}", gpu=str(i)) for i in range(10)), group_key=str(n)), 100.0)
        counter = _RowCounter(store._reads)  # type: ignore[attr-defined]  # the SQLite store's private reading connection, to count what it fetches
        store._reads = counter  # type: ignore[attr-defined]  # as above
        claimed = store.claim("ops", 101.0, limit=300, lease=60)
        assert len(claimed) == 300
        assert [job.seq for job in claimed] == sorted(job.seq for job in claimed)  # still in claim order
        assert counter.rows <= len(SEVERITIES)  # a packed row per rank's statement at most; 300 before
        assert store.claim("ops", 101.0, limit=300, lease=60) == []  # all leased, as before
    finally:
        store.close()


def test_the_relay_serves_with_a_short_gil_switch_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # At Python's 5 ms, each turn a webhook takes on the GIL (the event loop, the writer at every
    # SQLite statement, the loop again) could wait that long while the outbox's thread computed a
    # digest.
    served_with: list[float] = []
    monkeypatch.setattr(relay_cli.uvicorn, "run", lambda *a, **k: served_with.append(sys.getswitchinterval()))
    monkeypatch.setattr(relay_cli.gc, "freeze", lambda: None)  # the test process's collector stays as it is
    monkeypatch.setattr(relay_cli.gc, "set_threshold", lambda *a: None)
    monkeypatch.setenv("SLACK_WEBHOOK_URL", "https://hooks.slack.test/services/T0/B0/X")
    config = tmp_path / "relay.yml"
    config.write_text("destinations:\n  ops: {type: slack, webhook_url_env: SLACK_WEBHOOK_URL}\n"
                      "routes:\n  - destinations: [ops]\n")
    parsed = settings.load(RelaySettings, "relay", ["--config", str(config), "--state-url", f"sqlite://{tmp_path}/r.db"],
                           {"MLWARDEN_RELAY_TOKEN": "t"})
    before = sys.getswitchinterval()
    try:
        assert relay_cli.run(parsed) == 0
    finally:
        sys.setswitchinterval(before)
    assert served_with == [relay_cli.SWITCH_INTERVAL_SECONDS]
    assert served_with[0] < 0.005  # shorter than Python's default


def test_claims_beside_a_busy_writer_keep_each_key_s_order_and_lose_nothing(tmp_path: Path) -> None:
    # Claims read a snapshot through their own connection while the writer commits: each key's
    # notices must still go out one at a time, in order, each once.
    store = SQLiteStore(tmp_path / "relay.db")
    try:
        config = make_config()
        stored: list[str] = []

        def write() -> None:
            for n in range(200):
                status = "firing" if n // 5 % 2 == 0 else "resolved"
                result = accept(store, config, body(alert(name=f"K{n % 5}", status=status), group_key=str(n)), 100.0 + n)
                stored.extend(job.id for job in result.jobs)

        writer = threading.Thread(target=write)
        writer.start()
        delivered: list[tuple[str, int, str]] = []
        while True:
            writing = writer.is_alive()
            claimed = store.claim("ops", 1e9, limit=7, lease=60)
            store.delivered(claimed)
            delivered += [(job.notice.key, job.seq, job.id) for job in claimed]
            if not claimed and not writing:
                break
        writer.join()
        assert len(stored) > 5 * 10  # many notices per key: each claim may take only the head of each line
        assert sorted(job_id for _, _, job_id in delivered) == sorted(stored)  # each once, none lost
        for key in {key for key, _, _ in delivered}:
            seqs = [seq for k, seq, _ in delivered if k == key]
            assert seqs == sorted(seqs)
        assert store.jobs() == []
    finally:
        store.close()
