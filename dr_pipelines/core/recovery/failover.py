"""Cross-region failover: every location is probed; the first reachable one, in config order, that holds a
recovery point covering the request is the one the system is rebuilt from, alone. What that costs is
measured against the newest point any reachable location holds.

Also here: how far each location lags behind the first (the primary), per database and file set, for
the asset check that says a failover would lose more than the RPO.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.files.catalog import load_snapshots
from dr_pipelines.core.log import Log
from dr_pipelines.core.recovery.plan import PlanRequest, RecoveryPlan, RecoveryRefused, make_plan
from dr_pipelines.core.repository.catalog import load_catalog
from dr_pipelines.core.storage.base import Location
from dr_pipelines.core.storage.probe import probe
from dr_pipelines.core.wal.archive import list_archive


def newest_point(config: DrConfig, location: dict[str, Location], kind: str, name: str) -> datetime | None:
    """The newest moment a location can bring a component back to: a database's newest backup end or
    archived WAL segment, a file set's newest snapshot."""
    if kind == "files":
        snaps = load_snapshots(location, name).of(name)
        return snaps[0].index.created_at if snaps else None
    times = [
        e.manifest.finished_at for e in load_catalog(location.values(), name).entries if e.manifest.database == name
    ]
    archive = list_archive(location, name)
    times += [f.pushed_at for f in archive.files.values() if f.kind == "segment"]
    return max(times) if times else None


def choose_failover(config: DrConfig, locations: dict[str, Location], request: PlanRequest, log: Log) -> RecoveryPlan:
    answers = probe(locations)
    tried: dict[str, str] = {}
    plan = None
    for name, loc in locations.items():
        if answers[name] is not None:
            tried[name] = f"down ({answers[name]})"
            log(f"failover: {name} does not answer: {answers[name]}")
            continue
        try:
            plan = make_plan(config, {name: loc}, "cross_region_failover", replace(request, locations=[name]), log)
        except RecoveryRefused as e:
            tried[name] = f"reachable, but holds no recovery point covering the request ({e})"
            log(f"failover: {name}: {tried[name]}")
            continue
        break
    if plan is None:
        raise RecoveryRefused(
            "no reachable location holds a recovery point covering the request; nothing was touched:\n  - "
            + "\n  - ".join(f"{n}: {why}" for n, why in tried.items())
        )
    chosen = plan.locations[0]
    for name in locations:
        if name not in tried and name != chosen:
            tried[name] = (
                f"down ({answers[name]})"
                if answers[name] is not None
                else "reachable, not needed (an earlier location in config order covers the request)"
            )
    plan.left_out = tried
    region = getattr(config.locations[chosen], "region", None)
    plan.notes.append(
        f"failover to location {chosen} (region {region or 'not set'}), the first in config order that answers and covers the request"
    )
    # what this location lacks compared with the newest point any reachable location holds
    up = {n: loc for n, loc in locations.items() if answers[n] is None}
    for kind, names in (
        ("database", [d.database for d in plan.databases]),
        ("files", [f.file_set for f in plan.file_sets]),
    ):
        for name in names:
            here = newest_point(config, {chosen: locations[chosen]}, kind, name)
            best = max((t for n in up if (t := newest_point(config, {n: up[n]}, kind, name))), default=None)
            if here and best and best > here:
                plan.notes.append(
                    f"{kind} {name}: location {chosen} is {(best - here).total_seconds():.0f} s behind the newest "
                    f"point a reachable location holds ({best.isoformat()}): that much more may be lost"
                )
    down = [n for n in locations if answers[n] is not None]
    if down:
        plan.notes.append(f"the newest points of {', '.join(down)} are unknown (down): they may hold more")
    return plan


@dataclass
class Lag:
    component: str  # database NAME / files NAME
    location: str
    behind_s: float | None  # None: it holds nothing of the component (or `unknown` says why not known)
    primary: str
    limit_s: float
    unknown: str | None = None  # a location did not answer: the lag cannot be known, which is no pass

    @property
    def ok(self) -> bool:
        return self.unknown is None and self.behind_s is not None and self.behind_s <= self.limit_s


def secondary_lag(config: DrConfig, locations: dict[str, Location], now: datetime) -> list[Lag]:
    """How far each secondary location is behind the first configured one, per database and file set,
    against that component's RPO: a failover to it would lose at least that much."""
    names = list(locations)
    if len(names) < 2:
        return []
    primary = names[0]
    out = []
    components = [("database", d, config.databases[d].objectives.rpo) for d in config.databases]
    components += [("files", f, config.file_sets[f].rpo(now)) for f in config.file_sets]
    down = {n: why for n, why in probe(locations).items() if why}
    for kind, name, rpo in components:
        component, limit = f"{kind} {name}", rpo.total_seconds()
        if primary in down:
            out += [Lag(component, o, None, primary, limit, f"{primary} does not answer") for o in names[1:]]
            continue
        head = newest_point(config, {primary: locations[primary]}, kind, name)
        if head is None:
            continue
        for other in names[1:]:
            if other in down:
                out.append(Lag(component, other, None, primary, limit, f"{other} does not answer"))
                continue
            t = newest_point(config, {other: locations[other]}, kind, name)
            behind = None if t is None else max(0.0, (head - t).total_seconds())
            out.append(Lag(component, other, behind, primary, limit))
    return out
