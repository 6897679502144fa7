"""Retention: one dependency-aware, conservative planner applied to every location.

Grandfather-father-son, per database and backup kind:
  - daily tier:   every backup younger than `daily_days` is kept;
  - weekly tier:  the newest backup of each ISO week younger than `weekly_days`;
  - monthly tier: the newest backup of each calendar month younger than `monthly_days`;
  - `min_keep`:   the newest `min_keep` backups are always kept (a floor, never a cap);
  - pinned backups are never removed (a `pin.json` object beside the manifest);
  - the newest backup proven by a passing restore test is never removed.
Everything else is removed: the manifest first (the backup vanishes atomically), then its objects.
The plan is printable before anything is deleted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from dr_pipelines.core.gfs import BackupFacts, Decision, plan_retention

__all__ = ["BackupFacts", "Decision", "plan_retention"]  # the planner, where it always was
from dr_pipelines.core.repository.catalog import CatalogEntry
from dr_pipelines.core.repository.manifest import MANIFEST
from dr_pipelines.core.storage.base import Location, LocationError, TieredLocation

if TYPE_CHECKING:
    from dr_pipelines.core.files.retention import FilesOutcome, FilesPlan

PIN = "pin.json"


def facts_from_catalog(entries: Iterable[CatalogEntry], pinned: set[str]) -> list[BackupFacts]:
    return [
        BackupFacts(e.id, e.manifest.database, e.manifest.kind, e.manifest.created_at, e.id in pinned) for e in entries
    ]


def pinned_ids(
    locations: Iterable[Location], entries: Iterable[CatalogEntry], problems: list[str] | None = None
) -> set[str]:
    """A backup is pinned if any location holds a pin.json beside its manifest. A location that
    cannot be listed is a problem (a pin there would be missed), so the plan then removes nothing."""
    entries = list(entries)
    pinned = set()
    for loc in locations:
        try:
            keys = {o.key for o in loc.list()}
        except LocationError as e:
            if problems is not None:
                problems.append(str(e))
            continue
        pinned |= {e.id for e in entries if f"{e.manifest.prefix}/{PIN}" in keys}
    return pinned


def set_pin(locations: Iterable[Location], entry: CatalogEntry, pinned: bool, reason: str = "") -> list[str]:
    done = []
    for loc in locations:
        if loc.name not in entry.locations:
            continue
        key = f"{entry.manifest.prefix}/{PIN}"
        if pinned:
            loc.put_bytes(key, json.dumps({"reason": reason}).encode())
        else:
            loc.delete(key)
        done.append(loc.name)
    return done


@dataclass
class Removal:
    backup_id: str
    location: str
    error: str | None = None


def locked_until(location: Location, written: datetime, now: datetime) -> datetime | None:
    """When a copy written at `written` becomes deletable on immutable storage, if that is still ahead."""
    lock_until = getattr(location, "lock_until", None)
    until = lock_until(written) if lock_until else None
    return until if until is not None and until > now else None


def apply_retention(
    locations: dict[str, Location],
    entries: dict[str, CatalogEntry],
    decisions: list[Decision],
    log: Callable[[str], None] = lambda m: None,
    locked: dict[tuple[str, str], datetime] | None = None,
) -> list[Removal]:
    """Remove what the plan removes, on every location: the manifest first, so the backup is gone
    as a whole at once; then its objects (leftovers of a failure are invisible and retried)."""
    removals = []
    for d in decisions:
        if d.keep:
            continue
        entry = entries[d.backup.id]
        for name in entry.locations:
            loc = locations[name]
            if (d.backup.id, name) in (locked or {}):
                continue  # immutable there until then: never tried (the plan says when it can go)
            try:
                loc.delete(f"{entry.manifest.prefix}/{MANIFEST}")
                for obj in entry.manifest.objects:
                    loc.delete(entry.manifest.object_key(obj.name))
                removals.append(Removal(d.backup.id, name))
                log(f"removed {d.backup.id} from {name}")
            except LocationError as e:
                removals.append(Removal(d.backup.id, name, str(e)))
                log(f"could not remove {d.backup.id} from {name}: {e}")
    return removals


HOT_REASONS = ("daily tier", "among the newest", "pinned", "newest backup proven")


def cold_tier(d: Decision) -> str | None:
    """ "weekly" or "monthly" when only that tier keeps the backup (it may go to a colder class);
    None for what is removed, recent, pinned, in the min_keep floor or the proven restore point."""
    if not d.keep or any(r.startswith(HOT_REASONS) for r in d.reasons):
        return None
    if any(r.startswith("weekly tier") for r in d.reasons):
        return "weekly"
    return "monthly" if any(r.startswith("monthly tier") for r in d.reasons) else None


@dataclass
class Move:
    backup_id: str
    location: str
    storage_class: str
    objects: int
    error: str | None = None


def apply_tiering(
    config,
    locations: dict[str, Location],
    entries: dict[str, CatalogEntry],
    decisions: list[Decision],
    log: Callable[[str], None] = lambda m: None,
) -> list[Move]:
    """Move weekly and monthly keepers' objects (never the manifest, which listing reads) to the
    colder class their location names; locations without one (local disk) are left alone."""
    moves = []
    for d in decisions:
        tier = cold_tier(d)
        if tier is None:
            continue
        entry = entries[d.backup.id]
        for name in entry.locations:
            target = getattr(config.locations[name], f"{tier}_storage_class", None)
            if not target:
                continue
            loc, moved = locations[name], 0
            if getattr(loc, "lock", None) or getattr(loc, "retention_days", None):
                continue  # a copy onto itself would be a new locked version beside the old: use lifecycle rules
            if not isinstance(loc, TieredLocation):  # a class configured where there are none (local disk)
                continue
            try:
                for obj in entry.manifest.objects:
                    key = entry.manifest.object_key(obj.name)
                    if loc.get_storage_class(key) != target:
                        loc.set_storage_class(key, target)
                        moved += 1
                if moved:
                    log(f"moved {d.backup.id} on {name} to {target} ({tier} keeper)")
                    moves.append(Move(d.backup.id, name, target, moved))
            except LocationError as e:
                moves.append(Move(d.backup.id, name, target, moved, str(e)))
                log(f"could not move {d.backup.id} on {name} to {target}: {e}")
    return moves


def plan_table(decisions: list[Decision]) -> str:
    rows = ["| database | kind | backup | created (UTC) | action | why |", "|---|---|---|---|---|---|"]
    for d in decisions:
        b = d.backup
        tier = cold_tier(d)
        action = "REMOVE" if not d.keep else f"keep ({tier} class)" if tier else "keep"
        rows.append(
            f"| {b.database} | {b.kind} | {b.id} | {b.created_at:%Y-%m-%d %H:%M} | {action} | {'; '.join(d.reasons)} |"
        )
    return "\n".join(rows)


def plan_json(decisions: list[Decision]) -> list[dict]:
    return [
        {
            **asdict(d.backup),
            "created_at": d.backup.created_at.isoformat(),
            "keep": d.keep,
            "cold_tier": cold_tier(d),
            "reasons": d.reasons,
        }
        for d in decisions
    ]


def newest_verified(locations: dict[str, Location], databases: Iterable[str]) -> dict[tuple[str, str], str]:
    """(database, kind) -> the id of the newest backup whose restore test (logical) or PITR drill
    (base) passed."""
    from dr_pipelines.core.repository.records import RecordKind, load_reports

    verified = {}
    for db in databases:
        for kind, drill in (("logical", RecordKind.RESTORE_TEST), ("base", RecordKind.PITR_TEST)):
            passed = [r for r in load_reports(locations, db, drill) if r.passed and r.backup_id]
            if passed:  # the newest *backup* proven, not the most recent test (which may test an old one)
                newest = max(passed, key=lambda r: (r.backup_created_at or "", r.backup_id or ""))
                verified[(db, kind)] = newest.backup_id
    return verified


@dataclass
class RetentionPlan:
    decisions: list[Decision]
    entries: dict[str, CatalogEntry]
    problems: list[str]
    wal: list[WalRemoval] = field(default_factory=list)
    files: FilesPlan | None = None  # file snapshots and the packs they leave unreferenced
    locked: dict[tuple[str, str], datetime] = field(default_factory=dict)  # (backup id, location) -> deletable at

    def locked_notes(self) -> list[str]:
        return [
            f"{backup_id} on {location}: under object lock, deletable after {until.isoformat()}"
            for (backup_id, location), until in sorted(self.locked.items())
        ]

    @property
    def removed(self) -> list[Decision]:
        return [d for d in self.decisions if not d.keep]


def build_plan(config, locations: dict[str, Location], now: datetime) -> RetentionPlan:
    """The plan over every location's catalog. A location that cannot be read makes the plan
    refuse to remove anything: what it holds is unknown."""
    from dr_pipelines.core.repository.catalog import load_catalog

    catalog = load_catalog(locations.values())
    entries = {e.id: e for e in catalog.entries}
    facts = facts_from_catalog(catalog.entries, pinned_ids(locations.values(), catalog.entries, catalog.problems))
    decisions = plan_retention(facts, config.retention, now, newest_verified(locations, config.databases))
    if catalog.problems:
        for d in decisions:
            if not d.keep:
                d.keep = True
                d.reasons = ["kept: a location could not be read, so the plan removes nothing"]
    wal = [] if catalog.problems else plan_wal_retention(config, locations, decisions, entries, now, catalog.problems)
    from dr_pipelines.core.files.retention import plan_files_retention

    files = plan_files_retention(config, locations, now)
    locked = {}
    for d in decisions:
        if not d.keep:
            for name in entries[d.backup.id].locations:
                until = locked_until(locations[name], entries[d.backup.id].manifest.finished_at, now)
                if until:
                    locked[(d.backup.id, name)] = until
    wal = [w for w in wal if not any(locked_until(loc, w.pushed_at, now) for loc in locations.values())]
    return RetentionPlan(decisions, entries, catalog.problems + files.problems, wal, files, locked)


@dataclass
class WalRemoval:
    database: str
    name: str
    keys: list[str]  # sidecar first (the commit marker), then the object
    reason: str
    pushed_at: datetime


def plan_wal_retention(
    config,
    locations: dict[str, Location],
    decisions: list[Decision],
    entries: dict[str, CatalogEntry],
    now: datetime,
    problems: list[str],
) -> list[WalRemoval]:
    """WAL goes only when it is both before the start of the oldest retained base backup (no kept
    backup can replay it) and older than `wal_days`. History files always stay: they are tiny, and
    a timeline switch anywhere in the kept range needs them. No base backup kept: `wal_days` alone."""
    from dr_pipelines.core.postgres.wal_names import timeline_of
    from dr_pipelines.core.wal.archive import list_archive, wal_prefix

    out = []
    cutoff = now - timedelta(days=config.retention.wal_days)
    for db in config.databases:
        archive = list_archive(locations, db)
        if archive.problems:
            problems += archive.problems
            return []
        starts = [
            entries[d.backup.id].manifest.base.wal_start
            for d in decisions
            if d.keep and d.backup.database == db and d.backup.kind == "base"
        ]
        keep_from = min((s[8:] for s in starts), default=None)  # position in WAL, across timelines
        for name, f in archive.files.items():
            if f.kind == "history" or f.pushed_at >= cutoff:
                continue
            if keep_from is not None and name[8:24] >= keep_from:
                continue
            why = (
                f"before the oldest kept base backup's WAL ({keep_from}) and older than {config.retention.wal_days} days"
                if keep_from
                else f"older than {config.retention.wal_days} days and no base backup is kept"
            )
            prefix = f"{wal_prefix(db)}/{timeline_of(name)}"
            out.append(WalRemoval(db, name, [f"{prefix}/{name}.json", f"{prefix}/{f.object_name}"], why, f.pushed_at))
    return out


def apply_wal_retention(
    locations: dict[str, Location], removals: list[WalRemoval], log: Callable[[str], None] = lambda m: None
) -> list[str]:
    errors = []
    for r in removals:
        for name, loc in locations.items():
            try:
                for key in r.keys:
                    loc.delete(key)
            except LocationError as e:
                errors.append(f"{r.name} on {name}: {e}")
    if removals:
        log(f"removed {len(removals)} WAL files ({removals[0].name} .. {removals[-1].name})")
    return errors


@dataclass
class RetentionOutcome:
    """What applying a plan did; the shell and the job report it the same way."""

    plan: RetentionPlan
    removals: list[Removal]
    moves: list[Move]
    wal_errors: list[str]
    files: FilesOutcome | None = None

    @property
    def failures(self) -> list[str]:
        return (
            [f"{r.backup_id} on {r.location}: {r.error}" for r in self.removals + self.moves if r.error]
            + self.wal_errors
            + (self.files.errors if self.files else [])
        )

    @property
    def complete(self) -> bool:
        return not self.failures and not self.plan.problems

    def summary(self) -> str:
        return (
            f"removed {len(self.plan.removed)} backups ({len([r for r in self.removals if not r.error])} copies); "
            f"moved {len([m for m in self.moves if not m.error])} copies to a colder storage class; "
            f"removed {len(self.plan.wal)} WAL files"
            + (
                f"; removed {len(self.plan.files.removed)} file snapshots and {self.files.packs_deleted} pack copies "
                f"({self.files.bytes_freed} bytes)"
                + (
                    f", packs on {', '.join(self.files.deferred)} left for next time (a snapshot was running)"
                    if self.files.deferred
                    else ""
                )
                if self.files and self.plan.files
                else ""
            )
            + (f"; {len(self.failures)} operations failed" if self.failures else "")
        )


def apply_plan(
    config, locations: dict[str, Location], plan: RetentionPlan, log: Callable[[str], None] = lambda m: None
) -> RetentionOutcome:
    """Removals (manifest first), storage-class moves, then WAL no kept base backup needs. What a
    killed run left (a retention killed after a manifest went, say) is swept first."""
    from datetime import timezone

    from dr_pipelines.core.files.sweep import sweep_snapshot_leftovers
    from dr_pipelines.core.sweep import repository_leftovers, sweep_safely

    now = datetime.now(timezone.utc)
    for db in config.databases:
        sweep_safely(lambda db=db: repository_leftovers(locations, db, now), log)
    sweep_snapshot_leftovers(config, locations, log)
    removals = apply_retention(locations, plan.entries, plan.decisions, log=log, locked=plan.locked)
    for note in plan.locked_notes():
        log(note)
    moves = apply_tiering(config, locations, plan.entries, plan.decisions, log=log)
    wal_errors = apply_wal_retention(locations, plan.wal, log=log)
    files = None
    if plan.files is not None:
        from dr_pipelines.core.files.retention import apply_files_retention

        files = apply_files_retention(locations, plan.files, log=log)
    return RetentionOutcome(plan, removals, moves, wal_errors, files)
