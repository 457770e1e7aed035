"""A Redis store shared by several relay replicas behind an Alertmanager cluster.

Cooldown, escalation, the outbox and the watchdog live in Redis, so any replica can take any
webhook. Intake is an optimistic transaction (WATCH the digest and the key states, MULTI,
EXEC; retried on a conflict), so two replicas receiving the same HA duplicate store it once.
Each destination's queue is a sorted set scored by "next time this job may be taken"; a
Lua script claims jobs by pushing their score past the lease, atomically, so two replicas
never take the same job. A replica that dies mid-delivery loses its lease and another
replica delivers the job. Digests and payloads expire by themselves (TTL); dead letters are
kept for the retention and pruned by whichever replica prunes (any number may, at once).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import redis

from mlwarden.relay.policy import KeyState
from mlwarden.relay.store.base import DEAD, RETENTION_SECONDS, IntakeResult, Job, Planner, Store, StoreError

PREFIX = "mlwarden:relay:"
PENDING_BY_AGE = PREFIX + "pending"  # every pending job, scored by creation time (depth, oldest age)
DEAD_JOBS = PREFIX + "dead"  # dead job ids, scored by creation time
DEAD_PAYLOADS = PREFIX + "dead_payloads"  # a list, oldest first
PRUNE_BATCH = 1000  # dead letters per prune step: one step holds Redis (a script) or a replica only briefly
STATE_INDEX = PREFIX + "keys"
WATCHDOG = PREFIX + "watchdog"

# KEYS[1]: the destination queue. ARGV: now, limit, lease. Returns the claimed job ids.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[3]), id)
end
return ids
"""

# KEYS[1]: the dead payload list. ARGV: cutoff, limit. Pops up to limit entries received before the
# cutoff from the head, atomically (two replicas pruning never pop a fresh one). Replicas append
# in arrival order give or take their clock skew; the first recent entry stops the pass.
_PRUNE_DEAD_PAYLOADS = """
local removed = 0
while removed < tonumber(ARGV[2]) do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head or cjson.decode(head)['received_at'] >= tonumber(ARGV[1]) then
    break
  end
  redis.call('LPOP', KEYS[1])
  removed = removed + 1
end
return removed
"""


def _queue(destination: str) -> str:
    return f"{PREFIX}queue:{destination}"


def _job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def _state_key(key: str) -> str:
    return f"{PREFIX}state:{key}"


class RedisStore(Store):
    def __init__(self, url: str) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._claim = self._redis.register_script(_CLAIM)
        self._prune_dead_payloads = self._redis.register_script(_PRUNE_DEAD_PAYLOADS)

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except redis.RedisError as exc:
            raise StoreError(f"Redis: {exc}") from None

    def intake(
        self, digest: str, body: bytes, keys: Sequence[str], now: float, dedup_window: float, plan: Planner
    ) -> IntakeResult | None:
        return self._call(self._intake, digest, body, list(dict.fromkeys(keys)), now, dedup_window, plan)

    def _intake(
        self, digest: str, body: bytes, keys: list[str], now: float, dedup_window: float, plan: Planner
    ) -> IntakeResult | None:
        seen_key = f"{PREFIX}seen:{digest}"
        state_keys = [_state_key(k) for k in keys]
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(seen_key, *state_keys)
                    if pipe.exists(seen_key):
                        return None
                    raw = pipe.mget(state_keys) if state_keys else []
                    states = {k: KeyState.from_dict(json.loads(v)) for k, v in zip(keys, raw) if v}
                    result = plan(states)
                    pipe.multi()
                    pipe.set(seen_key, b"1", px=max(1, int(dedup_window * 1000)))
                    pipe.set(f"{PREFIX}payload:{digest}", body, ex=RETENTION_SECONDS)
                    for key, state in result.states.items():
                        if state is None:
                            pipe.delete(_state_key(key))
                            pipe.srem(STATE_INDEX, key)
                        else:
                            pipe.set(_state_key(key), json.dumps(state.to_dict()))
                            pipe.sadd(STATE_INDEX, key)
                    self._add_jobs(pipe, result.jobs)
                    if result.heartbeat:
                        pipe.hset(WATCHDOG, "last_seen", repr(now))
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue  # another replica changed one of these keys: plan again on fresh state

    @staticmethod
    def _add_jobs(pipe: Any, jobs: Sequence[Job]) -> None:
        for job in jobs:
            pipe.set(_job_key(job.id), json.dumps(job.to_dict()))
            pipe.zadd(_queue(job.destination), {job.id: job.due_at})
            pipe.zadd(PENDING_BY_AGE, {job.id: job.created_at})

    def dead_letter_payload(self, body: bytes, reason: str, now: float) -> None:
        entry = json.dumps({"received_at": now, "reason": reason, "body": body.decode("utf-8", "replace")})
        self._call(self._redis.rpush, DEAD_PAYLOADS, entry)

    def enqueue(self, jobs: Sequence[Job]) -> None:
        pipe = self._redis.pipeline()
        self._add_jobs(pipe, jobs)
        self._call(pipe.execute)

    def claim(self, destination: str, now: float, limit: int, lease: float) -> list[Job]:
        ids = self._call(self._claim, [_queue(destination)], [repr(now), limit, repr(lease)])
        if not ids:
            return []
        raw = self._call(self._redis.mget, [_job_key(i.decode()) for i in ids])
        jobs = [Job.from_dict(json.loads(r)) for r in raw if r]
        return sorted(jobs, key=lambda j: (j.created_at, j.id))

    def delivered(self, jobs: Sequence[Job]) -> None:
        pipe = self._redis.pipeline()
        for job in jobs:
            pipe.zrem(_queue(job.destination), job.id)
            pipe.zrem(PENDING_BY_AGE, job.id)
            pipe.delete(_job_key(job.id))
        self._call(pipe.execute)

    def reschedule(self, jobs: Sequence[Job], due_at: float, error: str) -> None:
        pipe = self._redis.pipeline()
        for job in jobs:
            updated = Job.from_dict({**job.to_dict(), "due_at": due_at, "last_error": error,
                                     "attempts": job.attempts + 1})
            pipe.set(_job_key(job.id), json.dumps(updated.to_dict()))
            pipe.zadd(_queue(job.destination), {job.id: due_at})
        self._call(pipe.execute)

    def dead_letter(self, jobs: Sequence[Job], error: str) -> None:
        pipe = self._redis.pipeline()
        for job in jobs:
            dead = Job.from_dict({**job.to_dict(), "status": DEAD, "last_error": error, "attempts": job.attempts + 1})
            pipe.set(_job_key(job.id), json.dumps(dead.to_dict()))
            pipe.zrem(_queue(job.destination), job.id)
            pipe.zrem(PENDING_BY_AGE, job.id)
            pipe.zadd(DEAD_JOBS, {job.id: job.created_at})
        self._call(pipe.execute)

    def announce_watchdog(self, previous: str, current: str, jobs: Sequence[Job]) -> bool:
        return bool(self._call(self._announce, previous, current, jobs))

    def _announce(self, previous: str, current: str, jobs: Sequence[Job]) -> bool:
        with self._redis.pipeline() as pipe:
            try:
                pipe.watch(WATCHDOG)
                recorded = pipe.hget(WATCHDOG, "state")
                if (recorded.decode() if recorded else "new") != previous:
                    return False
                pipe.multi()
                pipe.hset(WATCHDOG, "state", current)
                self._add_jobs(pipe, jobs)
                pipe.execute()
                return True
            except redis.WatchError:
                return False  # another replica recorded a transition first

    def watchdog(self) -> tuple[float | None, str]:
        fields = self._call(self._redis.hgetall, WATCHDOG)
        last_seen = fields.get(b"last_seen")
        return (float(last_seen) if last_seen else None), fields.get(b"state", b"new").decode()

    def key_states(self, limit: int = 1000) -> list[KeyState]:
        keys = sorted(k.decode() for k in self._call(self._redis.smembers, STATE_INDEX))[:limit]
        raw = self._call(self._redis.mget, [_state_key(k) for k in keys]) if keys else []
        return [KeyState.from_dict(json.loads(r)) for r in raw if r]

    def jobs(self, limit: int = 1000) -> list[Job]:
        pending = self._call(self._redis.zrange, PENDING_BY_AGE, 0, limit - 1)
        dead = self._call(self._redis.zrange, DEAD_JOBS, 0, limit - 1)
        ids = [i.decode() for i in [*pending, *dead]]
        raw = self._call(self._redis.mget, [_job_key(i) for i in ids]) if ids else []
        return sorted((Job.from_dict(json.loads(r)) for r in raw if r), key=lambda j: j.created_at)[:limit]

    def outbox_stats(self) -> tuple[int, float | None]:
        pipe = self._redis.pipeline()
        pipe.zcard(PENDING_BY_AGE)
        pipe.zrange(PENDING_BY_AGE, 0, 0, withscores=True)
        count, oldest = self._call(pipe.execute)
        return int(count), (oldest[0][1] if oldest else None)

    def prune(self, now: float) -> None:
        cutoff = now - RETENTION_SECONDS
        # A full step may have left more behind; other calls get Redis between steps.
        while self._call(self._prune_dead_jobs, cutoff) == PRUNE_BATCH:
            continue
        while self._call(self._prune_dead_payloads, [DEAD_PAYLOADS], [repr(cutoff), PRUNE_BATCH]) == PRUNE_BATCH:
            continue

    def _prune_dead_jobs(self, cutoff: float) -> int:
        ids = self._redis.zrangebyscore(DEAD_JOBS, "-inf", f"({cutoff!r}", start=0, num=PRUNE_BATCH)
        if ids:
            pipe = self._redis.pipeline()  # MULTI: a job and its index entry go together
            pipe.delete(*[_job_key(i.decode()) for i in ids])
            pipe.zrem(DEAD_JOBS, *ids)
            pipe.execute()
        return len(ids)

    def ping(self) -> None:
        self._call(self._redis.ping)

    def close(self) -> None:
        self._redis.close()
