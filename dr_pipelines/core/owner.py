"""Who made a thing (a run, a record, a temp file, a staging database): this host and process,
and whether that process still lives. What a killed run leaves behind is told by its dead owner.

A pid alone is no identity: after a reboot, or in long uptimes, another process gets it. The tag
also holds the boot and the process's start time, so a reused pid is not taken for the owner."""

from __future__ import annotations

import os
import socket


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()[:8]
    except OSError:
        return "-"


def _stat_field(pid: int, field: int) -> str | None:
    """Field `field` of /proc/<pid>/stat (man 5 proc numbers them from 1), or None if unreadable.
    Split after the command's closing parenthesis: the command may hold spaces and parentheses."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[field - 3]
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    """Clock ticks since boot when the process started (field 22)."""
    return _stat_field(pid, 22)


def owner_tag(pid: int | None = None) -> str:
    """`host:pid:boot:start` of this process, as written into what it makes."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_boot_id()}:{_start_time(pid) or '-'}"


def pid_alive(pid: int) -> bool:
    """Whether a process has that pid and runs: a killed one its parent has not reaped yet (a
    zombie, which still takes signal 0) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process with that pid
    return _stat_field(pid, 3) not in ("Z", "X")  # the state; unreadable: signal 0 reached it, alive


def owner_dead(tag: str | None) -> bool | None:
    """True: its process is gone; False: it runs; None: unknown (no tag, or another host's)."""
    if not tag or ":" not in tag:
        return None
    host, pid, *rest = tag.split(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    if not pid_alive(int(pid)):
        return True
    if len(rest) == 2:  # a full tag: the same pid in another boot, or started later, is someone else
        boot, start = rest
        if boot != _boot_id():
            return True
        now = _start_time(int(pid))
        if start == "-" or now is None:
            return None  # its start time cannot be read (e.g. /proc mounted hidepid): unknown, not dead
        return start != now
    return False
