"""Source bytes -> compress -> encrypt, as streams (constant memory) and as whole buffers (WAL)."""

from __future__ import annotations

import hashlib
import io
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


class _HashingBuffer:
    """Bytes written to it, kept and hashed as they come."""

    def __init__(self):
        self._buf, self._sha = io.BytesIO(), hashlib.sha256()

    def write(self, data) -> int:
        self._sha.update(data)
        return self._buf.write(data)

    def flush(self) -> None:
        pass

    def result(self) -> tuple[bytes, str]:
        return self._buf.getvalue(), self._sha.hexdigest()


def encode_bytes(
    data: bytes | memoryview, compression: CompressionConfig, encryption: EncryptionConfig
) -> tuple[bytes, str]:
    """A whole buffer (a WAL segment) compressed and encrypted, as the streams would, and the SHA-256
    of the result. Always bytes of its own (given a view of a reused buffer, as wal_push does, "none"
    copies it). With age, the compressor's output is encrypted as it comes and hashed as it is
    written: zstd's workers compress ahead while age encrypts (one pass, not three; 10-25% less time
    for a 16 MB segment)."""
    method = COMPRESSION[compression.method]
    if encryption.method != "age":
        stored = bytes(method.compress(data, compression.level))
        return stored, hashlib.sha256(stored).hexdigest()
    import pyrage  # lazily: wal-push pays for it only when encrypting

    from dr_pipelines.core.codec.keys import age_recipients

    out = _HashingBuffer()
    with method.reader(data, compression.level) as compressed:
        pyrage.encrypt_io(compressed, out, age_recipients(encryption))
    return out.result()
