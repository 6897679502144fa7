"""Health of the DR system, read from the repository alone (no Dagster instance needed).

The same outcomes feed the asset checks, `dr-pipelines status`, the Prometheus metrics and the
compliance report, so the UI, the shell and the dashboards never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.monitoring.outcome import ERROR, WARNING, Outcome
from dr_pipelines.core.repository.catalog import (
    Catalog,
    CatalogEntry,
    load_catalog,
    verify_backup,
)
from dr_pipelines.core.repository.records import Record, RecordKind, load_reports
from dr_pipelines.core.storage.base import Location

if TYPE_CHECKING:
    import pandas as pd


FRESHNESS = "backup_fresh"


SIZE = "backup_size_normal"


INTEGRITY = "backup_integrity"


REPLICATION = "backup_replicated"


LAST_ATTEMPT = "last_backup_attempt_succeeded"


RESTORE_TEST = "restore_test_passed"


RESTORE_TEST_RECENT = "restore_test_recent"


RTO = "rto_within_objective"


REPOSITORY = "repository_readable"


LEFTOVERS = "no_leftovers"


def _hours(td: timedelta) -> float:
    return round(td.total_seconds() / 3600, 3)


def _of(entries: list[CatalogEntry], database: str, kind: str) -> list[CatalogEntry]:
    return [e for e in entries if e.manifest.database == database and e.manifest.kind == kind]


def check_freshness(
    config: DrConfig,
    database: str,
    catalog: Catalog,
    now: datetime,
    kind: str = "logical",
    rpo_met_by_wal: bool = False,
) -> Outcome:
    """ERROR past the alert limit (backups stopped arriving); WARNING past the RPO, unless archived
    WAL meets the RPO (logical backups alone rarely can)."""
    cfg = config.database(database)
    limit, rpo = cfg.freshness_limit(now, kind), cfg.objectives.rpo
    name = FRESHNESS if kind == "logical" else f"{kind}_{FRESHNESS}"
    backups = _of(catalog.entries, database, kind)
    md = {"age_hours": -1.0, "limit_hours": _hours(limit), "rpo_hours": _hours(rpo), "newest_backup": ""}
    if not backups:
        return Outcome(database, name, False, ERROR, f"no {kind} backup of {database} exists", md)
    newest = backups[0].manifest
    age = now - newest.created_at
    md.update(age_hours=_hours(age), newest_backup=newest.id)
    text = (
        f"newest {kind} backup {newest.id} is {_hours(age)} h old (alert limit {_hours(limit)} h, RPO {_hours(rpo)} h)"
    )
    if age > limit:
        return Outcome(database, name, False, ERROR, text + "; backups have stopped arriving", md)
    if age > rpo and not rpo_met_by_wal:
        return Outcome(database, name, False, WARNING, text + "; older than the RPO", md)
    return Outcome(database, name, True, ERROR, text + ("; the RPO is met by archived WAL" if age > rpo else ""), md)


def size_history(backups: list[CatalogEntry], window: int) -> pd.DataFrame:
    """Oldest first: each backup's size and the rolling mean of the `window` good backups before it."""
    import pandas as pd  # here, not at the top: ~1 s of import for every command that loads the checks

    df = pd.DataFrame(
        {
            "backup_id": [e.id for e in reversed(backups)],
            "created_at": [e.manifest.created_at for e in reversed(backups)],
            "size_bytes": [e.manifest.size_bytes for e in reversed(backups)],
        }
    )
    df["mean_before"] = pd.Series(df["size_bytes"].rolling(window, min_periods=1).mean()).shift(1)
    return df


def check_size(
    config: DrConfig,
    database: str,
    catalog: Catalog,
    bad_ids: frozenset[str] | set[str] = frozenset(),
    kind: str = "logical",
) -> Outcome:
    """Warning, not error: a purge or a bulk load changes the size legitimately; a human decides."""
    c = config.checks
    backups = [e for e in _of(catalog.entries, database, kind)]
    if not backups:
        return Outcome(database, SIZE, True, WARNING, "no backup yet", {})
    newest, good = backups[0], [e for e in backups[1:] if e.id not in bad_ids]
    if len(good) < c.size_min_history:  # same metadata keys as a verdict, so the UI plots one series
        return Outcome(
            database,
            SIZE,
            True,
            WARNING,
            f"{len(good)} earlier backups; no verdict before {c.size_min_history}",
            {
                "size_bytes": newest.manifest.size_bytes,
                "mean_bytes": 0,
                "deviation_pct": 0.0,
                "tolerance_pct": round(100 * c.size_tolerance, 1),
                "history": len(good),
            },
        )
    df = size_history([newest] + good[: c.size_window], c.size_window)
    mean = float(df["mean_before"].iloc[-1])
    size = newest.manifest.size_bytes
    deviation = (size - mean) / mean if mean else 0.0
    ok = abs(deviation) < c.size_tolerance  # exactly half (or double) the usual size is already outside
    md = {
        "size_bytes": size,
        "mean_bytes": round(mean),
        "deviation_pct": round(100 * deviation, 1),
        "tolerance_pct": round(100 * c.size_tolerance, 1),
        "history": len(df) - 1,
        "history_table": df.assign(created_at=df["created_at"].dt.strftime("%Y-%m-%d %H:%M")).to_markdown(index=False),
    }
    return Outcome(
        database,
        SIZE,
        ok,
        WARNING,
        f"newest backup {newest.id}: {size} bytes, {100 * deviation:+.0f}% from the mean "
        f"of the {len(df) - 1} before it (tolerance ±{100 * c.size_tolerance:.0f}%)",
        md,
    )


def check_replication(config: DrConfig, database: str, catalog: Catalog, kind: str = "logical") -> Outcome:
    name = health_name(REPLICATION, kind)
    backups = _of(catalog.entries, database, kind)
    if not backups:
        return Outcome(database, name, False, ERROR, f"no {kind} backup of {database} exists", {})
    newest = backups[0]
    missing = [n for n in config.locations if n not in newest.locations]
    md = {"locations": len(config.locations), "holding": len(newest.locations), "missing": ", ".join(missing)}
    if missing:
        return Outcome(
            database,
            name,
            False,
            ERROR,
            f"newest backup {newest.id} is missing on {', '.join(missing)} (present on {', '.join(newest.locations)})",
            md,
        )
    return Outcome(
        database,
        name,
        True,
        ERROR,
        f"newest backup {newest.id} is on every location ({', '.join(newest.locations)})",
        md,
    )


def check_integrity(
    config: DrConfig, database: str, catalog: Catalog, locations: dict[str, Location], kind: str = "logical"
) -> Outcome:
    """Reads every object of the newest backup back from every location holding it."""
    backups = _of(catalog.entries, database, kind)
    if not backups:
        return Outcome(database, INTEGRITY, False, ERROR, f"no {kind} backup of {database} exists", {})
    newest = backups[0]
    reports = [verify_backup(locations[n], newest.manifest) for n in newest.locations if n in locations]
    bad = [r.summary() for r in reports if not r.ok]
    md = {
        "locations_checked": len(reports),
        "objects": sum(len(r.checks) for r in reports),
        "bytes_read": newest.manifest.size_bytes * len(reports),
        "corrupt_locations": len(bad),
    }
    if bad:
        return Outcome(database, INTEGRITY, False, ERROR, "; ".join(bad), md)
    return Outcome(
        database,
        INTEGRITY,
        True,
        ERROR,
        f"newest backup {newest.id}: every object read back with matching SHA-256 on "
        f"{', '.join(r.location for r in reports)}",
        md,
    )


def check_last_attempt(database: str, attempts: list[Record]) -> Outcome:
    attempts = [a for a in attempts if not a.running()]  # one under way has no verdict yet
    if not attempts:
        return Outcome(database, LAST_ATTEMPT, True, ERROR, "no backup attempt recorded yet", {})
    last = attempts[0]
    if last.succeeded:
        return Outcome(
            database,
            LAST_ATTEMPT,
            True,
            ERROR,
            f"last attempt {last.backup_id} succeeded",
            {"backup_id": last.backup_id or ""},
        )
    return Outcome(
        database,
        LAST_ATTEMPT,
        False,
        ERROR,
        f"last backup attempt ({last.started_at}) failed: {last.error}"
        if not last.died()
        else f"last backup attempt {last.backup_id} (started {last.started_at}) never finished: its process "
        f"({last.host}, pid {last.pid}) died (killed, out of memory or the host restarted). The next backup "
        "sweeps what it left; take one now",
        {"backup_id": last.backup_id or ""},
    )


def check_restore_tests(config: DrConfig, database: str, tests: list[Record], now: datetime) -> list[Outcome]:
    cfg = config.database(database)
    max_age, rto = cfg.restore_test.max_age, cfg.objectives.rto
    if not tests:
        missing = "no restore test has ever run"
        return [
            Outcome(database, RESTORE_TEST, False, ERROR, missing),
            Outcome(database, RESTORE_TEST_RECENT, False, ERROR, missing),
            Outcome(database, RTO, False, WARNING, "no measured RTO yet"),
        ]
    last = tests[0]
    age = now - datetime.fromisoformat(last.started_at)
    out = [
        Outcome(
            database,
            RESTORE_TEST,
            last.passed,
            ERROR,
            f"restore test of {last.backup_id} " + ("passed" if last.passed else f"FAILED: {last.error}"),
            {"backup_id": last.backup_id or ""},
        ),
        Outcome(
            database,
            RESTORE_TEST_RECENT,
            age <= max_age,
            ERROR,
            f"last restore test {_hours(age)} h ago (limit {_hours(max_age)} h)",
            {"age_hours": _hours(age), "limit_hours": _hours(max_age)},
        ),
    ]
    rto_s = last.rto_s
    if rto_s is None:
        out.append(Outcome(database, RTO, False, WARNING, "the last restore test measured no RTO"))
    else:
        out.append(
            Outcome(
                database,
                RTO,
                rto_s <= rto.total_seconds(),
                WARNING,
                f"measured RTO {rto_s:.1f} s (objective {rto.total_seconds():.0f} s)",
                {"rto_s": rto_s, "objective_s": rto.total_seconds()},
            )
        )
    return out


def health_name(check: str, kind: str) -> str:
    return check if kind == "logical" else f"{kind}_{check}"


WAL_CONTINUOUS = "wal_continuous"


WAL_LAG = "wal_archive_lag_within_rpo"


WAL_INTEGRITY = "wal_integrity"


PITR_TEST = "pitr_test_passed"


def check_wal(config: DrConfig, status) -> list[Outcome]:
    db = status.database
    rpo = config.database(db).objectives.rpo.total_seconds()
    md = {
        "segments": status.segments,
        "gaps": len(status.gaps),
        "newest_segment": status.newest_segment or "",
        "archive_lag_s": -1.0 if status.archive_lag_s is None else round(status.archive_lag_s, 1),
    }
    lag_ok = status.archive_lag_s is not None and status.archive_lag_s <= rpo
    lag_text = (
        f"archive lag {md['archive_lag_s']} s (RPO {rpo:.0f} s)"
        + (
            f"; archive_command failed {status.failed_count} times (last {status.last_failed_wal})"
            if status.failed_count
            else ""
        )
        + (f"; server: {status.server_error}" if status.server_error else "")
    )
    return [
        Outcome(
            db,
            WAL_CONTINUOUS,
            not status.gaps,
            ERROR,
            f"missing WAL: {', '.join(status.gaps)}"
            if status.gaps
            else f"{status.segments} segments archived, no gap since {status.oldest_base_start or 'the first'}",
            md,
        ),
        Outcome(db, WAL_LAG, lag_ok, ERROR, lag_text, md),
    ]


def check_wal_integrity(locations: dict[str, Location], database: str, since: str | None) -> Outcome:
    from dr_pipelines.core.wal.archive import verify_wal

    checked, problems = verify_wal(locations, database, since)
    md = {"files_checked": checked, "problems": len(problems)}
    if problems:
        return Outcome(database, WAL_INTEGRITY, False, ERROR, "; ".join(problems[:5]), md)
    return Outcome(
        database,
        WAL_INTEGRITY,
        True,
        ERROR,
        f"{checked} archived WAL files read back with matching SHA-256 since {since or 'the first'}",
        md,
    )


def check_pitr_tests(database: str, drills: list[Record]) -> Outcome:
    if not drills:
        return Outcome(database, PITR_TEST, False, WARNING, "no PITR drill has run yet", {"rto_s": -1.0})
    last = drills[0]
    return Outcome(
        database,
        PITR_TEST,
        last.passed,
        ERROR,
        f"PITR drill of {last.backup_id} " + ("passed" if last.passed else f"FAILED: {last.error}"),
        {"rto_s": last.rto_s or -1.0, "achievable_rpo_s": last.achievable_rpo_s or -1.0},
    )


@dataclass
class Health:
    """Everything `status`, the metrics and the report need, read once."""

    now: datetime
    catalog: Catalog
    attempts: dict[str, list[Record]]
    restore_tests: dict[str, list[Record]]
    outcomes: list[Outcome]
    wal: dict = field(default_factory=dict)  # database -> WalStatus, where a WAL archive exists
    pitr_tests: dict[str, list[Record]] = field(default_factory=dict)
    snapshots: Any = None  # the file snapshots' catalog (core.files.catalog.SnapshotCatalog)
    # real recoveries and drills: "restore" and "pitr" (every database's), "system", "drill"
    recoveries: dict[str, list[Record]] = field(default_factory=dict)

    @property
    def worst(self) -> str:
        failed = {o.severity for o in self.outcomes if not o.passed}
        return ERROR if ERROR in failed else WARNING if WARNING in failed else "ok"

    @property
    def exit_code(self) -> int:
        return {"ok": 0, WARNING: 1, ERROR: 2}[self.worst]


def failed_restore_tests(tests: list[Record]) -> set[str]:
    passed = {t.backup_id for t in tests if t.passed}
    return {t.backup_id for t in tests if not t.passed and t.backup_id} - passed


def evaluate(config: DrConfig, locations: dict[str, Location], now: datetime, integrity: bool = False) -> Health:
    catalog = load_catalog(locations.values())
    attempts = {
        db: [a for a in load_reports(locations, db, RecordKind.BACKUP_ATTEMPT) if not a.running()]
        for db in config.databases
    }
    tests = {db: load_reports(locations, db, RecordKind.RESTORE_TEST) for db in config.databases}
    from dr_pipelines.core.wal.archive import archive_cluster, wal_status

    outcomes = [Outcome("*", REPOSITORY, False, ERROR, p) for p in catalog.problems]
    wal, drills = {}, {}
    for db in config.databases:
        bases = _of(catalog.entries, db, "base")
        if bases or archive_cluster(locations, db):  # this database is physically backed up
            wal[db] = wal_status(config, db, locations, now, [e.manifest.base.wal_start for e in bases])
            drills[db] = load_reports(locations, db, RecordKind.PITR_TEST)
        wal_ok = (
            db in wal
            and not wal[db].gaps
            and wal[db].archive_lag_s is not None
            and wal[db].archive_lag_s <= config.database(db).objectives.rpo.total_seconds()
        )
        outcomes += [
            check_freshness(config, db, catalog, now, rpo_met_by_wal=wal_ok),
            check_last_attempt(db, [a for a in attempts[db] if (a.kind or "logical") == "logical"]),
            check_size(config, db, catalog, failed_restore_tests(tests[db])),
            check_replication(config, db, catalog),
        ]
        if integrity:
            outcomes.append(check_integrity(config, db, catalog, locations))
        outcomes += check_restore_tests(config, db, tests[db], now)
        if db in wal:
            outcomes += [
                check_freshness(config, db, catalog, now, kind="base", rpo_met_by_wal=True),
                check_replication(config, db, catalog, kind="base"),
                *check_wal(config, wal[db]),
                check_pitr_tests(db, drills[db]),
                _named(check_last_attempt(db, [a for a in attempts[db] if a.kind == "base"]), "base"),
            ]
            if integrity:
                outcomes.append(check_wal_integrity(locations, db, wal[db].oldest_base_start))
        if config.database(db).streaming.enabled:
            from dr_pipelines.core.wal.stream_health import stream_health, stream_outcomes

            down = wal[db].server_error if db in wal else None
            outcomes += stream_outcomes(stream_health(config, db, locations, now, server_down=down))
    snapshots = None
    if config.file_sets:
        from dr_pipelines.core.files.catalog import load_snapshots
        from dr_pipelines.core.files.format import records_owner
        from dr_pipelines.core.files.health import file_outcomes, subject

        snapshots = load_snapshots(locations)
        outcomes += file_outcomes(config, locations, snapshots, now, integrity)
        for file_set in config.file_sets:  # under the name checks and metrics give a file set
            owner = records_owner(file_set)
            attempts[subject(file_set)] = [
                a for a in load_reports(locations, owner, RecordKind.BACKUP_ATTEMPT) if not a.running()
            ]
            tests[subject(file_set)] = load_reports(locations, owner, RecordKind.RESTORE_TEST)
    outcomes.append(check_leftovers(config, locations, now))
    from dr_pipelines.core.recovery.run import SYSTEM_RECORDS

    recoveries = {
        "restore": [r for db in config.databases for r in load_reports(locations, db, RecordKind.RESTORE)],
        "pitr": [r for db in config.databases for r in load_reports(locations, db, RecordKind.PITR)],
        "system": load_reports(locations, SYSTEM_RECORDS, RecordKind.RECOVERY),
        "drill": load_reports(locations, SYSTEM_RECORDS, RecordKind.RECOVERY_DRILL),
    }
    if config.recovery.drill_enabled and (config.file_sets or config.services):
        outcomes.append(check_system_drill(config, recoveries["drill"], now))
    outcomes += check_secondary_lag(config, locations, now)
    return Health(now, catalog, attempts, tests, outcomes, wal, drills, snapshots, recoveries)


SYSTEM_DRILL = "system_drill_passed"
SECONDARY_LAG = "secondary_within_rpo"


def check_system_drill(config: DrConfig, drills: list[Record], now: datetime) -> Outcome:
    """The newest full-system drill passed, within the whole system's RTO and RPO, and is recent."""
    rec = config.recovery
    if not drills:
        return Outcome(
            "system", SYSTEM_DRILL, False, WARNING, "no full-system drill yet: run `dr-pipelines recover drill`"
        )
    d = drills[0]
    extra = d.model_extra or {}
    loss = extra.get("data_loss_s")
    age = now - datetime.fromisoformat(d.started_at)
    problems = []
    if not d.passed:
        problems.append(f"FAILED: {d.error}")
    if d.rto_s is not None and d.rto_s > rec.rto.total_seconds():
        problems.append(f"RTO {d.rto_s:.0f} s over the objective {rec.rto.total_seconds():.0f} s")
    if loss is not None and loss > rec.rpo.total_seconds():
        problems.append(f"data loss {loss:.0f} s over the objective {rec.rpo.total_seconds():.0f} s")
    if age > timedelta(days=8):
        problems.append(f"{age.days} days old (the drill runs weekly)")
    return Outcome(
        "system",
        SYSTEM_DRILL,
        not problems,
        ERROR if not d.passed else WARNING,
        f"full-system drill of {d.started_at}: " + ("; ".join(problems) if problems else f"passed, RTO {d.rto_s} s"),
        {"rto_s": d.rto_s or 0.0, "data_loss_s": loss if loss is not None else -1.0},
    )


def check_secondary_lag(config: DrConfig, locations: dict[str, Location], now: datetime) -> list[Outcome]:
    """A failover to a secondary location would lose what it lacks: over the RPO is an incident."""
    from dr_pipelines.core.recovery.failover import secondary_lag

    by_component: dict[str, list] = {}
    for lag in secondary_lag(config, locations, now):
        by_component.setdefault(lag.component, []).append(lag)
    return [_secondary_outcome(component, lags) for component, lags in by_component.items()]


def check_secondaries(config: DrConfig, locations: dict[str, Location], component: str, now: datetime) -> Outcome:
    """One component's secondaries (`database NAME` or `files NAME`), for its asset check."""
    from dr_pipelines.core.recovery.failover import secondary_lag

    lags = [lag for lag in secondary_lag(config, locations, now) if lag.component == component]
    return _secondary_outcome(component, lags)


def _secondary_outcome(component: str, lags: list) -> Outcome:
    subject = component.replace("database ", "").replace("files ", "files/")
    if not lags:
        return Outcome(subject, SECONDARY_LAG, True, ERROR, "one location holds it (or none yet): nothing to compare")
    texts = [
        f"{lag.location}: unknown ({lag.unknown})"
        if lag.unknown
        else f"{lag.location} holds nothing of it"
        if lag.behind_s is None
        else f"{lag.location} {lag.behind_s:.0f} s behind {lag.primary}"
        for lag in lags
    ]
    ok = all(lag.ok for lag in lags)
    known_bad = any(not lag.ok and lag.unknown is None for lag in lags)
    return Outcome(
        subject,
        SECONDARY_LAG,
        ok,
        ERROR if known_bad else WARNING,  # a location that does not answer is reported as such elsewhere
        f"{component}: "
        + "; ".join(texts)
        + f" (RPO {lags[0].limit_s:.0f} s)"
        + ("" if ok else ": a failover to it would lose more than the RPO; check why it falls behind"),
        {"max_behind_s": max((lag.behind_s for lag in lags if lag.behind_s is not None), default=-1.0)},
    )


def _named(outcome: Outcome, kind: str) -> Outcome:
    return replace(outcome, check=health_name(outcome.check, kind))


def check_leftovers(config: DrConfig, locations: dict[str, Location], now: datetime) -> Outcome:
    """What killed runs left behind (the next backup or restore sweeps it)."""
    found = all_leftovers(config, locations, now)
    if not found:
        return Outcome("*", LEFTOVERS, True, WARNING, "nothing left behind by killed runs")
    shown = "; ".join(item.describe() for item in found[:5]) + (
        f"; and {len(found) - 5} more" if len(found) > 5 else ""
    )
    return Outcome(
        "*",
        LEFTOVERS,
        False,
        WARNING,
        f"{len(found)} leftovers of killed runs: {shown}. The next backup or restore removes them",
        {"leftovers": len(found)},
    )


def all_leftovers(config: DrConfig, locations: dict[str, Location], now: datetime | None = None) -> list:
    """Everything killed runs left, on this host and in the repository (what the next runs sweep)."""
    from datetime import timezone

    from dr_pipelines.core.files.sweep import snapshot_leftovers
    from dr_pipelines.core.sweep import repository_leftovers, scratch_leftovers, staging_leftovers

    now = now or datetime.now(timezone.utc)
    out = scratch_leftovers(config, now)
    for database in config.databases:
        out += repository_leftovers(locations, database, now) + staging_leftovers(config, database)
    if config.file_sets:
        out += snapshot_leftovers(config, locations, now)
    return out
