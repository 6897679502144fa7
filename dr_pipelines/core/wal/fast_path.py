"""The fast paths of archive_command and restore_command (pgBackRest's async archive-push and
archive-get do the same):

- wal-fetch: segments fetched ahead (checksums verified) wait in `pg_wal/.dr_pipelines_prefetch/`
  and are handed over by a rename, so replay does not pay for a process start, a download and a
  decryption per segment.
- wal-push: segments PostgreSQL had marked ready were archived ahead, in parallel, by an earlier
  call; a marker in `pg_wal/.dr_pipelines_pushed/`, written once the segment was durable on every
  location, lets the call for it return at once. Otherwise the segment is handed to the cluster's
  resident archiver (`agent_client.py`, `agent.py`), which answers once it is durable everywhere.

This module (with `agent_client.py`) imports nothing heavy: it is the whole of both fast paths.
"""

import os
from pathlib import Path

from dr_pipelines.core.durable import fsync_dir, write_atomically

SPOOL = ".dr_pipelines_prefetch"


PUSHED = ".dr_pipelines_pushed"


def spool_dir(dest: Path) -> Path:
    return Path(dest).parent / SPOOL


def take_prefetched(name: str, dest: str) -> bool:
    """Move a prefetched segment into place; False if it was not prefetched."""
    src = spool_dir(Path(dest)) / name
    try:
        os.rename(src, dest)
    except FileNotFoundError:
        return False
    fsync_dir(Path(dest).parent)
    return True


def fetch_args(argv: list[str]) -> tuple[str, str] | None:
    """NAME and DEST of a `wal-fetch` command line, without argparse (and its imports)."""
    if "wal-fetch" not in argv:
        return None
    positional = _command_positionals(argv, "wal-fetch")
    return (positional[0], positional[1]) if len(positional) >= 2 else None


def _command_positionals(argv: list[str], command: str) -> list[str]:
    rest, positional, skip = argv[argv.index(command) + 1 :], [], False
    for arg in rest:
        if skip:
            skip = False
        elif arg in ("--db", "--location"):  # options that take a value
            skip = True
        elif not arg.startswith("-"):
            positional.append(arg)
    return positional


def push_args(argv: list[str]) -> str | None:
    """PATH of a `wal-push` command line, without argparse."""
    if "wal-push" not in argv:
        return None
    positional = _command_positionals(argv, "wal-push")
    return positional[0] if positional else None


def option_values(argv: list[str], flag: str) -> list[str]:
    """Every value of a repeatable option (`--location A --location B`), without argparse."""
    out = []
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith(flag + "="):
            out.append(arg.split("=", 1)[1])
    return out


def push_options(argv: list[str]) -> tuple[str | None, str | None]:
    """The --config and --db of a command line, without argparse."""

    def value(flag: str) -> str | None:
        for i, arg in enumerate(argv):
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
        return None

    return value("--config"), value("--db")


def push_context(config_file: str | None, db: str | None) -> str:
    """Where a segment was archived: the config (path, size and change time) and the database. A
    marker written under another config, or before the config changed, does not count."""
    config_file = config_file or os.environ.get("DR_PIPELINES_CONFIG")
    if not config_file:
        return f"sandbox|{db}"
    try:
        st = os.stat(config_file)
    except OSError:
        return f"{config_file}|unreadable|{db}"
    return f"{os.path.abspath(config_file)}|{st.st_size}|{st.st_mtime_ns}|{db}"


def pushed_marker(path: str | Path) -> Path:
    return Path(path).parent / PUSHED / Path(path).name


def segment_fingerprint(path: str | Path, context: str) -> str:
    """Size and long page header (cluster, timeline and position) of the segment, and where it was
    archived: a marker left by another cluster, or under another config, does not match."""
    with open(path, "rb") as f:
        head = f.read(40)
        return f"{os.fstat(f.fileno()).st_size} {head.hex()} {context}"


def mark_pushed(path: str | Path, context: str) -> None:
    """Record, durably, that `path` is archived on every location of `context`."""
    marker = pushed_marker(path)
    marker.parent.mkdir(mode=0o700, exist_ok=True)
    write_atomically(marker, segment_fingerprint(path, context).encode())


def take_pushed(path: str, context: str) -> bool:
    """True if `path` was archived ahead (the marker matches it); the marker is consumed."""
    marker = pushed_marker(path)
    try:
        recorded = marker.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return False
    matches = recorded == segment_fingerprint(path, context)
    marker.unlink()
    return matches
