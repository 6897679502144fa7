"""Restoring a backup into a database: fetch and decode into the spool (then pg_restore -j N) or into
one streaming pg_restore; the private scratch directory for plaintext."""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from dr_pipelines.core.codec.decode import OutputFull
from dr_pipelines.core.config import DatabaseConfig, DrConfig
from dr_pipelines.core.log import Log
from dr_pipelines.core.repository.manifest import Manifest
from dr_pipelines.core.restore.fetch import Fetched, fetch_and_load
from dr_pipelines.core.restore.pg_restore import (
    ParallelLoad,
    PlaintextSpool,
    RestoreSink,
    Sink,
    create_database,
    load_spooled,
    run_post_data,
    spool_fits,
)
from dr_pipelines.core.restore.plain_sql import is_plain_sql, load_plain_sql
from dr_pipelines.core.restore.request import RestoreRequest
from dr_pipelines.core.restore.target import drop_database
from dr_pipelines.core.storage.base import Location
from dr_pipelines.core.sweep import (
    SCRATCH_PREFIX,
    make_scratch_dir,
    scratch_base,
    scratch_leftovers,
    staging_leftovers,
    sweep_safely,
)


@contextmanager
def scratch_directory(config: DrConfig, database: str, name: str | None = None) -> Iterator[Path]:
    """A private 0700 directory for plaintext, removed afterwards even on failure."""
    path = scratch_path(config, database, name)
    make_scratch_dir(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def scratch_path(config: DrConfig, database: str, name: str | None = None) -> Path:
    return scratch_base(config.databases[database]) / f"{SCRATCH_PREFIX}{name or secrets.token_hex(6)}"


def restore_into(
    config: DrConfig,
    locations: dict[str, Location],
    request: RestoreRequest,
    server: DatabaseConfig,
    dbname: str,
    workdir: Path,
    create: bool,
    log: Log,
) -> tuple[Fetched, dict[str, float]]:
    """Load the backup into `dbname`: spooled and loaded by parallel pg_restore as it decodes (into a
    database made for it), spooled then pg_restore -j (into an existing one), or streamed into one
    pg_restore (no room, or restore_spool off); indexes and constraints then build in parallel."""
    # what killed restores left here (plaintext in a scratch directory, a staging database) goes first
    sweep_safely(
        lambda: scratch_leftovers(config, datetime.now(timezone.utc)) + staging_leftovers(config, request.database), log
    )
    t0 = time.monotonic()
    if request.from_file and is_plain_sql(Path(request.backup)):  # the runbooks' `pg_dump | gzip` files
        create_database(server, request.database, dbname, create)
        try:
            load_plain_sql(server, request.database, dbname, Path(request.backup), log)
        except BaseException:
            if create:
                drop_database(server, request.database, dbname)
            raise
        log(f"warning: {request.backup} is a plain SQL dump with no manifest: row counts cannot be compared")
        return Fetched(None, None), {"psql": round(time.monotonic() - t0, 3)}
    plaintext = workdir / "restore.pgdump"
    db = config.database(request.database)
    sinks: list[Sink] = []

    streaming: list[bool] = []  # set once spooling has failed for lack of space

    def make_sink(manifest: Manifest | None) -> Sink:
        if not streaming and spool_fits(db, workdir, manifest, log):
            full = not (request.data_only or request.schema_only)
            if create and manifest is not None and full and db.restore_while_decoding:
                # a database made for this restore may be loaded before the checksum is known: it is
                # dropped if the copy proves corrupt. Into an existing one, only verified bytes go.
                sinks.append(ParallelLoad(server, request.database, dbname, request, plaintext, manifest, log))
            else:
                sinks.append(PlaintextSpool(plaintext))
        else:
            sinks.append(RestoreSink(server, request.database, dbname, request, plaintext, create, log))
        return sinks[-1]

    created = False
    try:
        try:
            fetched = fetch_and_load(config, locations, request, make_sink, log)
        except OutputFull as e:
            if isinstance(sinks[-1], RestoreSink):
                raise
            # the disk filled while spooling (another restore took the space): stream instead
            log(f"warning: {e}. Streaming instead (tables load one at a time)")
            streaming.append(True)
            fetched = fetch_and_load(config, locations, request, make_sink, log)
        sink = sinks[-1]
        created = create
        steps: dict[str, float] = {"plaintext_bytes_on_disk": plaintext.stat().st_size if plaintext.exists() else 0}
        if isinstance(sink, ParallelLoad):
            steps["fetch_and_decode"] = round(sink.decoded_s, 3)
            steps["load"] = round(sink.loaded_s, 3)
            steps["post_data"] = round(sink.post_data(log), 3)
        elif isinstance(sink, PlaintextSpool):
            steps["fetch_and_decode"] = round(time.monotonic() - t0, 3)
            major = create_database(server, request.database, dbname, create)
            steps["pg_restore"] = round(
                load_spooled(server, request.database, dbname, plaintext, request, major, log), 3
            )
        else:
            steps["fetch_and_load"] = round(time.monotonic() - t0, 3)
            steps["post_data"] = round(
                run_post_data(server, request.database, dbname, plaintext, request, sink.major, log), 3
            )
    except BaseException:  # whatever stopped it, no half-loaded database stays behind
        if created:
            drop_database(server, request.database, dbname)
        raise
    finally:
        plaintext.unlink(missing_ok=True)
    return fetched, steps
