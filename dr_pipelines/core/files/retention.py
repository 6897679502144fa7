"""Retention of file snapshots, in the same planner as the backups (GFS tiers, `min_keep` floor,
pins, the newest snapshot proven by a restore test kept), then pack collection: a pack is deleted
only when no retained snapshot refers to it, and never while a snapshot may be using it (the
locks of `core.files.locks` say how that is guaranteed). Needs no identity: the plaintext indexes
say which packs each snapshot uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.files import format as fmt
from dr_pipelines.core.files.catalog import SnapshotEntry, load_snapshots
from dr_pipelines.core.files.locks import Lock, live_locks
from dr_pipelines.core.gfs import BackupFacts, Decision, plan_retention
from dr_pipelines.core.log import Log
from dr_pipelines.core.repository.records import RecordKind, load_reports
from dr_pipelines.core.storage.base import Location, LocationError, ObjectLocked

KIND = "snapshot"


def subject(file_set: str) -> str:
    return f"files/{file_set}"


@dataclass
class FilesPlan:
    decisions: list[Decision]
    entries: dict[str, SnapshotEntry]
    packs: dict[str, int]  # packs no retained snapshot refers to: id -> stored size
    problems: list[str]

    @property
    def removed(self) -> list[Decision]:
        return [d for d in self.decisions if not d.keep]

    @property
    def bytes_freed(self) -> int:
        return sum(self.packs.values())


def _newest_proven(locations: dict[str, Location], file_sets) -> dict[tuple[str, str], str]:
    out = {}
    for file_set in file_sets:
        passed = [r for r in load_reports(locations, fmt.records_owner(file_set), RecordKind.RESTORE_TEST) if r.passed]
        if passed:
            newest = max(passed, key=lambda r: (r.backup_created_at or "", r.backup_id or ""))
            out[(subject(file_set), KIND)] = newest.backup_id or ""
    return out


def _all_packs(locations: dict[str, Location], problems: list[str]) -> dict[str, int]:
    packs: dict[str, int] = {}
    for loc in locations.values():
        try:
            for o in loc.list(f"{fmt.ROOT}/packs/"):
                packs[fmt.pack_id_of(o.key)] = o.size
        except LocationError as e:
            problems.append(str(e))
    return packs


def plan_files_retention(config: DrConfig, locations: dict[str, Location], now: datetime) -> FilesPlan:
    catalog = load_snapshots(locations)
    problems = list(catalog.problems)
    facts = [BackupFacts(e.id, subject(e.index.file_set), KIND, e.index.created_at, e.pinned) for e in catalog.entries]
    decisions = plan_retention(
        facts, config.retention, now, _newest_proven(locations, {e.index.file_set for e in catalog.entries})
    )
    all_packs = _all_packs(locations, problems)
    if problems:  # what an unreadable location holds is unknown: remove nothing
        for d in decisions:
            if not d.keep:
                d.keep, d.reasons = True, ["kept: a location could not be read, so the plan removes nothing"]
        return FilesPlan(decisions, {e.id: e for e in catalog.entries}, {}, problems)
    entries = {e.id: e for e in catalog.entries}
    kept = {p for d in decisions if d.keep for p in entries[d.backup.id].index.packs}
    return FilesPlan(decisions, entries, {p: s for p, s in all_packs.items() if p not in kept}, problems)


@dataclass
class FilesOutcome:
    removed: list[str] = field(default_factory=list)
    packs_deleted: int = 0
    bytes_freed: int = 0
    deferred: list[str] = field(default_factory=list)  # locations where a snapshot was running
    errors: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)  # packs under object lock: collected once it expires


def apply_files_retention(locations: dict[str, Location], plan: FilesPlan, log: Log = lambda m: None) -> FilesOutcome:
    """Snapshots first (the manifest, the commit marker, before the rest), then the packs no
    retained snapshot refers to, location by location under a collection lock."""
    out = FilesOutcome()
    for d in plan.removed:
        entry = plan.entries[d.backup.id]
        prefix = fmt.snapshot_prefix(entry.index.file_set, entry.id)
        for name in entry.locations:
            loc = locations[name]
            try:
                loc.delete(entry.manifest_keys[name])
                for key in (f"{prefix}/{fmt.INDEX}", f"{prefix}/{fmt.CHUNKS}", f"{prefix}/{fmt.PIN}"):
                    loc.delete(key)
                out.removed.append(f"{entry.id}@{name}")
                log(f"removed snapshot {entry.id} of {entry.index.file_set} from {name}")
            except LocationError as e:
                out.errors.append(f"snapshot {entry.id} on {name}: {e}")
    if plan.problems:
        return out
    for name, loc in locations.items():
        with Lock("gc", {name: loc}) as lock:
            if not lock.held:
                out.errors.append(f"{name}: could not take the pack-collection lock")
                continue
            try:
                running = live_locks(loc, "snapshot", log)
            except LocationError as e:
                out.errors.append(f"{name}: {e}")
                continue
            if running:  # it may be about to refer to any pack: collect next time
                out.deferred.append(name)
                log(
                    f"packs on {name} not collected: a snapshot is running ({running[0].owner}); the next retention does"
                )
                continue
            # Read again under the lock: a snapshot committed since the plan was made counts too.
            current = load_snapshots({name: loc})
            if current.problems:
                out.errors.append(f"{name}: {'; '.join(current.problems)}")
                continue
            referenced = {p for e in current.entries for p in e.index.packs}
            try:
                stored = [(fmt.pack_id_of(o.key), o.key, o.size) for o in loc.list(f"{fmt.ROOT}/packs/")]
                for pack_id, key, size in stored:
                    if pack_id not in referenced:
                        try:
                            loc.delete(key)
                        except ObjectLocked as e:  # immutable until then: a later run collects it
                            out.locked.append(str(e))
                            continue
                        out.packs_deleted += 1
                        out.bytes_freed += size
            except LocationError as e:
                out.errors.append(f"{name}: {e}")
    if out.locked:
        log(f"{len(out.locked)} unreferenced pack copies are under object lock: collected once it expires")
    if out.packs_deleted:
        log(
            f"collected {out.packs_deleted} pack copies no retained snapshot refers to, over every location "
            f"({out.bytes_freed} bytes)"
        )
    return out
