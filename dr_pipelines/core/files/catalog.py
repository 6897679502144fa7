"""Snapshots in the repository, merged across locations, and their verification.

A snapshot exists where its manifest exists (written last). Listing reads only the plaintext
indexes, so it needs no identity and works from any one surviving location."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from datetime import datetime

from dr_pipelines.core.errors import DrError
from dr_pipelines.core.files import format as fmt
from dr_pipelines.core.files.snapshot import SnapshotIndex
from dr_pipelines.core.repository.catalog import hash_object
from dr_pipelines.core.storage.base import Location, LocationError, ObjectNotFound


class SnapshotNotFound(DrError, LookupError):
    pass


@dataclass
class SnapshotEntry:
    index: SnapshotIndex
    locations: list[str] = field(default_factory=list)
    manifest_keys: dict[str, str] = field(default_factory=dict)  # location -> key of the manifest there
    pinned: bool = False

    @property
    def id(self) -> str:
        return self.index.id


@dataclass
class SnapshotCatalog:
    entries: list[SnapshotEntry]  # newest first
    problems: list[str]

    def of(self, file_set: str) -> list[SnapshotEntry]:
        return [e for e in self.entries if e.index.file_set == file_set]

    def find(self, file_set: str, snapshot_id: str) -> SnapshotEntry:
        for e in self.of(file_set):
            if e.id == snapshot_id:
                return e
        ids = [e.id for e in self.of(file_set)]
        # the closest by name, listed newest first (ids sort by time)
        near = sorted(difflib.get_close_matches(snapshot_id, ids, n=3, cutoff=0.3) or ids[:3], reverse=True)
        hint = f"; nearest: {', '.join(near)}" if near else "; there are no snapshots of it"
        raise SnapshotNotFound(f"snapshot {snapshot_id!r} of file set {file_set!r} not found{hint}{self._where()}")

    def latest(self, file_set: str, before: datetime | None = None) -> SnapshotEntry:
        for e in self.of(file_set):
            if before is None or e.index.created_at <= before:
                return e
        when = f" taken before {before.isoformat()}" if before else ""
        raise SnapshotNotFound(f"no snapshot of file set {file_set!r}{when} in the repository{self._where()}")

    def _where(self) -> str:
        return f" ({'; '.join(self.problems)})" if self.problems else ""


def load_snapshots(locations: dict[str, Location], file_set: str | None = None) -> SnapshotCatalog:
    by_id: dict[tuple[str, str], SnapshotEntry] = {}
    problems: list[str] = []
    prefix = f"{fmt.set_prefix(file_set)}/" if file_set else f"{fmt.SETS}/"
    for name, loc in locations.items():
        try:
            objs = list(loc.list(prefix))
        except LocationError as e:
            problems.append(str(e))
            continue
        keys = {o.key for o in objs}
        for key in sorted(keys):
            parsed = fmt.parse_snapshot_key(key)
            if parsed is None or not parsed[2].startswith(fmt.MANIFEST_NAME):
                continue
            file_set_name, snapshot_id, _ = parsed
            index_key = fmt.index_key(file_set_name, snapshot_id)
            try:
                index = SnapshotIndex.model_validate_json(loc.get_bytes(index_key))
            except ObjectNotFound:
                problems.append(f"{name}: snapshot {file_set_name}/{snapshot_id} has a manifest but no index")
                continue
            except (LocationError, ValueError) as e:
                problems.append(f"{name}: unreadable index {index_key}: {str(e).splitlines()[0]}")
                continue
            if (index.file_set, index.id) != (file_set_name, snapshot_id):
                problems.append(f"{name}: index {index_key} describes {index.file_set}/{index.id}; ignored")
                continue
            entry = by_id.setdefault((index.file_set, index.id), SnapshotEntry(index))
            entry.locations.append(name)
            entry.manifest_keys[name] = key
            entry.pinned |= f"{fmt.snapshot_prefix(file_set_name, snapshot_id)}/{fmt.PIN}" in keys
    entries = sorted(by_id.values(), key=lambda e: (e.index.created_at, e.id), reverse=True)
    return SnapshotCatalog(entries, problems)


@dataclass
class SnapshotVerify:
    snapshot_id: str
    location: str
    bad: list[str]
    checked: int

    @property
    def ok(self) -> bool:
        return not self.bad and self.checked > 0

    def summary(self) -> str:
        if self.ok:
            return f"{self.snapshot_id} on {self.location}: OK ({self.checked} objects, checksums match)"
        return (
            f"{self.snapshot_id} on {self.location}: FAILED: "
            + "; ".join(self.bad[:10])
            + (f" (+{len(self.bad) - 10} more)" if len(self.bad) > 10 else "")
        )


def verify_snapshot(location: Location, entry: SnapshotEntry) -> SnapshotVerify:
    """Read the manifest and every pack back: no identity needed (a pack's id is its SHA-256)."""
    index = entry.index
    bad, checked = [], 0
    encrypted = index.encryption.get("method") == "age"
    key = entry.manifest_keys.get(location.name) or fmt.manifest_key(index.file_set, index.id, encrypted)
    objects = [
        (key, index.manifest_size, index.manifest_sha256, "manifest"),
        (
            fmt.chunks_key(index.file_set, index.id),
            index.chunks_count * fmt.CHUNK_RECORD,
            index.chunks_sha256,
            "chunk list",
        ),
    ]
    objects += [
        (fmt.pack_key(p, encrypted), size, p, f"pack {p[:16]}")
        for p, size in zip(index.packs, index.pack_sizes, strict=True)
    ]
    for obj_key, size, sha, what in objects:
        checked += 1
        try:
            got_size, got_sha = hash_object(location, obj_key)
        except ObjectNotFound:
            bad.append(f"{what}: missing")
            continue
        except LocationError as e:
            bad.append(f"{what}: unreadable: {e}")
            continue
        if got_sha != sha or (size and got_size != size):
            bad.append(f"{what}: SHA-256 {got_sha[:16]}..., expected {sha[:16]}... (corrupt)")
    return SnapshotVerify(index.id, location.name, bad, checked)
