"""Who made a thing (a run, a record, a temp file, a staging database): this host and process,
and whether that process still lives. What a killed run leaves behind is told by its dead owner."""

from __future__ import annotations

import os
import socket


def owner_tag() -> str:
    """`host:pid` of this process, as written into what it makes."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process with that pid
    return True


def owner_dead(tag: str | None) -> bool | None:
    """True: its process is gone; False: it runs; None: unknown (no tag, or another host's)."""
    if not tag or ":" not in tag:
        return None
    host, _, pid = tag.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    return not pid_alive(int(pid))
