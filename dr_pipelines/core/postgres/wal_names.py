"""WAL file names and LSN arithmetic, as PostgreSQL defines them (pure functions)."""

from __future__ import annotations

import re

SEGMENT = re.compile(r"^[0-9A-F]{24}$")


HISTORY = re.compile(r"^[0-9A-F]{8}\.history$")


BACKUP_LABEL = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")


PARTIAL = re.compile(r"^[0-9A-F]{24}\.partial$")


# The growing segment as wal-stream last pushed it: a name of its own, overwritten as it grows, never
# PostgreSQL's `.partial` (a promoted server archives its old timeline's last segment under that name,
# once; the two must not collide) and never a segment's name (recovery asks for it only by choice).
STREAM_PARTIAL = re.compile(r"^[0-9A-F]{24}\.stream\.partial$")
STREAM_SUFFIX = ".stream.partial"


XLP_LONG_HEADER = 0x0002


def timeline_of(name: str) -> str:
    return name[:8]


# --------------------------------------------------------------------------- listing


def parse_segment(name: str, segment_size: int) -> tuple[int, int]:
    """(timeline, absolute segment number)."""
    per_log = 0x100000000 // segment_size
    return int(name[:8], 16), int(name[8:16], 16) * per_log + int(name[16:24], 16)


def segment_name(timeline: int, number: int, segment_size: int) -> str:
    per_log = 0x100000000 // segment_size
    return f"{timeline:08X}{number // per_log:08X}{number % per_log:08X}"


def lsn_to_segment(lsn: str, timeline: int, segment_size: int, end: bool = False) -> str:
    """The segment holding `lsn`; for an end position exactly on a boundary, the segment before it
    (as PostgreSQL's XLByteToPrevSeg: the record ends there, nothing of it is in the next one)."""
    hi, lo = (int(x, 16) for x in lsn.split("/"))
    value = (hi << 32) | lo
    if end and value % segment_size == 0:
        value -= 1
    return segment_name(timeline, value // segment_size, segment_size)


def lsn_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def written_end(data: bytes, name: str, segment_size: int) -> int:
    """The LSN where the WAL written so far in a growing segment ends: pg_receivewal pads its
    `.partial` file with zeros, and records start MAXALIGNed (8 bytes), so the end is the last
    non-zero byte rounded up to 8."""
    used = len(data.rstrip(b"\0"))
    _, number = parse_segment(name[:24], segment_size)
    return number * segment_size + min(segment_size, (used + 7) // 8 * 8)
