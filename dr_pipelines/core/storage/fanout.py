"""Byte pipelines: source -> compress -> encrypt -> SHA-256 -> every location, concurrently.

Memory is bounded by the queues (a few MiB per location), never by the size of the data. Nothing
is written to disk in plaintext."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pyrage

from dr_pipelines.core.codec.encode import compressing_reader
from dr_pipelines.core.codec.keys import age_recipients
from dr_pipelines.core.codec.methods import CHUNK, Readable
from dr_pipelines.core.config import CompressionConfig, EncryptionConfig
from dr_pipelines.core.errors import DrError
from dr_pipelines.core.storage.base import Location, LocationError, Upload

_QUEUE_CHUNKS = 8  # per location: at most 8 MiB in flight


_STOP = object()


# --------------------------------------------------------------------------- fan-out


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


class AllTargetsFailed(DrError):
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
    source: Readable,
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
            raise AllTargetsFailed("every location failed: " + "; ".join(own_failures.values())) from e
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
