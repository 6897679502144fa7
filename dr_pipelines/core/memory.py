"""Process memory tuning for buffer-heavy work (glibc's allocator; elsewhere nothing is tuned)."""


def _mallopt(param: int, value: int) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(param, value)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def return_large_buffers() -> None:
    """File chunks and packs are megabytes each, made and freed by several threads: glibc otherwise
    keeps them in per-thread arenas (its mmap threshold rises after the first free), and the process
    keeps hundreds of MB it no longer uses. A fixed threshold makes each one go back when freed."""
    _mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: >= 1 MiB from mmap, returned on free


def share_heap_across_threads() -> None:
    """For resident processes whose short-lived threads take turns with segment-sized buffers (the
    WAL agent, wal-stream): glibc gives new threads arenas of their own (up to 8 per core), each
    keeping the 16 MiB buffers freed in it, so the process grew for its first tens of minutes (an
    agent 69 -> 130 MB in an hour). Two arenas keep them for reuse, without the page faults of
    taking each one from the kernel afresh as return_large_buffers would (milliseconds a segment)."""
    _mallopt(-8, 2)  # M_ARENA_MAX
