"""The client side of the resident archiver (`core/wal/agent.py`), run by `wal-push` before
anything heavy is imported: hand the segment to the cluster's agent over a Unix socket and return
only its verdict. The agent is never required: whatever goes wrong here, the caller pushes by itself.

Where an agent listens: `/tmp/dr_pipelines-<uid>/agent-<hash>.sock`, the hash of the cluster's
pg_wal directory (realpath) and the push context (config path, size, change time and database), in
a 0700 directory of the calling user. Two clusters get two agents; a changed config, a new one.
Beside it: `.lock` (held by the live agent for its lifetime) and `.log` (the agent's stderr).

Protocol: one JSON line each way per connection. `{"push": ABS_PATH, "context": CTX}` is answered
`{"ok": true}` only once the file is durable on every location, else `{"ok": false, "error": ...}`;
`{"fetch": NAME, "dest": ABS_PATH, "context": CTX[, "locations": [...], "partial": true]}` is answered `{"ok": true}`
once the verified file is at dest, `{"ok": false, "not_found": true, ...}` if no location holds it;
`{"status": true}` is answered with the agent's pid and counters. A request with `"answer": "text"`
(the compiled client, `dr_pipelines/native/wal_client.c`, which reads no JSON) is answered with one
line instead: `ok [STAGED]`, `not_found MESSAGE` or `error MESSAGE`.

Standard library only (and little of it): this is PostgreSQL's hot path.
"""

import hashlib
import json
import os
import socket
import stat
from pathlib import Path

from dr_pipelines.core.durable import fsync_dir
from dr_pipelines.core.wal.fast_path import SPOOL

# What push_through_agent and fetch_through_agent tell their caller.
DURABLE = "durable"  # the agent answered ok: archived on every location (a push), in place (a fetch)
NOT_FOUND = "not_found"  # a fetch: the agent found the file on no location (restore_command's exit 1)
ABSENT = "absent"  # no agent listens there: push by yourself, and start one for the next calls
FAILED = "failed"  # the agent answered an error, or died or hung mid-request: push by yourself
UNUSABLE = "unusable"  # no agent for this call (no config named, not a running cluster's pg_wal, ...)

CONNECT_TIMEOUT_S = 2.0
# An answer comes once the segment is on every location; each location bounds its own calls
# (connect + read + retries, about a minute by default), so this only catches an agent that hangs.
ANSWER_TIMEOUT_S = 300.0
LOG_ROTATE_BYTES = 1 << 20


def agent_dir(uid: int | None = None) -> str:
    return f"/tmp/dr_pipelines-{os.geteuid() if uid is None else uid}"


INSTALLATION = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../dr_pipelines/core


def agent_stem(pg_wal: str, context: str, uid: int | None = None) -> str:
    """The agent's files without their suffix (.sock, .lock, .log); short enough for sun_path. The
    installation is in the name too: a cluster pointed at another installation gets its own agent."""
    key = f"{os.path.realpath(pg_wal)}\0{context}\0{INSTALLATION}".encode()
    return os.path.join(agent_dir(uid), f"agent-{hashlib.sha256(key).hexdigest()[:32]}")


def cluster_pg_wal(path: str) -> str | None:
    """The pg_wal directory holding `path` if it is a running cluster's (postmaster.pid beside it):
    what PostgreSQL's archive_command passes (%p, relative to the data directory)."""
    pg_wal = os.path.dirname(os.path.abspath(path))
    if os.path.basename(pg_wal) != "pg_wal" or not os.path.isfile(
        os.path.join(os.path.dirname(pg_wal), "postmaster.pid")
    ):
        return None
    return pg_wal


def private_dir(path: str) -> bool:
    """True if `path` is a directory of ours that no one else can enter (not a symlink): anyone
    else able to plant a socket there could answer "durable" for a segment never archived."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077 == 0


class NotListening(Exception):
    """No agent listens at that path (no socket, a stale one, or not a socket)."""


def request(sock_path: str, message: dict, timeout: float = ANSWER_TIMEOUT_S) -> dict:
    """Send one request, read its one-line answer. NotListening if no agent is there; after
    connecting, OSError if the connection breaks or times out, ValueError for no or a garbled answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(CONNECT_TIMEOUT_S)
        try:
            s.connect(sock_path)
        except OSError as e:  # missing, refused (stale), not a socket, timed out (hung): nothing was sent
            raise NotListening(f"{sock_path}: {e}") from None
        s.settimeout(timeout)
        s.sendall(json.dumps(message).encode() + b"\n")
        return read_json_line(s, "the connection closed without an answer")


def read_json_line(conn: socket.socket, closed: str, limit: int | None = None) -> dict:
    """One newline-ended JSON object from `conn` (a request or an answer); ValueError if the peer
    closes first (`closed`), sends more than `limit` bytes, or sends something else."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError(closed)
        data += chunk
        if limit is not None and len(data) > limit:
            raise ValueError(f"more than {limit} bytes without a newline")
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError(f"{obj!r} is not a JSON object")
    return obj


def push_through_agent(path: str, config_file: str | None, db: str | None, context: str) -> tuple[str, str | None]:
    """Hand `path` to the cluster's agent: (DURABLE | ABSENT | FAILED | UNUSABLE, why)."""
    outcome, why, _ = _ask(path, config_file, context, {"push": os.path.abspath(path), "context": context})
    return outcome, why


def fetch_through_agent(
    name: str, dest: str, config_file: str | None, context: str, locations: list[str] | None, partial: bool = False
) -> tuple[str, str | None]:
    """Ask the cluster's agent to put the WAL file `name` at `dest` (`partial`: as `wal-fetch
    --partial`): (DURABLE | NOT_FOUND | ABSENT | FAILED | UNUSABLE, why)."""
    message: dict = {"fetch": name, "dest": os.path.abspath(dest), "context": context}
    if locations:
        message["locations"] = locations
    if partial:
        message["partial"] = True
    outcome, why, reply = _ask(dest, config_file, context, message)
    if outcome != DURABLE:
        return outcome, why
    staged = reply.get("staged")
    spool = os.path.join(os.path.dirname(os.path.abspath(dest)), SPOOL)
    if (
        not isinstance(staged, str)
        or os.path.dirname(staged) != spool
        or not os.path.basename(staged).startswith(f".{name}.fetched-")
    ):
        return FAILED, f"the archiver agent answered {reply!r}, not a file of its spool"
    try:
        os.rename(staged, dest)
        fsync_dir(Path(dest).parent)
    except OSError as e:
        return FAILED, f"the file the archiver agent fetched could not be put in place ({e})"
    return DURABLE, None


def _ask(path: str, config_file: str | None, context: str, message: dict) -> tuple[str, str | None, dict]:
    """Send `message` to the agent of the cluster whose pg_wal holds `path`: its verdict, why, and
    its answer."""
    config_file = config_file or os.environ.get("DR_PIPELINES_CONFIG")
    pg_wal = cluster_pg_wal(path)
    if not config_file or pg_wal is None:
        return UNUSABLE, None, {}
    directory = agent_dir()
    if not private_dir(directory):
        if os.path.lexists(directory):
            return UNUSABLE, f"{directory} is not a private directory of this user; not using the archiver agent", {}
        return ABSENT, None, {}
    sock_path = agent_stem(pg_wal, context) + ".sock"
    try:
        reply = request(sock_path, message, timeout=ANSWER_TIMEOUT_S)
    except NotListening:
        return ABSENT, None, {}
    except (OSError, ValueError) as e:  # connected, then no answer: it died or hung mid-request
        if isinstance(e, TimeoutError):  # hung: later calls must not wait on it too (it exits without its socket)
            try:
                os.unlink(sock_path)
            except OSError:
                pass
        return FAILED, f"the archiver agent did not answer ({type(e).__name__}: {e})", {}
    if reply.get("ok") is True:
        return DURABLE, None, reply
    if "fetch" in message and reply.get("not_found") is True:
        return NOT_FOUND, str(reply.get("error", f"{message['fetch']} is not in the WAL archive")), reply
    return FAILED, f"the archiver agent failed: {reply.get('error', reply)}", reply


def agent_running(stem: str) -> bool:
    """Whether an agent holds the lock of `stem` (it may still be starting: not listening yet)."""
    import fcntl

    try:
        fd = os.open(stem + ".lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the shared lock, if taken
    return False


def ensure_agent_dir() -> str | None:
    """The private directory of this user's agents, made if missing; None if it is not private."""
    directory = agent_dir()
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    return directory if private_dir(directory) else None


def start_agent(path: str, config_file: str | None, db: str | None, context: str) -> bool:
    """Start, detached, the agent for the cluster holding `path`, unless one runs (or is starting).
    It serves the calls after this one. True if one was started."""
    config_file = config_file or os.environ.get("DR_PIPELINES_CONFIG")
    pg_wal = cluster_pg_wal(path)
    if not config_file or pg_wal is None or ensure_agent_dir() is None:
        return False
    stem = agent_stem(pg_wal, context)
    if agent_running(stem):
        return False
    import subprocess
    import sys

    log = stem + ".log"
    try:
        if os.path.getsize(log) > LOG_ROTATE_BYTES:
            os.replace(log, log + ".1")
    except FileNotFoundError:
        pass
    argv = [sys.executable, "-m", "dr_pipelines.core.wal.agent", "--pg-wal", pg_wal]
    argv += ["--config", os.path.abspath(config_file)] + (["--db", db] if db else [])
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=fd,
            start_new_session=True,  # not in PostgreSQL's process group: its signals are not ours
            close_fds=True,
            cwd="/",  # holds no data directory busy
        )
    finally:
        os.close(fd)
    return True
