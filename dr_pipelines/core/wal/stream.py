"""`dr-pipelines wal-stream DB`: WAL streamed as PostgreSQL writes it, for an RPO of seconds.

A managed `pg_receivewal` on a physical replication slot (PostgreSQL keeps WAL until the slot has
received it) writes into a spool; this process supervises it and pushes what it receives:

- each complete segment (and timeline history) through `wal_push`, the archive_command's own code:
  same layout and sidecars, an identical re-push succeeds, different bytes are refused. So
  archive_command can (and should) keep running alongside: whichever pushes a segment first, the
  other finds it identical, and streaming never makes a gap;
- the segment being received, every `partial_interval` while it grows, as
  `<segment>.stream.partial` (`prepare_streamed_partial`: read and encoded once;
  `store_streamed_partial` on each location), replaced as it grows and removed once the whole
  segment is archived; recovery replays it only when it asks for the newest WAL (pitr's
  `wal-fetch --partial`). Not to locations with object lock or a retention policy: each
  replacement would be a new locked version;
- each location is called in its own thread: one that fails, or has not answered within
  max(5 s, 4 x partial_interval), is left to a background retry (backoff 1 s doubling to 30 s)
  until it answers, so the other locations keep up meanwhile (a location that hangs costs that
  wait once). The files it lacks stay in the spool until it has them, and the status says which
  are missing where.

pg_receivewal is restarted when it dies (backoff 1 s doubling to 30 s, the reason logged); it
resumes at the start of the partial segment in the spool or, with an empty spool, at the slot's
restart_lsn, so nothing is skipped. SIGTERM or SIGINT: pg_receivewal is stopped, what it received
is pushed, and the exit code says whether everything reached every location (0) or not (1).

The state directory (`streaming.spool_dir`): `wal/` (pg_receivewal's, private), `status.json`
(rewritten about every second: what the observer and people read), `lock` (one wal-stream per
directory). Never imports dagster.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dr_pipelines.core.config import DrConfig, GCSLocationConfig, S3LocationConfig
from dr_pipelines.core.durable import write_atomically
from dr_pipelines.core.errors import DrError, UsageError
from dr_pipelines.core.log import Log
from dr_pipelines.core.memory import return_large_buffers
from dr_pipelines.core.postgres.wal_names import HISTORY, SEGMENT
from dr_pipelines.core.storage.base import Location, forget_down

STATUS = "status.json"
LOCK = "lock"
WAL_DIR = "wal"

RESTART_MIN_S, RESTART_MAX_S = 1.0, 30.0  # pg_receivewal restarts
STABLE_RUN_S = 30.0  # a pg_receivewal that ran this long was fine: the next restart waits RESTART_MIN_S again
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0  # a location that failed
STOP_WAIT_S = 10.0  # for pg_receivewal to stop on SIGINT
FINAL_WAIT_S = 30.0  # at the end: for calls in flight, then for each location's last push


class StreamSetupError(UsageError):
    """Streaming cannot start as configured; the message says what to change."""


class StreamError(DrError):
    pass


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def state_dir(config: DrConfig, database: str) -> Path:
    return config.database(database).streaming.spool_path(database, config.base_dir)


def read_stream_status(config: DrConfig, database: str) -> dict | None:
    """The status wal-stream last wrote for `database`, if this host can read it."""
    try:
        return json.loads((state_dir(config, database) / STATUS).read_text())
    except (OSError, ValueError):
        return None


def receivewal_path(config: DrConfig, database: str) -> str:
    """pg_receivewal: in pg_bin_dir when it is set (a configured directory without it is a mistake,
    not a reason to run another version), else where the other client tools are found."""
    from dr_pipelines.core.postgres.client import ToolMissing, pg_tool

    db = config.database(database)
    if db.pg_bin_dir:
        path = Path(db.pg_bin_dir) / "pg_receivewal"
        if not path.is_file():
            raise StreamSetupError(
                f"pg_receivewal is not in databases.{database}.pg_bin_dir ({db.pg_bin_dir}): install the "
                "PostgreSQL client tools of the server's version there (Debian: postgresql-client-15), or "
                "fix pg_bin_dir"
            )
        return str(path)
    try:
        return pg_tool("pg_receivewal", db)
    except ToolMissing as e:
        raise StreamSetupError(f"wal-stream needs pg_receivewal: {e}") from None


def immutable(config: DrConfig, location: str) -> bool:
    """Object lock or a retention policy: an object replaced every second would pile up locked versions."""
    cfg = config.locations[location]
    return (isinstance(cfg, S3LocationConfig) and cfg.object_lock is not None) or (
        isinstance(cfg, GCSLocationConfig) and cfg.retention_days is not None
    )


# --------------------------------------------------------------------------- the server's side


def _names_listed(setting: str) -> set[str]:
    """The standby names in a synchronous_standby_names value ('FIRST 1 (a, "b")', 'ANY 2 (...)', 'a')."""
    body = re.sub(r"^\s*(?:(?:FIRST|ANY)\s+)?\d+\s*\(", "", setting, flags=re.I).rstrip(") ")
    out = set()
    for part in body.split(","):
        part = part.strip()
        if part.startswith('"') and part.endswith('"'):
            out.add(part[1:-1])
        elif part:
            out.add(part.lower())
    return out


@dataclass
class ServerSetup:
    slot: str
    created: bool
    user: str
    system_identifier: str | None  # None when this role may not read it
    notes: list[str] = field(default_factory=list)  # what to change on the server (warnings)


def synchronous_lines(slot: str) -> list[str]:
    """What makes commits wait for the streamer (the operator's choice: commits block while it is down)."""
    return [
        f"ALTER SYSTEM SET synchronous_standby_names = '\"{slot}\"';",
        "ALTER SYSTEM SET synchronous_commit = on;",
        "SELECT pg_reload_conf();",
    ]


def prepare_server(
    config: DrConfig, database: str, log: Log, refuse: Callable[[str], None] = lambda system_identifier: None
) -> ServerSetup:
    """Check that the server can stream to us, and create the slot if it is missing. Every refusal
    says what to change. `refuse` raises if the server (its system identifier) may not stream here:
    before the slot is made, so a refused start leaves no slot holding WAL."""
    from dr_pipelines.core.child_env import libpq_env
    from dr_pipelines.core.postgres.client import connect, server_facts

    db = config.database(database)
    streaming = db.streaming
    if not streaming.enabled:
        raise StreamSetupError(
            f"databases.{database}.streaming.enabled is false: set it to true to stream this database's WAL"
        )
    slot = streaming.slot_name(database)
    tool = receivewal_path(config, database)
    with connect(db, database, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_user, rolsuper, rolreplication, current_setting('wal_level'), "
            "current_setting('max_wal_senders')::int, current_setting('synchronous_standby_names'), "
            "current_setting('synchronous_commit'), pg_is_in_recovery() "
            "FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert row is not None  # the current user is a role
        user, superuser, replication, wal_level, senders, sync_names, sync_commit, in_recovery = row
        if not (superuser or replication):
            raise StreamSetupError(
                f"role {user!r} (databases.{database}.user) lacks the REPLICATION attribute that pg_receivewal "
                f"needs. As a superuser run: ALTER ROLE {user} REPLICATION; and let it connect for "
                f"replication in pg_hba.conf (host replication {user} <wal-stream's address> scram-sha-256); "
                "or configure a user that has it"
            )
        if wal_level == "minimal" or senders < 1:
            raise StreamSetupError(
                f"the server of {database!r} cannot stream WAL (wal_level = {wal_level}, max_wal_senders = "
                f"{senders}): set wal_level = replica and max_wal_senders >= 2, then restart PostgreSQL "
                f"(`dr-pipelines pg-config {database}` prints the lines)"
            )
        if in_recovery:
            raise StreamSetupError(f"databases.{database} points at a standby (in recovery): stream from the primary")
        system_identifier = server_facts(conn)["system_identifier"]
        refuse(system_identifier)
        found = conn.execute(
            "SELECT slot_type, wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
        created = found is None
        if found is None:  # reserve WAL now: from this moment PostgreSQL keeps it for us
            conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
            log(f"created the physical replication slot {slot}")
        elif found[0] != "physical":
            raise StreamSetupError(
                f"replication slot {slot!r} on {database!r} is a {found[0]} slot: choose another name "
                f"(databases.{database}.streaming.slot)"
            )
        elif found[1] == "lost":
            raise StreamError(
                f"replication slot {slot} of {database!r} has lost WAL that was never received "
                "(max_slot_wal_keep_size removed it): the archive has a gap there unless archive_command "
                f"covered it. Drop the slot (SELECT pg_drop_replication_slot('{slot}')), start wal-stream "
                f"again (it makes a new one), then check `dr-pipelines wal list {database}` for gaps"
            )
    notes = []
    if streaming.synchronous:
        if not {slot, "*"} & _names_listed(sync_names):
            notes.append(
                f"synchronous: true, but synchronous_standby_names ({sync_names!r}) does not name {slot}: commits "
                "do not wait for the streamer. To make them wait (they then also wait while wal-stream is down) "
                "run on the primary: " + " ".join(synchronous_lines(slot))
            )
        if sync_commit in ("off", "local"):
            notes.append(f"synchronous_commit = {sync_commit}: commits do not wait for the streamer; set it to on")
        elif sync_commit == "remote_apply":
            notes.append(
                "synchronous_commit = remote_apply: pg_receivewal never applies WAL, so every commit would "
                "wait forever; set it to on"
            )
    # the replication connection itself (pg_hba.conf's replication lines, max_wal_senders in use):
    # pg_receivewal says so now rather than at every restart
    env = {**libpq_env(db, database), "PGAPPNAME": slot}
    check = subprocess.run(
        [tool, "--create-slot", "--if-not-exists", "-S", slot, "-w"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if check.returncode != 0:
        said = " | ".join(check.stderr.strip().splitlines()[-3:]) or f"exit {check.returncode}"
        raise StreamSetupError(
            f"pg_receivewal cannot open a replication connection to {database!r} as {user}: {said}. Allow it in "
            f"pg_hba.conf (host replication {user} <wal-stream's address> scram-sha-256) and check "
            "max_wal_senders"
        )
    return ServerSetup(slot, created, user, system_identifier, notes)


# --------------------------------------------------------------------------- the streamer


def _why(error: BaseException, location: str) -> str:
    """What went wrong on `location`, in its own words (not the archive_command's advice)."""
    from dr_pipelines.core.wal.push import WalPartlyStored

    if isinstance(error, WalPartlyStored) and location in error.failures:
        return error.failures[location]
    return str(error) or type(error).__name__


def _die_with_parent():
    """For pg_receivewal, run between fork and exec: SIGTERM when wal-stream dies (even by SIGKILL),
    so no orphan keeps the slot busy for the next wal-stream. Resolved before the fork: the child
    of a threaded process must not import anything."""
    import ctypes

    prctl, sig = ctypes.CDLL(None, use_errno=True).prctl, int(signal.SIGTERM)

    def set_death_signal() -> None:
        prctl(1, sig)  # PR_SET_PDEATHSIG

    return set_death_signal


class WalStreamer:
    def __init__(
        self,
        config: DrConfig,
        database: str,
        locations: dict[str, Location],
        stop: threading.Event,
        log: Log,
        setup: ServerSetup,
        known: dict | None,
    ):
        self.config, self.database, self.locations, self.stop, self.log = config, database, locations, stop, log
        self.streaming = config.database(database).streaming
        self.slot = setup.slot
        self.state = state_dir(config, database)
        self.spool = self.state / WAL_DIR
        self.interval = self.streaming.partial_interval.total_seconds()
        self.tick = max(0.05, min(0.25, self.interval / 4))
        # how long a push may take on one location before that location counts as down (its call
        # goes on in the background; the others are not held back by it)
        self.deadline = max(5.0, 4 * self.interval)
        self.tool = receivewal_path(config, database)
        self.known = known  # the archive's cluster record (read at start; written by the first push if none)
        # pg_receivewal
        self.child: subprocess.Popen | None = None
        self.child_started = 0.0
        self.child_started_at: str | None = None
        self.restarts = 0
        self.restart_at = 0.0
        self.restart_delay = RESTART_MIN_S
        self.last_exit: str | None = None
        self.last_exit_quick = False
        self.stderr_tail: deque[str] = deque(maxlen=20)
        # what is archived where; guarded by self.lock (the retry threads share it)
        self.lock = threading.Lock()
        self.done: set[str] = set()  # complete files durable on every location (this run)
        self.pending: dict[str, set[str]] = {}  # complete file -> locations that still lack it
        self.refused: dict[str, str] = {}  # file -> why a location refused it (other bytes, another cluster)
        self.busy: set[str] = set()  # locations with a call in flight: not called again meanwhile
        self.down: dict[str, str] = {}  # location -> why it is being retried
        self.down_since: dict[str, str] = {}
        self.retry_at: dict[str, float] = {}
        self.retry_delay: dict[str, float] = {}
        self.partial_targets = [n for n in locations if not immutable(config, n)]
        self.partial_have: dict[str, tuple] = {}  # location -> (file, WAL end) of the partial it holds
        self.partial_errors: dict[str, str] = {}  # location -> why its last partial push failed
        self.partial_error: str | None = None  # why the newest partial could not be read or prepared
        self.newer_there: dict[str, str] = {}  # location -> partial it holds longer than the spool's (warned)
        self.partial_pushed_at = 0.0
        self.pushed_partial: dict | None = None
        self.started_at = _now()

    # ------------------------------------------------------------------ pg_receivewal

    def _argv(self) -> list[str]:
        argv = [self.tool, "-D", str(self.spool), "-S", self.slot, "--no-loop", "-w"]
        argv += ["-s", str(max(1, round(self.interval)))]  # report the position often: the slot advances with it
        if self.streaming.synchronous:
            argv.append("--synchronous")
        return argv

    def _start_child(self) -> None:
        from dr_pipelines.core.child_env import libpq_env

        env = {**libpq_env(self.config.database(self.database), self.database), "PGAPPNAME": self.slot}
        self.stderr_tail.clear()
        self.child = subprocess.Popen(
            self._argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=self.state,
            start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop it after a last push
            preexec_fn=_die_with_parent(),  # started from the main thread only (the death signal follows it)
        )
        self.child_started = time.monotonic()
        self.child_started_at = _now()
        threading.Thread(target=self._read_stderr, args=(self.child,), daemon=True).start()
        self.log(f"pg_receivewal started (pid {self.child.pid}): {' '.join(self._argv()[1:])}")

    def _read_stderr(self, child: subprocess.Popen) -> None:
        assert child.stderr is not None
        for raw in child.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.stderr_tail.append(line)
                self.log(line if line.startswith("pg_receivewal") else f"pg_receivewal: {line}")

    def _supervise(self) -> None:
        now = time.monotonic()
        if self.child is not None and self.child.poll() is not None:
            rc, ran = self.child.returncode, now - self.child_started
            time.sleep(0.05)  # its last words
            why = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
            said = " | ".join(list(self.stderr_tail)[-3:])
            self.last_exit = f"{why} after {ran:.1f}s" + (f": {said}" if said else "")
            self.child = None
            self._push_partial(force=True)  # what it received before it stopped
            # the first failure after a good run waits 1 s; each quick failure after it twice as long
            quick = ran < STABLE_RUN_S and self.last_exit_quick
            self.restart_delay = min(RESTART_MAX_S, self.restart_delay * 2) if quick else RESTART_MIN_S
            self.last_exit_quick = ran < STABLE_RUN_S
            self.restart_at = now + self.restart_delay
            self.log(f"pg_receivewal stopped ({self.last_exit}); restarting it in {self.restart_delay:g}s")
        if self.child is None and now >= self.restart_at:
            self.restarts += 1
            self._start_child()
            self.log(f"restarted pg_receivewal ({self.restarts} restarts so far)")

    def _stop_child(self) -> None:
        child = self.child
        if child is None:
            return
        if child.poll() is None:
            child.send_signal(signal.SIGINT)  # pg_receivewal's clean stop
            try:
                child.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.child = None

    # ------------------------------------------------------------------ calls to the locations

    def _spool_files(self) -> tuple[list[str], list[str]]:
        """(complete segments and histories, partial files), sorted."""
        try:
            names = os.listdir(self.spool)
        except FileNotFoundError:
            return [], []
        complete = sorted(n for n in names if SEGMENT.match(n) or HISTORY.match(n))
        partial = sorted(n for n in names if n.endswith(".partial") and SEGMENT.match(n[:24]))
        return complete, partial

    def _usable(self, name: str) -> bool:
        with self.lock:
            return name not in self.down and name not in self.busy

    def _mark_down(self, name: str, why: str) -> None:
        with self.lock:
            if name not in self.down:
                self.down_since[name] = _now()
                self.retry_delay[name] = RETRY_MIN_S
                self.retry_at[name] = time.monotonic() + RETRY_MIN_S
                self.log(f"location {name} failed ({why}); retried in the background, the others go on")
            self.down[name] = why

    def _each(self, names: list[str], call, deadline: float) -> dict[str, tuple[BaseException | None, object]]:
        """`call(location)` on each location at once, each in its own thread: (error or None, result)
        per location. One that has not answered by `deadline` seconds gets a TimeoutError; its call
        goes on, and the location is busy (skipped) until it returns."""
        threads: dict[str, tuple[threading.Thread, dict]] = {}
        out: dict[str, tuple[BaseException | None, object]] = {}
        for n in names:
            with self.lock:
                if n in self.busy:
                    out[n] = (TimeoutError("an earlier call to it has not returned yet"), None)
                    continue
                self.busy.add(n)
            box: dict = {}
            t = threading.Thread(target=self._call_one, args=(n, call, box), name=f"push-{n}", daemon=True)
            threads[n] = (t, box)
            t.start()
        end = time.monotonic() + deadline
        for n, (t, box) in threads.items():
            t.join(max(0.0, end - time.monotonic()))
            if t.is_alive():
                out[n] = (TimeoutError(f"no answer within {deadline:g}s"), None)
            else:
                out[n] = (box.get("error"), box.get("result"))
        return out

    def _call_one(self, name: str, call, box: dict) -> None:
        try:
            box["result"] = call(name)
        except BaseException as e:  # reported by the caller
            box["error"] = e
        finally:
            with self.lock:
                self.busy.discard(name)

    def _failed(self, name: str, file: str, error: BaseException) -> bool:
        """A call to location `name` for `file` failed: refused (True: never tried there again, and
        reported), or the location is down (retried in the background)."""
        from dr_pipelines.core.wal.archive import WalRefused

        if isinstance(error, WalRefused):
            with self.lock:
                new = file not in self.refused
                self.refused[file] = str(error)
            if new:
                self.log(f"error: {error}")
            return True
        self._mark_down(name, _why(error, name))
        return False

    def _push_file(self, path: Path, name: str) -> object:
        """A complete file to one location, with the archive_command's own code (wal_push: same
        sidecars, an identical copy is fine, other bytes are refused); then the streamed partial of
        that segment goes from there. One location per call, so a slow one holds back no other."""
        from dr_pipelines.core.wal.push import drop_streamed_partial, wal_push

        loc = {name: self.locations[name]}
        result = wal_push(self.config, self.database, path, loc)
        if SEGMENT.match(path.name):
            for problem in drop_streamed_partial(self.database, path.name, loc, self.config):
                self.log(f"warning: the streamed partial of {path.name} stays on {problem}")
        return result

    # ------------------------------------------------------------------ pushing

    def _push_complete(self, everywhere: bool = False) -> None:
        """Push the complete files not yet on every location to the locations that are up (all of
        them with `everywhere`, as at shutdown); what a location lacks stays pending for it."""
        complete, _ = self._spool_files()
        pushed = []
        for file in complete:
            with self.lock:
                if file in self.done or file in self.refused or (file in self.pending and not everywhere):
                    continue
                lacking = set(self.pending.get(file, self.locations))
            if everywhere:
                for n in lacking:
                    forget_down(n)
            targets = [n for n in self.locations if n in lacking and (everywhere or self._usable(n))]
            path = self.spool / file
            outcomes = self._each(targets, lambda n, path=path: self._push_file(path, n), self.deadline)
            ok, refused = set(), set()
            for n, (error, result) in outcomes.items():
                if error is None:
                    ok.add(n)
                    if getattr(result, "stored", None):
                        pushed.append(file)
                elif self._failed(n, file, error):
                    refused.add(n)
            with self.lock:
                missing = lacking - ok - refused
                if missing:
                    self.pending[file] = missing
                else:
                    self.pending.pop(file, None)
                    if not refused:
                        self.done.add(file)
        if pushed:
            pushed = sorted(set(pushed))
            self.log(f"pushed {pushed[0]}" + (f" .. {pushed[-1]} ({len(pushed)} files)" if len(pushed) > 1 else ""))

    def _newest_partial(self) -> tuple[str, bytes, tuple[str, int]] | None:
        """The newest partial segment in the spool: (file, its bytes, its version), or None when there
        is none or nothing was received into it yet. The version is its content's (the file and
        where its WAL ends), not the file's mtime or size: pg_receivewal pre-pads the file, and
        an mtime may not move between two writes."""
        from dr_pipelines.core.postgres.wal_names import written_end
        from dr_pipelines.core.wal.archive import segment_header

        _, partials = self._spool_files()
        if not partials:
            return None
        name = max(partials, key=lambda n: n[8:24] + n[:8])  # the newest position, whatever the timeline
        try:
            data = (self.spool / name).read_bytes()
        except FileNotFoundError:  # completed meanwhile: pushed whole on the next tick
            return None
        if not data[:40].strip(b"\0"):  # just made, nothing received into it yet
            return None
        try:
            end = written_end(data, name[:24], segment_header(data)["segment_size"])
        except DrError:
            end = -len(data.rstrip(b"\0"))  # not WAL: prepare_streamed_partial says why
        return name, data, (name, end)

    def _push_partial(self, force: bool = False, everywhere: bool = False) -> None:
        """Push the newest partial segment to the locations that lack its current content, at most
        every partial_interval (`force`: now, read again). `everywhere` (the last push): every
        location, each asked what it holds (store_streamed_partial writes only where it lacks this
        content). Read and encoded once for all of them."""
        from dr_pipelines.core.wal.push import NEWER_THERE, prepare_streamed_partial, store_streamed_partial

        now = time.monotonic()
        if not force and now - self.partial_pushed_at < self.interval:
            return
        if not self.partial_targets:
            return
        try:
            newest = self._newest_partial()
        except OSError as e:
            self.partial_error = f"cannot read the newest partial segment: {e}"
            self.log(f"{self.partial_error}; tried again in {self.interval:g}s")
            return
        if newest is None:
            return
        name, data, version = newest
        if everywhere:
            for n in self.partial_targets:
                forget_down(n)
        targets = [
            n for n in self.partial_targets if everywhere or (self.partial_have.get(n) != version and self._usable(n))
        ]
        if not targets:
            return
        self.partial_pushed_at = now
        try:
            partial = prepare_streamed_partial(self.config, self.database, self.spool / name, self.known, data)
        except (DrError, OSError) as e:
            self.partial_error = f"{name} not pushed: {e}"
            self.log(f"{self.partial_error}; tried again in {self.interval:g}s")
            return
        self.partial_error = None
        outcomes = self._each(
            targets, lambda n: store_streamed_partial(self.locations[n], self.database, partial), self.deadline
        )
        for n, (error, result) in outcomes.items():
            if error is None:
                self.partial_have[n] = version
                self.partial_errors.pop(n, None)
                if result == NEWER_THERE and self.newer_there.get(n) != name:
                    self.newer_there[n] = name
                    self.log(
                        f"warning: {n} already holds a longer {partial.name} than this spool's (WAL up to "
                        f"{partial.end_lsn}): left as it is (another wal-stream, or a restart with an older spool?)"
                    )
            else:
                self.partial_errors[n] = _why(error, n)
                self._failed(n, partial.name, error)
        held = sorted(n for n, v in self.partial_have.items() if v == version)
        if held:
            if self.known is None:
                self.known = {"system_identifier": partial.side["system_identifier"]}
            self.pushed_partial = {"segment": name[:24], "end_lsn": partial.end_lsn, "at": _now(), "locations": held}

    def _partial_missing(self) -> list[str]:
        """Where the newest partial in the spool, as it is now, is not held: what each location was
        last given against the file's current content."""
        try:
            newest = self._newest_partial()
        except OSError as e:
            return [f"the newest partial segment cannot be read ({e})"]
        if newest is None:
            return []
        name, _, version = newest
        return [
            f"{n} lacks the newest partial segment {name}"
            + (f" ({self.partial_errors[n]})" if n in self.partial_errors else "")
            + (f" ({self.partial_error})" if self.partial_error else "")
            for n in self.partial_targets
            if self.partial_have.get(n) != version
        ]

    # ------------------------------------------------------------------ a failed location, retried

    def _retry_loop(self) -> None:
        while not self.stop.wait(0.25):
            with self.lock:
                now = time.monotonic()
                lacking = {n for locs in self.pending.values() for n in locs}
                due = [
                    n
                    for n in self.locations
                    if n not in self.busy and (n in self.down or n in lacking) and self.retry_at.get(n, 0.0) <= now
                ]
                self.busy.update(due)
            for n in due:
                threading.Thread(target=self._retry, args=(n,), name=f"retry-{n}", daemon=True).start()

    def _retry(self, name: str) -> None:
        """Fill in what `name` lacks, oldest first; with nothing to fill, see whether it answers."""
        from dr_pipelines.core.storage.probe import probe_one
        from dr_pipelines.core.wal.archive import WalRefused

        try:
            forget_down(name)
            with self.lock:
                todo = sorted(f for f, locs in self.pending.items() if name in locs)
            filled: list[str] = []
            error: str | None = None
            for f in todo:
                if self.stop.is_set():
                    return
                try:
                    self._push_file(self.spool / f, name)
                except WalRefused as e:  # reported; never tried there again
                    self._failed(name, f, e)
                except Exception as e:
                    error = _why(e, name)
                    break
                else:
                    filled.append(f)
                with self.lock:
                    locs = self.pending.get(f, set())
                    locs.discard(name)
                    if not locs:
                        self.pending.pop(f, None)
                        if f not in self.refused:  # a refused file stays in the spool, for a look
                            self.done.add(f)
            if error is None and not todo:
                error = probe_one(self.locations[name])
            self._retried(name, filled, todo, error)
        finally:
            with self.lock:
                self.busy.discard(name)

    def _retried(self, name: str, filled: list[str], todo: list[str], error: str | None) -> None:
        with self.lock:
            if error is None:
                if name in self.down:
                    self.log(
                        f"location {name} is back"
                        + (f": filled {filled[0]} .. {filled[-1]} ({len(filled)} files)" if filled else "")
                    )
                for d in (self.down, self.retry_at, self.retry_delay, self.down_since):
                    d.pop(name, None)
                return
            self.down[name] = error
            self.down_since.setdefault(name, _now())
            delay = min(RETRY_MAX_S, self.retry_delay.get(name, RETRY_MIN_S) * 2)
            self.retry_delay[name] = delay
            self.retry_at[name] = time.monotonic() + delay
        self.log(
            f"location {name} still fails ({error}); {len(todo) - len(filled)} file(s) wait for it"
            + (f" after {len(filled)} filled" if filled else "")
            + f"; next try in {delay:g}s"
        )

    # ------------------------------------------------------------------ the spool and the status

    def _tidy_spool(self) -> None:
        """Remove complete segments durable everywhere, but the newest (pg_receivewal resumes after it)."""
        complete, _ = self._spool_files()
        segments = [n for n in complete if SEGMENT.match(n)]
        with self.lock:
            removable = [n for n in segments[:-1] if n in self.done]
        for n in removable:
            try:
                (self.spool / n).unlink()
            except FileNotFoundError:
                pass

    def status(self) -> dict:
        child = self.child
        complete, partials = self._spool_files()
        with self.lock:
            backlog: dict[str, list[str]] = {}
            for f in sorted(self.pending):
                for n in self.pending[f]:
                    backlog.setdefault(n, []).append(f)
            down = {n: {"since": self.down_since.get(n), "error": why} for n, why in self.down.items()}
            archived = max((f for f in self.done if SEGMENT.match(f)), default=None)
            refused = dict(self.refused)
        return {
            "database": self.database,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "updated_at": _now(),
            "slot": self.slot,
            "application_name": self.slot,
            "synchronous": self.streaming.synchronous,
            "partial_interval_s": self.interval,
            "receiver": {
                "pid": child.pid if child else None,
                "alive": child is not None and child.poll() is None,
                "started_at": self.child_started_at,
                "restarts": self.restarts,
                "last_exit": self.last_exit,
            },
            "received": {
                "segment": max((n for n in complete if SEGMENT.match(n)), default=None),
                "partial": max(partials)[:24] if partials else None,
            },
            "archived": {"segment": archived},  # the newest complete segment on every location
            "pushed_partial": self.pushed_partial,
            "partial_locations": self.partial_targets,
            "backlog": backlog,  # location -> complete files it still lacks (kept in the spool until it has them)
            "down": down,
            "refused": refused,
        }

    def _write_status(self, **extra) -> None:
        data = json.dumps({**self.status(), **extra}, indent=1).encode()
        try:
            write_atomically(self.state / STATUS, data)
            os.chmod(self.state / STATUS, 0o644)
        except OSError as e:
            self.log(f"warning: cannot write {self.state / STATUS}: {e}")

    # ------------------------------------------------------------------ the whole run

    def run(self) -> int:
        retry = threading.Thread(target=self._retry_loop, name="wal-stream-retry", daemon=True)
        retry.start()
        next_status = 0.0
        try:
            self._start_child()
            while not self.stop.is_set():
                self._supervise()
                self._push_complete()
                self._push_partial()
                self._tidy_spool()
                if time.monotonic() >= next_status:
                    self._write_status()
                    next_status = time.monotonic() + min(1.0, self.interval)
                self.stop.wait(self.tick)
        finally:
            self._stop_child()
        return self._finish(retry)

    def _finish(self, retry: threading.Thread) -> int:
        """The last push: everything received, to every location (those found down are tried once
        more); the exit code says whether all of it got everywhere."""
        retry.join(timeout=5)
        deadline = time.monotonic() + FINAL_WAIT_S
        while time.monotonic() < deadline:  # calls still in flight (a retry, a slow location) finish first
            with self.lock:
                if not self.busy:
                    break
            time.sleep(0.1)
        self.deadline = FINAL_WAIT_S
        self._push_complete(everywhere=True)
        self._push_partial(force=True, everywhere=True)
        status = self.status()
        self._write_status(stopped_at=_now())
        left = status["backlog"]
        stale = self._partial_missing()
        if left or stale or status["refused"]:
            self.log(
                "stopped with WAL not archived everywhere: "
                + "; ".join(
                    [f"{n} lacks {', '.join(files)}" for n, files in left.items()]
                    + stale
                    + list(status["refused"].values())
                )
                + f". It stays in {self.spool}; the next wal-stream pushes it"
            )
            return 1
        self.log("stopped; everything received is archived on every location")
        return 0


def _archive_matches(
    config: DrConfig, database: str, locations: dict[str, Location], system_identifier: str
) -> dict | None:
    """The archive's cluster record; refused at once if it names another cluster than the server's."""
    from dr_pipelines.core.wal.archive import archive_cluster

    known = archive_cluster(locations, database)
    if known and system_identifier and known.get("system_identifier") != system_identifier:
        raise StreamSetupError(
            f"the WAL archive of {database!r} belongs to cluster {known.get('system_identifier')}, but the server "
            f"is cluster {system_identifier}: refusing to mix them. If this server replaced the old one on "
            "purpose, archive it under another database name"
        )
    return known


def _spool_matches(spool: Path, database: str, system_identifier: str) -> None:
    """Refused at once if the spool holds another cluster's WAL (a directory reused after the server
    was replaced): pushing it would be refused forever, and resuming after it would skip WAL."""
    from dr_pipelines.core.wal.archive import WalRefused, segment_header

    if not system_identifier:
        return
    for path in sorted(spool.iterdir()):
        if not SEGMENT.match(path.name[:24]):
            continue
        try:
            with open(path, "rb") as f:
                head = f.read(40)
            theirs = segment_header(head)["system_identifier"]
        except (OSError, WalRefused):
            continue  # unreadable or not begun (a partial segment is zeros until written): not a claim
        if theirs != system_identifier:
            raise StreamSetupError(
                f"{path} is WAL of cluster {theirs}, but the server of {database!r} is cluster "
                f"{system_identifier}: the spool was another cluster's. Move its files away (archive them "
                "under that cluster's database name if they are needed), or set streaming.spool_dir to an empty directory"
            )


def _lock(state: Path) -> int:
    import fcntl

    fd = os.open(state / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StreamSetupError(
            f"another wal-stream runs with {state} (its lock is held): one per database and directory"
        ) from None
    return fd


def run_wal_stream(
    config: DrConfig, database: str, locations: dict[str, Location], stop: threading.Event, log: Log
) -> int:
    """Stream until `stop` is set; the exit code (0: everything received is archived everywhere)."""
    config.database(database)
    return_large_buffers()  # a segment buffer per push, for as long as it streams
    state = state_dir(config, database)
    try:
        state.mkdir(parents=True, exist_ok=True)
        (state / WAL_DIR).mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise StreamSetupError(
            f"cannot make wal-stream's directory {state} ({e.strerror}): set databases.{database}.streaming.spool_dir "
            "to a directory this user can write"
        ) from None
    fd = _lock(state)
    try:
        known: dict | None = None

        def refuse(system_identifier: str) -> None:
            nonlocal known
            known = _archive_matches(config, database, locations, system_identifier)
            _spool_matches(state / WAL_DIR, database, system_identifier)

        setup = prepare_server(config, database, log, refuse)
        for note in setup.notes:
            log(f"warning: {note}")
        skipped = [n for n in locations if immutable(config, n)]
        if skipped:
            log(
                f"partial segments are not pushed to {', '.join(skipped)} (object lock / retention: every "
                "replacement would stay as a locked version); complete segments are"
            )
        streamer = WalStreamer(config, database, locations, stop, log, setup, known)
        log(
            f"streaming {database!r} into {state / WAL_DIR} (slot and application_name {setup.slot}"
            + (", synchronous" if config.database(database).streaming.synchronous else "")
            + f"); partial segment pushed every {streamer.interval:g}s to "
            + (", ".join(streamer.partial_targets) or "no location")
        )
        return streamer.run()
    finally:
        os.close(fd)
