"""Process memory tuning for buffer-heavy work (glibc's allocator; elsewhere nothing is tuned)."""


def _mallopt(param: int, value: int) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(param, value)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def return_large_buffers() -> None:
    """Our large buffers (16 MiB WAL segments, file chunks and packs) are made and freed by several
    short-lived threads: glibc otherwise keeps them in per-thread arenas (its mmap threshold rises
    after the first free), and a process keeps hundreds of MB it no longer uses, growing for hours
    in a resident one (the WAL agent went 69 -> 130 MB in an hour; two arenas, tried instead, still
    grew). A fixed threshold makes each one go back when freed; what is reused on purpose (wal_push's
    read buffers) is kept by its owner."""
    _mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: >= 1 MiB from mmap, returned on free
