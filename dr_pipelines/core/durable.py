"""Durability primitives with no imports beyond the standard library (the WAL fast paths use them)."""

import os
from pathlib import Path


def write_atomically(dest: Path, data: bytes) -> None:
    """`dest` holds either its old content or all of `data`, even after a crash: temp file, fsync,
    rename, directory fsync."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, dest)
    fsync_dir(dest.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
