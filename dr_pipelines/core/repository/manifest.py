"""The manifest: the JSON written last, on every location, as a backup's commit marker."""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from dr_pipelines.core.storage.base import Location

MANIFEST = "manifest.json"


MANIFEST_FORMAT = 1


class ManifestObject(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    size: int
    sha256: str


class BaseBackupFacts(BaseModel):
    """What a physical base backup records about its WAL (stored as the manifest's `extra`)."""

    model_config = ConfigDict(extra="allow")
    timeline: int
    start_lsn: str
    stop_lsn: str
    ranges: list[dict[str, Any]] = []
    stopped_at: datetime
    segment_size: int
    wal_start: str  # the first segment the backup needs
    wal_stop: str  # the last segment it needs to be consistent
    backup_label: str = ""
    next_xid_after: str | None = None  # an xid assigned after the backup ended


class Manifest(BaseModel):
    """What a backup is. Never holds a secret: encryption is named by recipient fingerprints."""

    model_config = ConfigDict(extra="ignore")
    format_version: int = MANIFEST_FORMAT
    id: str
    kind: Literal["logical", "base"]
    database: str
    dbname: str
    created_at: datetime
    finished_at: datetime
    duration_s: float
    server_version: str
    system_identifier: str | None = None
    tool: str
    tool_version: str
    dump_format: str | None = None
    compression: dict[str, Any]
    encryption: dict[str, Any]
    objects: list[ManifestObject]
    uncompressed_bytes: int
    tables: dict[str, int] = {}  # rows
    table_bytes: dict[str, int] = {}  # on disk at backup time (a restore's loaders share tables by it)
    schema_fingerprint: str | None = None
    producer: str = "dr_pipelines"
    extra: dict[str, Any] = {}
    label: str | None = None  # given when it was taken (e.g. pre-migration): shown in lists, usable to pick it

    @property
    def base(self) -> BaseBackupFacts:
        """The WAL facts of a base backup (kind "base")."""
        return BaseBackupFacts.model_validate(self.extra)

    @property
    def prefix(self) -> str:
        return backup_prefix(self.database, self.kind, self.id)

    @property
    def size_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    def object_key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True).encode() + b"\n"


def new_backup_id(now: datetime) -> str:
    """Sortable and unique: UTC time to the second plus 4 random hex digits."""
    return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)


def backup_prefix(database: str, kind: str, backup_id: str) -> str:
    return f"{database}/{kind}/{backup_id}"


def write_manifest(location: Location, manifest: Manifest) -> None:
    location.put_bytes(manifest.object_key(MANIFEST), manifest.to_json())
