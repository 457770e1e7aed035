"""Retention as a pure function: restic-style ORed keep rules, and the newest verified backup is sacred."""

from __future__ import annotations

from datetime import UTC, datetime

from mlwarden.jobs.backup.retention import Candidate, Policy, decide


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def daily(days: int, start: str = "2026-01-01T03:00:00") -> list[Candidate]:
    first = at(start)
    return [Candidate(f"b{i:03d}", first + i * 86400, True) for i in range(days)]


def test_no_rule_keeps_everything() -> None:
    backups = daily(10)
    decision = decide(backups, Policy())
    assert decision.remove == []
    assert set(decision.keep) == {b.name for b in backups}


def test_keep_last_keeps_the_newest_n() -> None:
    decision = decide(daily(10), Policy(keep_last=3))
    assert sorted(decision.keep) == ["b007", "b008", "b009"]
    assert decision.remove == [f"b{i:03d}" for i in range(7)]  # oldest first


def test_keep_daily_keeps_the_newest_backup_of_each_day() -> None:
    first = at("2026-03-01T01:00:00")
    backups = [Candidate(f"b{i}", first + i * 8 * 3600, True) for i in range(9)]  # three a day for 3 days
    decision = decide(backups, Policy(keep_daily=2))
    assert sorted(decision.keep) == ["b5", "b8"]  # the last of 2026-03-02 and of 2026-03-03
    assert decision.keep["b8"] == ["daily 2026-03-03"]


def test_days_without_backups_do_not_count() -> None:
    backups = [Candidate("old", at("2026-01-01T00:00:00"), True), Candidate("new", at("2026-02-01T00:00:00"), True)]
    assert decide(backups, Policy(keep_daily=2)).remove == []


def test_rules_are_ored_and_every_reason_is_listed() -> None:
    backups = daily(70)  # 2026-01-01 .. 2026-03-11
    decision = decide(backups, Policy(keep_last=1, keep_daily=7, keep_weekly=4, keep_monthly=3))
    newest = backups[-1].name
    assert decision.keep[newest][0] == "last"
    assert any(r.startswith("daily") for r in decision.keep[newest])
    months = sorted(r for reasons in decision.keep.values() for r in reasons if r.startswith("monthly"))
    assert months == ["monthly 2026-01", "monthly 2026-02", "monthly 2026-03"]
    assert "b030" in decision.keep  # 2026-01-31: the newest of January
    assert len([r for reasons in decision.keep.values() for r in reasons if r.startswith("weekly")]) == 4
    assert len(decision.keep) + len(decision.remove) == 70


def test_weekly_uses_iso_weeks() -> None:
    sunday = Candidate("sunday", at("2026-01-04T12:00:00"), True)  # ISO week 1 of 2026
    monday = Candidate("monday", at("2026-01-05T12:00:00"), True)  # ISO week 2
    decision = decide([sunday, monday], Policy(keep_weekly=2))
    assert decision.keep == {"monday": ["weekly 2026-W02"], "sunday": ["weekly 2026-W01"]}


def test_newest_verified_backup_is_never_deleted() -> None:
    good = Candidate("good", at("2026-01-01T00:00:00"), True)
    broken = [Candidate(f"broken{i}", at(f"2026-01-0{i + 2}T00:00:00"), False) for i in range(3)]
    decision = decide([good, *broken], Policy(keep_last=1))
    assert decision.keep["good"] == ["newest verified backup"]
    assert decision.keep["broken2"] == ["last"]
    assert decision.remove == ["broken0", "broken1"]


def test_never_verified_backups_get_no_protection() -> None:
    backups = [Candidate(f"b{i}", at(f"2026-01-0{i + 1}T00:00:00"), None) for i in range(3)]
    assert decide(backups, Policy(keep_last=1)).remove == ["b0", "b1"]
