"""Source bytes -> compress -> encrypt, as streams (constant memory) and as whole buffers (WAL)."""

from __future__ import annotations

import zlib
from typing import BinaryIO

import zstandard
from dr_pipelines.core.codec.methods import CHUNK
from dr_pipelines.core.config import CompressionConfig, EncryptionConfig


def object_suffix(compression: CompressionConfig, encryption: EncryptionConfig) -> str:
    """File-name suffix saying how to decode the object by hand (.zst, .gz, .age)."""
    suffix = {"zstd": ".zst", "gzip": ".gz", "none": ""}[compression.method]
    return suffix + (".age" if encryption.method == "age" else "")


# --------------------------------------------------------------------------- readers


class _GzipReader:
    """A file-like that gzip-compresses `src` (gzip container, so `gunzip` reads it)."""

    def __init__(self, src: BinaryIO, level: int):
        self._src = src
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)
        self._buf = b""
        self._eof = False

    def read(self, size: int = -1) -> bytes:
        while not self._eof and (size < 0 or len(self._buf) < size):
            data = self._src.read(CHUNK)
            if data:
                self._buf += self._z.compress(data)
            else:
                self._buf += self._z.flush()
                self._eof = True
        if size < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:size], self._buf[size:]
        return out


class CountingReader:
    """Counts the bytes read through it (the uncompressed size of a backup)."""

    def __init__(self, src: BinaryIO):
        self._src = src
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._src.read(size)
        self.bytes += len(data)
        return data

    def readinto(self, b) -> int:
        n = self._src.readinto(b)
        self.bytes += n or 0
        return n


def compressing_reader(src: BinaryIO, compression: CompressionConfig) -> BinaryIO:
    if compression.method == "zstd":
        threads = compression.threads or -1  # -1: one worker per core; the GIL is released
        cctx = zstandard.ZstdCompressor(level=compression.level, threads=threads)
        return cctx.stream_reader(src, read_size=CHUNK, closefd=False)
    if compression.method == "gzip":
        return _GzipReader(src, compression.level)
    return src
