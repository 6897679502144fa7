"""The one table of compression and encryption methods.

Each compression method says its file suffix, how to compress a stream (constant memory), how to
decompress into a sink, which tool decodes it by hand, and how to (de)compress a whole buffer (WAL
segments). Each encryption method says its suffix and its decoding tool. Adding a method touches
this file (and the config's `Literal` of method names), nothing else.
"""

from __future__ import annotations

import gzip
import io
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import IO, Protocol, cast

import zstandard

CHUNK = 1 << 20


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Writable(Protocol):
    def write(self, data: bytes, /) -> int | None: ...


class _GzipReader:
    """A file-like that gzip-compresses `src` (gzip container, so `gunzip` reads it)."""

    def __init__(self, src: Readable, level: int):
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


class Sink:
    """A writable that decodes what it is given into `out`; `close` says whether the stream was whole."""

    def __init__(self, out: Writable):
        self._out = out

    def write(self, data) -> int:
        self._out.write(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class _ZstdSink(Sink):
    def __init__(self, out: Writable):
        super().__init__(out)
        self._z = zstandard.ZstdDecompressor().decompressobj()

    def write(self, data) -> int:
        self._out.write(self._z.decompress(data))
        return len(data)

    def close(self) -> None:
        if not self._z.eof:
            raise zstandard.ZstdError("zstd stream is truncated")


class _GzipSink(Sink):
    def __init__(self, out: Writable):
        super().__init__(out)
        self._z = zlib.decompressobj(wbits=31)

    def write(self, data) -> int:
        self._out.write(self._z.decompress(data))
        return len(data)

    def close(self) -> None:
        self._out.write(self._z.flush())
        if not self._z.eof:
            raise zlib.error("gzip stream is truncated")


def _zstd_stream(src: Readable, level: int, threads: int) -> Readable:
    cctx = zstandard.ZstdCompressor(level=level, threads=threads or -1)  # -1: one worker per core (no GIL)
    return cctx.stream_reader(cast(IO[bytes], src), read_size=CHUNK, closefd=False)  # anything with read() will do


_idle_compressors: dict[tuple[int, int], list[zstandard.ZstdCompressor]] = {}
_idle_lock = threading.Lock()


@contextmanager
def _zstd_compressor(level: int, size: int) -> Iterator[zstandard.ZstdCompressor]:
    """A WAL segment on every core: a lone segment's push waits for its compression. Compressors
    are reused (one per concurrent caller): a resident archiver would otherwise make a context and
    its worker threads for every segment. One whose use failed is dropped: python-zstandard 0.25
    crashes (SIGSEGV) reusing a multithreaded compressor whose stream was left midway."""
    key = (level, -1 if size >= 4 << 20 else 0)
    with _idle_lock:
        idle = _idle_compressors.setdefault(key, [])
        cctx = idle.pop() if idle else zstandard.ZstdCompressor(level=level, threads=key[1])
    yield cctx  # an exception raised here leaves it out of the pool
    with _idle_lock:
        idle.append(cctx)


def _zstd_compress(data: bytes | memoryview, level: int) -> bytes:
    with _zstd_compressor(level, len(data)) as cctx:
        return cctx.compress(data)


@contextmanager
def _zstd_reader(data: bytes | memoryview, level: int) -> Iterator[Readable]:
    # size: the frame records it, as compress() does. The reader is closed on the way out, even on an
    # error: it holds the caller's buffer (a memoryview the caller must release) until it is.
    with _zstd_compressor(level, len(data)) as cctx, cctx.stream_reader(data, size=len(data), read_size=CHUNK) as r:
        yield r


@dataclass(frozen=True)
class Compression:
    method: str
    suffix: str
    tool: tuple[str, ...] | None  # decompresses stdin to stdout; None: nothing to undo
    stream: Callable[[Readable, int, int], Readable]  # (source, level, threads) -> compressed reader
    sink: Callable[[Writable], Sink]
    compress: Callable[[bytes | memoryview, int], bytes | memoryview]
    reader: Callable[[bytes | memoryview, int], AbstractContextManager[Readable]]  # a buffer compressed as read
    decompress: Callable[[bytes], bytes]
    errors: tuple[type[Exception], ...] = ()  # what a corrupt stream raises


COMPRESSION: dict[str, Compression] = {
    "zstd": Compression(
        "zstd",
        ".zst",
        ("zstd", "--decompress", "--quiet", "--stdout"),
        _zstd_stream,
        _ZstdSink,
        _zstd_compress,
        _zstd_reader,
        lambda data: zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 31),
        (zstandard.ZstdError,),
    ),
    "gzip": Compression(
        "gzip",
        ".gz",
        ("gzip", "--decompress", "--stdout"),
        lambda src, level, _threads: _GzipReader(src, level),
        _GzipSink,
        lambda data, level: gzip.compress(data, compresslevel=level, mtime=0),
        lambda data, level: nullcontext(_GzipReader(io.BytesIO(data), level)),
        gzip.decompress,
        (zlib.error, gzip.BadGzipFile, EOFError),
    ),
    "none": Compression(
        "none",
        "",
        None,
        lambda src, _level, _threads: src,
        Sink,
        lambda data, _level: data,
        lambda data, _level: nullcontext(io.BytesIO(data)),
        lambda data: data,
    ),
}


@dataclass(frozen=True)
class Encryption:
    method: str
    suffix: str
    tool: tuple[str, ...] | None  # decrypts stdin to stdout given an identity file argument


ENCRYPTION: dict[str, Encryption] = {
    "age": Encryption("age", ".age", ("age", "--decrypt", "--identity")),
    "none": Encryption("none", "", None),
}


def object_suffix(compression: str, encryption: str) -> str:
    """File-name suffix saying how to decode an object by hand (.zst, .gz, .age)."""
    return COMPRESSION[compression].suffix + ENCRYPTION[encryption].suffix


def methods_from_name(name: str) -> tuple[str, str]:
    """(compression, encryption) from an object's file name, e.g. dump.pgdump.zst.age."""
    encryption = next((m for m, e in ENCRYPTION.items() if e.suffix and name.endswith(e.suffix)), "none")
    rest = name.removesuffix(ENCRYPTION[encryption].suffix)
    compression = next((m for m, c in COMPRESSION.items() if c.suffix and rest.endswith(c.suffix)), "none")
    return compression, encryption
