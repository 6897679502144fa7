"""Choose a backup and stream its first valid copy into a sink, falling back to older backups for `latest`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dr_pipelines.core.codec.decode import DecodeFailed, HashingReader, decode_into
from dr_pipelines.core.codec.keys import identity_fingerprints, load_identities
from dr_pipelines.core.codec.methods import CHUNK, methods_from_name
from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.log import Log
from dr_pipelines.core.repository.catalog import Catalog, CatalogEntry, load_catalog
from dr_pipelines.core.repository.manifest import Manifest, ManifestObject
from dr_pipelines.core.restore.request import (
    BackupUnusable,
    RestoreError,
    RestoreRequest,
)
from dr_pipelines.core.storage.base import Location, LocationError

if TYPE_CHECKING:  # the sinks live beside pg_restore, which uses this module's results
    from dr_pipelines.core.restore.pg_restore import Sink


@dataclass
class Fetched:
    manifest: Manifest | None
    location: str | None
    fallback_reasons: list[str] = field(default_factory=list)
    location_failures: list[str] = field(default_factory=list)


class _WhileTaken:
    """The stored bytes, read only while the sink still takes them: a loader that failed (say, the
    schema refused on a new server that lacks a role) stops the restore at once, not once the whole
    dump has been fetched and decoded."""

    def __init__(self, src: HashingReader, sink: Sink):
        self._src, self._sink = src, sink

    def read(self, size: int = -1) -> bytes:
        if (failed := self._sink.failure()) is not None:
            raise failed
        return self._src.read(size)


def _stream_object(
    src: HashingReader,
    expected: ManifestObject | None,
    where: str,
    sink: Sink,
    compression: str,
    encrypted: bool,
    identities: list | None,
    log: Log,
) -> None:
    """Decode `src` into `sink`; commit the sink only if the object matches its checksum."""
    try:
        decode_into(_WhileTaken(src, sink), sink, compression, encrypted, identities, sink.decoder_niceness)
        while src.read(CHUNK):  # anything after the encrypted payload still counts
            pass
    except BaseException as e:
        failed = sink.failure()  # the sink's own failure: it stopped the decoding if it is `e`
        # age authenticates each chunk before it decrypts it: what a loader read of an encrypted
        # object was the backup's, so its failure is not corruption; otherwise the checksum tells
        authentic = e is failed and encrypted
        if not isinstance(e, LocationError) and not authentic:
            try:  # read to the end: the checksum tells a corrupt object from other failures
                while src.read(CHUNK):
                    pass
            except Exception:
                pass
        sink.abort()
        checked = expected is not None and not isinstance(e, LocationError) and not authentic
        if checked and src.sha256.hexdigest() != expected.sha256:
            raise BackupUnusable(
                f"{where}: checksum mismatch (SHA-256 {src.sha256.hexdigest()[:16]}..., "
                f"manifest says {expected.sha256[:16]}...)"
            ) from None
        if failed is not None and e is failed:
            raise failed from None
        if isinstance(e, DecodeFailed):
            raise BackupUnusable(f"{where}: {e}") from None
        raise  # the decoder's own failure (a full disk: the loaders saw a cut file) comes first
    if expected is not None and (src.size != expected.size or src.sha256.hexdigest() != expected.sha256):
        sink.abort()
        raise BackupUnusable(
            f"{where}: checksum mismatch (size {src.size}, SHA-256 {src.sha256.hexdigest()[:16]}...;"
            f" manifest says {expected.size}, {expected.sha256[:16]}...)"
        )
    sink.finish(log)


SinkFactory = Callable[[Manifest | None], "Sink"]


def _fetch_one(config: DrConfig, entry: CatalogEntry, location: Location, make_sink: SinkFactory, log: Log) -> None:
    m = entry.manifest
    obj = m.objects[0]
    encrypted = m.encryption.get("method") == "age"
    identities = load_identities(config) if encrypted else None
    t0 = time.monotonic()
    with location.open_read(m.object_key(obj.name)) as raw:
        src = HashingReader(raw)
        try:
            _stream_object(src, obj, location.name, make_sink(m), m.compression["method"], encrypted, identities, log)
        except BackupUnusable as e:
            if "cannot decrypt" in str(e):
                raise BackupUnusable(
                    f"{e}; the backup is for recipient fingerprint(s) {', '.join(m.encryption.get('recipients', []))}, "
                    f"the identity given has {', '.join(identity_fingerprints(identities or []))}"
                ) from None
            raise
    log(f"streamed {m.id} from {location.name}: {src.size} bytes, SHA-256 verified, in {time.monotonic() - t0:.1f}s")


def candidates(catalog: Catalog, request: RestoreRequest) -> list[CatalogEntry]:
    if request.backup == "latest":
        entries = [
            e for e in catalog.entries if e.manifest.database == request.database and e.manifest.kind == "logical"
        ]
        if not entries:
            catalog.latest(request.database)  # raises BackupNotFound with the reasons
        return entries
    return [catalog.find(request.database, request.backup)]


def fetch_and_load(
    config: DrConfig, locations: dict[str, Location], request: RestoreRequest, make_sink: SinkFactory, log: Log
) -> Fetched:
    """Stream the first valid copy of the chosen backup into `make_sink(manifest)` (the plaintext
    spool, or pg_restore + the archive's head). For "latest", a backup whose every copy fails falls back to the previous one, and says so.
    A pg_restore error is not the backup's fault: it fails at once."""
    if request.from_file:
        return _load_file(config, Path(request.backup), make_sink, log)
    catalog = load_catalog(locations.values(), request.database, "logical")
    for p in catalog.problems:
        log(f"warning: {p}")
    reasons: list[str] = []
    failures: list[str] = []
    for entry in candidates(catalog, request):
        errors = []
        for name in [n for n in locations if n in entry.locations]:
            try:
                _fetch_one(config, entry, locations[name], make_sink, log)
                if reasons:
                    log(f"WARNING: FELL BACK to backup {entry.id} because: {'; '.join(reasons)}")
                return Fetched(entry.manifest, name, reasons, failures + errors)
            except (BackupUnusable, LocationError) as e:
                errors.append(str(e))
                log(f"copy of {entry.id} on {name} is unusable: {e}")
        failures += errors
        if request.backup != "latest":
            raise BackupUnusable(
                f"backup {entry.id} cannot be used: {'; '.join(errors)}. "
                "Ask for another backup id, or `latest` to fall back automatically."
            )
        reasons.append(f"{entry.id}: {'; '.join(errors)}")
    raise BackupUnusable("no usable backup: " + " | ".join(reasons))


def _load_file(config: DrConfig, path: Path, make_sink: SinkFactory, log: Log) -> Fetched:
    """A backup object or plain pg_dump -Fc file on local disk; its manifest, if beside it, is used."""
    if not path.is_file():
        raise RestoreError(f"--file {path}: no such file")
    manifest = None
    if (path.parent / "manifest.json").is_file():
        manifest = Manifest.model_validate_json((path.parent / "manifest.json").read_text())
    compression, encryption = methods_from_name(path.name)
    encrypted = encryption == "age"
    identities = load_identities(config) if encrypted else None
    with open(path, "rb") as raw:
        src = HashingReader(raw)
        _stream_object(
            src,
            manifest.objects[0] if manifest else None,
            str(path),
            make_sink(manifest),
            compression,
            encrypted,
            identities,
            log,
        )
    if manifest is None:
        log(f"warning: no manifest beside {path}: row counts and schema cannot be compared")
    log(f"streamed {path} ({src.size} bytes)")
    return Fetched(manifest, None)
