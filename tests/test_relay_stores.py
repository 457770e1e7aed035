"""The store contract against SQLite and a real redis-server; two Redis replicas never share a job;
the prune keeps what is recent or live, with indexes, and out of the writer's way."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from mlwarden.relay import dedup, intake, payload
from mlwarden.relay.app import Relay
from mlwarden.relay.auth import Credentials
from mlwarden.relay.groupcommit import GroupCommit
from mlwarden.relay.notice import Notice
from mlwarden.relay.store import open_store
from mlwarden.relay.store import redis as redis_store
from mlwarden.relay.store import sqlite as sqlite_store
from mlwarden.relay.store.base import RETENTION_SECONDS, IntakeRequest, Job, Store, StoreError, new_job_id
from mlwarden.relay.store.redis import DEAD_JOBS, DEAD_PAYLOADS, RedisStore
from mlwarden.relay.store.redis import PREFIX as REDIS_PREFIX
from mlwarden.relay.store.sqlite import SQLiteStore

from mlwarden import components
from tests.test_relay_support import SLACK_URL, FakeClock, accept, alert, body, make_config


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        opened = open_store(f"sqlite://{tmp_path}/relay.db")
    else:
        server: components.Component = request.getfixturevalue("redis_server")
        opened = open_store(f"redis://127.0.0.1:{server.port}/0")
    yield opened
    opened.close()


def jobs_for(destination: str, count: int, now: float) -> list[Job]:
    """``count`` jobs of as many keys (one key's jobs go out one at a time, in order)."""
    return [Job(destination, Notice(kind="firing", key=f"k{i}", alertname="A", severity="warning"),
                created_at=now + i, due_at=now) for i in range(count)]


def test_intake_stores_state_and_jobs_and_dedups(store: Store) -> None:
    config = make_config()
    assert accept(store, config, body(alert(severity="critical")), 100.0) is not None
    assert accept(store, config, body(alert(severity="critical")), 101.0) is None  # HA duplicate
    assert [s.level for s in store.key_states()] == [1]
    assert store.outbox_stats() == (2, 100.0)
    assert {j.destination for j in store.jobs()} == {"ops", "pd"}
    accept(store, config, body(alert(status="resolved")), 102.0)
    assert store.key_states() == []


def test_claim_lease_reschedule_deliver_and_dead_letter(store: Store) -> None:
    store.enqueue(jobs_for("ops", 3, 100.0))
    first = store.claim("ops", 100.0, limit=2, lease=60)
    assert len(first) == 2
    second = store.claim("ops", 100.0, limit=5, lease=60)
    assert len(second) == 1 and second[0].id not in {j.id for j in first}
    assert store.claim("ops", 100.5, limit=5, lease=60) == []  # all leased
    store.reschedule(first[:1], due_at=110.0, error="HTTP 503")
    store.delivered(first[1:])
    assert store.claim("ops", 109.0, limit=5, lease=60) == []
    [retry] = store.claim("ops", 110.0, limit=5, lease=60)
    assert retry.attempts == 1 and retry.last_error == "HTTP 503"
    store.dead_letter([retry], "HTTP 404")
    [expired] = store.claim("ops", 1000.0, limit=5, lease=60)  # its worker died: the lease ran out
    assert expired.id == second[0].id
    dead = [j for j in store.jobs() if j.status == "dead"]
    assert [j.id for j in dead] == [retry.id] and dead[0].attempts == 2
    assert store.outbox_stats()[0] == 1


def test_a_claim_passes_over_more_leased_jobs_than_its_limit(store: Store) -> None:
    # SQLite keeps leases in memory and reads candidates in pages of the claim's size: with more
    # leased jobs ahead than that, the claim must read on past them, not come back empty.
    store.enqueue(jobs_for("ops", 7, 100.0))
    leased = store.claim("ops", 100.0, limit=5, lease=60)
    rest = store.claim("ops", 100.0, limit=2, lease=60)
    assert [j.notice.key for j in leased] == ["k0", "k1", "k2", "k3", "k4"]
    assert [j.notice.key for j in rest] == ["k5", "k6"]
    store.reschedule(leased[1:2], due_at=100.0, error="HTTP 503")  # its lease ends with the reschedule
    assert [j.notice.key for j in store.claim("ops", 100.0, limit=2, lease=60)] == ["k1"]


def test_claims_that_go_on_after_the_last_one_take_every_head_once_in_order(store: Store) -> None:
    # How the outbox gathers a digest: a claim, then steps that each go on behind the last job
    # claimed. Priority, per-key order and leases hold as for claims from the top.
    severities = ["warning", "info", "critical", "warning", "info", "warning", "critical", "warning"]
    jobs = [Job("ops", Notice(kind="firing", key=f"k{i}", alertname=f"a{i}", severity=severity),
                created_at=100.0, due_at=100.0) for i, severity in enumerate(severities)]
    later = Job("ops", Notice(kind="resolved", key="k0", alertname="a0", severity="warning"), created_at=100.0, due_at=100.0)
    store.enqueue([*jobs, later])
    claimed = store.claim("ops", 100.0, limit=3, lease=60)
    while (step := store.claim("ops", 100.0, 2, 60, claimed[-1])):
        claimed += step
    assert [j.notice.alertname for j in claimed] == ["a2", "a6", "a0", "a3", "a5", "a7", "a1", "a4"]
    assert later.id not in {j.id for j in claimed}  # its key's trigger is still out
    assert store.claim("ops", 100.0, limit=10, lease=60) == []  # every one of them is leased

    # The relay dies mid-digest, before recording anything: when the leases run out, the same
    # jobs come back, each once, in the same order, and the resolve still waits for its trigger.
    again = store.claim("ops", 200.0, limit=3, lease=60)
    while (step := store.claim("ops", 200.0, 2, 60, again[-1])):
        again += step
    assert [j.id for j in again] == [j.id for j in claimed]
    store.delivered(again)
    assert [j.id for j in store.claim("ops", 200.0, limit=10, lease=60)] == [later.id]


def test_a_transaction_that_fails_leaves_the_sqlite_stores_lines_as_they_were(tmp_path: Path) -> None:
    # The SQLite store keeps each key's line of pending jobs in memory (see sqlite._Lines): a
    # webhook whose transaction rolls back must not leave its jobs there, where they would hold
    # back, for ever, the next job of their keys.
    config = make_config()
    store = SQLiteStore(tmp_path / "relay.db")
    stored = intake.request(payload.parse(body(alert(name="A"))), body(alert(name="A")), 100.0, config)

    def fails(_: Any) -> Any:
        raise RuntimeError("a bug in the plan")

    broken = IntakeRequest("other", b"{}", [], 100.0, 0.0, fails)
    with pytest.raises(RuntimeError):
        store.intake_batch([stored, broken])  # the first one's jobs were written, then rolled back
    assert store.jobs() == []
    assert accept(store, config, body(alert(name="A")), 101.0) is not None
    [job] = store.claim("ops", 101.0, limit=10, lease=60)
    store.close()
    reopened = SQLiteStore(tmp_path / "relay.db")  # and the lines read back at open agree
    assert [j.id for j in reopened.claim("ops", 1000.0, limit=10, lease=60)] == [job.id]
    reopened.close()


def test_the_sqlite_stores_dedup_digests_in_memory_roll_back_and_come_back_after_a_restart(tmp_path: Path) -> None:
    # The SQLite store checks digests in memory only (see sqlite._Digests): a batch that rolls back
    # must not leave its digests there (its webhook, retried, would be dropped as a duplicate), and
    # a restart must read back every digest still inside its window.
    config = make_config()
    window = config.dedup_window
    store = SQLiteStore(tmp_path / "relay.db")
    assert accept(store, config, body(alert(name="A")), 100.0) is not None
    retried = intake.request(payload.parse(body(alert(name="B"))), body(alert(name="B")), 100.0, config)

    def fails(_: Any) -> Any:
        raise RuntimeError("a bug in the plan")

    broken = IntakeRequest("other", b"{}", [], 100.0, 0.0, fails)
    with pytest.raises(RuntimeError):
        store.intake_batch([retried, broken])
    assert accept(store, config, body(alert(name="B")), 100.5) is not None  # its first try rolled back
    store.close()
    reopened = SQLiteStore(tmp_path / "relay.db")
    assert accept(reopened, config, body(alert(name="A")), 101.0) is None  # the HA peer's copy, after a restart
    assert accept(reopened, config, body(alert(name="B")), 101.0) is None
    assert accept(reopened, config, body(alert(name="A")), 100.0 + window + 1) is not None  # its window is over
    assert accept(reopened, config, body(alert(name="A")), 100.0 + window + 2) is None  # and a new one began
    reopened.close()


def test_a_store_with_digests_keyed_by_digest_keeps_deduplicating_after_the_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    raw = body(alert(name="A"))
    SQLiteStore(path).close()
    with contextlib.closing(sqlite3.connect(path)) as db:  # the seen table as relays before _Digests wrote it
        db.execute("DROP TABLE seen")
        db.execute("CREATE TABLE seen (digest TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID")
        db.execute("CREATE INDEX seen_expires ON seen (expires_at)")
        db.execute("INSERT INTO seen VALUES (?, ?)", (dedup.notification_digest(payload.parse(raw)), 400.0))
        db.commit()
    store = SQLiteStore(path)
    assert accept(store, make_config(), raw, 399.0) is None
    assert accept(store, make_config(), raw, 401.0) is not None
    table = store._read("SELECT sql FROM sqlite_master WHERE name = 'seen'")[0][0]
    assert "WITHOUT ROWID" not in str(table).upper()
    assert store._read("SELECT count(*) FROM sqlite_master WHERE name = 'seen_expires'") == [(1,)]
    store.close()


def test_a_claimed_notice_is_the_one_stored_in_memory_and_after_a_restart(tmp_path: Path) -> None:
    # The SQLite store hands the outbox the notices intake built while it holds them, and
    # decodes the stored JSON otherwise: both must be the same notice.
    config = make_config()
    raw = body(alert(severity="critical", instance="n\u00f6de1", gpu="3"), alert(name="Other"))
    first = SQLiteStore(tmp_path / "relay.db")
    accept(first, config, raw, 100.0)
    from_memory = {j.id: j.notice for j in first.claim("ops", 100.0, limit=10, lease=1.0)}
    first.close()
    again = SQLiteStore(tmp_path / "relay.db")
    decoded = {j.id: j.notice for j in again.claim("ops", 200.0, limit=10, lease=1.0)}  # the leases ran out
    again.close()
    assert len(from_memory) == 2 and decoded == from_memory


def test_the_sqlite_stores_notices_in_memory_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "NOTICE_CACHE_SIZE", 3)
    store = SQLiteStore(tmp_path / "relay.db")
    store.enqueue(jobs_for("ops", 5, 100.0))
    assert sorted(n.key for n in (j.notice for j in store._pending.values())) == ["k0", "k1", "k2"]  # the oldest: claimed first
    claimed = store.claim("ops", 100.0, limit=10, lease=60)
    assert [j.notice.key for j in claimed] == [f"k{i}" for i in range(5)]  # the evicted two decoded
    store.delivered(claimed)
    assert len(store._pending) == 0
    store.close()


def test_the_sqlite_stores_jobs_in_memory_are_not_tracked_by_the_garbage_collector(tmp_path: Path) -> None:
    # Every kept Job and Notice was two objects that each full collection (every thread stopped)
    # walked: 72-128 ms with 50,000 kept. Untracked, they are no collection's work; so with the
    # lines of one job (the usual line), kept as the job's id instead of a list.
    store = SQLiteStore(tmp_path / "relay.db")
    notice = Notice(kind="firing", key="k", alertname="A", severity="critical", labels={"instance": "n1"},
                    members=({"mount": "/data"}, {"mount": "/home"}))
    stored = [Job("ops", notice, created_at=100.0, due_at=100.0), Job("pd", notice, created_at=100.0, due_at=100.0),
              *jobs_for("ops", 5, 100.0), Job("ops", notice, created_at=101.0, due_at=100.0)]  # a line of two
    store.enqueue(stored)
    assert len(store._pending) == 8
    assert not any(gc.is_tracked(job) or gc.is_tracked(job.notice) for job in store._pending.values())
    assert [gc.is_tracked(line) for line in store._lines._lines.values()].count(False) == 6  # all but ("ops", "k")
    # Nor are the lines' names: a (destination, key) tuple stayed in the collector's sight until a
    # collection had walked it once, and 5,000 new lines a second were most of every young collection.
    assert not any(gc.is_tracked(name) for name in store._lines._lines)
    store.reschedule([stored[0]], 150.0, "HTTP 503")
    assert not gc.is_tracked(store._pending[stored[0].seq])
    claimed = store.claim("ops", 200.0, limit=10, lease=60) + store.claim("pd", 200.0, limit=10, lease=60)
    assert {id(j) for j in claimed} == {id(store._pending[j.seq]) for j in stored if j is not stored[-1]}  # the kept objects
    assert claimed[0].attempts == 1 and claimed[0].notice is notice  # the rescheduled one, as its row says
    store.delivered(claimed)
    gc.collect()
    [last] = store.claim("ops", 200.0, limit=10, lease=60)  # what headed ("ops", "k") behind the delivered one
    assert last is stored[-1] and last.notice.members == ({"mount": "/data"}, {"mount": "/home"})
    store.close()


def test_a_backlog_larger_than_the_old_cap_is_claimed_in_order_from_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The cap was 10,000: a backlog beyond it (a warning flood ahead of a digest that sends 5,000 a
    # second) was claimed from the file at 15-25 us a job against about 2 from memory.
    store = SQLiteStore(tmp_path / "relay.db")
    backlog = jobs_for("ops", 12_000, 100.0)
    criticals = [Job("ops", Notice(kind="firing", key=f"c{i}", alertname="C", severity="critical"), created_at=200.0,
                     due_at=100.0) for i in range(3)]
    store.enqueue(backlog[:6_000])
    store.enqueue(backlog[6_000:] + criticals)

    def read_from_the_file(row: Any) -> Job:
        raise AssertionError(f"job {row[0]} was read from the file")

    monkeypatch.setattr(store, "_job", read_from_the_file)
    claimed: list[Job] = []
    while jobs := store.claim("ops", 100.0, limit=5_000, lease=60):
        claimed += jobs
        store.delivered(jobs)
    assert [j.notice.key for j in claimed] == [f"c{i}" for i in range(3)] + [f"k{i}" for i in range(12_000)]  # criticals first
    store.close()


def test_job_ids_are_unique_increasing_and_a_forked_child_does_not_repeat_its_parents() -> None:
    ids = [new_job_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids) and all(len(i) == 28 for i in ids)
    assert [i[:16] for i in ids] == sorted(i[:16] for i in ids)  # the time part grows
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, without the parent's counter and random base
        os.write(write, new_job_id()[16:].encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_tail = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert len(child_tail) == 12 and child_tail != new_job_id()[16:]


def test_watchdog_transition_is_recorded_once(store: Store) -> None:
    assert store.watchdog() == (None, "new")
    assert store.announce_watchdog("new", "down", jobs_for("ops", 1, 5.0))
    assert not store.announce_watchdog("new", "down", jobs_for("ops", 1, 5.0))  # a second replica loses
    assert store.watchdog()[1] == "down" and store.outbox_stats()[0] == 1


def test_two_redis_replicas_never_claim_the_same_job(redis_server: components.Component) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    replicas = [open_store(url), open_store(url)]
    replicas[0].enqueue(jobs_for("ops", 300, 100.0))
    claimed: list[list[str]] = [[], []]

    def work(index: int) -> None:
        while batch := replicas[index].claim("ops", 100.0, limit=3, lease=600):
            claimed[index] += [j.id for j in batch]
            replicas[index].delivered(batch)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = claimed[0] + claimed[1]
    assert len(every) == 300 and len(set(every)) == 300
    assert claimed[0] and claimed[1]  # both replicas took part
    assert replicas[1].outbox_stats() == (0, None)


def test_two_redis_replicas_store_an_ha_duplicate_once(redis_server: components.Component) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    config = make_config()
    results = [accept(open_store(url), config, body(alert()), 100.0) for _ in range(2)]
    assert results[0] is not None and results[1] is None
    assert open_store(url).outbox_stats()[0] == 1


@respx.mock
def test_two_relay_replicas_on_redis_deliver_every_alert_exactly_once(redis_server: components.Component) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    # Critical, and to Slack alone: a full batch of warnings would be folded into a digest.
    config = make_config(delivery={"max_alerts_per_message": 5}, escalation={"after_repeats": 100, "page_immediately": []})
    clock = FakeClock()
    sections: list[str] = []

    def slack(request: httpx.Request) -> httpx.Response:
        sections.extend(b["text"]["text"] for b in json.loads(request.content)["blocks"] if b["type"] == "section")
        return httpx.Response(200, text="ok")

    respx.post(SLACK_URL).mock(side_effect=slack)
    replicas = [Relay(config, open_store(url), Credentials("t"), clock=clock) for _ in range(2)]
    for n in range(0, 40, 10):
        accept(replicas[n // 10 % 2].store, config, body(*[alert(name=f"Replica{i:02d}", severity="critical") for i in range(n, n + 10)]), clock())

    async def main() -> None:
        outboxes = [replica.start_outbox() for replica in replicas]
        for _ in range(10):
            await asyncio.gather(*(outbox.run_once() for outbox in outboxes))
            clock.advance(1.0)
        for replica in replicas:
            assert replica.http is not None
            await replica.http.aclose()

    asyncio.run(main())
    assert sorted(s.split("Replica")[1][:2] for s in sections) == [f"{i:02d}" for i in range(40)]
    delivered = [r.metrics.registry.get_sample_value("mlwarden_relay_deliveries_total",
                                                     {"destination": "ops", "integration": "slack"}) or 0.0 for r in replicas]
    assert all(delivered) and sum(delivered) == 40  # both replicas worked, and no alert went out twice


def intake_request(config: Any, raw: bytes, now: float) -> IntakeRequest:
    return intake.request(payload.parse(raw), raw, now, config)


class CountingStore(SQLiteStore):
    batches: list[int]

    def intake_batch(self, requests: Any) -> Any:
        self.batches.append(len(requests))
        return super().intake_batch(requests)


def test_webhooks_arriving_together_share_one_commit_and_keep_their_own_answers(tmp_path: Path) -> None:
    config = make_config()
    store = CountingStore(tmp_path / "relay.db")
    store.batches = []
    raws = [body(alert(name=f"A{i}")) for i in range(10)] + [body(alert(name="A0"))]  # the last: an HA duplicate

    async def main() -> list[Any]:
        commits = GroupCommit(store)
        return await asyncio.gather(*(commits.submit(intake_request(config, raw, 100.0)) for raw in raws))

    results = asyncio.run(main())
    assert store.batches == [11]
    assert [len(r.jobs) for r in results[:10]] == [1] * 10 and results[10] is None
    assert store.outbox_stats()[0] == 10


def test_under_steady_load_a_commit_waits_for_company_and_after_a_quiet_spell_it_does_not(tmp_path: Path) -> None:
    # Webhooks one after another (each sent once the one before was answered) shared no commit:
    # under steady load a commit now lingers for the next. The linger here is long, so that the
    # test says what is batched, not how fast anything is.
    config = make_config()
    store = CountingStore(tmp_path / "relay.db")
    store.batches = []

    async def main() -> None:
        commits = GroupCommit(store, linger=1.0)
        await commits.submit(intake_request(config, body(alert(name="Quiet")), 100.0))  # nothing before it: no wait

        async def later(name: str) -> None:
            await asyncio.sleep(0.01)
            await commits.submit(intake_request(config, body(alert(name=name)), 100.0))

        await asyncio.gather(commits.submit(intake_request(config, body(alert(name="Steady")), 100.0)), later("Company"))

    asyncio.run(main())
    assert store.batches == [1, 2]
    store.close()


def test_a_failed_group_commit_fails_every_webhook_in_it(tmp_path: Path) -> None:
    config = make_config()
    store = SQLiteStore(tmp_path / "relay.db")
    store.close()  # every statement now fails

    async def main() -> list[Any]:
        commits = GroupCommit(store)
        return await asyncio.gather(*(commits.submit(intake_request(config, body(alert(name=f"B{i}")), 1.0))
                                      for i in range(3)), return_exceptions=True)

    assert all(isinstance(r, StoreError) for r in asyncio.run(main()))


def test_a_backlog_is_answered_batch_by_batch_not_after_the_next_commit(tmp_path: Path) -> None:
    config = make_config()
    answered: list[int] = []
    answered_before_each_batch: list[int] = []

    class WatchingStore(SQLiteStore):
        def intake_batch(self, requests: Any) -> Any:
            answered_before_each_batch.append(len(answered))
            return super().intake_batch(requests)

    store = WatchingStore(tmp_path / "relay.db")

    async def main() -> None:
        commits = GroupCommit(store, max_batch=2)

        async def send(raw: bytes) -> None:
            await commits.submit(intake_request(config, raw, 100.0))
            answered.append(1)

        await asyncio.gather(*(send(body(alert(name=f"C{i}"))) for i in range(6)))

    asyncio.run(main())
    assert answered_before_each_batch == [0, 2, 4]


def dead_payload_bodies(store: Store) -> list[bytes]:
    if isinstance(store, SQLiteStore):
        return [bytes(r[0]) for r in store._read("SELECT body FROM dead_payloads ORDER BY id")]  # type: ignore[arg-type]  # rows of one BLOB column
    assert isinstance(store, RedisStore)
    return [json.loads(e)["body"].encode() for e in store._redis.lrange(DEAD_PAYLOADS, 0, -1)]


def job_records(store: Store) -> int:
    """Jobs kept in any form (a pruned job must leave nothing behind)."""
    if isinstance(store, SQLiteStore):
        return int(store._read("SELECT count(*) FROM jobs")[0][0])  # type: ignore[arg-type]  # count(*) is an integer
    assert isinstance(store, RedisStore)
    return len(store._redis.keys(f"{REDIS_PREFIX}job:*")) + int(store._redis.zcard(DEAD_JOBS))


@pytest.fixture
def small_prune_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps of 2 records, so that a prune of 5 needs several."""
    monkeypatch.setattr(sqlite_store, "PRUNE_BATCH_ROWS", 2)
    monkeypatch.setattr(redis_store, "PRUNE_BATCH", 2)


NOW = 10 * RETENTION_SECONDS
OLD = NOW - RETENTION_SECONDS - 1
PRUNE_INDEXES = ("seen_expires", "payloads_received", "dead_payloads_received", "jobs_dead")  # in _PRUNES order
RECENT = NOW - RETENTION_SECONDS + 1


@pytest.mark.usefixtures("small_prune_steps")
def test_prune_forgets_old_dead_letters_and_keeps_recent_and_live_ones(store: Store) -> None:
    notice = Notice(kind="firing", key="k", alertname="A", severity="warning")
    old_dead = [Job("ops", notice, created_at=OLD - i, due_at=OLD) for i in range(5)]
    recent_dead = Job("ops", notice, created_at=RECENT, due_at=RECENT)
    old_pending = Job("pd", notice, created_at=OLD, due_at=NOW + 60)  # still being retried: live
    store.enqueue([*old_dead, recent_dead, old_pending])
    store.dead_letter([*old_dead, recent_dead], "HTTP 404")
    for i in range(5):
        store.dead_letter_payload(f"old{i}".encode(), "bad JSON", OLD - i)
    store.dead_letter_payload(b"recent", "bad JSON", RECENT)

    store.prune(NOW)

    assert sorted(j.id for j in store.jobs()) == sorted([recent_dead.id, old_pending.id])
    assert job_records(store) == (2 if isinstance(store, SQLiteStore) else 3)  # Redis: 2 jobs + 1 dead index entry
    assert dead_payload_bodies(store) == [b"recent"]
    assert store.outbox_stats() == (1, OLD)
    store.prune(NOW)  # nothing left to prune is not an error
    assert len(store.jobs()) == 2


@pytest.mark.usefixtures("small_prune_steps")
def test_sqlite_prune_forgets_expired_digests_and_old_payloads(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "relay.db")
    config = make_config()
    for i in range(5):
        accept(store, config, body(alert(name=f"Old{i}")), OLD)
    accept(store, config, body(alert(name="Recent")), RECENT)
    accept(store, config, body(alert(name="Fresh")), NOW)
    store.prune(NOW)
    bodies = [json.loads(r[0])["alerts"][0]["labels"]["alertname"] for r in store._read("SELECT body FROM payloads")]  # type: ignore[arg-type]  # rows of one TEXT column
    assert bodies == ["Recent", "Fresh"]
    assert store._read("SELECT count(*) FROM seen") == [(1,)]  # only Fresh is inside its dedup window
    assert accept(store, config, body(alert(name="Recent")), NOW) is not None  # its digest expired: not a duplicate
    store.close()


def test_an_existing_database_gets_the_prune_indexes(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    SQLiteStore(path).close()
    with contextlib.closing(sqlite3.connect(path)) as db:  # as a relay without the indexes left it
        for name in PRUNE_INDEXES:
            db.execute(f"DROP INDEX {name}")
        db.execute("INSERT INTO payloads (received_at, body) VALUES (?, ?)", (OLD, b"{}"))
        db.commit()
    SQLiteStore(path).close()
    store = SQLiteStore(path)  # a second start: the schema is idempotent
    indexes = {r[0] for r in store._read("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert indexes >= set(PRUNE_INDEXES)
    for (_, _, statement), index in zip(sqlite_store._PRUNES, PRUNE_INDEXES, strict=True):
        plan = " ".join(str(r[-1]) for r in store._read(f"EXPLAIN QUERY PLAN {statement}", (0.0, 1)))  # type: ignore[arg-type]  # the statements' parameters are a time and a limit
        assert f"INDEX {index} " in plan, plan
    store.prune(NOW)
    assert store._read("SELECT count(*) FROM payloads") == [(0,)]
    store.close()


def test_a_prune_in_a_thread_keeps_out_of_the_writers_transactions(tmp_path: Path, small_prune_steps: None) -> None:
    # The relay prunes in a thread while the event loop writes: on one shared connection the two
    # would begin transactions inside each other's.
    store = SQLiteStore(tmp_path / "relay.db")
    config = make_config()
    for i in range(200):
        store.dead_letter_payload(b"old", "bad JSON", OLD - i)
    errors: list[BaseException] = []

    def prune() -> None:
        try:
            store.prune(NOW)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    pruner = threading.Thread(target=prune)
    pruner.start()
    accepted = [accept(store, config, body(alert(name=f"During{i}")), NOW) for i in range(50)]
    pruner.join()
    assert errors == [] and all(a is not None for a in accepted)
    assert dead_payload_bodies(store) == [] and store.outbox_stats()[0] == 50
    store.close()


def test_sqlite_calls_from_two_threads_keep_their_transactions_apart(tmp_path: Path) -> None:
    # The relay checks the watchdog in a thread while the event loop takes webhooks on the same connection.
    store = SQLiteStore(tmp_path / "relay.db")
    config = make_config()
    errors: list[BaseException] = []
    done = threading.Event()

    def watch() -> None:
        states = ["new", "down"]
        try:
            while not done.is_set():
                store.watchdog()
                store.announce_watchdog(states[0], states[1], [])
                states.reverse()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        accepted = [accept(store, config, body(alert(name=f"Busy{i}")), NOW) for i in range(200)]
    finally:
        done.set()
        watcher.join()
    assert errors == [] and all(a is not None for a in accepted) and store.outbox_stats()[0] == 200
    store.close()
