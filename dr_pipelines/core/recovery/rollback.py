"""Service rollback (SongNodes "Bad deployment / rollback"): one service's files (its `paths`, or its
file sets) and, optionally, its databases back to a point before a deployment; restart; health-check.
What was there is kept aside, never deleted; if the service does not come back healthy, it is put back
and the rollback fails loudly."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dr_pipelines.core.config import ConfigError, DrConfig
from dr_pipelines.core.errors import DrError
from dr_pipelines.core.files.catalog import SnapshotEntry
from dr_pipelines.core.files.restore import choose_snapshot, restore_files
from dr_pipelines.core.log import Log
from dr_pipelines.core.postgres.client import connect
from dr_pipelines.core.recovery.services import start_services, stop_services
from dr_pipelines.core.repository.catalog import load_catalog
from dr_pipelines.core.restore.database import restore_logical
from dr_pipelines.core.restore.request import RestoreRequest
from dr_pipelines.core.storage.base import Location


class RollbackFailed(DrError):
    def __init__(self, message: str, report: RollbackReport):
        super().__init__(message)
        self.report = report


@dataclass
class RollbackReport:
    service: str
    before: str
    started_at: str
    snapshots: dict[str, str] = field(default_factory=dict)  # file set -> snapshot restored
    backups: dict[str, str] = field(default_factory=dict)  # database -> backup restored
    kept_aside: dict[str, str] = field(default_factory=dict)  # path or database -> where the deployed one is
    rto_s: float | None = None
    passed: bool = False
    put_back: bool = False
    error: str | None = None
    kind: str = "service_rollback"


def _rollback_paths(config: DrConfig, service: str) -> dict[str, list[Path]]:
    """file set -> the absolute paths this service's rollback replaces."""
    svc = config.service(service)
    out: dict[str, list[Path]] = {}
    for name in svc.file_sets:
        roots = config.file_set(name).resolved_paths(config.base_dir)
        if not svc.paths:
            out[name] = roots
            continue
        mine = [Path(p) if Path(p).is_absolute() else config.base_dir / p for p in svc.paths]
        out[name] = [p for p in mine if any(p == r or r in p.parents for r in roots)]
    return out


@dataclass
class RollbackPlan:
    service: str
    before: datetime
    targets: dict[str, list[Path]]  # file set -> the paths replaced
    snapshots: dict[str, SnapshotEntry]  # file set -> the snapshot restored
    backups: dict[str, str]  # database -> the logical backup restored

    def describe(self) -> str:
        lines = [f"service_rollback of {self.service} to before {self.before.isoformat()}"]
        lines.append("1. restore into a staging directory (the service still runs):")
        for name, entry in self.snapshots.items():
            paths = ", ".join(str(p) for p in self.targets[name])
            lines.append(f"   - file set {name}: snapshot {entry.id} ({entry.index.created_at.isoformat()}): {paths}")
        lines.append(f"2. stop {self.service}")
        lines.append("3. move what is deployed aside (*.pre_rollback_<time>), move the restored files in")
        for name, backup_id in self.backups.items():
            lines.append(f"   - database {name}: logical backup {backup_id}; the current one kept as *__pre_restore_*")
        lines.append(f"4. start {self.service} and wait for its health checks; if they fail, put the deployment back")
        return "\n".join(lines)


def plan_rollback(
    config: DrConfig, locations: dict[str, Location], service: str, before: datetime, with_database: bool
) -> RollbackPlan:
    """What the rollback will restore, decided before anything is touched."""
    svc = config.service(service)
    if before.tzinfo is None:
        raise ConfigError("the rollback point needs a time zone (e.g. 2026-11-23T10:15:00+00:00)")
    targets = _rollback_paths(config, service)
    snapshots = {name: choose_snapshot(locations, name, before=before) for name in targets}
    backups = {}
    if with_database:
        for name in svc.databases:
            logicals = [
                e
                for e in load_catalog(locations.values(), name, "logical").entries
                if e.manifest.database == name and e.manifest.finished_at <= before
            ]
            if not logicals:
                raise DrError(f"database {name!r}: no logical backup before {before.isoformat()}; nothing was touched")
            backups[name] = logicals[0].id
    return RollbackPlan(service, before, targets, snapshots, backups)


def _put_back(
    config: DrConfig,
    service: str,
    moved: list[tuple[Path, Path | None]],
    swapped: list[tuple[str, str, str]],
    stamp: str,
    log: Log,
) -> None:
    """The deployment back in place (the rolled-back files kept as *.failed_rollback_*), then started."""
    try:
        stop_services(config, [service], log)
    except Exception as e:  # it may not have started at all
        log(f"warning: stopping {service} before putting the deployment back: {e}")
    for path, aside in reversed(moved):
        if path.exists() or path.is_symlink():
            path.rename(path.with_name(f"{path.name}.failed_rollback_{stamp}"))
        if aside is not None:
            aside.rename(path)
    for name, current, previous in swapped:
        _swap_database(config, name, current, previous, log)
    start_services(config, [service], log)


def _swap_database(config: DrConfig, name: str, current: str, back: str, log: Log) -> None:
    from psycopg import sql

    from dr_pipelines.core.restore.target import _terminate

    db = config.database(name)
    with connect(db, name, dbname="postgres", autocommit=True) as conn:
        for datname in (current, back):
            _terminate(conn, datname)  # waits until each session is gone: a rename needs none left
        failed = f"{db.dbname[:30]}__failed_rollback_{datetime.now(timezone.utc):%Y%m%d%H%M%S}"
        conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(current), sql.Identifier(failed)))
        conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(back), sql.Identifier(current)))
    log(f"database {current!r} put back; the rolled-back one is kept as {failed!r}")


def service_rollback(
    config: DrConfig,
    locations: dict[str, Location],
    service: str,
    before: datetime,
    with_database: bool,
    confirm: str | None,
    log: Log,
) -> RollbackReport:
    if confirm != service:
        raise ConfigError(
            f"a rollback replaces the files{' and databases' if with_database else ''} of service {service!r}: "
            f"confirm by naming it (Launchpad: confirm: {service}; shell: --yes {service})"
        )
    plan = plan_rollback(config, locations, service, before, with_database)
    t0 = time.monotonic()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report = RollbackReport(service, before.isoformat(), datetime.now(timezone.utc).isoformat())
    targets, backups = plan.targets, plan.backups
    # fetched before the service is touched: a corrupt snapshot stops here
    staging = config.files.resolved_state_dir(config.base_dir) / f"rollback-{service}-{stamp}"
    try:
        for name, paths in targets.items():
            entry = plan.snapshots[name]
            restore_files(config, locations, name, staging / name, entry=entry, paths=[str(p) for p in paths], log=log)
            report.snapshots[name] = entry.id
        stop_services(config, [service], log)
        moved: list[tuple[Path, Path | None]] = []  # (path, where the deployed one went; None: there was none)
        swapped: list[tuple[str, str, str]] = []  # (database, its name, where the deployed one went)
        try:
            for name, paths in targets.items():
                for path in paths:
                    restored = staging / name / str(path).lstrip("/")
                    aside = None
                    if path.exists() or path.is_symlink():
                        aside = path.with_name(f"{path.name}.pre_rollback_{stamp}")
                        path.rename(aside)
                        report.kept_aside[str(path)] = str(aside)
                    moved.append((path, aside))
                    if restored.exists() or restored.is_symlink():
                        shutil.move(str(restored), str(path))
            for name, backup_id in backups.items():
                target = config.database(name).dbname
                done = restore_logical(
                    config,
                    locations,
                    RestoreRequest(name, backup=backup_id, clean=True, confirm=target, keep_previous=True),
                    log,
                )
                report.backups[name] = backup_id
                if done.previous:
                    report.kept_aside[f"database {target}"] = done.previous
                    swapped.append((name, target, done.previous))
            start_services(config, [service], log)
        except Exception as e:  # unhealthy, or a step of the swap failed: what was deployed goes back
            report.error = str(e)
            log(f"ROLLBACK FAILED: {e}. Putting back what was deployed")
            try:
                _put_back(config, service, moved, swapped, stamp, log)
            except Exception as again:
                raise RollbackFailed(
                    f"the rollback of {service!r} failed ({e}) AND putting the deployment back failed ({again}). "
                    f"The service is stopped. Deployed files kept aside: {report.kept_aside or 'none'}; put them "
                    "back by hand (rename *.pre_rollback_* over the rolled-back paths) and start it",
                    report,
                ) from None
            report.put_back = True
            report.kept_aside = {}
            raise RollbackFailed(
                f"the rollback of {service!r} failed ({e}); what was deployed is back in place and running. "
                f"The rolled-back files are kept beside it as *.failed_rollback_{stamp}",
                report,
            ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.passed = True
    report.rto_s = round(time.monotonic() - t0, 3)
    log(
        f"service {service} rolled back to before {before.isoformat()} in {report.rto_s:.1f}s; what was deployed is "
        f"kept aside: {', '.join(f'{k} -> {v}' for k, v in report.kept_aside.items()) or 'nothing'}"
    )
    return report
