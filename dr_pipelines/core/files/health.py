"""Health of the file sets, read from the repository alone: the same outcomes feed the asset
checks, `status`, the metrics and the report (as `core.monitoring.health` does for databases)."""

from __future__ import annotations

from datetime import datetime

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.files import format as fmt
from dr_pipelines.core.files.catalog import SnapshotCatalog, SnapshotEntry, verify_snapshot
from dr_pipelines.core.monitoring.outcome import ERROR, WARNING, Outcome
from dr_pipelines.core.repository.records import Record, RecordKind, load_reports
from dr_pipelines.core.storage.base import Location

FRESH = "snapshot_fresh"
CHANGE_RATE = "snapshot_change_rate_normal"
REPLICATED = "snapshot_replicated"
INTEGRITY = "snapshot_integrity"
LAST_ATTEMPT = "last_snapshot_attempt_succeeded"
RESTORE_TEST = "files_restore_test_passed"
CHANGE_WINDOW = 10  # snapshots in the rolling mean
CHANGE_MIN_HISTORY = 3


def subject(file_set: str) -> str:
    """How a file set is named where a database name would stand (checks, metrics, the report)."""
    return f"files/{file_set}"


def check_fresh(config: DrConfig, file_set: str, catalog: SnapshotCatalog, now: datetime) -> Outcome:
    limit = config.file_set(file_set).rpo(now)
    snaps = catalog.of(file_set)
    if not snaps:
        return Outcome(
            subject(file_set), FRESH, False, ERROR, f"no snapshot of file set {file_set!r} in the repository"
        )
    age = now - snaps[0].index.created_at
    ok = age <= limit
    return Outcome(
        subject(file_set),
        FRESH,
        ok,
        ERROR,
        f"newest snapshot {snaps[0].id} is {age.total_seconds() / 3600:.1f} h old "
        + ("(within" if ok else "(OVER")
        + f" the {limit.total_seconds() / 3600:.1f} h objective)",
        {"age_hours": round(age.total_seconds() / 3600, 3), "limit_hours": round(limit.total_seconds() / 3600, 3)},
    )


def check_change_rate(config: DrConfig, file_set: str, snaps: list[SnapshotEntry]) -> Outcome:
    """New bytes of the newest snapshot against the rolling mean of the ones before: mass
    encryption by ransomware rewrites everything, and shows as a change far above the usual."""
    tol, floor = config.files.change_tolerance, config.files.change_min_bytes
    if not snaps:
        return Outcome(subject(file_set), CHANGE_RATE, True, WARNING, "no snapshot yet")
    newest = snaps[0].index.stats
    history = [s.index.stats.bytes_new for s in snaps[1 : 1 + CHANGE_WINDOW]]
    # the first snapshot stores everything: it is no baseline for change
    history = history[:-1] if len(snaps) <= CHANGE_WINDOW + 1 and history else history
    if len(history) < CHANGE_MIN_HISTORY:
        return Outcome(
            subject(file_set), CHANGE_RATE, True, WARNING, f"{len(history)} earlier snapshots: too few for a verdict"
        )
    mean = sum(history) / len(history)
    ok = newest.bytes_new <= max(floor, tol * mean)
    return Outcome(
        subject(file_set),
        CHANGE_RATE,
        ok,
        WARNING,
        f"snapshot {snaps[0].id}: {newest.bytes_new} new bytes, {newest.changed_files} changed files; rolling mean "
        f"{mean:.0f} bytes"
        + (
            ""
            if ok
            else f": over {tol}x the mean. Mass changes (ransomware encrypting files?) look like this: look now"
        ),
        {"bytes_new": newest.bytes_new, "rolling_mean_bytes": round(mean), "changed_files": newest.changed_files},
    )


def check_replicated(config: DrConfig, file_set: str, catalog: SnapshotCatalog) -> Outcome:
    snaps = catalog.of(file_set)
    if not snaps:
        return Outcome(subject(file_set), REPLICATED, False, WARNING, "no snapshot yet")
    missing = [n for n in config.locations if n not in snaps[0].locations]
    return Outcome(
        subject(file_set),
        REPLICATED,
        not missing,
        WARNING,
        f"snapshot {snaps[0].id} is on {', '.join(snaps[0].locations)}"
        + (f"; MISSING on {', '.join(missing)}" if missing else " (every location)"),
    )


def check_integrity(file_set: str, catalog: SnapshotCatalog, locations: dict[str, Location]) -> Outcome:
    snaps = catalog.of(file_set)
    if not snaps:
        return Outcome(subject(file_set), INTEGRITY, False, ERROR, "no snapshot to verify")
    reports = [verify_snapshot(locations[n], snaps[0]) for n in snaps[0].locations if n in locations]
    bad = [r.summary() for r in reports if not r.ok]
    return Outcome(
        subject(file_set),
        INTEGRITY,
        not bad and bool(reports),
        ERROR,
        "; ".join(bad)
        if bad
        else f"snapshot {snaps[0].id}: manifest and every pack read back with their checksums "
        f"on {', '.join(r.location for r in reports)}",
    )


def check_last_attempt(file_set: str, attempts: list[Record]) -> Outcome:
    done = [a for a in attempts if a.finished_at is not None or a.died()]
    if not done:
        return Outcome(subject(file_set), LAST_ATTEMPT, True, ERROR, "no snapshot attempt yet")
    last = done[0]
    if last.finished_at is None:
        return Outcome(
            subject(file_set),
            LAST_ATTEMPT,
            False,
            ERROR,
            f"snapshot attempt {last.backup_id} never finished: its process died",
        )
    return Outcome(
        subject(file_set),
        LAST_ATTEMPT,
        last.succeeded,
        ERROR,
        f"last attempt {last.backup_id} " + ("succeeded" if last.succeeded else f"FAILED: {last.error}"),
    )


def check_restore_test(file_set: str, tests: list[Record]) -> Outcome:
    if not tests:
        return Outcome(subject(file_set), RESTORE_TEST, False, WARNING, "no restore test of this file set yet")
    t = tests[0]
    return Outcome(
        subject(file_set),
        RESTORE_TEST,
        t.passed,
        ERROR,
        f"restore test of snapshot {t.backup_id} " + (f"passed (RTO {t.rto_s}s)" if t.passed else f"FAILED: {t.error}"),
        {"rto_s": t.rto_s} if t.rto_s is not None else {},
    )


def file_outcomes(
    config: DrConfig, locations: dict[str, Location], catalog: SnapshotCatalog, now: datetime, integrity: bool = False
) -> list[Outcome]:
    out = [Outcome("*", "repository_readable", False, ERROR, p) for p in catalog.problems]
    for file_set in config.file_sets:
        owner = fmt.records_owner(file_set)
        attempts = [a for a in load_reports(locations, owner, RecordKind.BACKUP_ATTEMPT) if not a.running()]
        out += [
            check_fresh(config, file_set, catalog, now),
            check_last_attempt(file_set, attempts),
            check_change_rate(config, file_set, catalog.of(file_set)),
            check_replicated(config, file_set, catalog),
            check_restore_test(file_set, load_reports(locations, owner, RecordKind.RESTORE_TEST)),
        ]
        if integrity:
            out.append(check_integrity(file_set, catalog, locations))
    return out
