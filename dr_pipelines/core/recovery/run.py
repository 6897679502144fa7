"""Carrying out a `RecoveryPlan`: databases and file sets restored in parallel, services started in
order with their health checks, everything validated, a report with the RTO of every step and the
data loss of every component.

A marker in the target root (`MARKER`) says a recovery is under way there and what it created; a
recovery killed midway leaves it, and the next one into that root removes what the killed one made
(stops its clusters, drops its databases) and starts clean, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.errors import DrError
from dr_pipelines.core.files.restore import restore_files
from dr_pipelines.core.log import Log
from dr_pipelines.core.owner import owner_dead, owner_tag
from dr_pipelines.core.pitr.recover import PitrRequest, query_as_postgres, run_pitr
from dr_pipelines.core.postgres.cluster import LocalCluster, free_port
from dr_pipelines.core.recovery.plan import MARKER, DatabaseStep, FileSetStep, RecoveryPlan, files_root_roots
from dr_pipelines.core.recovery.services import ServiceFailed, ServiceOutcome, start_services
from dr_pipelines.core.repository.records import RecordKind, store_json_record
from dr_pipelines.core.restore.database import restore_logical
from dr_pipelines.core.restore.request import RestoreRequest
from dr_pipelines.core.restore.target import drop_database
from dr_pipelines.core.storage.base import Location

SYSTEM_RECORDS = "_system"  # records of whole-system recoveries: `_system/reports/<kind>/`


class RecoveryFailed(DrError):
    def __init__(self, message: str, report: RecoveryReport):
        super().__init__(message)
        self.report = report


@dataclass
class ComponentResult:
    kind: str  # "database" or "files"
    name: str
    method: str  # pitr, logical, snapshot
    point_id: str  # the backup or snapshot restored
    point_time: str | None  # when the restored data is from (PITR: the point reached)
    seconds: float = 0.0
    data_loss_s: float | None = None
    ok: bool = False
    error: str | None = None
    where: str = ""  # the data directory and port, the database, the directory
    fallback: list[str] = field(default_factory=list)  # why a newer point could not be used
    warnings: list[str] = field(default_factory=list)
    steps_s: dict[str, float] = field(default_factory=dict)  # inside the component (fetch, pg_restore, validate...)
    rto_objective_s: float | None = None  # the component's own objective (databases.X / file_sets.X objectives)
    rpo_objective_s: float | None = None

    @property
    def objectives_met(self) -> bool | None:
        if self.rto_objective_s is None:
            return None
        loss_ok = self.rpo_objective_s is None or self.data_loss_s is None or self.data_loss_s <= self.rpo_objective_s
        return self.ok and self.seconds <= self.rto_objective_s and loss_ok

    @property
    def component(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass
class RecoveryReport:
    scenario: str
    point: str
    target_root: str
    started_at: str
    locations_used: list[str]
    left_out: dict[str, str]
    regions: dict[str, str | None]
    finished_at: str | None = None
    rto_s: float | None = None
    steps_s: dict[str, float] = field(default_factory=dict)
    components: list[ComponentResult] = field(default_factory=list)
    services: list[ServiceOutcome] = field(default_factory=list)
    data_loss_s: float | None = None  # the largest of the components'
    objectives: dict[str, float] = field(default_factory=dict)
    passed: bool = False
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # what a scenario adds (quarantine, diff, rotation, failover)
    # stable names for the report's readers (records, metrics)
    kind: str = "recovery"
    backup_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_markdown(self) -> str:
        verdict = "PASSED" if self.passed else f"FAILED: {self.error}"
        lines = [
            f"### {self.scenario}: {verdict}",
            "",
            f"- recovery point: **{self.point}**; read from **{', '.join(self.locations_used)}**"
            + (f" (left out: {', '.join(f'{n}: {w}' for n, w in self.left_out.items())})" if self.left_out else ""),
            f"- RTO: **{self.rto_s or 0:.1f} s** (objective {self.objectives.get('rto_s', 0):.0f} s); "
            f"data loss: **{_seconds(self.data_loss_s)}** (objective {self.objectives.get('rpo_s', 0):.0f} s)",
            "",
            "| component | restored | from | took | data loss | objectives (RTO / RPO) | result |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in self.components:
            result = "ok" if c.ok else f"FAILED: {c.error}"
            if c.fallback:
                result += f" (fell back: {'; '.join(c.fallback)})"
            met = {True: "met", False: "MISSED", None: "-"}[c.objectives_met]
            lines.append(
                f"| {c.component} | {c.method} {c.point_id} -> {c.where} | {c.point_time or '-'} | {c.seconds:.1f} s "
                f"| {_seconds(c.data_loss_s)} | {_seconds(c.rto_objective_s)} / {_seconds(c.rpo_objective_s)}: {met} "
                f"| {result} |"
            )
        if self.services:
            lines += [
                "",
                "| service (start order) | healthy | took | RTO objective | checks |",
                "|---|---|---|---|---|",
            ]
            for s in self.services:
                lines.append(
                    f"| {s.name} | {'yes' if s.healthy else 'NO: ' + (s.error or '')} | {s.seconds:.1f} s "
                    f"| {_seconds(s.rto_objective_s)} | {', '.join(s.checks)} |"
                )
        if self.steps_s:
            lines += ["", "steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.steps_s.items())]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"


# --------------------------------------------------------------------------- a killed recovery


_MARKER_LOCK = threading.Lock()  # the restores of one recovery update its marker from several threads


def _write_marker(root: Path, data: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.rename(root / MARKER)


def _update_marker(root: Path, **changes) -> None:
    from dr_pipelines.core.recovery.plan import owner_of_marker

    with _MARKER_LOCK:
        data = owner_of_marker(root) or {}
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        _write_marker(root, data)


def clear_killed_recovery(config: DrConfig, root: Path, log: Log) -> str | None:
    """If a recovery into `root` was killed, remove what it made and say so; refuse if one still runs."""
    from dr_pipelines.core.recovery.plan import RecoveryRefused, owner_of_marker

    marker = owner_of_marker(root)
    if marker is None:
        return None
    if owner_dead(marker.get("owner")) is not True:  # alive, or another host's: never taken
        raise RecoveryRefused(
            f"another recovery into {root} is running or cannot be known dead (started {marker.get('started_at')}, "
            f"{marker.get('owner')}); wait for it, or choose another target. Nothing was touched"
        )
    if marker.get("restored"):
        raise RecoveryRefused(
            f"a recovery into {root} restored every component ({marker.get('started_at')}, {marker.get('scenario')}) "
            "and services may run on it: it is not removed. Choose another target, or take it down and remove "
            f"{root / MARKER} with what it lists yourself. Nothing was touched"
        )
    for step in marker.get("plan", {}).get("databases", []):
        if step.get("data_dir") and Path(step["data_dir"]).exists():
            LocalCluster(Path(step["data_dir"]), step.get("port") or 0).stop("immediate")
    for name, target in marker.get("databases_created", {}).items():
        try:
            drop_database(config.database(name), name, target)
        except Exception as e:  # reported; the preflight then says the target is not empty
            log(f"warning: could not drop {target!r} left by the killed recovery: {e}")
    for path in marker.get("in_place_paths", []):
        shutil.rmtree(path, ignore_errors=True)
    for child in root.iterdir():
        if child.name != MARKER:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
    (root / MARKER).unlink()
    note = (
        f"a recovery into {root} was killed midway (started {marker.get('started_at')}, {marker.get('scenario')}): "
        "what it had restored was removed, and this one started clean"
    )
    log(f"WARNING: {note}")
    return note


# --------------------------------------------------------------------------- restoring


def _reference(plan: RecoveryPlan, started: datetime) -> datetime:
    """What data loss is measured against: the point asked for, or the moment the recovery started."""
    return started if plan.point == "latest" else datetime.fromisoformat(plan.point)


def _loss(reference: datetime, point: str | None) -> float | None:
    if not point:
        return None
    return round(max(0.0, (reference - datetime.fromisoformat(point)).total_seconds()), 3)


def _restore_database(
    config: DrConfig,
    config_file: str | None,
    plan: RecoveryPlan,
    step: DatabaseStep,
    locations: dict[str, Location],
    reference: datetime,
    log: Log,
) -> ComponentResult:
    objectives = config.database(step.database).objectives
    result = ComponentResult(
        "database",
        step.database,
        step.method,
        step.backup_id,
        step.backup_time,
        rto_objective_s=objectives.rto.total_seconds(),
        rpo_objective_s=objectives.rpo.total_seconds(),
    )
    t0 = time.monotonic()
    try:
        if step.method == "pitr":
            assert step.data_dir and step.port
            if not _port_free(step.port):  # chosen when planned; something took it since
                step.port = free_port()
            pitr = run_pitr(
                config,
                config_file,
                PitrRequest(
                    step.database,
                    Path(step.data_dir),
                    step.port,
                    target_time=datetime.fromisoformat(step.target_time) if step.target_time else None,
                    backup_id=step.backup_id,
                    locations=plan.locations,
                    accept_gaps=bool(step.gaps),
                ),
                locations,
                log,
            )
            result.point_time = pitr.reached_time or step.backup_time
            result.warnings = pitr.warnings
            result.steps_s = dict(pitr.steps_s)
            result.where = f"{step.data_dir} on port {step.port}"
            if query_as_postgres(Path(step.data_dir), step.port, "SELECT pg_is_in_recovery()") != "f":
                raise DrError(f"the recovered cluster of {step.database} on port {step.port} is not a promoted primary")
        else:
            assert step.target_database
            done = restore_logical(
                config,
                locations,
                RestoreRequest(step.database, backup=step.backup_id, target=step.target_database),
                log,
            )
            if done.created:  # new on this server: a killed run's re-run may drop it; an existing one, never
                _update_marker(Path(plan.target_root), databases_created={step.database: done.target})
            result.where = f"database {done.target!r}"
            result.steps_s = dict(done.steps_s)
        result.ok = True
    except Exception as e:
        result.error = str(e) or type(e).__name__
        log(f"database {step.database}: FAILED: {result.error}")
    result.seconds = round(time.monotonic() - t0, 3)
    result.data_loss_s = _loss(reference, result.point_time)
    return result


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


FILES_NICENESS = 10


def _restore_file_set(
    config: DrConfig,
    step: FileSetStep,
    locations: dict[str, Location],
    reference: datetime,
    log: Log,
    plan_has_databases: bool = False,
) -> ComponentResult:
    """The chosen snapshot; if it proves corrupt on every location, the next older one (reported).

    Files restore at a lower CPU priority than the databases beside them: a database's restore is the
    longer one (decode, then pg_restore), so the whole system's RTO is its time, not the sum of both
    fighting for the cores. (Linux: the niceness is per thread, and the threads and the `age` processes
    this one starts inherit it.)"""
    if plan_has_databases:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FILES_NICENESS)
        except (OSError, AttributeError):
            pass  # not permitted or not Linux: the restore runs at the same priority
    fs = config.file_set(step.file_set)
    result = ComponentResult(
        "files",
        step.file_set,
        "snapshot",
        step.snapshot_id,
        step.snapshot_time,
        rto_objective_s=fs.objectives.rto.total_seconds(),
        rpo_objective_s=fs.rpo(datetime.now(timezone.utc)).total_seconds(),
    )
    t0 = time.monotonic()
    for snapshot in [step.snapshot_id, *step.older]:
        into = Path(step.into) / step.file_set if step.into else Path("/")
        try:
            report = restore_files(
                config,
                locations,
                step.file_set,
                into,
                snapshot=snapshot,
                paths=step.paths or None,
                in_place=step.into is None,
                confirm=files_root_roots(config, step.file_set) if step.into is None else None,
                log=log,
            )
        except Exception as e:
            result.fallback.append(f"snapshot {snapshot}: {e}")
            if step.into is None:  # in place: an older snapshot over a half-restored newer one would mix them
                break
            log(f"file set {step.file_set}: snapshot {snapshot} could not be restored ({e}); trying an older one")
            shutil.rmtree(into, ignore_errors=True)
            continue
        result.point_id, result.point_time = report.snapshot_id, report.snapshot_created_at
        result.where = str(into) if step.into else "the original paths"
        result.ok = report.passed
        result.error = None if report.passed else (report.error or "; ".join(report.mismatches[:3]))
        break
    else:
        result.error = "no snapshot could be restored: " + " | ".join(result.fallback)
        result.fallback = []
    result.seconds = round(time.monotonic() - t0, 3)
    result.data_loss_s = _loss(reference, result.point_time)
    return result


def restore_data(
    config: DrConfig,
    config_file: str | None,
    plan: RecoveryPlan,
    locations: dict[str, Location],
    log: Log,
    started: datetime | None = None,
) -> list[ComponentResult]:
    """Every database and file set at once: the whole system's RTO is the slowest one, not the sum."""
    used = {n: locations[n] for n in plan.locations}
    reference = _reference(plan, started or datetime.fromisoformat(plan.planned_at))
    jobs = len(plan.databases) + len(plan.file_sets)
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="recover") as pool:
        futures = [
            pool.submit(_restore_database, config, config_file, plan, step, used, reference, log)
            for step in plan.databases
        ] + [
            pool.submit(_restore_file_set, config, step, used, reference, log, bool(plan.databases))
            for step in plan.file_sets
        ]
        return [f.result() for f in futures]


# --------------------------------------------------------------------------- the whole run


def new_report(config: DrConfig, plan: RecoveryPlan) -> RecoveryReport:
    rec = config.recovery
    return RecoveryReport(
        scenario=plan.scenario,
        point=plan.point,
        target_root=plan.target_root,
        started_at=datetime.now(timezone.utc).isoformat(),
        locations_used=plan.locations,
        left_out=plan.left_out,
        regions=plan.regions,
        objectives={"rto_s": rec.rto.total_seconds(), "rpo_s": rec.rpo.total_seconds()},
        notes=list(plan.notes),
        extra=dict(plan.extra),
    )


def begin(config: DrConfig, plan: RecoveryPlan) -> None:
    """The marker: what this recovery will create, so a kill midway is cleaned up by the next one."""
    # original paths restored in place were empty (preflight): what a killed run left there is its own
    in_place = [
        str(p)
        for f in plan.file_sets
        if f.into is None
        for p in config.file_set(f.file_set).resolved_paths(config.base_dir)
    ]
    _write_marker(
        Path(plan.target_root),
        {
            "owner": owner_tag(),
            "scenario": plan.scenario,
            "started_at": datetime.now(timezone.utc).isoformat(),
            "plan": plan.to_dict(),
            "databases_created": {},  # filled in once each is created (a database that existed is never listed)
            "in_place_paths": in_place,
            "restored": False,
        },
    )


def _env_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).upper()


def recovery_env(config: DrConfig, plan: RecoveryPlan, components: list[ComponentResult]) -> dict[str, str]:
    """Where the recovery put each component, for the services' start commands and health checks: a
    recovered cluster runs on a new port, files may be under the target root, a database may have a
    new name. DR_RECOVERY_ROOT; DR_DB_<NAME>_HOST/_PORT/_DBNAME (and _DATA_DIR for PITR); DR_FILES_<SET>_ROOT."""
    env = {"DR_RECOVERY_ROOT": plan.target_root, "DR_RECOVERY_POINT": plan.point}
    for step in plan.databases:
        key, db = f"DR_DB_{_env_name(step.database)}", config.database(step.database)
        if step.method == "pitr":
            env |= {f"{key}_HOST": "127.0.0.1", f"{key}_PORT": str(step.port), f"{key}_DBNAME": db.dbname}
            env[f"{key}_DATA_DIR"] = step.data_dir or ""
        else:
            env |= {f"{key}_HOST": db.host, f"{key}_PORT": str(db.port), f"{key}_DBNAME": step.target_database or ""}
    for step in plan.file_sets:
        env[f"DR_FILES_{_env_name(step.file_set)}_ROOT"] = str(Path(step.into) / step.file_set) if step.into else "/"
    return env


def start_after_restore(
    config: DrConfig,
    plan: RecoveryPlan,
    report: RecoveryReport,
    components: list[ComponentResult],
    log: Log,
    start: bool = True,
) -> RecoveryReport:
    """Services in order, each waiting for its health checks: only once every component is back."""
    report.components = components
    losses = [c.data_loss_s for c in components if c.data_loss_s is not None]
    report.data_loss_s = max(losses) if losses else None
    failed = [c for c in components if not c.ok]
    if not failed and components:  # from here on the targets are the system: no re-run removes them
        _update_marker(Path(plan.target_root), restored=True)
    if failed:
        report.error = "; ".join(f"{c.component}: {c.error}" for c in failed)
        done = [f"{c.component} ({c.where})" for c in components if c.ok]
        report.notes.append(
            "no service was started. "
            + (f"Restored and left in place for inspection: {', '.join(done)}. " if done else "")
            + "Fix the cause and run the recovery again: it removes this attempt's targets first"
        )
    elif start and plan.services:
        t = time.monotonic()
        try:
            report.services = start_services(config, plan.services, log, recovery_env(config, plan, components))
        except ServiceFailed as e:
            report.services, report.error = e.outcomes, str(e)
        report.steps_s["services"] = round(time.monotonic() - t, 3)
    return report


def conclude(plan: RecoveryPlan, report: RecoveryReport, locations: dict[str, Location], log: Log) -> RecoveryReport:
    """The verdict and the RTO (from the start of the run), stored in the repository."""
    report.passed = report.error is None
    finished = datetime.now(timezone.utc)
    report.finished_at = finished.isoformat()
    report.rto_s = round((finished - datetime.fromisoformat(report.started_at)).total_seconds(), 3)
    store_json_record(
        locations,
        SYSTEM_RECORDS,
        RecordKind.RECOVERY_DRILL if plan.scenario == "drill" else RecordKind.RECOVERY,
        report.started_at,
        report.to_dict(),
        log,
    )
    if report.passed:
        (Path(plan.target_root) / MARKER).unlink(missing_ok=True)
    return report


def run_plan(
    config: DrConfig,
    config_file: str | None,
    plan: RecoveryPlan,
    locations: dict[str, Location],
    log: Log,
    start: bool = True,
) -> RecoveryReport:
    """The whole recovery in one call (the jobs spread the same calls over ops)."""
    report = new_report(config, plan)
    begin(config, plan)
    t = time.monotonic()
    components = restore_data(config, config_file, plan, locations, log, datetime.fromisoformat(report.started_at))
    report.steps_s["restore"] = round(time.monotonic() - t, 3)
    start_after_restore(config, plan, report, components, log, start)
    return conclude(plan, report, locations, log)


def run_drill(config: DrConfig, config_file: str | None, locations: dict[str, Location], log: Log) -> RecoveryReport:
    """The scheduled full-system drill: everything restored into scratch targets (PITR clusters in the
    drill directory, logical restores under a drill name), measured, stored, then removed. No service
    is started: the drill proves the data, never touches what runs."""
    import secrets

    from dr_pipelines.core.recovery.plan import PlanRequest, make_plan, preflight

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    drills = config.recovery.resolved(config.recovery.drill_dir, config.base_dir)
    for earlier in sorted(drills.glob(f"*/{MARKER}")) if drills.exists() else []:
        from dr_pipelines.core.recovery.plan import owner_of_marker

        marker = owner_of_marker(earlier.parent) or {}
        if owner_dead(marker.get("owner")) is True:  # a drill killed midway: its clusters and databases go now
            remove_targets(config, RecoveryPlan(**_plan_fields(marker.get("plan", {}))), log)
            log(f"removed the targets of a drill killed midway ({earlier.parent})")
    root = drills / stamp
    request = PlanRequest(root, database_suffix=f"_drill_{secrets.token_hex(3)}", start_services=False)
    plan = make_plan(config, locations, "drill", request, log)
    preflight(config, plan, files_in_place=False)
    try:
        return run_plan(config, config_file, plan, locations, log, start=False)
    finally:
        remove_targets(config, plan, log)


def _plan_fields(data: dict) -> dict:
    """A plan as the marker stored it (JSON) back into its dataclasses."""
    return {
        **data,
        "databases": [DatabaseStep(**d) for d in data.get("databases", [])],
        "file_sets": [FileSetStep(**f) for f in data.get("file_sets", [])],
    }


def remove_targets(config: DrConfig, plan: RecoveryPlan, log: Log) -> None:
    """A drill's targets: its clusters stopped, its databases dropped, its directory removed."""
    for step in plan.databases:
        if step.data_dir and Path(step.data_dir).exists():
            LocalCluster(Path(step.data_dir), step.port or 0).stop("immediate")
        if step.target_database:
            try:
                drop_database(config.database(step.database), step.database, step.target_database)
            except Exception as e:
                log(f"warning: could not drop the drill database {step.target_database!r}: {e}")
    shutil.rmtree(plan.target_root, ignore_errors=True)
