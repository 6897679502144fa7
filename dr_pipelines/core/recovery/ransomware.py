"""Ransomware recovery (SongNodes "Security breach / ransomware"): quarantine what the attacker left,
choose the last known good point (before the incident minus a margin, restore-tested, with a normal
change rate), restore it into fresh targets only, and report what changed and which credentials to
rotate, without printing a secret."""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.files import format as fmt
from dr_pipelines.core.files.catalog import SnapshotEntry, load_snapshots
from dr_pipelines.core.files.health import check_change_rate
from dr_pipelines.core.files.restore import diff_snapshots
from dr_pipelines.core.log import Log
from dr_pipelines.core.postgres.client import libpq_env, pg_tool
from dr_pipelines.core.recovery.plan import Judge
from dr_pipelines.core.repository.catalog import CatalogEntry
from dr_pipelines.core.repository.records import RecordKind, load_reports
from dr_pipelines.core.storage.base import Location


@dataclass
class Incident:
    at: datetime  # when the attack began (or the detection time minus the look-back)
    databases: list[str]
    file_sets: list[str]
    margin: timedelta

    @property
    def last_good_before(self) -> datetime:
        return self.at - self.margin


def incident_time(at: datetime | None, lookback: timedelta | None) -> datetime:
    if at is not None:
        return at
    return datetime.now(timezone.utc) - (lookback if lookback is not None else timedelta(hours=24))


def judge_last_good(config: DrConfig, locations: dict[str, Location]) -> Judge:
    """A point is good only if a restore of it was proven (restore test, PITR drill) and, for files,
    its change rate was normal: mass encryption shows as a change far above the usual."""
    proven: dict[tuple, set[str]] = {}

    def proven_ids(owner: str, *kinds: RecordKind) -> set[str]:
        if (owner, kinds) not in proven:
            proven[(owner, kinds)] = {
                r.backup_id for k in kinds for r in load_reports(locations, owner, k) if r.passed and r.backup_id
            }
        return proven[(owner, kinds)]

    snapshots: dict[str, list[SnapshotEntry]] = {}

    def judge(component: str, candidate: object) -> str | None:
        if isinstance(candidate, CatalogEntry):
            kinds = (RecordKind.RESTORE_TEST,) if candidate.manifest.kind == "logical" else (RecordKind.PITR_TEST,)
            if candidate.id not in proven_ids(component, *kinds):
                return (
                    "no passed restore test of it"
                    if candidate.manifest.kind == "logical"
                    else "no passed PITR drill from it"
                )
            return None
        assert isinstance(candidate, SnapshotEntry)
        if candidate.id not in proven_ids(fmt.records_owner(component), RecordKind.RESTORE_TEST):
            return "no passed restore test of it"
        snaps = snapshots.setdefault(component, load_snapshots(locations, component).of(component))
        ids = [s.id for s in snaps]
        rate = check_change_rate(config, component, snaps[ids.index(candidate.id) :])
        if not rate.passed:
            return f"abnormal change rate ({rate.description})"
        return None

    return judge


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _tar(paths: list[Path], out: Path) -> str | None:
    """A tar of the paths as they are (a live data directory changes while read: tar's exit 1 is fine)."""
    existing = [str(p) for p in paths if p.exists()]
    if not existing:
        return "nothing there to capture"
    proc = subprocess.run(
        ["tar", "--create", "--file", str(out), "--absolute-names", "--warning=no-file-changed", *existing],
        capture_output=True,
        text=True,
    )
    if proc.returncode not in (0, 1):
        return f"tar exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
    return None


@dataclass
class Quarantine:
    path: str
    captured: dict[str, dict] = field(default_factory=dict)  # file name -> {sha256, bytes, of}
    not_captured: dict[str, str] = field(default_factory=dict)  # component -> why


def quarantine(config: DrConfig, incident: Incident, log: Log) -> Quarantine:
    """Capture the compromised data (files, data directory and server logs, or a dump) before anything
    else, hashed, read-only, outside the repository: never restored from, never touched by retention."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    root = config.recovery.resolved(config.recovery.quarantine_dir, config.base_dir) / f"incident-{stamp}"
    root.mkdir(parents=True, mode=0o700)
    q = Quarantine(str(root))
    jobs: list[tuple[str, str, list[Path]]] = []
    for name in incident.file_sets:
        jobs.append((f"files-{name}.tar", f"files/{name}", config.file_set(name).resolved_paths(config.base_dir)))
    for name in incident.databases:
        db = config.database(name)
        if db.pgdata and Path(db.pgdata).exists():
            jobs.append((f"database-{name}-pgdata.tar", f"database/{name}", [Path(db.pgdata)]))
            continue
        out = root / f"database-{name}.pgdump"  # no data directory here: what the server still serves
        env = libpq_env(db, name)
        proc = subprocess.run(
            [pg_tool("pg_dump", db), "--format=custom", "--no-password", f"--file={out}", db.dbname],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode == 0:
            q.captured[out.name] = {"sha256": _sha256(out), "bytes": out.stat().st_size, "of": f"database/{name}"}
        else:
            q.not_captured[f"database/{name}"] = f"pg_dump failed: {proc.stderr.strip()[-300:]}"
    for file_name, component, paths in jobs:
        out = root / file_name
        why = _tar(paths, out)
        if why:
            q.not_captured[component] = why
            out.unlink(missing_ok=True)
            continue
        q.captured[file_name] = {"sha256": _sha256(out), "bytes": out.stat().st_size, "of": component}
    import json

    (root / "SHA256SUMS").write_text("".join(f"{v['sha256']}  {k}\n" for k, v in sorted(q.captured.items())))
    (root / "quarantine.json").write_text(json.dumps({"incident_at": incident.at.isoformat(), **q.__dict__}, indent=2))
    for p in root.iterdir():
        os.chmod(p, 0o400)
    os.chmod(root, 0o500)
    log(
        f"quarantined {len(q.captured)} captures into {root}"
        + (f"; not captured: {q.not_captured}" if q.not_captured else "")
    )
    return q


def what_changed(config: DrConfig, locations: dict[str, Location], file_set: str, good: str) -> dict:
    """The last good snapshot against the newest (the compromised state as the repository last saw it).
    A secrets set gives counts only: its file names are never written out."""
    snaps = load_snapshots(locations, file_set).of(file_set)
    if not snaps or snaps[0].id == good:
        return {"against": None, "added": 0, "removed": 0, "changed": 0}
    diff = diff_snapshots(config, locations, file_set, good, snaps[0].id)
    out: dict = {
        "against": diff.newer,
        "added": len(diff.added),
        "removed": len(diff.removed),
        "changed": len(diff.changed),
    }
    if not config.file_set(file_set).secrets:
        out["paths"] = {
            "added": diff.added[:50],
            "removed": diff.removed[:50],
            "changed": [f"{p} ({what})" for p, what in diff.changed[:50]],
        }
    return out


def rotation_checklist(config: DrConfig, incident: Incident) -> list[str]:
    """Which credentials to rotate: named, never shown."""
    items = []
    for name in incident.databases:
        db = config.database(name)
        items.append(
            f"database {name}: change the password of role {db.user!r}"
            + (f" (held in ${db.password_env})" if db.password_env else "")
            + " and of every login role of the restored database; revoke sessions and API tokens stored in it"
        )
    for name, fs in config.file_sets.items():
        if fs.secrets:
            items.append(
                f"file set {name} holds secrets: replace every credential in it (keys, certificates, tokens); "
                "assume they were read"
            )
    for name, loc in config.locations.items():
        for attr in ("access_key_id_env", "secret_access_key_env"):
            var = getattr(loc, attr, None)
            if var:
                items.append(f"location {name}: rotate the key in ${var} (the backup host's own credentials)")
                break
    if config.encryption.method == "age":
        items.append(
            "if the age identity that decrypts backups was on the compromised host, make a new one, add its "
            "recipient, and re-encrypt or retire what only the old one opens"
        )
    return items
