"""Which backups to keep: restic-style keep rules, ORed, as a pure function.

Each rule keeps backups on its own; a backup is kept if any rule keeps it:

- ``keep_last N``: the N newest backups.
- ``keep_daily N``: for the N newest UTC days that have backups, the newest backup of each.
- ``keep_weekly N`` / ``keep_monthly N``: the same per ISO week / calendar month.

Like restic, the N counts periods that *have* backups, not calendar periods: a machine that
was off for a week does not lose its history. With no rule set, everything is kept. Whatever
the rules say, the newest verified backup is never deleted, so a run of broken backups
cannot take the last good one with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class Policy:
    keep_last: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None

    @property
    def active(self) -> bool:
        return any(n is not None for n in (self.keep_last, self.keep_daily, self.keep_weekly, self.keep_monthly))


@dataclass(frozen=True)
class Candidate:
    name: str
    started_at: float  # unix seconds
    verified: bool | None  # None: never verified


@dataclass(frozen=True)
class Decision:
    keep: dict[str, list[str]]  # name -> reasons, newest first
    remove: list[str]  # names, oldest first


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _day(t: float) -> str:
    return _utc(t).strftime("%Y-%m-%d")


def _week(t: float) -> str:
    year, week, _ = _utc(t).isocalendar()
    return f"{year}-W{week:02d}"


def _month(t: float) -> str:
    return _utc(t).strftime("%Y-%m")


_BUCKETS: dict[str, Callable[[float], str]] = {"daily": _day, "weekly": _week, "monthly": _month}


def decide(backups: Sequence[Candidate], policy: Policy) -> Decision:
    """Split ``backups`` into kept (with the rules that keep each) and removed."""
    newest_first = sorted(backups, key=lambda b: (b.started_at, b.name), reverse=True)
    if not policy.active:
        return Decision(keep={b.name: ["no retention rule set"] for b in newest_first}, remove=[])
    reasons: dict[str, list[str]] = {b.name: [] for b in newest_first}
    if policy.keep_last:
        for b in newest_first[: policy.keep_last]:
            reasons[b.name].append("last")
    for rule, bucket_of in _BUCKETS.items():
        count = getattr(policy, f"keep_{rule}")
        if not count:
            continue
        seen: set[str] = set()
        for b in newest_first:
            bucket = bucket_of(b.started_at)
            if bucket in seen:
                continue
            if len(seen) == count:
                break
            seen.add(bucket)
            reasons[b.name].append(f"{rule} {bucket}")
    newest_verified = next((b for b in newest_first if b.verified), None)
    if newest_verified is not None and not reasons[newest_verified.name]:
        reasons[newest_verified.name].append("newest verified backup")
    keep = {name: why for name, why in reasons.items() if why}
    remove = [b.name for b in reversed(newest_first) if b.name not in keep]
    return Decision(keep=keep, remove=remove)
