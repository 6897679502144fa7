"""Prefetched WAL for restore_command: segments fetched ahead (checksums verified) wait in
`pg_wal/.dr_pipelines_prefetch/` and are handed over by a rename, so replay does not pay for a
process start, a download and a decryption per segment (pgBackRest's async archive-get does the same).

This module imports nothing heavy: it is the whole of `wal-fetch`'s fast path.
"""

import os
from pathlib import Path

SPOOL = ".dr_pipelines_prefetch"


def spool_dir(dest: Path) -> Path:
    return Path(dest).parent / SPOOL


def take_prefetched(name: str, dest: str) -> bool:
    """Move a prefetched segment into place; False if it was not prefetched."""
    src = spool_dir(Path(dest)) / name
    try:
        os.rename(src, dest)
    except FileNotFoundError:
        return False
    fd = os.open(Path(dest).parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def fetch_args(argv: list[str]) -> tuple[str, str] | None:
    """NAME and DEST of a `wal-fetch` command line, without argparse (and its imports)."""
    if "wal-fetch" not in argv:
        return None
    rest, positional, skip = argv[argv.index("wal-fetch") + 1:], [], False
    for arg in rest:
        if skip:
            skip = False
        elif arg in ("--db",):
            skip = True
        elif not arg.startswith("-"):
            positional.append(arg)
    return (positional[0], positional[1]) if len(positional) >= 2 else None
