"""The backup repository: the source of truth, and it describes itself.

A backup is a set of objects plus ``manifest.json`` written last on each location, as the commit
marker; a backup without its manifest does not exist. Layout on every location::

    <database>/<kind>/<backup id>/<object>          e.g. app/logical/20261123T101500Z-3fa2/dump.pgdump.zst.age
    <database>/<kind>/<backup id>/manifest.json

Listing, choosing and verifying work from any one location alone, with no Dagster instance.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import ValidationError

from dr_pipelines.core.codec.methods import CHUNK
from dr_pipelines.core.errors import DrError
from dr_pipelines.core.repository.manifest import MANIFEST, Manifest
from dr_pipelines.core.storage.base import (
    Location,
    LocationError,
    ObjectNotFound,
)


def hash_object(location: Location, key: str) -> tuple[int, str]:
    """Read an object back in full: its size and SHA-256."""
    with location.open_read(key) as f:
        h = hashlib.sha256()
        size = 0
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


class BackupNotFound(DrError, LookupError):
    pass


@dataclass
class CatalogEntry:
    manifest: Manifest
    locations: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.manifest.id


@dataclass
class Catalog:
    """Backups merged across locations (one entry per id), newest first by the manifest's time."""

    entries: list[CatalogEntry]
    problems: list[str]  # unreachable locations, unreadable manifests: reported, never fatal here

    def find(self, database: str, backup_id: str) -> CatalogEntry:
        """By id, else by label (the newest backup carrying it)."""
        for e in self.entries:
            if e.id == backup_id and e.manifest.database == database:
                return e
        for e in self.entries:  # newest first
            if e.manifest.label == backup_id and e.manifest.database == database:
                return e
        ids = [e.id for e in self.entries if e.manifest.database == database]
        # the closest by name, listed newest first (ids sort by time)
        near = sorted(difflib.get_close_matches(backup_id, ids, n=3, cutoff=0.3) or ids[:3], reverse=True)
        hint = f"; nearest: {', '.join(near)}" if near else "; there are no backups of it"
        where = f" ({'; '.join(self.problems)})" if self.problems else ""
        raise BackupNotFound(f"backup {backup_id!r} of database {database!r} not found{hint}{where}")

    def latest(self, database: str, kind: str = "logical") -> CatalogEntry:
        for e in self.entries:
            if e.manifest.database == database and e.manifest.kind == kind:
                return e
        where = f" ({'; '.join(self.problems)})" if self.problems else ""
        raise BackupNotFound(f"no {kind} backup of database {database!r} in the repository{where}")


def read_manifests(
    location: Location, database: str | None = None, kind: str | None = None, problems: list[str] | None = None
) -> list[Manifest]:
    prefix = f"{database}/" if database else ""
    if database and kind:
        prefix += f"{kind}/"
    found = []
    for obj in location.list(prefix):
        if not obj.key.endswith("/" + MANIFEST):
            continue
        try:
            m = Manifest.model_validate_json(location.get_bytes(obj.key))
        except (ValidationError, ValueError) as e:
            if problems is not None:
                problems.append(f"{location.name}: unreadable manifest {obj.key}: {str(e).splitlines()[0]}")
            continue
        except ObjectNotFound:
            continue  # deleted while listing
        if kind and m.kind != kind:
            continue
        if f"{m.prefix}/{MANIFEST}" != obj.key:
            if problems is not None:
                problems.append(f"{location.name}: manifest {obj.key} describes {m.prefix}; ignored")
            continue
        found.append(m)
    return found


def load_catalog(locations: Iterable[Location], database: str | None = None, kind: str | None = None) -> Catalog:
    by_id: dict[tuple[str, str], CatalogEntry] = {}
    problems: list[str] = []
    for loc in locations:
        try:
            manifests = read_manifests(loc, database, kind, problems)
        except LocationError as e:
            problems.append(str(e))
            continue
        for m in manifests:
            entry = by_id.setdefault((m.database, m.id), CatalogEntry(m))
            entry.locations.append(loc.name)
    entries = sorted(by_id.values(), key=lambda e: (e.manifest.created_at, e.id), reverse=True)
    return Catalog(entries, problems)


@dataclass
class ObjectCheck:
    name: str
    ok: bool
    detail: str


@dataclass
class VerifyReport:
    backup_id: str
    location: str
    checks: list[ObjectCheck]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def summary(self) -> str:
        bad = [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]
        if not bad:
            return f"{self.backup_id} on {self.location}: OK ({len(self.checks)} objects, checksums match)"
        return f"{self.backup_id} on {self.location}: FAILED: " + "; ".join(bad)


def verify_backup(location: Location, manifest: Manifest) -> VerifyReport:
    """Read every object back and compare its size and SHA-256 with the manifest."""
    checks = []
    for obj in manifest.objects:
        key = manifest.object_key(obj.name)
        try:
            size, digest = hash_object(location, key)
        except ObjectNotFound:
            checks.append(ObjectCheck(obj.name, False, "missing"))
            continue
        except LocationError as e:
            checks.append(ObjectCheck(obj.name, False, f"unreadable: {e}"))
            continue
        if size != obj.size:
            checks.append(ObjectCheck(obj.name, False, f"size {size} bytes, manifest says {obj.size}"))
        elif digest != obj.sha256:
            checks.append(ObjectCheck(obj.name, False, f"SHA-256 {digest[:16]}..., manifest says {obj.sha256[:16]}..."))
        else:
            checks.append(ObjectCheck(obj.name, True, "ok"))
    return VerifyReport(manifest.id, location.name, checks)


def catalog_markdown(entries: list[CatalogEntry], tested: dict[str, bool], limit: int = 20) -> str:
    """A database's backups, newest first, as the UI shows them: the id to paste into a restore, when,
    how big, where, and whether a restore of it was proven (`tested`: backup id -> the test passed)."""
    from dr_pipelines.core.units import human_size

    if not entries:
        return "no backup in the repository yet"
    lines = [
        "| backup id (paste into `backup`) | kind | label | created (UTC) | size | locations | restore test |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries[:limit]:
        m = e.manifest
        proof = {True: "passed", False: "FAILED"}[tested[e.id]] if e.id in tested else "-"
        lines.append(
            f"| `{m.id}` | {m.kind} | {m.label or ''} | {m.created_at:%Y-%m-%d %H:%M:%S} | {human_size(m.size_bytes)} "
            f"| {', '.join(e.locations)} | {proof} |"
        )
    if len(entries) > limit:
        lines.append(f"\n{len(entries) - limit} older backups: `dr-pipelines backups list`")
    return "\n".join(lines)
