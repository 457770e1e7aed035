"""The default store: one SQLite file in WAL mode, owned by one relay process.

WAL with ``synchronous=NORMAL`` makes every commit survive a crash or ``kill -9`` of the
relay: a commit is in the WAL file (the kernel's page cache) before the webhook is answered.
A power loss or kernel crash may lose the commits since the WAL was last synced, which
happens at every checkpoint (several times a second, see :class:`_Checkpointer`); the database
itself stays consistent. Alertmanager repeats what is still firing (its repeat_interval),
so such a loss delays a firing notification; a lost resolution is not sent again. ``FULL``
would close that window by an fsync in every commit: cheap on an idle SSD (measured: +0.3 ms
for a lone webhook, +0.05 ms per webhook in a batch of 20), but on the event loop, where a
disk busy with someone's backup would stall every webhook in flight for as long as the fsync
takes. Most calls come from the relay's event loop thread, so one connection suffices; a lock
keeps the calls other threads make (the watchdog check) out of each other's transactions, and
:meth:`SQLiteStore.prune`, long, opens a connection of its own rather than hold that lock.
Leases only matter within the process, so they live in its memory (see claim): a restart
releases them all, so undelivered jobs go out at once instead of after a lease.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import operator
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mlwarden.relay.config import SEVERITIES
from mlwarden.relay.notice import Notice
from mlwarden.relay.policy import KeyState
from mlwarden.relay.store.base import (
    CLOSES,
    DEAD,
    OPENS,
    PENDING,
    RETENTION_SECONDS,
    TRIGGER_UNDELIVERED,
    DeadPayload,
    IntakeRequest,
    IntakeResult,
    Job,
    Planner,
    Store,
    StoreError,
    severity_rank,
)

from mlwarden import jsonio

# A rowid table: as a WITHOUT ROWID table ordered by its text id, its rows of 700 bytes and more
# rebalanced three pages at every append (7 of the 28 WAL pages a webhook of 10 alerts wrote);
# a rowid table appends at its end. Stores written before are rebuilt on open (see _migrate).
_JOBS_TABLE = """CREATE TABLE IF NOT EXISTS {name} (
    id TEXT NOT NULL UNIQUE, destination TEXT NOT NULL, notice TEXT NOT NULL, created_at REAL NOT NULL,
    due_at REAL NOT NULL, leased_until REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL,
    status TEXT NOT NULL, last_error TEXT NOT NULL, key TEXT NOT NULL DEFAULT '', seq INTEGER NOT NULL DEFAULT 0,
    rank INTEGER NOT NULL DEFAULT 1, held INTEGER NOT NULL DEFAULT 0)"""
_JOBS_ALL_COLUMNS = "id, destination, notice, created_at, due_at, leased_until, attempts, status, last_error, key, seq, rank, held"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS payloads (id INTEGER PRIMARY KEY, received_at REAL NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS dead_payloads (
    id INTEGER PRIMARY KEY, received_at REAL NOT NULL, reason TEXT NOT NULL, body BLOB NOT NULL);
-- Dedup digests, appended in arrival order: looked up in memory (see _Digests), never by digest here.
CREATE TABLE IF NOT EXISTS seen (id INTEGER PRIMARY KEY, digest TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS key_state (key TEXT PRIMARY KEY, state TEXT NOT NULL) WITHOUT ROWID;
{_JOBS_TABLE.format(name="jobs")};
-- jobs_due (destination, status, due_at) served claims before per-key order; jobs_ready does now.
DROP INDEX IF EXISTS jobs_due;
CREATE TABLE IF NOT EXISTS kv (name TEXT PRIMARY KEY, value TEXT NOT NULL);
-- (destination, key) pairs that were delivered a trigger not yet followed by a delivered resolve.
CREATE TABLE IF NOT EXISTS told (destination TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (destination, key))
    WITHOUT ROWID;
-- For the prune, which otherwise scans whole tables. Times grow with arrival, so intake appends
-- at the indexes' ends (jobs_dead, with the jobs' other indexes, is in _JOB_INDEXES).
CREATE INDEX IF NOT EXISTS payloads_received ON payloads (received_at);
CREATE INDEX IF NOT EXISTS dead_payloads_received ON dead_payloads (received_at);
CREATE INDEX IF NOT EXISTS seen_expires ON seen (expires_at);
"""
# Added with per-key order (key, seq, rank) and with the lines in memory (held, see _Lines: 1 while
# a pending job is not its line's head); a store written by an older relay gets them on open.
_ADDED_COLUMNS = (("key", "TEXT NOT NULL DEFAULT ''"), ("seq", "INTEGER NOT NULL DEFAULT 0"),
                  ("rank", "INTEGER NOT NULL DEFAULT 1"), ("held", "INTEGER NOT NULL DEFAULT 0"))
_JOB_INDEXES = (
    # For the prune; a partial index of dead jobs only, so pending ones never touch it.
    f"CREATE INDEX IF NOT EXISTS jobs_dead ON jobs (created_at) WHERE status = '{DEAD}'",
    # jobs_line (destination, key, seq) found each line's head for the claim, and jobs_claim was
    # jobs_ready with held jobs in it: both replaced by the lines in memory and jobs_ready.
    "DROP INDEX IF EXISTS jobs_line",
    "DROP INDEX IF EXISTS jobs_claim",
    # The heads of the lines, in claim order: a claim seeks to its first row and reads its LIMIT
    # rows, however long the backlog, passing over no job that waits behind another of its key.
    # Covering (every column _CLAIM reads is in it, status and held too, which SQLite does not take
    # from the WHERE; the rowid is in every index), so a claim reads no row of the table, whose pages
    # hold the notices: jobs_ready (destination, rank DESC, seq) read each claimed job's row.
    "DROP INDEX IF EXISTS jobs_ready",
    f"CREATE INDEX IF NOT EXISTS jobs_heads ON jobs (destination, rank DESC, seq, due_at, status, held)"
    f" WHERE status = '{PENDING}' AND held = 0",
)

log = logging.getLogger(__name__)
# A row as the sqlite3 module returns it: its values' types are the columns' (see SCHEMA), which
# the DB-API does not say.
Row = tuple[Any, ...]
_T = TypeVar("_T")

_PARAMETERS_PER_STATEMENT = 999  # SQLite's lowest limit on bound parameters (builds before 3.32)
_JOB_COLUMNS = "id, destination, notice, created_at, due_at, attempts, status, last_error, seq"
# The due jobs of one destination and rank after a sequence number that head their key's line: a
# job that waits (for its retry, or leased) keeps the later jobs of its key waiting (held). The
# rest of a job is read only when the job is not in memory (see SQLiteStore._remember). Packed into
# one row, "rowid,seq,rowid,seq,...", not a row per job: the sqlite3 module lets go of the GIL
# around every row it steps to, and a claim steps under the store's lock (see _claimable).
_CLAIM = (
    "SELECT group_concat(r || ',' || seq) FROM (SELECT rowid AS r, seq FROM jobs"
    f" INDEXED BY jobs_heads WHERE destination = ? AND status = '{PENDING}' AND held = 0 AND rank = ? AND seq > ?"
    " AND due_at <= ? ORDER BY seq LIMIT ?)"
)
TOP_RANK = severity_rank(SEVERITIES[-1])
STEP_ROWS = 200  # jobs per transaction when many are finished at once
WAL_RESTART_BYTES = 512 * 1024 * 1024  # past this, a pass ends with a non-waiting RESTART (see _Checkpointer)
# Queued jobs (with their notices) kept in memory for the outbox (see SQLiteStore._remember): ten
# seconds of a warning flood at the Slack digest's pace (5,000 a second), twice the backlog the
# bench's full-load phase leaves. Each, for a notice of 6 labels and 2 annotations: 1.6 KiB of
# objects (tracemalloc: the Job, the Notice, their strings and dicts), 3.3 KB of RSS with the
# allocator's overhead, so up to about 165 MB at the cap (see docs/relay.md).
NOTICE_CACHE_SIZE = 50_000
PRUNE_BATCH_ROWS = 1000  # per prune transaction: intake waits for the write lock one batch at most

# (what, kept for how long after its time, a statement deleting up to :rows of those whose time is
# before :before); each uses an index of SCHEMA. A digest's time is already its expiry. status is
# spelled out as a literal: SQLite uses a partial index only when the query repeats its WHERE.
_PRUNES = (
    ("digests", 0.0,
     "DELETE FROM seen WHERE id IN (SELECT id FROM seen WHERE expires_at <= :before LIMIT :rows)"),
    ("payloads", RETENTION_SECONDS,
     "DELETE FROM payloads WHERE id IN (SELECT id FROM payloads WHERE received_at < :before LIMIT :rows)"),
    ("dead payloads", RETENTION_SECONDS,
     "DELETE FROM dead_payloads WHERE id IN (SELECT id FROM dead_payloads WHERE received_at < :before LIMIT :rows)"),
    ("dead jobs", RETENTION_SECONDS,
     f"DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE status = '{DEAD}' AND created_at < :before LIMIT :rows)"),
)


class SQLiteStore(Store):
    # A commit of a few webhooks takes a few milliseconds; a disk that stalls one holds the event
    # loop this long at most (see GroupCommit).
    loop_waits_for_commit = 0.025

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._closing = threading.Event()
        self._lock = _WriterFirst()  # one connection, one transaction at a time; intake's first
        self._lines = _Lines()
        self._digests = _Digests()
        # The jobs this process stored, by id, as they are in the file (see _remember).
        self._pending: dict[int, Job] = {}  # by seq, which the claim index has and ids are not
        self._leases: dict[int, float] = {}  # job seq: leased until (see claim)
        try:
            self._db = _connect(path)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints (copying the WAL into the database, with an fsync) run in a thread of their
            # own, never in a commit (see _Checkpointer).
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.execute(f"PRAGMA journal_size_limit={64 * 1024 * 1024}")
            self._db.executescript(SCHEMA)
            with _transaction(self._db) as db:
                _migrate(db)
            for index in _JOB_INDEXES:
                self._db.execute(index)
            # Leases live in memory now (see claim); a store written by an older relay may hold some.
            self._db.execute("UPDATE jobs SET leased_until = 0 WHERE leased_until > 0")
            with _transaction(self._db) as db:
                self._lines.load(db)
                self._digests.load(db)
            self._lines.commit()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {path}: {exc}") from None
        # Reads (claims, the views, the metrics' counts) go through a connection of their own, which
        # never takes the store's lock: in WAL mode a reader and the writer do not wait for each other.
        # A claim of a Slack digest is 25 reads of 200 jobs; under the lock, the writer (and so every
        # webhook in flight, see GroupCommit) waited behind them: on a timeline of 500 webhooks/s,
        # acknowledgements rose to 40-75 ms for the 100-150 ms each digest's claim took.
        try:
            self._reads = _connect(path)
            self._reads.execute("PRAGMA query_only=1")
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"cannot open SQLite store {path}: {exc}") from None
        self._reads_lock = threading.Lock()  # one statement at a time on that connection, and short
        self._checkpointer = _Checkpointer(path)
        self._checkpointer.start()

    @contextlib.contextmanager
    def _transaction(self, intake: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction; the changes it made to the lines are kept only if it commits.
        ``intake``: the writer's, which goes before anyone else's next turn (see _WriterFirst)."""
        with self._lock.held(first=intake):
            try:
                with _transaction(self._db) as db:
                    yield db
            except BaseException:
                self._lines.rollback()
                self._digests.rollback()
                raise
            self._lines.commit()
            self._digests.commit()

    def intake(
        self, digest: str, body: bytes, keys: Sequence[str], now: float, dedup_window: float, plan: Planner
    ) -> IntakeResult | None:
        return self.intake_batch([IntakeRequest(digest, body, keys, now, dedup_window, plan)])[0]

    def intake_batch(self, requests: Sequence[IntakeRequest]) -> list[IntakeResult | None]:
        """All of ``requests`` in one transaction, each planned with the states and digests the
        ones before it left, and written together: a statement per table for the whole batch,
        not per webhook. Each statement is a trip through the sqlite3 module, which lets go of
        the GIL around it for the event loop to take, and back: at 500 webhooks a second, eight
        statements a webhook were most of the store's cost next to a busy event loop."""
        with self._transaction(intake=True) as db:
            results = self._intake(db, requests)
        for result in results:
            if result is not None:
                self._remember(result.jobs)
        return results

    def _intake(self, db: sqlite3.Connection, requests: Sequence[IntakeRequest]) -> list[IntakeResult | None]:
        if requests:
            self._digests.evict(requests[0].now)
        states = self._states(db, list(dict.fromkeys(k for r in requests for k in r.keys)))
        results: list[IntakeResult | None] = []
        changed: dict[str, KeyState | None] = {}  # each key's last change in the batch
        seen: dict[str, float] = {}
        payloads: list[tuple[float, bytes]] = []
        jobs: list[Job] = []
        heartbeat: float | None = None
        for request in requests:
            if self._digests.seen(request.digest, request.now):
                results.append(None)
                continue
            result = request.plan({k: states[k] for k in request.keys if k in states})
            seen[request.digest] = request.now + request.dedup_window
            self._digests.add(request.digest, seen[request.digest])
            payloads.append((request.now, request.body))
            for key, state in result.states.items():
                changed[key] = state
                if state is None:
                    states.pop(key, None)
                else:
                    states[key] = state
            jobs += result.jobs
            if result.heartbeat:
                heartbeat = request.now
            results.append(result)
        _insert(db, "INSERT INTO seen (digest, expires_at)", list(seen.items()))
        _insert(db, "INSERT INTO payloads (received_at, body)", payloads)
        _in_list(db, "DELETE FROM key_state WHERE key IN ({})", [k for k, s in changed.items() if s is None])
        _insert(db, "INSERT OR REPLACE INTO key_state (key, state)",
                [(k, jsonio.encode(s.to_dict())) for k, s in changed.items() if s is not None])
        self._insert_jobs(db, jobs)
        if heartbeat is not None:
            db.execute("INSERT OR REPLACE INTO kv VALUES ('watchdog_last_seen', ?)", (repr(heartbeat),))
        return results

    @staticmethod
    def _states(db: sqlite3.Connection, keys: list[str]) -> dict[str, KeyState]:
        return {key: KeyState.from_dict(jsonio.decode(state))
                for key, state in _select_in(db, "SELECT key, state FROM key_state WHERE key IN ({})", keys)}

    def _insert_jobs(self, db: sqlite3.Connection, jobs: Sequence[Job]) -> None:
        """Store ``jobs`` numbered in their order, after every job stored before (see base)."""
        if not jobs:
            return
        first = _next_seq(db, len(jobs))
        # One notice goes to each destination of its escalation level: encoded once for all of them.
        encoded: dict[int, str] = {}
        rows = []
        for i, j in enumerate(jobs):
            j.seq = first + i  # as a claim that hands out this very object must say (see _remember)
            notice = encoded.get(id(j.notice))
            if notice is None:
                notice = encoded[id(j.notice)] = jsonio.encode(j.notice.to_dict())
            heads = j.status != PENDING or self._lines.add(j.destination, j.notice.key, j.id)
            rows.append((j.id, j.destination, notice, j.created_at, j.due_at, j.attempts, j.status, j.last_error,
                         first + i, j.notice.key, j.rank, int(not heads)))
        _insert(db, f"INSERT INTO jobs ({_JOB_COLUMNS}, key, rank, held)", rows)

    def dead_letter_payload(self, body: bytes, reason: str, now: float) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO dead_payloads (received_at, reason, body) VALUES (?, ?, ?)", (now, reason, body))

    def enqueue(self, jobs: Sequence[Job]) -> None:
        with self._transaction() as db:
            self._insert_jobs(db, jobs)
        self._remember(jobs)

    def claim(self, destination: str, now: float, limit: int, lease: float, after: Job | None = None) -> list[Job]:
        """Leases are kept in memory, not written: a claim is a read. One process owns the file
        and a restart releases every lease anyway (see the module's doc), and a lease written
        into each claimed row cost a write of its page, which the delivery wrote again.

        A claim reads through the reading connection, each statement a snapshot of what was
        committed when it began. That is enough: the outbox claims for a destination only once
        its previous delivery is recorded (committed), and only that destination's own claims
        and outcomes lease, finish or reschedule its jobs."""
        # Rank by rank, each a seek into jobs_heads at the first row it may take: one statement
        # over all ranks (ORDER BY rank DESC, seq) could only skip the rows before ``after`` one
        # by one.
        first_rank, first_seq = (after.rank, after.seq) if after is not None else (TOP_RANK, -1)
        rows: list[Row] = []
        try:
            with self._reads_lock:
                for rank in range(first_rank, -1, -1):
                    rows += self._claimable(destination, rank, first_seq if rank == first_rank else -1, now,
                                            limit - len(rows))
                    if len(rows) >= limit:
                        break
                for _, seq in rows:
                    self._leases[seq] = now + lease
                read = {job.seq: job for job in map(self._job, _select_in(
                    self._reads, f"SELECT {_JOB_COLUMNS} FROM jobs WHERE rowid IN ({{}})",
                    [rowid for rowid, seq in rows if seq not in self._pending]))}
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite: {exc}") from None
        return [self._pending.get(seq) or read[seq] for _, seq in rows]

    def _claimable(self, destination: str, rank: int, after_seq: int, now: float, limit: int) -> list[Row]:
        """Up to ``limit`` (rowid, seq) of _CLAIM whose jobs are not leased, in seq order.

        One row per statement, not one per job: each row the sqlite3 module steps to is a release
        and a retake of the GIL, each a point where a busy event loop could take the GIL and keep it
        for up to the switch interval while the claim waited for it back."""
        rows: list[Row] = []
        while len(rows) < limit:
            want = limit - len(rows)
            # fetchall, which steps the statement to its end: a statement left open would keep its
            # read transaction, and the WAL frames it sees, from the checkpointer.
            [(packed,)] = self._reads.execute(_CLAIM, (destination, rank, after_seq, now, want)).fetchall()
            values = [int(v) for v in packed.split(",")] if packed else []
            # group_concat's order is not promised (SQLite before 3.44 has no ORDER BY in it): sorted
            # again, which costs nothing on rows that come in order, as they do.
            found = sorted(zip(values[::2], values[1::2], strict=True), key=_second)
            rows += [row for row in found if self._leases.get(row[1], 0.0) <= now]
            if len(found) < want:
                break
            after_seq = found[-1][1]
        return rows

    def delivered(self, jobs: Sequence[Job]) -> None:
        # In steps: a digest's thousands of jobs must not hold intake up for one long transaction.
        for start in range(0, len(jobs), STEP_ROWS):
            step = jobs[start : start + STEP_ROWS]
            with self._transaction() as db:
                _in_list(db, "DELETE FROM jobs WHERE id IN ({})", [j.id for j in step])
                self._leave_lines(db, [(j.destination, j.notice.key, j.id) for j in step])
                _insert(db, "INSERT OR IGNORE INTO told (destination, key)",
                        [(j.destination, j.notice.key) for j in step if j.notice.kind in OPENS])
                db.executemany("DELETE FROM told WHERE destination = ? AND key = ?",
                               [(j.destination, j.notice.key) for j in step if j.notice.kind in CLOSES])
            self._forget(step)

    def reschedule(self, jobs: Sequence[Job], due_at: float, error: str) -> None:
        with self._transaction() as db:
            db.executemany(
                "UPDATE jobs SET due_at = ?, attempts = attempts + 1, last_error = ? WHERE id = ?",
                [(due_at, error, j.id) for j in jobs],
            )
        for job in jobs:
            self._leases.pop(job.seq, None)
            kept = self._pending.get(job.seq)
            if kept is not None:  # as the row now says
                self._pending[job.seq] = _untracked(
                    dataclasses.replace(kept, due_at=due_at, attempts=kept.attempts + 1, last_error=error))

    def dead_letter(self, jobs: Sequence[Job], error: str) -> int:
        with self._transaction() as db:
            db.executemany(
                "UPDATE jobs SET status = ?, attempts = attempts + 1, last_error = ? WHERE id = ?",
                [(DEAD, error, j.id) for j in jobs],
            )
            self._leave_lines(db, [(j.destination, j.notice.key, j.id) for j in jobs])
            orphans = sum(self._drop_orphan_closes(db, j.destination, j.notice.key) for j in jobs if j.notice.kind in OPENS)
        self._forget(jobs)
        return orphans

    def _job(self, row: Row) -> Job:
        job_id, destination, notice, created_at, due_at, attempts, status, last_error, seq = row[:9]
        return Job(
            id=str(job_id), destination=str(destination), notice=self._notice(int(seq), str(notice)),
            created_at=float(created_at), due_at=float(due_at), attempts=int(attempts),
            status=str(status), last_error=str(last_error), seq=int(seq),
        )

    def _notice(self, seq: int, stored: str) -> Notice:
        """The job's notice: the one intake built, while it is still in memory, else decoded."""
        job = self._pending.get(seq)
        return job.notice if job is not None else Notice.from_dict(jsonio.decode(stored))

    def _remember(self, jobs: Sequence[Job]) -> None:
        """Keep ``jobs``, just committed, while there is room, for claims to hand out as they are.

        Under a warning flood the outbox claims thousands of jobs a second: decoding each notice
        (JSON, then the Notice) cost more than all the rest of its claim, and reading each job's
        row and building its Job, once the notices were kept, about half of what was left. A job
        here is what its row says (reschedule keeps it so; delivered and dead ones leave).
        When there is no room, the newest go without: claims take the oldest first, so those
        already kept are the next ones claimed (evicting the oldest instead would, under a
        backlog, keep exactly the wrong ones).

        Each kept Job and Notice is taken out of the garbage collector's sight (see _untracked):
        a full collection, which stops every thread, walked every one of them (with 50,000 kept:
        72-128 ms against 37-90 with 10,000, and 34-50 with 50,000 untracked), so the cap could
        not grow to hold a flood's backlog, whose jobs were then read from the file at 15-25 us
        each against 2-3 from here."""
        room = NOTICE_CACHE_SIZE - len(self._pending)
        for job in jobs[: max(0, room)]:
            _untracked(job.notice)  # again for each destination of a notice: cheaper than looking
            self._pending[job.seq] = _untracked(job)

    def _forget(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self._pending.pop(job.seq, None)
            self._leases.pop(job.seq, None)

    def _leave_lines(self, db: sqlite3.Connection, jobs: Sequence[tuple[str, str, str]]) -> None:
        """Take jobs (destination, key, id), no longer pending, out of their lines; the next job of
        each line becomes its head."""
        heads = [head for line in jobs if (head := self._lines.remove(*line)) is not None]
        _in_list(db, "UPDATE jobs SET held = 0 WHERE id IN ({})", heads)

    def _drop_orphan_closes(self, db: sqlite3.Connection, destination: str, key: str) -> int:
        """Dead-letter the closing notices now heading ``key``'s line if nothing they close was delivered."""
        if db.execute("SELECT 1 FROM told WHERE destination = ? AND key = ?", (destination, key)).fetchone():
            return 0
        dropped = 0
        while (head := self._lines.head(destination, key)) is not None:
            notice, seq = db.execute("SELECT notice, seq FROM jobs WHERE id = ?", (head,)).fetchone()
            if jsonio.decode(notice)["kind"] not in CLOSES:
                break
            db.execute("UPDATE jobs SET status = ?, last_error = ? WHERE id = ?", (DEAD, TRIGGER_UNDELIVERED, head))
            self._pending.pop(seq, None)  # should the transaction roll back, a claim reads it again
            self._leave_lines(db, [(destination, key, head)])
            dropped += 1
        return dropped

    def announce_watchdog(self, previous: str, current: str, jobs: Sequence[Job]) -> bool:
        with self._transaction() as db:
            row = db.execute("SELECT value FROM kv WHERE name = 'watchdog_state'").fetchone()
            if (row[0] if row else "new") != previous:
                return False
            db.execute("INSERT OR REPLACE INTO kv VALUES ('watchdog_state', ?)", (current,))
            self._insert_jobs(db, jobs)
            return True

    def watchdog(self) -> tuple[float | None, str]:
        rows: dict[str, str] = dict(self._read("SELECT name, value FROM kv WHERE name LIKE 'watchdog_%'"))
        last_seen = rows.get("watchdog_last_seen")
        return (float(last_seen) if last_seen else None), rows.get("watchdog_state", "new")

    def key_states(self, limit: int = 1000) -> list[KeyState]:
        rows = self._read("SELECT state FROM key_state ORDER BY key LIMIT ?", (limit,))
        return [KeyState.from_dict(jsonio.decode(r[0])) for r in rows]

    def acknowledge(self, key: str, by: str, comment: str, now: float) -> KeyState | None:
        with self._transaction() as db:
            state = self._acknowledged(self._states(db, [key]).get(key), by, comment, now)
            if state is not None:
                db.execute("UPDATE key_state SET state = ? WHERE key = ?", (jsonio.encode(state.to_dict()), key))
            return state

    def jobs(self, limit: int = 1000) -> list[Job]:
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY seq LIMIT ?", (limit,))
        return [self._job(r) for r in rows]

    def dead_payloads(self, limit: int = 100) -> list[DeadPayload]:
        rows = self._read("SELECT id, received_at, reason, body FROM dead_payloads ORDER BY id DESC LIMIT ?", (limit,))
        return [DeadPayload(str(i), float(at), str(reason), bytes(body)) for i, at, reason, body in rows]

    def retry_dead(self, job_id: str, now: float) -> Job | None:
        with self._transaction() as db:
            row = db.execute(f"SELECT destination, key FROM jobs WHERE id = ? AND status = '{DEAD}'", (job_id,)).fetchone()
            if row is None:
                return None
            held = not self._lines.add(row[0], row[1], job_id)
            db.execute(
                f"UPDATE jobs SET status = '{PENDING}', due_at = ?, attempts = 0, seq = ?, held = ?"
                " WHERE id = ?",
                (now, _next_seq(db, 1), int(held), job_id),
            )
            return self._job(db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def outbox_stats(self) -> tuple[int, float | None]:
        count, oldest = self._read("SELECT count(*), min(created_at) FROM jobs WHERE status = ?", (PENDING,))[0]
        return int(count), oldest

    def prune(self, now: float) -> None:
        # A connection of its own: the event loop goes on using self._db meanwhile, and holding
        # self._lock for the whole prune would hold up intake.
        try:
            db = _connect(self._path)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite: {exc}") from None
        try:
            for what, kept_for, statement in _PRUNES:
                deleted = self._prune_in_batches(db, statement, now - kept_for)
                if deleted:
                    log.info("pruned %d %s", deleted, what)
        finally:
            db.close()

    def _prune_in_batches(self, db: sqlite3.Connection, statement: str, before: float) -> int:
        deleted = 0
        while not self._closing.is_set():  # close() during a long first prune: the rest waits for the next start
            with _transaction(db):
                batch = db.execute(statement, {"before": before, "rows": PRUNE_BATCH_ROWS}).rowcount
            deleted += batch
            if batch < PRUNE_BATCH_ROWS:
                break
        return deleted

    def ping(self) -> None:
        self._read("SELECT 1")

    def close(self) -> None:
        self._closing.set()
        self._checkpointer.stop()
        with self._reads_lock:
            self._reads.close()
        with self._lock:
            self._db.close()

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[Row]:
        try:
            with self._reads_lock:
                return self._reads.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite: {exc}") from None


class _WriterFirst:
    """The store's lock, under which a waiting intake (``first``) goes before anyone's next turn.

    The outbox claims and delivers a digest in steps of 200 jobs, each a turn of the lock, one
    right after the other. A plain lock goes to whoever asks first once it is free, and the thread
    that just let go of it is running while the one it woke is not: measured with a thread taking
    25 turns in a row (each an SQLite insert and 1 ms of Python), a second thread that asked during
    one of them waited for 1 to 16 more in 5 to 9 trials of 20; with this lock, in none of 40. Here
    the waiting writer holds a turnstile that everyone else passes before asking for the lock, so
    it waits only for the turns already asked for when it came. It matters because the event loop
    waits for the writer (see GroupCommit): every turn the writer waits, no webhook is answered.
    Not reentrant, like the lock it replaces."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._turnstile = threading.Lock()  # held by a writer waiting for the lock

    def acquire(self, first: bool = False) -> None:
        """Take the lock; ``first``: before anyone who asks for it after this (the writer)."""
        with self._turnstile:
            if first:
                self._lock.acquire()
        if not first:
            self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @contextlib.contextmanager
    def held(self, first: bool) -> Iterator[None]:
        self.acquire(first)
        try:
            yield
        finally:
            self.release()

    def writer_waits(self) -> bool:
        """Whether a writer is waiting for the lock (or just taking it)."""
        return self._turnstile.locked()


# CPython's PyObject_GC_UnTrack: the collector no longer walks the object (nor finds cycles through
# it; it is freed by its reference count as before). Untracking twice does nothing.
_gc_untrack = ctypes.pythonapi.PyObject_GC_UnTrack
_gc_untrack.argtypes = [ctypes.py_object]
_gc_untrack.restype = None


def _untracked(obj: _T) -> _T:
    """``obj``, through which no reference cycle may run, untracked by the garbage collector: for the
    SQLite store's kept jobs and notices, which hold strings, numbers and dicts of strings (a Job
    its Notice, a Notice its labels), never themselves. The collector untracks tuples and dicts of
    such atoms on its own, but not a dataclass instance. Keeping each job as a tuple of plain values
    instead, rebuilt at claim, was tried: the full collection was as short, but a claim cost 9-12 us
    a job (touching some 30 cold objects to build two new ones) against 2-3 for a kept Job."""
    _gc_untrack(obj)
    return obj


class _Lines:
    """Each (destination, key)'s pending jobs in sequence order, in memory: who heads each line.

    Per-key order asks of every claimed job that it be the first pending job of its key and
    destination. An index on (destination, key, seq) answered that, but keys are hashes: each job
    stored or finished wrote a page of that index at random. One process owns the file (see the
    module's doc), so the lines live here: read from the jobs at open, changed by the
    transactions that change the jobs, and written to the file only as each pending job's
    ``held`` (1: not its line's head), which keeps it out of the claim index. A transaction's
    changes are staged and kept only if it commits.

    Most lines hold one job (a key seen once while its notice waits): such a line is kept as the
    job's id alone, which the garbage collector does not track, not as a list, which it does (a
    backlog of 50,000 jobs made 50,000 lists for every full collection to walk).
    """

    def __init__(self) -> None:
        self._lines: dict[str, str | list[str]] = {}  # by _line_name; job ids in sequence order; one: the id
        self._staged: dict[str, list[str]] = {}

    def load(self, db: sqlite3.Connection) -> None:
        """Read the lines from the pending jobs (inside a transaction), and mark each job held or not."""
        self._lines.clear()
        wrong = []
        for destination, key, job_id, held in db.execute(
            f"SELECT destination, key, id, held FROM jobs WHERE status = '{PENDING}' ORDER BY seq"
        ):
            head = self.add(destination, key, job_id)
            if held == head:  # as a store from before the lines left it (held 0 for all)
                wrong.append((int(not head), job_id))
        db.executemany("UPDATE jobs SET held = ? WHERE id = ?", wrong)

    def _staged_line(self, name: str) -> list[str]:
        line = self._staged.get(name)
        if line is None:
            kept = self._lines.get(name, [])
            line = self._staged[name] = [kept] if isinstance(kept, str) else list(kept)
        return line

    def add(self, destination: str, key: str, job_id: str) -> bool:
        """Put a job at the end of its line; True when it heads the line."""
        line = self._staged_line(_line_name(destination, key))
        line.append(job_id)
        return len(line) == 1

    def remove(self, destination: str, key: str, job_id: str) -> str | None:
        """Take a job out of its line; the job that heads the line in its place, if any."""
        line = self._staged_line(_line_name(destination, key))
        if job_id not in line:
            return None
        was_head = line[0] == job_id
        line.remove(job_id)
        return line[0] if was_head and line else None

    def head(self, destination: str, key: str) -> str | None:
        name = _line_name(destination, key)
        line = self._staged.get(name, self._lines.get(name))
        if isinstance(line, str):
            return line
        return line[0] if line else None

    def commit(self) -> None:
        for name, line in self._staged.items():
            if line:
                self._lines[name] = line[0] if len(line) == 1 else line
            else:
                self._lines.pop(name, None)
        self._staged.clear()

    def rollback(self) -> None:
        self._staged.clear()


_second = operator.itemgetter(1)


def _line_name(destination: str, key: str) -> str:
    """A line's name in _Lines: one string, which the garbage collector never tracks. A (destination,
    key) tuple is tracked until a collection has looked at it once: at 500 webhooks a second, the
    5,000 new lines a second were most of what every young collection (a pause of every thread)
    walked. The destination's length first, so that no two (destination, key) pairs share a name."""
    return f"{len(destination)}:{destination}{key}"


class _Digests:
    """The dedup digests within their window, in memory, each with its expiry: a webhook's
    check reads no page of the file, and its digest is appended to ``seen`` instead of being
    written into a B-tree keyed by the digest, where every webhook wrote a page at random.

    One process owns the file (see the module's doc), so this map is the whole truth while it
    runs; the file's rows only rebuild it at open. Digests go in arrival order (a digest seen
    again after its window moves to the end), so with one window the oldest expire first and
    eviction is from the front. Memory: about 200 bytes per notification within the window
    (at 500 webhooks a second and the default 300 s window, about 30 MB). Staged like _Lines.
    """

    def __init__(self) -> None:
        self._expiries: dict[str, float] = {}  # digest: expires at, in arrival order
        self._staged: dict[str, float] = {}

    def load(self, db: sqlite3.Connection) -> None:
        self._expiries.clear()
        for digest, expires_at in db.execute("SELECT digest, expires_at FROM seen ORDER BY id"):
            self._arrived(digest, expires_at)

    def seen(self, digest: str, now: float) -> bool:
        """Whether ``digest`` was seen within its window, at ``now``."""
        expires_at = self._staged.get(digest, self._expiries.get(digest))
        return expires_at is not None and expires_at > now

    def add(self, digest: str, expires_at: float) -> None:
        self._staged[digest] = expires_at

    def evict(self, now: float) -> None:
        """Forget the digests at the front that expired by ``now``; one that outlives an
        expired one behind it (the window was shortened by a reload) goes at the prune."""
        expired = []
        for digest, expires_at in self._expiries.items():
            if expires_at > now:
                break
            expired.append(digest)
        for digest in expired:
            del self._expiries[digest]

    def commit(self) -> None:
        for digest, expires_at in self._staged.items():
            self._arrived(digest, expires_at)
        self._staged.clear()

    def rollback(self) -> None:
        self._staged.clear()

    def _arrived(self, digest: str, expires_at: float) -> None:
        self._expiries.pop(digest, None)  # to the end: arrival order
        self._expiries[digest] = expires_at


class _Checkpointer(threading.Thread):
    """Copies committed WAL frames into the database, off the event loop, with PASSIVE
    checkpoints only: they never take the write lock, so no commit ever waits for one.

    The writer's automatic checkpoint is off (``wal_autocheckpoint=0``): in the writer, a
    checkpoint stalled intake for 10-40 ms every ~1,000 pages. The previous design ran a
    RESTART from this thread every second, waiting (busy timeout 5 s) for readers and writers
    while new commits waited for it: 2-10 ms, and 50-90 ms on a busy disk, about once a second.
    Now a PASSIVE pass runs every ``every`` seconds; the first commit after a pass that copied
    everything starts the WAL from its beginning. Under steady intake a pass rarely copies
    everything (commits land while it copies: about 120 KB of WAL per webhook of 10 alerts), and
    a WAL that grows makes every read slower, so past ``restart_bytes`` a RESTART follows the
    pass: it has only the frames of the last few milliseconds left to copy, and with no busy
    wait it gives up at once (SQLITE_BUSY, tried again at the next pass) instead of holding
    commits while it waits for one. Once it has the locks, though, it holds off every commit
    until it has synced the database file: 15-80 ms on this project's test host. At 500
    webhooks a second the WAL grows by about 35 MB a second, and past 32 MB (the limit until
    2026-11-30) that was a stall of the writer, and of every webhook in flight, about once a
    second: the largest part of the acknowledgement p99 (56-58 ms against 39-41 with 512 MB,
    alternating on a quiet host). Past 512 MB it comes about every 15 s of such a flood; the WAL
    file is cut back to ``journal_size_limit`` (64 MB) at each restart.
    """

    def __init__(self, path: Path, every: float = 0.2, restart_bytes: int = WAL_RESTART_BYTES) -> None:
        super().__init__(name="sqlite-checkpoint", daemon=True)
        self._path = path
        self._every = every
        self._restart_bytes = restart_bytes
        self._stopping = threading.Event()

    def run(self) -> None:
        db = _connect(self._path)
        db.execute("PRAGMA busy_timeout=0")  # never wait for a writer or reader: try again next pass
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        try:
            while not self._stopping.wait(self._every):
                try:
                    _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames * page_size > self._restart_bytes:  # frames in use, not the file's size
                        db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
                except sqlite3.Error as exc:
                    log.warning("SQLite checkpoint failed (trying again in %ss): %s", self._every, exc)
        finally:
            db.close()

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)


def _insert(db: sqlite3.Connection, head: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """``head`` (``INSERT INTO t (columns)``) with ``rows``, many rows to a statement.

    executemany runs the statement once per row, each run a trip through the sqlite3 module
    (which lets go of the GIL around it, for the event loop's thread to take); one statement of
    many rows is one trip. Measured on the delivered steps of a digest: 0.18 -> 0.13 ms of CPU per
    webhook of 10 alerts.
    """
    if not rows:
        return
    step = _PARAMETERS_PER_STATEMENT // len(rows[0])
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        marks = f"({','.join('?' * len(chunk[0]))})"
        db.execute(f"{head} VALUES {','.join([marks] * len(chunk))}", [value for row in chunk for value in row])


def _in_list(db: sqlite3.Connection, statement: str, values: Sequence[Any]) -> None:
    """``statement``, whose ``{}`` is an IN list, over ``values``: few statements (see _insert)."""
    for start in range(0, len(values), _PARAMETERS_PER_STATEMENT):
        chunk = values[start : start + _PARAMETERS_PER_STATEMENT]
        db.execute(statement.format(",".join("?" * len(chunk))), chunk)


def _select_in(db: sqlite3.Connection, query: str, values: Sequence[Any]) -> list[Row]:
    """The rows of ``query``, whose ``{}`` is an IN list, over ``values``: few statements (see _insert)."""
    rows: list[Row] = []
    for start in range(0, len(values), _PARAMETERS_PER_STATEMENT):
        chunk = values[start : start + _PARAMETERS_PER_STATEMENT]
        rows += db.execute(query.format(",".join("?" * len(chunk))), chunk).fetchall()
    return rows


def _next_seq(db: sqlite3.Connection, count: int) -> int:
    """Reserve ``count`` sequence numbers (inside the caller's transaction); returns the first."""
    # One statement that changes the row in place: INSERT OR REPLACE deleted and inserted it,
    # writing a page of kv's key index too, at every webhook.
    row = db.execute(
        "UPDATE kv SET value = CAST(value AS INTEGER) + ? WHERE name = 'job_seq' RETURNING value", (count,)
    ).fetchone()
    if row is None:
        db.execute("INSERT INTO kv VALUES ('job_seq', ?)", (str(count),))
        return 1
    return int(row[0]) - count + 1


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a store written by an older relay up to date; its jobs keep their order."""
    present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    for name, kind in _ADDED_COLUMNS:
        if name not in present:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
    if "seq" not in present:  # written before per-key order: numbered in the order they were created
        ordered = db.execute("SELECT id, notice FROM jobs ORDER BY created_at, id").fetchall()
        db.executemany(
            "UPDATE jobs SET key = ?, seq = ?, rank = ? WHERE id = ?",
            [(jsonio.decode(notice)["key"], i + 1, severity_rank(jsonio.decode(notice)["severity"]), job_id)
             for i, (job_id, notice) in enumerate(ordered)],
        )
        db.execute("INSERT OR REPLACE INTO kv VALUES ('job_seq', ?)", (str(len(ordered)),))
    seen = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'seen'").fetchone()[0]
    if "WITHOUT ROWID" in seen.upper():  # keyed by digest (before _Digests): rows in expiry order now
        db.execute("CREATE TABLE seen_rowid (id INTEGER PRIMARY KEY, digest TEXT NOT NULL, expires_at REAL NOT NULL)")
        db.execute("INSERT INTO seen_rowid (digest, expires_at) SELECT digest, expires_at FROM seen ORDER BY expires_at")
        db.execute("DROP TABLE seen")
        db.execute("ALTER TABLE seen_rowid RENAME TO seen")
        db.execute("CREATE INDEX seen_expires ON seen (expires_at)")
    table = db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone()[0]
    if "WITHOUT ROWID" in table.upper():  # its indexes go with it; _JOB_INDEXES makes them again
        db.execute(_JOBS_TABLE.format(name="jobs_rowid"))
        db.execute(f"INSERT INTO jobs_rowid ({_JOBS_ALL_COLUMNS}) SELECT {_JOBS_ALL_COLUMNS} FROM jobs ORDER BY seq")
        db.execute("DROP TABLE jobs")
        db.execute("ALTER TABLE jobs_rowid RENAME TO jobs")


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout=5000")
    return db


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        with contextlib.suppress(sqlite3.Error):  # the connection itself may be what failed
            if db.in_transaction:
                db.execute("ROLLBACK")
        raise StoreError(f"SQLite: {exc}") from None
