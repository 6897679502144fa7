"""WAL file names and LSN arithmetic, as PostgreSQL defines them (pure functions)."""

from __future__ import annotations

import re

SEGMENT = re.compile(r"^[0-9A-F]{24}$")


HISTORY = re.compile(r"^[0-9A-F]{8}\.history$")


BACKUP_LABEL = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")


PARTIAL = re.compile(r"^[0-9A-F]{24}\.partial$")


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
