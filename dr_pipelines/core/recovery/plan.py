"""What a whole-system recovery will do, decided before anything is touched: the locations it reads,
one consistent recovery point for every database and file set, the targets, the service order.

Every scenario (full system, failover, ransomware, rollback) makes a `RecoveryPlan`; they differ in how
they pick the source and the point (`choose` callbacks, `locations`), never in how the plan runs.
`RecoveryPlan.describe()` is the runbook page, computed (`--plan`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dr_pipelines.core.config import ConfigError, DrConfig
from dr_pipelines.core.errors import DrError
from dr_pipelines.core.files.catalog import SnapshotEntry, load_snapshots
from dr_pipelines.core.log import Log
from dr_pipelines.core.pitr.recover import archive_gaps
from dr_pipelines.core.postgres.cluster import free_port
from dr_pipelines.core.repository.catalog import CatalogEntry, load_catalog
from dr_pipelines.core.storage.base import Location
from dr_pipelines.core.storage.probe import usable_locations

MARKER = ".dr_recovery.json"  # in the target root while a recovery runs (a killed one leaves it)

SCENARIOS = ("full_system_recovery", "cross_region_failover", "ransomware_recovery", "service_rollback")


class RecoveryRefused(DrError):
    """The plan cannot be carried out as asked; nothing was touched. The message says what to do."""


@dataclass
class DatabaseStep:
    database: str
    method: str  # "pitr" (base backup + WAL to the point) or "logical"
    backup_id: str
    backup_time: str  # when the backup ended
    target_time: str | None = None  # PITR target; None: all archived WAL
    data_dir: str | None = None  # PITR: the new cluster's directory
    port: int | None = None  # PITR: its port (127.0.0.1)
    target_database: str | None = None  # logical: the database it goes into, on the configured server
    gaps: list[str] = field(default_factory=list)  # missing WAL segments after the base backup (confirmed)
    rejected: list[str] = field(default_factory=list)  # newer points not used, and why


@dataclass
class FileSetStep:
    file_set: str
    snapshot_id: str
    snapshot_time: str
    into: str | None  # None: the original paths (an empty host)
    paths: list[str] = field(default_factory=list)  # only these (a service's files); empty: the whole set
    rejected: list[str] = field(default_factory=list)
    older: list[str] = field(default_factory=list)  # the next older snapshots, should this one prove corrupt
    bytes: int = 0


@dataclass
class RecoveryPlan:
    scenario: str
    point: str  # the consistent recovery point T (ISO 8601), or "latest"
    target_root: str
    locations: list[str]
    left_out: dict[str, str]
    regions: dict[str, str | None]
    databases: list[DatabaseStep]
    file_sets: list[FileSetStep]
    services: list[str]  # started in this order after the data is back
    notes: list[str] = field(default_factory=list)
    planned_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    needed_bytes: int = 0
    extra: dict = field(default_factory=dict)  # what a scenario adds to the report (quarantine, rotation...)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """The steps, in order, with the chosen points and locations: the runbook page for this incident."""
        lines = [f"{self.scenario}: recover to {self.point}"]
        used = ", ".join(f"{n} (region {self.regions.get(n) or '-'})" for n in self.locations)
        lines.append(f"  read from: {used}")
        for name, why in self.left_out.items():
            lines.append(f"  left out: {name}: {why}")
        step = 1
        lines.append(f"{step}. preflight: targets empty, {self.needed_bytes / 1e6:.0f} MB of room, identity readable")
        step += 1
        lines.append(f"{step}. restore in parallel:")
        for d in self.databases:
            if d.method == "pitr":
                what = (
                    f"base backup {d.backup_id} ({d.backup_time}) + WAL to {d.target_time or 'the end of the archive'}"
                    f" -> new cluster {d.data_dir} on port {d.port}"
                )
            else:
                what = f"logical backup {d.backup_id} ({d.backup_time}) -> database {d.target_database!r}"
            lines.append(f"   - database {d.database}: {what}")
            lines += [f"     rejected: {r}" for r in d.rejected]
            if d.gaps:
                lines.append(f"     WAL gap confirmed: missing {', '.join(d.gaps)}")
        for f in self.file_sets:
            where = f.into or "the original paths"
            only = f" (only {', '.join(f.paths)})" if f.paths else ""
            lines.append(f"   - file set {f.file_set}: snapshot {f.snapshot_id} ({f.snapshot_time}){only} -> {where}")
            lines += [f"     rejected: {r}" for r in f.rejected]
        if self.services:
            step += 1
            lines.append(
                f"{step}. start services in order, each waiting for its health checks: " + " -> ".join(self.services)
            )
        step += 1
        lines.append(f"{step}. validate and report (RTO per step, data loss per component)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class PlanRequest:
    """What the operator asked for; the scenario fills in the rest."""

    target_root: Path
    at: datetime | None = None  # None: the newest point
    databases: list[str] | None = None  # None: every configured database
    file_sets: list[str] | None = None  # None: every configured file set
    method: str = "auto"  # auto (PITR when a base backup exists), pitr, logical
    files_in_place: bool = False  # files to their original paths (an empty host)
    database_suffix: str = ""  # logical restores go into <dbname><suffix> (drills)
    start_services: bool = True
    accept_gaps: bool = False
    locations: list[str] | None = None  # read only these; None: every location that answers
    paths: list[str] = field(default_factory=list)  # file subset (rollback)

    def check(self) -> None:
        if self.method not in ("auto", "pitr", "logical"):
            raise ConfigError(f"method must be auto, pitr or logical, not {self.method!r}")
        if self.at is not None and self.at.tzinfo is None:
            raise ConfigError("the recovery point needs a time zone (e.g. 2026-11-23T10:15:00+00:00)")


# A scenario's say over each candidate point: None to accept it, or why it is rejected.
Judge = Callable[[str, object], "str | None"]


def _accept_all(component: str, candidate: object) -> str | None:
    return None


def choose_locations(
    config: DrConfig, locations: dict[str, Location], only: list[str] | None, log: Log
) -> tuple[dict[str, Location], dict[str, str]]:
    chosen, left = usable_locations(config, locations, only)
    for name, why in left.items():
        log(f"WARNING: location {name} is left out: {why}")
    return chosen, left


def _database_step(
    config: DrConfig,
    locations: dict[str, Location],
    database: str,
    request: PlanRequest,
    root: Path,
    judge: Judge,
) -> DatabaseStep:
    catalog = load_catalog(locations.values(), database)
    mine = [e for e in catalog.entries if e.manifest.database == database]
    rejected: list[str] = []

    def usable(kind: str) -> list[CatalogEntry]:
        out = []
        for e in mine:
            if e.manifest.kind != kind:
                continue
            if request.at is not None and e.manifest.finished_at > request.at:
                continue
            why = judge(database, e)
            if why:
                rejected.append(f"{kind} backup {e.id}: {why}")
                continue
            out.append(e)
        return out

    bases, logicals = usable("base"), usable("logical")
    method = request.method
    if method == "auto":
        method = "pitr" if bases else "logical"
    chosen = bases if method == "pitr" else logicals
    if not chosen:
        when = f" that ended before {request.at.isoformat()}" if request.at else ""
        why = f" (rejected: {'; '.join(rejected)})" if rejected else ""
        problems = f"; {'; '.join(catalog.problems)}" if catalog.problems else ""
        raise RecoveryRefused(
            f"database {database!r}: no usable {'base' if method == 'pitr' else 'logical'} backup{when} on "
            f"{', '.join(locations)}{why}{problems}. Nothing was touched"
        )
    entry = chosen[0]
    step = DatabaseStep(
        database,
        method,
        entry.id,
        entry.manifest.finished_at.isoformat(),
        rejected=rejected,
    )
    if method == "pitr":
        step.data_dir = str(root / "postgres" / database)
        step.port = free_port()
        step.target_time = request.at.isoformat() if request.at else None
        # a target time with later gaps is fine (PostgreSQL stops before them, or says it could not reach
        # the target); replaying "everything" into a gap would end early without a word: confirmed only
        step.gaps = archive_gaps(locations, entry) if request.at is None else []
        if step.gaps and not request.accept_gaps:
            raise RecoveryRefused(
                f"database {database!r}: the WAL archive has a gap after base backup {entry.id} (missing "
                f"{', '.join(step.gaps)}); the last reachable point is the end of the segment before "
                f"{step.gaps[0]}, earlier than asked. Confirm recovering to it with accept_gaps "
                "(shell: --accept-gaps), or choose a point before the gap. Nothing was touched"
            )
    else:
        step.target_database = config.database(database).dbname + request.database_suffix
    return step


def _file_set_step(
    config: DrConfig,
    locations: dict[str, Location],
    file_set: str,
    request: PlanRequest,
    root: Path,
    judge: Judge,
) -> FileSetStep:
    catalog = load_snapshots(locations, file_set)
    rejected: list[str] = []
    usable: list[SnapshotEntry] = []
    for e in catalog.of(file_set):
        if request.at is not None and e.index.created_at > request.at:
            continue
        why = judge(file_set, e)
        if why:
            rejected.append(f"snapshot {e.id}: {why}")
            continue
        usable.append(e)
    if not usable:
        when = f" taken before {request.at.isoformat()}" if request.at else ""
        why = f" (rejected: {'; '.join(rejected)})" if rejected else ""
        raise RecoveryRefused(
            f"file set {file_set!r}: no usable snapshot{when} on {', '.join(locations)}{why}. Nothing was touched"
        )
    entry = usable[0]
    return FileSetStep(
        file_set,
        entry.id,
        entry.index.created_at.isoformat(),
        None if request.files_in_place else str(root / "files"),
        paths=list(request.paths),
        rejected=rejected,
        older=[e.id for e in usable[1:4]],
        bytes=entry.index.stats.bytes_scanned,
    )


def _not_empty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(p.name != MARKER for p in path.iterdir()))


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def preflight(config: DrConfig, plan: RecoveryPlan, files_in_place: bool, allow_non_empty: bool = False) -> None:
    """Refuse before any change: a target not empty, too little room, an unreadable identity."""
    problems = []
    root = Path(plan.target_root)
    if not allow_non_empty and _not_empty(root):
        problems.append(f"the target {root} is not empty: recover into a new or empty directory")
    if files_in_place:
        for f in plan.file_sets:
            for p in config.file_set(f.file_set).resolved_paths(config.base_dir):
                if _not_empty(p):
                    problems.append(
                        f"file set {f.file_set}: {p} exists and is not empty (an in-place recovery is for an "
                        "empty host; restore into a directory instead, or move it away)"
                    )
    free = _free_bytes(root)
    if plan.needed_bytes > free:
        problems.append(
            f"{root} has {free / 1e9:.2f} GB free; the chosen backups and snapshots need about "
            f"{plan.needed_bytes / 1e9:.2f} GB"
        )
    if config.encryption.method == "age":
        from dr_pipelines.core.codec.keys import load_identities

        try:
            load_identities(config)
        except DrError as e:
            problems.append(f"the age identity is unreadable: {e}")
    if problems:
        raise RecoveryRefused("preflight refused the recovery; nothing was touched:\n  - " + "\n  - ".join(problems))


def make_plan(
    config: DrConfig,
    locations: dict[str, Location],
    scenario: str,
    request: PlanRequest,
    log: Log,
    judge: Judge = _accept_all,
) -> RecoveryPlan:
    from dr_pipelines.core.recovery.services import services_of, start_order

    request.check()
    root = request.target_root.expanduser().absolute()
    used, left_out = choose_locations(config, locations, request.locations, log)
    databases = list(config.databases) if request.databases is None else request.databases
    file_sets = list(config.file_sets) if request.file_sets is None else request.file_sets
    for d in databases:
        config.database(d)
    for f in file_sets:
        config.file_set(f)
    db_steps = [_database_step(config, used, d, request, root, judge) for d in databases]
    file_steps = [_file_set_step(config, used, f, request, root, judge) for f in file_sets]
    needed = sum(s.bytes for s in file_steps)
    for step in db_steps:
        entry = load_catalog(used.values(), step.database).find(step.database, step.backup_id)
        needed += entry.manifest.uncompressed_bytes if step.method == "pitr" else 0  # logical: on the server
    services = start_order(config, services_of(config, databases, file_sets)) if request.start_services else []
    plan = RecoveryPlan(
        scenario=scenario,
        point=request.at.isoformat() if request.at else "latest",
        target_root=str(root),
        locations=list(used),
        left_out=left_out,
        regions={n: getattr(config.locations[n], "region", None) for n in used},
        databases=db_steps,
        file_sets=file_steps,
        services=services,
        needed_bytes=needed,
    )
    return plan


def owner_of_marker(root: Path) -> dict | None:
    import json

    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def files_root_roots(config: DrConfig, file_set: str) -> str:
    """The confirmation an in-place file restore asks for (the set's paths)."""
    return ",".join(os.path.abspath(p) for p in config.file_set(file_set).resolved_paths(config.base_dir))
