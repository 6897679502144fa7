"""Byte pipelines: source -> compress -> encrypt -> SHA-256 -> every location, concurrently.

Memory is bounded by the queues (a few MiB per location), never by the size of the data. Nothing
is written to disk in plaintext. The objects decode with standard tools: ``age -d``, ``zstd -d`` /
``gunzip``.

Restore runs the other way: object -> SHA-256 -> decrypt -> decompress -> sink, and the checksum
is compared before the sink is told the stream is good.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

import pyrage
import zstandard

from dr_pipelines.core.config import CompressionConfig, ConfigError, EncryptionConfig
from dr_pipelines.core.storage import Location, LocationError, Upload

CHUNK = 1 << 20
_QUEUE_CHUNKS = 8  # per location: at most 8 MiB in flight
_STOP = object()


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


def age_recipients(encryption: EncryptionConfig) -> list:
    try:
        return [pyrage.x25519.Recipient.from_str(r) for r in encryption.recipients]
    except Exception as e:
        raise ValueError(f"encryption.recipients: not a valid age public key ({e})") from None


def recipient_fingerprints(encryption: EncryptionConfig) -> list[str]:
    """Short fingerprints of the recipients for manifests: which key can open a backup, never a key."""
    return [hashlib.sha256(r.encode()).hexdigest()[:16] for r in encryption.recipients]


# --------------------------------------------------------------------------- fan-out


@dataclass
class TargetOutcome:
    location: str
    error: str | None = None


class _Target:
    """One location's upload, fed through a bounded queue by its own thread."""

    def __init__(self, location: Location, key: str):
        self.location = location
        self.key = key
        self.error: BaseException | None = None
        self.upload: Upload | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self.thread = threading.Thread(target=self._run, name=f"upload-{location.name}", daemon=True)

    def _run(self) -> None:
        try:
            self.upload = self.location.open_upload(self.key)
            while True:
                chunk = self.queue.get()
                if chunk is _STOP:
                    return
                self.upload.write(chunk)
        except BaseException as e:  # recorded; the other locations go on
            self.error = e
            self._drain()

    def _drain(self) -> None:
        while True:
            try:
                if self.queue.get(timeout=0.1) is _STOP:
                    return
            except queue.Empty:
                continue

    def put(self, chunk: bytes) -> None:
        if self.error is None:
            self.queue.put(chunk)


class AllTargetsFailed(RuntimeError):
    pass


class FanOutWriter:
    """A writable file-like: hashes and counts the bytes, then hands them to every location."""

    def __init__(self, targets: list[_Target]):
        self._targets = targets
        self._buf = bytearray()
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self._buf += data
        if len(self._buf) >= CHUNK:
            self._send()
        return len(data)

    def _send(self) -> None:
        chunk = bytes(self._buf)
        self._buf.clear()
        alive = [t for t in self._targets if t.error is None]
        if not alive:
            raise AllTargetsFailed("every location failed")
        for t in alive:
            t.put(chunk)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._buf:
            self._send()


@dataclass
class StreamResult:
    size: int
    sha256: str
    committed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def stream_to_locations(
    source: BinaryIO,
    locations: list[Location],
    key: str,
    compression: CompressionConfig,
    encryption: EncryptionConfig,
    before_commit: Callable[[], None] | None = None,
) -> StreamResult:
    """Stream `source` to `key` on every location; returns what committed and what failed.

    `before_commit` runs after the source is exhausted and before any object is committed; if it
    raises (pg_dump exited non-zero, say) every upload is aborted and nothing becomes visible.
    """
    targets = [_Target(loc, key) for loc in locations]
    for t in targets:
        t.thread.start()
    writer = FanOutWriter(targets)
    try:
        reader = compressing_reader(source, compression)
        if encryption.method == "age":
            pyrage.encrypt_io(reader, writer, age_recipients(encryption))
        else:
            while chunk := reader.read(CHUNK):
                writer.write(chunk)
        writer.close()
        for t in targets:
            t.queue.put(_STOP)  # also to failed ones: their thread drains until it sees this
        for t in targets:
            t.thread.join()
        if before_commit is not None:
            before_commit()
    except BaseException as e:
        own_failures = {t.location.name: _error_text(t.error) for t in targets if t.error is not None}
        _abort(targets, e)
        if own_failures and len(own_failures) == len(targets):
            # The stream stopped because no location could take it (pyrage wraps our exception).
            raise AllTargetsFailed(
                "every location failed: " + "; ".join(own_failures.values())) from e
        raise

    result = StreamResult(size=writer.size, sha256=writer.sha256.hexdigest())
    for t in targets:
        if t.error is None:
            try:
                t.upload.commit()
                result.committed.append(t.location.name)
                continue
            except BaseException as e:
                t.error = e
        elif t.upload is not None:
            t.upload.abort()
        result.failed[t.location.name] = _error_text(t.error)
    return result


def _abort(targets: list[_Target], cause: BaseException) -> None:
    for t in targets:
        if t.thread.is_alive():
            t.error = t.error or cause
            t.queue.put(_STOP)
    for t in targets:
        t.thread.join(timeout=30)
        if t.upload is not None:
            t.upload.abort()


def _error_text(e: BaseException | None) -> str:
    if e is None:
        return "unknown error"
    return str(e) if isinstance(e, LocationError) else f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------- restore direction


class ChecksumMismatch(RuntimeError):
    pass


class HashingReader:
    """Reads from an object while hashing it, to compare with the manifest at the end."""

    def __init__(self, src: BinaryIO):
        self._src = src
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._src.read(size)
        self.sha256.update(data)
        self.size += len(data)
        return data


def hash_object(location: Location, key: str) -> tuple[int, str]:
    """Read an object back in full: its size and SHA-256."""
    with location.open_read(key) as f:
        h = hashlib.sha256()
        size = 0
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def load_identities(config) -> list:
    """The age identities that decrypt this repository (only restores need them)."""
    enc = config.encryption
    path = enc.identity_path()
    if path is None:
        var = enc.identity_file_env or "DR_AGE_IDENTITY_FILE"
        raise ConfigError(
            f"this backup is encrypted with age; set {var} to the identity file (encryption.identity_file_env) "
            f"whose public key has fingerprint {', '.join(recipient_fingerprints(enc)) or '(see the manifest)'}")
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
    except OSError as e:
        raise ConfigError(f"cannot read the age identity file {path}: {e.strerror}") from None
    keys = [ln for ln in lines if ln.startswith("AGE-SECRET-KEY-")]
    if not keys:
        raise ConfigError(f"{path} holds no age identity (AGE-SECRET-KEY-... line)")
    try:
        return [pyrage.x25519.Identity.from_str(k) for k in keys]
    except Exception:
        raise ConfigError(f"{path}: not a valid age identity") from None
