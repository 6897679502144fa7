"""Process memory tuning for long-lived or buffer-heavy work."""


def return_large_buffers() -> None:
    """Our large buffers (16 MiB WAL segments, file chunks and packs) are made and freed by several
    threads. glibc raises its mmap threshold after the first such free, so later ones come from
    per-thread arenas that keep hundreds of MB the process no longer uses, growing for hours in a
    resident process. A fixed threshold makes each one go back to the kernel when freed."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: >= 1 MiB from mmap, returned on free
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune
