"""The grandfather-father-son planner, alone: which backups (or snapshots) a policy keeps, and why.
`core.retention` applies it to backups and WAL, `core.files.retention` to file snapshots."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from dr_pipelines.core.config import RetentionConfig


@dataclass(frozen=True)
class BackupFacts:
    """What the planner needs to know of one backup."""

    id: str
    database: str
    kind: str
    created_at: datetime
    pinned: bool = False


@dataclass
class Decision:
    backup: BackupFacts
    keep: bool
    reasons: list[str] = field(default_factory=list)


def plan_retention(
    backups: Iterable[BackupFacts],
    policy: RetentionConfig,
    now: datetime,
    verified: dict[tuple[str, str], str] | None = None,
) -> list[Decision]:
    """Decide, for every backup, keep or remove, and why. `verified` maps (database, kind) to the
    id of the newest backup that passed a restore test. Newest first within each group."""
    verified = verified or {}
    groups: dict[tuple[str, str], list[BackupFacts]] = {}
    for b in backups:
        groups.setdefault((b.database, b.kind), []).append(b)
    decisions: list[Decision] = []
    for key, group in sorted(groups.items()):
        group.sort(key=lambda b: (b.created_at, b.id), reverse=True)
        reasons: dict[str, list[str]] = {b.id: [] for b in group}
        for i, b in enumerate(group):
            if i < policy.min_keep:
                reasons[b.id].append(f"among the newest {policy.min_keep} (min_keep)")
            if b.pinned:
                reasons[b.id].append("pinned")
            if verified.get(key) == b.id:
                reasons[b.id].append("newest backup proven by a restore test")
            if now - b.created_at <= timedelta(days=policy.daily_days):
                reasons[b.id].append(f"daily tier (< {policy.daily_days} days)")
        _newest_per_period(group, now, policy.weekly_days, lambda d: d.isocalendar()[:2], "weekly", reasons)
        _newest_per_period(group, now, policy.monthly_days, lambda d: (d.year, d.month), "monthly", reasons)
        decisions += [Decision(b, bool(reasons[b.id]), reasons[b.id] or ["older than every tier"]) for b in group]
    return decisions


def _newest_per_period(
    group: list[BackupFacts], now: datetime, days: int, period: Callable, tier: str, reasons: dict[str, list[str]]
) -> None:
    seen = set()
    for b in group:  # newest first: the first of each period is its newest
        if now - b.created_at > timedelta(days=days):
            continue
        p = period(b.created_at)
        if p not in seen:
            seen.add(p)
            reasons[b.id].append(
                f"{tier} tier (newest of its {'week' if tier == 'weekly' else 'month'}, < {days} days)"
            )
