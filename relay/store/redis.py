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

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import redis
from mlwarden.relay.config import SEVERITIES
from mlwarden.relay.policy import KeyState
from mlwarden.relay.store.base import (
    CLOSES,
    DEAD,
    OPENS,
    PENDING,
    RETENTION_SECONDS,
    TRIGGER_UNDELIVERED,
    DeadPayload,
    IntakeResult,
    Job,
    Planner,
    Store,
    StoreError,
    new_job_id,
)

from mlwarden import jsonio

PREFIX = "mlwarden:relay:"
PENDING_BY_AGE = PREFIX + "pending"  # every pending job, scored by creation time (depth, oldest age)
SEQS = PREFIX + "seqs"  # pending job id -> its sequence number
DEAD_JOBS = PREFIX + "dead"  # dead job ids, scored by creation time
DEAD_PAYLOADS = PREFIX + "dead_payloads"  # a list, oldest first
PRUNE_BATCH = 1000  # dead letters per prune step: one step holds Redis (a script) or a replica only briefly
STATE_INDEX = PREFIX + "keys"
WATCHDOG = PREFIX + "watchdog"

# Per-key order (see base): each (destination, key) has a "line", a sorted set of its pending job
# ids scored by sequence number; only a line's head is in one of the destination's queues (one per
# priority rank), scored by "next time it may be taken". Sequence numbers come from INCR inside
# these scripts, which run atomically at EXEC, so they follow the order in which state changes commit.

# ARGV: prefix, then per job: id, JSON body, line key, queue key. Stores the jobs and puts each in
# its line; a job that heads its line goes into its queue.
_ENQUEUE = """
local p = ARGV[1]
for i = 2, #ARGV, 4 do
  local id, body, line, queue = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local job = cjson.decode(body)
  local seq = redis.call('INCR', p .. 'seq')
  redis.call('SET', p .. 'job:' .. id, body)
  redis.call('HSET', p .. 'seqs', id, seq)
  redis.call('ZADD', line, seq, id)
  redis.call('ZADD', p .. 'pending', job.created_at, id)
  if redis.call('ZRANGE', line, 0, 0)[1] == id then
    redis.call('ZADD', queue, 'NX', job.due_at, id)
  end
end
"""

# ARGV: prefix, mode ("delivered" | "dead"), then per job: id, line key, queue key, destination,
# alert key, kind class ("open" | "close" | ""), dead JSON body (mode "dead"). Takes the jobs out
# of their lines and queues; the next job of each line goes into its queue. A dead opening notice
# whose destination was never told drags the closing notices heading its line along with it: their
# ids are returned for the caller to mark (their bodies still say pending until then).
_FINISH = """
local p, mode = ARGV[1], ARGV[2]
local dropped = {}
local function unqueue(id, line, queue)
  redis.call('ZREM', line, id)
  redis.call('ZREM', queue, id)
  redis.call('ZREM', p .. 'pending', id)
  redis.call('HDEL', p .. 'seqs', id)
end
local function promote(line, destination)
  local head = redis.call('ZRANGE', line, 0, 0)[1]
  if head then
    local job = cjson.decode(redis.call('GET', p .. 'job:' .. head))
    redis.call('ZADD', p .. 'queue:' .. job.rank .. ':' .. destination, 'NX', job.due_at, head)
  end
  return head
end
for i = 3, #ARGV, 7 do
  local id, line, queue, destination, key, class, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
    ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  local told = p .. 'told:' .. destination
  unqueue(id, line, queue)
  if mode == 'delivered' then
    redis.call('DEL', p .. 'job:' .. id)
    if class == 'open' then redis.call('SADD', told, key) elseif class == 'close' then redis.call('SREM', told, key) end
  else
    redis.call('SET', p .. 'job:' .. id, body)
    redis.call('ZADD', p .. 'dead', cjson.decode(body).created_at, id)
  end
  local head = promote(line, destination)
  if mode == 'dead' and class == 'open' and redis.call('SISMEMBER', told, key) == 0 then
    while head do
      local job = cjson.decode(redis.call('GET', p .. 'job:' .. head))
      if job.notice.kind ~= 'resolved' and job.notice.kind ~= 'pipeline_up' then break end
      unqueue(head, line, p .. 'queue:' .. job.rank .. ':' .. destination)
      redis.call('ZADD', p .. 'dead', job.created_at, head)
      table.insert(dropped, head)
      head = promote(line, destination)
    end
  end
end
return dropped
"""

# KEYS: a destination's queues, highest priority first. ARGV: now, limit, lease, the sequence number
# hash. Claims due heads,
# by priority, pushing their scores past the lease; returns id, sequence number pairs.
_CLAIM = """
local claimed = {}
local left = tonumber(ARGV[2])
for _, queue in ipairs(KEYS) do
  if left <= 0 then break end
  local ids = redis.call('ZRANGEBYSCORE', queue, '-inf', ARGV[1], 'LIMIT', 0, left)
  for _, id in ipairs(ids) do
    redis.call('ZADD', queue, tonumber(ARGV[1]) + tonumber(ARGV[3]), id)
    table.insert(claimed, id)
    table.insert(claimed, redis.call('HGET', ARGV[4], id) or '0')
  end
  left = left - #ids
end
return claimed
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


def _queue(destination: str, rank: int) -> str:
    return f"{PREFIX}queue:{rank}:{destination}"


def _line(destination: str, key: str) -> str:
    # Length-prefixed: a destination name with a colon cannot run into the key.
    return f"{PREFIX}line:{len(destination)}:{destination}:{key}"


def _kind_class(job: Job) -> str:
    return "open" if job.notice.kind in OPENS else "close" if job.notice.kind in CLOSES else ""


def _dump(job: Job) -> str:
    """The stored JSON; ``rank`` rides along for the scripts, which cannot map severities."""
    return jsonio.encode({**job.to_dict(), "rank": job.rank})


def _load(raw: bytes | str, seq: int = 0, dead: bool = False) -> Job:
    data = jsonio.decode(raw)
    data.pop("rank", None)
    data["seq"] = seq or data.get("seq", 0)
    if dead:  # a closing notice dropped by _FINISH keeps its pending body until its caller marks it
        data["status"] = DEAD
    return Job.from_dict(data)


def _job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def _state_key(key: str) -> str:
    return f"{PREFIX}state:{key}"


def _text(value: Any) -> str:
    """A reply as text: redis-py types replies as bytes or str (this client never decodes them)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _watch(pipe: Any, *names: str) -> None:
    """``pipe.watch``: redis-py leaves Pipeline.watch unannotated, which mypy --strict refuses to call."""
    pipe.watch(*names)


T = TypeVar("T")


class RedisStore(Store):
    def __init__(self, url: str) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._claim = self._redis.register_script(_CLAIM)
        self._enqueue = self._redis.register_script(_ENQUEUE)
        self._finish = self._redis.register_script(_FINISH)
        self._prune_dead_payloads = self._redis.register_script(_PRUNE_DEAD_PAYLOADS)

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
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
                    _watch(pipe, seen_key, *state_keys)
                    if pipe.exists(seen_key):
                        return None
                    raw = pipe.mget(state_keys) if state_keys else []
                    states = {k: KeyState.from_dict(jsonio.decode(v)) for k, v in zip(keys, raw, strict=True) if v}
                    result = plan(states)
                    pipe.multi()
                    pipe.set(seen_key, b"1", px=max(1, int(dedup_window * 1000)))
                    pipe.set(f"{PREFIX}payload:{digest}", body, ex=RETENTION_SECONDS)
                    for key, state in result.states.items():
                        if state is None:
                            pipe.delete(_state_key(key))
                            pipe.srem(STATE_INDEX, key)
                        else:
                            pipe.set(_state_key(key), jsonio.encode(state.to_dict()))
                            pipe.sadd(STATE_INDEX, key)
                    self._add_jobs(pipe, result.jobs)
                    if result.heartbeat:
                        pipe.hset(WATCHDOG, "last_seen", repr(now))
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue  # another replica changed one of these keys: plan again on fresh state

    def _add_jobs(self, pipe: Any, jobs: Sequence[Job]) -> None:
        if not jobs:
            return
        args: list[str] = [PREFIX]
        for job in jobs:
            args += [job.id, _dump(job), _line(job.destination, job.notice.key), _queue(job.destination, job.rank)]
        self._enqueue(keys=[], args=args, client=pipe)

    def dead_letter_payload(self, body: bytes, reason: str, now: float) -> None:
        entry = jsonio.encode({"id": new_job_id(), "received_at": now, "reason": reason,
                              "body": body.decode("utf-8", "replace")})
        self._call(self._redis.rpush, DEAD_PAYLOADS, entry)

    def enqueue(self, jobs: Sequence[Job]) -> None:
        pipe = self._redis.pipeline()
        self._add_jobs(pipe, jobs)
        self._call(pipe.execute)

    def claim(self, destination: str, now: float, limit: int, lease: float, after: Job | None = None) -> list[Job]:
        # ``after`` is not needed: a claimed job's score moves past the lease, out of the range read.
        queues = [_queue(destination, rank) for rank in reversed(range(len(SEVERITIES)))]
        claimed = self._call(self._claim, queues, [repr(now), limit, repr(lease), SEQS])
        if not claimed:
            return []
        ids, seqs = [_text(i) for i in claimed[::2]], [int(s) for s in claimed[1::2]]
        raw = self._call(self._redis.mget, [_job_key(i) for i in ids])
        return [_load(r, seq) for r, seq in zip(raw, seqs, strict=True) if r]

    def delivered(self, jobs: Sequence[Job]) -> None:
        self._call(self._finish_jobs, "delivered", jobs, "")

    def reschedule(self, jobs: Sequence[Job], due_at: float, error: str) -> None:
        pipe = self._redis.pipeline()
        for job in jobs:
            updated = replace(job, due_at=due_at, last_error=error, attempts=job.attempts + 1)
            pipe.set(_job_key(job.id), _dump(updated))
            # XX: a job another replica finished meanwhile (its lease ran out) stays out of the queue.
            pipe.zadd(_queue(job.destination, job.rank), {job.id: due_at}, xx=True)
        self._call(pipe.execute)

    def dead_letter(self, jobs: Sequence[Job], error: str) -> int:
        dropped = self._call(self._finish_jobs, "dead", jobs, error)
        if dropped:
            raw = self._call(self._redis.mget, [_job_key(_text(i)) for i in dropped])
            pipe = self._redis.pipeline()
            for body in raw:
                if body:
                    job = replace(_load(body), status=DEAD, last_error=TRIGGER_UNDELIVERED)
                    pipe.set(_job_key(job.id), _dump(job))
            self._call(pipe.execute)
        return len(dropped)

    def _finish_jobs(self, mode: str, jobs: Sequence[Job], error: str) -> list[bytes]:
        args: list[str] = [PREFIX, mode]
        for job in jobs:
            dead = replace(job, status=DEAD, last_error=error, attempts=job.attempts + 1)
            args += [job.id, _line(job.destination, job.notice.key), _queue(job.destination, job.rank),
                     job.destination, job.notice.key, _kind_class(job), _dump(dead) if mode == "dead" else ""]
        return list(self._finish(keys=[], args=args))

    def announce_watchdog(self, previous: str, current: str, jobs: Sequence[Job]) -> bool:
        return bool(self._call(self._announce, previous, current, jobs))

    def _announce(self, previous: str, current: str, jobs: Sequence[Job]) -> bool:
        with self._redis.pipeline() as pipe:
            try:
                _watch(pipe, WATCHDOG)
                recorded = pipe.hget(WATCHDOG, "state")
                if (_text(recorded) if recorded else "new") != previous:
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
        return (float(last_seen) if last_seen else None), _text(fields.get(b"state", b"new"))

    def key_states(self, limit: int = 1000) -> list[KeyState]:
        keys = sorted(_text(k) for k in self._call(self._redis.smembers, STATE_INDEX))[:limit]
        raw = self._call(self._redis.mget, [_state_key(k) for k in keys]) if keys else []
        return [KeyState.from_dict(jsonio.decode(r)) for r in raw if r]

    def acknowledge(self, key: str, by: str, comment: str, now: float) -> KeyState | None:
        return self._call(self._acknowledge, key, by, comment, now)

    def _acknowledge(self, key: str, by: str, comment: str, now: float) -> KeyState | None:
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    _watch(pipe, _state_key(key))
                    raw = pipe.get(_state_key(key))
                    state = self._acknowledged(KeyState.from_dict(jsonio.decode(raw)) if raw else None, by, comment, now)
                    if state is None:
                        return None
                    pipe.multi()
                    pipe.set(_state_key(key), jsonio.encode(state.to_dict()))
                    pipe.execute()
                    return state
                except redis.WatchError:
                    continue  # a webhook changed the state meanwhile: acknowledge what it left

    def jobs(self, limit: int = 1000) -> list[Job]:
        pending = [_text(i) for i in self._call(self._redis.zrange, PENDING_BY_AGE, 0, limit - 1)]
        dead = [_text(i) for i in self._call(self._redis.zrange, DEAD_JOBS, 0, limit - 1)]
        ids = [*pending, *dead]
        if not ids:
            return []
        raw = self._call(self._redis.mget, [_job_key(i) for i in ids])
        seqs = self._call(self._redis.hmget, SEQS, pending) if pending else []
        jobs = [_load(r, int(seq or 0)) for r, seq in zip(raw[: len(pending)], seqs, strict=True) if r]
        jobs += [_load(r, dead=True) for r in raw[len(pending):] if r]
        return sorted(jobs, key=lambda j: (j.created_at, j.seq))[:limit]

    def dead_payloads(self, limit: int = 100) -> list[DeadPayload]:
        entries = [jsonio.decode(e) for e in self._call(self._redis.lrange, DEAD_PAYLOADS, -limit, -1)]
        return [DeadPayload(e.get("id", ""), e["received_at"], e["reason"], e["body"].encode()) for e in reversed(entries)]

    def retry_dead(self, job_id: str, now: float) -> Job | None:
        return self._call(self._retry_dead, job_id, now)

    def _retry_dead(self, job_id: str, now: float) -> Job | None:
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    _watch(pipe, DEAD_JOBS, _job_key(job_id))
                    raw = pipe.get(_job_key(job_id))
                    if raw is None or pipe.zscore(DEAD_JOBS, job_id) is None:
                        return None
                    job = replace(_load(raw), status=PENDING, due_at=now, attempts=0)
                    pipe.multi()
                    pipe.zrem(DEAD_JOBS, job_id)
                    self._add_jobs(pipe, [job])
                    pipe.execute()
                    return job
                except redis.WatchError:
                    continue  # a prune or another retry changed the dead set: look again

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
            pipe.delete(*[_job_key(_text(i)) for i in ids])
            pipe.zrem(DEAD_JOBS, *ids)
            pipe.execute()
        return len(ids)

    def ping(self) -> None:
        self._call(self._redis.ping)

    def close(self) -> None:
        self._redis.close()
