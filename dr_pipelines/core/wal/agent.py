"""The resident archiver (pgBackRest's asynchronous archive-push and archive-get, in our terms): one
long-lived process per cluster and config that `wal-push` hands its segments to, and that `wal-fetch`
asks for the files recovery needs, so PostgreSQL's call does not pay for a Python start, the imports,
the config and the storage clients each time.

- It serves one cluster's pg_wal under one push context (config path, size, change time and
  database); where it listens, and the protocol, are in `agent_client.py`.
- A push is answered `{"ok": true}` only when `wal_push` returned, i.e. the file is durable on every
  location (the contract of archive_command); after answering, it archives ahead what PostgreSQL
  has marked ready (`push_ahead`, the same markers as the command's own fast path).
- A fetch is answered `{"ok": true, "staged": PATH}` once the file is verified (as `wal_fetch`
  does) at PATH, a name of that request's own that the client renames into place, or
  `{"ok": false, "not_found": true}` if no location holds it; during recovery it then keeps the next
  segments spooled ahead of replay (`prefetcher.py`).
- It refuses a request for another context or another pg_wal; it exits when idle (`wal.agent_idle`),
  on SIGTERM, when its cluster stops or restarts (postmaster.pid gone or another pid), when its
  config changes (the calls go to a new agent), when dr_pipelines is upgraded, or when its socket is
  taken away; requests in flight are answered first.
- It is never required: a client that cannot reach it, gets an error, or loses it mid-request,
  pushes by itself. The lock file beside the socket, held for the agent's life, makes a second agent
  for the same cluster and config exit at once, and lets a new one replace a dead one's socket.

Started by `wal-push` (detached, stderr into the `.log` beside the socket), or by hand:
`python -m dr_pipelines.core.wal.agent --pg-wal DATA_DIR/pg_wal --config FILE [--db DB]`.
Never imports dagster.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from dr_pipelines.core.memory import return_large_buffers
from dr_pipelines.core.wal.agent_client import agent_stem, ensure_agent_dir, read_json_line
from dr_pipelines.core.wal.fast_path import push_context, take_pushed

# the names restore_command is asked for: segments, history files, backup labels, partial segments
WAL_FILE = re.compile(r"^[0-9A-F]{8}(\.history|[0-9A-F]{16}(\.partial|\.[0-9A-F]{8}\.backup)?)$")

WATCH_INTERVAL_S = 1.0  # how often it looks at its cluster, config, socket and idle time
REQUEST_TIMEOUT_S = 10.0  # to read a request line once connected
MAX_REQUEST = 64 << 10
DRAIN_WAIT_S = 300.0  # on exit, how long requests in flight may still take


def log(msg: str) -> None:
    stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    print(f"{stamp} agent[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


class Agent:
    def __init__(
        self,
        *,
        pg_wal: str,
        config_file: str,
        db: str | None,
        context: str,
        config,
        database: str,
        locations,
        sock: socket.socket,
        sock_path: str,
    ):
        self.pg_wal, self.config_file, self.db, self.context = pg_wal, config_file, db, context
        self.config, self.database, self.locations = config, database, locations
        self.sock, self.sock_path = sock, sock_path
        self.sock_ino = os.stat(sock_path).st_ino
        self.pg_wal_real = os.path.realpath(pg_wal)
        self.idle_s = config.wal.agent_idle.total_seconds()
        self.push_lock = threading.Lock()  # one push or push-ahead batch at a time (a batch is parallel itself)
        self.identities: list | None = None  # loaded by the first fetch: an archiving host may hold no key
        self.prefetcher = None
        self.fetch_serial = 0
        self.state_lock = threading.Lock()
        self.busy = 0
        self.last_active = time.monotonic()
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.stop = threading.Event()  # set by SIGTERM
        self.postmaster = _postmaster(pg_wal)  # a restarted cluster may give its commands another environment
        self.code = _code_version()  # an upgraded installation takes effect at the next agent
        self.counts = {
            "served": 0,
            "pushed": 0,
            "taken_ahead": 0,
            "archived_ahead": 0,
            "fetched": 0,
            "not_found": 0,
            "failed": 0,
            "refused": 0,
        }

    # ------------------------------------------------------------------ the loop

    def serve(self) -> tuple[str, bool]:
        """Serve until there is a reason to stop; returns it, and whether no agent will serve this
        cluster and config again (the cluster is gone or stopped, or the config changed)."""
        self.sock.settimeout(WATCH_INTERVAL_S)
        next_watch = time.monotonic() + WATCH_INTERVAL_S
        while True:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                pass
            else:
                self._dispatch(conn)
            if time.monotonic() >= next_watch:
                reason = self._reason_to_exit()
                if reason:
                    return reason
                next_watch = time.monotonic() + WATCH_INTERVAL_S

    def close(self) -> None:
        """Stop listening (the socket goes first, so no new client finds it), serve whoever was
        already waiting, and let the requests in flight finish."""
        try:
            if os.stat(self.sock_path).st_ino == self.sock_ino:
                os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
        self.sock.settimeout(0.0)
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                break
            self._dispatch(conn)
        self.sock.close()
        if self.prefetcher is not None:
            self.prefetcher.stop()
        deadline = time.monotonic() + DRAIN_WAIT_S
        while self._busy() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _dispatch(self, conn: socket.socket) -> None:
        with self.state_lock:
            self.busy += 1
            self.last_active = time.monotonic()
        threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _busy(self) -> bool:
        with self.state_lock:
            return self.busy > 0

    def _reason_to_exit(self) -> tuple[str, bool] | None:
        if self.stop.is_set():
            return "stopped (SIGTERM)", False
        postmaster = _postmaster(self.pg_wal)
        if postmaster is None:
            return f"the cluster of {self.pg_wal} is not running (no postmaster.pid)", True
        if postmaster != self.postmaster:
            return f"the cluster of {self.pg_wal} was restarted", False
        if _code_version() != self.code:
            return "dr_pipelines was upgraded", False
        if os.path.realpath(self.pg_wal) != self.pg_wal_real:
            return f"{self.pg_wal} now leads elsewhere", True
        if push_context(self.config_file, self.db) != self.context:
            return f"{self.config_file} changed; the next calls start an agent with it", True
        try:
            if os.stat(self.sock_path).st_ino != self.sock_ino:
                return f"{self.sock_path} was replaced", False
        except FileNotFoundError:
            return f"{self.sock_path} was removed", False
        with self.state_lock:
            idle = self.busy == 0 and time.monotonic() - self.last_active >= self.idle_s
        return (f"idle for {self.idle_s:g}s", False) if idle else None

    # ------------------------------------------------------------------ requests

    def _handle(self, conn: socket.socket) -> None:
        ahead_of = None
        try:
            with conn:
                conn.settimeout(REQUEST_TIMEOUT_S)
                req = read_json_line(conn, "the client closed the connection before its request was whole", MAX_REQUEST)
                reply, pushed = self._answer(req)
                conn.sendall(text_answer(reply) if req.get("answer") == "text" else json.dumps(reply).encode() + b"\n")
                ahead_of = pushed
        except Exception as e:  # the client sees the connection close without an answer and pushes by itself
            log(f"a request went unanswered: {type(e).__name__}: {e}")
        try:
            if ahead_of is not None:
                self._push_ahead(ahead_of)
        finally:
            with self.state_lock:
                self.busy -= 1
                self.last_active = time.monotonic()

    def _count(self, what: str, n: int = 1) -> None:
        with self.state_lock:
            self.counts[what] += n

    def status(self) -> dict:
        with self.state_lock:
            counts = dict(self.counts)
        prefetch = self.prefetcher.status() if self.prefetcher is not None else {}
        return {
            "pid": os.getpid(),
            "started": self.started,
            "pg_wal": self.pg_wal,
            "context": self.context,
            "database": self.database,
            "idle_s": self.idle_s,
            **counts,
            **{f"prefetch_{k}": v for k, v in prefetch.items()},
        }

    def _active(self) -> None:
        with self.state_lock:
            self.last_active = time.monotonic()

    def _answer(self, req: dict) -> tuple[dict, str | None]:
        """The reply, and the path just archived (to archive ahead of) or None."""
        if req.get("status") is True:
            return {"ok": True, **self.status()}, None
        if "fetch" in req:
            return self._fetch(req), None
        path = req.get("push")
        if not isinstance(path, str) or not os.path.isabs(path):
            return {"ok": False, "error": 'a request is {"push": ABSOLUTE_PATH, "context": CONTEXT}'}, None
        refused = self._refusal(req, path)
        if refused:
            return refused, None
        from dr_pipelines.core.errors import DrError
        from dr_pipelines.core.storage.base import forget_down
        from dr_pipelines.core.wal.push import wal_push

        with self.push_lock:
            forget_down()  # each of PostgreSQL's calls tries every location again, as a new process would
            try:
                if take_pushed(path, self.context):  # archived ahead while this call was on its way
                    self._count("taken_ahead")
                else:
                    wal_push(self.config, self.database, path, self.locations)
                    self._count("pushed")
            except Exception as e:
                self._count("failed")
                error = str(e) if isinstance(e, DrError) else f"{type(e).__name__}: {e}"
                log(f"{os.path.basename(path)}: {error}")
                return {"ok": False, "error": error}, None
        self._count("served")
        return {"ok": True}, path

    def _fetch(self, req: dict) -> dict:
        """Put the WAL file `req["fetch"]` at `req["dest"]` (in this cluster's pg_wal), as `wal-fetch`
        does; then spool the segments after it while the cluster replays."""
        name, dest, only = req.get("fetch"), req.get("dest"), req.get("locations")
        if (
            not isinstance(name, str)
            or not WAL_FILE.match(name)
            or not isinstance(dest, str)
            or not os.path.isabs(dest)
            or not (only is None or (isinstance(only, list) and all(isinstance(n, str) for n in only)))
        ):
            return {"ok": False, "error": 'a request is {"fetch": WAL_FILE, "dest": ABSOLUTE_PATH, "context": CONTEXT}'}
        refused = self._refusal(req, dest)
        if refused:
            return refused
        from dr_pipelines.core.errors import DrError
        from dr_pipelines.core.storage.base import forget_down
        from dr_pipelines.core.wal.archive import WalNotFound
        from dr_pipelines.core.wal.fast_path import spool_dir
        from dr_pipelines.core.wal.fetch import wal_fetch

        forget_down()  # each of PostgreSQL's calls tries every location again, as a new process would
        # The file goes to a name of this request's own, which the client renames into place: a
        # client that gave up waiting never finds a late answer written over what PostgreSQL reads next.
        spool = spool_dir(Path(dest))
        with self.state_lock:
            self.fetch_serial += 1
            staged = spool / f".{name}.fetched-{os.getpid()}-{self.fetch_serial}"
        try:
            locations = self._locations(only)
            spool.mkdir(exist_ok=True)
            try:  # spooled by the prefetcher while this call was on its way
                os.rename(spool / name, staged)
            except FileNotFoundError:
                wal_fetch(
                    self.config,
                    self.database,
                    name,
                    staged,
                    locations,
                    self._identities(),
                    retries=self.config.wal.fetch_retries,
                    backoff_s=self.config.wal.fetch_backoff.total_seconds(),
                    log=log,
                    partial=req.get("partial") is True,
                )
            size = staged.stat().st_size
        except WalNotFound as e:
            self._count("not_found")
            return {"ok": False, "not_found": True, "error": str(e)}
        except Exception as e:  # the client fetches by itself, and says it
            self._count("failed")
            error = str(e) if isinstance(e, DrError) else f"{type(e).__name__}: {e}"
            log(f"{name}: {error}")
            staged.unlink(missing_ok=True)
            return {"ok": False, "error": error}
        self._count("fetched")
        self._prefetch_after(name, size, only)
        return {"ok": True, "staged": str(staged)}

    def _locations(self, only: list[str] | None) -> dict:
        if not only:
            return self.locations
        unknown = sorted(set(only) - set(self.locations))
        if unknown:
            raise ValueError(f"no location named {', '.join(unknown)} in {self.config_file}")
        return {n: loc for n, loc in self.locations.items() if n in only}

    def _identities(self) -> list | None:
        if self.identities is None and self.config.encryption.method == "age":
            from dr_pipelines.core.codec.keys import load_identities

            self.identities = load_identities(self.config)
        return self.identities

    def _prefetch_after(self, name: str, segment_size: int, only: list[str] | None) -> None:
        if self.prefetcher is None:
            from dr_pipelines.core.wal.fetch import fetch_bytes
            from dr_pipelines.core.wal.prefetcher import Prefetcher

            def fetch(n: str, only: list[str] | None) -> bytes | None:
                found = fetch_bytes(self.config, self.database, n, self._locations(only), self._identities(), log)
                return found[0] if found else None

            self.prefetcher = Prefetcher(self.pg_wal, self.config.wal.prefetch, fetch, log, on_work=self._active)
        self.prefetcher.asked(name, segment_size, only)

    def _refusal(self, req: dict, path: str) -> dict | None:
        """Why this agent does not serve a request for `path` under `req`'s context, if it does not."""
        if req.get("context") != self.context:
            self._count("refused")
            return {
                "ok": False,
                "error": f"refused: this agent archives under {self.context!r}, not {req.get('context')!r}",
            }
        if os.path.realpath(os.path.dirname(path)) != self.pg_wal_real:
            self._count("refused")
            return {"ok": False, "error": f"refused: {path} is not in {self.pg_wal}, the pg_wal this agent serves"}
        return None

    def _push_ahead(self, path: str) -> None:
        from dr_pipelines.core.storage.base import forget_down
        from dr_pipelines.core.wal.push import push_ahead

        with self.push_lock:
            forget_down()
            try:  # best effort, as in the command: PostgreSQL's own call for a segment pushes it if this did not
                done = push_ahead(self.config, self.database, path, self.locations, self.context, log=log)
            except Exception as e:
                log(f"warning: archiving ahead failed ({type(e).__name__}: {e}); PostgreSQL's own calls will do it")
                return
        self._count("archived_ahead", len(done))


def text_answer(reply: dict) -> bytes:
    """The answer for the compiled client (`dr-pipelines-wal`), which reads no JSON: one line,
    `ok [STAGED]`, `not_found MESSAGE` or `error MESSAGE`."""
    if reply.get("ok") is True:
        words = ["ok", str(reply.get("staged", ""))]
    else:
        words = ["not_found" if reply.get("not_found") is True else "error", str(reply.get("error", reply))]
    return " ".join(words).strip().replace("\n", " ").encode() + b"\n"


def _postmaster(pg_wal: str) -> str | None:
    """The running postmaster's pid (postmaster.pid's first line); None if there is none."""
    try:
        with open(os.path.join(os.path.dirname(pg_wal), "postmaster.pid")) as f:
            return f.readline().strip()
    except OSError:
        return None


def _code_version() -> tuple[int, ...]:
    """When the modules a push runs were last changed (this one runs as __main__)."""
    from dr_pipelines.core.wal import archive, fast_path, fetch, prefetcher, push

    out = []
    for path in (__file__, push.__file__, archive.__file__, fast_path.__file__, fetch.__file__, prefetcher.__file__):
        try:
            out.append(os.stat(path or "").st_mtime_ns)
        except OSError:
            out.append(0)
    return tuple(out)


def _listen(sock_path: str) -> socket.socket | None:
    """A listening socket at `sock_path`; None if a live agent already answers there. Whatever else
    is there (a dead agent's socket, a stray file) is removed: only this user can write here, and
    the caller holds the lock, so it is no live agent's."""
    if os.path.lexists(sock_path):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(sock_path)
            except OSError:
                os.unlink(sock_path)
            else:
                return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(sock_path)
    os.chmod(sock_path, 0o600)
    sock.listen(16)
    return sock


def _lock(path: str) -> int | None:
    """Hold the lock file at `path` for this process's life (the kernel lets go however it ends);
    None if a live agent holds it. A lock taken on a file an exiting agent removed meanwhile is
    not the lock: take the new file's."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _warm_up(config, database: str, locations) -> None:
    """Import what a push needs and open each location's connection now, not in the first call."""
    from dr_pipelines.core.codec.encode import encode_bytes
    from dr_pipelines.core.wal.archive import archive_cluster
    from dr_pipelines.core.wal.push import wal_push  # noqa: F401

    encode_bytes(b"warm", config.compression, config.encryption)
    try:
        archive_cluster(locations, database)
    except Exception as e:  # a location down now may be up at the first call, which reports it if not
        log(f"warning: reading the archive's cluster record failed ({type(e).__name__}: {e})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dr_pipelines.core.wal.agent", description=__doc__.split("\n")[0])
    p.add_argument("--pg-wal", required=True, metavar="DIR", help="the cluster's pg_wal directory")
    p.add_argument("--config", required=True, metavar="FILE")
    p.add_argument("--db", metavar="DB", help="needed only when several databases are configured")
    args = p.parse_args(argv)
    pg_wal, config_file = os.path.abspath(args.pg_wal), os.path.abspath(args.config)
    context = push_context(config_file, args.db)  # as the clients compute it, before the config is read
    if ensure_agent_dir() is None:
        log("the agents' directory in /tmp is not private to this user; not starting")
        return 1
    stem = agent_stem(pg_wal, context)
    lock = _lock(stem + ".lock")
    if lock is None:
        return 0  # another agent serves this cluster and config
    final = False
    return_large_buffers()  # a segment buffer per push and fetch, for hours
    try:
        code, final = _run(pg_wal, config_file, args.db, context, stem)
        return code
    finally:  # the lock file goes while still held: a starting agent that opened it sees it replaced (_lock)
        os.unlink(stem + ".lock")
        if final:  # no agent will write this log again
            try:
                os.unlink(stem + ".log")
            except FileNotFoundError:
                pass
        os.close(lock)


def _run(pg_wal: str, config_file: str, db: str | None, context: str, stem: str) -> tuple[int, bool]:
    """Start and serve; the exit code, and whether no agent will serve this cluster and config again."""
    try:
        from dr_pipelines.core.config import load_config
        from dr_pipelines.core.storage.locations import open_locations

        config = load_config(config_file)
        if push_context(config_file, db) != context:
            log(f"{config_file} changed while it was read; the next call starts an agent with it")
            return 0, True
        if not config.wal.agent:
            log("wal.agent is off in the config; not starting")
            return 0, False
        database = config.named_or_only_database(db)
        locations = open_locations(config)
        _warm_up(config, database, locations)
        sock_path = stem + ".sock"
        sock = _listen(sock_path)
    except Exception as e:  # the clients push by themselves; this says why there is no agent
        log(f"cannot start: {type(e).__name__}: {e}")
        return 1, push_context(config_file, db) != context  # its config gone or changed: none will come back
    if sock is None:
        log(f"another agent answers on {sock_path}; leaving it")
        return 0, False
    agent = Agent(
        pg_wal=pg_wal,
        config_file=config_file,
        db=db,
        context=context,
        config=config,
        database=database,
        locations=locations,
        sock=sock,
        sock_path=sock_path,
    )
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())  # stop cleanly: finish what is in flight
    log(f"serving {pg_wal} for database {database!r} of {config_file} on {sock_path}")
    reason, final = agent.serve()
    log(f"exiting: {reason}")
    agent.close()
    return 0, final


if __name__ == "__main__":
    sys.exit(main())
