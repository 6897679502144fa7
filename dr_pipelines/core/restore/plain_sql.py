"""Importing the runbooks' existing backups: plain SQL dumps (`pg_dump DB | gzip > X.sql.gz`, as the
SongNodes script makes them) load through `psql -v ON_ERROR_STOP=1 --single-transaction`, so a dump
that fails halfway leaves nothing loaded."""

from __future__ import annotations

import gzip
import subprocess
import threading
from pathlib import Path
from typing import BinaryIO

import zstandard

from dr_pipelines.core.config import DatabaseConfig
from dr_pipelines.core.log import Log
from dr_pipelines.core.postgres.client import libpq_env, pg_tool
from dr_pipelines.core.restore.request import RestoreError

CUSTOM_FORMAT_MAGIC = b"PGDMP"  # the first bytes of a pg_dump -Fc archive


def open_dump(path: Path) -> BinaryIO:
    """The file's plain bytes, decompressed by its name (.gz, .zst) as the runbooks' scripts name them."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.name.endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # type: ignore[return-value]
    return open(path, "rb")


def is_plain_sql(path: Path) -> bool:
    """A plain-format dump (SQL text), not an archive pg_restore reads nor one of our encrypted objects."""
    if path.name.endswith(".age") or not path.is_file():
        return False
    try:
        with open_dump(path) as f:
            head = f.read(len(CUSTOM_FORMAT_MAGIC))
    except (OSError, EOFError, zstandard.ZstdError) as e:
        raise RestoreError(f"--file {path}: cannot be read as a dump ({e})") from None
    return bool(head) and head != CUSTOM_FORMAT_MAGIC


def load_plain_sql(server: DatabaseConfig, db_name: str, dbname: str, path: Path, log: Log) -> int:
    """Run the dump's SQL in `dbname` in one transaction; returns the bytes of SQL read."""
    cmd = [
        pg_tool("psql", server),
        "-X",  # no ~/.psqlrc
        "--quiet",
        "--no-password",
        "-v",
        "ON_ERROR_STOP=1",
        "--single-transaction",
        f"--dbname={dbname}",
        "--file=-",
    ]
    env = libpq_env(server, db_name)
    env.pop("PGDATABASE", None)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    errors: list[str] = []

    def read_errors() -> None:
        assert proc.stderr is not None
        errors.extend(line.decode(errors="replace").rstrip() for line in proc.stderr)

    reader = threading.Thread(target=read_errors, daemon=True)
    reader.start()
    size = 0
    assert proc.stdin is not None
    try:
        with open_dump(path) as src:
            while block := src.read(1 << 20):
                size += len(block)
                proc.stdin.write(block)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # psql stopped at an error: its message says which
    except (OSError, EOFError, zstandard.ZstdError) as e:
        proc.kill()
        proc.wait()
        raise RestoreError(f"--file {path} is damaged or truncated ({e}); nothing of it was loaded") from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    proc.wait()
    reader.join(timeout=10)
    if proc.returncode != 0:
        detail = " | ".join([e for e in errors if "ERROR" in e or "FATAL" in e][-3:] or errors[-3:])
        hint = ""
        if "role" in detail and "does not exist" in detail:
            hint = " Create the dump's roles on the target server first (CREATE ROLE ...), then run the restore again."
        raise RestoreError(
            f"psql could not load the plain SQL dump {path} into {dbname!r} (exit {proc.returncode}): {detail}. "
            f"It ran in one transaction: nothing of it was kept.{hint}"
        )
    log(f"loaded the plain SQL dump {path} ({size / 1e6:.1f} MB of SQL) with psql in one transaction")
    return size
