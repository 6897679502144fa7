"""Loading a decoded dump: spooled and loaded by parallel pg_restore as it decodes, spooled then
`pg_restore -j N`, or streamed into one pg_restore; then indexes and constraints in parallel."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from psycopg import sql

from dr_pipelines.core.codec.decode import OutputFull, output_full
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


# What a server's failed write says when its disk is full: ENOSPC, EFBIG (the file-size limit), EDQUOT.
_SERVER_FULL = ("No space left on device", "File too large", "Disk quota exceeded")


def _local_server(server: DatabaseConfig) -> bool:
    return server.host in ("", "localhost", "127.0.0.1", "::1") or server.host.startswith("/")


class _PgRestore:
    """A pg_restore process whose errors are collected and whose progress is counted."""

    def __init__(
        self,
        cmd: list[str],
        server: DatabaseConfig,
        db_name: str,
        stdin=None,
        stdout=subprocess.DEVNULL,
        use_list: Sequence[str] | None = None,
    ):
        env = libpq_env(server, db_name)
        env.pop("PGDATABASE", None)
        listed = None if use_list is None else _list_fd(use_list)
        try:
            self.proc = subprocess.Popen(
                cmd if listed is None else [cmd[0], f"--use-list=/dev/fd/{listed}", *cmd[1:]],
                stdin=stdin,
                stdout=stdout,
                stderr=subprocess.PIPE,
                env=env,
                pass_fds=() if listed is None else (listed,),
            )
        finally:
            if listed is not None:
                os.close(listed)  # the child holds its own
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

    def server_full(self) -> bool:
        """Whether the server refused a write for lack of room (a full disk, a quota, a size limit)."""
        self._reader.join(timeout=10)
        return any(said in error for error in self.errors for said in _SERVER_FULL)

    def failure(self, dbname: str) -> str:
        self._reader.join(timeout=10)
        detail = " | ".join([e for e in self.errors if "error" in e.lower()][-5:] or self.errors[-5:])
        failure = f"pg_restore into {dbname!r} failed (exit {self.proc.returncode}): {detail}"
        if self.server_full():
            return (
                "the database server refused a write for lack of room (a full disk, a quota or a file-size "
                f"limit) while loading: {failure}. Free space on the server (or raise its limit) and retry"
            )
        return failure

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

    decoder_niceness = 0

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

    def failure(self) -> BaseException | None:
        return None  # pg_restore's failure raises from write()

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

    decoder_niceness = 0

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

    def failure(self) -> BaseException | None:
        """What failed while the bytes arrived, besides the writes (which raise themselves)."""
        return None

    def finish(self, log: Log) -> None:
        try:
            self.file.close()  # the last buffered write
        except OSError as e:
            self.abort()
            raise (output_full(e) or e) from None

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # the write that failed is why we are here
        self.plaintext.unlink(missing_ok=True)


class _Follower:
    """Feeds a pipe (a pg_restore's stdin) from the spool file while the decoder writes it: what is
    there, then what comes, until the file is `complete` (end of input) or `stop` is set. A reader
    that needs no more (past its last table) closes the pipe: that ends the follower quietly."""

    def __init__(self, path: Path, complete: threading.Event, stop: threading.Event):
        self._fd = os.open(path, os.O_RDONLY)  # first: a spool gone leaves no pipe open
        self.read_end, self._write_end = os.pipe()
        try:  # fewer wake-ups; the limit (pipe-max-size) may refuse, and 64 KB still works
            fcntl.fcntl(self._write_end, fcntl.F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass
        self._complete, self._stop = complete, stop
        threading.Thread(target=self._run, name="spool-follower", daemon=True).start()

    def _run(self) -> None:
        offset = 0
        try:
            while not self._stop.is_set():
                complete = self._complete.is_set()  # before the read: a last write is not missed
                sent = os.sendfile(self._write_end, self._fd, offset, 1 << 20)
                offset += sent
                if not sent:
                    if complete:
                        return
                    self._complete.wait(0.005)
        except OSError:  # EPIPE: the reader is done (or was killed)
            pass
        finally:
            os.close(self._fd)
            os.close(self._write_end)


class ParallelLoad(PlaintextSpool):
    """Where decoded bytes go when the restore spools into a database made for it: the private
    plaintext file, read back while it grows. The schema (pre-data) is created from the archive's
    head; then `jobs` pg_restore processes each read the
    stream and load their share of the tables as the bytes arrive, skipping the others (shares
    balanced by the tables' size at backup time, in archive order: a stream is read in order).
    Decoding thus overlaps loading, as in `pg_restore -j` from a finished file it could not. The
    checksum is still checked at the end: a corrupt copy fails the restore and the database made
    for it is dropped. Indexes and constraints follow from the finished file (run_post_data)."""

    # The decoder runs beside the backends loading the tables; where they compete for cores, the
    # backend loading the largest table is what the restore waits for, so the decoder yields to it
    # (measured on 2 cores, RTO against pg_restore -j 2: 1.33x -> 1.21x, median of 4 interleaved
    # rounds). Alone, it runs at full speed.
    decoder_niceness = 10

    def __init__(
        self,
        server: DatabaseConfig,
        db_name: str,
        dbname: str,
        request: RestoreRequest,
        plaintext: Path,
        manifest: Manifest,
        log: Log = lambda m: None,
    ):
        self.server, self.db_name, self.dbname, self.plaintext = server, db_name, dbname, plaintext
        self.request, self.log = request, log
        self.weights = manifest.table_bytes or manifest.tables  # sizes; rows for older backups
        self.t0 = time.monotonic()
        self.decoded_s = self.loaded_s = 0.0
        super().__init__(plaintext)  # before the database: a file that cannot be made leaves no database
        try:
            self.major = create_database(server, db_name, dbname, True)
        except BaseException:
            super().abort()
            raise
        self.complete, self.stop = threading.Event(), threading.Event()
        self.running: list[_PgRestore] = []
        self.toc: list[str] = []  # pg_restore --list --verbose: the entries and their dependencies
        self.built: set[str] = set()  # post-data entries built while other tables loaded
        self.error: BaseException | None = None
        self.dropped = False
        self.loader = threading.Thread(target=self._load, name="parallel-load", daemon=True)
        self.loader.start()

    def _start(self, args: list[str], stdout=subprocess.DEVNULL, use_list: Sequence[str] | None = None) -> _PgRestore:
        follower = _Follower(self.plaintext, self.complete, self.stop)
        cmd = _pg_restore_cmd(self.server, self.major, self.dbname, self.request) + args
        try:
            proc = _PgRestore(cmd, self.server, self.db_name, stdin=follower.read_end, stdout=stdout, use_list=use_list)
        finally:
            os.close(follower.read_end)  # pg_restore holds it now
        self.running.append(proc)
        if self.stop.is_set():  # abort() ran meanwhile: it may have missed this one
            proc.kill()
        return proc

    def _wait(self, procs: list[_PgRestore]) -> None:
        while None in (states := [p.proc.poll() for p in procs]):  # every one polled, not the first running
            if any(state not in (None, 0) for state in states):
                break  # one failed: the others are stopped below
            time.sleep(0.05)
        # the one the server refused for lack of room first: the others may have died of its crash
        failed = sorted((p for p in procs if p.proc.returncode not in (None, 0)), key=lambda p: not p.server_full())
        if failed:  # the others stop now, not once they have loaded their share
            for other in procs:
                other.kill()
            failure = failed[0].failure(self.dbname)
            if failed[0].server_full() and self._spool_on_server_disk():
                # the spool may be what filled it: streaming needs none (else streaming would load
                # the same data into the same full disk, so the restore fails here)
                raise OutputFull(f"{failure}; the spool in {self.plaintext.parent} is on the server's disk")
            raise RestoreError(failure)
        for p in procs:
            p.wait(self.dbname, self.log, self.t0)

    def _cores_shared(self) -> bool:
        """Whether the decoder, the loaders and the server's backends compete for too few cores:
        the server runs here and there are no more cores than loaders. Then the loaders after the
        first (the heaviest share) start once the dump is decoded: measured on 2 cores, loading the
        other tables beside the decoder slowed the heaviest table, which decides the restore's end."""
        return _local_server(self.server) and len(os.sched_getaffinity(0)) <= self.request.jobs

    def _spool_on_server_disk(self) -> bool:
        """Whether the spool shares a filesystem with the server's data directory (a local server;
        assumed so when the data directory cannot be read: SHOW data_directory needs a superuser or
        pg_read_all_settings)."""
        if not _local_server(self.server):
            return False
        try:
            with connect(self.server, self.db_name, dbname="postgres") as conn:
                row = conn.execute("SHOW data_directory").fetchone()
            return row is None or os.stat(row[0]).st_dev == os.stat(self.plaintext.parent).st_dev
        except Exception:  # unreachable, not allowed, not stat-able from here: it may share the disk
            return True

    def _load(self) -> None:
        try:
            listing = self._start(["--list"], stdout=subprocess.PIPE)
            assert listing.proc.stdout is not None
            with listing.proc.stdout:
                self.toc = toc = listing.proc.stdout.read().decode(errors="replace").splitlines()
            self._wait([listing])
            self._wait([self._start(["--section=pre-data"])])
            shares = share_tables(toc, self.weights, self.request.jobs)
            loaders = []
            for i, share in enumerate(shares):
                if i and self._cores_shared():  # the heaviest share first, beside the decoder
                    while not (self.complete.wait(0.1) or self.stop.is_set()):
                        if any(p.proc.poll() not in (None, 0) for p in loaders):
                            self._wait(loaders)  # raises its error: the fetch stops
                loaders.append(self._start(["--section=data"], use_list=share))
            self._wait_indexing_loaded_shares(loaders, shares, toc)
            self.loaded_s = time.monotonic() - self.t0
            self.log(
                f"schema and data of {self.dbname} loaded by {len(loaders)} pg_restore as the dump decoded, in "
                f"{self.loaded_s:.1f}s; {len(self.built)} indexes and constraints of the tables loaded first built meanwhile"
            )
        except BaseException as e:
            self.error = e

    def _wait_indexing_loaded_shares(self, loaders: list[_PgRestore], shares: list[list[str]], toc: list[str]) -> None:
        """Wait for the loaders; meanwhile, once a share has loaded, build the indexes and
        constraints that need only its tables beside the loaders still running, as `pg_restore -j`
        does from a finished file (on 2 cores the restore otherwise ends with every index built
        after the largest table has loaded)."""
        building: list[_PgRestore] = []
        looked: set[int] = set()  # the loaded shares whose entries have been looked at
        while True:
            states = [p.proc.poll() for p in loaders + building]
            if None not in states or any(state not in (None, 0) for state in states):
                break
            loaded = {i for i, p in enumerate(loaders) if p.proc.returncode == 0}
            if loaded != looked and all(b.proc.returncode is not None for b in building):
                looked = loaded
                ready = [
                    line
                    for line in post_data_ready(toc, [line for i in loaded for line in shares[i]])
                    if line not in self.built
                ]
                if ready:
                    building.append(self._start(["--section=post-data"], use_list=ready))
                    self.built.update(ready)
            time.sleep(0.05)
        self._wait(loaders + building)

    def post_data(self, log: Log) -> float:
        """Indexes, constraints and triggers not built while the tables loaded, in parallel."""
        rest = [line for line in self.toc if line not in self.built]
        return run_post_data(
            self.server, self.db_name, self.dbname, self.plaintext, self.request, self.major, log, rest
        )

    def failure(self) -> BaseException | None:
        return self.error  # a loader's: the decoding stops (fetch_and_load reads no further)

    def finish(self, log: Log) -> None:
        """The file is whole and verified: the loaders read to its end; fail loudly if one failed."""
        super().finish(log)
        self.decoded_s = time.monotonic() - self.t0
        self.complete.set()
        try:
            while self.loader.is_alive():
                self.loader.join(0.1)
        except BaseException:  # interrupted (run cancelled, Ctrl-C): the loaders must not go on alone
            self.abort()
            raise
        if self.error is not None:
            self.abort()
            raise self.error

    def abort(self) -> None:
        """Stop every loader, remove the plaintext, drop the database made for this restore."""
        self.stop.set()
        for p in self.running:
            p.kill()
        self.loader.join(timeout=10)
        for p in self.running:
            p.kill()  # one started while the first kills ran
        super().abort()
        if not self.dropped:
            self.dropped = True
            drop_database(self.server, self.db_name, self.dbname)


def _list_fd(entries: Sequence[str]) -> int:
    """A pg_restore --use-list held in memory (a memfd the child opens as /dev/fd/N): no file on
    disk, so a full disk cannot refuse it and a killed restore leaves none behind."""
    fd = os.memfd_create("pg_restore-use-list", os.MFD_CLOEXEC)
    try:
        data = memoryview("".join(f"{line}\n" for line in entries).encode())
        while data:
            data = data[os.write(fd, data) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


_TABLE_DATA = re.compile(r"^\d+; \d+ \d+ TABLE DATA (\S+) (\S+) ")


def share_tables(toc: Sequence[str], weights: dict[str, int], jobs: int) -> list[list[str]]:
    """`pg_restore --list` shared among at most `jobs` loaders, each run with --section=data: the
    table data, heaviest first to the lightest share; every other entry to the first share only, so
    whatever else the data section holds (sequence values, large objects) loads exactly once. Each
    share keeps archive order; the first holds the heaviest table. A table of unknown weight (a name
    with a space) weighs 1."""
    entries = [line for line in toc if line.strip() and not line.startswith(";")]
    tables = [(i, _TABLE_DATA.match(line)) for i, line in enumerate(entries) if " TABLE DATA " in line]
    others = sorted(set(range(len(entries))) - {i for i, _ in tables})
    shares: list[list[int]] = [others] + [[] for _ in range(max(0, min(jobs, len(tables)) - 1))]
    loads = [0] * len(shares)
    weighed = sorted(((weights.get(f"{m[1]}.{m[2]}", 1) if m else 1), i) for i, m in tables)
    for weight, i in reversed(weighed):
        lightest = loads.index(min(loads))
        shares[lightest].append(i)
        loads[lightest] += max(weight, 1)
    return [[entries[i] for i in sorted(share)] for share in shares if share]


_ENTRY = re.compile(r"^(\d+); \d+ \d+ (.*)$")
_DEPENDS = re.compile(r"^;\s+depends on:((?: \d+)+)\s*$")


def post_data_ready(toc: Sequence[str], loaded: Sequence[str]) -> list[str]:
    """The indexes and constraints (primary key, unique, exclusion) of `pg_restore --list --verbose`
    whose every dependency is a table whose data is among the `loaded` entries: these may be built
    while other tables still load. Anything else (foreign keys, triggers, an index on a partitioned
    table, whatever depends on another post-data entry) waits for the rest of post-data."""
    entries: list[tuple[int, str, str]] = []  # dump id, "TYPE schema name owner", the line
    depends: dict[int, set[int]] = {}
    for line in toc:
        if m := _ENTRY.match(line):
            entries.append((int(m[1]), m[2], line))
        elif (m := _DEPENDS.match(line)) and entries:
            depends[entries[-1][0]] = {int(d) for d in m[1].split()}
    loaded_data = set(loaded)
    tables = {  # a TABLE DATA entry depends on its table alone
        next(iter(depends[dump_id]))
        for dump_id, what, line in entries
        if what.startswith("TABLE DATA ") and line in loaded_data and len(depends.get(dump_id, ())) == 1
    }
    ready = {
        dump_id
        for dump_id, what, _ in entries
        if (what.startswith("CONSTRAINT ") or (what.startswith("INDEX ") and not what.startswith("INDEX ATTACH ")))
        and depends.get(dump_id)
        and depends[dump_id] <= tables
    }
    # Their comments and security labels go with them: pg_dump gives these no section, and
    # pg_restore takes the section of the entry before, which in the rest of post-data (from a list
    # without the entries built here) may be table data, so they would be skipped there.
    ready |= {
        dump_id
        for dump_id, what, _ in entries
        if what.startswith(("COMMENT ", "SECURITY LABEL ")) and depends.get(dump_id) and depends[dump_id] <= ready
    }
    return [line for dump_id, _, line in entries if dump_id in ready]


# Where fetch_and_load streams the decoded dump.
Sink = RestoreSink | PlaintextSpool | ParallelLoad


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
    server: DatabaseConfig,
    db_name: str,
    dbname: str,
    plaintext: Path,
    request: RestoreRequest,
    major: int,
    log: Log,
    use_list: Sequence[str] | None = None,
) -> float:
    """Indexes, constraints and triggers, in parallel, from the archive's head (they need only the
    TOC); only those in `use_list` if given."""
    if request.data_only:
        return 0.0
    t0 = time.monotonic()
    cmd = _pg_restore_cmd(server, major, dbname, request) + [
        "--section=post-data",
        f"--jobs={request.jobs}",
        str(plaintext),
    ]
    _PgRestore(cmd, server, db_name, use_list=use_list).wait(dbname, log, t0)
    took = time.monotonic() - t0
    log(f"indexes and constraints of {dbname} built in {took:.1f}s ({request.jobs} jobs)")
    return took
