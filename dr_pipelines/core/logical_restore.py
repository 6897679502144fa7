"""Restoring logical backups: choose, then one streamed pass (fetch -> SHA-256 -> decrypt ->
decompress -> pg_restore), parallel index builds, validation, swap.

A restore never writes into the target directly: it restores into a staging database on the same
server, validates it there, and only then swaps it in (the old database is renamed and kept). A
failed fetch, decryption, pg_restore or validation therefore leaves the target as it was.

Plaintext touches disk only in a private 0700 directory on the restoring host, removed afterwards
even on failure. By default (`restore_spool`) the verified, decoded dump is spooled there and
`pg_restore -j N` loads tables and builds indexes in parallel, as a DBA would by hand. Without the
spool (disabled, or not enough free space) one stream feeds pg_restore and only the archive's head
(header + table of contents, which the parallel post-data step needs) is written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import psycopg
import pyrage
import zstandard
from psycopg import sql

from dr_pipelines.core.config import ConfigError, DatabaseConfig, DrConfig
from dr_pipelines.core.postgres import connect, libpq_env, pg_tool, server_facts
from dr_pipelines.core.repository import Catalog, CatalogEntry, Manifest, ManifestObject, load_catalog, store_record
from dr_pipelines.core.storage import Location, LocationError
from dr_pipelines.core.streams import CHUNK, HashingReader, load_identities
from dr_pipelines.core.validation import ValidationResult

Log = Callable[[str], None]
_NAME_MAX = 63  # PostgreSQL identifiers


class RestoreError(RuntimeError):
    pass


class OutputFull(RestoreError):
    """The decoded backup could not be written (a full disk): not the backup's fault."""


class UnsafeRestore(RestoreError):
    """A destructive step was not confirmed; nothing was touched."""


class BackupUnusable(RestoreError):
    """Every copy of a backup failed: missing, checksum mismatch, or cannot be decrypted."""


class ValidationFailed(RestoreError):
    def __init__(self, result: ValidationResult):
        super().__init__(result.summary())
        self.result = result


@dataclass
class RestoreRequest:
    database: str
    backup: str = "latest"  # "latest", a backup id, or a file path (see `from_file`)
    from_file: bool = False
    location: str | None = None
    target: str | None = None  # database name; default: the configured one
    clean: bool = False
    confirm: str | None = None  # the target's name, repeated
    schema_only: bool = False
    data_only: bool = False
    jobs: int = 2
    no_owner: bool = False
    no_privileges: bool = False
    keep_previous: bool = True

    def check(self) -> None:
        if self.schema_only and self.data_only:
            raise ConfigError("schema_only and data_only are mutually exclusive: choose one (or neither for both)")
        if self.jobs < 1:
            raise ConfigError("jobs must be at least 1")


# --------------------------------------------------------------------------- identities


def identity_fingerprints(identities: list) -> list[str]:
    return [hashlib.sha256(str(i.to_public()).encode()).hexdigest()[:16] for i in identities]


# --------------------------------------------------------------------------- decoding


class _ZstdSink:
    def __init__(self, out):
        self._out = out
        self._z = zstandard.ZstdDecompressor().decompressobj()

    def write(self, data) -> int:
        self._out.write(self._z.decompress(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self._z.eof:
            raise zstandard.ZstdError("zstd stream is truncated")


class _GzipSink:
    def __init__(self, out):
        self._out = out
        self._z = zlib.decompressobj(wbits=31)

    def write(self, data) -> int:
        self._out.write(self._z.decompress(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._out.write(self._z.flush())
        if not self._z.eof:
            raise zlib.error("gzip stream is truncated")


class _PlainSink:
    def __init__(self, out):
        self._out = out

    def write(self, data) -> int:
        self._out.write(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _sink(method: str, out):
    return {"zstd": _ZstdSink, "gzip": _GzipSink, "none": _PlainSink}[method](out)


class DecodeFailed(RuntimeError):
    def __init__(self, stage: str, detail: str):
        super().__init__(f"cannot {stage} ({detail})")
        self.stage = stage


def _decoder_commands(compression: str, encrypted: bool) -> list[list[str]] | None:
    """age and zstd/gzip as processes, when installed; None: decode in-process instead."""
    cmds = []
    if encrypted:
        cmds.append(["age", "--decrypt", "--identity"])  # + the identity pipe, added by the caller
    if compression == "zstd":
        cmds.append(["zstd", "--decompress", "--quiet", "--stdout"])
    elif compression == "gzip":
        cmds.append(["gzip", "--decompress", "--stdout"])
    for cmd in cmds:
        found = shutil.which(cmd[0])
        if found is None:
            return None
        cmd[0] = found
    return cmds


def _decode_in_process(src, out, compression: str, encrypted: bool, identities: list | None) -> None:
    sink = _sink(compression, out)
    try:
        if encrypted:
            pyrage.decrypt_io(src, sink, identities)
        else:
            while chunk := src.read(CHUNK):
                sink.write(chunk)
        sink.close()
    except pyrage.DecryptError as e:
        raise DecodeFailed("decrypt", str(e)) from None
    except (zstandard.ZstdError, zlib.error) as e:
        raise DecodeFailed("decompress", str(e)) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OutputFull(_OUTPUT_FULL.format(detail=e)) from None
        raise


_OUTPUT_FULL = ("cannot write the decoded backup ({detail}); the backup itself may be fine. Free space where it "
                "is written (scratch_dir, or the data directory) and retry")


def _decode_with_tools(src, out, cmds: list[list[str]], identities: list | None) -> None:
    """src -> age -d -> zstd -d -> out, the tools running beside this process (in-process, the GIL
    and one core made decoding 3x slower than the tools). `out` with a fileno is written by the
    last tool directly."""
    identity_read = None
    if identities:
        identity_read, identity_write = os.pipe()
        os.write(identity_write, "".join(f"{i}\n" for i in identities).encode())
        os.close(identity_write)
        cmds[0] = cmds[0] + [f"/dev/fd/{identity_read}"]
    try:
        out_fd = out.fileno()
        out.flush()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        out_fd = None
    direct = out_fd is not None
    procs: list[subprocess.Popen] = []
    errors: list[BaseException] = []
    pump: threading.Thread | None = None
    try:
        for i, cmd in enumerate(cmds):
            last = i == len(cmds) - 1
            procs.append(subprocess.Popen(
                cmd, stdin=procs[-1].stdout if procs else subprocess.PIPE,
                stdout=out_fd if last and direct else subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(identity_read,) if identity_read is not None and i == 0 else ()))
            if i:
                procs[-2].stdout.close()  # the next tool owns it now
        if not direct:
            def copy_out() -> None:
                try:
                    while chunk := procs[-1].stdout.read1(CHUNK):  # what is there: no waiting for 1 MB
                        out.write(chunk)
                except BaseException as e:
                    errors.append(e)
                    for p in procs:
                        p.kill()
            pump = threading.Thread(target=copy_out, name="decode-output", daemon=True)
            pump.start()
        try:
            while chunk := src.read(CHUNK):
                procs[0].stdin.write(chunk)
        except BrokenPipeError:
            pass  # a tool stopped: its exit status says why
        finally:
            try:
                procs[0].stdin.close()
            except BrokenPipeError:
                pass
        for p in procs:
            p.wait()
        if pump is not None:
            pump.join()
        if errors:
            raise errors[0]
        _check_tools(cmds, procs)
    finally:
        if identity_read is not None:
            os.close(identity_read)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stderr.close()
        if procs and not direct and procs[-1].stdout:
            if pump is not None:  # after the kills above it reads to the end at once
                pump.join(timeout=10)
            procs[-1].stdout.close()


_WRITE_FAILED = ("no space left", "write error", "cannot write", "failed to write", "disk quota", "file too large")


def _check_tools(cmds: list[list[str]], procs: list[subprocess.Popen]) -> None:
    """Say which tool failed, and whose fault it is. A failure to read spreads downstream (the next
    tool sees a truncated input), a failure to write spreads upstream (the previous one dies of a
    broken pipe): so a write failure (a full disk) is blamed first, and is not the backup's fault;
    otherwise the most upstream real failure marks the copy unusable (cannot decrypt/decompress)."""
    failures = []
    for cmd, p in zip(cmds, procs):
        if p.returncode == 0 or p.returncode == -signal.SIGPIPE:
            continue
        if p.returncode == -signal.SIGXFSZ:  # past the file-size limit: a write failure
            raise OutputFull(_OUTPUT_FULL.format(detail=f"{Path(cmd[0]).name}: file size limit exceeded"))
        said = [ln.strip() for ln in p.stderr.read().decode(errors="replace").splitlines()
                if ln.strip() and "report unexpected" not in ln]  # age's bug-report footer
        detail = "; ".join(said) or f"exit {p.returncode}"
        if "broken pipe" not in detail.lower():
            failures.append((Path(cmd[0]).name, detail))
    for _, detail in failures:
        if any(w in detail.lower() for w in _WRITE_FAILED):
            raise OutputFull(_OUTPUT_FULL.format(detail=detail))
    if failures:
        tool, detail = failures[0]
        raise DecodeFailed("decrypt" if tool == "age" else "decompress", detail)
    if any(p.returncode for p in procs):  # only broken pipes: whoever read the output stopped reading
        raise RestoreError("the reader of the decoded backup stopped before the end (see its own error)")


def decode_into(src, out, compression: str, encrypted: bool, identities: list | None) -> None:
    """src (stored bytes) -> decrypt -> decompress -> out.write(). Raises DecodeFailed for a copy
    that cannot be decrypted or decompressed."""
    cmds = _decoder_commands(compression, encrypted)
    if cmds:
        _decode_with_tools(src, out, cmds, identities)
    elif cmds is None:
        _decode_in_process(src, out, compression, encrypted, identities)
    else:  # neither encrypted nor compressed
        while chunk := src.read(CHUNK):
            out.write(chunk)


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

    def __init__(self, server: DatabaseConfig, db_name: str, dbname: str, request: RestoreRequest,
                 plaintext: Path, create: bool, log: Log = lambda m: None):
        self.server, self.db_name, self.dbname, self.plaintext = server, db_name, dbname, plaintext
        self.t0 = self._last_progress = time.monotonic()
        self.log = log
        self.bytes = 0
        with connect(server, db_name, dbname="postgres", autocommit=True) as conn:
            major = server_facts(conn)["server_major"]
            if create:
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(dbname)))
        self.created = create
        self.major = major
        self.pg_restore = _PgRestore(_pg_restore_cmd(server, major, dbname, request) + _sections(request),
                                     server, db_name, stdin=subprocess.PIPE)
        fd = os.open(plaintext, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.file = os.fdopen(fd, "wb", buffering=CHUNK)

    def write(self, data) -> int:
        self.bytes += len(data)
        if time.monotonic() - self._last_progress >= 10:  # progress on long restores, not every chunk
            self._last_progress = time.monotonic()
            self.log(f"restoring into {self.dbname}: {self.bytes / 1e6:.0f} MB of dump loaded, "
                     f"{self.pg_restore.items} items, {self._last_progress - self.t0:.0f}s")
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
                raise OutputFull(_OUTPUT_FULL.format(detail=e)) from None
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
        log(f"warning: {workdir} has {free / 1e9:.1f} GB free, the decoded dump needs {need / 1e9:.1f} GB: "
            "streaming instead (tables load one at a time). Set scratch_dir to a larger disk for a parallel restore.")
        return False
    return True


def create_database(server: DatabaseConfig, db_name: str, dbname: str, create: bool) -> int:
    """Create the (staging) database if asked; returns the server's major version."""
    with connect(server, db_name, dbname="postgres", autocommit=True) as conn:
        if create:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(dbname)))
        return server_facts(conn)["server_major"]


def _spooled_sections(request: RestoreRequest) -> list[str]:
    if request.data_only:
        return ["--data-only", "--disable-triggers"]
    if request.schema_only:
        return ["--schema-only"]
    return []


def load_spooled(server: DatabaseConfig, db_name: str, dbname: str, plaintext: Path, request: RestoreRequest,
                 major: int, log: Log) -> float:
    """pg_restore -j N from the verified plaintext: tables load and indexes build in parallel."""
    t0 = time.monotonic()
    cmd = _pg_restore_cmd(server, major, dbname, request) + _spooled_sections(request) + [
        f"--jobs={request.jobs}", str(plaintext)]
    _PgRestore(cmd, server, db_name).wait(dbname, log, t0)
    took = time.monotonic() - t0
    log(f"pg_restore -j {request.jobs} into {dbname}: schema, data and indexes in {took:.1f}s")
    return took


@dataclass
class Fetched:
    manifest: Manifest | None
    location: str | None
    fallback_reasons: list[str] = field(default_factory=list)
    location_failures: list[str] = field(default_factory=list)


def _stream_object(src: HashingReader, expected: ManifestObject | None, where: str, sink: RestoreSink | PlaintextSpool,
                   compression: str, encrypted: bool, identities: list | None, log: Log) -> None:
    """Decode `src` into `sink`; commit the sink only if the object matches its checksum."""
    try:
        decode_into(src, sink, compression, encrypted, identities)
        while src.read(CHUNK):  # anything after the encrypted payload still counts
            pass
    except BaseException as e:
        if not isinstance(e, LocationError):
            try:  # read to the end: the checksum tells a corrupt object from other failures
                while src.read(CHUNK):
                    pass
            except Exception:
                pass
        sink.abort()
        if expected is not None and not isinstance(e, LocationError) and src.sha256.hexdigest() != expected.sha256:
            raise BackupUnusable(f"{where}: checksum mismatch (SHA-256 {src.sha256.hexdigest()[:16]}..., "
                                 f"manifest says {expected.sha256[:16]}...)") from None
        if isinstance(e, DecodeFailed):
            raise BackupUnusable(f"{where}: {e}") from None
        raise
    if expected is not None and (src.size != expected.size or src.sha256.hexdigest() != expected.sha256):
        sink.abort()
        raise BackupUnusable(f"{where}: checksum mismatch (size {src.size}, SHA-256 {src.sha256.hexdigest()[:16]}...;"
                             f" manifest says {expected.size}, {expected.sha256[:16]}...)")
    sink.finish(log)


SinkFactory = Callable[[Manifest | None], "RestoreSink | PlaintextSpool"]


def _fetch_one(config: DrConfig, entry: CatalogEntry, location: Location, make_sink: SinkFactory,
               log: Log) -> None:
    m = entry.manifest
    obj = m.objects[0]
    encrypted = m.encryption.get("method") == "age"
    identities = load_identities(config) if encrypted else None
    t0 = time.monotonic()
    with location.open_read(m.object_key(obj.name)) as raw:
        src = HashingReader(raw)
        try:
            _stream_object(src, obj, location.name, make_sink(m), m.compression["method"], encrypted, identities,
                           log)
        except BackupUnusable as e:
            if "cannot decrypt" in str(e):
                raise BackupUnusable(
                    f"{e}; the backup is for recipient fingerprint(s) {', '.join(m.encryption.get('recipients', []))}, "
                    f"the identity given has {', '.join(identity_fingerprints(identities))}") from None
            raise
    log(f"streamed {m.id} from {location.name}: {src.size} bytes, SHA-256 verified, in {time.monotonic() - t0:.1f}s")


def candidates(catalog: Catalog, request: RestoreRequest) -> list[CatalogEntry]:
    if request.backup == "latest":
        entries = [e for e in catalog.entries if e.manifest.database == request.database and e.manifest.kind == "logical"]
        if not entries:
            catalog.latest(request.database)  # raises BackupNotFound with the reasons
        return entries
    return [catalog.find(request.database, request.backup)]


def fetch_and_load(config: DrConfig, locations: dict[str, Location], request: RestoreRequest,
                   make_sink: SinkFactory, log: Log) -> Fetched:
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
            raise BackupUnusable(f"backup {entry.id} cannot be used: {'; '.join(errors)}. "
                                 "Ask for another backup id, or `latest` to fall back automatically.")
        reasons.append(f"{entry.id}: {'; '.join(errors)}")
    raise BackupUnusable("no usable backup: " + " | ".join(reasons))


def _load_file(config: DrConfig, path: Path, make_sink: SinkFactory, log: Log) -> Fetched:
    """A backup object or plain pg_dump -Fc file on local disk; its manifest, if beside it, is used."""
    if not path.is_file():
        raise RestoreError(f"--file {path}: no such file")
    manifest = None
    if (path.parent / "manifest.json").is_file():
        manifest = Manifest.model_validate_json((path.parent / "manifest.json").read_text())
    suffixes = path.suffixes
    encrypted = suffixes[-1:] == [".age"]
    rest = suffixes[:-1] if encrypted else suffixes
    compression = {".zst": "zstd", ".gz": "gzip"}.get(rest[-1] if rest else "", "none")
    identities = load_identities(config) if encrypted else None
    with open(path, "rb") as raw:
        src = HashingReader(raw)
        _stream_object(src, manifest.objects[0] if manifest else None, str(path), make_sink(manifest), compression,
                       encrypted, identities, log)
    if manifest is None:
        log(f"warning: no manifest beside {path}: row counts and schema cannot be compared")
    log(f"streamed {path} ({src.size} bytes)")
    return Fetched(manifest, None)


@contextmanager
def scratch_directory(config: DrConfig, database: str, name: str | None = None) -> Iterator[Path]:
    """A private 0700 directory for plaintext, removed afterwards even on failure."""
    path = scratch_path(config, database, name)
    path.mkdir(mode=0o700, parents=False, exist_ok=False)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def scratch_path(config: DrConfig, database: str, name: str | None = None) -> Path:
    base = Path(config.databases[database].scratch_dir or tempfile.gettempdir())
    return base / f"dr-restore-{name or secrets.token_hex(6)}"


# --------------------------------------------------------------------------- databases


def _db_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def _user_object_count(server: DatabaseConfig, db_name: str, dbname: str) -> int:
    with connect(server, db_name, dbname=dbname, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' "
            "AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')").fetchone()[0]


def _terminate(conn: psycopg.Connection, dbname: str) -> None:
    """End every session on `dbname`, waiting (up to 10 s each) until they are gone: a terminated
    backend that has not exited yet still blocks ALTER DATABASE ... RENAME."""
    conn.execute("SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
                 "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))


def drop_database(server: DatabaseConfig, db_name: str, dbname: str) -> None:
    with connect(server, db_name, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


def staging_name(target: str) -> str:
    return f"{target[:_NAME_MAX - 19]}__restoring_{secrets.token_hex(3)}"


@dataclass
class TargetPlan:
    """Where the restore goes, decided (and confirmed) before anything is touched."""

    target: str
    exists: bool
    staging: str | None  # None: data_only restores straight into the existing target
    is_source: bool


def plan_target(config: DrConfig, request: RestoreRequest, server: DatabaseConfig | None = None) -> TargetPlan:
    request.check()
    db = config.database(request.database)
    server = server or db
    target = request.target or db.dbname
    if len(target) > _NAME_MAX:
        raise ConfigError(f"target database name {target!r} is longer than {_NAME_MAX} characters")
    is_source = target == db.dbname and server.host == db.host and server.port == db.port
    with connect(server, request.database, dbname="postgres", autocommit=True) as conn:
        exists = _db_exists(conn, target)
    confirmed = request.clean and request.confirm == target
    if request.data_only:
        if not exists:
            raise ConfigError(f"data_only restores into an existing schema, but database {target!r} does not exist")
        if not confirmed:
            raise UnsafeRestore(f"data_only loads rows into the existing database {target!r}: set clean: true and "
                                f"confirm: {target!r} (shell: --clean --yes) to go ahead")
        return TargetPlan(target, True, None, is_source)
    if is_source and not confirmed:
        raise UnsafeRestore(
            f"{target!r} is the source database {request.database!r} itself: restoring over it needs clean: true "
            f"and confirm: {target!r} (shell: --clean --yes); or restore elsewhere with target/--into. Nothing was touched.")
    if exists and not confirmed and _user_object_count(server, request.database, target):
        raise UnsafeRestore(
            f"database {target!r} exists and is not empty: set clean: true and confirm: {target!r} "
            f"(shell: --clean --yes) to replace it (the old one is kept, renamed), or choose another target. "
            "Nothing was touched.")
    return TargetPlan(target, exists, staging_name(target), is_source)


def run_post_data(server: DatabaseConfig, db_name: str, dbname: str, plaintext: Path, request: RestoreRequest,
                  major: int, log: Log) -> float:
    """Indexes, constraints and triggers, in parallel, from the archive's head (they need only the TOC)."""
    if request.data_only:
        return 0.0
    t0 = time.monotonic()
    cmd = _pg_restore_cmd(server, major, dbname, request) + ["--section=post-data", f"--jobs={request.jobs}",
                                                             str(plaintext)]
    _PgRestore(cmd, server, db_name).wait(dbname, log, t0)
    took = time.monotonic() - t0
    log(f"indexes and constraints of {dbname} built in {took:.1f}s ({request.jobs} jobs)")
    return took


def restore_into(config: DrConfig, locations: dict[str, Location], request: RestoreRequest, server: DatabaseConfig,
                 dbname: str, workdir: Path, create: bool, log: Log) -> tuple[Fetched, dict[str, float]]:
    """Load the backup into `dbname`: spooled then pg_restore -j (default), or streamed into one
    pg_restore and then indexes and constraints in parallel."""
    t0 = time.monotonic()
    plaintext = workdir / "restore.pgdump"
    db = config.database(request.database)
    sinks: list[RestoreSink | PlaintextSpool] = []

    streaming: list[bool] = []  # set once spooling has failed for lack of space

    def make_sink(manifest: Manifest | None) -> RestoreSink | PlaintextSpool:
        if not streaming and spool_fits(db, workdir, manifest, log):
            sinks.append(PlaintextSpool(plaintext))
        else:
            sinks.append(RestoreSink(server, request.database, dbname, request, plaintext, create, log))
        return sinks[-1]

    created = False
    try:
        try:
            fetched = fetch_and_load(config, locations, request, make_sink, log)
        except OutputFull as e:
            if not isinstance(sinks[-1], PlaintextSpool):
                raise
            # the disk filled while spooling (another restore took the space): stream instead
            log(f"warning: {e}. Streaming instead (tables load one at a time)")
            streaming.append(True)
            fetched = fetch_and_load(config, locations, request, make_sink, log)
        sink = sinks[-1]
        created = create
        steps = {"plaintext_bytes_on_disk": plaintext.stat().st_size if plaintext.exists() else 0}
        if isinstance(sink, PlaintextSpool):
            steps["fetch_and_decode"] = round(time.monotonic() - t0, 3)
            major = create_database(server, request.database, dbname, create)
            steps["pg_restore"] = round(load_spooled(server, request.database, dbname, plaintext, request, major,
                                                     log), 3)
        else:
            steps["fetch_and_load"] = round(time.monotonic() - t0, 3)
            steps["post_data"] = round(run_post_data(server, request.database, dbname, plaintext, request,
                                                     sink.major, log), 3)
    except RestoreError:
        if created:
            drop_database(server, request.database, dbname)
        raise
    finally:
        plaintext.unlink(missing_ok=True)
    return fetched, steps


def swap_in(server: DatabaseConfig, db_name: str, plan: TargetPlan, keep_previous: bool, log: Log) -> str | None:
    """Put the validated staging database in the target's place; returns the kept previous name."""
    previous = None
    stamp = f"{datetime.now(timezone.utc):%Y%m%d%H%M%S}_{secrets.token_hex(2)}"
    with connect(server, db_name, dbname="postgres", autocommit=True) as conn:
        try:
            if plan.exists:
                previous = f"{plan.target[:_NAME_MAX - 33]}__pre_restore_{stamp}"
                _terminate(conn, plan.target)
                conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(plan.target), sql.Identifier(previous)))
            _terminate(conn, plan.staging)
            conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                sql.Identifier(plan.staging), sql.Identifier(plan.target)))
        except psycopg.Error as e:
            where = f"the old database is now {previous!r}" if previous and _db_exists(conn, previous) \
                else f"{plan.target!r} is unchanged"
            raise RestoreError(f"could not swap the restored database into place ({str(e).strip()}); the validated "
                               f"restore is in {plan.staging!r} and {where}. Rename by hand or run the restore again.") \
                from None
        if previous and not keep_previous:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(previous)))
            previous = None
    log(f"database {plan.target!r} now holds the restored data"
        + (f"; the previous one is kept as {previous!r}" if previous else ""))
    return previous


# --------------------------------------------------------------------------- reports


@dataclass
class RestoreReport:
    kind: str  # "restore" or "restore_test"
    database: str
    target: str
    started_at: str
    finished_at: str | None = None
    backup_id: str | None = None
    backup_created_at: str | None = None
    location: str | None = None
    fallback: bool = False
    fallback_reasons: list[str] = field(default_factory=list)
    location_failures: list[str] = field(default_factory=list)
    previous_database: str | None = None
    rto_s: float | None = None
    data_loss_window_s: float | None = None
    steps_s: dict[str, float] = field(default_factory=dict)
    validation: dict | None = None
    passed: bool = False
    error: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"


def data_loss_window(manifest: Manifest | None, started: datetime) -> float | None:
    return None if manifest is None else round((started - manifest.created_at).total_seconds(), 3)


def store_report(locations: dict[str, Location], report: RestoreReport, log: Log) -> list[str]:
    """Reports live in the repository too, so history survives the loss of the Dagster instance."""
    return store_record(locations, report.database, report.kind, report.started_at, report.to_json(), log)


def describe_backup(report: RestoreReport, fetched: Fetched, started: datetime) -> None:
    m = fetched.manifest
    report.backup_id = m.id if m else None
    report.backup_created_at = m.created_at.isoformat() if m else None
    report.location = fetched.location
    report.fallback = bool(fetched.fallback_reasons)
    report.fallback_reasons = fetched.fallback_reasons
    report.location_failures = fetched.location_failures
    report.data_loss_window_s = data_loss_window(m, started)
