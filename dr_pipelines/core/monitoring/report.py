"""The compliance report: what the DR system actually achieved over the last N days, from the
repository alone (backups, backup attempts, restore tests), built with pandas.

Per database and kind: attempts and success rate, the RPO actually achieved (the largest gap
between consecutive recovery points, up to now), RTO from restore tests against the objective,
restore-test frequency and pass rate; storage per location; recommendations. Stored on every
location as JSON, HTML and Markdown under `compliance/`.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from datetime import datetime, timedelta

import pandas as pd

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.monitoring.health import Health
from dr_pipelines.core.repository.records import Record
from dr_pipelines.core.storage.base import Location, LocationError


@dataclass
class ComplianceReport:
    generated_at: datetime
    days: int
    summary: pd.DataFrame  # one row per database and kind
    storage: pd.DataFrame  # one row per location
    recommendations: list[str]
    system: dict | None = None  # the whole system: drills and real recoveries against its objectives

    def to_dict(self) -> dict:
        return {
            "system": self.system,
            "generated_at": self.generated_at.isoformat(),
            "days": self.days,
            "summary": json.loads(self.summary.to_json(orient="records") or "[]"),
            "storage": json.loads(self.storage.to_json(orient="records") or "[]"),
            "recommendations": self.recommendations,
        }

    def to_markdown(self) -> str:
        recs = "\n".join(f"- {r}" for r in self.recommendations) or "- none: every objective was met"
        return (
            f"# DR compliance report, last {self.days} days ({self.generated_at:%Y-%m-%d %H:%M} UTC)\n\n"
            f"{self.summary.to_markdown(index=False)}\n\n## Storage per location\n\n"
            f"{self.storage.to_markdown(index=False)}\n\n## Whole system\n\n{_system_markdown(self.system)}\n\n"
            f"## Recommendations\n\n{recs}\n"
        )

    def to_html(self) -> str:
        recs = "".join(f"<li>{html.escape(r)}</li>" for r in self.recommendations) or "<li>none</li>"
        title = f"DR compliance report, last {self.days} days ({self.generated_at:%Y-%m-%d %H:%M} UTC)"
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<h1>{title}</h1>{self.summary.to_html(index=False)}<h2>Storage per location</h2>"
            f"{self.storage.to_html(index=False)}<h2>Recommendations</h2><ul>{recs}</ul></body></html>"
        )


def _system_markdown(system: dict | None) -> str:
    if not system:
        return "no whole-system figures"
    return "\n".join(f"- {k.replace('_', ' ')}: {v}" for k, v in system.items())


def system_section(config: DrConfig, h: Health, start: datetime, recs: list[str]) -> dict:
    """Drills of the whole system and every real recovery (restores, PITRs, scenarios) in the window:
    success rate and RTO, against the whole system's objectives."""
    rec = config.recovery

    def window(records: list[Record]) -> list[Record]:
        return [r for r in records if datetime.fromisoformat(r.started_at) >= start and r.finished_at]

    drills = window(h.recoveries.get("drill", []))
    real = [r for kind in ("restore", "pitr", "system") for r in window(h.recoveries.get(kind, []))]
    real_rto = pd.Series([r.rto_s for r in real if r.rto_s is not None], dtype=float)
    drill_rto = pd.Series([r.rto_s for r in drills if r.rto_s is not None], dtype=float)
    losses = [(r.model_extra or {}).get("data_loss_s") for r in drills]
    losses = [x for x in losses if x is not None]
    out = {
        "rto_objective_s": rec.rto.total_seconds(),
        "rpo_objective_s": rec.rpo.total_seconds(),
        "drills": len(drills),
        "drill_pass_rate_pct": round(100 * sum(d.passed for d in drills) / len(drills), 1) if drills else None,
        "drill_rto_max_s": round(float(drill_rto.max()), 1) if len(drill_rto) else None,
        "drill_data_loss_max_s": round(max(losses), 1) if losses else None,
        "recoveries": len(real),
        "recovery_success_rate_pct": round(100 * sum(r.passed for r in real) / len(real), 1) if real else None,
        "recovery_rto_median_s": round(float(real_rto.median()), 1) if len(real_rto) else None,
        "recovery_rto_max_s": round(float(real_rto.max()), 1) if len(real_rto) else None,
    }
    out["rto_met"] = bool(len(drill_rto)) and float(drill_rto.max()) <= rec.rto.total_seconds()
    out["rpo_met"] = bool(losses) and max(losses) <= rec.rpo.total_seconds()
    if (config.file_sets or config.services) and rec.drill_enabled and not drills:
        recs.append("no full-system drill in the window: run `dr-pipelines recover drill` or enable its schedule")
    elif drills and not out["rto_met"]:
        recs.append(
            f"the whole-system drill took {out['drill_rto_max_s']} s, over the RTO {out['rto_objective_s']:.0f} s"
        )
    return out


def _gaps(points: list[datetime], start: datetime, now: datetime) -> float | None:
    """Largest gap (s) between consecutive recovery points in [start, now]; the last point counts
    up to now (data written since is at risk). The newest point before the window anchors it."""
    before = [p for p in points if p < start]
    inside = sorted(p for p in points if p >= start)
    series = ([max(before)] if before else []) + inside
    if not series:
        return None
    edges = pd.Series(series + [now])
    return float(edges.diff().dropna().max().total_seconds())


def _row(
    db: str,
    kind: str,
    objectives: tuple[float, float],  # RPO and RTO, seconds
    backup_times: list[datetime],
    all_attempts: list[Record],
    all_tests: list[Record],
    points: list[datetime],
    start: datetime,
    now: datetime,
    days: int,
    recs: list[str],
) -> dict:
    rpo, rto = objectives
    attempt_kind = {"logical": "logical", "snapshot": "snapshot"}.get(kind, "base")
    attempts = pd.DataFrame(
        [
            a.model_dump()
            for a in all_attempts
            if (a.kind or "logical") == attempt_kind and datetime.fromisoformat(a.started_at) >= start
        ],
        columns=pd.Index(["started_at", "succeeded"]),
    )
    tests = pd.DataFrame(
        [t.model_dump() for t in all_tests if datetime.fromisoformat(t.started_at) >= start],
        columns=pd.Index(["started_at", "passed", "rto_s"]),
    )
    attempted = len(attempts)
    succeeded = int(attempts["succeeded"].astype(bool).sum()) if attempted else 0
    in_window = sum(t >= start for t in backup_times)
    if attempted == 0:  # backups taken before attempts were recorded still count as successes
        attempted = succeeded = in_window
    rpo_achieved = _gaps(points, start, now)
    rtos = tests["rto_s"].dropna().astype(float)
    r = {
        "database": db,
        "kind": kind,
        "backups": in_window,
        "attempted": attempted,
        "succeeded": succeeded,
        "success_rate_pct": round(100 * succeeded / attempted, 1) if attempted else None,
        "rpo_objective_s": rpo,
        "rpo_achieved_s": None if rpo_achieved is None else round(rpo_achieved),
        "rpo_met": rpo_achieved is not None and rpo_achieved <= rpo,
        "restore_tests": len(tests),
        "restore_test_pass_rate_pct": round(100 * tests["passed"].astype(bool).mean(), 1) if len(tests) else None,
        "restore_tests_per_week": round(len(tests) / (days / 7), 2),
        "rto_objective_s": rto,
        "rto_min_s": round(rtos.min(), 1) if len(rtos) else None,
        "rto_median_s": round(rtos.median(), 1) if len(rtos) else None,
        "rto_max_s": round(rtos.max(), 1) if len(rtos) else None,
        "rto_met": bool(len(rtos)) and rtos.max() <= rto,
    }
    test_name = "PITR drill" if kind == "base+wal" else "restore test"
    if rpo_achieved is None:
        recs.append(f"{db}: no {kind} backup at all; schedule them now")
    elif not r["rpo_met"]:
        recs.append(
            f"{db} ({kind}): achieved RPO {rpo_achieved / 3600:.1f} h misses the objective {rpo / 60:.0f} min"
            + (
                "; logical backups alone cannot meet it: archive WAL for point-in-time recovery, or back up more often"
                if kind == "logical"
                else "; check archive_command and archive_timeout"
            )
        )
    if attempted and succeeded < attempted:
        recs.append(
            f"{db}: {attempted - succeeded} of {attempted} {kind} backup attempts failed; "
            "read the failed runs and fix the cause"
        )
    if not len(tests):
        recs.append(f"{db}: no {test_name} in {days} days; enable its schedule")
    elif r["restore_test_pass_rate_pct"] < 100:
        recs.append(
            f"{db}: {test_name}s failed ({r['restore_test_pass_rate_pct']}% passed); "
            "a backup that does not restore is not a backup"
        )
    if len(rtos) and not r["rto_met"]:
        recs.append(
            f"{db} ({kind}): slowest restore {rtos.max():.0f} s exceeds the RTO {rto:.0f} s; "
            "raise restore parallelism or the objective"
        )
    return r


def build_report(config: DrConfig, h: Health, days: int) -> ComplianceReport:
    if days < 1:
        raise ValueError("the report covers at least 1 day (--days N, N >= 1)")
    now = h.now
    start = now - timedelta(days=days)
    rows: list[dict] = []
    recs: list[str] = []
    for db in config.databases:
        cfg = config.database(db)
        logical = [e for e in h.catalog.entries if e.manifest.database == db and e.manifest.kind == "logical"]
        # recovery points: every successful attempt (records survive retention, which thins the
        # backups themselves) and every backup still held
        points = sorted(
            {e.manifest.created_at for e in logical}
            | {
                datetime.fromisoformat(a.started_at)
                for a in h.attempts.get(db, [])
                if a.succeeded and (a.kind or "logical") == "logical"
            }
        )
        objectives = (cfg.objectives.rpo.total_seconds(), cfg.objectives.rto.total_seconds())
        rows.append(
            _row(
                db,
                "logical",
                objectives,
                [e.manifest.created_at for e in logical],
                h.attempts.get(db, []),
                h.restore_tests.get(db, []),
                points,
                start,
                now,
                days,
                recs,
            )
        )
        if db in h.wal:  # base backups + WAL: every archived segment is a recovery point after the first base
            bases = [e for e in h.catalog.entries if e.manifest.database == db and e.manifest.kind == "base"]
            first = min((e.manifest.created_at for e in bases), default=None)
            points = sorted(
                {e.manifest.created_at for e in bases} | {t for t in h.wal[db].push_times if first and t >= first}
            )
            rows.append(
                _row(
                    db,
                    "base+wal",
                    objectives,
                    [e.manifest.created_at for e in bases],
                    h.attempts.get(db, []),
                    h.pitr_tests.get(db, []),
                    points,
                    start,
                    now,
                    days,
                    recs,
                )
            )
    snaps = h.snapshots.entries if h.snapshots else []
    for file_set, fs in config.file_sets.items():
        subject = f"files/{file_set}"
        times = [e.index.created_at for e in snaps if e.index.file_set == file_set]
        points = sorted(
            set(times) | {datetime.fromisoformat(a.started_at) for a in h.attempts.get(subject, []) if a.succeeded}
        )
        objectives = (fs.rpo(now).total_seconds(), fs.objectives.rto.total_seconds())
        rows.append(
            _row(
                subject,
                "snapshot",
                objectives,
                times,
                h.attempts.get(subject, []),
                h.restore_tests.get(subject, []),
                points,
                start,
                now,
                days,
                recs,
            )
        )
    storage = pd.DataFrame(
        [
            {
                "location": name,
                "backups": sum(name in e.locations for e in h.catalog.entries),
                "bytes": sum(e.manifest.size_bytes for e in h.catalog.entries if name in e.locations),
                **(
                    {"snapshots": sum(name in e.locations for e in snaps)} if config.file_sets else {}
                ),  # (their packs are shared: `snapshots list` says what each one added)
            }
            for name in config.locations
        ]
    )
    for _, s in storage.iterrows():
        if s["backups"] < storage["backups"].max():
            recs.append(
                f"location {s['location']} holds {s['backups']} backups, fewer than the others: "
                "it missed some; check it and back up again"
            )
    for p in h.catalog.problems:
        recs.append(f"repository problem: {p}")
    system = system_section(config, h, start, recs)
    return ComplianceReport(now, days, pd.DataFrame(rows), storage, recs, system)


def store_report(locations: dict[str, Location], report: ComplianceReport) -> dict[str, list[str]]:
    """JSON, HTML and Markdown copies on every location; returns key -> locations holding it."""
    stamp = report.generated_at.strftime("%Y%m%dT%H%M%SZ")
    copies = {
        f"compliance/{stamp}.json": json.dumps(report.to_dict(), indent=2).encode(),
        f"compliance/{stamp}.html": report.to_html().encode(),
        f"compliance/{stamp}.md": report.to_markdown().encode(),
    }
    stored: dict[str, list[str]] = {k: [] for k in copies}
    for name, loc in locations.items():
        for key, data in copies.items():
            try:
                loc.put_bytes(key, data)
                stored[key].append(name)
            except LocationError:
                break
    return stored
