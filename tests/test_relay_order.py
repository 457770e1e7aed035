"""Per-key order: for one key and destination, notices leave in the order their state changed.

Against SQLite and a real redis-server; Slack and PagerDuty are a local HTTP sink that answers
503, 429 with Retry-After, or hangs, as each test scripts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlwarden.relay import config as relay_config
from mlwarden.relay.app import Relay
from mlwarden.relay.auth import Credentials
from mlwarden.relay.store import open_store
from mlwarden.relay.store.base import TRIGGER_UNDELIVERED, Store

from mlwarden import components
from tests.test_relay_stores import store  # noqa: F401 (the SQLite and Redis store fixture)
from tests.test_relay_support import ENV, FakeClock, Sink, accept, alert, body, config_dict, make_config

PAGE = {"name": "GpuXid", "severity": "critical", "gpu": "3"}


@pytest.fixture
def sink() -> Iterator[Sink]:
    opened = Sink()
    yield opened
    opened.close()


def sink_config(sink: Sink) -> relay_config.RelayConfig:
    doc = config_dict()
    doc["destinations"]["pd"]["events_url"] = f"{sink.url}/pd"
    return relay_config.parse(doc, {**ENV, "SLACK_WEBHOOK_URL": f"{sink.url}/slack", "SLACK_ONCALL_URL": f"{sink.url}/oncall"})


def actions(sink: Sink) -> list[str]:
    return [event["event_action"] for event in sink.delivered("/pd")]


# The store: a key's later jobs wait for its head ---------------------------------------------------

def test_a_rescheduled_trigger_holds_back_the_resolve_behind_it(store: Store) -> None:  # noqa: F811
    config = make_config()
    accept(store, config, body(alert(**PAGE)), 100.0)
    [trigger] = store.claim("pd", 100.0, 10, lease=60)
    store.reschedule([trigger], due_at=104.0, error="HTTP 503")
    accept(store, config, body(alert(**PAGE, status="resolved")), 101.5)
    assert store.claim("pd", 102.0, 10, lease=60) == []  # due, but its trigger has not left
    [again] = store.claim("pd", 104.0, 10, lease=60)
    assert again.id == trigger.id and again.notice.kind == "firing"
    assert store.claim("pd", 104.0, 10, lease=60) == []  # the trigger is in flight
    store.delivered([again])
    [resolve] = store.claim("pd", 104.1, 10, lease=60)
    assert resolve.notice.kind == "resolved" and resolve.seq > again.seq


def test_order_holds_across_a_restart(store: Store, tmp_path: Path, request: pytest.FixtureRequest) -> None:  # noqa: F811
    config = make_config()
    accept(store, config, body(alert(**PAGE)), 100.0)
    [trigger] = store.claim("pd", 100.0, 10, lease=600)  # the relay dies mid-delivery
    accept(store, config, body(alert(**PAGE, status="resolved")), 101.0)
    if "sqlite" in request.node.callspec.id:
        store.close()
        reopened = open_store(f"sqlite://{tmp_path}/relay.db")  # a restart releases the lease
        now = 102.0
    else:
        reopened = open_store(f"redis://127.0.0.1:{request.getfixturevalue('redis_server').port}/0")
        now = 100.0 + 601  # another replica, once the lease has run out
    try:
        [first] = reopened.claim("pd", now, 10, lease=60)
        assert first.id == trigger.id
        reopened.delivered([first])
        assert [j.notice.kind for j in reopened.claim("pd", now, 10, lease=60)] == ["resolved"]
    finally:
        reopened.close()


def test_a_resolve_whose_trigger_never_left_is_not_sent(store: Store) -> None:  # noqa: F811
    config = make_config()
    accept(store, config, body(alert(**PAGE)), 100.0)
    accept(store, config, body(alert(**PAGE, status="resolved")), 101.0)
    [trigger] = store.claim("pd", 101.0, 10, lease=60)
    assert store.dead_letter([trigger], "HTTP 400 invalid routing key") == 1
    assert store.claim("pd", 200.0, 10, lease=60) == []
    dead = {j.notice.kind: j for j in store.jobs() if j.destination == "pd"}
    assert dead["resolved"].status == "dead" and dead["resolved"].last_error == TRIGGER_UNDELIVERED
    assert dead["firing"].status == "dead"


def test_a_dropped_resolve_leaves_the_sqlite_stores_memory(tmp_path: Path) -> None:
    # The SQLite store keeps up to NOTICE_CACHE_SIZE queued jobs in memory until they are delivered
    # or dead; a resolve dead-lettered because its trigger never left stayed there for good, one
    # slot fewer for the jobs still queued each time.
    from mlwarden.relay.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "relay.db")
    config = make_config()
    accept(store, config, body(alert(**PAGE)), 100.0)
    accept(store, config, body(alert(**PAGE, status="resolved")), 101.0)
    [trigger] = store.claim("pd", 101.0, 10, lease=60)
    assert store.dead_letter([trigger], "HTTP 400 invalid routing key") == 1
    assert {j.destination for j in store._pending.values()} == {"ops"}  # only the Slack ones, still queued
    store.close()


def test_a_resolve_goes_out_when_an_earlier_trigger_of_the_episode_did(store: Store) -> None:  # noqa: F811
    config = make_config(cooldown={"critical": "1m"})
    accept(store, config, body(alert(**PAGE)), 100.0)
    [first] = store.claim("pd", 100.0, 10, lease=60)
    store.delivered([first])  # PagerDuty has an open incident
    accept(store, config, body(alert(**PAGE), group_key="repeat"), 200.0)  # the repeat after the cooldown
    accept(store, config, body(alert(**PAGE, status="resolved")), 201.0)
    [repeat] = store.claim("pd", 201.0, 10, lease=60)
    assert store.dead_letter([repeat], "HTTP 400") == 0
    [resolve] = store.claim("pd", 201.0, 10, lease=60)  # closes the incident the first trigger opened
    assert resolve.notice.kind == "resolved"


# The outbox over HTTP: 503s, Retry-After ------------------------------------------------------------

def deliver_all(relay: Relay, clock: FakeClock, steps: list[tuple[float, bytes | None]]) -> None:
    """Feed (seconds later, webhook body or None) through intake, running the outbox at every step,
    then until the outbox is empty."""

    async def main() -> None:
        outbox = relay.start_outbox()
        outbox._rand = lambda: 1.0  # no jitter
        try:
            for advance, raw in steps:
                clock.advance(advance)
                if raw is not None:
                    accept(relay.store, relay.config, raw, clock())
                await outbox.run_once()
            for _ in range(200):
                if not relay.store.outbox_stats()[0]:
                    break
                clock.advance(0.5)
                await outbox.run_once()
        finally:
            assert relay.http is not None
            await relay.http.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("outage", [(503, 503, 503), ((429, "4"),)], ids=["503-for-4s", "429-retry-after"])
def test_pagerduty_gets_trigger_then_resolve_through_an_outage(store: Store, sink: Sink, outage: tuple[Any, ...]) -> None:  # noqa: F811
    # The case: PagerDuty refuses for about 4 s; GPU 3 fires, then resolves 1.5 s later.
    sink.script("/pd", *outage)
    clock = FakeClock()
    relay = Relay(sink_config(sink), store, Credentials("t"), clock=clock)
    deliver_all(relay, clock, [(0, body(alert(**PAGE))), (1.5, body(alert(**PAGE, status="resolved")))]
                + [(0.5, None)] * 12)
    assert actions(sink) == ["trigger", "resolve"]
    assert len({event["dedup_key"] for event in sink.delivered("/pd")}) == 1
    slack = [message["text"] for message in sink.delivered("/slack")]
    assert slack[0].startswith("[CRITICAL]") and slack[-1].startswith("[RESOLVED]")


# Two relay processes on one Redis, one killed mid-delivery --------------------------------------------

def test_two_replicas_on_redis_keep_order_when_one_is_killed_mid_delivery(
    tmp_path: Path, sink: Sink, redis_server: components.Component
) -> None:
    from tests.test_relay_e2e import RelayProcess

    state_url = f"redis://127.0.0.1:{redis_server.port}/0"
    # A delivery times out after 5 s; its claim lasts 8 s: what a dead replica holds comes back then.
    replicas = [RelayProcess(tmp_path / name, sink, state_url=state_url, delivery={"timeout": "5s", "lease": "8s"})
                for name in ("a", "b")]
    sink.script("/pd", "hang")  # replica a's trigger never gets an answer
    try:
        replicas[0].start()
        assert replicas[0].post(body(alert(**PAGE), group_key="page")) == 200
        components.wait_until(lambda: [p for p, _, _ in sink.received if p == "/pd"], 20, "the trigger in flight")
        replicas[1].start()
        assert replicas[1].post(body(alert(**PAGE, status="resolved"), group_key="page")) == 200
        replicas[0].kill9()  # mid-delivery: its lease must run out before replica b may send the trigger
        components.wait_until(lambda: len(actions(sink)) >= 2, 30, "trigger and resolve via replica b")
        assert actions(sink) == ["trigger", "resolve"]
        every_attempt = [data["event_action"] for path, _, data in sink.received if path == "/pd"]
        assert every_attempt == ["trigger", "trigger", "resolve"]  # the resolve never went before a trigger
    finally:
        for replica in replicas:
            replica.stop()


def old_store(path: Path, schema: str, insert: str, jobs: list[tuple[Any, ...]]) -> None:
    """A store as an older relay left it: its ``schema``, then each of ``jobs``, (id, kind, key,
    the rest of ``insert``'s parameters), with a notice to ``pd`` of that kind and key."""
    import json
    import sqlite3

    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, destination TEXT NOT NULL, notice TEXT NOT NULL,"
        " created_at REAL NOT NULL, due_at REAL NOT NULL, leased_until REAL NOT NULL DEFAULT 0,"
        f" attempts INTEGER NOT NULL, status TEXT NOT NULL, last_error TEXT NOT NULL{schema}"
    )
    for job_id, kind, key, *rest in jobs:
        notice = {"kind": kind, "key": key, "alertname": "A", "severity": "critical", "level": 0, "labels": {},
                  "annotations": {}, "starts_at": "", "generator_url": "", "occurrences": 1, "reason": ""}
        db.execute(insert, (job_id, json.dumps(notice), *rest))
    db.commit()
    db.close()


def test_a_store_written_before_per_key_order_keeps_its_jobs_in_order(tmp_path: Path) -> None:
    old_store(tmp_path / "relay.db", ") WITHOUT ROWID;", "INSERT INTO jobs VALUES (?, 'pd', ?, ?, ?, 0, 1, 'pending', '')",
              [("a", "firing", "k", 100.0, 110.0), ("b", "resolved", "k", 101.0, 101.0)])
    from mlwarden.relay.store.sqlite import SQLiteStore

    upgraded = SQLiteStore(tmp_path / "relay.db")
    try:
        assert upgraded.claim("pd", 105.0, 10, lease=60) == []  # the old resolve waits for the old trigger
        [trigger] = upgraded.claim("pd", 110.0, 10, lease=60)
        assert trigger.id == "a"
    finally:
        upgraded.close()


def test_a_store_from_before_the_lines_in_memory_keeps_its_lines(tmp_path: Path) -> None:
    # The jobs table as the relay wrote it with per-key order and before the lines moved into
    # memory: WITHOUT ROWID, no held column, jobs_line and jobs_claim. Opening rebuilds it; every
    # job keeps its place in its line.
    from mlwarden.relay.store.sqlite import SQLiteStore

    old_store(
        tmp_path / "relay.db",
        ", key TEXT NOT NULL DEFAULT '', seq INTEGER NOT NULL DEFAULT 0, rank INTEGER NOT NULL DEFAULT 1) WITHOUT ROWID;"
        " CREATE INDEX jobs_line ON jobs (destination, key, seq) WHERE status = 'pending';"
        " CREATE INDEX jobs_claim ON jobs (destination, rank DESC, seq) WHERE status = 'pending';"
        " CREATE TABLE kv (name TEXT PRIMARY KEY, value TEXT NOT NULL); INSERT INTO kv VALUES ('job_seq', '4');",
        "INSERT INTO jobs VALUES (?, 'pd', ?, 100.0, 100.0, 0, 0, 'pending', '', ?, ?, 2)",
        [("t1", "firing", "k", "k", 1), ("o", "firing", "other", "other", 2), ("r1", "resolved", "k", "k", 3),
         ("t2", "firing", "k", "k", 4)],
    )

    upgraded = SQLiteStore(tmp_path / "relay.db")
    try:
        table = upgraded._read("SELECT sql FROM sqlite_master WHERE name = 'jobs'")[0][0]
        assert "WITHOUT ROWID" not in table.upper()
        indexes = {r[0] for r in upgraded._read("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"jobs_heads", "jobs_dead"} <= indexes and not {"jobs_line", "jobs_claim", "jobs_ready"} & indexes
        delivered = []
        for now in (101.0, 102.0, 103.0):
            claimed = upgraded.claim("pd", now, 10, lease=60)
            upgraded.delivered(claimed)
            delivered.append(sorted(j.id for j in claimed))
        assert delivered == [["o", "t1"], ["r1"], ["t2"]]
        assert upgraded.jobs() == []
    finally:
        upgraded.close()
