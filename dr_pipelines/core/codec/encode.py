"""Source bytes -> compress -> encrypt, as streams (constant memory) and as whole buffers (WAL)."""

from __future__ import annotations

from typing import Any

from dr_pipelines.core.codec.methods import COMPRESSION, Readable
from dr_pipelines.core.config import CompressionConfig, EncryptionConfig


class CountingReader:
    """Counts the bytes read through it (the uncompressed size of a backup)."""

    def __init__(self, src: Readable):
        self._src: Any = src  # readinto, when the source has it (TarWatcher does)
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._src.read(size)
        self.bytes += len(data)
        return data

    def readinto(self, b) -> int:
        n = self._src.readinto(b)
        self.bytes += n or 0
        return n


def compressing_reader(src: Readable, compression: CompressionConfig) -> Readable:
    return COMPRESSION[compression.method].stream(src, compression.level, compression.threads)


def encode_bytes(data: bytes | memoryview, compression: CompressionConfig, encryption: EncryptionConfig) -> bytes:
    """A whole buffer (a WAL segment) compressed and encrypted, as the streams would. Always bytes
    of its own (given a view of a reused buffer, as wal_push does, "none" copies it)."""
    data = bytes(COMPRESSION[compression.method].compress(data, compression.level))
    if encryption.method == "age":
        import pyrage  # lazily: wal-push pays for it only when encrypting

        from dr_pipelines.core.codec.keys import age_recipients

        data = pyrage.encrypt(data, age_recipients(encryption))
    return data
