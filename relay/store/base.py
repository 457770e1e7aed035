"""The relay's durable state behind one interface: SQLite (one process) or Redis (replicas).

Everything that must not be lost goes through here: the received payload, the per-key
cooldown/escalation state, the delivery jobs (the outbox) and the watchdog's heartbeat.
:meth:`Store.intake` stores a payload, its state changes and its jobs in ONE transaction,
so the relay only acknowledges what it can deliver later. Jobs are claimed with a lease:
a claimed job is invisible to other workers (and other replicas) until it is delivered,
rescheduled, dead-lettered, or its lease runs out because its worker died.

Per-key order: every job gets a sequence number from the store, in the transaction that
changes its key's state, so for one key the numbers follow the order of the state changes,
whichever replica made them. A job is claimable only while it is the lowest-numbered pending
job of its key and destination (its key's head of line): a trigger that waits for a retry,
a Retry-After or a lease holds back the resolve that follows it. When a trigger is
dead-lettered and nothing of that episode reached the destination, the resolve behind it is
dead-lettered too (:data:`TRIGGER_UNDELIVERED`) instead of announcing the end of something
nobody heard of.
"""

from __future__ import annotations

import itertools
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlwarden.relay.config import SEVERITIES
from mlwarden.relay.notice import FIRING, PIPELINE_DOWN, PIPELINE_UP, RESOLVED, Notice
from mlwarden.relay.policy import Decision, KeyState, acknowledge

PENDING = "pending"
DEAD = "dead"
# How long received payloads and dead letters (payloads and jobs) are kept for an operator to look at.
RETENTION_SECONDS = 7 * 86400
TRIGGER_UNDELIVERED = "not sent: the trigger before it was dead-lettered and never delivered"
OPENS = (FIRING, PIPELINE_DOWN)  # notice kinds that open something a later notice closes
CLOSES = (RESOLVED, PIPELINE_UP)


def severity_rank(severity: str) -> int:
    """Delivery priority: emergency 3 ... info 0 (the watchdog's notices are critical)."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else 1


def new_job_id() -> str:
    """Unique and increasing with time, so the store's index on ids grows at its end, not at random.

    The tail is this process's random 48 bits plus a counter: unique within the process, and
    across replicas (and restarts) as unlikely to collide as fresh random bits would be, without
    a getrandom call for every job (intake makes one job per alert and destination).
    """
    return f"{time.time_ns():016x}{(_ID_BASE + next(_ID_COUNTER)) & _ID_MASK:012x}"


_ID_MASK = (1 << 48) - 1
_ID_BASE = 0
_ID_COUNTER = itertools.count()


def _reseed_ids() -> None:
    global _ID_BASE, _ID_COUNTER
    _ID_BASE, _ID_COUNTER = int.from_bytes(os.urandom(6), "big"), itertools.count()


_reseed_ids()
os.register_at_fork(after_in_child=_reseed_ids)  # a forked child must not repeat its parent's ids


class StoreError(RuntimeError):
    """The store cannot read or commit right now (disk full, Redis down); worth retrying later."""


@dataclass(slots=True)  # not frozen: see notice.Notice
class Job:
    destination: str
    notice: Notice
    created_at: float
    due_at: float
    attempts: int = 0
    status: str = PENDING
    last_error: str = ""
    id: str = field(default_factory=new_job_id)
    seq: int = 0  # given by the store when the job is stored: the order within its key

    @property
    def rank(self) -> int:
        return severity_rank(self.notice.severity)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "destination": self.destination, "notice": self.notice.to_dict(),
            "created_at": self.created_at, "due_at": self.due_at, "attempts": self.attempts,
            "status": self.status, "last_error": self.last_error, "seq": self.seq,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        return cls(**{**data, "notice": Notice.from_dict(data["notice"])})


@dataclass(frozen=True, slots=True)
class DeadPayload:
    """A webhook body that could not be used, kept for an operator."""

    id: str
    received_at: float
    reason: str
    body: bytes

    def to_dict(self, body_limit: int) -> dict[str, Any]:
        text = self.body[:body_limit].decode("utf-8", "replace")
        return {"id": self.id, "received_at": self.received_at, "reason": self.reason, "body": text,
                "body_bytes": len(self.body), "body_truncated": len(self.body) > body_limit}


@dataclass(frozen=True)
class IntakeResult:
    """What one webhook changes: key states (None clears a key), new jobs, a watchdog heartbeat."""

    states: Mapping[str, KeyState | None]
    jobs: Sequence[Job]
    heartbeat: bool = False
    decisions: Sequence[Decision] = ()  # the policy decisions, for metrics


Planner = Callable[[Mapping[str, KeyState]], IntakeResult]


@dataclass(frozen=True, slots=True)
class IntakeRequest:
    """One accepted webhook on its way into the store (see :meth:`Store.intake`)."""

    digest: str
    body: bytes
    keys: Sequence[str]
    now: float
    dedup_window: float
    plan: Planner


class Store(ABC):
    """Every method may be called from any thread (the relay checks the watchdog and prunes in
    threads, so that a slow store holds up neither intake nor its own answers)."""

    # How long the event loop may wait, blocked, for a batch of webhooks to commit in the writer
    # thread before it goes on serving while the commit runs on (see GroupCommit). 0: never (a
    # network store, which may hang for its socket timeout).
    loop_waits_for_commit: float = 0.0

    @abstractmethod
    def intake(
        self, digest: str, body: bytes, keys: Sequence[str], now: float, dedup_window: float, plan: Planner
    ) -> IntakeResult | None:
        """Atomically: unless ``digest`` was seen within ``dedup_window`` (then return None),
        load the states of ``keys``, call ``plan`` (pure; it may run more than once), and store
        the payload, the new states, the jobs, the heartbeat and the digest together."""

    def intake_batch(self, requests: Sequence[IntakeRequest]) -> list[IntakeResult | None]:
        """:meth:`intake` for several webhooks, in order; raises StoreError if any cannot be stored.

        Stores that can commit several at once (SQLite: one transaction, all or none) override
        this, so that webhooks arriving together share one commit. Here each is its own
        transaction: after a failure, Alertmanager's retry of one that was stored is answered
        as a duplicate, so nothing is lost or processed twice."""
        return [self.intake(r.digest, r.body, r.keys, r.now, r.dedup_window, r.plan) for r in requests]

    @staticmethod
    def _acknowledged(state: KeyState | None, by: str, comment: str, now: float) -> KeyState | None:
        return acknowledge(state, by, comment, now) if state is not None else None

    @abstractmethod
    def dead_letter_payload(self, body: bytes, reason: str, now: float) -> None:
        """Keep a payload that could not be parsed, for an operator to look at."""

    @abstractmethod
    def enqueue(self, jobs: Sequence[Job]) -> None: ...

    @abstractmethod
    def claim(self, destination: str, now: float, limit: int, lease: float, after: Job | None = None) -> list[Job]:
        """Up to ``limit`` due jobs of ``destination`` that head their key's line, highest
        priority first, then in sequence, leased to the caller. ``after``, the last job of the
        previous claim of the same pass, says where to go on: only jobs behind it in that order
        are taken (a store whose claims pass over leased jobs at no cost may ignore it)."""

    @abstractmethod
    def delivered(self, jobs: Sequence[Job]) -> None:
        """Forget delivered jobs; the next job of each key becomes claimable."""

    @abstractmethod
    def reschedule(self, jobs: Sequence[Job], due_at: float, error: str) -> None:
        """Put claimed jobs back after a failed try, due at ``due_at``, with one more attempt counted."""

    @abstractmethod
    def dead_letter(self, jobs: Sequence[Job], error: str) -> int:
        """Keep failed jobs as dead letters; returns how many closing notices behind them were
        dead-lettered too because nothing they close ever reached the destination."""

    @abstractmethod
    def announce_watchdog(self, previous: str, current: str, jobs: Sequence[Job]) -> bool:
        """Record the watchdog state ``current`` and enqueue ``jobs`` iff the recorded state is
        still ``previous`` (so two replicas announce a transition once)."""

    @abstractmethod
    def watchdog(self) -> tuple[float | None, str]:
        """(last heartbeat time or None, last recorded state)."""

    @abstractmethod
    def key_states(self, limit: int = 1000) -> list[KeyState]: ...

    @abstractmethod
    def acknowledge(self, key: str, by: str, comment: str, now: float) -> KeyState | None:
        """Atomically mark ``key``'s current episode acknowledged (see policy.acknowledge);
        None when the key has no state (never fired, or resolved)."""

    @abstractmethod
    def jobs(self, limit: int = 1000) -> list[Job]:
        """Pending and dead-lettered jobs, oldest first (the queue view)."""

    @abstractmethod
    def dead_payloads(self, limit: int = 100) -> list[DeadPayload]:
        """The newest dead-lettered payloads, newest first."""

    @abstractmethod
    def retry_dead(self, job_id: str, now: float) -> Job | None:
        """Put a dead-lettered job back in the outbox, due now, with its attempts counted from
        zero, at the end of its key's line (behind what its key has queued since); None when
        ``job_id`` is not a dead job."""

    @abstractmethod
    def outbox_stats(self) -> tuple[int, float | None]:
        """(pending jobs, creation time of the oldest pending job)."""

    @abstractmethod
    def prune(self, now: float) -> None:
        """Forget expired dedup digests, and payloads, dead-lettered payloads and dead-lettered jobs
        older than :data:`RETENTION_SECONDS` (a dead job's age counts from its creation: retries
        end within hours of it). Safe to call from a thread other than the one making the other
        calls, and in steps short enough that those calls wait for one step at most."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreError if the store cannot serve."""

    @abstractmethod
    def close(self) -> None: ...
