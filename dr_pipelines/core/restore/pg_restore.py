"""Loading a decoded dump: spooled then `pg_restore -j N`, or streamed into one pg_restore and then
indexes and constraints in parallel; the private scratch directory."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from psycopg import sql

from dr_pipelines.core.codec.decode import OUTPUT_FULL, OutputFull
from dr_pipelines.core.codec.methods import CHUNK
from dr_pipelines.core.config import DatabaseConfig
from dr_pipelines.core.log import Log
from dr_pipelines.core.owner import owner_tag
from dr_pipelines.core.postgres.client import connect, libpq_env, pg_tool, server_facts
from dr_pipelines.core.repository.manifest import Manifest
from dr_pipelines.core.restore.request import RestoreError, RestoreRequest
from dr_pipelines.core.restore.target import drop_database
from dr_pipelines.core.sweep import STAGING_COMMENT


def _sections(request: RestoreRequest) -> list[str]:
    """What the streaming pg_restore loads; post-data (indexes, constraints) follows in parallel."""
    if request.data_only:
        return ["--data-only", "--disable-triggers"]
    if request.schema_only:
        return ["--section=pre-data"]
    return ["--section=pre-data", "--section=data"]


def _pg_restore_cmd(server: DatabaseConfig, major: int, dbname: str, request: RestoreRequest) -> list[str]:
    cmd = [pg_tool("pg_restore", server, major), "--exit-on-error", "--no-password", "--verbose", f"--dbname={dbname}"]
    if request.no_owner:
        cmd.append("--no-owner")
    if request.no_privileges:
        cmd.append("--no-privileges")
    return cmd


class _PgRestore:
    """A pg_restore process whose errors are collected and whose progress is counted."""

    def __init__(self, cmd: list[str], server: DatabaseConfig, db_name: str, stdin=None):
        env = libpq_env(server, db_name)
        env.pop("PGDATABASE", None)
        self.proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        self.errors: list[str] = []
        self.items = 0
        self.lines = 0  # any output at all means the archive's TOC has been read
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            self.lines += 1
            line = raw.decode(errors="replace").rstrip()
            if "processing item" in line or "processing data for table" in line or "creating " in line:
                self.items += 1
            elif line and not line.startswith("pg_restore: launching") and "finished item" not in line:
                self.errors.append(line)

    def failure(self, dbname: str) -> str:
        self._reader.join(timeout=10)
        detail = " | ".join([e for e in self.errors if "error" in e.lower()][-5:] or self.errors[-5:])
        return f"pg_restore into {dbname!r} failed (exit {self.proc.returncode}): {detail}"

    def wait(self, dbname: str, log: Log, t0: float) -> None:
        last = time.monotonic()
        try:
            while self.proc.poll() is None:
                time.sleep(0.1)
                if time.monotonic() - last >= 10:
                    log(f"pg_restore into {dbname}: {self.items} items so far, {time.monotonic() - t0:.0f}s")
                    last = time.monotonic()
        except BaseException:  # interrupted (run cancelled, Ctrl-C): pg_restore must not load on alone
            self.kill()
            raise
        self._reader.join(timeout=10)
        if self.proc.returncode != 0:
            raise RestoreError(self.failure(dbname))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class RestoreSink:
    """Where decoded bytes go while they stream: pg_restore's stdin (schema and data, loading as the
    bytes arrive), and the head of the archive (header + TOC) into the private file that the
    parallel post-data step reads afterwards. pg_restore reads the whole TOC before it prints
    anything, so the file stops at its first line of output: table data never touches disk."""

    def __init__(
        self,
        server: DatabaseConfig,
        db_name: str,
        dbname: str,
        request: RestoreRequest,
        plaintext: Path,
        create: bool,
        log: Log = lambda m: None,
    ):
        self.server, self.db_name, self.dbname, self.plaintext = server, db_name, dbname, plaintext
        self.t0 = self._last_progress = time.monotonic()
        self.log = log
        self.bytes = 0
        self.major = create_database(server, db_name, dbname, create)
        self.created = create
        self.pg_restore = _PgRestore(
            _pg_restore_cmd(server, self.major, dbname, request) + _sections(request),
            server,
            db_name,
            stdin=subprocess.PIPE,
        )
        fd = os.open(plaintext, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.file = os.fdopen(fd, "wb", buffering=CHUNK)

    def write(self, data) -> int:
        self.bytes += len(data)
        if time.monotonic() - self._last_progress >= 10:  # progress on long restores, not every chunk
            self._last_progress = time.monotonic()
            self.log(
                f"restoring into {self.dbname}: {self.bytes / 1e6:.0f} MB of dump loaded, "
                f"{self.pg_restore.items} items, {self._last_progress - self.t0:.0f}s"
            )
        if self.file is not None:
            self.file.write(data)
            if self.pg_restore.lines:
                self.file.close()
                self.file = None
        try:
            self.pg_restore.proc.stdin.write(data)
        except (BrokenPipeError, ValueError):
            self.pg_restore.proc.wait()
            raise RestoreError(self.pg_restore.failure(self.dbname)) from None
        return len(data)

    def flush(self) -> None:
        pass

    def finish(self, log: Log) -> None:
        """The stream was verified: let pg_restore finish, and fail loudly if it did not succeed."""
        if self.file is not None:
            self.file.close()
        try:
            self.pg_restore.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.pg_restore.wait(self.dbname, log, self.t0)
        except RestoreError:
            self.abort()
            raise

    def abort(self) -> None:
        self.pg_restore.kill()
        if self.file is not None:
            self.file.close()
        self.plaintext.unlink(missing_ok=True)
        if self.created:
            drop_database(self.server, self.db_name, self.dbname)


class PlaintextSpool:
    """Where decoded bytes go when the restore spools: the private plaintext file, which a parallel
    pg_restore reads once the whole object has been verified (so a corrupt copy loads nothing)."""

    def __init__(self, plaintext: Path):
        self.plaintext = plaintext
        fd = os.open(plaintext, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.file = os.fdopen(fd, "wb", buffering=CHUNK)

    def write(self, data) -> int:
        return self.file.write(data)

    def fileno(self) -> int:  # the decoding tools write the file directly
        return self.file.fileno()

    def flush(self) -> None:
        self.file.flush()

    def finish(self, log: Log) -> None:
        try:
            self.file.close()  # the last buffered write
        except OSError as e:
            self.abort()
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise OutputFull(OUTPUT_FULL.format(detail=e)) from None
            raise

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # the write that failed is why we are here
        self.plaintext.unlink(missing_ok=True)


def spool_fits(db: DatabaseConfig, workdir: Path, manifest: Manifest | None, log: Log) -> bool:
    """Spool only when enabled and the decoded dump fits with room to spare; otherwise stream."""
    if not db.restore_spool:
        return False
    if manifest is None:  # a file without its manifest: the decoded size is unknown
        log("no manifest: the decoded size is unknown, so the restore streams (tables load one at a time)")
        return False
    need = manifest.uncompressed_bytes + max(manifest.uncompressed_bytes // 10, 256 << 20)
    free = shutil.disk_usage(workdir).free
    if need > free:
        log(
            f"warning: {workdir} has {free / 1e9:.1f} GB free, the decoded dump needs {need / 1e9:.1f} GB: "
            "streaming instead (tables load one at a time). Set scratch_dir to a larger disk for a parallel restore."
        )
        return False
    return True


def create_database(server: DatabaseConfig, db_name: str, dbname: str, create: bool) -> int:
    """Create the (staging) database if asked; returns the server's major version."""
    with connect(server, db_name, dbname="postgres", autocommit=True) as conn:
        if create:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(dbname)))
            # who made it: a run killed before it drops the database leaves it to the next one's sweep
            conn.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                    sql.Identifier(dbname), sql.Literal(STAGING_COMMENT + owner_tag())
                )
            )
        return server_facts(conn)["server_major"]


def _spooled_sections(request: RestoreRequest) -> list[str]:
    if request.data_only:
        return ["--data-only", "--disable-triggers"]
    if request.schema_only:
        return ["--schema-only"]
    return []


def load_spooled(
    server: DatabaseConfig, db_name: str, dbname: str, plaintext: Path, request: RestoreRequest, major: int, log: Log
) -> float:
    """pg_restore -j N from the verified plaintext: tables load and indexes build in parallel."""
    t0 = time.monotonic()
    cmd = (
        _pg_restore_cmd(server, major, dbname, request)
        + _spooled_sections(request)
        + [f"--jobs={request.jobs}", str(plaintext)]
    )
    _PgRestore(cmd, server, db_name).wait(dbname, log, t0)
    took = time.monotonic() - t0
    log(f"pg_restore -j {request.jobs} into {dbname}: schema, data and indexes in {took:.1f}s")
    return took


def run_post_data(
    server: DatabaseConfig, db_name: str, dbname: str, plaintext: Path, request: RestoreRequest, major: int, log: Log
) -> float:
    """Indexes, constraints and triggers, in parallel, from the archive's head (they need only the TOC)."""
    if request.data_only:
        return 0.0
    t0 = time.monotonic()
    cmd = _pg_restore_cmd(server, major, dbname, request) + [
        "--section=post-data",
        f"--jobs={request.jobs}",
        str(plaintext),
    ]
    _PgRestore(cmd, server, db_name).wait(dbname, log, t0)
    took = time.monotonic() - t0
    log(f"indexes and constraints of {dbname} built in {took:.1f}s ({request.jobs} jobs)")
    return took
